"""The `salla-rewards` command as a user runs it: a real process, with the service's Redis."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from typing import Any

from tests.conftest import ROOT_DIR, eventually

CLI = [sys.executable, "-m", "service"]


async def cli(
    redis_url: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the CLI without blocking the event loop the worker runs in."""
    return await asyncio.to_thread(
        subprocess.run,
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT_DIR,
        env={**os.environ, "REDIS_URL": redis_url, **(env or {})},
    )


async def cli_interrupted(
    redis_url: str, *args: str, once: Any, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Start the CLI, press Ctrl-C as soon as `once()` holds, and return how it ended."""
    proc = await asyncio.to_thread(
        subprocess.Popen,
        [*CLI, *args],
        cwd=ROOT_DIR,
        env={**os.environ, "REDIS_URL": redis_url, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        await eventually(once, timeout_s=30)
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.to_thread(proc.communicate, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
