"""YAML rules: load and validate (`loader`), evaluate purely (`engine`)."""

from service.rules.engine import Outcome, evaluate, prepare
from service.rules.loader import load_rules, parse_rules_text
from service.rules.model import Rule, RuleSet

__all__ = ["Outcome", "Rule", "RuleSet", "evaluate", "load_rules", "parse_rules_text", "prepare"]
