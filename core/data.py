"""Datasets as in-memory tensors: registry, seeded splits, normalisation, batches.

Every dataset atoll ships fits in memory, so batches are tensor slices of a seeded
permutation rather than a DataLoader: no per-sample Python overhead, exact reproducibility
(the permutation depends only on seed and epoch), and sharding by rank is one slice.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from atoll.core import formats, sources
from atoll.core.formats import Raw
from atoll.core.spec import DataSpec, SpecError

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]


@dataclass
class Split:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class DataBundle:
    """Train/val/test tensors plus what a model needs to know about them."""

    train: Split
    val: Split
    test: Split
    input_shape: tuple[int, ...]  # per sample, e.g. (1, 8, 8) or (20,)
    num_classes: int
    mean: torch.Tensor
    std: torch.Tensor
    task: str = "classification"
    classes: list[Any] | None = None  # the label value of each class index (int or str)
    features: list[str] | None = None  # a table's feature columns (after one-hot encoding)
    encoding: dict[str, Any] | None = None  # a table's numeric and categorical columns
    y_mean: float = 0.0  # regression: targets are standardised with the training split's
    y_std: float = 1.0  # statistics; losses see z-scores, metrics and predictions units

    @property
    def is_image(self) -> bool:
        return len(self.input_shape) == 3

    @property
    def embedded(self) -> Embedded | None:
        """A table whose categorical columns are codes for learned embeddings."""
        enc = self.encoding or {}
        if enc.get("mode") != "embedding":
            return None
        return Embedded(len(enc["numeric"]), tuple(len(c) for c in enc["categorical"].values()),
                        tuple(enc["dims"]))


@dataclass(frozen=True)
class Embedded:
    """Feature layout of a table with embedded categoricals: `numeric` columns first, then
    one code column per categorical of `cardinalities[i]` categories, embedded in
    `dims[i]` numbers; the model behind the embeddings sees `width` features."""

    numeric: int
    cardinalities: tuple[int, ...]
    dims: tuple[int, ...]

    @property
    def width(self) -> int:
        return self.numeric + sum(self.dims)


# --------------------------------------------------------------------------- registry


def _digits(spec: DataSpec, seed: int) -> Arrays:
    """scikit-learn's bundled digits, read from its CSV without importing scikit-learn:
    that import costs 2-4 s of CPU in every process that loads the data (each Flower
    client actor, each Ray Train worker), against 0.2 s for the file."""
    found = importlib.util.find_spec("sklearn")  # locates, does not import
    csv = Path(found.origin).parent / "datasets" / "data" / "digits.csv.gz" \
        if found and found.origin else None
    if csv is not None and csv.is_file():
        table = np.loadtxt(csv, delimiter=",", dtype=np.float32)
        x, y = table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    else:  # another layout of scikit-learn: its own loader
        from sklearn.datasets import load_digits

        d = load_digits()
        x, y = d.images.astype(np.float32), d.target.astype(np.int64)
    return x[:, None] / 16.0, y, None, None


def _synthetic(spec: DataSpec, seed: int) -> Arrays:
    from sklearn.datasets import make_classification

    s = spec.synthetic
    x, y = make_classification(
        n_samples=s.n_samples, n_features=s.n_features, n_informative=max(2, s.n_features // 2),
        n_redundant=0, n_classes=s.n_classes, n_clusters_per_class=1, class_sep=s.class_sep,
        random_state=seed)
    return x.astype(np.float32), y.astype(np.int64), None, None


def _idx(name: str) -> Callable[[DataSpec, int], Arrays]:
    def load(spec: DataSpec, seed: int) -> Arrays:
        paths = sources.fetch(name, data_dir=spec.data_dir, cache_dir=spec.cache_dir,
                              download=spec.download, mirror=spec.mirror)
        xtr, ytr, xte, yte = sources.load_idx_dataset(paths)
        scale = lambda a: a.astype(np.float32)[:, None] / 255.0  # noqa: E731
        return scale(xtr), ytr.astype(np.int64), scale(xte), yte.astype(np.int64)

    return load


def _cifar10(spec: DataSpec, seed: int) -> Arrays:
    paths = sources.fetch("cifar10", data_dir=spec.data_dir, cache_dir=spec.cache_dir,
                          download=spec.download, mirror=spec.mirror)
    xtr, ytr, xte, yte = sources.load_cifar10(paths["cifar-10-python.tar.gz"])
    return xtr.astype(np.float32) / 255.0, ytr, xte.astype(np.float32) / 255.0, yte


DATASETS: dict[str, Callable[[DataSpec, int], Arrays]] = {
    "digits": _digits,
    "synthetic": _synthetic,
    "mnist": _idx("mnist"),
    "fashion-mnist": _idx("fashion-mnist"),
    "cifar10": _cifar10,
}


# --------------------------------------------------------------------------- splits


def _stratified_split(y: np.ndarray, fraction: float, rng: np.random.Generator
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Indices (rest, held) with `fraction` of every class held out."""
    held = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        held.append(idx[: int(round(fraction * len(idx)))])
    held_idx = np.sort(np.concatenate(held)) if held else np.array([], dtype=np.int64)
    rest = np.setdiff1d(np.arange(len(y)), held_idx)
    return rest, held_idx


def _read(spec: DataSpec, seed: int, project_dir: Path | None, task: str | None) -> Raw:
    if spec.format != "builtin":
        return formats.read(spec, project_dir, task)
    if task == "regression":
        raise SpecError([f"task: 'regression', but data.name {spec.name!r} is a classification "
                         "dataset; allowed: task classification, or your own data with a "
                         "numeric target (data.format)"])
    x, y, x_test, y_test = DATASETS[spec.name](spec, seed)
    raw = Raw({"train": x}, {"train": y}, "classification")
    if x_test is not None and y_test is not None:
        raw.x["test"], raw.y["test"] = x_test, y_test
    return raw


def _random_split(y: np.ndarray, fraction: float, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Indices (rest, held) with `fraction` held out at random (regression targets)."""
    perm = rng.permutation(len(y))
    k = int(round(fraction * len(y)))
    return np.sort(perm[k:]), np.sort(perm[:k])


def load_data(spec: DataSpec, seed: int, project_dir: Path | None = None,
              task: str | None = None) -> DataBundle:
    """Load, split (stratified, by seed) and normalise with training-split statistics.

    Splits the data gives (an official test set, a user's val/test files) are kept; the
    rest are cut from the training data: `test_fraction` of everything, then
    `val_fraction` of everything."""
    raw = _read(spec, seed, project_dir, task)
    x, y = raw.x["train"], raw.y["train"]
    rng = np.random.default_rng(seed)
    regression = raw.task == "regression"
    cut = _random_split if regression else _stratified_split
    val_frac = spec.val_fraction  # of everything when there is no test split given
    if "test" in raw.x:
        x_test, y_test = raw.x["test"], raw.y["test"]
    else:
        rest, test_idx = cut(y, spec.test_fraction, rng)
        x_test, y_test, x, y = x[test_idx], y[test_idx], x[rest], y[rest]
        val_frac = spec.val_fraction / (1.0 - spec.test_fraction)
    if "val" in raw.x:
        train_idx, val_idx = np.arange(len(y)), None
        x_val, y_val = raw.x["val"], raw.y["val"]
    else:
        train_idx, val_idx = cut(y, val_frac, rng)
        x_val, y_val = x[val_idx], y[val_idx]
    for name, other in (("test", x_test), ("val", x_val)):
        if len(other) and other.shape[1:] != x.shape[1:]:
            where = raw.source.get(name, name)
            field = "data.target" if spec.format == "python" else "data.path"
            raise SpecError([f"{field}: samples of {where} have shape {other.shape[1:]}, "
                             f"those of the training split {x.shape[1:]}; allowed: the same "
                             "columns (or image size) in every split"])
    if spec.limit is not None:
        train_idx = np.sort(rng.permutation(train_idx)[: spec.limit])
    if len(train_idx) == 0:
        raise SpecError([f"data: no training sample is left of {len(y)} after the test and "
                         "validation splits; allowed: more data or smaller "
                         "data.test_fraction/val_fraction"])
    xt = torch.from_numpy(np.ascontiguousarray(x[train_idx]))
    dims = [0] + list(range(2, xt.dim())) if xt.dim() == 4 else [0]
    if spec.normalize:
        mean, std = xt.mean(dim=dims, keepdim=True)[0], xt.std(dim=dims, keepdim=True)[0]
        std = torch.where(std < 1e-6, torch.ones_like(std), std)  # constant pixels stay 0
    else:
        mean, std = torch.zeros(xt.shape[1:]), torch.ones(xt.shape[1:])
    if (raw.encoding or {}).get("mode") == "embedding":  # category codes stay codes
        k = len(raw.encoding["numeric"])
        mean, std = mean.clone(), std.clone()
        mean[..., k:], std[..., k:] = 0.0, 1.0

    y_mean, y_std = 0.0, 1.0
    if regression:  # MSE on z-scores: the scale of a target never sets the step size
        yt = y[train_idx].astype(np.float64)
        y_mean, y_std = float(yt.mean()), float(yt.std())
        y_std = y_std if y_std > 1e-12 else 1.0

    def split(xa: np.ndarray, ya: np.ndarray) -> Split:
        xs = (torch.from_numpy(np.ascontiguousarray(xa)) - mean) / std
        if regression:
            ys = (np.asarray(ya, dtype=np.float64) - y_mean) / y_std
            return Split(xs.float().contiguous(), torch.from_numpy(ys.astype(np.float32)))
        return Split(xs.float().contiguous(), torch.from_numpy(np.asarray(ya, dtype=np.int64)))

    ys = [a for a in (y, y_test, y_val) if len(a)]
    if regression:
        classes = 1  # one output: the predicted value
    else:
        classes = len(raw.classes) if raw.classes else int(max(a.max() for a in ys)) + 1
    return DataBundle(
        train=split(x[train_idx], y[train_idx]), val=split(x_val, y_val),
        test=split(x_test, y_test), input_shape=tuple(xt.shape[1:]), num_classes=classes,
        mean=mean, std=std, task=raw.task, classes=raw.classes, features=raw.features,
        encoding=raw.encoding, y_mean=y_mean, y_std=y_std)


# --------------------------------------------------------------------------- batches


def augment_batch(x: torch.Tensor, shift: int, noise_std: float,
                  g: torch.Generator) -> torch.Tensor:
    """Random shift (zero-pad then crop back, per sample) and additive Gaussian noise."""
    if shift > 0 and x.dim() == 4:
        b, _, h, w = x.shape
        padded = F.pad(x, (shift, shift, shift, shift))
        dy = torch.randint(0, 2 * shift + 1, (b,), generator=g)
        dx = torch.randint(0, 2 * shift + 1, (b,), generator=g)
        rows = (dy[:, None] + torch.arange(h))[:, :, None]  # b×h×1
        cols = (dx[:, None] + torch.arange(w))[:, None, :]  # b×1×w
        x = padded.permute(0, 2, 3, 1)[torch.arange(b)[:, None, None], rows, cols]
        x = x.permute(0, 3, 1, 2).contiguous()
    if noise_std > 0:
        x = x + noise_std * torch.randn(x.shape, generator=g)
    return x


class Batches:
    """Seeded, shardable mini-batches over a Split; a new order every epoch.

    The order depends only on (seed, epoch), so a resumed run sees exactly the batches an
    uninterrupted run would. With `world > 1` the permutation is padded to a multiple of
    `world` and rank r takes every world-th index, as DistributedSampler does.
    """

    def __init__(self, split: Split, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world: int = 1, shift: int = 0, noise_std: float = 0.0,
                 drop_last: bool = False):
        self.split, self.batch_size, self.shuffle, self.seed = split, batch_size, shuffle, seed
        self.rank, self.world, self.drop_last = rank, world, drop_last
        self.shift, self.noise_std = shift, noise_std
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        n = len(self.split)
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        idx = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        if self.world > 1:
            per_rank = -(-n // self.world)
            idx = torch.cat([idx, idx[: per_rank * self.world - n]])[self.rank :: self.world]
        return idx

    def shard_len(self) -> int:
        """How many samples `shard()` holds, without copying them."""
        return len(range(self.rank, len(self.split), self.world))

    def shard(self) -> Split:
        """This rank's samples, unaugmented and unpadded (a replay memory's source)."""
        if self.world == 1:
            return self.split
        idx = torch.arange(len(self.split))[self.rank::self.world]
        return Split(self.split.x[idx], self.split.y[idx])

    def __len__(self) -> int:
        n = -(-len(self.split) // self.world)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self._indices()
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch + 7_919)
        augment = self.shift > 0 or self.noise_std > 0
        for b in range(len(self)):
            sel = idx[b * self.batch_size : (b + 1) * self.batch_size]
            x = self.split.x[sel]
            if augment:
                x = augment_batch(x, self.shift, self.noise_std, g)
            yield x, self.split.y[sel]


def train_batches(bundle: DataBundle, spec: DataSpec, seed: int, rank: int = 0,
                  world: int = 1) -> Batches:
    aug = spec.augment if bundle.is_image else None
    if hasattr(bundle.train, "batches"):  # read piece by piece (core.loader)
        return bundle.train.batches(spec.batch_size, shuffle=True, seed=seed,
                                    shift=aug.shift if aug else 0,
                                    noise_std=aug.noise_std if aug else 0.0)
    return Batches(bundle.train, spec.batch_size, shuffle=True, seed=seed, rank=rank,
                   world=world, shift=aug.shift if aug else 0,
                   noise_std=aug.noise_std if aug else 0.0)


def eval_batches(split: Split, spec: DataSpec) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Evaluation batches in order; a split streamed by Ray Data (cluster.streaming) stays so."""
    if hasattr(split, "batches"):  # cluster.streaming.StreamSplit
        return split.batches(spec.eval_batch_size)
    return Batches(split, spec.eval_batch_size, shuffle=False)
