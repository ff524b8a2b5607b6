"""Generated protobuf code; regenerate with scripts/gen_protos.py."""
