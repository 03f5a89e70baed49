"""atoll's training loop vs a plain PyTorch loop: throughput on GPUs, alive on CPU.

Both sides train the same zoo model (a CIFAR-style ResNet, a ViT-style transformer) on the
same synthetic batches, already on the device, so data loading is not measured:

- atoll: `cluster.parallel.build` (DDP or FSDP2, `compile` for DDP, bf16 precision),
  `core.optim.build_optimizer` (AdamW, fused where atoll fuses it) and
  `core.loop.train_epoch` with bf16 autocast, its deferred non-finite guard and its
  per-`log_every_n_steps` host read, as a cluster worker runs them;
- plain: the model wrapped by hand in torch's DDP or `fully_shard`, `torch.compile` when
  asked, `torch.autocast(bf16)`, fused AdamW and a bare `loss.backward(); opt.step();
  opt.zero_grad()` loop with no host sync. Its numerics mirror atoll's: SyncBatchNorm under
  DDP on GPUs, FSDP2's bf16 MixedPrecisionPolicy with fp32 gradient reduction.

One process per GPU (`torch.multiprocessing.spawn`, nccl), or `--world` gloo ranks on a
CPU (1 by default). In each case (model × strategy × compile) both sides are built in the
same processes, warmed up (compilation included), then timed in alternating rounds
(atoll-plain, plain-atoll, ...) so machine noise hits both. Figures from rank 0:

- samples/s: the global batch × timed steps ÷ the round's wall time (device synchronised
  at both ends); the median over rounds.
- step ms: the median step time, from a CUDA event (CPU: a clock read) recorded as each
  batch is taken — no sync inside the round.
- peak MiB: CUDA: the side's own memory at its peak (`max_memory_allocated` in its rounds
  less what is not its own: the shared batches and the other side, as both live in one
  process to alternate); CPU: the process's peak RSS during the side's rounds (Linux's
  resettable VmHWM, else `getrusage`), interpreter and torch included.
- MFU: the FLOPs of one forward+backward per sample (`FlopCounterMode`, optimizer left
  out) × samples/s ÷ (ranks × peak FLOP/s: bf16 dense, by GPU name, or `--peak-tflops`);
  "n/a" on CPU unless `--peak-tflops` is given.

CPU runs fp32 (bf16 only on CUDA) and skips compilation unless `--compile` asks for it;
atoll compiles only under DDP, so FSDP2 cases run eager. The last line printed is
`ratio: X`: atoll's samples/s ÷ plain's in the headline case (the first model, the first
strategy, eager). A soft time limit skips cases that would not fit; a hard one ends the
ranks, so the run cannot hang.

    .venv/bin/python benchmarks/gpu_throughput.py              # CUDA: all GPUs; CPU: tiny
    .venv/bin/python benchmarks/gpu_throughput.py --smoke      # the tiniest (CI)
    .venv/bin/python benchmarks/gpu_throughput.py --models transformer --compile on
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

Batch = tuple[torch.Tensor, torch.Tensor]

# bf16 dense peak FLOP/s per GPU, by a part of torch.cuda.get_device_name (first match)
PEAK_BF16 = (("H100 PCIe", 756e12), ("H200", 989e12), ("H100", 989e12), ("A100", 312e12))
POOL = 4  # distinct batches per rank, cycled
SEED = 0
LR = 1e-3


@dataclass(frozen=True)
class Setting:
    """A model of the zoo and the synthetic images it trains on (per rank)."""

    spec: dict[str, Any]  # atoll.core.model_spec fields
    shape: tuple[int, int, int]
    batch: int
    classes: int = 100


@dataclass(frozen=True)
class Plan:
    """How long each side runs per case: warm-up steps, then rounds of timed steps."""

    settings: dict[str, Setting]
    warmup: int
    rounds: int
    steps: int


# resnet-20 at width 64 (4.3M params) and a 6-layer, 384-wide ViT over 256 patches + a
# class token: small enough for a compile each within the time limit, big enough to keep
# an H200 busy at these batches
CUDA = Plan({"resnet": Setting({"name": "resnet", "depth": 20, "width": 64}, (3, 64, 64), 256),
             "transformer": Setting({"name": "transformer", "dim": 384, "heads": 6,
                                     "layers": 6, "patch_size": 4}, (3, 64, 64), 128)},
            warmup=5, rounds=3, steps=20)
CPU = Plan({"resnet": Setting({"name": "resnet", "depth": 8, "width": 8}, (3, 16, 16), 16),
            "transformer": Setting({"name": "transformer", "dim": 32, "heads": 2, "layers": 2,
                                    "patch_size": 4}, (3, 16, 16), 16)},
           warmup=2, rounds=4, steps=8)
SMOKE = Plan({"resnet": Setting({"name": "resnet", "depth": 8, "width": 4}, (3, 8, 8), 8, 10),
              "transformer": Setting({"name": "transformer", "dim": 16, "heads": 2,
                                      "layers": 1, "patch_size": 4}, (3, 8, 8), 8, 10)},
             warmup=1, rounds=2, steps=3)


@dataclass(frozen=True)
class Case:
    model: str
    strategy: str
    compiled: bool

    @property
    def label(self) -> str:
        return f"{self.model} {self.strategy} compile {'on' if self.compiled else 'off'}"


@dataclass
class Config:
    """What every rank needs (picklable: it crosses `mp.spawn`)."""

    cases: list[Case]
    plan: Plan
    world: int
    cuda: bool
    start: float  # time.time() at launch: the time limits count from there
    soft_limit: float
    pg_timeout: float
    rendezvous: str
    out: str
    threads: int


@dataclass
class Side:
    samples_per_s: list[float] = field(default_factory=list)  # per round
    step_ms: list[float] = field(default_factory=list)  # every timed step
    peak_mib: float = 0.0


# ---------------------------------------------------------------- measuring


class Timed:
    """`steps` batches cycled from `pool`; marks the clock as each batch is taken and once
    after the last step (CUDA events: no host sync inside a round)."""

    def __init__(self, pool: list[Batch], steps: int, cuda: bool):
        self.pool, self.steps, self.cuda = pool, steps, cuda
        self.marks: list[Any] = []

    def __len__(self) -> int:
        return self.steps

    def _mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def __iter__(self) -> Iterator[Batch]:
        self.marks = []
        for i in range(self.steps):
            self.marks.append(self._mark())
            yield self.pool[i % len(self.pool)]
        self.marks.append(self._mark())

    def step_ms(self) -> list[float]:
        """Per-step times; the device must be synchronised first."""
        pairs = zip(self.marks, self.marks[1:], strict=False)
        if self.cuda:
            return [a.elapsed_time(b) for a, b in pairs]
        return [(b - a) * 1e3 for a, b in pairs]


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def _reset_peak(cuda: bool) -> None:
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError):  # Linux >= 4.0: "5" resets the RSS high-water mark
        Path("/proc/self/clear_refs").write_text("5")


def _peak_mib(cuda: bool) -> float:
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**20
    with contextlib.suppress(OSError, StopIteration, ValueError):
        line = next(ln for ln in Path("/proc/self/status").read_text().splitlines()
                    if ln.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _allocated(cuda: bool) -> float:
    return torch.cuda.memory_allocated() / 2**20 if cuda else 0.0


def _flops_per_step(make: Callable[[], nn.Module], batch: Batch, device: torch.device,
                    amp: torch.dtype | None) -> float:
    """FLOPs of one forward+backward of one rank's batch (the optimizer's are left out)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(SEED)
    model = make().to(device)
    x, y = batch
    ctx = torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()
    with FlopCounterMode(display=False) as counter:
        with ctx:
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
    return float(counter.get_total_flops())


# ---------------------------------------------------------------- the two sides


class Atoll:
    """atoll's layout, optimizer and loop."""

    def __init__(self, case: Case, make: Callable[[], nn.Module], device: torch.device,
                 amp: torch.dtype | None):
        from atoll.cluster.parallel import build
        from atoll.core.loop import LoopConfig, TrainState
        from atoll.core.optim import build_optimizer
        from atoll.core.spec import OptimSpec, TrainSpec

        torch.manual_seed(SEED)
        self.layout = build(case.strategy, make, device, compile=case.compiled, precision=amp)
        self.opt = build_optimizer(self.layout.model.parameters(),
                                   OptimSpec(name="adamw", lr=LR))
        # the spec's own default interval: what a user's run reads on the host
        self.cfg = LoopConfig(autocast_dtype=amp, progress="off",
                              log_every_n_steps=TrainSpec().log_every_n_steps)
        self.state = TrainState()
        self.loss = nn.CrossEntropyLoss()

    def run(self, batches: Timed) -> None:
        from atoll.core.loop import train_epoch

        train_epoch(self.layout.model, batches, self.opt, self.loss, self.cfg, self.state,
                    reduce=self.layout.reduce, no_sync=self.layout.no_sync)


class Plain:
    """What a PyTorch user writes by hand for the same training."""

    def __init__(self, case: Case, make: Callable[[], nn.Module], device: torch.device,
                 amp: torch.dtype | None):
        torch.manual_seed(SEED)
        model = make().to(device)
        if case.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            if device.type == "cuda":  # global-batch statistics, as atoll's DDP keeps them
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mesh = init_device_mesh(device.type, (dist.get_world_size(),))
            policy = MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32) \
                if amp else MixedPrecisionPolicy()
            for child in model.children():
                if any(True for _ in child.parameters()):
                    fully_shard(child, mesh=mesh, mp_policy=policy)
            fully_shard(model, mesh=mesh, mp_policy=policy)
        self.opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=True)
        self.model = torch.compile(model) if case.compiled else model
        self.model.train()
        self.device, self.amp = device.type, amp

    def run(self, batches: Timed) -> None:
        model, opt = self.model, self.opt
        for x, y in batches:
            if self.amp is not None:
                with torch.autocast(self.device, dtype=self.amp):
                    loss = F.cross_entropy(model(x), y)
            else:
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)


# ---------------------------------------------------------------- one rank


def _pool(setting: Setting, device: torch.device, rank: int) -> list[Batch]:
    g = torch.Generator().manual_seed(SEED + rank)  # each rank its own samples
    return [(torch.randn(setting.batch, *setting.shape, generator=g).to(device),
             torch.randint(0, setting.classes, (setting.batch,), generator=g).to(device))
            for _ in range(POOL)]


def _run_case(case: Case, cfg: Config, device: torch.device, rank: int) -> dict[str, Any]:
    from atoll.core.model_spec import ResnetSpec, TransformerSpec
    from atoll.models import build_model

    setting = cfg.plan.settings[case.model]
    spec = (ResnetSpec if case.model == "resnet" else TransformerSpec)(**setting.spec)

    def make() -> nn.Module:  # FSDP2's atoll side calls it on the meta device
        return build_model(spec, setting.shape, setting.classes)

    amp = torch.bfloat16 if cfg.cuda else None
    pool = _pool(setting, device, rank)
    flops = _flops_per_step(make, pool[0], device, amp) if rank == 0 else 0.0
    _sync(cfg.cuda)
    before = _allocated(cfg.cuda)
    sides: dict[str, Any] = {}
    held: dict[str, float] = {}
    for name, cls in (("atoll", Atoll), ("plain", Plain)):  # each warmed up once built
        sides[name] = cls(case, make, device, amp)
        sides[name].run(Timed(pool, cfg.plan.warmup, cfg.cuda))
        _sync(cfg.cuda)
        held[name] = _allocated(cfg.cuda) - before - sum(held.values())
    figures = {name: Side() for name in sides}
    for r in range(cfg.plan.rounds):
        for name in ("atoll", "plain") if r % 2 == 0 else ("plain", "atoll"):
            timed = Timed(pool, cfg.plan.steps, cfg.cuda)
            _sync(cfg.cuda)
            _reset_peak(cfg.cuda)
            # CUDA: what is not this side's own (the batches, the other side) is left out
            others = _allocated(cfg.cuda) - held[name]
            t0 = time.perf_counter()
            sides[name].run(timed)
            _sync(cfg.cuda)
            seconds = time.perf_counter() - t0
            f = figures[name]
            f.samples_per_s.append(cfg.plan.steps * setting.batch * cfg.world / seconds)
            f.step_ms.extend(timed.step_ms())
            f.peak_mib = max(f.peak_mib, _peak_mib(cfg.cuda) - others)
    return {"flops_per_step": flops, "batch": setting.batch, "held_mib": held,
            "sides": {k: asdict(v) for k, v in figures.items()}}


def _agree(flag: bool, device: torch.device) -> bool:
    """Rank 0's decision, on every rank."""
    t = torch.tensor([float(flag)], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def _rank(rank: int, cfg: Config) -> None:
    """One spawned rank: every case in order; rank 0 appends each result to `cfg.out`."""
    device = torch.device("cuda", rank) if cfg.cuda else torch.device("cpu")
    if cfg.cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(cfg.threads)
    extra = {"device_id": device} if cfg.cuda else {}
    dist.init_process_group("nccl" if cfg.cuda else "gloo", init_method=cfg.rendezvous,
                            rank=rank, world_size=cfg.world,
                            timeout=datetime.timedelta(seconds=cfg.pg_timeout), **extra)
    try:
        for i, case in enumerate(cfg.cases):
            margin = 100.0 if case.compiled else 25.0  # about what one case can take
            late = time.time() - cfg.start > cfg.soft_limit - margin
            result: dict[str, Any] = {"case": asdict(case)}
            t0 = time.perf_counter()
            if _agree(late, device):
                result["status"] = "skipped (time limit)"
            else:
                try:
                    result.update(_run_case(case, cfg, device, rank), status="ok")
                except Exception as e:  # noqa: BLE001 - the other cases still run
                    if rank == 0:
                        traceback.print_exc()
                    result["status"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
                if case.compiled:
                    torch._dynamo.reset()
                gc.collect()  # DDP/FSDP hold cycles: the next case starts with their memory free
                if cfg.cuda:
                    torch.cuda.empty_cache()
            if rank == 0:
                result["device"] = torch.cuda.get_device_name(device) if cfg.cuda else "cpu"
                with open(cfg.out, "a") as f:
                    f.write(json.dumps(result) + "\n")
                print(f"[{i + 1}/{len(cfg.cases)}] {case.label}: {result['status']} "
                      f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    finally:
        dist.destroy_process_group()
    # as atoll.cluster.gloo.spawned_rank: leave without finalising (gloo's threads can abort
    # an exiting interpreter); Inductor's compile workers are ended first
    with contextlib.suppress(Exception):
        from torch._inductor.async_compile import shutdown_compile_workers

        shutdown_compile_workers()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---------------------------------------------------------------- the launcher


def _peak_flops(device: str, given: float | None) -> float | None:
    if given is not None:
        return given * 1e12
    return next((v for k, v in PEAK_BF16 if k in device), None)


def _report(results: list[dict[str, Any]], cfg: Config, peak_tflops: float | None) -> float:
    """Print the table; returns the headline case's ratio (NaN if it did not finish)."""
    device = results[0]["device"] if results else "?"
    peak = _peak_flops(device, peak_tflops) if (cfg.cuda or peak_tflops) else None
    precision = "bf16 autocast" if cfg.cuda else "fp32 (bf16 is used on CUDA only)"
    print(f"\natoll vs plain PyTorch on {cfg.world} rank(s) of {device} "
          f"({'nccl' if cfg.cuda else 'gloo'}), {precision}; peak "
          f"{f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown (MFU n/a)'}")
    print(f"per case: {cfg.plan.warmup} warm-up steps per side, then {cfg.plan.rounds} "
          f"alternating rounds of {cfg.plan.steps} timed steps")
    for name, s in cfg.plan.settings.items():
        if any(c.model == name for c in cfg.cases):
            print(f"  {name}: {s.spec} on {s.shape}, {s.batch} per rank")
    print(f"\n{'side':6} {'model':12} {'strategy':8} {'compile':7} {'samples/s':>11} "
          f"{'step ms':>9} {'peak MiB':>9} {'MFU':>7} {'atoll/plain':>11}")
    headline = math.nan
    for i, r in enumerate(results):
        case = Case(**r["case"])
        lead = f"{case.model:12} {case.strategy:8} {'on' if case.compiled else 'off':7}"
        if r["status"] != "ok":
            print(f"{'-':6} {lead} {r['status']}")
            continue
        s = r["sides"]
        tput = {k: statistics.median(v["samples_per_s"]) for k, v in s.items()}
        ratio = tput["atoll"] / tput["plain"]
        if i == 0:
            headline = ratio
        per_sample = r["flops_per_step"] / r["batch"]
        for name in ("atoll", "plain"):
            mfu = f"{100 * per_sample * tput[name] / (cfg.world * peak):.1f}%" if peak else "n/a"
            print(f"{name:6} {lead} {tput[name]:11.1f} "
                  f"{statistics.median(s[name]['step_ms']):9.2f} {s[name]['peak_mib']:9.1f} "
                  f"{mfu:>7} {f'{ratio:.3f}' if name == 'atoll' else '':>11}")
    flops = {r["case"]["model"]: r["flops_per_step"] / r["batch"] for r in results
             if r["status"] == "ok"}
    if flops:
        print("model FLOPs per sample, forward+backward: " + ", ".join(
            f"{k} {v / 1e9:.4g} GFLOP" for k, v in flops.items()))
    if results:
        print(f"headline: {Case(**results[0]['case']).label}")
    return headline


def _cases(models: list[str], strategies: list[str], compile_modes: list[bool]) -> list[Case]:
    """Eager cases first (the first is the headline), then compiled ones (DDP only)."""
    return [Case(m, s, c) for c in compile_modes for m in models for s in strategies
            if not (c and s == "fsdp")]


def _csv(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r}; allowed: a comma list of "
                                             f"{', '.join(choices)}")
        return items
    return parse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=_csv(("resnet", "transformer")),
                    help="default: resnet,transformer (--smoke: resnet)")
    ap.add_argument("--strategies", type=_csv(("ddp", "fsdp")), default=["ddp", "fsdp"],
                    help="default: ddp,fsdp")
    ap.add_argument("--compile", nargs="?", const="both", choices=("off", "on", "both"),
                    help="default: both on CUDA, off on CPU and with --smoke; a bare "
                    "--compile is both")
    ap.add_argument("--world", type=int, help="ranks (default: every visible GPU, 1 on CPU)")
    ap.add_argument("--batch", type=int, help="per-rank batch of every model")
    ap.add_argument("--steps", type=int, help="timed steps per round")
    ap.add_argument("--rounds", type=int, help="timed rounds per side")
    ap.add_argument("--warmup", type=int, help="untimed steps per side first")
    ap.add_argument("--smoke", action="store_true", help="the tiniest setting (CI)")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even with CUDA")
    ap.add_argument("--peak-tflops", type=float, help="per-device peak for MFU")
    ap.add_argument("--time-limit", type=float, default=270.0,
                    help="seconds: later cases are skipped when they would not fit, and the "
                    "ranks are ended at this limit (default 270)")
    ap.add_argument("--pg-timeout", type=float, default=180.0,
                    help="seconds for process-group init and each collective")
    ap.add_argument("--json", type=Path, help="also write every figure (per round, per step) "
                    "to this file")
    args = ap.parse_args()

    start = time.time()
    cuda = torch.cuda.is_available() and not args.cpu
    world = args.world or (torch.cuda.device_count() if cuda else 1)
    if world < 1 or (cuda and world > torch.cuda.device_count()):
        ap.error(f"--world {world}; allowed: 1..{torch.cuda.device_count() if cuda else 'n'}")
    plan = SMOKE if args.smoke else CUDA if cuda else CPU
    if args.batch:
        plan = replace(plan, settings={k: replace(s, batch=args.batch)
                                       for k, s in plan.settings.items()})
    plan = replace(plan, warmup=args.warmup if args.warmup is not None else plan.warmup,
                   rounds=args.rounds or plan.rounds, steps=args.steps or plan.steps)
    mode = args.compile or ("both" if cuda and not args.smoke else "off")
    models = args.models or (["resnet"] if args.smoke else ["resnet", "transformer"])
    cases = _cases(models, args.strategies,
                   {"off": [False], "on": [True], "both": [False, True]}[mode])
    work = Path(tempfile.mkdtemp(prefix="atoll-bench-gpu-"))
    cfg = Config(cases=cases, plan=plan, world=world, cuda=cuda, start=start,
                 soft_limit=args.time_limit - 10, pg_timeout=args.pg_timeout,
                 rendezvous=f"file://{work / 'rdzv'}", out=str(work / "results.jsonl"),
                 threads=max(1, (os.cpu_count() or 1) // world))
    print(f"{len(cases)} case(s) on {world} rank(s), {'CUDA' if cuda else 'CPU'}",
          file=sys.stderr, flush=True)

    ctx = mp.spawn(_rank, args=(cfg,), nprocs=world, join=False)
    error, hung = None, False
    try:
        while not ctx.join(timeout=1):
            if time.time() - start > args.time_limit:
                hung = True
                for p in ctx.processes:  # only the ranks this run started
                    if p.is_alive():
                        p.kill()
                        p.join(10)
                break
    except mp.ProcessException as e:  # join has ended the other ranks
        error = e
        print(e, file=sys.stderr)
    out = Path(cfg.out)
    results = [json.loads(line) for line in out.read_text().splitlines()] \
        if out.exists() else []
    shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps({"config": asdict(cfg), "results": results}, indent=1))
    ratio = _report(results, cfg, args.peak_tflops)
    if hung:
        print(f"stopped: the time limit ({args.time_limit:.0f} s) ended the ranks")
    if error is not None:
        print(f"stopped: a rank failed: {str(error).strip().splitlines()[-1]}")
    if not math.isfinite(ratio):
        print("no ratio: the headline case did not finish", file=sys.stderr)
        sys.exit(1)
    print(f"ratio: {ratio:.3f}", flush=True)
    if hung or error is not None:
        sys.exit(1)


if __name__ == "__main__":
    main()
