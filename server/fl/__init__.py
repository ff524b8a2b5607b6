"""Federated training: a Flower app whose clients train under Opacus DP-SGD, the privacy ledger, the model
registry, and the export of a registered model to a signed TFLite release.

Who runs what (as in Flower's own layout):
- `client_app.py` runs on a device (a Flower SuperNode, or a virtual client in the simulation engine);
- `server_app.py` runs on the coordinator (a SuperLink's ServerApp, or a simulation SuperLink's flwr-simulation);
- `training.py` starts a run in the simulation engine: `simulation_engine.py` submits it with `flwr run` to a
  SuperLink of its own, which `ray_head.py` starts with the Ray node it runs on; docs/training.md says how to
  run the same app on a SuperLink with SuperNodes;
- `data.py`, `model.py`, `privacy.py` are shared by both sides.

Torch, Flower and Opacus are imported here only; the rest of the coordinator imports this package lazily.
"""
