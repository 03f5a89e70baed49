"""Data that stays in Ray Data: csv/parquet tables and image folders streamed to Ray Train
workers, never loaded whole by the driver or by a worker.

The driver reads the sources lazily with Ray Data, makes two streaming passes over them
(the categories and label values; then per-block sums of the encoded features and
targets, added up on the driver) and gets what a model needs: shapes, classes, the
training split's normalisation and row counts. The splits are Ray Data pipelines that
decode, encode and normalise rows on the fly; `TorchTrainer(datasets=...)` shards train
and val over the workers, and each worker iterates its shard with `StreamBatches`.

Splits: files the data gives (train/val/test files or folders) are kept; otherwise rows
go to test/val/train by a seeded hash of their content (a table row's values, an image's
path), so a split never depends on block order and duplicates never straddle splits.
The statistics match `core.data.load_data`'s on the same rows (tests check it).

Order and resume: execution keeps block order (`preserve_order`), each epoch shuffles
within a buffer seeded by (seed, epoch), so an epoch's batches are the same after a
resume; a resumed run restarts at the epoch boundary of its checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atoll.core import formats
from atoll.core.data import DataBundle, Split, augment_batch
from atoll.core.spec import STREAM_FORMATS, DataSpec, ExperimentSpec, SpecError

AUTO_BYTES = 1 << 30  # data.streaming: auto streams sources larger than this (cluster mode)
HEAD_ROWS = 4  # rows kept on the driver: model checks, input examples


def source_bytes(spec: DataSpec, project_dir: Path | None) -> int:
    """Total size of the files `spec` names (0 when it names none)."""
    if spec.path is None:
        return 0
    path = formats.resolve(Path(spec.path), project_dir)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() \
        else 0


def wanted(spec: ExperimentSpec) -> bool:
    """Whether this cluster run streams its data (`data.streaming`, auto: > AUTO_BYTES)."""
    d = spec.data
    if spec.mode != "cluster" or d.streaming is False or d.format not in STREAM_FORMATS \
            or spec.continual.stream != "none":
        return False
    return d.streaming is True or source_bytes(d, spec.project_dir) > AUTO_BYTES


@dataclass
class StreamSplit:
    """A split that stays in Ray Data: its pipeline of normalised {"x", "y"} rows, its row
    count and a few rows on the host (`x`/`y`: shapes, model checks, input examples)."""

    dataset: Any  # ray.data.Dataset (on a worker: its DataIterator shard)
    rows: int
    head: Split
    counts: torch.Tensor | None = None  # classification: rows per class (class weights)

    def __len__(self) -> int:
        return self.rows

    def batches(self, batch_size: int) -> StreamBatches:
        """In order, for evaluation (`core.data.eval_batches` asks a split for these)."""
        return StreamBatches(self.dataset, self.rows, batch_size, shuffle=False, seed=0)

    @property
    def x(self) -> torch.Tensor:
        return self.head.x

    @property
    def y(self) -> torch.Tensor:
        return self.head.y


class StreamBatches:
    """Mini-batches of a Ray Data split, a new seeded shuffle every epoch.

    `rows` is what this rank iterates (Ray Train's equal split: the dataset's rows // world),
    so every rank runs the same number of steps. Prefetching happens in Ray Data's
    threads; on CUDA the batches come in pinned memory for non-blocking copies."""

    def __init__(self, source: Any, rows: int, batch_size: int, *, shuffle: bool, seed: int,
                 drop_last: bool = False, pin_memory: bool = False, shift: int = 0,
                 noise_std: float = 0.0, prefetch: int = 2):
        self.source, self.rows, self.batch_size = source, rows, batch_size
        self.shuffle, self.seed, self.drop_last, self.pin = shuffle, seed, drop_last, pin_memory
        self.shift, self.noise_std, self.prefetch = shift, noise_std, prefetch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.rows // self.batch_size if self.drop_last else \
            -(-self.rows // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        kw: dict[str, Any] = {}
        if self.shuffle:
            kw = {"local_shuffle_buffer_size": max(8 * self.batch_size, 2048),
                  "local_shuffle_seed": self.seed * 100_003 + self.epoch}
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch + 7_919)
        augment = self.shift > 0 or self.noise_std > 0
        batches = self.source.iter_torch_batches(
            batch_size=self.batch_size, drop_last=self.drop_last, device="cpu",
            prefetch_batches=self.prefetch, pin_memory=self.pin, **kw)
        for n, batch in enumerate(batches, 1):
            x, y = batch["x"], batch["y"]
            if augment:
                x = augment_batch(x, self.shift, self.noise_std, g)
            yield x, y
            if n == len(self):  # a shard never yields more than its equal share
                return


# --------------------------------------------------------------------------- encoding


def _hash_unit(frame: Any, seed: int) -> np.ndarray:
    """A number in [0, 1) per row from its content and the seed (pandas' SipHash)."""
    import pandas as pd

    key = f"atoll{seed:011d}"[-16:]
    return pd.util.hash_pandas_object(frame, index=False, hash_key=key).to_numpy() / 2.0**64


@dataclass
class Layout:
    """How raw rows become {"x", "y"}: picklable, shipped to Ray Data's tasks."""

    fmt: str
    label: str
    numeric: list[str] = field(default_factory=list)
    categories: dict[str, list[str]] = field(default_factory=dict)
    embed: bool = False
    task: str = "classification"
    values: list[Any] | None = None  # classification: the label value of each index
    image_size: tuple[int, int] | None = None
    channels: int = 1
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    y_mean: float = 0.0
    y_std: float = 1.0

    def __call__(self, batch: Any, encoded: bool = False) -> dict[str, np.ndarray]:
        """Raw rows (or, `encoded`, unnormalised {"x", "y"}) to normalised {"x", "y"}."""
        if encoded:
            x, y = batch["x"], batch["y"]
        else:
            x, y = (self._images if self.fmt == "imagefolder" else self._table)(batch)
        if self.mean is not None:
            x = ((x - self.mean) / self.std).astype(np.float32)
        if self.task == "regression":
            y = ((y.astype(np.float64) - self.y_mean) / self.y_std).astype(np.float32)
        return {"x": x, "y": y}

    def _table(self, df: Any) -> tuple[np.ndarray, np.ndarray]:
        parts = [df[self.numeric].to_numpy(dtype=np.float32)]
        for c, cats in self.categories.items():
            index = {v: i for i, v in enumerate(cats)}
            codes = df[c].astype(str).map(index).to_numpy(dtype=np.int64)
            parts.append(codes[:, None].astype(np.float32) if self.embed else
                         np.eye(len(cats), dtype=np.float32)[codes])
        x = np.concatenate(parts, axis=1)
        return x, self._labels(df[self.label].to_numpy())

    def _labels(self, raw: np.ndarray) -> np.ndarray:
        if self.task == "regression":
            return raw.astype(np.float64)
        if self.values and isinstance(self.values[0], int):
            return np.searchsorted(np.array(self.values), raw.astype(np.int64)).astype(np.int64)
        index = {v: i for i, v in enumerate(self.values or [])}
        return np.array([index[str(v)] for v in raw.tolist()], dtype=np.int64)

    def _images(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        from PIL import Image

        from atoll.core.images import _open, _pixels

        xs = []
        for p in batch["path"].tolist():
            with _open(Image.open(p), p) as img:
                xs.append(_pixels(img, p, self.channels, self.image_size))
        return np.stack(xs).astype(np.float32), batch["label"].astype(np.int64)


def _moments(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One row of sums per block: count, Σx, Σx², non-finite features, Σy, Σy²."""
    x = batch["x"].astype(np.float64)
    y = batch["y"].astype(np.float64)
    flat = x.reshape(len(x), x.shape[1], -1)  # images: per channel; tables: per column
    bad = ~np.isfinite(x).reshape(len(x), -1)
    k = min(len(x), HEAD_ROWS)  # the first rows, for the driver's examples
    hx = np.zeros((1, HEAD_ROWS, *x.shape[1:]), dtype=np.float32)
    hy = np.zeros((1, HEAD_ROWS), dtype=batch["y"].dtype)
    hx[0, :k], hy[0, :k] = batch["x"][:k], batch["y"][:k]
    return {"hx": hx, "hy": hy, "hn": np.array([k]), "n": np.array([len(x)]),
            "px": np.array([flat.shape[2]]),
            "s": flat.sum(axis=(0, 2))[None], "ss": (flat * flat).sum(axis=(0, 2))[None],
            "bad": bad.sum(axis=0)[None], "ys": np.array([y.sum()]),
            "yss": np.array([(y * y).sum()]), "ynan": np.array([int(np.isnan(y).sum())]),
            "counts": np.bincount(batch["y"], minlength=1)[None]  # class indices
            if batch["y"].dtype.kind in "iu" else np.zeros((1, 1), dtype=np.int64)}


def _totals(ds: Any) -> dict[str, Any]:
    """Add up `_moments` of every block on the driver (one small row per block)."""
    out: dict[str, Any] = {}
    for part in ds.map_batches(_moments, batch_format="numpy", batch_size=4096
                               ).iter_batches(batch_size=1, batch_format="numpy"):
        for k, v in part.items():
            v = v[0]
            if k in ("hx", "hy", "hn"):
                out.setdefault(k, v)  # the first block's
            elif k == "counts":
                have = out.get(k, np.zeros(0, dtype=np.int64))
                size = max(len(have), len(v))
                v = np.pad(v, (0, size - len(v))) + np.pad(have, (0, size - len(have)))
                out[k] = v
            elif k == "px":
                out[k] = v
            else:
                out[k] = out.get(k, 0) + v
    return out


# --------------------------------------------------------------------------- sources


def _data_context() -> None:
    import logging

    import ray.data

    # Ray Data logs every execution plan at INFO to the console; its own log file keeps them
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the same rows in the same order each time
    ctx.enable_progress_bars = False  # the run's own progress shows; Ray's would interleave


def task_args(spec: ExperimentSpec) -> dict[str, Any]:
    """Resources of each Ray Data task of the training pipeline. Ray Train's workers hold
    their CPUs for the whole run; on a cluster with no CPU to spare beside them a read task
    would never be scheduled and the run would wait forever, so there the tasks ask for
    none and share the workers' cores, two at a time (a task of no CPU is otherwise
    unbounded: Ray would start a process per block)."""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    held = spec.cluster.num_workers * spec.cluster.cpus_per_worker
    return {"num_cpus": 1.0} if total - held >= 1 else {"num_cpus": 0.0, "concurrency": 2}


def _table_sources(spec: DataSpec, path: Path, cpus: dict[str, Any]
                   ) -> tuple[dict[str, Any], dict[str, str]]:
    import ray.data

    suffixes = (".csv", ".tsv") if spec.format == "csv" else (".parquet", ".pq")
    files = formats._split_files(path, suffixes, spec.format)
    out = {}
    for split, p in files.items():
        try:
            if spec.format == "parquet":
                out[split] = ray.data.read_parquet(str(p), **cpus)
            else:
                import pyarrow.csv as pacsv

                tab = p.suffix.lower() == ".tsv"
                out[split] = ray.data.read_csv(str(p), **cpus,
                                               parse_options=pacsv.ParseOptions(
                    delimiter="\t" if tab else ","))
            out[split].schema()  # reads a header (and a first block for csv)
        except Exception as e:  # noqa: BLE001 - Ray wraps the reader's error in its own
            raise SpecError([f"data.path: cannot read {p} as {spec.format} "
                             f"({str(e).splitlines()[0][:200]}); allowed: a {spec.format} "
                             "file with a header row"]) from None
    return out, {s: str(p) for s, p in files.items()}


def _columns(spec: DataSpec, sources: dict[str, Any], where: dict[str, str]
             ) -> tuple[list[str], dict[str, Any]]:
    """Numeric feature columns (checked by the schema) and the label's arrow type."""
    import pyarrow as pa

    schemas = {s: ds.schema() for s, ds in sources.items()}
    for split, schema in schemas.items():
        frame = _Columns(list(schema.names))
        formats._column_check(frame, spec.label, "data.label", where[split])
        for col in [*(spec.features or []), *spec.categorical]:
            formats._column_check(frame, col, "data.categorical" if col in spec.categorical
                                  else "data.features", where[split])
    first = schemas["train"]
    features = spec.features or [c for c in first.names if c != spec.label]
    if not features:
        raise SpecError([f"data.features: {where['train']} has no column besides the label "
                         f"{spec.label!r}; allowed: a table with feature columns"])
    numeric = [c for c in features if c not in spec.categorical]
    for split, schema in schemas.items():
        types = dict(zip(schema.names, schema.types, strict=True))
        for col in numeric:
            t = types.get(col)
            if t is None:
                formats._column_check(_Columns(list(types)), col, "data.features", where[split])
            if not (pa.types.is_integer(t) or pa.types.is_floating(t) or
                    pa.types.is_boolean(t) or pa.types.is_null(t)):
                raise SpecError([f"data.features: column {col!r} of {where[split]} is not "
                                 f"numeric ({t}); allowed: numeric columns, or list it in "
                                 "data.categorical to one-hot encode it"])
    label_types = {s: dict(zip(sc.names, sc.types, strict=True))[spec.label]
                   for s, sc in schemas.items()}
    return numeric, label_types


@dataclass
class _Columns:
    """What `formats._column_check` reads of a frame: its column names."""

    columns: list[str]


def _uniques(sources: dict[str, Any], columns: list[str]) -> dict[str, dict[str, list[Any]]]:
    """{split: {column: its distinct values}}: one Ray Data aggregation pass per source."""
    from ray.data.aggregate import Unique

    if not columns:
        return {s: {} for s in sources}
    out = {}
    for split, ds in sources.items():
        found = ds.aggregate(*(Unique(c, alias_name=c) for c in columns))
        out[split] = {c: list(found[c]) for c in columns}
    return out


def _label_values(spec: DataSpec, task: str | None, uniques: dict[str, dict[str, list[Any]]],
                  types: dict[str, Any], where: dict[str, str]
                  ) -> tuple[str, list[Any] | None]:
    """(task, the label value of each class index) as `formats.encode_labels` decides them."""
    import pyarrow as pa

    kinds = {("f" if pa.types.is_floating(t) else "i" if pa.types.is_integer(t) or
              pa.types.is_boolean(t) else "O") for t in types.values()}
    if task is None:
        task = "regression" if kinds == {"f"} else "classification"
    if task == "regression":
        if "O" in kinds:
            bad = next(s for s, t in types.items() if not (pa.types.is_floating(t) or
                                                           pa.types.is_integer(t)))
            raise SpecError([f"data.label: column {spec.label!r} of {where[bad]} is not "
                             f"numeric ({types[bad]}); allowed with task regression: numbers"])
        return task, None
    values = []
    for split, found in uniques.items():
        if any(v is None or v != v for v in found[spec.label]):
            raise SpecError([f"data.label: column {spec.label!r} of {where[split]} has missing "
                             "values; allowed: a label in every row (drop or fill them)"])
        values += found[spec.label]
    if kinds <= {"i", "f"}:
        if not all(float(v) == round(float(v)) for v in values):
            raise SpecError([f"data.label: column {spec.label!r} holds non-integer numbers; "
                             "allowed with task classification: integer or text labels (or "
                             "task: regression)"])
        return task, sorted({int(v) for v in values})
    return task, sorted({str(v) for v in values})


def _hash_split(ds: Any, seed: int, keep: tuple[float, float], key: str | None,
                cpus: dict[str, Any]) -> Any:
    """Rows whose seeded content hash falls in [lo, hi)."""
    lo, hi = keep

    def select(df: Any) -> Any:
        u = _hash_unit(df[[key]] if key else df, seed)
        return df[(u >= lo) & (u < hi)]

    return ds.map_batches(select, batch_format="pandas", **cpus)


def _splits(spec: DataSpec, seed: int, sources: dict[str, Any], key: str | None,
            cpus: dict[str, Any]) -> dict[str, Any]:
    """Sources for train/val/test: the ones given, the rest cut from train by hash (the
    fractions of `core.data.load_data`: test of everything, val of everything)."""
    train = sources["train"]
    out = dict(sources)
    test_frac = 0.0 if "test" in sources else spec.test_fraction
    val_frac = 0.0 if "val" in sources else spec.val_fraction
    if "test" not in sources:
        out["test"] = _hash_split(train, seed, (0.0, test_frac), key, cpus)
    if "val" not in sources:
        out["val"] = _hash_split(train, seed, (test_frac, test_frac + val_frac), key, cpus)
    out["train"] = _hash_split(train, seed, (test_frac + val_frac, 1.0), key, cpus) \
        if test_frac + val_frac > 0 else train
    return out


# --------------------------------------------------------------------------- prepare


def _image_sources(spec: DataSpec, path: Path) -> tuple[dict[str, Any], list[str],
                                                        dict[str, str]]:
    """Ray Data rows {path, label} of an image folder's files (the listing only)."""
    import ray.data

    from atoll.core.images import class_folders

    split_dirs = {s: path / n for s, names in formats.SPLIT_NAMES.items() for n in names
                  if (path / n).is_dir()}
    if "train" not in split_dirs:
        split_dirs = {"train": path}
    classes = list(class_folders(split_dirs["train"]))
    out = {}
    for split, d in split_dirs.items():
        found = class_folders(d)
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise SpecError([f"data.path: class folder {d / unknown[0]} is not a class of the "
                             f"training split ({', '.join(classes)}); allowed: the same class "
                             "folders in every split"])
        rows = [{"path": str(f), "label": classes.index(c)} for c, fs in found.items()
                for f in fs]
        # a block per 1,000 files: the listing is small, each block's decode is not
        out[split] = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // 1000)))
    return out, classes, {s: str(d) for s, d in split_dirs.items()}


def _image_header(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from PIL import Image

    from atoll.core.images import GREY_MODES, _open

    sizes, grey = [], []
    for p in batch["path"].tolist():
        with _open(Image.open(p), p) as img:
            sizes.append(f"{img.size[1]}x{img.size[0]}")
            grey.append(img.mode in GREY_MODES)
    return {"path": batch["path"], "size": np.array(sizes), "grey": np.array(grey)}


def _image_layout(spec: DataSpec, sources: dict[str, Any], classes: list[str]) -> Layout:
    """Channels and size from a pass over the images' headers (no pixels decoded)."""
    sizes: dict[str, str] = {}
    all_grey = True
    for ds in sources.values():
        for part in ds.map_batches(_image_header, batch_format="numpy").iter_batches(
                batch_size=4096, batch_format="numpy"):
            for s, p in zip(part["size"].tolist(), part["path"].tolist(), strict=True):
                sizes.setdefault(s, p)
            all_grey = all_grey and bool(part["grey"].all())
    if spec.image_size is None and len(sizes) > 1:
        (s1, n1), (s2, n2) = list(sizes.items())[:2]
        raise SpecError([f"data.image_size: images differ in size ({n1}: {s1}, {n2}: {s2}, "
                         f"{len(sizes)} sizes in all); allowed: data.image_size: [height, "
                         "width] to resize every image"])
    channels = spec.channels or (1 if all_grey else 3)
    return Layout("imagefolder", "label", task="classification", values=list(classes),
                  image_size=spec.image_size, channels=channels)


def _table_layout(spec: DataSpec, task: str | None, sources: dict[str, Any],
                  where: dict[str, str]) -> Layout:
    import pyarrow as pa

    numeric, label_types = _columns(spec, sources, where)
    regression = task == "regression" or (
        task is None and all(pa.types.is_floating(t) for t in label_types.values()))
    uniques = _uniques(sources, [*spec.categorical, *([] if regression else [spec.label])])
    task, values = _label_values(spec, task, uniques, label_types, where)
    for split, found in uniques.items():
        for c in spec.categorical:
            if any(v is None or v != v for v in found[c]):
                raise SpecError([f"data.categorical: column {c!r} of {where[split]} has "
                                 "missing values; allowed: fill them (a category of its own, "
                                 "e.g. 'unknown') or drop those rows"])
    categories = {c: sorted({str(v) for found in uniques.values() for v in found[c]})
                  for c in spec.categorical}
    return Layout(spec.format, spec.label, numeric, categories,
                  spec.categorical_encoding == "embedding", task, values)


def prepare(spec: ExperimentSpec) -> DataBundle:
    """The streamed splits of `spec.data` and what the model needs to know about them;
    needs a Ray connection. Bad data is a SpecError naming the file and column."""
    d = spec.data
    _data_context()
    path = formats.resolve(Path(d.path), spec.project_dir)  # type: ignore[arg-type]
    if not path.exists():
        raise SpecError([f"data.path: {path} does not exist; allowed: a {d.format} file or "
                         "folder (relative paths start at project_dir)"])
    key = None
    cpus = task_args(spec)
    if d.format == "imagefolder":
        sources, classes, where = _image_sources(d, path)
        layout = _image_layout(d, sources, classes)
        key = "path"
    else:
        sources, where = _table_sources(d, path, cpus)
        layout = _table_layout(d, spec.task, sources, where)
    raw = _splits(d, spec.seed, sources, key, cpus)
    if d.limit is not None:
        raw["train"] = raw["train"].limit(d.limit)
    encoded = {s: ds.map_batches(layout, batch_format="numpy" if key else "pandas")
               for s, ds in raw.items()}
    stats = {s: _totals(ds) for s, ds in encoded.items()}
    layout = dataclasses.replace(layout)  # the pass above keeps the raw one
    _check_stats(stats, layout, where)
    train = stats["train"]
    n = int(train.get("n", 0))
    if n == 0:
        raise SpecError([f"data: no training sample is left of {where['train']} after the "
                         "test and validation splits; allowed: more data or smaller "
                         "data.test_fraction/val_fraction"])
    width = len(train["s"])
    count = n * int(train["px"])
    mean = train["s"] / count
    var = (train["ss"] - count * mean**2) / max(count - 1, 1)
    std = np.sqrt(np.maximum(var, 0.0))
    std = np.where(std < 1e-6, 1.0, std)
    if not d.normalize:
        mean, std = np.zeros(width), np.ones(width)
    if layout.embed:  # category codes stay codes
        k = len(layout.numeric)
        mean[k:], std[k:] = 0.0, 1.0
    image = layout.fmt == "imagefolder"
    shape = (-1, 1, 1) if image else (-1,)
    layout.mean, layout.std = (mean.reshape(shape).astype(np.float32),
                               std.reshape(shape).astype(np.float32))
    if layout.task == "regression":
        y_mean = float(train["ys"] / n)
        y_std = math.sqrt(max(float(train["yss"] / n) - y_mean**2, 0.0))
        layout.y_mean, layout.y_std = y_mean, (y_std if y_std > 1e-12 else 1.0)
    final = {s: ds.map_batches(layout, batch_format="numpy" if key else "pandas",
                               **cpus)
             for s, ds in raw.items()}
    heads = {s: _head(stats[s], layout) for s in final if stats[s]}
    input_shape = tuple(heads["train"].x.shape[1:])
    for s in final:  # an empty split: no rows, the right shapes
        heads.setdefault(s, Split(heads["train"].x[:0], heads["train"].y[:0]))
    classes = len(layout.values or []) if layout.task == "classification" else 1
    counts = None
    if layout.task == "classification":
        c = np.pad(train["counts"], (0, max(classes - len(train["counts"]), 0)))
        counts = torch.from_numpy(c[:classes].astype(np.int64))
    splits = {s: StreamSplit(final[s], int(stats[s].get("n", 0)), heads[s],
                             counts if s == "train" else None) for s in final}
    features, encoding = None, None
    if not image:
        cats = layout.categories
        features = layout.numeric + (list(cats) if layout.embed else
                                     [f"{c}={v}" for c, vs in cats.items() for v in vs])
        encoding = {"numeric": layout.numeric, "categorical": cats,
                    "mode": d.categorical_encoding}
        if layout.embed:
            encoding["dims"] = [d.embedding_dim or min(16, (len(cats[c]) + 1) // 2)
                                for c in d.categorical]
    bundle = DataBundle(
        train=splits["train"], val=splits["val"], test=splits["test"],  # type: ignore[arg-type]
        input_shape=input_shape, num_classes=classes,
        mean=torch.from_numpy(layout.mean), std=torch.from_numpy(layout.std),
        task=layout.task, classes=layout.values, features=features, encoding=encoding,
        y_mean=layout.y_mean, y_std=layout.y_std)
    _check_classes(bundle, stats, where)
    return bundle


def _head(stats: dict[str, Any], layout: Layout) -> Split:
    """The first rows the pass kept, normalised as the pipeline will normalise them."""
    k = int(stats["hn"])
    out = layout({"x": stats["hx"][:k], "y": stats["hy"][:k]}, encoded=True)
    dtype = torch.float32 if layout.task == "regression" else torch.int64
    return Split(torch.tensor(out["x"]), torch.tensor(np.asarray(out["y"])).to(dtype))


def _check_stats(stats: dict[str, dict[str, Any]], layout: Layout, where: dict[str, str]
                 ) -> None:
    """Missing or infinite values, found by the pass instead of by pandas."""
    for split, st in stats.items():
        if not st:
            continue
        src = where.get(split, where["train"])
        if st["ynan"]:
            raise SpecError([f"data.label: column {layout.label!r} of {src} has "
                             f"{int(st['ynan'])} missing values; allowed: a label in every row "
                             "(drop or fill them)"])
        bad = np.asarray(st["bad"])
        if bad.any() and layout.fmt != "imagefolder":
            col = layout.numeric[int(np.flatnonzero(bad)[0])] \
                if int(np.flatnonzero(bad)[0]) < len(layout.numeric) else "?"
            raise SpecError([f"data.features: column {col!r} of {src} has "
                             f"{int(bad[np.flatnonzero(bad)[0]])} missing or infinite values; "
                             "allowed: finite numbers (fill or drop them before training)"])


def _check_classes(bundle: DataBundle, stats: dict[str, dict[str, Any]], where: dict[str, str]
                   ) -> None:
    if bundle.task != "classification":
        return
    seen = {i for i, c in enumerate(stats["train"].get("counts", [])) if c > 0}
    if len(seen) < 2:
        raise SpecError([f"data.label: the labels of {where['train']} hold "
                         f"{len(seen)} class; allowed: two or more classes"])
    for split in ("val", "test"):
        counts = stats[split].get("counts", np.zeros(0))
        extra = [i for i, c in enumerate(counts) if c > 0 and i not in seen]
        if extra:
            name = (bundle.classes or [])[extra[0]]
            raise SpecError([f"data.label: class {name!r} of {where.get(split, split)} is not "
                             "in the training split; allowed: classes the training data has"])


def describe(bundle: DataBundle) -> dict[str, Any]:
    """What a worker needs besides its shards (JSON-able, small)."""
    def head(s: StreamSplit) -> dict[str, Any]:
        return {"rows": s.rows, "x": s.head.x.tolist(), "y": s.head.y.tolist()}

    return {"train": head(bundle.train), "val": head(bundle.val),  # type: ignore[arg-type]
            "test": head(bundle.test),  # type: ignore[arg-type]
            "counts": None if bundle.train.counts is None  # type: ignore[union-attr]
            else bundle.train.counts.tolist(),  # type: ignore[union-attr]
            "input_shape": list(bundle.input_shape), "num_classes": bundle.num_classes,
            "mean": bundle.mean.tolist(), "std": bundle.std.tolist(), "task": bundle.task,
            "classes": bundle.classes, "features": bundle.features,
            "encoding": bundle.encoding, "y_mean": bundle.y_mean, "y_std": bundle.y_std}


def on_worker(info: dict[str, Any], shards: dict[str, Any]) -> DataBundle:
    """The bundle a Ray Train worker trains from: its train/val shards and the driver's
    statistics (`describe`)."""
    regression = info["task"] == "regression"

    def split(name: str) -> StreamSplit:
        h = info[name]
        x = torch.tensor(h["x"], dtype=torch.float32)
        y = torch.tensor(h["y"], dtype=torch.float32 if regression else torch.int64)
        counts = torch.tensor(info["counts"]) if name == "train" and info["counts"] else None
        return StreamSplit(shards.get(name), h["rows"], Split(x, y), counts)

    return DataBundle(
        train=split("train"), val=split("val"), test=split("test"),  # type: ignore[arg-type]
        input_shape=tuple(info["input_shape"]), num_classes=info["num_classes"],
        mean=torch.tensor(info["mean"]), std=torch.tensor(info["std"]), task=info["task"],
        classes=info["classes"], features=info["features"], encoding=info["encoding"],
        y_mean=info["y_mean"], y_std=info["y_std"])
