"""fedfleet's coordinator: releases, assignments, the fleet's control plane and its CLI."""

__version__ = "0.1.0"
