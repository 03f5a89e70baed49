"""Files only their owner may read (keys, tokens, secrets), written atomically.

One writer for every secret atoll makes (TLS and SuperNode keys, the SuperExec secret, the
Ray token): the file is 0600 from its first byte (never briefly world-readable) and is
replaced by rename, so rotating a secret never leaves a half-written one behind.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_private(path: Path, data: bytes) -> Path:
    """Write `data` to `path` readable by the owner only; an existing file is replaced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # a stale temp file keeps its old mode under O_CREAT
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
