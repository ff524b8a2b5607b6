"""The steps of an update, in order: where a fault-injection hook may stop (AgentConfig.debug_pause_at)."""

STEPS = (
    "assignment_accepted",
    "metadata_verified",
    "download_started",
    "download_verified",
    "slot_written",
    "installed",
    "probed",
    "switched",
)
