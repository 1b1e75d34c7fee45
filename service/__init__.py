"""salla-rewards: Salla webhooks in, loyalty points out, each point exactly once."""

__version__ = "0.1.0"
