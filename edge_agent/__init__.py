"""fedfleet's device agent: verifies, installs and runs signed TFLite releases.

Small on purpose: it installs on a Raspberry Pi without torch, Flower or any coordinator code. It also holds
the wire contract that both sides share (generated protobuf code, topic names, limits, assignment checks).
"""

__version__ = "0.1.0"
