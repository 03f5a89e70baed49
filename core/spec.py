"""The experiment spec: one validated pydantic model that travels to every harness.

A spec is a YAML file plus `--set a.b=c` overrides. Every problem is reported before any
work starts, one line each (`field: value ... allowed`), so a user fixes a file in one go.
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from atoll.core import cadence
from atoll.core.compress_spec import CompressStep
from atoll.core.model_spec import (
    BUILTIN_MODELS,
    MODEL_SECTIONS,
    MlpSpec,
    ModelSpec,
    TransformerSpec,
    one_of,
    target_syntax,
)

# Registry names are listed here (not imported from models/ or core.data) so that
# `atoll validate` stays instant; tests/unit/test_registries.py keeps them in sync.
DATASETS = ("digits", "synthetic", "mnist", "fashion-mnist", "cifar10")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("none", "step", "cosine", "linear")
STRATEGIES = ("naive", "joint", "ewc", "replay", "si", "lwf", "agem")
CLASS_METRICS = ("val_accuracy", "val_precision", "val_recall", "val_f1", "train_accuracy")
REGRESSION_METRICS = ("val_mae", "val_rmse", "val_r2")
EPOCH_METRICS = ("val_loss", "val_accuracy", "val_precision", "val_recall", "val_f1",
                 "val_mae", "val_rmse", "val_r2",
                 "train_loss", "train_accuracy")
# Per-sample input shapes of the built-in datasets, so shape errors surface at validation.
IMAGE_SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28),
                "cifar10": (3, 32, 32)}
# URI schemes MLflow can track to (a `+driver` suffix such as postgresql+psycopg2 is fine);
# anything else fails deep inside MLflow, so the spec refuses it up front.
TRACKING_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql",
                    "databricks", "databricks-uc")

Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]


class SpecError(ValueError):
    """A spec that cannot run; `problems` holds one human-readable line per fault."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class _Section(BaseModel):
    # allow_inf_nan=False: `lr: .inf` or `--set optim.lr=nan` satisfy every `gt`/`ge` bound
    # and would only fail as a NaN loss mid-run; no float field of a spec means infinity.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class AugmentSpec(_Section):
    """Training-time augmentation for image datasets; off unless a field is non-zero."""

    shift: int = Field(0, ge=0, le=8, description="max random shift in pixels (pad + crop)")
    noise_std: float = Field(0.0, ge=0.0, description="std of additive Gaussian noise")


class SyntheticSpec(_Section):
    """Shape of the seeded `synthetic` dataset (a Gaussian-cluster classification task)."""

    n_samples: int = Field(2000, ge=10)
    n_features: int = Field(20, ge=1)
    n_classes: int = Field(4, ge=2)
    class_sep: float = Field(1.5, gt=0.0)


# the fields of a user's data each format reads (the rest must stay unset)
_TABLE = frozenset({"path", "label", "features", "categorical", "categorical_encoding",
                    "embedding_dim"})
STREAM_FORMATS = ("csv", "parquet", "imagefolder")  # read by Ray Data (cluster/streaming.py)
FORMAT_FIELDS = {"csv": _TABLE, "parquet": _TABLE, "npz": frozenset({"path"}),
                 "imagefolder": frozenset({"path", "image_size", "channels"}),
                 "hf-disk": _TABLE | {"image_size", "channels"},
                 "python": frozenset({"target", "kwargs"})}


class DataSpec(_Section):
    """A built-in dataset by `name`, or the user's own data by `format` + `path` (or
    `target` for `python`): tables, image folders, arrays, a saved Hugging Face dataset."""

    format: Literal["builtin", "csv", "parquet", "npz", "imagefolder", "hf-disk", "python"] = \
        Field("builtin", description="builtin: data.name; otherwise data.path (or data.target)")
    name: str = Field("digits", description=f"builtin: one of {', '.join(DATASETS)}; "
                      "other formats: a label (default: the path's name)")
    path: Path | None = Field(None, description="file or folder (relative: to project_dir); a "
                              "folder may hold train/val/test splits")
    label: str = Field("label", description="csv/parquet/hf-disk: the label column")
    features: list[str] | None = Field(None, description="csv/parquet/hf-disk: feature "
                                       "columns; default: every column but the label")
    categorical: list[str] = Field([], description="csv/parquet/hf-disk: columns of "
                                   "categories (from the whole table), encoded as "
                                   "data.categorical_encoding says")
    categorical_encoding: Literal["onehot", "embedding"] = Field(
        "onehot", description="onehot: a 0/1 column per category; embedding: a learned "
        "vector per category, in front of the model (for columns with many categories)")
    embedding_dim: int | None = Field(None, ge=1, description="embedding: the vector size of "
                                      "every column; default min(16, (categories + 1) // 2)")
    image_size: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] | None = Field(
        None, description="imagefolder/hf-disk images: resize to (height, width)")
    channels: Literal[1, 3] | None = Field(
        None, description="images: 1 (grey) or 3 (RGB); default: 1 when every image is grey")
    target: str | None = Field(None, description="python: package.module:factory returning "
                               "datasets or (x, y) arrays, one or a dict of train/val/test")
    kwargs: dict[str, Any] = Field({}, description="python: keyword arguments for data.target")
    data_dir: Path | None = Field(None, description="local files (IDX .gz, CIFAR batches)")
    cache_dir: Path = Field(Path(".atoll/data"), description="where downloads are stored")
    download: bool = Field(True, description="download missing files (with SHA-256 check)")
    mirror: str | None = Field(None, description="base URL replacing the default source")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    batch_size: int = Field(64, ge=1, description="per-process (per-rank) batch size")
    eval_batch_size: int = Field(512, ge=1)
    normalize: bool = True
    limit: int | None = Field(None, ge=1, description="cap on training samples (smoke runs)")
    streaming: bool | Literal["auto"] = Field(
        "auto", description="csv/parquet/imagefolder read piece by piece, never whole: Ray "
        "Data into Ray Train workers (cluster), DataLoader workers (local); auto: when the "
        "files pass 1 GiB")
    workers: int = Field(2, ge=0, description="local streamed data: DataLoader worker "
                         "processes (0: read in the training process)")
    augment: AugmentSpec = AugmentSpec()
    synthetic: SyntheticSpec = SyntheticSpec()

    _target_syntax = field_validator("target")(target_syntax)

    @model_validator(mode="after")
    def _source(self) -> DataSpec:
        own = {"path", "label", "features", "categorical", "categorical_encoding",
               "embedding_dim", "image_size", "channels", "target", "kwargs"}
        if self.format == "builtin":
            if self.name not in DATASETS:
                try:
                    one_of(self.name, DATASETS)
                except ValueError as e:
                    raise ValueError(f"data.name: {self.name!r} is not a built-in dataset; {e}"
                                     "; or your own data with data.format and data.path"
                                     ) from None
            stray = sorted(f for f in own if getattr(self, f) !=
                           type(self).model_fields[f].get_default())
            if stray:
                raise ValueError(f"data.{stray[0]}: set, but data.format is 'builtin' (data.name "
                                 f"{self.name!r}); allowed: data.format csv, parquet, npz, "
                                 "imagefolder, hf-disk or python for your own data")
            return self
        reads = FORMAT_FIELDS[self.format]
        stray = sorted(f for f in own - reads if getattr(self, f) !=
                       type(self).model_fields[f].get_default())
        if stray:
            raise ValueError(f"data.{stray[0]}: set, but data.format {self.format!r} does not "
                             f"read it; allowed with {self.format}: {', '.join(sorted(reads))}")
        for name in ("features", "categorical"):
            given = getattr(self, name) or []
            if getattr(self, name) == [] and name == "features":
                raise ValueError("data.features: [] lists no column; allowed: at least one, or "
                                 "leave it out for every column but the label")
            twice = sorted({c for c in given if given.count(c) > 1})
            if twice:
                raise ValueError(f"data.{name}: {twice[0]!r} is listed twice; allowed: distinct "
                                 "columns")
        if self.format == "python":
            if self.target is None:
                raise ValueError("data.target: required with data.format 'python'; allowed: "
                                 "'package.module:factory'")
        elif self.path is None:
            raise ValueError(f"data.path: required with data.format {self.format!r}; allowed: "
                             "a file or folder, relative to the project or absolute")
        if self.target is not None and self.format != "python":
            raise ValueError(f"data.target: set, but data.format is {self.format!r}; allowed: "
                             "data.format python")
        if "name" not in self.model_fields_set:  # a label for runs and plots
            self.name = Path(self.path).stem if self.path else self.target.split(":")[-1]
        if self.label in self.categorical or (self.features and self.label in self.features):
            raise ValueError(f"data.label: {self.label!r} is also listed as a feature; "
                             "allowed: a column that is only the label")
        if self.categorical_encoding == "embedding" and not self.categorical:
            raise ValueError("data.categorical_encoding: 'embedding', but data.categorical "
                             "lists no column; allowed: list the columns to embed, or onehot")
        if self.embedding_dim is not None and self.categorical_encoding != "embedding":
            raise ValueError(f"data.embedding_dim: {self.embedding_dim} is set, but "
                             f"data.categorical_encoding is {self.categorical_encoding!r}; "
                             "allowed: data.categorical_encoding: embedding")
        if self.features is not None:
            missing = sorted(set(self.categorical) - set(self.features))
            if missing:
                raise ValueError(f"data.categorical: {missing[0]!r} is not in data.features; "
                                 "allowed: columns among data.features")
        return self

    @model_validator(mode="after")
    def _fractions(self) -> DataSpec:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:g} "
                "leaves no training data; allowed: a sum below 1"
            )
        return self


class SchedulerSpec(_Section):
    name: str = Field("none", description=f"one of {', '.join(SCHEDULERS)}")
    warmup_epochs: float = Field(0.0, ge=0.0, description="linear warm-up before the schedule")
    step_epochs: int = Field(10, ge=1, description="step: decay every N epochs")
    gamma: float = Field(0.1, gt=0.0, le=1.0, description="step: decay factor")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="cosine/linear floor")

    @field_validator("name")
    @classmethod
    def _known_scheduler(cls, v: str) -> str:
        return one_of(v, SCHEDULERS)


class OptimSpec(_Section):
    name: str = Field("adam", description=f"one of {', '.join(OPTIMIZERS)}")
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="sgd only")
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = Field(None, gt=0.0, description="max global grad norm")
    scheduler: SchedulerSpec = SchedulerSpec()

    @field_validator("name")
    @classmethod
    def _known_optimizer(cls, v: str) -> str:
        return one_of(v, OPTIMIZERS)

    @model_validator(mode="after")
    def _nesterov(self) -> OptimSpec:
        if self.nesterov and (self.name != "sgd" or self.momentum == 0):
            raise ValueError("nesterov needs name: sgd with momentum > 0")
        return self


class EarlyStoppingSpec(_Section):
    metric: str = Field("val_loss", description="a validation metric, e.g. val_accuracy")
    mode: Literal["min", "max"] = "min"
    patience: int = Field(0, ge=0, description="epochs without improvement; 0 disables")
    min_delta: float = Field(0.0, ge=0.0)
    restore_best: bool = Field(
        True, description="with patience > 0: end with (test, register) the best epoch's "
                          "weights by `metric`, not the last epoch's")

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        return one_of(v, EPOCH_METRICS)


class LossSpec(_Section):
    name: Literal["auto", "cross_entropy", "focal", "mse", "huber"] = Field(
        "auto", description="auto: cross_entropy for classification, mse for regression")
    huber_delta: float = Field(1.0, gt=0.0, description="huber: where the loss turns linear")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    focal_gamma: float = Field(2.0, ge=0.0)
    class_weights: Literal["none", "balanced"] | list[Annotated[float, Field(ge=0.0)]] = "none"


class TrainSpec(_Section):
    epochs: int = Field(10, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPU")
    grad_accum_steps: int = Field(1, ge=1)
    log_every_n_steps: int = Field(10, ge=1)
    loss: LossSpec = LossSpec()
    early_stopping: EarlyStoppingSpec = EarlyStoppingSpec()
    checkpoint_dir: Path = Field(Path(".atoll/checkpoints"), description="per-run subdirectory")
    keep_checkpoints: int = Field(2, ge=1)
    checkpoint_every: str = Field(
        "auto", description="'N epochs' or 'M minutes' (at epoch ends; the last epoch "
                            "always; streams: every task); auto: every epoch locally, every "
                            "minute in cluster mode unless a best epoch is selected")
    resume: bool = Field(True, description="continue from the latest checkpoint of `name`")
    progress: Literal["auto", "bar", "log", "off"] = "auto"
    threads: int | None = Field(None, ge=1, description="torch intra-op threads")
    compile: bool = Field(
        False, description="torch.compile the model (local, cluster ddp); the first steps "
                           "pay the compilation, checkpoints keep their keys")

    @field_validator("checkpoint_every", mode="before")
    @classmethod
    def _interval(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            v = f"{v} epochs"  # a bare number counts epochs
        if isinstance(v, str) and v != "auto":
            cadence.parse(v)
        return v


class EwcSpec(_Section):
    """Elastic Weight Consolidation (Kirkpatrick et al. 2017) and its online variant."""

    lam: float = Field(100.0, ge=0.0, description="λ, penalty strength: (λ/2)·Σ F (θ−θ*)²")
    mode: Literal["separate", "online"] = "separate"
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="online: decay of the old Fisher")
    fisher_samples: int = Field(512, ge=1, description="training samples used per Fisher")
    fisher_labels: Literal["empirical", "sampled"] = "empirical"
    per_sample: bool = Field(False, description="exact per-sample squared grads (slower)")
    aggregate: Literal["client", "server"] = Field(
        "client", description="federated: server averages the clients' Fishers (FedEWC) and "
                              "sends them back with the global model")


class SiSpec(_Section):
    """Synaptic Intelligence (Zenke et al. 2017): penalty c·Σ Ω (θ − θ*)²."""

    c: float = Field(1.0, ge=0.0, description="penalty strength")
    xi: float = Field(1e-3, gt=0.0, description="damping ξ in Ω = ω / (Δθ² + ξ)")


class LwfSpec(_Section):
    """Learning without Forgetting (Li & Hoiem 2017): distillation from the last model."""

    alpha: float = Field(1.0, ge=0.0, description="weight λ of the distillation term")
    temperature: float = Field(2.0, gt=0.0)


class AgemSpec(_Section):
    """A-GEM (Chaudhry et al. 2019): memory for the reference gradient."""

    size: int = Field(200, ge=1, description="memory capacity in samples")
    batch: int = Field(64, ge=1, description="memory samples per reference gradient")


class ReplaySpec(_Section):
    size: int = Field(200, ge=1, description="memory capacity in samples")
    policy: Literal["balanced", "class_balanced", "reservoir"] = "balanced"
    batch: int = Field(32, ge=1, description="memory samples mixed into each batch")


class ContinualSpec(_Section):
    strategy: list[str] = Field(["naive"], description=f"composable: {', '.join(STRATEGIES)}")
    stream: Literal["none", "split", "permuted", "rotated"] = Field(
        "none", description="none: one task, the whole dataset")
    scenario: Literal["task", "domain", "class"] = "class"
    n_tasks: int = Field(5, ge=1)
    class_order: list[int] | None = Field(None, description="split: class order; default seeded")
    max_angle: float = Field(90.0, description="rotated: angle of the last task, degrees")
    client_order: Literal["same", "shuffled"] = Field(
        "same", description="federated: every client follows the stream in the same order, "
                            "or each in its own seeded order (client-specific streams)")
    ewc: EwcSpec = EwcSpec()
    replay: ReplaySpec = ReplaySpec()
    si: SiSpec = SiSpec()
    lwf: LwfSpec = LwfSpec()
    agem: AgemSpec = AgemSpec()

    @field_validator("strategy", mode="before")
    @classmethod
    def _as_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("strategy")
    @classmethod
    def _known_strategies(cls, v: list[str]) -> list[str]:
        return [one_of(s, STRATEGIES) for s in v]

    @model_validator(mode="after")
    def _scenario_fits_stream(self) -> ContinualSpec:
        allowed = {"split": ("task", "class"), "permuted": ("domain",),
                   "rotated": ("domain",)}.get(self.stream)
        if allowed and self.scenario not in allowed:
            raise ValueError(f"scenario: {self.scenario!r} does not fit stream {self.stream!r}; "
                             f"allowed: {', '.join(allowed)}")
        return self


class ClusterSpec(_Section):
    """Ray Train: where, how many workers, and how the model is parallelised."""

    address: str | None = Field(None, description="Ray address; RAY_ADDRESS wins if set")
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: int = Field(1, ge=1)
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    strategy: Literal["ddp", "fsdp", "pipeline", "hybrid"] = "ddp"
    schedule: Literal["gpipe", "1f1b"] = Field("gpipe", description="pipeline schedule")
    microbatches: int = Field(4, ge=1, description="pipeline microbatches per batch")
    pipeline_stages: int | None = Field(
        None, ge=2, description="hybrid: stages per replica; default 2 (pipeline: all workers)")
    max_failures: int = Field(2, ge=-1, description="worker-group restarts; -1 = unlimited")
    storage_path: str | None = Field(
        None, description="shared by all nodes; ATOLL_STORAGE_PATH wins; default "
                          ".atoll/ray_results")
    checkpoint_metric: str | None = Field(
        None, description="keep the best checkpoints by this epoch metric (else the newest)")
    checkpoint_mode: Literal["min", "max"] = "max"

    def mesh(self) -> tuple[int, int]:
        """(dp, pp): data-parallel replicas × pipeline stages per replica."""
        if self.strategy == "pipeline":
            return 1, self.num_workers
        if self.strategy == "hybrid":
            pp = self.pipeline_stages or 2
            return self.num_workers // pp, pp
        return self.num_workers, 1

    @model_validator(mode="after")
    def _layout(self) -> ClusterSpec:
        if self.strategy == "hybrid":
            pp = self.pipeline_stages or 2
            if self.num_workers % pp or self.num_workers // pp < 2:
                raise ValueError(f"cluster.num_workers: {self.num_workers} is not dp × pp with "
                                 f"dp ≥ 2 and pp = {pp}; allowed: multiples of {pp}, at least "
                                 f"{2 * pp}")
        if self.strategy == "pipeline" and self.num_workers < 2:
            raise ValueError("cluster.num_workers: 1 cannot hold a pipeline; allowed: >= 2")
        if self.checkpoint_metric is not None and self.checkpoint_metric not in EPOCH_METRICS:
            raise ValueError(f"cluster.checkpoint_metric: {self.checkpoint_metric!r} is not an "
                             f"epoch metric; allowed: {', '.join(EPOCH_METRICS)}")
        return self


FL_STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad",
                 "fedtrimmedavg", "fedmedian", "krum", "multikrum", "bulyan")
PARTITIONS = ("iid", "dirichlet", "shard", "pathological", "quantity")
ATTACKS = ("none", "sign_flip", "gaussian", "label_flip", "scaling")
DP_MODES = ("none", "server-fixed", "server-adaptive", "client-fixed", "client-adaptive")


class PartitionSpec(_Section):
    """How the training split is divided among clients (flwr-datasets partitioners)."""

    method: Literal["iid", "dirichlet", "shard", "pathological", "quantity"] = Field(
        "iid", description="quantity: IID samples, Dirichlet(alpha) sizes (any task)")
    alpha: float = Field(0.5, gt=0.0, description="dirichlet/quantity concentration; small = "
                         "skewed")
    shards_per_client: int = Field(2, ge=1, description="shard: shards of sorted labels each")
    classes_per_client: int = Field(2, ge=1, description="pathological: classes each")
    min_partition_size: int = Field(10, ge=0, description="dirichlet: resample until met; "
                                    "quantity: every client's floor")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="client-side validation")


class FaultSpec(_Section):
    """Seeded, per (round, client) faults for robustness experiments."""

    dropout: float = Field(0.0, ge=0.0, le=1.0,
                           description="client never replies; the round waits round_timeout")
    crash: float = Field(0.0, ge=0.0, le=1.0, description="client fails mid-training")
    straggler: float = Field(0.0, ge=0.0, le=1.0, description="client sleeps straggler_delay")
    straggler_delay: float = Field(5.0, ge=0.0, description="seconds; compare round_timeout")
    unavailable: float = Field(0.0, ge=0.0, le=1.0,
                               description="per round: client goes absent (not sampled)")
    unavailable_rounds: int = Field(3, ge=1, description="rounds an absent client stays away")


class ByzantineSpec(_Section):
    """A fixed, seeded set of malicious clients and what they send."""

    fraction: float = Field(0.0, ge=0.0, lt=1.0)
    attack: Literal["none", "sign_flip", "gaussian", "label_flip", "scaling"] = "none"
    scale: float = Field(10.0, description="sign_flip/scaling: update multiplied by -scale/scale")
    noise_std: float = Field(1.0, ge=0.0, description="gaussian: std of the noise sent")


class PrivacySpec(_Section):
    """Flower's DP wrappers (server side) or clipping mods (client side)."""

    mode: Literal["none", "server-fixed", "server-adaptive", "client-fixed",
                  "client-adaptive"] = "none"
    noise_multiplier: float = Field(1.0, ge=0.0)
    clipping_norm: float = Field(1.0, gt=0.0, description="fixed: norm; adaptive: initial")
    target_quantile: float = Field(0.5, gt=0.0, lt=1.0, description="adaptive clipping")
    delta: float = Field(1e-5, gt=0.0, lt=1.0, description="for the reported epsilon")


class VectorizedSpec(_Section):
    """`federated.engine: vectorized`: how the round's clients are batched."""

    chunk_size: int | None = Field(
        None, ge=1, description="clients trained together; default: as many as half the "
                                "free memory holds (estimated), halved on out-of-memory")


class CompressionSpec(_Section):
    """What a client sends as its update (federated/compression.py has the wire format)."""

    method: Literal["none", "fp16", "int8", "qsgd", "topk", "randk"] = Field(
        "none", description="the uplink update: fp16, int8 (per tensor or block), qsgd "
                            "(levels), topk/randk (fraction)")
    block_size: int = Field(0, ge=0, description="int8: values per scale; 0 = per tensor")
    stochastic: bool = Field(False, description="int8: stochastic (unbiased) rounding")
    levels: int = Field(4, ge=1, le=127, description="qsgd: quantisation levels s")
    fraction: float = Field(0.1, gt=0.0, le=1.0, description="topk/randk: share of values "
                                                              "sent, per tensor")
    error_feedback: bool = Field(False, description="each client keeps what compression "
                                 "dropped and adds it to its next update")
    downlink: Literal["none", "fp16"] = Field(
        "none", description="fp16: the global model is sent in half precision")

    @model_validator(mode="after")
    def _feedback_needs_a_method(self) -> CompressionSpec:
        if self.error_feedback and self.method == "none":
            raise ValueError("federated.compression.error_feedback: true with method 'none' "
                             "(nothing is dropped to feed back); allowed: a method (fp16, "
                             "int8, qsgd, topk, randk), or error_feedback: false")
        return self


class FederatedSpec(_Section):
    num_clients: int = Field(10, ge=1, description="simulated SuperNodes (one partition each)")
    rounds: int = Field(5, ge=1)
    fraction_fit: float = Field(1.0, gt=0.0, le=1.0, description="clients sampled to train")
    fraction_evaluate: float = Field(1.0, ge=0.0, le=1.0, description="0 = no federated eval")
    min_fit_clients: int = Field(2, ge=1)
    local_epochs: int = Field(1, ge=1)
    batch_size: int | None = Field(None, ge=1, description="client batch; default data's")
    lr_decay: float = Field(1.0, gt=0.0, le=1.0, description="client lr × lr_decay^(round-1)")
    strategy: str = "fedavg"
    proximal_mu: float = Field(0.01, ge=0.0, description="fedprox")
    server_lr: float | None = Field(
        None, gt=0.0, description="fedavgm lr / fedadam,yogi,adagrad eta; default Flower's")
    server_momentum: float = Field(0.9, ge=0.0, lt=1.0, description="fedavgm")
    tau: float = Field(1e-3, gt=0.0, description="fedadam/yogi/adagrad adaptivity")
    trim_beta: float = Field(0.2, gt=0.0, lt=0.5, description="fedtrimmedavg cut per side")
    num_malicious: int | None = Field(
        None, ge=0, description="krum/bulyan f; default: byzantine.fraction × num_clients")
    num_selected: int = Field(3, ge=1, description="multikrum: updates averaged")
    partition: PartitionSpec = PartitionSpec()
    faults: FaultSpec = FaultSpec()
    byzantine: ByzantineSpec = ByzantineSpec()
    privacy: PrivacySpec = PrivacySpec()
    round_timeout: float = Field(600.0, gt=0.0, description="seconds to wait for replies")
    client_cpus: int = Field(1, ge=1, description="Ray CPUs per simulated client (threads)")
    client_gpus: float = Field(0.0, ge=0.0)
    concurrency: int | None = Field(None, ge=1, description="CPUs Ray may use; default all")
    checkpoint_every: int = Field(1, ge=1, description="server checkpoint every k rounds")
    max_failed_rounds: int = Field(
        3, ge=1, description="consecutive rounds that aggregate nothing before the run FAILS")
    rounds_per_task: int | None = Field(
        None, ge=1, description="continual stream: rounds per task; default rounds // n_tasks")
    engine: Literal["flower", "vectorized"] = Field(
        "flower", description="flower: a SuperLink and a ClientApp per client on Ray; "
                              "vectorized: every sampled client of a round in one batched "
                              "computation in this process (same global model)")
    vectorized: VectorizedSpec = VectorizedSpec()
    compression: CompressionSpec = CompressionSpec()

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, v: str) -> str:
        return one_of(v, FL_STRATEGIES)

    @model_validator(mode="after")
    def _consistent(self) -> FederatedSpec:
        if self.min_fit_clients > self.num_clients:
            raise ValueError(f"federated.min_fit_clients: {self.min_fit_clients} exceeds "
                             f"num_clients {self.num_clients}; allowed: <= {self.num_clients}")
        if self.byzantine.fraction > 0 and self.byzantine.attack == "none":
            raise ValueError("federated.byzantine.attack: 'none' with fraction "
                             f"{self.byzantine.fraction}; allowed: {', '.join(ATTACKS[1:])}")
        if self.privacy.mode != "none" and self.strategy not in ("fedavg", "fedprox",
                                                                 "fedavgm"):
            raise ValueError(f"federated.privacy.mode: {self.privacy.mode!r} with strategy "
                             f"{self.strategy!r}; DP wrappers need an averaging strategy, "
                             "allowed: fedavg, fedprox, fedavgm")
        if self.fraction_evaluate > 0 and self.partition.val_fraction == 0:
            raise ValueError("federated.partition.val_fraction: 0 leaves clients no validation "
                             "split, so federated evaluation would score training data; "
                             "allowed: > 0, or federated.fraction_evaluate: 0")
        self._robust_bound()
        return self

    def sampled_per_round(self) -> int:
        """Clients asked to train each round (the seeded sampler's k)."""
        return sample_size(self.num_clients, self.fraction_fit, self.min_fit_clients)

    def malicious(self) -> int:
        """f, the number of Byzantine clients the robust rules assume."""
        if self.num_malicious is not None:
            return self.num_malicious
        return int(self.byzantine.fraction * self.num_clients)

    def replies_needed(self) -> tuple[str, int] | None:
        """(rule, n) for the Byzantine-robust rules, or None: Krum and MultiKrum need
        n ≥ 2f+3 replies, Bulyan n ≥ 4f+3 (f = the malicious clients assumed)."""
        if self.strategy not in ("krum", "multikrum", "bulyan"):
            return None
        f = self.malicious()
        return ("4f+3", 4 * f + 3) if self.strategy == "bulyan" else ("2f+3", 2 * f + 3)

    def _robust_bound(self) -> None:
        if (bound := self.replies_needed()) is None:
            return
        (rule, need), n, f = bound, self.sampled_per_round(), self.malicious()
        if n < need:
            raise ValueError(f"federated.strategy: {self.strategy} with f = {f} malicious "
                             f"clients needs n ≥ {rule} = {need} clients per round, but "
                             f"num_clients {self.num_clients} × fraction_fit "
                             f"{self.fraction_fit:g} samples {n}; allowed: more clients per "
                             "round or a smaller federated.num_malicious / byzantine.fraction")


def sample_size(n: int, fraction: float, minimum: int) -> int:
    """How many of n clients a round samples: ⌈fraction·n⌉, at least `minimum`, at most n."""
    return n if fraction >= 1.0 else min(n, max(minimum, math.ceil(fraction * n)))


class TrackingSpec(_Section):
    enabled: bool = True
    uri: str | None = Field(None, description="MLflow URI; MLFLOW_TRACKING_URI wins if set")
    experiment: str = "atoll"
    registered_model: str | None = Field(None, description="register the final model as this")
    alias: str = Field("candidate", pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")
    log_model: bool = True
    fallback: Literal["fail", "local"] = Field(
        "fail", description="unreachable server: fail before training, or log to local sqlite"
    )
    system_metrics: bool = Field(
        True, description="CPU, memory, disk, network (and GPU) of the machine that trains, "
                          "as MLflow system metrics (system/*)")
    system_metrics_interval: float = Field(10.0, ge=1.0, description="seconds between samples")

    @field_validator("uri")
    @classmethod
    def _known_scheme(cls, v: str | None) -> str | None:
        return v if v is None else check_tracking_uri(v)


def check_tracking_uri(uri: str) -> str:
    """`uri` unchanged if MLflow can track to it; ValueError naming what is allowed."""
    scheme, sep, _ = uri.partition("://")
    known = scheme.split("+")[0] in TRACKING_SCHEMES if sep else (
        uri in TRACKING_SCHEMES or ":" not in uri)  # `databricks`, or a local path
    if not known:
        raise ValueError("allowed: a local path or a URI starting "
                         f"{', '.join(s + '://' for s in TRACKING_SCHEMES)}")
    return uri


class ExperimentSpec(_Section):
    name: str = Field("atoll", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    mode: Literal["local", "cluster", "federated"] = "local"
    seed: int = Field(0, ge=0)
    data: DataSpec = DataSpec()
    model: ModelSpec = MlpSpec()
    optim: OptimSpec = OptimSpec()
    train: TrainSpec = TrainSpec()
    continual: ContinualSpec = ContinualSpec()
    cluster: ClusterSpec = ClusterSpec()
    federated: FederatedSpec = FederatedSpec()
    tracking: TrackingSpec = TrackingSpec()
    compress: list[CompressStep] = Field(
        default_factory=list, description="compressions of the registered model once "
        "training is done, each a new version of it (atoll compress)")
    task: Literal["classification", "regression"] | None = Field(
        None, description="default: regression for a float label, classification otherwise")
    project_dir: Path | None = Field(
        None, description="the user's project: model.target modules are imported from it "
        "first; default: the directory atoll runs in (filled in for workers and clients)")

    @model_validator(mode="after")
    def _model_fits_data(self) -> ExperimentSpec:
        if self.task is not None:
            problems = task_problems(self, self.task)
            if problems:
                raise ValueError(problems[0])
        if self.continual.scenario == "task" and self.continual.stream == "split" and \
                self.train.loss.label_smoothing > 0:
            raise ValueError(f"train.loss.label_smoothing: {self.train.loss.label_smoothing} "
                             "would put probability on classes a task-incremental model may "
                             "not predict; allowed with continual.scenario task: 0")
        # the shapes of the built-in datasets are known now; a user's data is checked
        # when it is read (the model is built against it before anything starts)
        builtin = self.data.format == "builtin"
        shape = IMAGE_SHAPES.get(self.data.name) if builtin else None
        if builtin and self.model.name in ("cnn", "resnet", "transformer") and shape is None:
            raise ValueError(f"model.name: {self.model.name!r} needs image data but "
                             f"data.name {self.data.name!r} is tabular; allowed: mlp, or a "
                             "model of your own (model.target)")
        if isinstance(self.model, TransformerSpec) and shape and \
                shape[1] % self.model.patch_size:
            ok = [p for p in range(1, shape[1] + 1) if shape[1] % p == 0]
            raise ValueError(f"model.patch_size: {self.model.patch_size} does not divide the "
                             f"{shape[1]}-pixel side of {self.data.name}; allowed: {ok}")
        if self.continual.ewc.aggregate == "server" and self.federated.privacy.mode != "none":
            raise ValueError("continual.ewc.aggregate: 'server' sends each client's Fisher "
                             f"without the protection of federated.privacy.mode "
                             f"{self.federated.privacy.mode!r}; allowed with privacy: client")
        self._check_streaming()
        if self.mode == "federated":
            self._check_federated()
        if self.mode == "cluster":
            self._check_cluster_batch()
            if self.continual.stream != "none" and self.cluster.strategy != "ddp":
                raise ValueError(f"cluster.strategy: {self.cluster.strategy!r} with a task "
                                 f"stream (continual.stream {self.continual.stream!r}); "
                                 "allowed with a stream: ddp")
        return self

    def _check_streaming(self) -> None:
        """`data.streaming: true` is a Ray Data pipeline into Ray Train workers."""
        if self.data.streaming is not True:
            return
        if self.mode == "federated":
            raise ValueError("data.streaming: true, but federated clients read their "
                             "partition whole; allowed in federated mode: auto or false")
        if self.data.format not in STREAM_FORMATS:
            raise ValueError(f"data.streaming: true, but data.format {self.data.format!r} "
                             f"is read whole; allowed: data.format "
                             f"{', '.join(STREAM_FORMATS)}, or data.streaming false")
        if self.mode == "cluster" and self.cluster.strategy in ("pipeline", "hybrid"):
            raise ValueError(f"data.streaming: true with cluster.strategy "
                             f"{self.cluster.strategy!r} (Ray Train shards a stream over every "
                             "rank, but a pipeline's stages must see the same batches); "
                             "allowed with streaming: ddp, fsdp")
        if self.continual.stream != "none":
            raise ValueError(f"data.streaming: true with continual.stream "
                             f"{self.continual.stream!r} (a task stream selects and permutes "
                             "samples in memory); allowed with a stream: data.streaming false")

    def _check_federated(self) -> None:
        """Local-mode settings that federated clients cannot honour are refused, never
        silently dropped (federated/fields.py lists how every field is treated)."""
        if self.optim.scheduler.name != "none":
            raise ValueError(f"optim.scheduler.name: {self.optim.scheduler.name!r} is not "
                             "applied by federated clients (each round trains "
                             "federated.local_epochs from the server's lr); allowed in "
                             "federated mode: none, with federated.lr_decay for a schedule")
        if self.train.early_stopping.patience > 0:
            raise ValueError(f"train.early_stopping.patience: "
                             f"{self.train.early_stopping.patience} — a federation runs "
                             "federated.rounds rounds and clients never stop early; allowed "
                             "in federated mode: 0")
        if self.train.compile:
            raise ValueError("train.compile: true — a client builds its model anew every "
                             "round and would compile it every round; allowed in federated "
                             "mode: false")
        if self.federated.engine == "vectorized":
            self._check_vectorized()

    def _check_vectorized(self) -> None:
        """What the vectorized engine does not do (yet) is refused, naming the way out."""
        way_out = "or federated.engine: flower"
        unbatched = [s for s in self.continual.strategy if s in ("lwf", "agem")]
        if self.continual.stream != "none" and unbatched:
            # a second model's outputs (LwF), a per-client gradient projection (A-GEM)
            raise ValueError(f"continual.strategy: {unbatched[0]} with federated.engine: "
                             f"vectorized; allowed: naive, joint, ewc, si, replay, {way_out}")
        if self.train.grad_accum_steps != 1:
            raise ValueError(f"train.grad_accum_steps: {self.train.grad_accum_steps} with "
                             f"federated.engine: vectorized; allowed: 1, {way_out}")
        if self.train.precision == "bf16":  # auto: the engine computes in fp32
            raise ValueError(f"train.precision: 'bf16' with federated.engine: vectorized; "
                             f"allowed: fp32, auto (fp32), {way_out}")

    def _check_cluster_batch(self) -> None:
        c, batch = self.cluster, self.data.batch_size
        if self.train.compile and c.strategy != "ddp":
            raise ValueError(f"train.compile: true with cluster.strategy {c.strategy!r}; "
                             "allowed: cluster.strategy ddp, or train.compile false")
        dp, _ = c.mesh()
        if batch % dp:
            raise ValueError(f"data.batch_size: {batch} (the global batch) does not split over "
                             f"{dp} data-parallel replicas; allowed: multiples of {dp}")
        if c.strategy in ("pipeline", "hybrid"):
            if self.train.grad_accum_steps != 1:
                raise ValueError(f"train.grad_accum_steps: {self.train.grad_accum_steps} with "
                                 f"cluster.strategy {c.strategy!r} (the schedule accumulates "
                                 "over cluster.microbatches); allowed: 1")
            _, pp = c.mesh()
            if c.schedule == "1f1b" and c.microbatches < pp:
                raise ValueError(f"cluster.microbatches: {c.microbatches} is fewer than the "
                                 f"{pp} stages 1F1B needs; allowed: at least {pp}")
            if (batch // dp) % c.microbatches:
                raise ValueError(f"cluster.microbatches: {c.microbatches} does not divide the "
                                 f"per-replica batch {batch // dp}; allowed: divisors of "
                                 f"{batch // dp}")

    def flat(self) -> dict[str, Any]:
        """Dotted-key view for MLflow params and logs (`compress.0.method`: each step with
        the fields its method reads)."""
        d = self.model_dump(mode="json")
        d["compress"] = {str(i): step for i, step in enumerate(d["compress"])}
        return flatten(d)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------- helpers


def task_problems(spec: ExperimentSpec, task: str) -> list[str]:
    """What `spec` asks that `task` cannot do: class-only features for regression, and
    regression losses/metrics for classification (the task may come from the data)."""
    out = []
    loss = spec.train.loss
    metrics = [("train.early_stopping.metric", spec.train.early_stopping.metric),
               ("cluster.checkpoint_metric", spec.cluster.checkpoint_metric)]
    if task == "regression" and spec.data.format == "builtin":
        out.append(f"task: 'regression', but data.name {spec.data.name!r} is a classification "
                   "dataset; allowed: task classification, or your own data with a numeric "
                   "target (data.format)")
    if task == "classification":
        if loss.name in ("mse", "huber"):
            out.append(f"train.loss.name: {loss.name!r} is a regression loss, but the task is "
                       "classification; allowed: auto, cross_entropy, focal (or task: "
                       "regression)")
        out += [f"{f}: {m!r} is a regression metric, but the task is classification; "
                f"allowed: val_loss or {', '.join(CLASS_METRICS[:4])}"
                for f, m in metrics if m in REGRESSION_METRICS]
        return out
    why = "the task is regression (a float label, or task: regression)"
    if loss.name in ("cross_entropy", "focal"):
        out.append(f"train.loss.name: {loss.name!r} needs classes; {why}; allowed: auto, "
                   "mse, huber")
    if loss.class_weights != "none":
        out.append(f"train.loss.class_weights: {loss.class_weights!r} weighs classes; {why}; "
                   "allowed: none")
    if loss.label_smoothing > 0:
        out.append(f"train.loss.label_smoothing: {loss.label_smoothing} smooths classes; "
                   f"{why}; allowed: 0")
    out += [f"{f}: {m!r} is a classification metric; {why}; allowed: val_loss, train_loss, "
            f"{', '.join(REGRESSION_METRICS)}" for f, m in metrics if m in CLASS_METRICS]
    c = spec.continual
    if c.stream == "split":
        out.append(f"continual.stream: 'split' splits classes; {why}; allowed: none, permuted, "
                   "rotated")
    if c.stream != "none" and c.scenario == "task":
        out.append(f"continual.scenario: 'task' masks classes per task; {why}; allowed: domain")
    if "lwf" in c.strategy:
        out.append(f"continual.strategy: lwf distils class probabilities; {why}; allowed: "
                   "naive, joint, ewc, si, replay, agem")
    if "ewc" in c.strategy and c.ewc.fisher_labels == "sampled":
        out.append(f"continual.ewc.fisher_labels: 'sampled' draws classes; {why}; allowed: "
                   "empirical")
    if "replay" in c.strategy and c.replay.policy == "class_balanced":
        out.append(f"continual.replay.policy: 'class_balanced' balances classes; {why}; "
                   "allowed: balanced, reservoir")
    f = spec.federated
    if spec.mode == "federated" and f.partition.method not in ("iid", "quantity"):
        out.append(f"federated.partition.method: {f.partition.method!r} partitions by label; "
                   f"{why}; allowed: iid, quantity")
    if spec.mode == "federated" and f.byzantine.attack == "label_flip":
        out.append(f"federated.byzantine.attack: 'label_flip' flips classes; {why}; allowed: "
                   "none, sign_flip, gaussian, scaling")
    return out


def check_task(spec: ExperimentSpec, task: str) -> None:
    """SpecError (exit 2) for every way `spec` does not fit the data's task."""
    problems = task_problems(spec, task)
    if problems:
        raise SpecError(problems)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _section_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the field at `loc` (for did-you-mean on unknown keys)."""
    cls: type[BaseModel] = ExperimentSpec
    for part in loc[:-1]:
        field = cls.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        cls = ann
    return cls


def describe_error(err: dict[str, Any]) -> str:
    loc = tuple(p for p in err["loc"] if not str(p).startswith("function-"))
    section = None  # the model: union's member, named by its tag in the error's loc
    if len(loc) > 1 and loc[0] == "model" and loc[1] in MODEL_SECTIONS:
        section, loc = MODEL_SECTIONS[str(loc[1])], (loc[0], *loc[2:])
    path = ".".join(str(p) for p in loc) or "spec"
    value = err.get("input")
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if isinstance(value, BaseModel):  # an after-validator's input: the section itself
        value = value.model_dump()
    if loc == ("model",) and not isinstance(value, dict):
        return (f"model: {value!r} is not valid; allowed: a mapping such as {{name: "
                f"{value if value in BUILTIN_MODELS else 'mlp'}}} or {{target: "
                "package.module:factory, kwargs: {...}}")
    shown = repr(value) if not isinstance(value, dict) else "{...}"
    if kind == "extra_forbidden" and section is not None:
        names = list(section.model_fields)
        hint = difflib.get_close_matches(str(loc[-1]), names, n=1)
        near = f" (did you mean '{hint[0]}'?)" if hint else ""
        tag = section.model_fields["name"].default
        what = f"model {tag!r}" if tag else "a model given by model.target"
        return f"{path}: unknown key for {what}{near}; allowed: {', '.join(names)}"
    if kind == "extra_forbidden":
        owner = _section_at(loc)
        names = list(owner.model_fields) if owner else []
        hint = difflib.get_close_matches(str(loc[-1]), names, n=1)
        near = f" (did you mean '{hint[0]}'?)" if hint else ""
        return f"{path}: unknown key{near}; allowed: {', '.join(names)}"
    if kind == "value_error":
        msg = str(ctx.get("error", err["msg"]))
        if isinstance(value, dict) and msg.split(":")[0].startswith(path.replace("spec", "")):
            return msg  # a cross-field check that names its own field
        if isinstance(value, dict) or "allowed" not in msg:
            return f"{path}: {msg}"
        return f"{path}: {shown} is not valid; {msg}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        ops = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<",
               "less_than_equal": "<="}
        bound = next(iter(ctx.values()))
        return f"{path}: {shown} is out of range; allowed: {ops[kind]} {bound}"
    if kind == "literal_error":
        return f"{path}: {shown} is not allowed; allowed: {ctx.get('expected')}"
    if kind == "missing":
        return f"{path}: required field is missing"
    if kind == "finite_number":
        return f"{path}: {value} is not allowed; allowed: a finite number"
    if kind == "string_pattern_mismatch":
        return f"{path}: {shown} is not allowed; allowed: a name matching {ctx.get('pattern')}"
    msg = err["msg"]
    return f"{path}: {shown} is not valid; {msg[:1].lower()}{msg[1:]}"


def validate(data: Any) -> ExperimentSpec:
    """Validate a plain mapping; raise SpecError with one line per problem."""
    if data is None:
        raise SpecError(["spec: the file is empty; expected a mapping with at least `name`"])
    if not isinstance(data, dict):
        raise SpecError([f"spec: top level is a {type(data).__name__}; expected a mapping"])
    try:
        return ExperimentSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError([describe_error(err) for err in e.errors()]) from None


def _annotation_at(path: list[str]) -> Any:
    cls: Any = ExperimentSpec
    for part in path:
        if typing.get_origin(cls) in (typing.Union, types.UnionType):  # model: any member's
            cls = next((m for m in typing.get_args(cls) if isinstance(m, type) and
                        issubclass(m, BaseModel) and part in m.model_fields), None)
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            return None
        field = cls.model_fields.get(part)
        if field is None:
            return None
        cls = field.annotation
    return cls


YAML_NULLS = ("null", "Null", "NULL", "~")


def _optional(ann: Any) -> bool:
    return typing.get_origin(ann) in (typing.Union, types.UnionType) and \
        type(None) in typing.get_args(ann)


def _is_stringish(ann: Any) -> bool:
    """True when a `--set` value should stay the raw string (str, Path, string Literals)."""
    if ann in (str, Path):
        return True
    origin = typing.get_origin(ann)
    if origin is Literal:
        return all(isinstance(a, str) for a in typing.get_args(ann))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        return bool(args) and all(_is_stringish(a) for a in args)
    return False


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=c` overrides; values are YAML-parsed unless the field takes a string."""
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"--set {item!r}: expected KEY=VALUE, e.g. federated.rounds=20")
            continue
        path = key.strip().split(".")
        ann = _annotation_at(path)
        if _is_stringish(ann):  # YAML's null spellings still clear an optional string
            value: Any = None if raw in YAML_NULLS and _optional(ann) else raw
        else:
            try:
                value = yaml.safe_load(raw) if raw != "" else None
            except yaml.YAMLError:
                value = raw
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    if problems:
        raise SpecError(problems)
    return data


def _duplicate_keys(node: yaml.Node | None, p: Path, path: str = "") -> list[str]:
    """One line per key given twice in a mapping: PyYAML silently keeps the last, so an
    edited-in-place value would lose to a forgotten one further down the file."""
    out: list[str] = []
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for k, v in node.value:
            key = str(k.value) if isinstance(k, yaml.ScalarNode) else "?"
            line = k.start_mark.line + 1
            if key in seen and key != "<<":
                out.append(f"{path}{key}: duplicate key at line {line} (first at line "
                           f"{seen[key]}) in {p}; allowed: each key once per section")
            seen.setdefault(key, line)
            out += _duplicate_keys(v, p, f"{path}{key}.")
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out += _duplicate_keys(item, p, f"{path}{i}.")
    return out


def _read_yaml(p: Path) -> Any:
    """Parse a spec file; every way it can be unreadable is one SpecError line."""
    if p.is_dir():
        raise SpecError([f"spec: {p} is a directory; allowed: a YAML spec file such as "
                         "configs/demo.yaml"])
    if not p.is_file():
        raise SpecError([f"spec: file {str(p)!r} does not exist"])
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise SpecError([f"spec: cannot read {p} ({e.strerror})"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError([f"spec: {p} is not a UTF-8 text file (byte 0x{raw[e.start]:02x} at "
                         f"offset {e.start}); allowed: a YAML spec such as configs/demo.yaml"]
                        ) from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        duplicates = _duplicate_keys(node, p)
        if duplicates:
            raise SpecError(duplicates)
        return loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError([f"spec: YAML syntax error in {p}{where}: {problem}"]) from None
    finally:
        loader.dispose()


def load_spec(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentSpec:
    """Read a YAML spec (or the defaults when `path` is None) and apply overrides."""
    data: Any = {}
    if path is not None:
        p = Path(path)
        data = _read_yaml(p)
        if data is None:
            raise SpecError([f"spec: {p} is empty; expected a mapping with at least `name`"])
    if overrides:
        if not isinstance(data, dict):
            return validate(data)
        data = apply_overrides(data, overrides)
    return validate(data)
