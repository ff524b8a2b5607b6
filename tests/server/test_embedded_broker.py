"""The embedded broker: loopback only, each client gets only its own retained state, a connect storm holds."""

from __future__ import annotations

import asyncio

import aiomqtt
import pytest

from edge_agent.contract import Topics
from server.errors import CoordinatorError
from server.ingest.broker import EmbeddedBroker, free_port

T = Topics()
MARKER = b"live marker"


def test_refuses_to_listen_beyond_loopback() -> None:
    for listen in ("0.0.0.0:1883", "192.0.2.7:1883", "example.org:1883"):
        with pytest.raises(CoordinatorError, match="only binds loopback"):
            EmbeddedBroker(listen)


async def _device(port: int, device: str, got: dict[str, list[tuple[str, bytes]]], ready: asyncio.Event) -> None:
    async with aiomqtt.Client("127.0.0.1", port, identifier=device) as client:
        await client.subscribe(T.desired(device), qos=1)
        ready.set()
        async for message in client.messages:
            got[device].append((message.topic.value, bytes(message.payload)))  # type: ignore[arg-type]


def test_each_client_receives_only_its_own_retained_state_during_a_connect_storm() -> None:
    devices = [f"pi-{i}" for i in range(60)]

    async def scenario() -> dict[str, list[tuple[str, bytes]]]:
        broker = EmbeddedBroker(f"127.0.0.1:{free_port()}")
        await broker.start()
        got: dict[str, list[tuple[str, bytes]]] = {d: [] for d in devices}
        try:
            # Like the coordinator, a client holds a wildcard subscription over every device's topics.
            async with aiomqtt.Client("127.0.0.1", broker.port, identifier="coordinator") as c:
                await c.subscribe(f"{T.prefix}/devices/+/desired", qos=1)
                for d in devices[:30]:
                    await c.publish(T.desired(d), f"for {d}".encode(), qos=1, retain=True)
                readies = [asyncio.Event() for _ in devices]
                tasks = [
                    asyncio.create_task(_device(broker.port, d, got, r)) for d, r in zip(devices, readies, strict=True)
                ]
                await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 20)
                # Then a live (not retained) marker to every device: it arrives after anything retained for
                # that device, so once every device has its marker, every delivery is in.
                for d in devices:
                    await c.publish(T.desired(d), MARKER, qos=1)

                async def all_marked() -> None:
                    while not all(got[d] and got[d][-1][1] == MARKER for d in devices):
                        await asyncio.sleep(0.02)

                await asyncio.wait_for(all_marked(), 30)
                for t in tasks:
                    assert not t.done(), t  # no client was dropped
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await broker.stop()
        return got

    got = asyncio.run(scenario())
    for i, d in enumerate(devices):
        expected = [(T.desired(d), f"for {d}".encode())] if i < 30 else []
        assert got[d] == [*expected, (T.desired(d), MARKER)], d
