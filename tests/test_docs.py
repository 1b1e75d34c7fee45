"""What README.md and docs/ say agrees with the code and with the measured figures.

Figures: every number the docs quote from `make bench` carries a marker right after it,
`1,891<!--bench:worker.events_per_s-->` (invisible once rendered), naming its key in
benchmarks/results.json, the file `make bench` writes and the repository commits. The number
must be that value, rounded as written.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import click
import httpx
import pytest

from benchmarks.quotes import QUOTE, lookup, refresh
from service.app import create_app
from service.cli import main
from service.sandbox.app import Faults, Sandbox, create_sandbox_app
from service.settings import Settings
from tests.conftest import ROOT_DIR, make_settings
from tests.support.servers import serve_in_thread

RESULTS = json.loads((ROOT_DIR / "benchmarks" / "results.json").read_text())
README = (ROOT_DIR / "README.md").read_text()
DOCS = {"README.md": README} | {
    f"docs/{p.name}": p.read_text() for p in sorted((ROOT_DIR / "docs").glob("*.md"))
}
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def quotes() -> list[tuple[str, str, str]]:
    """(document, quoted text, key) of every marked figure."""
    return [(doc, m["text"], m["key"]) for doc, text in DOCS.items() for m in QUOTE.finditer(text)]


def agrees(quoted: str, value: Any) -> bool:
    """The quoted text is the value, rounded to the decimals the text shows (a text value:
    the same text)."""
    if NUMBER.fullmatch(quoted) is None:
        return quoted == str(value)
    if isinstance(value, str):  # "14.82ms" from wrk: its number
        found = NUMBER.match(value)
        if found is None:
            return False
        value = float(found.group())
    shown = quoted.replace(",", "")
    decimals = len(shown.partition(".")[2])
    return bool(round(float(value), decimals) == float(shown))


class TestBenchmarkFigures:
    """The figures the docs quote are those of benchmarks/results.json."""

    def test_every_quoted_figure_is_the_measured_one(self) -> None:
        found = quotes()
        assert len(found) >= 40, found
        wrong = [
            (doc, text, key, lookup(RESULTS, key))
            for doc, text, key in found
            if not agrees(text, lookup(RESULTS, key))
        ]
        assert not wrong, wrong

    def test_make_bench_would_write_the_same_docs(self) -> None:
        """What `make bench` does to the docs after a run (rewrite every quote from the file)
        changes nothing now."""
        for doc, text in DOCS.items():
            assert refresh(text, RESULTS) == text, doc

    def test_a_refresh_rewrites_a_stale_quote(self) -> None:
        stale = "ratio **0.11**<!--bench:ingest.ratio--> and 9<!--bench:worker.events_per_s-->/s"
        fresh = refresh(stale, RESULTS)
        assert fresh == (
            f"ratio **{RESULTS['ingest']['ratio']:.2f}**<!--bench:ingest.ratio--> and "
            f"{RESULTS['worker']['events_per_s']:,}<!--bench:worker.events_per_s-->/s"
        )

    def test_the_readme_table_and_the_sizing_quote_only_measured_figures(self) -> None:
        """Each row of the README's benchmark table quotes a figure, and so does each sizing
        line of docs/operations.md: a number typed by hand there would have no marker."""
        table = README.split("## Benchmarks", 1)[1].split("How it is measured", 1)[0]
        rows = [
            r for r in table.splitlines() if r.startswith("| ") and not r.startswith("| figure")
        ]
        assert len(rows) >= 10
        for row in rows:
            value = row.split("|")[2]
            assert "<!--bench:" in value, row
        sizing = DOCS["docs/operations.md"].split("## Sizing", 1)[1].split("\n## ", 1)[0]
        bullets = sizing.split("\n* ")[1:]
        assert len(bullets) >= 3
        for bullet in bullets:
            assert "<!--bench:" in bullet, bullet

    def test_the_run_is_described(self) -> None:
        run = RESULTS["run"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\d", run["date"])
        assert run["commit"] and run["commit"] != "unknown"
        assert f"{run['date']}<!--bench:run.date-->" in README
        assert run["note"], "say under which conditions the figures were taken (BENCH_NOTE)"


class TestReadmeAgreesWithTheCode:
    """Commands, options, routes, settings and Makefile targets the README lists exist, and
    everything that exists is listed."""

    def test_settings_table_defaults(self) -> None:
        section = README.split("## Settings", 1)[1].split("\n## ", 1)[0]
        documented: dict[str, str] = {}
        for row in section.splitlines():
            cells = [c.strip() for c in row.split("|")[1:-1]]
            if len(cells) != 3 or not cells[0].startswith("`"):
                continue
            names = re.findall(r"`([A-Z_]+)`", cells[0])
            defaults = re.findall(r"`([^`]*)`", cells[1]) or [cells[1]]
            for name, default in zip(names, defaults * len(names), strict=False):
                documented[name] = default
        fields = {name.upper(): info.default for name, info in Settings.model_fields.items()}
        assert set(documented) == set(fields)
        for name, default in fields.items():
            if default is None:  # unset, or worked out from other settings: the text says how
                continue
            shown = "—" if documented[name] == "empty" else documented[name]
            assert _shown(default) == shown or (
                isinstance(default, int | float)
                and not isinstance(default, bool)
                and float(documented[name]) == default
            ), (name, default, documented[name])

    def test_commands_table(self) -> None:
        section = README.split("## Commands", 1)[1].split("\n## ", 1)[0]
        rows = re.findall(r"^\| `salla-rewards ([^`]+)` \|", section, re.M)
        documented = set()
        for row in rows:
            words = row.split()
            command: click.Command = main
            path = []
            while isinstance(command, click.Group) and words and _sub(command, words[0]):
                path.append(words.pop(0))
                command = _sub(command, path[-1])  # type: ignore[assignment]
            assert not isinstance(command, click.Group), row
            documented.add(" ".join(path))
            options = {o for p in command.params for o in getattr(p, "opts", [])}
            for option in re.findall(r"--[\w-]+", row):
                assert option in options, (row, option)
        assert documented == set(_leaf_commands(main)), set(_leaf_commands(main)) ^ documented

    def test_http_table(self) -> None:
        section = README.split("## HTTP", 1)[1].split("\n## ", 1)[0]
        documented = {
            re.sub(r"\{(\w+)\}", "{}", path)
            for path in re.findall(r"^\| `(?:GET|POST) (/[^`?]*)", section, re.M)
        }
        app = create_app(make_settings(admin_token="a" * 24), "redis://unused")
        served = {re.sub(r"\{(\w+)\}", "{}", r.path) for r in app.routes}  # type: ignore[attr-defined]
        assert documented == served

    def test_makefile_targets(self) -> None:
        listed = re.search(r"The `Makefile` has `([^`]+)`", README)
        assert listed is not None
        phony = re.search(r"^\.PHONY: (.+)$", (ROOT_DIR / "Makefile").read_text(), re.M)
        assert phony is not None
        targets = set(phony.group(1).split()) - {"help"}
        assert set(listed.group(1).split()) == targets

    def test_run_leaves_the_log_format_at_auto(self) -> None:
        """README: LOG_FORMAT defaults to auto (JSON when not on a terminal), `make run`
        included; `run` must not force one on its children."""
        assert "auto" in README.split("`LOG_FORMAT`", 1)[1].split("\n", 1)[0]
        assert Settings.model_fields["log_format"].default == "auto"
        # `run` (service/supervisor.py) gives its children an environment: no LOG_FORMAT in it.
        run_source = (ROOT_DIR / "service" / "supervisor.py").read_text()
        child_env = run_source.split("def _child_env(", 1)[1].split("\ndef ", 1)[0]
        assert "LOG_FORMAT" not in child_env
        assert "run:" in (ROOT_DIR / "Makefile").read_text()
        assert "LOG_FORMAT" not in (ROOT_DIR / "Makefile").read_text()


def _shown(default: Any) -> str:
    """A default as the README's settings table writes it."""
    if isinstance(default, bool):
        return str(default).lower()
    secret = getattr(default, "get_secret_value", None)
    text = secret() if secret is not None else str(default)
    return text or "—"


def _sub(group: click.Group, name: str) -> click.Command | None:
    """A subcommand through click's API (some are imported only when asked for)."""
    return group.get_command(click.Context(group), name)


def _leaf_commands(group: click.Group, prefix: str = "") -> list[str]:
    found = []
    for name in group.list_commands(click.Context(group)):
        command = _sub(group, name)
        if isinstance(command, click.Group):
            found += _leaf_commands(command, f"{prefix}{name} ")
        else:
            found.append(f"{prefix}{name}")
    return found


POINTS = {"points": 10, "type": "plus", "reason": "docs", "channel_send": [], "customers": [5]}


class TestSandboxFaultSwitches:
    """docs/sandbox.md's fault switches are the sandbox's, and each does what the doc says,
    over HTTP."""

    def test_the_documented_switches_are_the_sandboxs(self) -> None:
        doc = DOCS["docs/sandbox.md"].split("## Fault switches", 1)[1].split("\n## ", 1)[0]
        documented = set(re.findall(r"^\| `(\w+)` \|", doc, re.M))
        assert documented == {f.name for f in dataclasses.fields(Faults)} | {"merchant"}

    @pytest.fixture
    def sandbox_url(self) -> Any:
        with serve_in_thread(create_sandbox_app(Sandbox())) as url:
            yield url

    def _store(self, url: str, merchant: int) -> dict[str, Any]:
        answer: dict[str, Any] = httpx.post(
            f"{url}/_sandbox/stores", json={"merchant": merchant}
        ).json()
        return answer

    def _add(self, url: str, token: str, **body: Any) -> httpx.Response:
        return httpx.post(
            f"{url}/customers/loyalty/points",
            json={**POINTS, **body},
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )

    def _balance(self, url: str, merchant: int) -> int:
        state = httpx.get(f"{url}/_sandbox/stores/{merchant}").json()
        return int(state["balances"].get("5", 0))

    def test_each_switch(self, sandbox_url: str) -> None:
        url = sandbox_url
        one, two = self._store(url, 1), self._store(url, 2)
        faults = f"{url}/_sandbox/faults"

        # statuses, one per call, in order; only for `merchant`
        answer = httpx.post(faults, json={"merchant": 1, "statuses": [503, 429]})
        assert answer.json() == {"stores": [1]}
        first, second = self._add(url, one["access_token"]), self._add(url, one["access_token"])
        assert (first.status_code, second.status_code) == (503, 429)
        assert second.headers["retry-after"] == "1"
        assert first.json()["success"] is False and "error" in first.json()
        assert self._add(url, two["access_token"]).status_code == 201  # the other store
        assert self._add(url, one["access_token"]).status_code == 201  # used up
        assert self._balance(url, 1) == 10

        # invalid_customers: 422 with Salla's fields error, nothing applied
        httpx.post(faults, json={"merchant": 1, "invalid_customers": [5]})
        refused = self._add(url, one["access_token"])
        assert refused.status_code == 422
        assert "customers" in refused.json()["error"]["fields"]
        assert self._balance(url, 1) == 10

        # drop_before_apply: the connection breaks, nothing applied
        httpx.post(faults, json={"merchant": 1, "drop_before_apply": 1})
        with pytest.raises(httpx.TransportError):
            self._add(url, one["access_token"])
        assert self._balance(url, 1) == 10

        # drop_after_apply: applied, then the connection breaks
        httpx.post(faults, json={"merchant": 1, "drop_after_apply": 1})
        with pytest.raises(httpx.TransportError):
            self._add(url, one["access_token"])
        assert self._balance(url, 1) == 20

        # latency_s: the answer waits (here longer than the client does)
        httpx.post(faults, json={"latency_s": 3})
        with pytest.raises(httpx.TimeoutException):
            httpx.post(
                f"{url}/customers/loyalty/points",
                json=POINTS,
                headers={"Authorization": f"Bearer {one['access_token']}"},
                timeout=0.5,
            )

        # {} turns every fault off, for every store
        assert httpx.post(faults, json={}).json() == {"stores": [1, 2]}
        assert self._add(url, one["access_token"]).status_code == 201


class TestArchitectureMaps:
    """docs/architecture.md's two maps stay complete as files come and go."""

    TEXT = DOCS["docs/architecture.md"]

    def _first_column(self, heading: str) -> set[str]:
        section = self.TEXT.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
        cells = re.findall(r"^\| (.+?) \|", section, re.MULTILINE)
        return {name for cell in cells for name in re.findall(r"`([^`]+)`", cell)}

    def test_every_module_is_in_the_module_table(self) -> None:
        listed = self._first_column("Modules")
        service = ROOT_DIR / "service"
        modules = {
            path.relative_to(service).as_posix()
            for path in service.rglob("*.py")
            if path.name not in ("__init__.py", "__main__.py")
        }
        # A row may hold a whole package (`rules/`): its modules are described in that row.
        unlisted = {m for m in modules if m not in listed and f"{m.split('/')[0]}/" not in listed}
        assert not unlisted, f"modules missing from docs/architecture.md: {sorted(unlisted)}"
        assert not {m for m in listed if m.endswith(".py")} - modules, "a listed module is gone"

    def test_every_test_file_is_in_the_test_map(self) -> None:
        listed = self._first_column("Where the tests are")
        files = {path.name for path in (ROOT_DIR / "tests").glob("test_*.py")}
        assert listed == files, (sorted(files - listed), sorted(listed - files))
