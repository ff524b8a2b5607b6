"""Simulated fleets on one machine: real agents, a real broker, a real coordinator."""
