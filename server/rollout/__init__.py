"""Rollouts in waves: what is asked (spec), the pure state machine that decides (engine), and the driver that
observes waves in SQLite and applies each decision in one transaction."""
