"""The steps of an update, in order: where a fault-injection hook may stop (AgentConfig.debug_pause_at)."""

STEPS = (
    "metadata_verified",
    "assignment_accepted",
    "download_started",
    "download_verified",
    "slot_written",
    "installed",
    "probed",
    "switched",
)
