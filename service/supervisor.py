"""`salla-rewards run`: the embedded Redis, the Salla sandbox, `serve` and `worker`, started,
watched and stopped by one process.

Nothing outlives `run`:

* Children run in their own process groups (`service.children`), so a terminal's Ctrl-C
  reaches `run` alone, which stops them in order: web, worker and sandbox first, Redis last
  (the worker finishes its batch against a live Redis). If `run` itself is killed, the kernel
  sends each child SIGTERM (Linux).
* SIGHUP means two things. `kill -HUP <pid of run>` (the README's "reload rules") is passed on
  to `serve` and `worker`; a hangup because `run`'s terminal went away (its controlling
  terminal is gone) stops everything.
* SIGINT and SIGTERM are handled explicitly, whatever was inherited: a background job starts
  with SIGINT ignored.
* Before anything starts: a lock on `DATA_DIR/run.lock` (a second `run` on the same folder
  refuses at once, touching nothing of the first), free ports, a reachable `REDIS_URL` and
  loadable rules, each refused as a `ConfigError` (one sentence and a hint).

Signal handlers only record the signal; the main loop acts on it between two steps, so
stopping never interrupts a step halfway.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

from service import preflight
from service.children import spawn, stop
from service.embedded import EmbeddedRedis
from service.errors import ConfigError, RuleError, ServiceError
from service.logging import get_logger
from service.settings import Settings

log = get_logger("service.run")

DEMO_MERCHANT = 193718979  # the merchant of Salla's published order.status.updated sample
LOOPBACK = "127.0.0.1"
#: The children that reload their rules on SIGHUP (the sandbox and Redis are not told).
RELOADS_ON_HUP = ("serve", "worker")
#: How long a child may take to stop after SIGTERM before its process group is killed.
STOP_TIMEOUT_S = 30.0


class Stopped(ServiceError):
    """A signal (or a closed terminal) asked `run` to stop; the message says which."""


class ChildExited(ServiceError):
    """A child ended on its own."""

    def __init__(self, name: str, status: int) -> None:
        super().__init__(f"{name} exited with status {status}")
        self.name = name
        self.status = status


class RunLock:
    """An exclusive `flock` on `DATA_DIR/run.lock`, held while `run` uses the folder; the
    kernel releases it when the process ends, however it ends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_file = self.path.open("a+")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            holder = lock_file.read().strip() or "?"
            lock_file.close()
            raise ConfigError(
                f"another salla-rewards run (pid {holder}) is using {self.path.parent}",
                hint="stop it first; a second one needs its own DATA_DIR, "
                "EMBEDDED_REDIS_PORT, --port and --sandbox-port",
            ) from None
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(f"{os.getpid()}\n")
        lock_file.flush()
        self._file = lock_file
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.truncate(0)
            self._file.close()  # closing releases the lock
            self._file = None


def _has_terminal() -> bool:
    """Whether this process still has a controlling terminal (a hangup takes it away)."""
    try:
        os.close(os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY))
    except OSError:
        return False
    return True


def _say(method: str, event: str, **fields: Any) -> None:
    """A log line that cannot fail the shutdown: after a hangup the terminal refuses writes."""
    with contextlib.suppress(OSError):
        getattr(log, method)(event, **fields)


class Supervisor:
    """The children of `run` and what to do when a signal comes or a child ends."""

    def __init__(self) -> None:
        self.children: dict[str, Any] = {}
        self.redis: EmbeddedRedis | None = None
        self._received: list[int] = []
        self._had_terminal = _has_terminal()

    def listen(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self._record)

    def _record(self, signum: int, _frame: object) -> None:
        self._received.append(signum)

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.children[name] = spawn(argv, env=env)

    def pause(self, seconds: float) -> None:
        """Sleep, then act on what happened meanwhile: raises `Stopped` or `ChildExited`."""
        time.sleep(seconds)
        while self._received:
            signum = self._received.pop(0)
            if signum == signal.SIGHUP:
                if self._had_terminal and not _has_terminal():
                    raise Stopped("the terminal was closed")
                self._forward_reload()
                continue
            raise Stopped(signal.Signals(signum).name)
        for name, child in self.children.items():
            if child.poll() is not None:
                raise ChildExited(name, child.returncode)

    def _forward_reload(self) -> None:
        told = []
        for name in RELOADS_ON_HUP:
            child = self.children.get(name)
            if child is not None and child.poll() is None:
                os.kill(child.pid, signal.SIGHUP)
                told.append(name)
        _say("info", "rules_reload_forwarded", to=told)

    def wait_http(self, url: str, timeout_s: float = 90.0) -> None:
        """Until `url` answers 200 (four processes start on a loaded machine: be patient)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            self.pause(0.1)
        raise ConfigError(
            f"{url} did not answer within {timeout_s:g} s", hint="see the lines above"
        )

    def watch(self) -> None:
        while True:
            self.pause(0.25)

    def stop_all(self) -> None:
        """SIGTERM to every child at once, wait for each; then Redis, which they used."""
        for child in self.children.values():
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.terminate()
        for child in self.children.values():  # a second SIGTERM would be logged twice
            stop(child, STOP_TIMEOUT_S, terminate=False)
        if self.redis is not None:
            self.redis.stop()


@dataclass(frozen=True)
class Credentials:
    """What a developer needs to talk to the running service and sandbox (secrets: kept in
    `DATA_DIR/run.json`, mode 0600, and shown on a terminal; never in a JSON log line)."""

    webhook_url: str
    webhook_secret: str
    sandbox_url: str
    access_token: str
    admin_token: str

    def write(self, path: Path) -> None:
        doc = {**self.__dict__, "demo_store": DEMO_MERCHANT, "pid": os.getpid()}
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(doc, out, indent=2)


def _check(settings: Settings, port: int, sandbox_port: int) -> None:
    """Everything that can be refused before anything starts, the quick checks first (the
    rule engine takes a second or two to import on a busy machine)."""
    preflight.port_free(LOOPBACK, port, "--port")
    preflight.port_free(LOOPBACK, sandbox_port, "--sandbox-port")
    if settings.redis_url:
        preflight.redis_reachable(settings.redis_url, cluster=settings.redis_cluster)
        preflight.durable_writes(
            settings.redis_url, settings.webhook_durability, cluster=settings.redis_cluster
        )
    else:
        preflight.port_free(LOOPBACK, settings.embedded_redis_port, "EMBEDDED_REDIS_PORT")
    from service.rules import load_rules

    try:
        load_rules(settings.rules_path)
    except RuleError as exc:
        raise ConfigError(
            f"rules in {settings.rules_path} are invalid: " + "; ".join(exc.problems),
            hint="salla-rewards rules check shows every problem",
        ) from None


def _sandbox_command(
    me: list[str], sandbox_port: int, webhook_url: str, state_file: Path
) -> list[str]:
    """The sandbox store sends its order webhooks to this service, signed with the same secret
    (by environment, not argv: `SANDBOX_WEBHOOK_SECRET`), and keeps its state across runs."""
    return [
        *me, "sandbox", "--port", str(sandbox_port), "--webhook-url", webhook_url,
        "--state-file", str(state_file),
    ]  # fmt: skip


def _child_env(settings: Settings, redis_url: str, sandbox_url: str, admin: str) -> dict[str, str]:
    """What the children need to be run's development service. The log format and level are
    left to them: they read the same environment and `.env` (default `auto`: console lines on
    a terminal, JSON when `make run` is piped or logged to a file)."""
    return {
        # Passed on, not read: the children build their own Settings from it (and `.env`).
        **os.environ,
        "APP_ENV": "development",
        "SALLA_WEBHOOK_SECRET": settings.webhook_secret,
        "REDIS_URL": redis_url,
        "SALLA_API_BASE": sandbox_url,
        "SALLA_OAUTH_TOKEN_URL": f"{sandbox_url}/oauth2/token",
        "SALLA_CLIENT_ID": settings.salla_client_id or "sandbox-client",
        "SALLA_CLIENT_SECRET": settings.salla_client_secret.get_secret_value()
        or "sandbox-client-secret",
        "ADMIN_TOKEN": admin,
    }


def _demo_store(sandbox_url: str) -> dict[str, Any]:
    """The demo store's tokens: the ones the sandbox kept from an earlier `run` (the service
    kept the same ones in its Redis), or a new install. Re-installing would replace the tokens
    the service holds and forget the store's orders and balances."""
    kept = httpx.get(f"{sandbox_url}/_sandbox/stores/{DEMO_MERCHANT}")
    if kept.status_code == 200:
        store: dict[str, Any] = kept.json()
        return store
    created: dict[str, Any] = httpx.post(
        f"{sandbox_url}/_sandbox/stores", json={"merchant": DEMO_MERCHANT}
    ).json()
    return created


def _install_demo_store(sandbox_url: str, webhook_url: str, secret: str) -> dict[str, Any]:
    """The demo store in the sandbox, and its `app.store.authorize` sent to the service, as
    Salla does when a merchant installs the app."""
    from service.webhooks import signed_headers

    store = _demo_store(sandbox_url)
    authorize = {
        "event": "app.store.authorize",
        "merchant": DEMO_MERCHANT,
        "created_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "data": {
            "access_token": store["access_token"],
            "refresh_token": store["refresh_token"],
            "expires": store["expires"],
            "scope": store["scope"],
            "token_type": "bearer",
        },
    }
    body = json.dumps(authorize).encode()
    httpx.post(webhook_url, content=body, headers=signed_headers(body, secret)).raise_for_status()
    return store


def run(settings: Settings, *, port: int, sandbox_port: int, use_json: bool) -> int:
    """Start everything, print the banner, and stop everything on a signal: the exit status."""
    admin = settings.admin_token.get_secret_value() or secrets.token_urlsafe(24)
    sandbox_url = f"http://{LOOPBACK}:{sandbox_port}"
    webhook_url = f"http://{LOOPBACK}:{port}/webhooks/salla"
    credentials_path = settings.data_dir / "run.json"
    me = [sys.executable, "-m", "service"]
    with RunLock(settings.data_dir / "run.lock"):
        _check(settings, port, sandbox_port)
        supervisor = Supervisor()
        supervisor.listen()
        status = 0
        try:
            redis_url = settings.redis_url
            if not redis_url:
                supervisor.redis = EmbeddedRedis(
                    settings.data_dir / "redis", settings.embedded_redis_port, owned_by_cli=True
                )
                redis_url = supervisor.redis.start()
            env = _child_env(settings, redis_url, sandbox_url, admin)
            sandbox = _sandbox_command(
                me, sandbox_port, webhook_url, settings.data_dir / "sandbox.json"
            )
            sandbox_env = {**env, "SANDBOX_WEBHOOK_SECRET": settings.webhook_secret}
            supervisor.start("sandbox", sandbox, sandbox_env)
            supervisor.start("serve", [*me, "serve", "--port", str(port)], env)
            supervisor.start("worker", [*me, "worker"], env)
            supervisor.wait_http(f"{sandbox_url}/_sandbox/health")
            supervisor.wait_http(f"http://{LOOPBACK}:{port}/readyz")
            store = _install_demo_store(sandbox_url, webhook_url, settings.webhook_secret)
            credentials = Credentials(
                webhook_url, settings.webhook_secret, sandbox_url, store["access_token"], admin
            )
            credentials.write(credentials_path)
            _announce(credentials, credentials_path, use_json)
            supervisor.watch()
        except Stopped as why:
            _say("info", "run_stopping", reason=str(why))
        except ChildExited as exc:
            # A child that refused to start (exit 2) printed its reason: pass its status on.
            status = 2 if exc.status == 2 else 1
            _say("error", "child_exited", process=exc.name, status=exc.status)
        finally:
            supervisor.stop_all()
            credentials_path.unlink(missing_ok=True)
    return status


def _announce(credentials: Credentials, path: Path, use_json: bool) -> None:
    service = credentials.webhook_url.removesuffix("/webhooks/salla")
    if use_json:  # a log line like any other: no secret in it, only where to find them
        _say(
            "info",
            "run_ready",
            webhook_url=credentials.webhook_url,
            sandbox_url=credentials.sandbox_url,
            demo_store=DEMO_MERCHANT,
            admin_url=f"{service}/admin/",
            credentials_file=str(path),
            try_it=f"salla-rewards send examples/webhooks/order.status.updated.json "
            f"--url {credentials.webhook_url}",
        )
        return
    token, admin = credentials.access_token, credentials.admin_token
    with contextlib.suppress(OSError):
        print(
            f"""
  salla-rewards is running (development)

  webhook URL      {credentials.webhook_url}
  webhook secret   {credentials.webhook_secret}     (strategy: signature)
  Salla sandbox    {credentials.sandbox_url}   demo store {DEMO_MERCHANT} is installed
  (all of these, and the tokens below, are in {path} while this runs)

  Send Salla's sample "order completed" webhook:
    .venv/bin/salla-rewards send examples/webhooks/order.status.updated.json \\
      --url {credentials.webhook_url}

  Then see the customer's points in the sandbox:
    curl -s -H 'Authorization: Bearer {token}' \\
      '{credentials.sandbox_url}/customers/loyalty/points?customer_id=1779795066'

  And what the service knows (admin token {admin}):
    curl -s -H 'Authorization: Bearer {admin}' {service}/admin/stores/{DEMO_MERCHANT}
    .venv/bin/salla-rewards admin customer {DEMO_MERCHANT} 1779795066

  Ctrl-C stops everything; kill -HUP {os.getpid()} reloads the rules.
""",
            file=sys.stderr,
            flush=True,
        )
