"""Tests of the coordinator's parts: CLI, store, trust, ingest, rollouts, the loop, training, dashboard, deploy kits."""
