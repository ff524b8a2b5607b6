"""Addresses both sides parse the same way: broker URLs, and whether a host is this machine (where plaintext is
allowed)."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlparse

__all__ = ["is_loopback", "parse_mqtt_url"]


def parse_mqtt_url(url: str) -> tuple[str, int, bool]:
    """(host, port, tls) of mqtt://host:port or mqtts://host:port; ValueError for anything else."""
    parsed = urlparse(url)
    if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
        raise ValueError(f"a broker URL must look like mqtt://host:port or mqtts://host:port, got {url!r}")
    tls = parsed.scheme == "mqtts"
    return parsed.hostname, parsed.port or (8883 if tls else 1883), tls


def is_loopback(host: str) -> bool:
    """localhost or an address in 127.0.0.0/8 or ::1 (brackets allowed)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
