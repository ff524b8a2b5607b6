"""Tests of the device agent and the contract it shares: the update path and its attacks, runtimes, drift maths,
telemetry, the Pi install."""
