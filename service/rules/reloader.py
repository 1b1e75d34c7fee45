"""Rules that can be reloaded while the service runs (SIGHUP, or a file watch in development).

A reload that finds invalid rules keeps the rules in force and logs why.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path

from service.errors import RuleError
from service.logging import get_logger
from service.rules.loader import load_rules
from service.rules.model import RuleSet

log = get_logger("service.rules")


class RulesHolder:
    """The rule set in force; `current` is swapped whole, never mutated."""

    def __init__(self, path: Path, ruleset: RuleSet | None = None) -> None:
        self.path = path
        self.current = ruleset if ruleset is not None else load_rules(path)
        self.reloads = 0

    def reload(self) -> bool:
        try:
            fresh = load_rules(self.path)
        except RuleError as exc:
            log.error(
                "rules_reload_failed",
                path=str(self.path),
                problems=exc.problems,
                kept_rules=len(self.current.rules),
            )
            return False
        self.current = fresh
        self.reloads += 1
        log.info(
            "rules_reloaded", path=str(self.path), rules=len(fresh.rules), files=len(fresh.files)
        )
        return True

    def install_sighup(self) -> None:
        """Reload on SIGHUP (where the platform has it)."""
        # Not possible off the main thread (embedded servers) or on platforms without SIGHUP.
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError, AttributeError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reload)

    async def watch(self, stop: asyncio.Event) -> None:
        """Reload whenever a rule file changes, until `stop` is set (development)."""
        from watchfiles import awatch

        async for _changes in awatch(self.path, stop_event=stop, debounce=300):
            self.reload()


@contextlib.asynccontextmanager
async def live_rules(holder: RulesHolder, *, watch: bool) -> AsyncIterator[RulesHolder]:
    """SIGHUP always; a file watch too when `watch` (development)."""
    holder.install_sighup()
    stop = asyncio.Event()
    task = asyncio.create_task(holder.watch(stop)) if watch else None
    try:
        yield holder
    finally:
        stop.set()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, timeout=5)
