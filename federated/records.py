"""Every key that crosses the Flower boundary, and the one mapping spec <-> run_config.

Flower carries configuration as flat `run_config` values (from `[tool.flwr.app.config]` in
pyproject.toml, `flwr run --run-config`, or `atoll run`) and per-round values in
ConfigRecords. Keeping all of those names here means the server, the clients and the
launcher cannot drift apart.
"""

from __future__ import annotations

import ast
import functools
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atoll.core.spec import ExperimentSpec, load_spec, validate

# --- run_config keys (must exist in [tool.flwr.app.config] to be overridable) ---------
SPEC_PATH = "spec"  # YAML path, relative to the app directory or absolute
SPEC_JSON = "spec-json"  # the whole spec as JSON; wins over SPEC_PATH (atoll run sets it)
OVERRIDES = "overrides"  # "federated.rounds=3; federated.strategy=fedmedian"
NUM_ROUNDS = "num-server-rounds"  # 0 = from the spec
RUN_DIR = "run-dir"  # checkpoints and the result file; "" = train.checkpoint_dir/<name>
TRACKING_URI = "tracking-uri"  # absolute MLflow URI; "" = spec / env / default
MLFLOW_RUN_ID = "mlflow-run-id"  # continue logging into this run (resume)
RESUME = "resume"  # "" = fresh, "latest" = newest checkpoint in run-dir, or a path
RESTART = "restart"  # a fresh start may discard an unfinished federation's checkpoints
CLIENT_STATES = "client-states"  # in the run dir: each client's continual state by round
CLIENT_FEEDBACK = "client-feedback"  # in the run dir: each client's error-feedback residual
STOP_FILE = "STOP"  # in the run dir: `atoll run` asks a running server to stop (Ctrl-C)
SERVER_STDERR_ENV = "ATOLL_SERVER_STDERR"  # environment: a file for the server's stderr

RUN_CONFIG_DEFAULTS: dict[str, Any] = {
    SPEC_PATH: "configs/federated.yaml", SPEC_JSON: "", OVERRIDES: "", NUM_ROUNDS: 0,
    RUN_DIR: "", TRACKING_URI: "", MLFLOW_RUN_ID: "", RESUME: "", RESTART: False}

# --- message content keys (Flower's strategy defaults for arrays/config) --------------
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
CLIENT = "client"  # ConfigRecord in a reply: who answered and what happened to it
UPDATE = "update"  # ArrayRecord in a reply: the compressed update (federated/wire.py)
COMPRESSION = "compression"  # ConfigRecord in a reply: its method and the model's dtypes
NUM_EXAMPLES = "num-examples"  # the weight Flower's strategies average by

# --- per-round ConfigRecord keys (server -> client) ------------------------------------
ROUND = "server-round"  # set by Flower's configure_train/evaluate
LR = "lr"
LOCAL_EPOCHS = "local-epochs"
BATCH_SIZE = "batch-size"
PROXIMAL_MU = "proximal-mu"
RESUMED_FROM = "resumed-from"  # the round this server process resumed after (0 = fresh)

# --- reply ConfigRecord keys (client -> server) ----------------------------------------
PARTITION_ID = "partition-id"
BYZANTINE = "byzantine"  # the attack this client applied ("" when honest)
FAILURE_PREFIX = "atoll-fault:"  # error reasons that start with this are injected faults

# --- Context.state (client memory across rounds) ---------------------------------------
CL_STATE = "atoll-continual"  # ConfigRecord: strategy state bytes + the task it trained
CL_BLOB = "strategy"
CL_TASK = "task"
EF_STATE = "atoll-error-feedback"  # ArrayRecord: the residual compression dropped
TASK = "task"  # reply/ConfigRecord: the stream task a round trains
FEDEWC = "atoll-fedewc"  # ArrayRecord to clients: the federation's EWC anchors and Fishers
FISHER = "atoll-fisher"  # ArrayRecord from a client: its Fisher of the task it just closed
FISHER_TASK = "fisher-task"  # in the reply's CLIENT record: which task that Fisher is for
FISHER_WEIGHT = "fisher-weight"  # and how many samples it was estimated on

# --- node_config (simulation sets these; deployment SuperNodes pass them) -------------
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"


def app_dir() -> Path:
    """Where the bundled `configs/` lie: the checkout's root in an editable install, the
    installed `atoll/` directory otherwise (a spec path in run_config is relative to it)."""
    return Path(__file__).resolve().parent.parent


def spec_from_run_config(run_config: dict[str, Any]) -> ExperimentSpec:
    """The experiment spec a Flower run was started with (validated, mode forced)."""
    cfg = {**RUN_CONFIG_DEFAULTS, **run_config}
    overrides = [o.strip() for o in str(cfg[OVERRIDES]).replace("\n", ";").split(";")
                 if o.strip()]
    if cfg[SPEC_JSON]:
        from atoll.core.spec import apply_overrides

        data = json.loads(str(cfg[SPEC_JSON]))
        spec = validate(apply_overrides(data, overrides) if overrides else data)
    else:
        path = Path(str(cfg[SPEC_PATH]))
        spec = load_spec(path if path.is_absolute() else app_dir() / path, overrides)
    rounds = int(cfg[NUM_ROUNDS])
    changes: dict[str, Any] = {"mode": "federated"}
    if rounds > 0:
        changes["federated"] = spec.federated.model_copy(update={"rounds": rounds})
    return spec.model_copy(update=changes)


def run_config_for(spec: ExperimentSpec, *, run_dir: Path, tracking_uri: str | None,
                   mlflow_run_id: str | None, resume: str, restart: bool = False
                   ) -> dict[str, Any]:
    """What `atoll run` hands to `flwr run` for this spec (JSON keeps every field exact)."""
    # Only the fields the user set: defaults fill in the same way on the other side, and
    # "was this field set" stays meaningful (models warn about set-but-ignored fields).
    dumped = spec.model_dump(mode="json", exclude_unset=True)
    return {**RUN_CONFIG_DEFAULTS, SPEC_JSON: json.dumps(dumped),
            RUN_DIR: str(run_dir), TRACKING_URI: tracking_uri or "",
            MLFLOW_RUN_ID: mlflow_run_id or "", RESUME: resume, RESTART: restart}


def to_toml(values: dict[str, Any]) -> str:
    """A flat TOML table for `flwr run --run-config FILE` (strings JSON-escaped)."""
    lines = []
    for k, v in values.items():
        if isinstance(v, bool):
            lines.append(f'"{k}" = {str(v).lower()}')
        elif isinstance(v, int | float):
            lines.append(f'"{k}" = {v!r}')
        else:
            lines.append(f'"{k}" = {json.dumps(str(v))}')
    return "\n".join(lines) + "\n"


@functools.lru_cache(maxsize=4096)
def _npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    """The bytes `np.save` writes before an array's data (format 1.0, 64-byte aligned)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def npy_bytes(a: np.ndarray) -> bytes:
    """`np.save(a, allow_pickle=False)`'s bytes (of a C-ordered copy), with the header
    made once per dtype and shape: what Flower's `Array` holds, byte for byte, without
    np.save's per-call cost."""
    a = np.require(a, requirements="C")  # (ascontiguousarray would make a 0-d array 1-d)
    if a.dtype.hasobject:
        raise TypeError("object arrays are never serialised")
    return _npy_header(np.lib.format.dtype_to_descr(a.dtype), a.shape) + a.tobytes()


@functools.lru_cache(maxsize=4096)
def _parse_header(header: bytes) -> tuple[np.dtype, tuple[int, ...], bool]:
    d = ast.literal_eval(header.decode("latin1"))
    if not isinstance(d, dict) or set(d) != {"descr", "fortran_order", "shape"} or \
            not isinstance(d["fortran_order"], bool) or not isinstance(d["shape"], tuple) \
            or not all(isinstance(n, int) and n >= 0 for n in d["shape"]):
        raise ValueError(f"not an npy header: {header[:80]!r}")
    dtype = np.dtype(np.lib.format.descr_to_dtype(d["descr"]))
    if dtype.hasobject:
        raise ValueError("object arrays are refused (no pickles)")
    return dtype, d["shape"], d["fortran_order"]


def npy_array(data: bytes) -> np.ndarray:
    """An npy payload as an array (read-only, over `data`): what `np.load(...,
    allow_pickle=False)` returns, with the header parsed once per distinct header. Format
    1.0/2.0/3.0, C or Fortran order, no object dtypes; a size that disagrees with the
    header is an error, as in np.load."""
    if data[:6] != b"\x93NUMPY" or len(data) < 10:
        raise ValueError("not an npy payload")
    major = data[6]
    if major == 1:
        hlen, start = int.from_bytes(data[8:10], "little"), 10
    elif major in (2, 3):
        hlen, start = int.from_bytes(data[8:12], "little"), 12
    else:
        raise ValueError(f"npy format version {major} is not supported")
    dtype, shape, fortran = _parse_header(bytes(data[start:start + hlen]))
    count = math.prod(shape)
    offset = start + hlen
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(f"npy payload holds {len(data) - offset} bytes; its header says "
                         f"{count} × {dtype.itemsize}")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)


def to_array(t: torch.Tensor | np.ndarray) -> Any:
    """A Flower `Array` of a tensor or array (numpy's serialisation, as Flower's own)."""
    from flwr.app import Array

    a = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    return Array(dtype=str(a.dtype), shape=tuple(a.shape), stype="numpy.ndarray",
                 data=npy_bytes(a))


def array_of(arr: Any) -> np.ndarray:
    """A Flower `Array`'s values (a writable copy), decoded by `npy_array`."""
    if arr.stype != "numpy.ndarray":
        raise ValueError(f"serialised as {arr.stype!r}, not 'numpy.ndarray'")
    return npy_array(arr.data).copy()


def state_to_arrays(state: dict[str, torch.Tensor]) -> Any:
    from flwr.app import ArrayRecord

    return ArrayRecord({k: to_array(v) for k, v in state.items()})


def arrays_to_state(arrays: Any) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(array_of(a)) for k, a in arrays.items()}


def nbytes(arrays: Any) -> int:
    """Payload size of an ArrayRecord (what a message carries over the wire)."""
    return sum(len(a.data) for a in arrays.values())
