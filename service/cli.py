"""The `salla-rewards` command line: it parses arguments; the work lives in the modules.

A configuration mistake (a bad setting, a busy port, an unreachable Redis, invalid rules) is a
`ConfigError`: every command prints it as one line, a sentence and a hint (a JSON line when
`LOG_FORMAT=json`), and exits 2; never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import click

from service.errors import ConfigError, RuleError
from service.ids import ID, WHAT_AN_ID_IS, parse_id
from service.settings import (
    DEVELOPMENT_WEBHOOK_SECRET,
    Settings,
    load_settings,
    requested_log_format,
)

if TYPE_CHECKING:  # the rule engine takes a second to import: not for a refusal
    from service.rules.model import RuleSet


class Refused(click.ClickException):
    """A `ConfigError` as the command line shows it: one line, exit 2."""

    exit_code = 2

    def __init__(self, error: ConfigError, **fields: Any) -> None:
        super().__init__(error.message)
        self.hint = error.hint
        self.fields = fields

    def show(self, file: IO[Any] | None = None) -> None:
        from service.logging import configure_logging, get_logger, use_json_lines

        if use_json_lines(requested_log_format()):
            configure_logging("json", "INFO")
            get_logger("service.cli").error(
                "config_error", error=self.message, hint=self.hint, **self.fields
            )
            return
        hint = f" Hint: {self.hint}." if self.hint else ""
        click.echo(f"Error: {self.message.rstrip('.')}.{hint}", err=True)
        for problem in self.fields.get("problems", ()):
            click.echo(f"  {problem}", err=True)


#: Commands imported only when they run: their modules load the ledger and the rule engine
#: (seconds on a busy machine), which a refusal, `serve` or `--help` must not wait for.
_LAZY_COMMANDS = {"orders": ("service.orders.commands", "orders")}


class _Commands(click.Group):
    """The top-level group: a `ConfigError` from any command becomes a `Refused`; some
    commands are imported on first use (`_LAZY_COMMANDS`)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *_LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in _LAZY_COMMANDS:
            import importlib

            module, name = _LAZY_COMMANDS[cmd_name]
            command: click.Command = getattr(importlib.import_module(module), name)
            return command
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            raise Refused(exc) from None
        except RuleError as exc:  # loading rules to serve them (`rules check` has its own)
            raise Refused(
                ConfigError("rules are invalid", hint="salla-rewards rules check"),
                problems=exc.problems,
            ) from None


def _start_logging(settings: Settings) -> None:
    """Logging for a long-running command: every line in the configured format."""
    from service.logging import configure_logging, log_everything

    configure_logging(settings.log_format, settings.log_level)
    log_everything()


@contextlib.contextmanager
def _redis_for(settings: Settings) -> Iterator[str]:
    """`REDIS_URL` once it answers; unset, the embedded Redis (started here, and stopped on
    the way out, unless another process of ours already runs it)."""
    from service import preflight
    from service.embedded import embedded_redis

    if settings.redis_url:
        yield preflight.redis_reachable(settings.redis_url)
        return
    with embedded_redis(settings.data_dir / "redis", settings.embedded_redis_port) as url:
        yield url


@click.group(cls=_Commands)
@click.version_option(package_name="salla-rewards")
def main() -> None:
    """salla-rewards: Salla webhooks in, loyalty points out."""


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
def serve(host: str, port: int) -> None:
    """Run the HTTP service (webhooks, health) with uvicorn."""
    from service import preflight
    from service.children import signals_end_the_process

    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the rules' reload handler is in
    settings = load_settings()
    _start_logging(settings)
    with signals_end_the_process():
        # The port is bound here and handed to uvicorn: a busy port is refused before Redis
        # starts, and nothing can take it between the check and the server's start.
        sock = preflight.bind(host, port, "--port")
        with sock, _redis_for(settings) as redis_url:
            # Imported after the quick checks: the app and its rule engine take seconds to
            # import on a busy machine, which a refusal should not wait for.
            import uvicorn

            from service import server
            from service.app import create_app
            from service.logging import get_logger

            app = create_app(settings, redis_url)
            config = uvicorn.Config(app, host=host, port=port, **server.options(settings))
            uvicorn_server = uvicorn.Server(config)
            # uvicorn names its address only for sockets it binds itself.
            get_logger("service.web").info("web_listening", url=f"http://{host}:{port}")
            uvicorn_server.run(sockets=[sock])
            if not uvicorn_server.started:  # the application's start-up failed (logged above)
                sys.exit(3)


@main.command()
@click.option(
    "--check",
    is_flag=True,
    help="Exit 0 if a worker reported in recently, 1 if not (for health checks).",
)
def worker(check: bool) -> None:
    """Run the arq worker: processes events, sends grants to Salla."""
    if check:
        from service.worker import worker_alive

        try:
            url = _admin_url(None)
        except ConfigError as exc:  # a health check says 1 (2 is reserved in Docker's)
            click.echo(f"{exc.message} ({exc.hint})", err=True)
            sys.exit(1)
        if asyncio.run(worker_alive(url)):
            click.echo("ok: a worker reported in recently")
            return
        click.echo("no worker has reported in recently", err=True)
        sys.exit(1)
    from service.children import signals_end_the_process

    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the rules' reload handler is in
    settings = load_settings()
    _start_logging(settings)
    with signals_end_the_process(), _redis_for(settings) as redis_url:
        # Imported after the quick checks (see `serve`).
        import uvloop

        from service.rules import load_rules
        from service.worker import create_worker, run_worker

        load_rules(settings.rules_path)
        # uvloop: the worker is mostly Redis round trips, which uvloop's transports make cheaper.
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        run_worker(create_worker(settings, redis_url))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8081, show_default=True, type=int)
@click.option(
    "--rate-limit",
    default=500,
    show_default=True,
    type=int,
    help="Customers endpoints' requests per window per store (Salla: 500 per 10 min).",
)
@click.option("--rate-window", default=600.0, show_default=True, type=float, help="Seconds.")
@click.option(
    "--plan-rate-limit",
    default=120,
    show_default=True,
    type=int,
    help="Every Admin API call's requests per window per store (Salla's plans: 120/360/720).",
)
@click.option("--plan-rate-window", default=60.0, show_default=True, type=float, help="Seconds.")
@click.option(
    "--webhook-url",
    default=None,
    help="Where the sandbox store sends its order webhooks (none: it sends none).",
)
@click.option(
    "--webhook-secret",
    envvar="SANDBOX_WEBHOOK_SECRET",
    default=DEVELOPMENT_WEBHOOK_SECRET,
    show_default="$SANDBOX_WEBHOOK_SECRET or the development secret",
    help="Signs the webhooks (prefer the environment variable to the command line).",
)
@click.option(
    "--webhook-resends",
    default=3,
    show_default=True,
    type=click.IntRange(0, 10),
    help="Re-sends of a failed webhook delivery, as Salla does.",
)
@click.option(
    "--webhook-resend-delay",
    default=300.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Seconds between re-sends (Salla: about 5 minutes).",
)
@click.option(
    "--state-file",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Keep every store, token, order and balance in this JSON file across restarts.",
)
def sandbox(
    host: str,
    port: int,
    rate_limit: int,
    rate_window: float,
    plan_rate_limit: int,
    plan_rate_window: float,
    webhook_url: str | None,
    webhook_secret: str,
    webhook_resends: int,
    webhook_resend_delay: float,
    state_file: Path | None,
) -> None:
    """Run the Salla-compatible sandbox API and store alone (docs/sandbox.md)."""
    import uvicorn

    from service import preflight
    from service.children import signals_end_the_process
    from service.logging import configure_logging, log_everything
    from service.sandbox.app import Sandbox, create_sandbox_app
    from service.sandbox.state import SandboxStateError

    # The sandbox needs no settings, only the log format (warnings and errors only).
    configure_logging(requested_log_format(), "WARNING")
    log_everything()
    try:
        box = Sandbox(
            rate_limit=rate_limit,
            rate_window_s=rate_window,
            plan_rate_limit=plan_rate_limit,
            plan_rate_window_s=plan_rate_window,
            webhook_url=webhook_url,
            webhook_secret=webhook_secret,
            webhook_resends=webhook_resends,
            webhook_resend_delay_s=webhook_resend_delay,
            state_file=state_file,
        )
    except SandboxStateError as exc:
        raise click.BadParameter(str(exc), param_hint="--state-file") from None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--webhook-secret") from None
    with signals_end_the_process(), preflight.bind(host, port, "--port") as sock:
        config = uvicorn.Config(
            create_sandbox_app(box),
            host=host,
            port=port,
            log_config=None,
            log_level="warning",
            access_log=False,
        )
        uvicorn.Server(config).run(sockets=[sock])


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--url", default="http://127.0.0.1:8000/webhooks/salla", show_default=True)
@click.option(
    "--secret",
    envvar="SALLA_WEBHOOK_SECRET",
    default=DEVELOPMENT_WEBHOOK_SECRET,
    show_default="$SALLA_WEBHOOK_SECRET or the development secret",
)
@click.option(
    "--strategy", type=click.Choice(["signature", "token"]), default="signature", show_default=True
)
@click.option("--merchant", type=ID, default=None, help="Send as this store instead.")
def send(file: Path, url: str, secret: str, strategy: str, merchant: int | None) -> None:
    """Sign FILE and POST it exactly as Salla delivers a webhook."""
    import httpx

    from service.webhooks import signed_headers

    body = file.read_bytes()
    if merchant is not None:
        doc = json.loads(body)
        doc["merchant"] = merchant
        body = json.dumps(doc, ensure_ascii=False).encode()
    headers = signed_headers(body, secret, strategy)  # type: ignore[arg-type]
    try:
        response = httpx.post(url, content=body, headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        raise click.ClickException(f"could not reach {url}: {exc}") from None
    click.echo(f"{response.status_code} {response.text}")
    if response.status_code not in (200, 201):
        sys.exit(1)


@main.group()
def rules() -> None:
    """Check, simulate and test rule files (no Redis, no Salla)."""


_rules_path = click.option(
    "--rules",
    "rules_path",
    envvar="RULES_PATH",
    default="rules",
    show_default=True,
    type=click.Path(path_type=Path),
    help="A rule file or folder ($RULES_PATH).",
)


def _load(path: Path) -> RuleSet:
    from service.rules import load_rules

    try:
        return load_rules(path)
    except RuleError as exc:
        for problem in exc.problems:
            click.echo(problem, err=True)
        raise click.ClickException(f"{len(exc.problems)} problem(s) in {path}") from None


@rules.command("check")
@click.argument("path", required=False, type=click.Path(path_type=Path))
@_rules_path
def rules_check(path: Path | None, rules_path: Path) -> None:
    """Validate rule files: every problem with file, line and a sentence; non-zero on any."""
    target = path or rules_path
    ruleset = _load(target)
    click.echo(
        f"ok: {len(ruleset.rules)} rules in {len(ruleset.files)} files, "
        f"{len(ruleset.overrides)} store overrides, {len(ruleset.tests)} tests ({target})"
    )


@rules.command("simulate")
@click.argument("event_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--merchant", type=ID, default=None, help="Evaluate as this store.")
@click.option(
    "--settings",
    "settings_file",
    type=click.Path(exists=True, path_type=Path),
    help="A JSON file of store settings (as app.settings.updated sends them).",
)
@click.option("--now", default=None, help="Evaluate at this ISO 8601 time (default: now).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_rules_path
def rules_simulate(
    event_file: Path,
    merchant: int | None,
    settings_file: Path | None,
    now: str | None,
    as_json: bool,
    rules_path: Path,
) -> None:
    """Show the grants EVENT_FILE would produce and why each rule matched or not."""
    from service.errors import InvalidPayload
    from service.rules.testing import simulate

    ruleset = _load(rules_path)
    store_settings = json.loads(settings_file.read_text()) if settings_file else None
    try:
        result = simulate(
            ruleset,
            json.loads(event_file.read_bytes()),
            merchant=merchant,
            settings=store_settings,
            now=now,
        )
    except (InvalidPayload, ValueError) as exc:
        raise click.ClickException(f"{event_file}: {exc}") from None
    if as_json:
        click.echo(
            json.dumps(
                {
                    "merchant": result.merchant,
                    "event": result.event,
                    "revokes_order": result.revokes_order,
                    "problems": list(result.problems),
                    "grants": [
                        dict(zip(("rule", "points", "type"), g, strict=True)) for g in result.grants
                    ],
                    "trace": [
                        {
                            "rule": o.rule_id,
                            "verdict": o.verdict,
                            "deserved": o.deserved,
                            "scope": o.scope,
                            "reason": o.reason,
                            "why": o.why,
                        }
                        for o in result.outcomes
                    ],
                },
                ensure_ascii=False,
                indent=2,
            )
        )
        return
    click.echo(f"{result.event} for store {result.merchant}")
    for outcome in result.outcomes:
        click.echo(
            f"  {outcome.rule_id:<20} {outcome.verdict:<11} {outcome.deserved:>8}  {outcome.why}"
        )
    if result.revokes_order:
        click.echo("  the order's status revokes everything it was granted")
    for problem in result.problems:
        click.echo(f"  store setting ignored: {problem}")
    if result.grants:
        for rule, points, kind in result.grants:
            click.echo(f"grant: {kind} {points} ({rule})")
    else:
        click.echo("grant: none")


@rules.command("test")
@click.argument("path", required=False, type=click.Path(path_type=Path))
@_rules_path
def rules_test(path: Path | None, rules_path: Path) -> None:
    """Run the `tests:` written in rule files; non-zero when any fails."""
    from service.rules.testing import run_tests

    ruleset = _load(path or rules_path)
    results = run_tests(ruleset)
    for result in results:
        status = "PASS" if result.ok else "FAIL"
        click.echo(f"{status} {result.test.name} ({result.test.source})")
        for failure in result.failures:
            click.echo(f"     {failure}")
    failed = sum(not r.ok for r in results)
    click.echo(f"{len(results) - failed} passed, {failed} failed")
    if failed or not results:
        raise click.ClickException("rule tests failed" if failed else "no rule tests found")


_redis_option = click.option(
    "--redis-url",
    envvar="REDIS_URL",
    default=None,
    help="Redis of the service ($REDIS_URL; default: the embedded one on $EMBEDDED_REDIS_PORT).",
)


def _admin_url(redis_url: str | None) -> str:
    """The service's Redis for operator commands (no webhook secret needed); fails clearly."""
    return _redis_url(_operator_settings(), redis_url)


def _settings() -> Settings:
    """The service's settings for an operator command that needs all of them (`orders`)."""
    return load_settings()


def _redis_url(settings: Settings, redis_url: str | None = None) -> str:
    """The running service's Redis, which must answer: `--redis-url`, else `REDIS_URL`, else
    the embedded one's port. Operator commands never start a Redis of their own."""
    from service import preflight

    url = redis_url or settings.redis_url or f"redis://127.0.0.1:{settings.embedded_redis_port}/0"
    return preflight.redis_reachable(url)


def _run_async(coro: Any) -> Any:
    return asyncio.run(coro)


GRANT_KINDS = ("failed", "review", "unknown", "parked", "pending")


@main.group()
def grants() -> None:
    """Inspect and retry grants (failed, in review, unknown outcome, parked)."""


@grants.command("failed")
@click.option("--merchant", type=ID, default=None, help="One store only.")
@click.option(
    "--state", "kind", type=click.Choice(GRANT_KINDS), default="failed", show_default=True
)
@_redis_option
def grants_failed(merchant: int | None, kind: str, redis_url: str | None) -> None:
    """List grants in a state, with the reason each is there."""
    from redis.asyncio import Redis

    from service import ledger

    url = _admin_url(redis_url)

    async def listing() -> list[ledger.Grant]:
        client = Redis.from_url(url, decode_responses=True)
        try:
            merchants = [merchant] if merchant else await ledger.stores_with(client, kind)
            found: list[ledger.Grant] = []
            for store in merchants:
                found += await ledger.grants_in(client, kind, store)
            return found
        finally:
            await client.aclose()

    found = _run_async(listing())
    for grant in found:
        click.echo(
            f"{grant.id}  store {grant.merchant}  customer {grant.customer}  "
            f"{grant.type} {grant.points}  rule {grant.rule}  {grant.reason!r}  "
            f"{grant.error}"
        )
    click.echo(f"{len(found)} {kind} grant(s)")


@grants.command("retry")
@click.argument("grant_ids", nargs=-1)
@click.option("--merchant", type=ID, default=None, help="Every grant of this store in --state.")
@click.option(
    "--state", "kind", type=click.Choice(GRANT_KINDS[:-1]), default="failed", show_default=True
)
@_redis_option
def grants_retry(
    grant_ids: tuple[str, ...], merchant: int | None, kind: str, redis_url: str | None
) -> None:
    """Send grants again: the given GRANT_IDS, or all of --merchant in --state.

    Each grant moves back to pending atomically, so Ctrl-C leaves nothing half-done.
    """
    from redis.asyncio import Redis

    from service import ledger, queue

    if not grant_ids and merchant is None:
        raise click.UsageError("name grant ids, or --merchant for all of a store's grants")
    url = _admin_url(redis_url)

    async def retry() -> int:
        client = Redis.from_url(url, decode_responses=True)
        pool = await queue.connect(url)
        try:
            if grant_ids:
                chosen = await ledger.load(client, list(grant_ids))
            else:
                chosen = await ledger.grants_in(client, kind, merchant or 0)
            moved = 0
            stores = set()
            label = f"retrying {len(chosen)} grant(s)"
            with _interruptible() as stop, click.progressbar(chosen, label=label) as bar:
                for grant in bar:
                    if stop.is_set():
                        interrupted[0] = True
                        break
                    if grant.state == kind and await ledger.requeue(
                        client, grant.merchant, grant, kind
                    ):
                        moved += 1
                        stores.add(grant.merchant)
            for store in stores:  # what was moved is sent, interrupted or not
                await queue.enqueue_flush(pool, store, 0)
            return moved
        finally:
            await pool.aclose()
            await client.aclose()

    interrupted = [False]
    click.echo(f"{_run_async(retry())} grant(s) queued again")
    if interrupted[0]:
        click.echo("interrupted: run the same command again for the rest", err=True)
        sys.exit(130)


@main.command()
@click.option("--merchant", type=ID, required=True)
@click.option(
    "--points",
    type=click.IntRange(1, 999_999),
    default=None,
    help="Points per customer (not with --reset).",
)
@click.option("--reason", required=True, help="Shown to customers; also names the campaign.")
@click.option(
    "--type", "grant_type", type=click.Choice(["plus", "minus"]), default="plus", show_default=True
)
@click.option("--channels", default="", help="Comma-separated: email,sms,mobile.")
@click.option(
    "--customers",
    "customers_file",
    type=click.Path(exists=True, path_type=Path),
    help="A file with one customer id per line (CSV: the first column).",
)
@click.option("--all", "everyone", is_flag=True, help="Every customer of the store (select_all).")
@click.option(
    "--reset", is_flag=True, help="Reset the customers' points (Salla's reset flag) instead."
)
@click.option(
    "--id",
    "campaign_id",
    default=None,
    help="Campaign id; running the same id again grants nothing twice.",
)
@_redis_option
def campaign(
    merchant: int,
    points: int | None,
    reason: str,
    grant_type: str,
    channels: str,
    customers_file: Path | None,
    everyone: bool,
    reset: bool,
    campaign_id: str | None,
    redis_url: str | None,
) -> None:
    """Grant points to many customers through the ledger, batching and rate limits.

    With --reset the customers' points are reset instead; the ledger records the reset once
    but does not model balances, so reversals of earlier grants can still follow it.
    """
    import hashlib

    from redis.asyncio import Redis

    from service import ledger, queue
    from service.rules.engine import Outcome

    if everyone == bool(customers_file):
        raise click.UsageError("give exactly one of --all or --customers FILE")
    if reset == (points is not None):
        raise click.UsageError("give --points N to grant, or --reset to reset (not both)")
    chosen_channels = tuple(c for c in channels.split(",") if c)
    if not set(chosen_channels) <= {"email", "sms", "mobile"}:
        raise click.UsageError("--channels takes email, sms and mobile")
    ids: list[int] = [0]
    if customers_file:
        lines = [line for line in customers_file.read_text().splitlines() if line.strip()]
        ids = [c for c in (parse_id(line.split(",")[0]) for line in lines) if c is not None]
        if not ids:
            raise click.ClickException(f"{customers_file}: no customer ids found")
        if len(ids) < len(lines):  # a CSV header, or ids in other digits: say so, go on
            click.echo(
                f"{customers_file}: {len(lines) - len(ids)} line(s) without a customer id in "
                f"the first column ({WHAT_AN_ID_IS}) skipped",
                err=True,
            )
    action = "reset" if reset else f"{points}|{grant_type}"
    name = campaign_id or hashlib.sha256(f"{reason}|{action}".encode()).hexdigest()[:12]
    # A reset is recorded as a 1-point "minus" grant (so the ledger sends it exactly once) and
    # goes out with the reset flag and no points.
    signed = -1 if reset else (points or 0) * (1 if grant_type == "plus" else -1)
    mode = {(True, True): "reset_all", (True, False): "reset", (False, True): "select_all"}.get(
        (reset, everyone), ""
    )
    url = _admin_url(redis_url)

    async def grant_all() -> int:
        client = Redis.from_url(url, decode_responses=True)
        pool = await queue.connect(url)
        made = 0
        try:
            label = f"campaign {name}: {len(ids)} grant(s)"
            with _interruptible() as stop, click.progressbar(ids, label=label) as bar:
                for customer in bar:
                    if stop.is_set():
                        interrupted[0] = True
                        break
                    scope = f"campaign:{name}:{'all' if everyone else customer}"
                    outcome = Outcome(
                        f"campaign:{name}",
                        name,
                        "grant",
                        signed,
                        reason,
                        chosen_channels,
                        "campaign",
                        scope=scope,
                        mode=mode,
                    )
                    new = await ledger.apply_outcomes(
                        client, merchant, [outcome], customer=customer
                    )
                    made += len(new)
            await queue.enqueue_flush(pool, merchant, 0)
            return made
        finally:
            await pool.aclose()
            await client.aclose()

    interrupted = [False]
    made = _run_async(grant_all())
    click.echo(f"campaign {name}: {made} new grant(s) queued for store {merchant}")
    if interrupted[0]:
        click.echo(
            f"interrupted: run the same command (campaign id {name}) again for the rest", err=True
        )
        sys.exit(130)


@contextlib.contextmanager
def _interruptible() -> Iterator[asyncio.Event]:
    """Ctrl-C (or SIGTERM) sets the event instead of raising: long commands stop between two
    units of work, never inside one. A second Ctrl-C interrupts at once."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def first_signal() -> None:
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)  # the next Ctrl-C is a KeyboardInterrupt

    loop.add_signal_handler(signal.SIGINT, first_signal)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    try:
        yield stop
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        loop.remove_signal_handler(signal.SIGTERM)


def _operator_settings() -> Settings:
    """Settings for operator commands: the service's environment, no webhook secret needed."""
    return load_settings(app_env="development")


@main.group()
def admin() -> None:
    """What the /admin/ routes answer, straight from the service's Redis."""
    from service.logging import configure_logging

    # Only warnings, on stderr: stdout carries the command's own output.
    configure_logging(requested_log_format(), "WARNING")


_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def _with_redis(url: str, work: Any) -> Any:
    """Run `work(redis)` against the service's Redis (decoded strings)."""
    from redis.asyncio import Redis

    async def go() -> Any:
        client = Redis.from_url(url, decode_responses=True)
        try:
            return await work(client)
        finally:
            await client.aclose()

    return _run_async(go())


def _grant_line(g: dict[str, Any]) -> str:
    sent = f"sent {g['sent_at']}" if g["sent_at"] else g["state"]
    batch = f"  batch {g['batch']}" if g["batch"] else ""
    error = f"  ({g['error']})" if g["error"] else ""
    return (
        f"  {g['created_at']}  {g['signed_points']:+d}  customer {g['customer']}  "
        f"rule {g['rule']}  {sent}{batch}{error}  [{g['grant_id']}]"
    )


@admin.command("store")
@click.argument("merchant", type=ID)
@_json_option
@_redis_option
def admin_store(merchant: int, as_json: bool, redis_url: str | None) -> None:
    """A store's token, queue, rate-limit budget and failed grants."""
    from service.admin import queries as ops

    settings = _operator_settings()
    url = _admin_url(redis_url)
    state = _with_redis(url, lambda r: ops.store_state(r, settings, merchant))
    if as_json:
        click.echo(json.dumps(state, indent=2))
        return
    token = state["token"]
    click.echo(f"store {merchant}: {state['status']}")
    if token:
        click.echo(
            f"  token valid until {token['valid_until'] or 'unknown'}"
            f" ({token['expires_in_s']} s), refreshable: {token['refreshable']}"
        )
    else:
        click.echo("  no usable token: grants are parked until app.store.authorize")
    queue_ = state["queue"]
    click.echo("  queue  " + "  ".join(f"{k} {v}" for k, v in queue_.items()))
    limit = state["rate_limit"]
    click.echo(
        f"  rate limit  {limit['available']:g} of {limit['capacity']} available"
        + (f", blocked for {limit['blocked_for_s']:g} s" if limit["blocked_for_s"] else "")
    )
    for grant in state["failed_grants"]:
        click.echo(_grant_line(grant))


@admin.command("order")
@click.argument("merchant", type=ID)
@click.argument("order_id", type=ID)
@_json_option
@_redis_option
def admin_order(merchant: int, order_id: int, as_json: bool, redis_url: str | None) -> None:
    """The ledger for one order: each rule's points, and every grant with its batch."""
    from service.admin import queries as ops

    url = _admin_url(redis_url)
    view = _with_redis(url, lambda r: ops.order_ledger(r, merchant, order_id))
    if as_json:
        click.echo(json.dumps(view, indent=2, ensure_ascii=False))
    elif not view["found"]:
        click.echo(f"order {order_id} of store {merchant}: nothing in the ledger")
    else:
        click.echo(f"order {order_id} of store {merchant}: {view['granted']:+d} points granted")
        for scope in view["scopes"]:
            click.echo(f" {scope['scope']} (customer {scope['customer']})")
            for rule, record in scope["rules"].items():
                click.echo(
                    f"  rule {rule}: granted {record['granted']:+d}, deserves "
                    f"{record['deserved']:+d}  {record['reason']!r}"
                )
            for grant in scope["grants"]:
                click.echo(_grant_line(grant))
    if not view["found"]:
        sys.exit(1)


@admin.command("customer")
@click.argument("merchant", type=ID)
@click.argument("customer_id", type=ID)
@_json_option
@_redis_option
def admin_customer(merchant: int, customer_id: int, as_json: bool, redis_url: str | None) -> None:
    """One customer's grants, newest first, with totals by state."""
    from service.admin import queries as ops

    url = _admin_url(redis_url)
    view = _with_redis(url, lambda r: ops.customer_ledger(r, merchant, customer_id))
    if as_json:
        click.echo(json.dumps(view, indent=2, ensure_ascii=False))
        return
    totals = ", ".join(f"{k} {v:+d}" for k, v in view["points_by_state"].items()) or "none"
    click.echo(f"customer {customer_id} of store {merchant}: {totals}")
    for grant in view["grants"]:
        click.echo(_grant_line(grant))


_since = click.option("--since", default=None, help="From this date or ISO time (UTC).")
_until = click.option(
    "--until", default=None, help="Up to this time; a date includes the whole day. Default now."
)


def _range(since: str | None, until: str | None) -> tuple[int, int]:
    from service.admin import queries as ops

    try:
        return ops.time_range(since, until)
    except ops.AdminInputError as exc:
        raise click.BadParameter(str(exc)) from None


@admin.command("export")
@_since
@_until
@click.option("--merchant", type=ID, default=None, help="One store only.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write here (atomically: the file appears only when complete). Default: stdout.",
)
@_redis_option
def admin_export(
    since: str | None,
    until: str | None,
    merchant: int | None,
    fmt: str,
    output: Path | None,
    redis_url: str | None,
) -> None:
    """Export the ledger's grants created in a date range, as JSONL or CSV."""
    from service.admin import queries as ops

    start, end = _range(since, until)
    url = _admin_url(redis_url)
    partial = output.with_name(output.name + ".partial") if output else None

    async def write(redis: Any) -> int | None:
        total = await ops.count_grants(redis, start, end)
        out = partial.open("w", encoding="utf-8", newline="") if partial else sys.stdout
        written = 0
        try:
            with _interruptible() as stop:
                if fmt == "csv":
                    out.write(ops.csv_header())
                with click.progressbar(
                    length=total, label="exporting", file=sys.stderr if partial else None
                ) as bar:
                    async for row in ops.export_grants(redis, start, end, merchant):
                        if stop.is_set():
                            return None
                        out.write(ops.export_line(row, fmt))
                        written += 1
                        bar.update(1)
        finally:
            if partial:
                out.close()
        return written

    written = _with_redis(url, write)
    if written is None:
        if partial:
            partial.unlink(missing_ok=True)
        click.echo("\ninterrupted: no file was written" if partial else "\ninterrupted", err=True)
        sys.exit(130)
    if partial and output:
        partial.replace(output)
    click.echo(f"{written} grant(s) exported" + (f" to {output}" if output else ""), err=True)


@admin.command("replay")
@_since
@_until
@click.option("--merchant", type=ID, default=None, help="One store only.")
@click.option(
    "--apply",
    is_flag=True,
    help="Send the differences (through the ledger). Without it: a dry run that only shows them.",
)
@_redis_option
def admin_replay(
    since: str | None,
    until: str | None,
    merchant: int | None,
    apply: bool,
    redis_url: str | None,
) -> None:
    """Run stored webhooks through the current rules and show (or send) what differs.

    Ctrl-C stops between two webhooks; run the same command again to finish (what was already
    applied is not applied twice).
    """
    from service.admin import queries as ops
    from service import queue
    from service.processing import ProcessingDeps
    from service.rules import load_rules

    settings = _operator_settings()
    try:
        ruleset = load_rules(settings.rules_path)
    except RuleError as exc:
        raise click.ClickException("rules are invalid:\n" + str(exc)) from None
    start, end = _range(since, until)
    url = _admin_url(redis_url)
    counts = {"webhooks": 0, "changed": 0, "points": 0, "skipped": 0}
    last = [""]

    async def go(redis: Any) -> bool:
        """True when the whole range was replayed; False when Ctrl-C stopped it."""
        pool = await queue.connect(url)
        try:
            deps = ProcessingDeps(settings, redis, pool, ruleset)
            total = await ops.count_webhooks(redis, start, end, merchant)
            with (
                _interruptible() as stop,
                click.progressbar(
                    length=total,
                    label="replaying" if apply else "replaying (dry run)",
                    file=sys.stderr,
                ) as bar,
            ):
                async for line in ops.replay(
                    deps, start, end, merchant=merchant, dry_run=not apply
                ):
                    bar.update(1)
                    counts["webhooks"] += 1
                    last[0] = line.stream_id
                    if line.skipped is not None:
                        counts["skipped"] += 1
                        click.echo(
                            f"{line.stream_id}  store {line.merchant}  {line.event}  "
                            f"skipped: {line.skipped}"
                        )
                    if not line.diffs:
                        continue
                    counts["changed"] += 1
                    for diff in line.diffs:
                        counts["points"] += diff["delta"]
                        click.echo(
                            f"{line.stream_id}  store {line.merchant}  {line.event}  "
                            f"{diff['scope']}  rule {diff['rule']}  customer {diff['customer']}  "
                            f"{diff['granted_before']:+d} -> {diff['granted_after']:+d} "
                            f"({diff['delta']:+d})"
                        )
                    if stop.is_set():
                        return False
            return True
        finally:
            await pool.aclose()

    if not _with_redis(url, go):
        click.echo(
            f"\ninterrupted after {counts['webhooks']} webhook(s), last {last[0] or 'none'}; "
            "run the same command again to finish",
            err=True,
        )
        sys.exit(130)
    verb = "applied" if apply else "would apply (dry run; --apply sends them)"
    skipped = f"; {counts['skipped']} skipped (not readable)" if counts["skipped"] else ""
    click.echo(
        f"{counts['webhooks']} webhook(s) replayed; {counts['changed']} differ; "
        f"{verb} {counts['points']:+d} point(s){skipped}",
        err=True,
    )


@main.command()
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--sandbox-port", default=8081, show_default=True, type=int)
def run(port: int, sandbox_port: int) -> None:
    """Development: embedded Redis + sandbox + serve + worker in one command.

    Ctrl-C or SIGTERM stops everything; SIGHUP reloads the rules of serve and worker.
    """
    from service import supervisor
    from service.logging import use_json_lines

    settings = load_settings(app_env="development")
    _start_logging(settings)
    use_json = use_json_lines(settings.log_format)
    sys.exit(supervisor.run(settings, port=port, sandbox_port=sandbox_port, use_json=use_json))
