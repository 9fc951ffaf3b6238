"""The aggregation server: round state machine, strategies, update validation, checkpoints."""
