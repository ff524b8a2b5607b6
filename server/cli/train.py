"""`fedfleet train`, `fedfleet models …`, `fedfleet privacy …`: federated training, the registry and the ledger.

Torch, Flower and Opacus load only when a command needs them, so the rest of the CLI stays quick.
"""

from __future__ import annotations

import importlib.util
from typing import Annotated

import typer

from server.cli.common import (
    DEFAULT_DATA_DIR,
    DataDirOption,
    JsonOption,
    fmt,
    local_time,
    open_datadir,
    out,
    print_json,
    print_rows,
)
from server.cli.remote import connect
from server.errors import CoordinatorError
from server.fl.plan import TrainPlan  # no torch or Flower: the plan only

_PLAN = TrainPlan()  # the training defaults, shown in --help

__all__ = ["models_app", "privacy_app", "train"]

models_app = typer.Typer(help="Model registry: versions, lineage, model cards.", no_args_is_help=True)
privacy_app = typer.Typer(
    help="Privacy: the ledger (ε spent per device, run and model version), budgets, devices' consent, the "
    "monitoring budget of noised telemetry windows.",
    no_args_is_help=True,
)


def train(
    rounds: Annotated[int, typer.Option(min=1, max=1000, help="Federated rounds.")] = _PLAN.rounds,
    clients: Annotated[int, typer.Option(min=1, max=10_000, help="Simulated devices (virtual clients).")] = 10,
    clients_per_round: Annotated[int, typer.Option(min=0, help="Devices per round; 0: every eligible device.")] = 0,
    target_epsilon: Annotated[
        float | None, typer.Option(help="Choose each client's noise so the planned rounds end at or below this ε.")
    ] = None,
    delta: Annotated[float, typer.Option(help="δ of the (ε, δ) guarantee.")] = 1e-5,
    noise_multiplier: Annotated[
        float | None, typer.Option(help="Gaussian noise multiplier when no --target-epsilon (default 1.0).")
    ] = None,
    no_dp: Annotated[bool, typer.Option("--no-dp", help="Train without differential privacy (a baseline).")] = False,
    max_grad_norm: Annotated[float, typer.Option(help="Per-sample gradient clipping norm C.")] = 1.0,
    local_epochs: Annotated[int, typer.Option(min=1, help="Local epochs per round.")] = _PLAN.local_epochs,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Expected DP-SGD batch (Poisson sampling: each example joins with rate b/n).")
    ] = _PLAN.batch_size,
    lr: Annotated[float, typer.Option(help="Local SGD learning rate (momentum 0.9).")] = _PLAN.lr,
    accountant: Annotated[
        str,
        typer.Option(
            help="Opacus' privacy accountant, used alike for each device's noise, the ε it reports and the "
            "coordinator's check: rdp, or prv (tighter: a lower ε for the same noise, less noise for a target ε)."
        ),
    ] = _PLAN.accountant,
    alpha: Annotated[float, typer.Option(help="Dirichlet α of the non-IID split (small: skewed).")] = 0.5,
    seed: Annotated[int, typer.Option(help="Seed: split, initial model, client sampling and noise.")] = 0,
    secure_mode: Annotated[
        bool, typer.Option(help="Opacus secure RNG for noise and sampling (production; runs no longer repeat).")
    ] = False,
    seeded_noise: Annotated[
        bool,
        typer.Option(
            help="Lab only: seed each device's DP noise from --seed so runs repeat. The coordinator, which knows "
            "the seed, could then remove the noise: the model card says so."
        ),
    ] = False,
    privacy_unit: Annotated[
        str,
        typer.Option(
            help="What DP protects. record (default): one example of a device, DP-SGD on every device, also "
            "against the coordinator. device: a device's whole data, the coordinator clips whole-device updates "
            "adaptively and noises their sum (central DP: not against the coordinator; for large fleets)."
        ),
    ] = "record",
    device_clip_norm: Annotated[
        float, typer.Option(help="Device unit: initial clipping norm of whole-device updates (it adapts).")
    ] = 0.1,
    clip_count_stddev: Annotated[
        float | None,
        typer.Option(help="Device unit: noise sd of the clipped-update count (default: devices per round / 20)."),
    ] = None,
    reference_epsilon: Annotated[
        float,
        typer.Option(
            help="ε of the drift reference's two noised count queries together, charged to every device that "
            "answers them (record-level; small fleets get a noisy reference: see docs/training.md)."
        ),
    ] = _PLAN.reference_epsilon,
    name: Annotated[str, typer.Option(help="Model name in the registry.")] = "digits",
    parent: Annotated[str, typer.Option(help="Start from this registered version (fine-tune); default: fresh.")] = "",
    verbose: Annotated[bool, typer.Option(help="Show Flower's and Ray's own logs.")] = False,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    as_json: JsonOption = False,
) -> None:
    """Train across simulated devices with Flower (simulation engine) and Opacus DP-SGD on every client; record
    ε per device in the privacy ledger and register the result as a model version."""
    if secure_mode and importlib.util.find_spec("torchcsprng") is None:
        raise CoordinatorError(
            "--secure-mode needs the torchcsprng package (Opacus' secure generator), which PyPI does not offer for "
            "this torch; build it from https://github.com/pytorch/csprng on every training device, or train without "
            "--secure-mode"
        )
    if no_dp and (target_epsilon is not None or noise_multiplier is not None):
        raise CoordinatorError("--no-dp cannot be combined with --target-epsilon or --noise-multiplier")
    noise = None if no_dp or target_epsilon is not None else (noise_multiplier or 1.0)
    plan = TrainPlan(
        rounds=rounds,
        clients=clients,
        clients_per_round=clients_per_round,
        target_epsilon=target_epsilon,
        noise_multiplier=noise,
        delta=delta,
        max_grad_norm=max_grad_norm,
        local_epochs=local_epochs,
        batch_size=batch_size,
        lr=lr,
        accountant=accountant,
        alpha=alpha,
        seed=seed,
        secure_mode=secure_mode,
        seeded_noise=seeded_noise,
        model_name=name,
        parent=parent,
        privacy_unit=privacy_unit,
        device_clip_norm=device_clip_norm,
        clip_count_stddev=clip_count_stddev,
        reference_epsilon=reference_epsilon,
    )
    if plan.privacy_unit == "device":
        from server.fl.device_dp import device_accounting

        device_accounting(plan, plan.clients)  # a combination that cannot work is refused before Ray starts
    d = open_datadir(data_dir)
    from server.fl.progress import RoundProgress
    from server.fl.training import run_training

    def progress(p: RoundProgress) -> None:
        if as_json:
            return
        eps = "" if p.epsilon_max is None else f"  ε {p.epsilon_max:.3f}"
        loss = "" if p.train_loss is None else f"  train loss {p.train_loss:.4f}"
        label = "initial model" if p.round == 0 else f"round {p.round}/{p.rounds}"
        counts = "" if p.round == 0 else f"  clients {p.completed}/{p.selected}"
        out.print(f"{label}:{counts}{loss}  test accuracy {p.test_accuracy:.4f}{eps}  ({p.seconds:.1f} s)")
        for i in p.incidents:
            out.print(f"  [yellow]{i['device']} {i['kind']}[/]: {i['detail'].splitlines()[0]}")

    if not as_json:
        mode = (
            "no DP"
            if not plan.private
            else (f"target ε {target_epsilon}" if target_epsilon else f"noise multiplier {noise}")
            + f" ({plan.accountant} accountant)"
        )
        unit = "" if not plan.private else f", {plan.privacy_unit}-level DP"
        out.print(
            f"Training {name}: {clients} devices, {rounds} rounds, {mode}{unit}, δ {delta:g}, seed {seed} "
            "(starting Ray)…"
        )
    outcome = run_training(d.root, plan, on_round=progress, verbose=verbose)
    if as_json:
        print_json(
            {
                "run": outcome.run_id,
                "status": outcome.status,
                "model_version": outcome.model_version or None,
                "error": outcome.error or None,
                "rounds": outcome.rounds,
                "incidents": outcome.incidents,
            }
        )
    if outcome.status != "completed":
        failed = [i for i in outcome.incidents if i["kind"] == "error"]
        where = "; ".join(f"{i['device_id']} in round {i['round']}: {i['detail'][:200]}" for i in failed[:5])
        raise CoordinatorError(
            f"training run {outcome.run_id} failed: {outcome.error}" + (f" — client errors: {where}" if where else "")
        )
    if not as_json:
        problems = [i for i in outcome.incidents if i["kind"] not in ("skipped-budget", "epsilon-mismatch")]
        if problems:
            out.print(f"[yellow]{len(problems)} client incident(s)[/] (see above); the run completed without them.")
        mismatches = [i for i in outcome.incidents if i["kind"] == "epsilon-mismatch"]
        if mismatches:
            out.print(
                f"[yellow]{len(mismatches)} ε mismatch(es)[/] (see above): the ledger holds the coordinator's larger "
                "figure; `fedfleet privacy ledger` shows them."
            )
        version = outcome.model_version
        out.print(f"Registered [bold]{version}[/] from run {outcome.run_id}. Next: fedfleet release {version}")


@models_app.command("list")
def models_list(data_dir: DataDirOption = DEFAULT_DATA_DIR, as_json: JsonOption = False) -> None:
    """Registered model versions, newest first, with their run, ε and test accuracy."""
    with connect(data_dir) as fleet:
        rows = fleet.models()
    print_rows(
        rows,
        as_json,
        ["version", "run", "parent", "ε", "accuracy", "weights sha256"],
        lambda r: [
            r["version"],
            r["run_id"],
            r["parent"] or "-",
            fmt(r["epsilon"]),
            fmt(r["accuracy"]),
            r["weights_sha256"][:12],
        ],
        "No model versions yet; run `fedfleet train`.",
    )


@models_app.command("show")
def models_show(
    version: Annotated[str, typer.Argument(help="A model version, e.g. digits@3.")],
    card: Annotated[bool, typer.Option("--card", help="Print the model card in Markdown only.")] = False,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    as_json: JsonOption = False,
) -> None:
    """A version's lineage (run, parent, rounds, devices, data, ε and δ, metrics per round) and model card."""
    with connect(data_dir) as fleet:
        doc = fleet.model(version)
    if as_json:
        print_json({key: doc[key] for key in ("version", "card", "lineage", "incidents")})
        return
    out.print(doc["card_markdown"], markup=False)
    incidents = doc["incidents"]
    if incidents and not card:
        run = doc["card"]["training"]["run_id"]
        out.print(f"{len(incidents)} incident(s) in run {run}:")
        for i in incidents:
            out.print(f"  round {i['round']}: {i['device_id']} {i['kind']}: {i['detail'][:160]}", markup=False)


@privacy_app.command("ledger")
def privacy_ledger(
    device: Annotated[str | None, typer.Option(help="Only this device's rows.")] = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    as_json: JsonOption = False,
) -> None:
    """ε and δ spent per device, run and purpose (training, or the drift reference's noised count queries, whose
    rounds column counts the queries answered), with the model version the run produced, whether the device's
    reports agreed with the coordinator's recomputation, and each device's lifetime ε and δ (sums over its runs
    and purposes) and budget. Remotely (--server, --context) it needs the privacy.manage permission."""
    with connect(data_dir) as fleet:
        rows = fleet.privacy_ledger(device)
    print_rows(
        rows,
        as_json,
        [
            "device",
            "run",
            "purpose",
            "unit",
            "accountant",
            "model version",
            "rounds",
            "ε",
            "δ",
            "ε check",
            "lifetime ε",
            "lifetime δ",
            "budget",
        ],
        lambda r: [
            r["device"],
            r["run"],
            r["purpose"],
            r["unit"],
            r["accountant"],
            r["model_version"] or "-",
            str(r["rounds"]),
            fmt(r["epsilon"]),
            f"{r['delta']:g}",
            _mismatches(r["epsilon_mismatches"]),
            fmt(r["lifetime_epsilon"]),
            f"{r['lifetime_delta']:g}",
            fmt(r["budget"]),
        ],
        f"The ledger holds no rows for {device}."
        if device
        else "The ledger is empty: no private training has run yet.",
    )
    if not as_json and any(r["epsilon_mismatches"] for r in rows):
        out.print(
            "A mismatch: the device reported an ε its own noise, sample rate and steps do not give; the larger "
            "figure is recorded. `fedfleet models show VERSION` lists the incidents, `fedfleet audit list` the "
            "entries."
        )


def _mismatches(n: int) -> str:
    return "ok" if n == 0 else f"{n} mismatch" if n == 1 else f"{n} mismatches"


@privacy_app.command("monitoring")
def privacy_monitoring(
    device: Annotated[str | None, typer.Option(help="Only this device.")] = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    as_json: JsonOption = False,
) -> None:
    """The monitoring budget per device: ε spent on noised telemetry windows (dp_epsilon_per_window in the telemetry
    table of agent.toml) as the coordinator stored them, the device's own spend and budget as its newest window
    reports them, the windows noised, whether the budget is exhausted (the device then sends no more windows, on
    purpose) and when the newest window arrived. Apart from the training ledger (`fedfleet privacy ledger`).
    Remotely (--server, --context) it needs the privacy.manage permission."""
    with connect(data_dir) as fleet:
        rows = fleet.privacy_monitoring(device)
    print_rows(
        rows,
        as_json,
        ["device", "windows", "ε (coordinator)", "ε (device)", "budget", "exhausted", "last window"],
        lambda r: [
            r["device"],
            str(r["windows"]),
            fmt(r["epsilon"]),
            fmt(r["device_spent"]),
            fmt(r["device_budget"]),
            "yes" if r["exhausted"] else "no",
            local_time(r["last_received_at"]),
        ],
        f"{device} has sent no noised telemetry windows: its telemetry is exact (its agent.toml sets no "
        "\\[telemetry] dp_epsilon_per_window)."
        if device
        else "No device has sent noised telemetry windows: telemetry is exact unless a device's agent.toml sets "
        "\\[telemetry] dp_epsilon_per_window.",
    )
    if not as_json and any(abs(r["epsilon"] - r["device_spent"]) > 1e-9 * max(1.0, r["device_spent"]) for r in rows):
        out.print(
            "Where the two ε differ, the device paid for windows the coordinator did not store (lost in a crash "
            "before they left the device, or refused), or its monitoring.json was deleted and its count began again."
        )


@privacy_app.command("budget")
def privacy_budget(
    device: Annotated[str, typer.Argument(help="Device id.")],
    epsilon: Annotated[float, typer.Argument(help="The device's lifetime ε budget.")],
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
) -> None:
    """Set one device's lifetime budget (others use `epsilon_budget` in config.toml)."""
    with connect(data_dir) as fleet:
        doc = fleet.set_budget(device, epsilon)
    out.print(f"{device}: lifetime budget ε {doc['budget']:g} (spent so far {doc['spent']:.3f}).")


@privacy_app.command("consent")
def privacy_consent(
    device: Annotated[
        str | None, typer.Option(help="Show this device's consent and every statement recorded for it, oldest first.")
    ] = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    as_json: JsonOption = False,
) -> None:
    """Each device's current consent to training: granted, withdrawn, or unknown (none recorded), since when and
    from where (agent: the owner's agent.toml, reported at registration; user:NAME). Consent records are personal
    data: remotely (--server, --context) they need the privacy.manage permission."""
    if device is None:
        with connect(data_dir) as fleet:
            rows = fleet.consent()
        print_rows(
            rows,
            as_json,
            ["device", "training consent", "since", "source", "registered"],
            lambda r: [
                r["device"],
                r["consent"],
                local_time(r["recorded_at"]),
                r["source"] or "-",
                "yes" if r["registered"] else "no",
            ],
            "No devices yet: a device appears when its agent first registers.",
        )
        return
    with connect(data_dir) as fleet:
        doc = fleet.consent_history(device)
    if as_json:
        print_json(doc)
        return
    since = "" if doc["recorded_at"] is None else f" since {local_time(doc['recorded_at'])} ({doc['source']})"
    registered = "" if doc["registered"] else " (not registered yet)"
    out.print(f"{device}{registered}: training consent {doc['consent']}{since}.", markup=False)
    print_rows(
        doc["history"],
        False,
        ["recorded", "purpose", "consent", "source"],
        lambda h: [local_time(h["recorded_at"]), h["purpose"], h["consent"], h["source"]],
        "No consent statement recorded: the owner's agent.toml states none (\\[consent] training = true|false).",
    )
