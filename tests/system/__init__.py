"""Tests of whole systems on real parts: coordinator processes with agent fleets, crash loops, demos, browsers,
benchmarks."""
