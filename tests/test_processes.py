"""Nothing outlives the command that started it; mistakes are refused in one line.

Real commands in sessions of their own (`tests/support/processes.py` kills whatever is left
of a session, whatever the test did), real signals, a real pseudo-terminal.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import socket
import subprocess
import sys
import termios
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import ROOT_DIR, SECRET
from tests.support.processes import (
    in_own_session,
    listening,
    run_env,
    run_session,
    session_members,
    wait_session_empty,
)
from tests.support.servers import free_port, wait_until

CLI = [sys.executable, "-m", "service"]

pytestmark = pytest.mark.timeout(240)


def service_env(tmp_path: Path, redis_port: int, **extra: str) -> dict[str, str]:
    return run_env(tmp_path / "var", redis_port, SALLA_WEBHOOK_SECRET=SECRET, **extra)


def service_argv(command: str) -> list[str]:
    return [*CLI, command, *(["--port", str(free_port())] if command == "serve" else [])]


STARTED = {"serve": '"web_started"', "worker": '"worker_started"'}


class TestServeAndWorkerStopTheirRedis:
    """`serve` or `worker` on embedded defaults stops the Redis it started, and only that."""

    @pytest.mark.parametrize("command", ["serve", "worker"])
    def test_sigterm_stops_the_embedded_redis_it_started(
        self, tmp_path: Path, command: str
    ) -> None:
        redis_port = free_port()
        log = tmp_path / "log"
        with (
            log.open("wb") as out,
            in_own_session(
                service_argv(command),
                cwd=ROOT_DIR,
                env=service_env(tmp_path, redis_port),
                stdout=out,
                stderr=subprocess.STDOUT,
            ) as proc,
        ):
            wait_until(lambda: STARTED[command] in log.read_text(), 90)
            assert listening(redis_port)
            proc.terminate()
            assert proc.wait(timeout=60) == 0, log.read_text()
            assert not listening(redis_port)
            assert wait_session_empty(proc.pid) == []
        # Its own output went to its file, not into the service's log.
        assert "ready to exit" not in log.read_text()
        assert "ready to exit" in (tmp_path / "var" / "redis" / "redis-server.log").read_text()

    def test_a_redis_it_did_not_start_is_left_running(self, tmp_path: Path, redis_url: str) -> None:
        """The session's Redis on the embedded port: `serve` uses it, and leaves it be."""
        port = urlsplit(redis_url).port
        assert port is not None
        log = tmp_path / "log"
        with (
            log.open("wb") as out,
            in_own_session(
                service_argv("serve"),
                cwd=ROOT_DIR,
                env=service_env(tmp_path, port),
                stdout=out,
                stderr=subprocess.STDOUT,
            ) as proc,
        ):
            wait_until(lambda: STARTED["serve"] in log.read_text(), 90)
            proc.terminate()
            assert proc.wait(timeout=60) == 0
        assert listening(port)


class TestAWorkerStoppedEarly:
    """SIGTERM just after a worker starts, while its first jobs run (the sweep runs at
    start-up): it stops cleanly, exit 0, instead of an uncaught `CancelledError` (arq's
    `close()` re-raised the cancelled jobs' error and skipped the shutdown)."""

    def test_exits_0(self, tmp_path: Path, redis_url: str) -> None:
        env = service_env(tmp_path, free_port(), REDIS_URL=redis_url)
        for attempt in range(5):  # the window is narrow: a few tries make a miss unlikely
            log = tmp_path / f"worker{attempt}.log"
            with (
                log.open("wb") as out,
                in_own_session(
                    [*CLI, "worker"], cwd=ROOT_DIR, env=env, stdout=out, stderr=subprocess.STDOUT
                ) as proc,
            ):
                wait_until(lambda log=log: STARTED["worker"] in log.read_text(), 90)
                proc.terminate()
                assert proc.wait(timeout=60) == 0, log.read_text()
            assert "uncaught_exception" not in log.read_text()


class TestRunSignals:
    """`run` stops every child and Redis on a signal, passes HUP on, and dies with its
    terminal."""

    def test_ctrl_c_works_in_a_background_job(self, tmp_path: Path) -> None:
        """A shell starts a background job (`make test &`) with SIGINT ignored; `run` still
        stops on it, and so does everything it started."""
        ignoring_sigint = ["sh", "-c", 'trap "" INT; exec "$@"', "sh", *CLI]
        with run_session(tmp_path, ignoring_sigint, ROOT_DIR) as session:
            session.wait_ready()
            assert len(session_members(session.proc.pid)) == 5  # run, Redis and 3 children
            session.proc.send_signal(signal.SIGINT)
            assert session.proc.wait(timeout=60) == 0
            assert wait_session_empty(session.proc.pid) == []
        for port in (session.port, session.sandbox_port, session.redis_port):
            assert not listening(port), port

    def test_hup_reloads_rules_and_a_closed_terminal_stops_everything(self, tmp_path: Path) -> None:
        redis_port = free_port()
        port, sandbox_port = free_port(), free_port()
        argv = [*CLI, "run", "--port", str(port), "--sandbox-port", str(sandbox_port)]
        master, slave = os.openpty()
        try:
            with in_own_session(
                argv,
                cwd=ROOT_DIR,
                env=run_env(tmp_path / "var", redis_port),
                stdin=slave,
                stdout=slave,
                stderr=slave,
                preexec_fn=_take_controlling_terminal,
            ) as proc:
                os.close(slave)
                slave = -1
                with terminal_output(master) as output:
                    wait_until(lambda: '"run_ready"' in output(), 120)
                    before = set(session_members(proc.pid))
                    assert len(before) == 5
                    proc.send_signal(signal.SIGHUP)  # kill -HUP <pid of run>
                    wait_until(lambda: output().count('"rules_reloaded"') == 2, 30)
                    assert '"rules_reload_forwarded"' in output()
                    assert proc.poll() is None
                    assert set(session_members(proc.pid)) == before  # nobody restarted
                os.close(master)  # the terminal window is closed
                master = -1
                assert proc.wait(timeout=60) == 0
                assert wait_session_empty(proc.pid) == []
        finally:
            for fd in (master, slave):
                if fd >= 0:
                    os.close(fd)
        assert not listening(redis_port)


def _take_controlling_terminal() -> None:
    """In the child, after `setsid`: make stdin (the pty) its controlling terminal, as a
    terminal emulator does for the shell it starts."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@contextmanager
def terminal_output(master: int) -> Iterator[Callable[[], str]]:
    """Read what the pty shows while the block runs (a full pty would block the writers)."""
    chunks: list[bytes] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunks.append(os.read(master, 65536))
                except OSError:
                    return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield lambda: b"".join(chunks).decode(errors="replace")
    finally:
        stop.set()
        reader.join(timeout=5)


class TestASecondRun:
    """A second `run` while one runs is refused at once and changes nothing in the first."""

    def test_refused_on_the_same_folder_and_on_the_same_ports(self, tmp_path: Path) -> None:
        with run_session(tmp_path, CLI, ROOT_DIR) as first:
            first.wait_ready()
            credentials = first.credentials()
            members = set(session_members(first.proc.pid))
            argv = [*CLI, "run", "--port", str(first.port)]
            argv += ["--sandbox-port", str(first.sandbox_port)]
            same_folder = run_env(first.data_dir, first.redis_port)
            other_folder = run_env(tmp_path / "other", first.redis_port)
            for env, refusal in (
                (same_folder, f"another salla-rewards run (pid {first.proc.pid}) is using"),
                (other_folder, f"cannot listen on 127.0.0.1:{first.port}"),
            ):
                second = subprocess.run(
                    argv, cwd=ROOT_DIR, env=env, capture_output=True, text=True, timeout=60
                )
                assert second.returncode == 2
                (line,) = (second.stdout + second.stderr).splitlines()
                assert refusal in json.loads(line)["error"]
            # The first is untouched: its demo store's token still works, nothing restarted.
            answer = httpx.get(
                f"{first.sandbox_url}/customers/loyalty/points",
                params={"customer_id": 1779795066},
                headers={"Authorization": f"Bearer {credentials['access_token']}"},
            )
            assert answer.status_code == 200
            assert first.credentials() == credentials
            assert set(session_members(first.proc.pid)) == members
            assert not (tmp_path / "other" / "redis").exists()
            first.proc.terminate()
            assert first.proc.wait(timeout=60) == 0


@contextmanager
def busy_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


MISTAKES = {
    "log_level": ("LOG_LEVEL", "invalid settings: LOG_LEVEL"),
    "unreachable_redis": ("REDIS_URL", "cannot reach Redis at redis://:***@127.0.0.1:"),
    "busy_port": ("--port", "cannot listen on 127.0.0.1:"),
}


class TestConfigurationMistakes:
    """A bad setting, a busy port or an unreachable Redis: one sentence and a hint, no
    traceback, exit 2, in `serve`, `worker` and `run` alike (a JSON line in JSON mode)."""

    @pytest.mark.parametrize(
        ("command", "mistake"),
        [
            (command, mistake)
            for command in ("serve", "worker", "run")
            for mistake in MISTAKES
            if not (command == "worker" and mistake == "busy_port")  # a worker listens on none
        ],
    )
    def test_one_json_line_and_exit_2(self, tmp_path: Path, command: str, mistake: str) -> None:
        with busy_port() as taken:
            env = service_env(tmp_path, free_port())
            argv = [*CLI, command]
            if mistake == "log_level":
                env["LOG_LEVEL"] = "verbose"
            if mistake == "unreachable_redis":
                env["REDIS_URL"] = f"redis://:hunter2-password@127.0.0.1:{free_port()}/0"
            if command in ("serve", "run"):
                argv += ["--port", str(taken if mistake == "busy_port" else free_port())]
            if command == "run":
                argv += ["--sandbox-port", str(free_port())]
            result = subprocess.run(
                argv, cwd=ROOT_DIR, env=env, capture_output=True, text=True, timeout=60
            )
        assert result.returncode == 2
        output = result.stdout + result.stderr
        (line,) = output.splitlines()
        refusal = json.loads(line)
        assert (refusal["event"], refusal["level"]) == ("config_error", "error")
        assert refusal["error"].startswith(MISTAKES[mistake][1]), refusal
        assert MISTAKES[mistake][0] in refusal["error"] + refusal["hint"]
        assert "hunter2" not in output  # a password in REDIS_URL is not printed
        assert not (tmp_path / "var" / "redis").exists()  # nothing was started

    @pytest.mark.parametrize("command", ["serve", "worker", "run"])
    def test_something_else_on_the_embedded_redis_port(self, tmp_path: Path, command: str) -> None:
        argv = [*CLI, command]
        if command in ("serve", "run"):
            argv += ["--port", str(free_port())]
        if command == "run":
            argv += ["--sandbox-port", str(free_port())]
        with busy_port() as taken:
            result = subprocess.run(
                argv,
                cwd=ROOT_DIR,
                env=service_env(tmp_path, taken),
                capture_output=True,
                text=True,
                timeout=60,
            )
        assert result.returncode == 2
        (line,) = (result.stdout + result.stderr).splitlines()
        refusal = json.loads(line)
        if command == "run":  # checked before anything starts
            assert refusal["error"] == f"cannot listen on 127.0.0.1:{taken}: Address already in use"
            assert "EMBEDDED_REDIS_PORT" in refusal["hint"]
        else:  # valkey-server's own reason, from its log file
            assert refusal["error"].startswith("the embedded valkey-server exited with status 1")
            assert (
                f"listening socket 127.0.0.1:{taken}: bind: Address already in use"
                in (refusal["error"])
            )
            assert refusal["hint"] == f"see {tmp_path / 'var' / 'redis' / 'redis-server.log'}"

    def test_on_a_terminal_format_it_is_one_readable_line(self, tmp_path: Path) -> None:
        env = service_env(tmp_path, free_port(), LOG_FORMAT="console")
        env["REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"
        result = subprocess.run(
            [*CLI, "run", "--port", str(free_port()), "--sandbox-port", str(free_port())],
            cwd=ROOT_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2
        (line,) = (result.stdout + result.stderr).splitlines()
        assert line.startswith("Error: cannot reach Redis at redis://127.0.0.1:")
        assert "Hint: start it, fix REDIS_URL, or unset REDIS_URL" in line


class TestDotenv:
    """`.env` in the working directory is read; the environment wins over it."""

    def test_the_commands_read_it(self, tmp_path: Path) -> None:
        dotenv_port, env_port = free_port(), free_port()
        (tmp_path / ".env").write_text(
            f"# as .env.example suggests\nREDIS_URL=redis://127.0.0.1:{dotenv_port}/0\n"
            "LOG_FORMAT=json\n"
        )
        env = service_env(tmp_path, free_port(), RULES_PATH=str(ROOT_DIR / "rules"))
        env.pop("LOG_FORMAT")
        env.pop("SALLA_REWARDS_ENV_FILE")  # the suite turns .env off; a user has it on

        def refusal(**extra: str) -> str:
            result = subprocess.run(
                [*CLI, "worker"],
                cwd=tmp_path,
                env={**env, **extra},
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert result.returncode == 2, result
            error: str = json.loads(result.stderr)["error"]
            return error

        assert f"127.0.0.1:{dotenv_port}" in refusal()
        assert f"127.0.0.1:{env_port}" in refusal(REDIS_URL=f"redis://127.0.0.1:{env_port}/0")
        # The suite's own setting (an empty SALLA_REWARDS_ENV_FILE) reads no .env at all: an
        # operator verb then looks for the embedded Redis instead of the .env's.
        embedded_port = free_port()
        off = subprocess.run(
            [*CLI, "admin", "store", "1"],
            cwd=tmp_path,
            env={**env, "SALLA_REWARDS_ENV_FILE": "", "EMBEDDED_REDIS_PORT": str(embedded_port)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert off.returncode == 2
        assert f"127.0.0.1:{embedded_port}" in json.loads(off.stderr)["error"]
