"""How models are loaded (agent.toml `xnnpack`, `share_models`), on the real ai-edge-litert interpreter: XNNPACK on
by default and off on request, and the sharing simulated fleets use: one model per distinct bytes in a process,
never across different bytes, its calls serialised across the devices that share it."""

from __future__ import annotations

import gc
import hashlib
import json
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent import runtime
from edge_agent.agent import Agent
from edge_agent.config import config_from_dict, load_config
from edge_agent.errors import ConfigError
from edge_agent.runtime import Model, ModelOptions, load_model
from edge_agent.state import SlotInfo, StateStore
from server.datadir import DataDir
from server.trust.enrollment import write_bundle
from server.trust.releases import auto_probe
from simulations.dense_tflite import build_dense_model, random_dense_layers

SHARED = ModelOptions(xnnpack=False, share=True)


def _model_file(path: Path, seed: int = 5, sizes: tuple[int, ...] = (64, 32, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(build_dense_model(random_dense_layers(list(sizes), seed)))
    return path


def _ops(model: Model) -> list[str]:
    """The interpreter's execution plan after loading: a "DELEGATE" node is a delegate (XNNPACK) at work."""
    return [op["op_name"] for op in model.interpreter._get_ops_details()]  # type: ignore[attr-defined]


def _inputs(model: Model, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.random(model.input_shape, dtype=np.float32) for _ in range(n)]


def test_models_load_with_xnnpack_by_default_and_without_it_when_turned_off(tmp_path: Path) -> None:
    path = _model_file(tmp_path / "m.tflite")
    default = load_model(path)
    off = load_model(path, options=ModelOptions(xnnpack=False))
    assert "DELEGATE" in _ops(default)
    assert _ops(off) == ["FULLY_CONNECTED", "FULLY_CONNECTED", "SOFTMAX"]
    assert not default.shared and not off.shared
    for x in _inputs(default, 8):
        assert np.max(np.abs(default.predict(x) - off.predict(x))) <= 1e-5
    probe = auto_probe(default, "ab" * 32)
    assert off.run_probe(probe) <= 1e-4  # a probe set made with XNNPACK passes without it


def test_without_share_every_load_is_its_own_interpreter(tmp_path: Path) -> None:
    path = _model_file(tmp_path / "m.tflite")
    a, b = load_model(path), load_model(path, options=ModelOptions(xnnpack=False))
    c = load_model(path, options=ModelOptions(xnnpack=False))
    assert len({id(m.interpreter) for m in (a, b, c)}) == 3 and len({id(m.lock) for m in (a, b, c)}) == 3


def test_devices_with_the_same_bytes_share_one_model_and_different_bytes_never_do(tmp_path: Path) -> None:
    # Prepare: three devices' slot files, two with the same bytes, one with a different model.
    one = _model_file(tmp_path / "dev-1" / "slot-a.tflite", seed=5)
    two = _model_file(tmp_path / "dev-2" / "slot-b.tflite", seed=5)
    other = _model_file(tmp_path / "dev-3" / "slot-a.tflite", seed=6)
    # Execute
    m1, m2, m3 = (load_model(p, options=SHARED) for p in (one, two, other))
    with_xnnpack = load_model(two, options=ModelOptions(xnnpack=True, share=True))
    # Assert: same bytes and options, one model; other bytes (or options), a model of their own.
    assert m1 is m2 and m1.shared and "DELEGATE" not in _ops(m1)
    assert m3 is not m1 and m3.interpreter is not m1.interpreter and m3.lock is not m1.lock
    assert with_xnnpack is not m1 and "DELEGATE" in _ops(with_xnnpack)
    for x in _inputs(m1, 4):
        assert np.array_equal(m3.predict(x), load_model(other, options=ModelOptions(xnnpack=False)).predict(x))
        assert not np.allclose(m3.predict(x), m1.predict(x))


def test_a_device_whose_file_changed_gets_a_model_of_its_bytes_not_the_one_it_shared(tmp_path: Path) -> None:
    # Prepare: two devices share a model; then device 2's file is replaced by other bytes (a tampered slot).
    one = _model_file(tmp_path / "dev-1" / "slot.tflite", seed=5)
    two = _model_file(tmp_path / "dev-2" / "slot.tflite", seed=5)
    first = load_model(one, options=SHARED)
    assert load_model(two, options=SHARED) is first
    _model_file(two, seed=9)
    # Execute
    reloaded = load_model(two, options=SHARED)
    # Assert: the key is the digest of what device 2 holds now, so it runs its own (new) bytes.
    assert reloaded is not first
    x = _inputs(first, 1)[0]
    assert np.array_equal(reloaded.predict(x), load_model(two, options=ModelOptions(xnnpack=False)).predict(x))
    assert not np.allclose(reloaded.predict(x), first.predict(x))


def test_a_file_that_is_not_a_model_is_a_load_failure_and_is_not_kept(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"not a flatbuffer" * 64)
    before = len(runtime._SHARED)
    with pytest.raises(runtime.InterpreterError, match="does not load") as refused:
        load_model(junk, options=SHARED)
    assert refused.value.reason == "load_failed" and len(runtime._SHARED) == before
    with pytest.raises(runtime.InterpreterError, match="unreadable"):
        load_model(tmp_path / "missing.tflite", options=SHARED)


def test_a_shared_model_is_freed_when_no_device_holds_it(tmp_path: Path) -> None:
    path = _model_file(tmp_path / "m.tflite", seed=11)
    model = load_model(path, options=SHARED)
    gc.collect()  # models of earlier tests (an interpreter sits in a reference cycle)
    held = len(runtime._SHARED)
    del model
    gc.collect()
    assert len(runtime._SHARED) == held - 1


def test_two_devices_predicting_at_once_on_a_shared_model_each_get_their_own_answers(tmp_path: Path) -> None:
    """Each thread is a device: its own serving lock keeps only its own calls apart, so it uses
    `predict_serialized` as the agent does. Without the shared model's lock, the interpreter's input tensor is
    overwritten between one thread's set_tensor and invoke (wrong outputs), or invoke refuses while the other
    holds a view of its output (RuntimeError)."""
    # Prepare: a model big enough that invoke takes a while with the GIL released.
    one = _model_file(tmp_path / "dev-1" / "slot.tflite", seed=3, sizes=(256, 256, 10))
    two = _model_file(tmp_path / "dev-2" / "slot.tflite", seed=3, sizes=(256, 256, 10))
    devices = [load_model(one, options=SHARED), load_model(two, options=SHARED)]
    assert devices[0] is devices[1]
    xs = _inputs(devices[0], 2)
    want = [load_model(one).predict(x) for x in xs]
    failures: list[str] = []

    def device(i: int) -> None:
        for _ in range(2000):
            try:
                got = devices[i].predict_serialized(xs[i])
            except RuntimeError as e:
                failures.append(f"device {i}: {e}")
                return
            if np.max(np.abs(got - want[i])) > 1e-5:
                failures.append(f"device {i}: another device's output")
                return

    # Execute
    threads = [threading.Thread(target=device, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    # Assert
    assert not any(t.is_alive() for t in threads) and failures == []


class _LockSpy:
    """The real interpreter, recording whether the model's lock was held at each invoke."""

    def __init__(self, inner: Any, lock: threading.Lock) -> None:
        self.inner = inner
        self.lock = lock
        self.held_at_invoke: list[bool] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def invoke(self) -> None:
        self.held_at_invoke.append(self.lock.locked())
        self.inner.invoke()


def test_predict_serialized_takes_the_lock_only_for_a_shared_model(tmp_path: Path) -> None:
    path = _model_file(tmp_path / "m.tflite")
    for options, locked in ((ModelOptions(xnnpack=False), False), (SHARED, True)):
        model = load_model(path, options=options)
        spy = _LockSpy(model.interpreter, model.lock)
        spied = replace(model, interpreter=spy)
        spied.predict_serialized(_inputs(model, 1)[0])
        spied.predict(_inputs(model, 1)[0])
        assert spy.held_at_invoke == [locked, True]


def _raw(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    (tmp_path / "keys.json").write_text(json.dumps({}))
    return {
        "device_id": "pi-1",
        "state_dir": "state",
        "grpc_target": "127.0.0.1:50051",
        "mqtt_url": "mqtt://127.0.0.1:1883",
        "trust_root": "root.json",
        "director_keys": "keys.json",
        **extra,
    }


def test_agent_toml_defaults_keep_xnnpack_and_no_sharing_and_the_keys_turn_them(tmp_path: Path) -> None:
    default = config_from_dict(_raw(tmp_path), tmp_path)
    assert default.model_options == ModelOptions(xnnpack=True, share=False) == ModelOptions()
    turned = config_from_dict(_raw(tmp_path, xnnpack=False, share_models=True), tmp_path)
    assert turned.model_options == SHARED


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("xnnpack", "off", "xnnpack must be true (faster inference) or false (less memory); got 'off'"),
        ("xnnpack", 0, "xnnpack must be true (faster inference) or false (less memory); got 0"),
        ("share_models", "yes", "share_models must be true or false (true only for simulated fleets); got 'yes'"),
        ("share_models", 1, "share_models must be true or false (true only for simulated fleets); got 1"),
    ],
)
def test_a_bad_model_setting_is_a_config_error_naming_it(tmp_path: Path, key: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        config_from_dict(_raw(tmp_path, **{key: value}), tmp_path)
    assert str(refused.value) == message


def _committed_agents(tmp_path: Path, settings: str, seeds: tuple[int, ...]) -> list[Agent]:
    """Agents of one process (as in a fleet worker), each restarting on a committed model in its own slot."""
    d, _ = DataDir.init(tmp_path / "data")
    agents = []
    for i, seed in enumerate(seeds):
        bundle = tmp_path / f"pi-{i}"
        write_bundle(d, f"pi-{i}", bundle, "lab", grpc="127.0.0.1:1", mqtt="mqtt://127.0.0.1:1")
        config_path = bundle / "agent.toml"
        config_path.write_text(settings + config_path.read_text())  # top-level keys go before any table
        config = load_config(config_path)
        store = StateStore(config.state_dir)
        model = _model_file(store.model_path("a"), seed=seed)
        info = SlotInfo("m.tflite", hashlib.sha256(model.read_bytes()).hexdigest(), model.stat().st_size, "m@1", 1)
        store.update(slots={"a": info}, active="a", highest_counter=1, committed_counter=1)
        agents.append(Agent(config))
    return agents


def test_agents_of_one_process_share_a_committed_model_only_when_told(tmp_path: Path) -> None:
    shared = _committed_agents(tmp_path / "shared", "share_models = true\nxnnpack = false\n", (5, 5, 6))
    alone = _committed_agents(tmp_path / "alone", "", (5, 5))
    try:
        a, b, c = (agent.model for agent in shared)
        assert a is not None and a is b and a.shared and c is not a  # c committed other bytes
        assert all(agent._ctx.model_options == SHARED for agent in shared)  # and so will its updates load
        x, y = (agent.model for agent in alone)
        assert x is not None and y is not None and x.interpreter is not y.interpreter and not x.shared
        assert all(agent._ctx.model_options == ModelOptions() for agent in alone)
        sample = _inputs(a, 1)[0]
        assert np.allclose(shared[0].infer(sample), alone[0].infer(sample), atol=1e-5)
    finally:
        for agent in shared + alone:
            agent.outbox.close()
