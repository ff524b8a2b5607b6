"""Misbehaving simulated devices for real Flower runs.

`run_training` runs the simulated devices' ClientApp in Flower's own processes (server/fl/training.py), where a
test cannot patch anything; its test seam, the environment variable named by
`server.fl.training.TEST_CLIENTAPP_ENV`, names a ClientApp of this module instead ("tests.server.simulated_clientapps:
NAME"). Each wraps the real `server.fl.client_app:simulated_app` and changes only what its docstring says.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from server.fl.client_app import simulated_app

__all__ = ["forgetful_and_under_reporting", "not_a_clientapp"]

# Partition 0's device halves the ε it reports (its noise, rate and steps stay honest); partition 1's device loses
# its Flower context before every round, as a restarted SuperNode would.
forgetful_and_under_reporting = ClientApp()


@forgetful_and_under_reporting.query()
def _query(msg: Message, context: Context) -> Message:
    return simulated_app(msg, context)


@forgetful_and_under_reporting.train()
def _train(msg: Message, context: Context) -> Message:
    partition = int(context.node_config["partition-id"])
    if partition == 1:
        context.state.clear()
    reply = simulated_app(msg, context)
    if partition == 0 and not reply.has_error() and "metrics" in reply.content:
        metrics = reply.content["metrics"]
        metrics["epsilon"] = float(metrics["epsilon"]) / 2  # type: ignore[arg-type]
    return reply


# A name Flower finds (`flwr run` checks it is there) but cannot run as a ClientApp: the engine fails under the
# ServerApp, before any round.
not_a_clientapp = "not a ClientApp"
