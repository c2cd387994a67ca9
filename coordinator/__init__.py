"""Operator-side coordinator: config, round state machine, aggregation, checkpoints, reports."""
