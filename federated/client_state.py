"""A client's continual-learning state on disk, by round, so a resumed federation has it.

Flower's `Context.state` lives as long as one Flower run; a federation resumed from a
server checkpoint at round r is a new run. Each client therefore also writes its strategy
state (EWC anchors and Fishers, SI importances, replay memory) after every round it
trains, as `client-states/partition-P/round-RRRRRR.state` in the run directory, and a
client without Context.state reads the newest file from before the current round — the
state it had when the checkpointed round ended. Files are written atomically and read
with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import tempfile
from pathlib import Path

import torch

from atoll.core.checkpoint import refusal

_NAME = re.compile(r"^round-(\d{6})\.state$")


class ClientStateError(RuntimeError):
    """A state file that a weights-only load refuses or that is not atoll's format."""


class ClientStateStore:
    def __init__(self, root: Path, partition: int, keep: int):
        self.dir = Path(root) / f"partition-{partition}"
        self.keep = max(1, keep)

    def _files(self) -> list[tuple[int, Path]]:
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _NAME.match(p.name))]
        return sorted(found)

    def save(self, server_round: int, blob: bytes, task: int) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save({"blob": torch.frombuffer(bytearray(blob), dtype=torch.uint8),
                    "task": int(task), "round": int(server_round)}, buf)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".round-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(buf.getvalue())
            os.replace(tmp, self.dir / f"round-{server_round:06d}.state")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        # rounds after the newest kept one are from an interrupted run: a resumed run
        # rewrites them, so only the oldest ones need to go
        for _, old in self._files()[: -self.keep]:
            old.unlink(missing_ok=True)

    def load(self, before: int) -> tuple[bytes, int] | None:
        """(state blob, task) saved after the newest round < `before`, or None."""
        for rnd, path in reversed(self._files()):
            if rnd >= before:
                continue
            try:
                saved = torch.load(path, weights_only=True)
                return bytes(saved["blob"].numpy().tobytes()), int(saved["task"])
            except pickle.UnpicklingError as e:
                raise ClientStateError(f"{path}: {refusal(e)}") from None
            except (OSError, RuntimeError, KeyError, TypeError, AttributeError) as e:
                raise ClientStateError(f"{path}: not a client state atoll wrote ({e})") \
                    from None
        return None


def prune_client_states(root: Path, after: int) -> None:
    """Remove every client's states from rounds > `after` (all of them when 0)."""
    if not Path(root).is_dir():
        return
    for part in Path(root).iterdir():
        for f in part.glob("round-*.state"):
            if (m := _NAME.match(f.name)) and int(m.group(1)) > after:
                f.unlink(missing_ok=True)
