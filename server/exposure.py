"""Plaintext only on loopback: what `fedfleet serve` would expose unencrypted beyond this machine.

Every listener (gRPC for devices, the dashboard with its API and /metrics) and every outgoing connection that
carries fleet traffic (the MQTT broker the coordinator uses) is checked before anything binds. An address that is
not loopback needs TLS; otherwise `serve` stops with one sentence per exposure naming the fix. A lab may accept
the exposure with `serve --allow-plaintext-network`, which logs each sentence as a warning and shows them on
every dashboard page. (The Flower SuperLink that training uses is checked where it is configured: the policy
refuses a non-loopback SuperLink without its CA certificate.)
"""

from __future__ import annotations

from dataclasses import dataclass

from edge_agent.contract.addresses import is_loopback, parse_mqtt_url

__all__ = ["ALLOW_FLAG", "Listeners", "plaintext_exposures"]

ALLOW_FLAG = "--allow-plaintext-network"


@dataclass(frozen=True)
class Listeners:
    grpc_listen: str  # host:port
    grpc_tls: bool
    mqtt_url: str  # "" or mqtt(s)://host:port; the embedded broker only ever binds loopback
    dashboard_listen: str  # "" when off
    dashboard_tls: bool


def _host(listen: str) -> str:
    return listen.rpartition(":")[0].strip("[]")


def plaintext_exposures(listeners: Listeners) -> list[str]:
    """One sentence per plaintext channel beyond loopback, each naming its fix; empty when there is none."""
    found: list[str] = []
    if not listeners.grpc_tls and not is_loopback(_host(listeners.grpc_listen)):
        found.append(
            f"gRPC for devices would listen in plaintext on {listeners.grpc_listen}: serve with --tls "
            "(mutual TLS; devices enrolled by `fedfleet devices enroll` carry certificates) or listen on 127.0.0.1"
        )
    if listeners.mqtt_url:
        host, port, tls = parse_mqtt_url(listeners.mqtt_url)
        if not tls and not is_loopback(host):
            found.append(
                f"the broker {host}:{port} would be reached in plaintext: use mqtts://{host}:8883 with a broker "
                "configured by `fedfleet broker config`"
            )
    dashboard = listeners.dashboard_listen
    if dashboard and not listeners.dashboard_tls and not is_loopback(_host(dashboard)):
        found.append(
            f"the dashboard, its API and /metrics would listen in plaintext on {listeners.dashboard_listen}: serve "
            "with --tls (HTTPS with the fleet CA's certificate for tls_hosts) or listen on 127.0.0.1"
        )
    return found
