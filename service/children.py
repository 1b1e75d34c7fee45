"""Child processes that end with the command that started them.

A child of `run`, `serve` or `worker` (the embedded Redis, the sandbox, the web and worker
processes) is started in its own process group, so a terminal's Ctrl-C or hangup reaches only
the parent, which stops its children in order; and, on Linux, with `PR_SET_PDEATHSIG`, so the
kernel sends it SIGTERM if the parent dies without stopping it (SIGKILL, a crash).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import IO, Any

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that arms SIGTERM-on-parent-death; None where the platform has none."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)  # loaded before the fork
    parent = os.getpid()

    def arm() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


def spawn(
    argv: list[str],
    *,
    env: Mapping[str, str] | None = None,
    stdout: IO[Any] | int | None = None,
    stderr: IO[Any] | int | None = None,
) -> subprocess.Popen[bytes]:
    """Start `argv` in its own process group, to be stopped by its parent (see the module).

    Only for the command line's own processes: `preexec_fn` is not safe in a process that
    already runs threads (a test process), and the command line starts children first.
    """
    return subprocess.Popen(  # noqa: S603 - our own interpreter and redis-server, no shell
        argv,
        env=env,
        stdout=stdout,
        stderr=stderr,
        process_group=0,
        preexec_fn=_die_with_parent(),  # see the docstring: no threads yet
    )


def stop(
    child: subprocess.Popen[bytes], timeout_s: float = 10.0, *, terminate: bool = True
) -> None:
    """SIGTERM (unless the caller sent it), wait, then SIGKILL to the child's process group."""
    if terminate and child.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            child.terminate()
    try:
        child.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()


@contextlib.contextmanager
def signals_end_the_process() -> Iterator[None]:
    """SIGTERM and SIGINT raise `SystemExit(0)`, so `finally` blocks run (and stop what the
    process started) instead of the default action ending it on the spot. Whatever installs
    its own handlers later (uvicorn, arq) replaces these while it runs; uvicorn re-raises the
    signal after its graceful shutdown, and lands here. Also undoes an inherited SIG_IGN for
    SIGINT: a background job (`make test &`) starts with SIGINT ignored."""

    def leave(signum: int, _frame: object) -> None:
        raise SystemExit(0)

    previous = {sig: signal.signal(sig, leave) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
