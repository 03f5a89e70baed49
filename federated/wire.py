"""Compressed train replies as Flower records: the client's side (compress, clip, keep the
error-feedback residual) and the server's (expand back into an ordinary reply).

Order, and why: a client computes its update u (local − the model it received; a
Byzantine client's poisoned one, as that is what it sends), adds its residual e (error
feedback), compresses v = u + e, and only then clips, in the compressed domain (the
scales), the update the server will decode. DP's sensitivity bound is about what is
aggregated: clipping first and compressing after could raise the norm again (int8
rounding, the residual added back), so the decoded update would no longer be within the
clipping norm. The residual keeps v − decode(C(v)) before clipping: what compression
dropped, not what DP removed. Only float arrays are compressed; integer buffers (batch
norm's step count) travel as they are.

The server expands a compressed reply into the reply a client without compression would
have sent (global + decoded update, in the client's dtypes) before vetting, so norms,
refusals, Byzantine defences, DP wrappers and every strategy work unchanged; a reply that
does not decode is refused as malformed.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from atoll.federated import records as R
from atoll.federated.client_state import ClientStateStore
from atoll.federated.compression import METHODS, Codec, WireError, compress, decompress, scaled

CLIPPING_NORM = "clipping_norm"  # Flower's DP wrappers send it to clients
NORM_BIT = "norm_bit"  # what adaptive clipping reports (Flower's KEY_NORM_BIT)
FLOATS = ("float16", "float32", "float64")


def _layout(sent: ArrayRecord) -> tuple[list[str], list[str], list[int]]:
    """(float array names, other names, float sizes) in the order the server sent them."""
    floats = [n for n, a in sent.items() if np.dtype(str(a.dtype)).kind == "f"]
    others = [n for n in sent if n not in floats]
    sizes = [int(np.prod(sent[n].shape, dtype=np.int64)) for n in floats]
    return floats, others, sizes


def _record(parts: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: R.to_array(v) for k, v in parts.items()})


# --- the client's side ---------------------------------------------------------------

def compress_reply(msg: Message, reply: Message, context: Context, spec: Any) -> Message:
    """`reply` (a trained model) as its compressed update, clipped when client-side DP is
    on; the error-feedback residual is kept in the node's state and the run dir."""
    f = spec.federated
    codec = Codec.of(f.compression)
    cfg = msg.content[R.CONFIG]
    rnd, partition = int(cfg[R.ROUND]), int(context.node_config[R.NODE_PARTITION_ID])
    sent, got = msg.content[R.ARRAYS], reply.content[R.ARRAYS]
    floats, others, sizes = _layout(sent)
    local = {n: R.array_of(got[n]) for n in sent}
    u = np.concatenate([(local[n].astype(np.float64) - R.array_of(sent[n])).ravel()
                        for n in floats]).astype(np.float32) if floats else np.zeros(0)
    residual = _residual(context, spec, partition, cfg, len(u))
    v = u + residual if residual is not None else u
    parts = compress(v, sizes, codec, np.random.default_rng([spec.seed, 4_241, rnd, partition]))
    if f.compression.error_feedback:
        _keep_residual(context, spec, partition, rnd, v - decompress(parts, sizes, codec))
    metrics = reply.content[R.METRICS]
    if f.privacy.mode in ("client-fixed", "client-adaptive"):
        norm = float(np.linalg.norm(decompress(parts, sizes, codec).astype(np.float64)))
        clip = float(cfg[CLIPPING_NORM])
        # a hair under: the scales are rounded to float32 after scaling
        factor = min(1.0, clip / norm * (1 - 2.0 ** -20)) if norm > 0 else 1.0
        parts = scaled(parts, factor)
        if f.privacy.mode == "client-adaptive":
            metrics[NORM_BIT] = int(norm > clip)  # Flower's: the update was clipped
    parts.update({f"raw/{n}": local[n] for n in others})
    content = {k: v for k, v in reply.content.items() if k != R.ARRAYS}
    content[R.UPDATE] = _record(parts)
    content[R.COMPRESSION] = ConfigRecord({
        "method": codec.method, "dtypes": [str(local[n].dtype) for n in floats]})
    reply.content = RecordDict(content)
    return reply


def _store(context: Context, spec: Any, partition: int) -> ClientStateStore | None:
    run_dir = str(context.run_config.get(R.RUN_DIR, "") or "")
    if not run_dir:
        return None
    keep = spec.train.keep_checkpoints * spec.federated.checkpoint_every + 1
    return ClientStateStore(Path(run_dir) / R.CLIENT_FEEDBACK, partition, keep)


def _residual(context: Context, spec: Any, partition: int, cfg: ConfigRecord, n: int
              ) -> np.ndarray | None:
    """The residual this client kept after its last round (error feedback), or None:
    from the node's state, or on a resumed federation from the run dir's copy saved up to
    the checkpoint it resumed from."""
    if not spec.federated.compression.error_feedback:
        return None
    kept = context.state.get(R.EF_STATE)
    if kept is not None:
        r = kept["residual"].numpy()
    else:
        resumed = int(cfg.get(R.RESUMED_FROM, 0))
        store = _store(context, spec, partition) if resumed > 0 else None
        found = store.load(before=resumed + 1) if store is not None else None
        if found is None:
            return np.zeros(n, np.float32)
        r = np.load(io.BytesIO(found[0]), allow_pickle=False)
    return r if r.shape == (n,) and r.dtype == np.float32 else np.zeros(n, np.float32)


def _keep_residual(context: Context, spec: Any, partition: int, rnd: int,
                   residual: np.ndarray) -> None:
    residual = residual.astype(np.float32)
    context.state[R.EF_STATE] = ArrayRecord({"residual": Array(residual)})
    store = _store(context, spec, partition)
    if store is not None:
        buf = io.BytesIO()
        np.save(buf, residual, allow_pickle=False)
        # a SuperNode that cannot reach the server's run dir keeps the node's copy only
        with contextlib.suppress(OSError):
            store.save(rnd, buf.getvalue(), 0)


# --- the server's side ---------------------------------------------------------------

def expand(reply: Message, sent: Message, compression: Any) -> str | None:
    """Turn a compressed train reply back into the model it stands for (in place), or say
    why it cannot be: the reply must carry the run's method and decode against the model
    it was sent."""
    content = reply.content
    if R.ARRAYS in content:
        return (f"a full model ({R.ARRAYS!r}) in the reply; this run's clients send "
                f"compressed updates (federated.compression.method {compression.method})")
    if R.UPDATE not in content.array_records or R.COMPRESSION not in content.config_records:
        return f"no compressed update ({R.UPDATE!r} and {R.COMPRESSION!r}) in the reply"
    meta = content[R.COMPRESSION]
    method = meta.get("method")
    if method != compression.method or method not in METHODS:
        return f"compressed with {method!r}; this run uses {compression.method!r}"
    base = sent.content[R.ARRAYS]
    floats, others, sizes = _layout(base)
    dtypes = meta.get("dtypes")
    if not isinstance(dtypes, list) or len(dtypes) != len(floats) or \
            any(d not in FLOATS for d in dtypes):
        return f"dtypes {dtypes!r} do not name one float type ({', '.join(FLOATS)}) per " \
               f"float array of the model ({len(floats)})"
    parts: dict[str, np.ndarray] = {}
    for key, arr in content[R.UPDATE].items():
        if arr.stype != "numpy.ndarray":
            return f"compressed part {key!r} is serialised as {arr.stype!r}"
        try:
            parts[key] = R.array_of(arr)
        except (ValueError, TypeError, OSError, EOFError) as e:
            return f"compressed part {key!r} cannot be decoded ({str(e)[:100]})"
    raw = {k.removeprefix("raw/"): parts.pop(k) for k in list(parts) if k.startswith("raw/")}
    if any(a.dtype.kind == "f" and not np.isfinite(a).all() for a in parts.values()):
        # what an update that overflowed looks like compressed: the client's failure, as
        # an uncompressed reply holding NaN/inf is
        return f"{R.FAILURE_PREFIX}nonfinite (the compressed update holds NaN/inf)"
    if sorted(raw) != sorted(others):
        return f"integer arrays sent {sorted(raw)}; the model's are {sorted(others)}"
    try:
        dense = decompress(parts, sizes, Codec.of(compression))
    except WireError as e:
        return str(e)
    out: dict[str, np.ndarray] = {}
    start = 0
    for name, size, dtype in zip(floats, sizes, dtypes, strict=True):
        b = R.array_of(base[name])
        step = dense[start:start + size].reshape(b.shape)
        out[name] = (b.astype(np.float64) + step).astype(dtype)
        start += size
    for name in others:
        out[name] = raw[name]
    content = {k: v for k, v in content.items() if k not in (R.UPDATE, R.COMPRESSION)}
    content[R.ARRAYS] = _record({n: out[n] for n in base})
    reply.content = RecordDict(content)
    return None


def rebase(reply: Message, half: ArrayRecord, full: ArrayRecord) -> None:
    """Move a reply from the fp16 model it was trained from onto the full-precision one:
    full + (reply − half) for every float array, in the reply's dtypes (in place)."""
    got = reply.content[R.ARRAYS]
    out = {}
    for name, arr in got.items():
        values = R.array_of(arr)
        if values.dtype.kind == "f" and name in full:
            moved = R.array_of(full[name]).astype(np.float64) + \
                (values.astype(np.float64) - R.array_of(half[name]))
            values = moved.astype(values.dtype)
        out[name] = values
    reply.content[R.ARRAYS] = _record(out)
