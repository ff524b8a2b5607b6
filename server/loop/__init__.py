"""The closed loop inside `fedfleet serve`: drift watch, alerts and webhooks, the retrain controller."""
