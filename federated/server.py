"""The federation's server side: rounds, centralized evaluation, checkpoints, tracking.

Runs inside the ServerApp process (`server_app.py` is its glue). Only the server logs to
MLflow — one run per simulation, never one per client. A checkpoint every k rounds holds
everything the next round depends on (global weights, strategy state such as FedAdam's
moments, the sampler's and every RNG's state), so a resumed federation ends with the same
global model as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atoll.core.checkpoint import CheckpointDir, rng_state, set_rng_state
from atoll.core.components import seed_everything
from atoll.core.data import DataBundle, eval_batches, load_data
from atoll.core.loop import evaluate
from atoll.core.metrics import build_loss, is_regression
from atoll.core.runner import latest_valid
from atoll.core.spec import ExperimentSpec
from atoll.federated import records as R
from atoll.federated.client_state import prune_client_states
from atoll.federated.driver import (
    ClientSampler,
    SampledGrid,
    StopRequested,
    discover,
    exchange,
    rediscover,
    spread,
)
from atoll.federated.faults import round_fault, unavailable
from atoll.federated.partition import label_histogram, partition_indices
from atoll.federated.strategies import (
    build_strategy,
    epsilon,
    load_strategy_state,
    strategy_state,
)

log = logging.getLogger("atoll.federated")

RESULT_FILE = "result.json"


@dataclass
class ServerState:
    round: int = 0  # completed rounds
    run_id: str | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    matrix: list[list[float]] = field(default_factory=list)  # continual: R[i][j]
    baseline: list[float] = field(default_factory=list)  # continual: random-init accuracy
    failed_streak: int = 0  # consecutive rounds that aggregated nothing
    logged: int = 0  # rows of history already sent to MLflow
    timing: dict[str, float] = field(default_factory=lambda: {"checkpoint_s": 0.0,
                                                              "tracking_s": 0.0})


def run_dir_for(spec: ExperimentSpec, run_config: dict[str, Any]) -> Path:
    given = str(run_config.get(R.RUN_DIR, "") or "")
    return Path(given) if given else Path(spec.train.checkpoint_dir).resolve() / spec.name


def serve(grid: Any, run_config: dict[str, Any]) -> dict[str, Any]:
    """Run the federation described by `run_config`; write the result file and return it.

    A FAILED or KILLED run raises after its result is written, so `flwr run` exits non-zero
    too. The stop file is the launcher's to create and remove (`atoll run` clears it before
    starting), so a Ctrl-C during start-up is not lost.
    """
    spec = R.spec_from_run_config(run_config)
    run_dir = run_dir_for(spec, run_config)
    run_dir.mkdir(parents=True, exist_ok=True)
    result_path = run_dir / RESULT_FILE
    finished_before = _status(result_path) == "FINISHED"
    result_path.unlink(missing_ok=True)
    try:
        with _stop_on_signals() as stop:
            result = _serve(grid, spec, run_config, run_dir, stop, finished_before)
    except Stopped as e:
        _write(result_path, {"status": "KILLED", "rounds": e.rounds, "run_id": e.run_id})
        raise
    except RoundsFailed as e:
        _write(result_path, {"status": "FAILED", "error": str(e), "rounds": e.rounds,
                             "run_id": e.run_id})
        raise
    except BaseException as e:
        _write(result_path, {"status": "FAILED", "error": f"{type(e).__name__}: {e}"})
        raise
    _write(result_path, result)
    return result


def _status(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def _write(path: Path, result: dict[str, Any]) -> None:
    """Atomically: the launcher may read it while an interrupted server writes it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)


class RoundsFailed(RuntimeError):
    """No update was aggregated for too long (or ever): the run is FAILED, not FINISHED."""

    def __init__(self, message: str, rounds: int = 0, run_id: str | None = None):
        super().__init__(message)
        self.rounds, self.run_id = rounds, run_id

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (str(self), self.rounds, self.run_id)


class Stopped(RuntimeError):
    """The server stopped on request after flushing and checkpointing (run KILLED)."""

    def __init__(self, rounds: int, run_id: str | None):
        super().__init__(f"stopped after round {rounds}")
        self.rounds, self.run_id = rounds, run_id


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """SIGINT/SIGTERM set an event the round loop checks (a signal may arrive while the
    server waits for replies; raising inside Flower's gRPC client could lose the round's
    bookkeeping). Outside the main thread nothing is installed."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda *_: event.set())
    try:
        yield event
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve(grid: Any, spec: ExperimentSpec, run_config: dict[str, Any], run_dir: Path,
           stop_event: threading.Event, finished_before: bool) -> dict[str, Any]:
    from flwr.app import ConfigRecord

    from atoll.models import build_model, count_parameters, model_class

    t0 = time.perf_counter()
    f = spec.federated
    if spec.train.threads:
        torch.set_num_threads(spec.train.threads)
    seed_everything(spec.seed)
    data: DataBundle = load_data(spec.data, spec.seed, spec.project_dir, spec.task)
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, data.input_shape, data.num_classes, spec.project_dir,
                        data.embedded)
    loss_fn = build_loss(spec.train.loss, data.train.y, data.num_classes, data.task,
                         data.y_mean, data.y_std)
    test = eval_batches(data.test, spec.data)

    partitions = discover(grid, f.num_clients, minimum=f.min_fit_clients)
    population = sorted(partitions)
    node_to_partition = {n: p for p, n in partitions.items()}
    # no honest client holds more training samples than the largest partition
    max_examples = max(len(q) for q in partition_indices(
        data.train.y.numpy(), f.partition, max(len(population), 1), spec.seed))
    sampler = ClientSampler(spec.seed)
    per_round = ClientSampler.size(len(population), f.fraction_fit, f.min_fit_clients)
    strategy = build_strategy(spec, per_round)

    ckpts = CheckpointDir(run_dir / "checkpoints", spec.train.keep_checkpoints, prefix="round")
    st = ServerState(run_id=str(run_config.get(R.MLFLOW_RUN_ID, "") or "") or None)
    arrays = R.state_to_arrays(model.state_dict())
    cl = _Stream(spec, data, loss_fn) if spec.continual.stream != "none" else None
    if cl is not None:
        st.baseline = cl.row(model)
    fisher = _federated_fisher(spec) if cl is not None else None
    resume = str(run_config.get(R.RESUME, "") or "")
    if resume:
        found = _find_checkpoint(ckpts, resume)
        if found is not None:
            path, saved = found
            arrays = R.state_to_arrays(saved["model"])
            load_strategy_state(strategy, saved["strategy"])
            sampler.load_state_dict(saved["sampler"])
            set_rng_state(saved["rng"])
            st = ServerState(round=int(saved["round"]), run_id=saved.get("run_id") or st.run_id,
                             history=list(saved["history"]), matrix=saved.get("matrix", []),
                             baseline=saved.get("baseline", st.baseline),
                             failed_streak=int(saved.get("failed_streak", 0)),
                             logged=len(saved["history"]))
            if fisher is not None:
                fisher.load_state_dict(saved.get("fedewc", {}))
            log.info("resumed the federation from %s (round %d)", path, st.round)
    else:
        if ckpts.all() and not finished_before and not _flag(run_config.get(R.RESTART)):
            raise RoundsFailed(f"{ckpts.root} holds an unfinished federation's checkpoints; "
                               "resume it (run config resume=\"latest\", or re-run with "
                               "atoll run) or discard it (restart=true, atoll run --restart)")
        for old in ckpts.all():
            old.unlink()
    if st.failed_streak >= f.max_failed_rounds:  # resumed right where it failed
        raise RoundsFailed(f"the checkpointed federation had already failed "
                           f"{st.failed_streak} consecutive rounds (federated."
                           f"max_failed_rounds {f.max_failed_rounds}); raise it to go on, "
                           "or atoll run --restart", st.round, st.run_id)
    # client states written after the resumed round belong to the interrupted run
    prune_client_states(run_dir / R.CLIENT_STATES, after=st.round)
    prune_client_states(run_dir / R.CLIENT_FEEDBACK, after=st.round)

    tracker = _tracker(spec, run_config, st.run_id)
    st.run_id = tracker.run_id
    tracker.set_tags({"atoll.run_dir": str(run_dir)})
    if st.round == 0:
        _log_setup(spec, tracker, data, population, len(population) != f.num_clients,
                   count_parameters(model), model_class(model))
    else:
        _backfill(tracker, st.history)

    def should_stop() -> bool:
        return stop_event.is_set() or (run_dir / R.STOP_FILE).exists()

    def payload() -> dict[str, Any]:
        """Everything round st.round + 1 depends on, as of the end of round st.round."""
        return {"model": R.arrays_to_state(arrays), "round": st.round,
                "strategy": strategy_state(strategy),
                "sampler": _encode_state(sampler.state_dict()),
                "rng": rng_state(), "history": list(st.history), "run_id": st.run_id,
                "matrix": [list(r) for r in st.matrix], "baseline": st.baseline,
                "failed_streak": st.failed_streak,
                "fedewc": fisher.state_dict() if fisher is not None else {},
                "spec": spec.model_dump(mode="json")}

    def checkpoint(saved: dict[str, Any]) -> Path:
        t0 = time.perf_counter()
        path = ckpts.save(saved, int(saved["round"]))
        t1 = time.perf_counter()
        # a round reaches MLflow once its checkpoint is durable: a resumed run starts
        # after the checkpoint and logs every round exactly once
        done = len(saved["history"])
        for row in st.history[st.logged:done]:
            tracker.log_metrics({k: v for k, v in row.items() if k != "round"},
                                step=int(row["round"]))
        st.logged = done
        tracker.flush()
        st.timing["checkpoint_s"] += t1 - t0
        st.timing["tracking_s"] += time.perf_counter() - t1
        return path

    bound = robust_bound(spec)
    expand_with = None
    if f.compression.method != "none" or f.compression.downlink == "fp16":
        from atoll.federated.wire import expand, rebase

        def expand_with(reply: Any, sent: Any) -> str | None:
            """A compressed reply as the model it stands for; with an fp16 downlink, the
            client's update moved onto the full-precision global model (`arrays`, this
            round's), which the sent message then carries for vetting and norms."""
            if f.compression.method != "none" and \
                    (why := expand(reply, sent, f.compression)) is not None:
                return why
            if f.compression.downlink == "fp16" and sent.content[R.ARRAYS] is not arrays:
                rebase(reply, sent.content[R.ARRAYS], arrays)
                sent.content[R.ARRAYS] = arrays
            return None
    cause = ""
    first = st.round + 1
    # DP calibrates noise and ε for a fixed sample of a fixed population: no late joiners
    dp = f.privacy.mode != "none"
    snapshot: dict[str, Any] | None = None  # the last completed round, for a stop mid-round
    try:
        for rnd in range(st.round + 1, f.rounds + 1):
            if should_stop():
                raise StopRequested
            t_round = time.perf_counter()
            lr = spec.optim.lr * f.lr_decay ** (rnd - 1)
            train_cfg = ConfigRecord({R.LR: lr, R.LOCAL_EPOCHS: f.local_epochs,
                                      R.BATCH_SIZE: f.batch_size or spec.data.batch_size,
                                      R.PROXIMAL_MU: f.proximal_mu
                                      if f.strategy == "fedprox" else 0.0,
                                      R.RESUMED_FROM: first - 1})
            if rnd > first and not dp and rediscover(grid, partitions):  # late SuperNodes
                population = sorted(partitions)
                node_to_partition = {n: p for p, n in partitions.items()}
                log.info("round %d: %d clients connected", rnd, len(population))
            present = [p for p in population
                       if not unavailable(f.faults, spec.seed, rnd, p)]
            chosen = sampler.sample(present, f.fraction_fit, min(f.min_fit_clients,
                                                                 len(present)))
            short = f.privacy.mode != "none" and len(chosen) != per_round
            view = SampledGrid(grid, [] if short else [partitions[p] for p in chosen])
            t_phase = time.perf_counter()
            messages = list(strategy.configure_train(rnd, arrays, train_cfg, view)) \
                if chosen and not short else []
            if fisher is not None and (flat := fisher.encode()):
                pairs = R.state_to_arrays(flat)  # encoded once, like the model's arrays
                for m in messages:  # the federation's importances travel with the model
                    m.content[R.FEDEWC] = pairs
            if f.compression.downlink == "fp16":
                _half_downlink(messages)
            fit = exchange(grid, messages, node_to_partition, f.round_timeout, should_stop,
                           max_examples=max_examples, silent=dropouts(spec, rnd, chosen),
                           expand=expand_with)
            fishers_in = _collect_fishers(fisher, fit.ok) if fisher is not None else 0
            seconds = {"seconds_train": time.perf_counter() - t_phase}
            norms = fit.norms
            clip = getattr(strategy, "clipping_norm", None)  # DP: the norm used this round
            refused = refusal(spec, fit, bound) or (
                f"differential privacy: {len(present)} clients present, a DP round samples "
                f"exactly {per_round}" if short else None)
            t_phase = time.perf_counter()
            new_arrays, fit_metrics = (None, None) if refused else \
                strategy.aggregate_train(rnd, fit.replies)
            seconds["seconds_aggregate"] = time.perf_counter() - t_phase
            if new_arrays is not None:
                new_arrays = integers_kept(new_arrays, arrays)
            if new_arrays is not None and not _finite(new_arrays):
                refused = f"the {f.strategy} aggregate of {len(fit.ok)} replies is not finite"
                new_arrays, fit_metrics = None, None
            if new_arrays is not None:
                arrays = new_arrays
                st.failed_streak = 0
                cause = ""
            else:
                st.failed_streak += 1
                cause = refused or (fit.cause() if not fit.ok else
                                    f"{f.strategy} aggregated nothing from {len(fit.ok)} "
                                    "replies")
                log.warning("round %d failed: %s", rnd, cause)
            row: dict[str, float] = {"round": float(rnd), "lr": lr,
                                     "participants": float(len(fit.ok)),
                                     "sampled": float(len(fit.sampled)),
                                     "byzantine_participants": float(sum(
                                         1 for r in fit.ok
                                         if r.content[R.CLIENT].get(R.BYZANTINE))),
                                     "aggregated": float(new_arrays is not None),
                                     "unavailable": float(len(population) - len(present)),
                                     "clients_examples_capped": float(len(fit.capped))}
            if fit.capped:
                log.warning("round %d: clients %s claimed more than %d examples; capped",
                            rnd, fit.capped, max_examples)
            kinds = fit.failures_by_kind()
            refused = fit.refused()
            if refused:  # every one: these are the replies an attacker would send
                log.warning("round %d: refused replies from clients %s", rnd, refused)
                for p in refused:
                    log.warning("round %d: client %d refused: %s", rnd, p,
                                fit.errors[p].strip()[-300:])
            for p, reason in [(p, r) for p, r in sorted(fit.errors.items())
                              if p not in refused][:1]:
                log.warning("round %d: client %d failed: %s", rnd, p, reason.strip()[-300:])
            row["failures"] = float(len(fit.sampled) - len(fit.ok))
            row.update({f"failures_{k}": float(v) for k, v in kinds.items()})
            row.update({f"train_{k}": float(v) for k, v in (fit_metrics or {}).items()
                        if not k.startswith("train_")})
            row.update({k: float(v) for k, v in (fit_metrics or {}).items()
                        if k.startswith("train_")})
            row.update(spread(fit.ok, "train_accuracy"))  # absent for regression
            if norms:
                row.update({"clients_update_norm_mean": float(sum(norms) / len(norms)),
                            "clients_update_norm_max": float(max(norms))})
            sent, received = fit.bytes_sent, fit.bytes_received
            t_phase = time.perf_counter()
            if f.fraction_evaluate > 0 and present:
                chosen_e = sampler.sample(present, f.fraction_evaluate, 1)
                view_e = SampledGrid(grid, [partitions[p] for p in chosen_e])
                ev = exchange(grid, strategy.configure_evaluate(rnd, arrays, ConfigRecord(),
                                                                view_e),
                              node_to_partition, f.round_timeout, should_stop,
                              silent=dropouts(spec, rnd, chosen_e))
                fed = strategy.aggregate_evaluate(rnd, ev.ok) if ev.ok else None
                row.update({f"federated_{k}": float(v) for k, v in (fed or {}).items()})
                row.update(spread(ev.ok, "val_accuracy"))
                row.update(spread(ev.ok, "val_r2"))
                row["evaluate_failures"] = float(len(ev.sampled) - len(ev.ok))
                sent, received = sent + ev.bytes_sent, received + ev.bytes_received
            seconds["seconds_evaluate"] = time.perf_counter() - t_phase
            t_phase = time.perf_counter()
            model.load_state_dict(R.arrays_to_state(arrays))
            central = evaluate(model, test, loss_fn, data.num_classes, prefix="central")
            row.update(central)
            seconds["seconds_central"] = time.perf_counter() - t_phase
            row.update(seconds)  # where the round's time went (train: the clients' exchange)
            if cl is not None:
                accs = cl.row(model)
                row.update({f"acc_task_{j}": a for j, a in enumerate(accs)})
                row["task"] = float(cl.task_of(rnd))
                if cl.closes_task(rnd):
                    st.matrix.append(accs)
                    if fisher is not None:
                        fisher.close_task(cl.task_of(rnd), R.arrays_to_state(arrays))
                row["tasks_in_round"] = float(len({int(r.content[R.CLIENT][R.TASK])
                                                    for r in fit.ok}))
                if fisher is not None:
                    row.update({"fedewc_fishers_received": float(fishers_in),
                                "fedewc_tasks": float(len(fisher.pairs()))})
            eps = epsilon(strategy)
            if eps is not None:
                row["dp_epsilon"] = eps
            if clip is not None:
                row["dp_clipping_norm"] = float(clip)
            # the training exchange alone: what compression acts on
            row.update({"bytes_down": float(fit.bytes_sent), "bytes_up": float(fit.bytes_received),
                        "compression_ratio": fit.bytes_dense / fit.bytes_received
                        if fit.bytes_received else 1.0})
            row.update({"bytes_sent": float(sent), "bytes_received": float(received),
                        "round_seconds": time.perf_counter() - t_round,
                        "server_peak_rss_mb": _peak_rss_mb()})
            st.history.append(row)
            st.round = rnd
            _report(rnd, f.rounds, row, kinds)
            snapshot = payload()
            if rnd % f.checkpoint_every == 0 or rnd == f.rounds or \
                    st.failed_streak >= f.max_failed_rounds:
                checkpoint(snapshot)
            if st.failed_streak >= f.max_failed_rounds:
                raise RoundsFailed(
                    f"{st.failed_streak} consecutive rounds aggregated no update "
                    f"(federated.max_failed_rounds {f.max_failed_rounds}); last: {cause}",
                    st.round, st.run_id)
        if not any(r.get("aggregated") for r in st.history):
            raise RoundsFailed(f"no round aggregated an update in {st.round} rounds; last: "
                               f"{cause}", st.round, st.run_id)
        model.load_state_dict(R.arrays_to_state(arrays))  # also when no round was left
        return _finish(spec, tracker, model, data, st, ckpts, time.perf_counter() - t0)
    except KeyboardInterrupt:  # StopRequested, or a signal outside the wait
        if snapshot is not None and st.logged < len(snapshot["history"]):
            checkpoint(snapshot)  # never the half-done round the stop interrupted
        done = int(snapshot["round"]) if snapshot is not None else first - 1
        tracker.set_tags({"atoll.interrupted_after_round": str(done)})
        tracker.finish("KILLED")
        log.warning("stopped after round %d; metrics flushed, run KILLED", done)
        raise Stopped(done, st.run_id) from None
    except RoundsFailed as e:
        latest = ckpts.latest()
        kept = f"; last checkpoint kept: {latest}" if latest else ""
        tracker.set_tags({"atoll.failure": str(e)[:5000]})
        tracker.finish("FAILED")
        raise RoundsFailed(f"{e}{kept}", e.rounds, e.run_id) from None
    except BaseException:
        tracker.finish("FAILED")
        raise


def dropouts(spec: ExperimentSpec, rnd: int, chosen: list[int]) -> set[int]:
    """Sampled clients that drop out this round (faults.dropout): they never reply. Drawn
    here rather than in the client, so a dropped client holds no simulation worker while
    the round waits for it."""
    return {p for p in chosen if round_fault(spec.federated.faults, spec.seed, rnd, p)
            == "dropout"}


def _flag(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes")


def _finite(arrays: Any) -> bool:
    return all(not torch.is_floating_point(t) or bool(torch.isfinite(t).all())
               for t in R.arrays_to_state(arrays).values())


def robust_bound(spec: ExperimentSpec) -> tuple[str, int] | None:
    """(the rule in words, replies needed) for Krum/MultiKrum/Bulyan (core/spec.py)."""
    f = spec.federated
    if (bound := f.replies_needed()) is None:
        return None
    rule, need = bound
    label = {"krum": "Krum", "multikrum": "MultiKrum", "bulyan": "Bulyan"}[f.strategy]
    return f"{label} needs ≥ {rule} = {need} replies (f = {f.malicious()})", need


def refusal(spec: ExperimentSpec, fit: Any, bound: tuple[str, int] | None) -> str | None:
    """Why this round must not be aggregated although some clients replied, or None.

    A robust rule below its bound gives no guarantee; DP noise and ε are calibrated for
    every sampled client, so — Flower's rule for its DP wrappers — a round with a failed
    client is refused rather than averaged over fewer updates with too little noise.
    """
    if not fit.ok:
        return None
    if bound is not None and len(fit.ok) < bound[1]:
        return f"{bound[0]}, got {len(fit.ok)}"
    if spec.federated.privacy.mode != "none" and len(fit.ok) < len(fit.sampled):
        m = len(fit.sampled)
        return (f"differential privacy: {m - len(fit.ok)} of {m} sampled clients failed; a "
                f"DP round is aggregated only with every sampled client (noise and ε are "
                f"calibrated for {m})")
    return None


def _half_downlink(messages: list[Any]) -> None:
    """`federated.compression.downlink: fp16`: the model's float arrays go to clients in
    half precision (one encoding per distinct record); a client trains from those values,
    and the server adds its update (reply − what it was sent) to the full-precision model
    (`wire.rebase`), so updates smaller than fp16's spacing are not rounded away."""
    from flwr.app import ArrayRecord

    halves: dict[int, Any] = {}
    for m in messages:
        full = m.content[R.ARRAYS]
        if id(full) not in halves:
            halves[id(full)] = ArrayRecord({k: _half(a) for k, a in full.items()})
        m.content[R.ARRAYS] = halves[id(full)]


def _half(arr: Any) -> Any:
    """A float array in fp16 — unless its values leave fp16's range (batch norm's running
    variance of unnormalised features, say), which travel as they are."""
    if np.dtype(str(arr.dtype)).kind != "f":
        return arr
    values = R.array_of(arr)
    half = values.astype(np.float16)
    if not np.isfinite(half).all() and np.isfinite(values).all():
        return arr
    return R.to_array(half)


def integers_kept(new: Any, old: Any) -> Any:
    """`new` with every array that `old` held as integers cast back to that dtype. Flower's
    averaging multiplies by float weights, so batch norm's `num_batches_tracked` (int64)
    came back as float64 — and every client's int64 reply of the next round then failed
    vetting against it. Truncated, as a client's `load_state_dict` would cast it."""
    from flwr.app import Array, ArrayRecord

    cast = {k: np.dtype(str(old[k].dtype)) for k in new
            if k in old and np.dtype(str(old[k].dtype)).kind in "iub"
            and np.dtype(str(new[k].dtype)).kind == "f"}
    if not cast:
        return new
    return ArrayRecord({k: Array(a.numpy().astype(cast[k])) if k in cast else a
                        for k, a in new.items()})


def _backfill(tracker: Any, history: list[dict[str, float]]) -> None:
    """Log checkpointed rounds that MLflow lacks (the server died between the two)."""
    client = getattr(tracker, "client", None)
    if client is None or not history:
        return
    logged = {m.step for m in client.get_metric_history(tracker.run_id, "round_seconds")}
    for row in history:
        if int(row["round"]) not in logged:
            tracker.log_metrics({k: v for k, v in row.items() if k != "round"},
                                step=int(row["round"]))
    tracker.flush()


def _federated_fisher(spec: ExperimentSpec) -> Any:
    """FedEWC's server-side state when the spec asks for it (EWC with aggregate: server)."""
    if "ewc" not in spec.continual.strategy or spec.continual.ewc.aggregate != "server":
        return None
    from atoll.federated.fedewc import FederatedFisher

    return FederatedFisher(online=spec.continual.ewc.mode == "online")


def _collect_fishers(fisher: Any, replies: list[Any]) -> int:
    """Take the Fishers clients sent out of their replies (Flower's strategies expect one
    ArrayRecord per reply) and add them to the server's per-task means."""
    n = 0
    for r in replies:
        if R.FISHER not in r.content:
            continue
        who = r.content[R.CLIENT]
        fisher.add(int(who[R.FISHER_TASK]), R.arrays_to_state(r.content[R.FISHER]),
                   float(who[R.FISHER_WEIGHT]))
        del r.content[R.FISHER]
        n += 1
    return n


class _Stream:
    """The server's view of a task stream: which round trains which task, and the
    global model's accuracy on every task's test split (a row of R)."""

    def __init__(self, spec: ExperimentSpec, data: DataBundle, loss_fn: torch.nn.Module):
        from atoll.continual.streams import build_stream
        from atoll.core.continual_runner import task_mask
        from atoll.federated.task import rounds_per_task

        self.spec, self.loss_fn, self.num_classes = spec, loss_fn, data.num_classes
        self.tasks = build_stream(data, spec.continual, spec.seed)
        self.per_task = rounds_per_task(spec)
        self.mask = task_mask(self.tasks, data.num_classes) \
            if spec.continual.scenario == "task" else None

    def task_of(self, rnd: int) -> int:
        return min((rnd - 1) // self.per_task, len(self.tasks) - 1)

    def closes_task(self, rnd: int) -> bool:
        """The last round of a task (the final round closes the last task)."""
        last = self.task_of(rnd) == len(self.tasks) - 1
        return rnd == self.spec.federated.rounds if last else rnd % self.per_task == 0

    def row(self, model: torch.nn.Module) -> list[float]:
        key = "test_r2" if is_regression(self.loss_fn) else "test_accuracy"
        return [evaluate(model, eval_batches(t.test, self.spec.data), self.loss_fn,
                         self.num_classes, prefix="test", logit_mask=self.mask
                         ).get(key, 0.0) for t in self.tasks]


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _encode_state(state: dict[str, Any]) -> dict[str, Any]:
    """numpy bit-generator state holds 128-bit ints; strings survive weights_only loads."""
    return json.loads(json.dumps(state), parse_int=str)


def _decode_state(state: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(state), object_hook=lambda d: {
        k: int(v) if isinstance(v, str) and v.lstrip("-").isdigit() else v
        for k, v in d.items()})


def _find_checkpoint(ckpts: CheckpointDir, resume: str) -> tuple[Path, dict[str, Any]] | None:
    if resume in ("latest", "true", "1"):
        found = latest_valid(ckpts)
    else:
        p = Path(resume)
        found = latest_valid(CheckpointDir(p, 1, prefix="round")) if p.is_dir() else \
            latest_valid(CheckpointDir(p.parent, 1, prefix="round"))
    if found is not None:
        found[1]["sampler"] = _decode_state(found[1]["sampler"])
    return found


def _tracker(spec: ExperimentSpec, run_config: dict[str, Any], run_id: str | None) -> Any:
    from atoll.tracking import make_tracker

    uri = str(run_config.get(R.TRACKING_URI, "") or "") or spec.tracking.uri
    return make_tracker(spec.tracking.model_copy(update={"uri": uri}), spec.name,
                        mode="federated", run_id=run_id, trains=True)


def _log_setup(spec: ExperimentSpec, tracker: Any, data: DataBundle, population: list[int],
               mismatch: bool, parameters: int, model_cls: str) -> None:
    f = spec.federated
    tracker.log_params(spec.flat())
    tracker.log_text(spec.to_yaml(), "spec.yaml")
    labels = data.train.y.numpy()
    parts = partition_indices(labels, f.partition, len(population), spec.seed)
    sizes = [len(p) for p in parts]
    tracker.log_params({"model.parameters": parameters, "model.class": model_cls,
                        "data.task": data.task,
                        "data.train_samples": len(labels),
                        "federated.clients_connected": len(population),
                        "federated.partition_sizes": ",".join(map(str, sizes))})
    tracker.set_tags({"atoll.strategy": f.strategy, "atoll.partition": f.partition.method})
    if mismatch:
        log.warning("%d clients connected but federated.num_clients is %d; partitions follow "
                    "the federation's size", len(population), f.num_clients)
    from atoll.tracking.plots import label_heatmap

    hist = label_histogram(labels, parts, data.num_classes) if data.task != "regression" \
        else [[len(p)] for p in parts]  # regression: how many samples each client holds
    title = f"{f.partition.method} partition of {spec.data.name} over {len(parts)} clients"
    tracker.log_plot("plots/partition.png", lambda: label_heatmap(hist, title))


def _report(rnd: int, total: int, row: dict[str, float], kinds: dict[str, int]) -> None:
    failed = ", ".join(f"{k}={v}" for k, v in kinds.items() if v)
    main = "central_r2" if "central_r2" in row else "central_accuracy"
    log.info("round %d/%d %s=%.4f central_loss=%.4f participants=%d%s (%.1fs)",
             rnd, total, main, row.get(main, float("nan")),
             row.get("central_loss", float("nan")), int(row["participants"]),
             f" failures: {failed}" if failed else "", row["round_seconds"])


def _finish(spec: ExperimentSpec, tracker: Any, model: torch.nn.Module, data: DataBundle,
            st: ServerState, ckpts: CheckpointDir, seconds: float) -> dict[str, Any]:
    f = spec.federated
    last = st.history[-1] if st.history else {}
    test = {k.replace("central_", "test_"): v for k, v in last.items()
            if k.startswith("central_")}
    cl_out = {}
    if st.matrix and len(st.matrix) == spec.continual.n_tasks:
        from atoll.continual.metrics import summary
        from atoll.tracking.plots import accuracy_matrix, task_curves

        cl_out = summary(st.matrix, st.baseline)
        names = [f"task {j}" for j in range(len(st.matrix))]
        tracker.log_plot("plots/accuracy_matrix.png",
                         lambda: accuracy_matrix(st.matrix, names, cl_out))
        tracker.log_plot("plots/task_accuracy.png", lambda: task_curves(st.matrix, names))
        test = {**test, **cl_out}
    tracker.log_metrics(test, step=st.round)
    tracker.set_tags({"atoll.rounds": str(st.round)})
    if st.history:
        from atoll.tracking.plots import rounds

        tracker.log_plot("plots/rounds.png", lambda: rounds(
            st.history, f"{spec.name}: {f.strategy} on {f.num_clients} clients"))
    registered = None
    if spec.tracking.log_model:
        from atoll.tracking import Selection

        # the global model after the last aggregated round, chosen by nothing but being last
        aggregated = [int(r["round"]) for r in st.history if r.get("aggregated")]
        main = "r2" if data.task == "regression" else "accuracy"
        selection = Selection(f"central_{main}", test.get(f"test_{main}"),
                              aggregated[-1] if aggregated else 0, unit="round", rule="last")
        registered = tracker.log_model(
            model.cpu(), data, registered_name=spec.tracking.registered_model,
            alias=spec.tracking.alias,
            tags={"mode": "federated", "strategy": f.strategy, "rounds": str(st.round),
                  "partition": f.partition.method, "data.task": data.task,
                  f"test_{main}": f"{test.get(f'test_{main}', 0):.4f}"},
            selection=selection)
    tracker.finish("FINISHED")
    latest = ckpts.latest()
    return {"status": "FINISHED", "run_id": st.run_id, "metrics": test, "rounds": st.round,
            "seconds": seconds, "checkpoint": str(latest) if latest else None,
            "registered": None if registered is None else {
                "name": registered.name, "version": registered.version,
                "alias": registered.alias, "uri": registered.uri,
                "store": registered.store},
            "history": st.history, "matrix": st.matrix, "baseline": st.baseline,
            "timing": st.timing}
