"""Commands under test, each in a session of its own, and everything in that session killed
afterwards, whatever the test did: `run` puts its children in their own process groups (so
`killpg` on `run` would miss them), but they stay in its session, and so do their children."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def session_members(session: int) -> list[int]:
    """Live processes (zombies excluded) whose session id is `session` (Linux /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        # "pid (comm) state ppid pgrp session ...": comm may hold spaces and parentheses.
        fields = stat.rpartition(")")[2].split()
        if fields[0] != "Z" and int(fields[3]) == session:
            members.append(int(entry.name))
    return members


def wait_session_empty(session: int, timeout_s: float = 30.0) -> list[int]:
    """Wait until nothing of `session` runs; what is still running after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while (left := session_members(session)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def kill_session(session: int) -> None:
    for pid in session_members(session):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_session_empty(session, 10)


@contextlib.contextmanager
def in_own_session(argv: list[str], **popen: Any) -> Iterator[subprocess.Popen[bytes]]:
    """Start `argv` as the leader of a new session; on the way out, kill what is left of it."""
    proc = subprocess.Popen(argv, start_new_session=True, **popen)
    try:
        yield proc
    finally:
        kill_session(proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


def listening(port: int) -> bool:
    import socket

    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class RunSession:
    """`salla-rewards run` started by a test: its ports, folder and output files."""

    proc: subprocess.Popen[bytes]
    port: int
    sandbox_port: int
    redis_port: int
    data_dir: Path
    stdout: Path
    stderr: Path

    @property
    def webhook_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/webhooks/salla"

    @property
    def sandbox_url(self) -> str:
        return f"http://127.0.0.1:{self.sandbox_port}"

    def output(self) -> str:
        return self.stdout.read_text(errors="replace") + self.stderr.read_text(errors="replace")

    def credentials(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads((self.data_dir / "run.json").read_text())
        return doc

    def wait_ready(self, timeout_s: float = 120) -> None:
        """Until the JSON banner (`run_ready`) is out: four processes start on a loaded
        2-core machine, so be patient."""
        deadline = time.monotonic() + timeout_s
        while '"run_ready"' not in self.output():
            if self.proc.poll() is not None:
                raise AssertionError(f"run exited {self.proc.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"run not ready in {timeout_s}s:\n{self.output()}")
            time.sleep(0.1)


def run_env(data_dir: Path, redis_port: int, **extra: str) -> dict[str, str]:
    """The environment of a `run` under test: its own folder and ports, JSON lines."""
    env = {
        **os.environ,
        "DATA_DIR": str(data_dir),
        "EMBEDDED_REDIS_PORT": str(redis_port),
        "WORKER_METRICS_PORT": "0",
        "LOG_FORMAT": "json",
    }
    for inherited in ("REDIS_URL", "SALLA_WEBHOOK_SECRET", "ADMIN_TOKEN", "LOG_LEVEL"):
        env.pop(inherited, None)
    return {**env, **extra}


@contextlib.contextmanager
def run_session(
    tmp_path: Path,
    argv_prefix: list[str],
    cwd: Path,
    *,
    ports: tuple[int, int, int] | None = None,
    name: str = "run",
    **env_extra: str,
) -> Iterator[RunSession]:
    """`salla-rewards run` in a session of its own, stdout and stderr in two files
    (`<name>.stdout`, `<name>.stderr`), its data in `tmp_path/var`; whatever the test does,
    every process of the session is killed at the end. `ports` (web, sandbox, Redis) lets a
    second session find what a first one left."""
    from tests.support.servers import free_port

    port, sandbox_port, redis_port = ports or (free_port(), free_port(), free_port())
    data_dir = tmp_path / "var"
    out, err = tmp_path / f"{name}.stdout", tmp_path / f"{name}.stderr"
    argv = [*argv_prefix, "run", "--port", str(port), "--sandbox-port", str(sandbox_port)]
    with out.open("wb") as stdout, err.open("wb") as stderr:
        starting = in_own_session(
            argv,
            cwd=cwd,
            env=run_env(data_dir, redis_port, **env_extra),
            stdout=stdout,
            stderr=stderr,
        )
        with starting as proc:
            yield RunSession(proc, port, sandbox_port, redis_port, data_dir, out, err)
