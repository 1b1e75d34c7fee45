"""`salla-rewards rules ...`: check, simulate and test rule files (no Redis, no Salla)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from service.commandline import rules_path_option
from service.errors import RuleError
from service.ids import ID
from service.rules.model import RuleSet


@click.group()
def rules() -> None:
    """Check, simulate and test rule files (no Redis, no Salla)."""


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
@rules_path_option
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
@rules_path_option
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
@rules_path_option
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
