"""Raw dataset sources: IDX and CIFAR readers, checksummed downloads.

Readers return uint8/float arrays exactly as stored; shaping, splitting and normalising
happen in `core.data`. Downloads are verified by SHA-256 before they are used, and a
failed or offline download names the files a user can place in `data_dir` instead.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class DataUnavailable(RuntimeError):
    """A dataset that cannot be read or fetched; the message says how to provide it."""


@dataclass(frozen=True)
class RemoteFile:
    name: str
    sha256: str


IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")

def _files(names: tuple[str, ...], hashes: tuple[str, ...]) -> tuple[RemoteFile, ...]:
    return tuple(RemoteFile(n, h) for n, h in zip(names, hashes, strict=True))


# name -> (default base URL, files with their published SHA-256)
SOURCES: dict[str, tuple[str, tuple[RemoteFile, ...]]] = {
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/", _files(IDX_FILES, (
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"))),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", _files(
        IDX_FILES, (
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"))),
    "cifar10": ("https://www.cs.toronto.edu/~kriz/", _files(
        ("cifar-10-python.tar.gz",),
        ("6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",))),
}

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): 2 zero bytes, dtype code, ndim, big-endian dims."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataUnavailable(f"{path}: cannot read IDX file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataUnavailable(f"{path}: not an IDX file (bad magic {raw[:4].hex()})")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataUnavailable(
            f"{path}: IDX payload is {len(raw) - header} bytes, header says {expected}")
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="))


def fetch(dataset: str, *, data_dir: Path | None, cache_dir: Path, download: bool,
          mirror: str | None) -> dict[str, Path]:
    """Local paths of a dataset's files: `data_dir` first, then the cache, then a download."""
    base, files = SOURCES[dataset]
    base = mirror.rstrip("/") + "/" if mirror else base
    target = cache_dir / dataset
    out: dict[str, Path] = {}
    for rf in files:
        candidates = [p / rf.name for p in (data_dir, target) if p is not None]
        found = next((p for p in candidates if p.is_file()), None)
        if found is not None and (found.parent == data_dir or sha256_file(found) == rf.sha256):
            out[rf.name] = found  # user-supplied files are trusted; cached ones re-verified
            continue
        if not download:
            raise DataUnavailable(
                f"{dataset}: {rf.name} not found in data_dir={data_dir} or {target} and "
                "data.download is false; place the file there or enable download")
        out[rf.name] = _download(base + rf.name, target / rf.name, rf.sha256, dataset)
    return out


def _download(url: str, dest: Path, sha256: str, dataset: str) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=30) as resp:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                out.write(chunk)
        got = sha256_file(Path(tmp))
        if got != sha256:
            raise DataUnavailable(
                f"{dataset}: {url} has SHA-256 {got}, expected {sha256}; the file was discarded")
        os.replace(tmp, dest)
        return dest
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise DataUnavailable(
            f"{dataset}: could not download {url} ({getattr(e, 'reason', e)}); offline? "
            f"put {dest.name} in data.data_dir or {dest.parent}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_idx_dataset(paths: dict[str, Path]) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_test, y_test) from the four MNIST-format files."""
    xs = [read_idx(paths[n]) for n in IDX_FILES]
    if xs[0].shape[0] != xs[1].shape[0] or xs[2].shape[0] != xs[3].shape[0]:
        raise DataUnavailable("IDX image and label files disagree on the number of samples")
    return xs[0], xs[1], xs[2], xs[3]


def load_cifar10(archive: Path) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_test, y_test) from CIFAR-10's python pickle batches."""
    def batches(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        with tarfile.open(archive, "r:gz") as tar:
            for n in names:
                member = tar.extractfile(f"cifar-10-batches-py/{n}")
                if member is None:
                    raise DataUnavailable(f"{archive}: missing batch {n}")
                # The CIFAR batches are pickles by design; they come only from the
                # checksummed archive or the user's own data_dir.
                d = pickle.load(member, encoding="bytes")  # noqa: S301
                xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                ys.append(np.asarray(d[b"labels"], dtype=np.int64))
        return np.concatenate(xs), np.concatenate(ys)

    try:
        xtr, ytr = batches([f"data_batch_{i}" for i in range(1, 6)])
        xte, yte = batches(["test_batch"])
    except (tarfile.TarError, KeyError, EOFError, pickle.UnpicklingError) as e:
        raise DataUnavailable(f"{archive}: not a CIFAR-10 python archive ({e})") from None
    return xtr, ytr, xte, yte
