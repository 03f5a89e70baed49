"""Checkpoints: atomic, hash-verified, loaded with `torch.load(weights_only=True)`.

File layout: one line `ATOLL-CKPT 1 <sha256-of-payload>\\n`, then a `torch.save` payload.
The hash makes truncation and tampering a clear `CheckpointError` instead of a crash
deep inside torch's unpickler; the temp-file + rename write means a crash mid-save leaves
the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

MAGIC = b"ATOLL-CKPT 1 "

log = logging.getLogger("atoll")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted: missing, truncated, tampered or not ours."""


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, in weights_only-safe types."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        # numpy's Box-Muller cache: after an odd number of normal draws the next one comes
        # from it (Flower's DP noise), so a resume without it draws different noise
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore every RNG `rng_state` saved that exists here.

    A checkpoint may come from a machine with more GPUs than this one sees (a resume on a
    smaller node, CUDA_VISIBLE_DEVICES): the visible devices get their saved states and
    the rest is reported, not an error — the run continues, only not bit-identically.
    """
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32),
                         state["numpy_pos"], int(state.get("numpy_has_gauss", 0)),
                         float(state.get("numpy_gauss", 0.0))))
    saved = list(state.get("cuda") or [])
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for device, rng in enumerate(saved[:visible]):
        torch.cuda.set_rng_state(rng, device)
    if len(saved) > visible:
        log.warning("checkpoint holds the CUDA RNG state of %d GPU(s) but %d are visible: "
                    "restored %d, not devices %d..%d; GPU random draws will differ from "
                    "an uninterrupted run", len(saved), visible, visible, visible,
                    len(saved) - 1)


def save(payload: dict[str, Any], path: Path) -> Path:
    """Write `payload` atomically to `path` (temp file in the same dir, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    header = MAGIC + hashlib.sha256(body).hexdigest().encode() + b"\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Verify and load a checkpoint written by `save`."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read checkpoint ({e.strerror})") from None
    head, sep, body = raw.partition(b"\n")
    if not sep or not head.startswith(MAGIC) or len(head) != len(MAGIC) + 64:
        raise CheckpointError(f"{path}: not an atoll checkpoint (bad header)")
    expected = head[len(MAGIC):].decode("ascii", "replace")
    actual = hashlib.sha256(body).hexdigest()
    if actual != expected:
        raise CheckpointError(
            f"{path}: checkpoint is corrupt (SHA-256 {actual[:12]}… != recorded "
            f"{expected[:12]}…); it was truncated or modified. Delete it to resume from an "
            "earlier one")
    try:
        return torch.load(io.BytesIO(body), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # an object outside torch's allow-list
        raise CheckpointError(f"{path}: {refusal(e)}") from None
    except Exception as e:  # hash matched, so this is a format/version problem
        raise CheckpointError(f"{path}: checkpoint payload cannot be loaded ({e})") from None


def refusal(e: Exception) -> str:
    """One line for torch's multi-paragraph weights-only error: what the file asked for.

    The header's hash is integrity, not authenticity (whoever can write the file can
    recompute it); the weights-only unpickler is what keeps a crafted file from running
    code, so its refusal is named as such."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    why = next((ln for ln in lines if "GLOBAL" in ln or "global" in ln.split()[:3]),
               lines[-1] if lines else type(e).__name__)
    why = why.split(". Please use")[0].removeprefix("WeightsUnpickler error: ").rstrip(".")
    return f"refused by a weights-only load ({why}); atoll never unpickles code"


class CheckpointDir:
    """`epoch-000003.ckpt` (or `round-…`) files in one directory, keeping the newest `keep`."""

    def __init__(self, root: Path, keep: int = 2, prefix: str = "epoch"):
        self.root, self.keep, self.prefix = Path(root), keep, prefix
        self._name = re.compile(rf"^{re.escape(prefix)}-\d{{6}}\.ckpt$")

    def path_for(self, epoch: int) -> Path:
        return self.root / f"{self.prefix}-{epoch:06d}.ckpt"

    def all(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if self._name.match(p.name))

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def save(self, payload: dict[str, Any], epoch: int) -> Path:
        path = save(payload, self.path_for(epoch))
        for old in self.all()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path
