"""What devices trust and why: the TUF repository and its releases, the director's signed assignments, the fleet
CA and device enrollment, the broker's TLS and ACL configuration."""
