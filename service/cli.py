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
from typing import IO, Any

import click

from service.commandline import admin_url
from service.errors import ConfigError, RuleError
from service.ids import ID
from service.settings import (
    Settings,
    default_webhook_secret,
    load_settings,
    requested_log_format,
)


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
_LAZY_COMMANDS = {
    "admin": ("service.admin.commands", "admin"),
    "campaign": ("service.admin.grant_commands", "campaign"),
    "grants": ("service.admin.grant_commands", "grants"),
    "orders": ("service.orders.commands", "orders"),
    "rules": ("service.rules.commands", "rules"),
}


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
        url = preflight.redis_reachable(settings.redis_url, cluster=settings.redis_cluster)
        preflight.queue_reachable(settings, url)
        yield url
        return
    with embedded_redis(settings.data_dir / "redis", settings.embedded_redis_port) as url:
        preflight.queue_reachable(settings, url)
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
            preflight.durable_writes(
                redis_url, settings.webhook_durability, cluster=settings.redis_cluster
            )
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
        from redis.exceptions import RedisError

        from service import queue
        from service.commandline import operator_settings
        from service.worker import worker_alive

        try:
            url = admin_url(None)
            where = queue.target(operator_settings(), url)
            alive = asyncio.run(worker_alive(where))
        except ConfigError as exc:  # a health check says 1 (2 is reserved in Docker's)
            click.echo(f"{exc.message} ({exc.hint})", err=True)
            sys.exit(1)
        except (RedisError, OSError) as exc:
            click.echo(f"cannot reach the queue's Redis ({where}): {exc}", err=True)
            sys.exit(1)
        if alive:
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
# duplicates: the two buckets' options are alike in shape (limit, window); click declares each.
@click.option(
    "--rate-limit",
    default=500,
    show_default=True,
    type=int,
    help="Customers endpoints' requests per window per store (Salla: 500 per 10 min).",
)
@click.option("--rate-window", default=600.0, show_default=True, type=float, help="Seconds.")
# duplicates: shaped like --rate-limit above (see there).
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
    default=lambda: default_webhook_secret(sandbox=True),
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
    from service.errors import SandboxStateError
    from service.logging import configure_logging, log_everything
    from service.sandbox.app import Sandbox, create_sandbox_app

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
    default=default_webhook_secret,
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
