"""`atoll` command line. Heavy imports (torch, mlflow, ray, flwr) happen inside the
branch that needs them, so `atoll --help` and `atoll validate` start instantly."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml

from atoll.core import interrupts
from atoll.core.compress_spec import METHODS as COMPRESS_METHODS
from atoll.core.imports import first_line
from atoll.core.spec import ExperimentSpec, SpecError, describe_error, load_spec

EXIT_SPEC = 2
# loggers whose INFO lines are the libraries' bookkeeping, not the user's run (-v shows them)
LIBRARY_LOGGERS = ("mlflow", "alembic", "ray", "flwr", "httpx", "urllib3", "filelock")
# libraries whose deprecation notices (about their own dependencies) are not the user's to
# act on; `--verbose` shows them
QUIETED_WARNINGS = ("pyarrow", "datasets", "flwr_datasets", "flwr", "mlflow", "ray", "pydantic")
EXIT_FAILED = 1
# known failures that are a setting to fix before anything ran: exit 2, like a bad spec
SETTING_FAILURES = {"RayAuthError"}
DEMO_SPEC = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
DEMO_FEDERATED = DEMO_SPEC.parent / "federated.yaml"
DEMO_FCL = DEMO_SPEC.parent / "fcl.yaml"
DEMO_POPULATION = DEMO_SPEC.parent / "population.yaml"


def _spec_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
    if optional:
        p.add_argument("spec", nargs="?", default=str(DEMO_SPEC), help="YAML spec file")
    else:
        p.add_argument("spec", help="YAML spec file (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field, e.g. --set federated.rounds=20 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atoll", description="Distributed, federated and continual deep learning from "
        "one experiment spec. Runs are tracked in MLflow.")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also the libraries' INFO lines (MLflow, Ray, Flower)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="train a spec (mode from the spec: local, cluster, federated)",
                       description="Train the spec. Re-running the same `name` resumes an "
                       "unfinished run from its latest checkpoint (train.resume); a finished "
                       "run's name trains anew. An unfinished run's checkpoints are deleted "
                       "only with --restart.")
    _spec_args(p)
    p.add_argument("--resume", metavar="RUN_ID_OR_DIR", default=None,
                   help="federated: continue from a checkpoint directory/file, 'latest', or "
                   "the MLflow run id of an interrupted run")
    p.add_argument("--restart", action="store_true",
                   help="discard the checkpoints of an unfinished run under this name and "
                   "start it over as a new MLflow run")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="check a spec and print it with defaults filled in",
                       description="Validate a spec; exit 2 with one line per problem.")
    _spec_args(p)
    p.add_argument("--quiet-ok", action="store_true", help="print nothing when the spec is valid")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("demo", help="the demo: local training, then a federated simulation",
                       description="What `make demo` runs: an MLP on scikit-learn's bundled "
                       "digits (configs/demo.yaml), then 10 simulated Flower clients on a "
                       "non-IID split with FedAvg (configs/federated.yaml), then federated "
                       "continual learning: 5 clients keep EWC + replay state across 3 tasks "
                       "(configs/fcl.yaml), then a population of 200 clients on the "
                       "vectorized engine (configs/population.yaml); all tracked in "
                       "./mlruns.db with registered model versions. Given a SPEC, runs only "
                       "that.")
    _spec_args(p, optional=True)
    p.add_argument("--local-only", action="store_true", help="skip the federated part")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("submit", help="submit a spec to a Ray cluster as a job",
                       description="Submit `atoll run SPEC` to a Ray cluster's Job API. The "
                       "spec is validated and resolved here (absolute MLflow store and Ray "
                       "storage path) and shipped in the job's working directory (the current "
                       "directory, without .venv, .git, mlruns*, mlartifacts, data caches). "
                       "A cluster with Ray token authentication needs its token: set "
                       "RAY_AUTH_TOKEN_PATH to a file holding it (or RAY_AUTH_TOKEN).")
    _spec_args(p)
    _address_arg(p)
    p.add_argument("--wait", action="store_true", help="wait for the job and print its logs")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("jobs", help="list, inspect, follow or stop Ray jobs",
                       description="Ray jobs on a cluster: list | status ID | logs ID "
                       "[--follow] | stop ID. With Ray token authentication on, the token "
                       "comes from RAY_AUTH_TOKEN_PATH (or RAY_AUTH_TOKEN).")
    jobs = p.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    for name, hlp in (("list", "all jobs"), ("status", "one job's status"),
                      ("logs", "one job's logs"), ("stop", "stop a job")):
        q = jobs.add_parser(name, help=hlp, description=f"{hlp.capitalize()}.")
        _address_arg(q)
        if name != "list":
            q.add_argument("job_id", help="submission id (as printed by atoll submit)")
        if name == "logs":
            q.add_argument("--follow", action="store_true", help="stream until the job ends")
        q.set_defaults(func=cmd_jobs)

    p = sub.add_parser("ui", help="open the MLflow UI on the tracking store (127.0.0.1)",
                       description="Serve the MLflow UI for the default store (./mlruns.db) or "
                       "MLFLOW_TRACKING_URI, bound to 127.0.0.1 unless --host says otherwise.")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    p.add_argument("--uri", default=None, help="backend store URI (default ./mlruns.db)")
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("compress", help="compress a registered model into new versions",
                       description="Compress a registered model version and register the "
                       "result as a new version of the same model, tagged compression=... and "
                       "parent_version=..., with its test accuracy (or R²), size and latency "
                       "at batch 1 and 64 next to the parent's. Methods: int8-dynamic (Linear "
                       "weights int8), int8-static (Linear/Conv and activations int8, ranges "
                       "from training samples), prune (by magnitude, optionally fine-tuned), "
                       "distill (a smaller student trained on the model's soft targets), onnx "
                       "(a graph for onnxruntime, checked against torch). Without --method, "
                       "the steps of the compress: section of the spec the model trained "
                       "with. Aliases stay put.")
    p.add_argument("model", help="models:/NAME@ALIAS or models:/NAME/VERSION")
    p.add_argument("--method", default=None, choices=list(COMPRESS_METHODS),
                   help="default: the spec's compress: section")
    p.add_argument("--amount", type=float, default=None,
                   help="prune: share of weights (or, --structured, of neurons) removed "
                   "(default 0.5)")
    p.add_argument("--structured", action="store_true", default=None,
                   help="prune whole output neurons/channels (per layer, L2 norm)")
    p.add_argument("--finetune-epochs", type=int, default=None,
                   help="prune: epochs trained afterwards, pruned weights kept at zero "
                   "(default 0)")
    p.add_argument("--finetune-lr", type=float, default=None,
                   help="prune: the fine-tuning learning rate (default: optim.lr / 10)")
    p.add_argument("--calibration", type=int, default=None,
                   help="int8-static: training samples that set activation ranges "
                   "(default 512)")
    p.add_argument("--student", default=None, metavar="YAML",
                   help="distill: the student's model section, e.g. '{name: mlp, hidden: [32]}'")
    p.add_argument("--temperature", type=float, default=None,
                   help="distill: softmax temperature (default 4)")
    p.add_argument("--alpha", type=float, default=None,
                   help="distill: weight of the soft targets (default 0.7)")
    p.add_argument("--epochs", type=int, default=None,
                   help="distill: the student's epochs (default: the spec's train.epochs)")
    p.add_argument("--uri", default=None, help="tracking store (default: MLFLOW_TRACKING_URI "
                                               "or ./mlruns.db)")
    p.set_defaults(func=cmd_compress)
    return parser


def _address_arg(p: argparse.ArgumentParser) -> None:
    default = os.environ.get("RAY_ADDRESS", "")
    p.add_argument("--address", default=default if default.startswith("http") else
                   "http://127.0.0.1:8265",
                   help="Ray dashboard/Job API address (default $RAY_ADDRESS if it is an "
                   "http URL, else http://127.0.0.1:8265)")


def cmd_submit(args: argparse.Namespace) -> int:
    from atoll.cluster import jobs

    spec = _load(args)
    job_id = jobs.submit(spec, args.address)
    print(f"submitted: {job_id}  ({spec.name}, mode {spec.mode}) to {args.address}")
    print(f"follow it: atoll jobs logs {job_id} --follow --address {args.address}")
    if args.wait:
        final = jobs.wait(args.address, job_id)
        jobs.logs(args.address, job_id)
        print(f"job {job_id}: {final}")
        return 0 if final == "SUCCEEDED" else EXIT_FAILED
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from atoll.cluster import jobs

    if args.jobs_command == "list":
        for row in jobs.listing(args.address):
            print(f"{row['id']:<28} {row['status']:<10} {row['name']:<20} {row['entrypoint']}")
    elif args.jobs_command == "status":
        print(jobs.status(args.address, args.job_id))
    elif args.jobs_command == "logs":
        jobs.logs(args.address, args.job_id, follow=args.follow)
    else:
        print("stopped" if jobs.stop(args.address, args.job_id) else "not running")
    return 0


def _load(args: argparse.Namespace) -> ExperimentSpec:
    return load_spec(args.spec, args.overrides)


def cmd_validate(args: argparse.Namespace) -> int:
    spec = _load(args)
    if not args.quiet_ok:
        print(f"# {args.spec}: valid")
        print(spec.to_yaml(), end="")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    spec = _load(args)
    result = dispatch(spec, resume=args.resume, restart=args.restart)
    if result is not None:
        _report(spec, result)
    if result is not None and spec.compress:
        return _compress_after(spec, result.registered)
    return 0


def _compress_after(spec: ExperimentSpec, registered: Any) -> int:
    """The spec's compress: steps, on the version this run registered (none registered,
    e.g. tracking.enabled false for a quick try: said, and skipped)."""
    from atoll.tracking import resolve_uri
    from atoll.tracking.compress import CompressError, compress_registered

    if registered is None:
        print("atoll: compress: skipped, this run registered no model (it needs "
              "tracking.registered_model, tracking.enabled and tracking.log_model)",
              file=sys.stderr)
        return 0

    uri = f"models:/{registered.name}/{registered.version}"
    print(f"\ncompressing {uri} ({len(spec.compress)} step(s) of compress:)", flush=True)
    try:
        compress_registered(uri, registered.store or resolve_uri(spec.tracking.uri),
                            spec.compress, report=_report_compressed)
    except CompressError as e:  # the trained version (and any reported above) stay
        print(f"atoll: {e} (the trained model is registered: {uri})", file=sys.stderr)
        return EXIT_SPEC
    return 0


def dispatch(spec: ExperimentSpec, resume: str | None = None, restart: bool = False):
    """Run `spec` in its mode (-> RunResult | None). `restart` (`--restart`) discards an
    unfinished run's checkpoints first; every harness takes it as `restart=True`, passed
    only when set so that a harness's ordinary run needs no new parameter."""
    if resume is not None and restart:
        raise SpecError(["--restart: discards the checkpoints --resume asks to continue from; "
                         "allowed: one of --restart, --resume"])
    more = {"restart": True} if restart else {}
    if spec.project_dir is None:  # workers and clients import model.target from here too
        spec.project_dir = Path.cwd().resolve()
    if spec.continual.stream != "none" and spec.mode == "local":
        from atoll.core.continual_runner import run_continual

        return run_continual(spec, **more)
    if resume is not None and spec.mode != "federated":
        raise SpecError([f"--resume: applies to federated runs; a {spec.mode} run resumes by "
                         "re-running its name (train.resume); allowed: drop --resume"])
    if spec.mode == "local":
        from atoll.core.runner import run_local

        return run_local(spec, **more)
    if spec.mode == "federated":
        from atoll.federated.simulation import run_federated

        return run_federated(spec, resume=resume, **more)
    from atoll.cluster.runner import run_cluster

    return run_cluster(spec, **more)


def _report(spec: ExperimentSpec, result) -> None:
    m = result.metrics
    print(f"run: {spec.name}  mlflow run id: {result.run_id}")
    unit = "rounds" if spec.mode == "federated" else "epochs"
    params = f" ({result.parameters:,} parameters)" if result.parameters else ""
    print(f"model: {spec.model.label}{params}  {unit}: {result.epochs}  time: "
          f"{result.seconds:.1f}s")
    print("test: " + "  ".join(f"{k.removeprefix('test_')}={v:.4f}" for k, v in m.items()))
    if "matrix" in result.details:
        print("accuracy matrix R[i][j] (after task i, on task j):")
        for i, row in enumerate(result.details["matrix"]):
            print(f"  after T{i}: " + " ".join(f"{a:.3f}" for a in row))
    chosen = result.details.get("selected", {})
    if chosen.get("rule") == "best":
        print(f"weights: epoch {chosen['epoch']} of {result.epochs}, the best by "
              f"{chosen['metric']} (train.early_stopping.restore_best)")
    if result.registered is not None:
        r = result.registered
        print(f"registered: {r.name} version {r.version} as @{r.alias}  ({r.uri})")
    if result.checkpoint is not None:
        print(f"checkpoint: {result.checkpoint}")


def cmd_demo(args: argparse.Namespace) -> int:
    specs = [args.spec]
    if args.spec == str(DEMO_SPEC) and not args.local_only:
        specs += [str(DEMO_FEDERATED), str(DEMO_FCL), str(DEMO_POPULATION)]
    for i, path in enumerate(specs):
        spec = load_spec(path, args.overrides)
        print(f"\n== {spec.name}: {spec.mode} ({Path(path).name})", flush=True)
        result = dispatch(spec)
        _report(spec, result)
        if spec.compress:
            code = _compress_after(spec, result.registered)
            if code:
                return code
        if i + 1 < len(specs):
            print(flush=True)
    print("\nOpen the MLflow UI:  make ui   (or: atoll ui)  then browse http://127.0.0.1:5000")
    return 0


def _compress_step(args: argparse.Namespace) -> Any:
    """The one step the command line describes, or None for the spec's own section."""
    from pydantic import ValidationError

    from atoll.core.compress_spec import CompressStep

    given = {k: getattr(args, k) for k in ("amount", "structured", "finetune_epochs",
                                           "finetune_lr", "calibration", "student",
                                           "temperature", "alpha", "epochs")
             if getattr(args, k) is not None}
    if args.method is None:
        if given:
            flag = "--" + next(iter(given)).replace("_", "-")
            raise SpecError([f"{flag}: needs --method; allowed: --method "
                             f"{'|'.join(COMPRESS_METHODS)}, or no flags (the steps of the "
                             "spec's compress: section)"])
        return None
    if "student" in given:
        try:
            given["student"] = yaml.safe_load(given["student"])
        except yaml.YAMLError as e:
            raise SpecError([f"--student: not YAML ({first_line(e)}); allowed: a "
                             "model section, e.g. '{name: mlp, hidden: [32]}'"]) from None
    try:
        return CompressStep(method=args.method, **given)
    except ValidationError as e:
        err = e.errors()[0]
        # the step's own checks (no loc) name their field first too: "amount: ..."
        where, _, what = describe_error(err).partition(": ")
        what = what.removesuffix("; allowed: ")  # unknown key in a model section
        if where.startswith("student."):  # inside the model section, past the union's tag
            inner = ".".join(where.split(".")[2:])
            raise SpecError([f"--student: {inner + ': ' if inner else ''}{what}; e.g. "
                             "'{name: mlp, hidden: [32]}'"]) from None
        raise SpecError([f"--{where.replace('_', '-')}: {what}"]) from None


def cmd_compress(args: argparse.Namespace) -> int:
    from atoll.tracking import resolve_uri
    from atoll.tracking.compress import CompressError, compress_registered

    step = _compress_step(args)  # a bad flag: SpecError, exit 2 by main
    try:
        compress_registered(args.model, resolve_uri(args.uri),
                            None if step is None else [step], report=_report_compressed)
    except CompressError as e:
        print(f"atoll: {e}", file=sys.stderr)
        return EXIT_SPEC
    return 0


def _report_compressed(out: Any) -> None:
    m = out.metrics
    key = "test_r2" if "test_r2" in m else "test_accuracy"
    print(f"registered: {out.name} version {out.version} (compression={out.tag})  "
          f"models:/{out.name}/{out.version}")
    for label, p in (("parent", "parent_"), (out.tag, "")):
        print(f"  {label:<16} {key}={m[p + key]:.4f}  size={m[p + 'size_bytes'] / 1e3:.1f} kB "
              f"(zipped {m[p + 'size_bytes_zipped'] / 1e3:.1f} kB)  "
              f"p50 b1={m[p + 'latency_ms_p50_b1']:.3f} ms b64="
              f"{m[p + 'latency_ms_p50_b64']:.3f} ms  sparsity={m[p + 'sparsity']:.2f}")
    if "onnx_max_abs_diff" in m:
        print(f"  onnxruntime against torch: max |logit difference| {m['onnx_max_abs_diff']:.2e}")


def cmd_ui(args: argparse.Namespace) -> int:
    from atoll.tracking.uri import resolve_uri

    uri = args.uri or resolve_uri(None)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
           "--host", args.host, "--port", str(args.port), "--workers", "1"]
    if uri.startswith("sqlite:///"):
        root = Path(uri[len("sqlite:///"):]).parent / "mlartifacts"
        cmd += ["--default-artifact-root", root.resolve().as_uri()]
    print(f"MLflow UI for {uri} at http://{args.host}:{args.port}  (Ctrl-C to stop)")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.execv(sys.executable, cmd)  # replaces this process: Ctrl-C goes straight to MLflow
    return 0  # pragma: no cover


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if not args.verbose:  # atoll's own progress stays; the libraries' INFO chatter goes
        for name in LIBRARY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        for name in QUIETED_WARNINGS:
            for category in (FutureWarning, DeprecationWarning):
                warnings.filterwarnings("ignore", category=category, module=rf"{name}(\.|$)")
        # flwr-datasets narrates its Dirichlet resampling as warnings
        warnings.filterwarnings("ignore", module=r"flwr_datasets(\.|$)")
        # MLflow resets its logger's level when imported, here and in workers/ServerApps
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        # MLflow draws a bar for every artifact it downloads (a model validated at logging)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # `kill PID` stops a run like Ctrl-C does; and SIGINT is Ctrl-C even when inherited as
    # ignored (a job started in a script's background): Python leaves an ignored SIGINT
    # ignored, and the run would go on
    interrupts.reset()
    signal.signal(signal.SIGTERM, interrupts.handle)
    signal.signal(signal.SIGINT, interrupts.handle)
    try:
        return args.func(args)
    except SpecError as e:
        for line in e.problems:
            print(f"atoll: {line}", file=sys.stderr)
        return EXIT_SPEC
    except ValueError as e:
        if "allowed" not in str(e):
            raise
        print(f"atoll: {e}", file=sys.stderr)  # configuration found wrong while building
        return EXIT_SPEC
    except KeyboardInterrupt as e:  # the harness says how to resume, when it can
        print(f"atoll: interrupted; {e}" if str(e) else "atoll: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if interrupts.stopped_by(e):  # Ctrl-C that a library turned into its own error
            print("atoll: interrupted", file=sys.stderr)
            return 130
        known = _known_failure(e)
        if known is None:
            raise
        print(f"atoll: error: {known}", file=sys.stderr)
        return EXIT_SPEC if type(e).__name__ in SETTING_FAILURES else EXIT_FAILED


def _known_failure(e: Exception) -> str | None:
    """A one-line message for failures with a defined behaviour; None means a real bug."""
    names = {"RunFailed", "TrackingUnavailable", "DataUnavailable", "CheckpointError",
             "JobsUnavailable", "NothingToRegister", *SETTING_FAILURES}
    return str(e) if type(e).__name__ in names else None


if __name__ == "__main__":
    sys.exit(main())
