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

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from atoll.core import formats, rows
from atoll.core.data import DataBundle, Split, augment_batch
from atoll.core.spec import STREAM_FORMATS, DataSpec, ExperimentSpec, SpecError


def wanted(spec: ExperimentSpec) -> bool:
    """Whether this cluster run streams its data (`data.streaming`, auto: > AUTO_BYTES)."""
    d = spec.data
    if spec.mode != "cluster" or d.streaming is False or d.format not in STREAM_FORMATS \
            or spec.continual.stream != "none" or spec.cluster.strategy in ("pipeline", "hybrid"):
        return False  # (auto: a pipeline's stages must see the same rows; read whole)
    return d.streaming is True or rows.source_bytes(d, spec.project_dir) > rows.AUTO_BYTES


@dataclass
class StreamSplit(rows.HeadRows):
    """A split that stays in Ray Data: its pipeline of normalised {"x", "y"} rows, its row
    count and a few rows on the host (`x`/`y`: shapes, model checks, input examples)."""

    dataset: Any  # ray.data.Dataset (on a worker: its DataIterator shard)
    rows: int
    head: Split
    counts: torch.Tensor | None = None  # classification: rows per class (class weights)

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                shift: int = 0, noise_std: float = 0.0) -> StreamBatches:
        """All rows (`core.data.eval_batches` asks a split for these)."""
        return StreamBatches(self.dataset, self.rows, batch_size, shuffle=shuffle, seed=seed,
                             shift=shift, noise_std=noise_std)


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


def _table_sources(spec: DataSpec, path: Path, cpus: dict[str, Any],
                   numeric: list[str] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Lazy Ray Data reads of each split file; csv `numeric` columns as float64."""
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
                out[split] = ray.data.read_csv(
                    str(p), **cpus, convert_options=rows.csv_options(numeric),
                    parse_options=pacsv.ParseOptions(delimiter="\t" if tab else ","))
            out[split].schema()  # reads a header (and a first block for csv)
        except Exception as e:  # noqa: BLE001 - Ray wraps the reader's error in its own
            raise SpecError([f"data.path: cannot read {p} as {spec.format} "
                             f"({str(e).splitlines()[0][:200]}); allowed: a {spec.format} "
                             "file with a header row"]) from None
    return out, {s: str(p) for s, p in files.items()}


def _uniques(sources: dict[str, Any], columns: list[str]) -> dict[str, dict[str, list[Any]]]:
    """{split: {column: its distinct values}}: one Ray Data aggregation pass per source."""
    from ray.data.aggregate import Unique

    if not columns:
        return {s: {} for s in sources}
    out = {}
    for split, ds in sources.items():
        found = ds.aggregate(*(Unique(c, alias_name=c) for c in columns))
        if found is None:  # no row at all
            raise SpecError([f"data.path: the {split} split has no rows; allowed: a table "
                             "with data"])
        out[split] = {c: list(found[c]) for c in columns}
    return out


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


def _totals(ds: Any, fmt: str) -> dict[str, Any]:
    """Add up `rows.moments` of every batch on the driver (one small row per batch)."""
    out: dict[str, Any] = {}
    size = rows.MOMENT_ROWS.get(fmt, 4096)
    for part in ds.map_batches(rows.moments, batch_format="numpy", batch_size=size
                               ).iter_batches(batch_size=1, batch_format="numpy"):
        rows.add_moments(out, {k: v[0] for k, v in part.items()})
    return out


def _image_sources(spec: DataSpec, path: Path) -> tuple[dict[str, Any], list[str],
                                                        dict[str, str]]:
    """Ray Data rows {path, label} of an image folder's files (the listing only)."""
    import ray.data

    split_dirs, classes, files = rows.image_splits(path)
    out = {}
    for split, found in files.items():
        items = [{"path": p, "label": c, "key": k} for p, c, k in found]
        # a block per 256 files: the listing is small, each block's decode is not
        out[split] = ray.data.from_items(items,
                                         override_num_blocks=max(1, -(-len(items) // 256)))
    return out, classes, {s: str(d) for s, d in split_dirs.items()}


def _image_layout(spec: DataSpec, sources: dict[str, Any], classes: list[str]) -> rows.Layout:
    """Channels and size from a pass over the images' headers (no pixels decoded)."""
    sizes: dict[str, str] = {}
    all_grey = True
    for name, ds in sources.items():
        for part in ds.map_batches(rows.image_header, batch_format="numpy").iter_batches(
                batch_size=4096, batch_format="numpy"):
            for s, p in zip(part["size"].tolist(), part["path"].tolist(), strict=True):
                sizes.setdefault(s, p)
            if name == "train":  # channels: the training images decide
                all_grey = all_grey and bool(part["grey"].all())
    return rows.image_layout(spec, sizes, all_grey, classes)


def _table_layout(spec: DataSpec, task: str | None, sources: dict[str, Any],
                  where: dict[str, str]) -> tuple[rows.Layout, list[str]]:
    numeric, label_types = rows.check_columns(
        spec, {s: ds.schema() for s, ds in sources.items()}, where)
    regression = rows.is_regression(task, label_types)
    uniques = _uniques(sources, [*spec.categorical, *([] if regression else [spec.label])])
    return rows.table_layout(spec, task, numeric, label_types, uniques, where), numeric


def _cause(e: BaseException) -> BaseException:
    """The user's error inside Ray's wrappers (RayTaskError, UserCodeException). Ray Data
    passes on a task's exception as text only (UserCodeException keeps no cause), so a
    SpecError is read back from its one line in that text."""
    seen: set[int] = set()
    while id(e) not in seen and not isinstance(e, SpecError):
        seen.add(id(e))
        found = re.search(r"atoll\.core\.spec\.SpecError: (.+)", str(e))
        if found:
            return SpecError([found.group(1).strip()])
        nxt = getattr(e, "cause", None) or e.__cause__
        if not isinstance(nxt, BaseException):
            break
        e = nxt
    return e


def prepare(spec: ExperimentSpec) -> DataBundle:
    """The streamed splits of `spec.data` and what the model needs to know about them;
    needs a Ray connection. Bad data is a SpecError naming the file and column."""
    d = spec.data
    _data_context()
    path = formats.resolve(Path(d.path), spec.project_dir)  # type: ignore[arg-type]
    if not path.exists():
        raise SpecError([f"data.path: {path} does not exist; allowed: a {d.format} file or "
                         "folder (relative paths start at project_dir)"])
    cpus = task_args(spec)
    where = {"train": str(path)}
    try:
        return _prepare(spec, path, cpus, where)
    except SpecError:
        raise
    except Exception as e:  # noqa: BLE001 - a pass failed in a Ray task: the user's file
        cause = _cause(e)
        if isinstance(cause, SpecError):
            raise cause from None
        if isinstance(cause, (ValueError, OSError)):  # pyarrow's ArrowInvalid included
            raise rows.read_error(cause, where["train"], d.format) from None
        raise


def _prepare(spec: ExperimentSpec, path: Path, cpus: dict[str, Any], where: dict[str, str]
             ) -> DataBundle:
    d = spec.data
    key = None
    if d.format == "imagefolder":
        sources, classes, found = _image_sources(d, path)
        where.update(found)
        layout = _image_layout(d, sources, classes)
        key = "key"
    else:
        sources, found = _table_sources(d, path, cpus)
        where.update(found)
        layout, numeric = _table_layout(d, spec.task, sources, where)
        if d.format == "csv":  # read again, numeric columns as float64 throughout
            sources, _ = _table_sources(d, path, cpus, numeric)
    cut = rows.ranges(d, set(sources))
    raw = {}
    for split, keep in cut.items():
        source = sources.get(split, sources["train"])
        raw[split] = source if keep is None else source.map_batches(
            rows.select, fn_args=(spec.seed, keep, key), batch_format="pandas", **cpus)
    if d.limit is not None:
        raw["train"] = raw["train"].limit(d.limit)
    fmt = "numpy" if key else "pandas"
    stats = {s: _totals(ds.map_batches(layout, batch_format=fmt), d.format)
             for s, ds in raw.items()}
    layout = rows.Layout(**{f: getattr(layout, f) for f in layout.__dataclass_fields__})

    def make(name: str, final: rows.Layout, n: int, head: Split, counts: Any) -> StreamSplit:
        return StreamSplit(raw[name].map_batches(final, batch_format=fmt, **cpus), n, head,
                           counts)

    return rows.finish(d, layout, stats, where, make)
