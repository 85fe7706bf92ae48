"""Answer extraction, rule verifiers, and the reward registry."""
