"""Update compression: the wire format of a client's compressed update, in one place.

A client sends its update u = local − global (with error feedback: u + the residual it
kept), compressed; the server decompresses it back into a model (global + û) before
vetting and aggregation, so every strategy, DP wrapper and robust aggregator sees an
ordinary reply. The float tensors of the model are handled as one flat vector in the
order of the global model's arrays (both sides know it), cut into per-tensor segments;
each method sends a few arrays for the whole model (a few npy headers, not two per
tensor):

  fp16   v: float16[N] (x / s per tensor), s: float32[T] = max|x| per tensor
  int8   q: int8[N] = round(x / s), s: float32[B] = max|x| / 127 per block
         (`block_size` values, never across tensors; 0: one block per tensor);
         `stochastic`: floor(x / s + U), unbiased
  qsgd   q: uint8[...] codes ξ·sign + levels packed at 2, 4 or 8 bits, ξ = floor(|x|/‖x‖·
         levels + U) (Alistarh et al. 2017: unbiased), s: float32[T] = ‖x‖ / levels;
         with error feedback s is divided by 1 + ω (its variance factor): QSGD with few
         levels is not a contraction, and its residual would grow round after round
  topk   per tensor the ⌈fraction·n⌉ largest |x|: v: float16[K] (x / s), s: float32[T],
         and which ones: m: uint8 bitmask[⌈N/8⌉] or i: int32[K] indices, whichever is
         smaller
  randk  as topk, the positions drawn from seed: int64[1] (not sent as indices)

Every method's scales are in `s`, so multiplying `s` by c multiplies the decoded update by
c: DP clipping is applied in the compressed domain, to exactly what the server will
aggregate (see `federated/client_app.py`). `decompress` checks every part against the
layout (names, dtypes, sizes, finite non-negative scales, index ranges and order, counts)
and raises WireError: a malformed reply is refused, never decoded into garbage.

Error bounds per element, for a tensor with scale s (stated by `bound`, with a few float32
units of slack): fp16 |x − x̂| ≤ 2⁻¹¹|x| + 2⁻²⁴·s; int8 ≤ s/2 (stochastic: < s); qsgd < s;
topk/randk: the dropped values exactly, the kept ones as fp16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

METHODS = ("fp16", "int8", "qsgd", "topk", "randk")


class WireError(ValueError):
    """A compressed update that does not fit the layout or the method's format."""


@dataclass(frozen=True)
class Codec:
    """What a method needs to encode and decode (the spec's `federated.compression`)."""

    method: str
    block_size: int = 0
    stochastic: bool = False
    levels: int = 4
    fraction: float = 0.1
    damped: bool = False  # qsgd: scale by 1/(1 + ω), a contraction (for error feedback)

    @classmethod
    def of(cls, spec: object) -> Codec:
        c = spec  # a CompressionSpec
        return cls(c.method, c.block_size, c.stochastic, c.levels, c.fraction,  # type: ignore[attr-defined]
                   damped=bool(c.error_feedback) and c.method == "qsgd")  # type: ignore[attr-defined]


def _segments(sizes: list[int]) -> list[tuple[int, int]]:
    out, start = [], 0
    for n in sizes:
        out.append((start, start + n))
        start += n
    return out


def _blocks(sizes: list[int], block: int) -> np.ndarray:
    """Block id of every element (blocks never cross a tensor)."""
    ids, next_id = [], 0
    for n in sizes:
        b = block or max(n, 1)
        ids.append(next_id + np.arange(n) // b)
        next_id += math.ceil(n / b) if n else 0
    return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)


def _n_blocks(sizes: list[int], block: int) -> int:
    return sum(math.ceil(n / (block or max(n, 1))) for n in sizes if n)


def _kept(sizes: list[int], fraction: float) -> list[int]:
    return [min(n, max(1, math.ceil(fraction * n))) if n else 0 for n in sizes]


def _bits(levels: int) -> int:
    return next(b for b in (2, 4, 8) if 2 * levels + 1 <= 2 ** b)


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    per = 8 // bits
    pad = (-len(codes)) % per
    c = np.concatenate([codes.astype(np.uint8), np.zeros(pad, np.uint8)]).reshape(-1, per)
    shifts = (np.arange(per) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(c << shifts, axis=1).astype(np.uint8)


def _unpack(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    per = 8 // bits
    shifts = (np.arange(per) * bits).astype(np.uint8)
    codes = (packed[:, None] >> shifts) & np.uint8(2 ** bits - 1)
    return codes.reshape(-1)[:n]


def _positions(sizes: list[int], kept: list[int], seed: int) -> np.ndarray:
    """randk's positions: per tensor, kept[t] of its n distinct indices, drawn from seed."""
    rng = np.random.default_rng(seed)
    out = [start + np.sort(rng.choice(n, k, replace=False))
           for (start, _), n, k in zip(_segments(sizes), sizes, kept, strict=True) if n]
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


def _scaled_values(x: np.ndarray, idx: np.ndarray, sizes: list[int]) -> tuple[np.ndarray,
                                                                              np.ndarray]:
    """fp16 values of x[idx], each divided by its tensor's max |x[idx]| (so fp16 never
    overflows and small updates keep fp16's relative precision), and those scales."""
    owner = np.searchsorted(np.cumsum(sizes), idx, side="right")
    scales = np.zeros(len(sizes), np.float32)
    np.maximum.at(scales, owner, np.abs(x[idx]).astype(np.float32))
    safe = np.where(scales > 0, scales, 1.0)
    return (x[idx] / safe[owner]).astype(np.float16), scales


def compress(x: np.ndarray, sizes: list[int], codec: Codec, rng: np.random.Generator
             ) -> dict[str, np.ndarray]:
    """The parts sent for the flat float update `x` (segments of `sizes`)."""
    x = np.asarray(x, dtype=np.float32)
    n, m = len(x), codec.method
    if m == "fp16":
        idx = np.arange(n)
        v, s = _scaled_values(x, idx, sizes)
        return {"v": v, "s": s}
    if m == "int8":
        blocks = _blocks(sizes, codec.block_size)
        s = np.zeros(_n_blocks(sizes, codec.block_size), np.float32)
        np.maximum.at(s, blocks, np.abs(x))
        s /= 127.0
        y = x / np.where(s > 0, s, 1.0)[blocks]
        q = np.floor(y + rng.random(n, dtype=np.float32)) if codec.stochastic else np.rint(y)
        return {"q": np.clip(q, -127, 127).astype(np.int8), "s": s}
    if m == "qsgd":
        lv = codec.levels
        norms = np.array([np.linalg.norm(x[a:b].astype(np.float64)) for a, b in
                          _segments(sizes)], np.float64)
        owner = np.repeat(np.arange(len(sizes)), sizes)
        ratio = np.abs(x) / np.where(norms > 0, norms, 1.0)[owner] * lv
        xi = np.minimum(np.floor(ratio + rng.random(n)), lv)
        codes = (np.sign(x) * xi + lv).astype(np.uint8)
        scale = norms / lv
        if codec.damped:  # ω = min(n/s², √n/s): QSGD's variance bound, E‖C(x)‖² ≤ (1+ω)‖x‖²
            n_t = np.asarray(sizes, np.float64)
            scale /= 1 + np.minimum(n_t / lv ** 2, np.sqrt(n_t) / lv)
        return {"q": _pack(codes, _bits(lv)), "s": scale.astype(np.float32)}
    if m in ("topk", "randk"):
        kept = _kept(sizes, codec.fraction)
        if m == "topk":
            parts = [a + np.sort(np.argpartition(-np.abs(x[a:b]), k - 1)[:k])
                     for (a, b), k in zip(_segments(sizes), kept, strict=True) if k]
            idx = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
        else:
            seed = int(rng.integers(2**62))
            idx = _positions(sizes, kept, seed)
        v, s = _scaled_values(x, idx, sizes)
        out = {"v": v, "s": s}
        if m == "randk":
            out["seed"] = np.array([seed], np.int64)
        elif 4 * len(idx) < math.ceil(n / 8):
            out["i"] = idx.astype(np.int32)
        else:
            mask = np.zeros(n, bool)
            mask[idx] = True
            out["m"] = np.packbits(mask)
        return out
    raise WireError(f"unknown compression method {m!r}; allowed: {', '.join(METHODS)}")


def _expect(parts: dict[str, np.ndarray], want: dict[str, tuple[np.dtype, int | None]]
            ) -> None:
    if set(parts) != set(want):
        extra, missing = sorted(set(parts) - set(want)), sorted(set(want) - set(parts))
        raise WireError(f"compressed parts differ from the method's (extra {extra}, "
                        f"missing {missing})")
    for key, (dtype, size) in want.items():
        a = parts[key]
        if a.dtype != dtype or a.ndim != 1 or (size is not None and a.shape[0] != size):
            raise WireError(f"compressed part {key!r} is {a.dtype}{list(a.shape)}, expected "
                            f"{np.dtype(dtype)}[{'…' if size is None else size}]")


def _check_scales(s: np.ndarray) -> None:
    if not np.isfinite(s).all() or (s < 0).any():
        raise WireError("compressed scales must be finite and non-negative")


def _selection(parts: dict[str, np.ndarray], sizes: list[int], kept: list[int]
               ) -> np.ndarray:
    """topk's positions from a bitmask or an index list, each tensor holding its count."""
    n, k = sum(sizes), sum(kept)
    if "m" in parts:
        bits = np.unpackbits(parts["m"])
        if bits[n:].any():
            raise WireError("the top-k mask marks positions past the model's end")
        idx = np.flatnonzero(bits[:n])
    else:
        idx = parts["i"].astype(np.int64)
        if len(idx) and (idx[0] < 0 or idx[-1] >= n or (np.diff(idx) <= 0).any()):
            raise WireError("top-k indices must be increasing positions inside the model")
    counts = np.bincount(np.searchsorted(np.cumsum(sizes), idx, side="right"),
                         minlength=len(sizes))[:len(sizes)]
    if len(idx) != k or list(counts) != kept:
        raise WireError(f"top-k selects {list(counts)} values per tensor; the method sends "
                        f"{kept}")
    return idx


def decompress(parts: dict[str, np.ndarray], sizes: list[int], codec: Codec) -> np.ndarray:
    """The flat float32 update the parts hold; WireError for anything else."""
    n, t, m = sum(sizes), len(sizes), codec.method
    f16, f32, i8, u8 = (np.dtype(x) for x in ("float16", "float32", "int8", "uint8"))
    owner = np.repeat(np.arange(t), sizes)
    if m == "fp16":
        _expect(parts, {"v": (f16, n), "s": (f32, t)})
        _check_scales(parts["s"])
        v = parts["v"].astype(np.float32)
        if not np.isfinite(v).all():
            raise WireError("compressed values must be finite")
        return v * parts["s"][owner]
    if m == "int8":
        _expect(parts, {"q": (i8, n), "s": (f32, _n_blocks(sizes, codec.block_size))})
        _check_scales(parts["s"])
        if (parts["q"] == -128).any():
            raise WireError("int8 codes must lie in [-127, 127]")
        return parts["q"].astype(np.float32) * parts["s"][_blocks(sizes, codec.block_size)]
    if m == "qsgd":
        lv, bits = codec.levels, _bits(codec.levels)
        _expect(parts, {"q": (u8, math.ceil(n * bits / 8)), "s": (f32, t)})
        _check_scales(parts["s"])
        codes = _unpack(parts["q"], bits, n).astype(np.int16)
        if (codes > 2 * lv).any():
            raise WireError(f"qsgd codes must lie in [0, {2 * lv}]")
        return (codes - lv).astype(np.float32) * parts["s"][owner]
    if m in ("topk", "randk"):
        kept = _kept(sizes, codec.fraction)
        k = sum(kept)
        if m == "randk":
            _expect(parts, {"v": (f16, k), "s": (f32, t), "seed": (np.dtype(np.int64), 1)})
            if int(parts["seed"][0]) < 0:
                raise WireError("the randk seed must be non-negative")
            idx = _positions(sizes, kept, int(parts["seed"][0]))
        else:
            which = "m" if "m" in parts else "i"
            _expect(parts, {"v": (f16, k), "s": (f32, t),
                            which: (u8, math.ceil(n / 8)) if which == "m" else
                            (np.dtype(np.int32), k)})
            idx = _selection(parts, sizes, kept)
        _check_scales(parts["s"])
        v = parts["v"].astype(np.float32)
        if not np.isfinite(v).all():
            raise WireError("compressed values must be finite")
        out = np.zeros(n, np.float32)
        out[idx] = v * parts["s"][owner[idx]]
        return out
    raise WireError(f"unknown compression method {m!r}; allowed: {', '.join(METHODS)}")


def scaled(parts: dict[str, np.ndarray], factor: float) -> dict[str, np.ndarray]:
    """The parts whose decoded update is `factor` times theirs (clipping, compressed)."""
    return {**parts, "s": (parts["s"].astype(np.float64) * factor).astype(np.float32)}


def bound(x: np.ndarray, sizes: list[int], codec: Codec, parts: dict[str, np.ndarray]
          ) -> np.ndarray:
    """The per-element error bound the method guarantees for `x` encoded as `parts`
    (undamped: a damped qsgd code is deliberately shrunk by 1/(1+ω))."""
    if codec.damped:
        raise ValueError("bound() states the undamped codes' bound")
    x = np.asarray(x, np.float32)
    owner = np.repeat(np.arange(len(sizes)), sizes)
    s = parts["s"]
    # float32 arithmetic (x / s, q · s) adds a few units in the last place
    slack = 2.0 ** -20
    if codec.method == "fp16":
        return (2.0 ** -11 + slack) * np.abs(x) + 2.0 ** -24 * s[owner]
    if codec.method == "int8":
        per = s[_blocks(sizes, codec.block_size)]
        return per * ((1.0 if codec.stochastic else 0.5) + 127 * slack)
    if codec.method == "qsgd":
        return s[owner] * (1 + codec.levels * slack)
    # top-k / rand-k: a dropped value's error is itself; a kept one's fp16's
    return np.abs(x) + 2.0 ** -24 * s[owner]
