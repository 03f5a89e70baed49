"""Local mode for data that does not fit in memory: csv/parquet tables and image folders
read piece by piece by `torch.utils.data.DataLoader` worker processes.

A piece is a parquet row group, a csv file, or 256 files of an image folder. Before
training, one pass reads the distinct categories and labels (only those columns), and one
more reads every piece, encodes it (`core.rows.Layout`) and adds up the sums the training
split's normalisation needs; nothing is kept but those sums and each piece's row counts.
During training each worker process takes every k-th piece of a seeded, epoch-dependent
order, shuffles its rows within a buffer (seeded by seed, epoch and worker) and yields
whole batches, pinned on CUDA, `prefetch_factor` ahead. The order depends only on
(seed, epoch, workers), so a resumed run sees the epoch it would have seen.

The in-memory path (`core.data`) stays the default for data that fits: it is faster and
its splits are stratified.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from atoll.core import formats, rows
from atoll.core.data import DataBundle, Split, augment_batch
from atoll.core.spec import STREAM_FORMATS, DataSpec, ExperimentSpec, SpecError

IMAGES_PER_PIECE = 256
CSV_BLOCK = 1 << 22  # bytes of csv text per parsed block


def wanted(spec: ExperimentSpec) -> bool:
    """Whether this local run streams its data (`data.streaming`; auto: > 1 GiB)."""
    d = spec.data
    if spec.mode != "local" or d.streaming is False or d.format not in STREAM_FORMATS \
            or spec.continual.stream != "none":
        return False
    return d.streaming is True or rows.source_bytes(d, spec.project_dir) > rows.AUTO_BYTES


# --------------------------------------------------------------------------- pieces


@dataclass
class Source:
    """How to read one split's pieces (picklable: it travels to the worker processes).
    `keep`: the split's hash range of the rows (None: every row); `layout` encodes."""

    fmt: str
    pieces: list[tuple[str, int]]  # (file, parquet row group | first image index)
    layout: rows.Layout
    seed: int
    keep: tuple[float, float] | None = None
    images: list[tuple[str, int, str]] = field(default_factory=list)  # (file, class, key)
    numeric: list[str] | None = None  # csv: read as float64 (core.rows.csv_options)

    def frames(self, piece: tuple[str, int], columns: list[str] | None = None
               ) -> Iterator[Any]:
        """The raw rows of `piece` in batches, this split's only: pandas frames for tables,
        {path, label} arrays for images."""
        path, index = piece
        if self.fmt == "imagefolder":
            chunk = self.images[index:index + IMAGES_PER_PIECE]
            import pandas as pd

            frame = pd.DataFrame(chunk, columns=["path", "label", "key"])
            frame = rows.select(frame, self.seed, self.keep, "key")
            yield {"path": frame["path"].to_numpy(), "label": frame["label"].to_numpy()}
            return
        for batch in _table_batches(self.fmt, path, index, columns, self.numeric):
            frame = batch.to_pandas()
            yield frame if columns else rows.select(frame, self.seed, self.keep, None)

    def encoded(self, piece: tuple[str, int]) -> Iterator[dict[str, np.ndarray]]:
        for frame in self.frames(piece):
            if len(frame["path"] if isinstance(frame, dict) else frame):
                yield self.layout(frame)


def _table_batches(fmt: str, path: str, group: int, columns: list[str] | None,
                   numeric: list[str] | None = None) -> Iterator[Any]:
    """Arrow record batches of one piece; a read failure names the file (one line)."""
    try:
        yield from _arrow_batches(fmt, path, group, columns, numeric)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise rows.read_error(e, path, fmt) from None


def _arrow_batches(fmt: str, path: str, group: int, columns: list[str] | None,
                   numeric: list[str] | None) -> Iterator[Any]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if fmt == "parquet":
        yield from pq.ParquetFile(path).iter_batches(batch_size=65_536, row_groups=[group],
                                                     columns=columns)
        return
    tab = path.lower().endswith(".tsv")
    reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=CSV_BLOCK),
                            parse_options=pacsv.ParseOptions(delimiter="\t" if tab else ","),
                            convert_options=rows.csv_options(numeric))
    for batch in reader:
        yield batch.select(columns) if columns else batch


def _table_pieces(spec: DataSpec, path: Path) -> tuple[dict[str, list[tuple[str, int]]],
                                                       dict[str, Any], dict[str, str]]:
    """Pieces, arrow schema and file name of each split file."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    suffixes = (".csv", ".tsv") if spec.format == "csv" else (".parquet", ".pq")
    files = formats._split_files(path, suffixes, spec.format)
    pieces, schemas = {}, {}
    for split, p in files.items():
        try:
            if spec.format == "parquet":
                meta = pq.ParquetFile(p)
                pieces[split] = [(str(p), g) for g in range(meta.num_row_groups)]
                schemas[split] = meta.schema_arrow
            else:
                tab = p.suffix.lower() == ".tsv"
                reader = pacsv.open_csv(p, read_options=pacsv.ReadOptions(block_size=CSV_BLOCK),
                                        parse_options=pacsv.ParseOptions(
                                            delimiter="\t" if tab else ","),
                                        convert_options=rows.csv_options())
                schemas[split] = reader.schema
                reader.close()
                pieces[split] = [(str(p), 0)]
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise SpecError([f"data.path: cannot read {p} as {spec.format} "
                             f"({str(e).splitlines()[0][:200]}); allowed: a {spec.format} "
                             "file with a header row"]) from None
    return pieces, schemas, {s: str(p) for s, p in files.items()}


# --------------------------------------------------------------------------- batches


class _Pieces(IterableDataset):
    """One epoch of a split: worker w of W reads pieces order[w::W] and yields batches."""

    def __init__(self, source: Source, order: list[int], batch_size: int, shuffle: bool,
                 seed: int, epoch: int):
        super().__init__()
        self.source, self.order, self.batch_size = source, order, batch_size
        self.shuffle, self.seed, self.epoch = shuffle, seed, epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        wid, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = np.random.default_rng([self.seed, self.epoch, wid])
        cap = max(8 * self.batch_size, 2048)
        xs: list[np.ndarray] = []
        ys: list[np.ndarray] = []
        held = 0
        for i in self.order[wid::workers]:
            for part in self.source.encoded(self.source.pieces[i]):
                xs.append(part["x"])
                ys.append(part["y"])
                held += len(part["y"])
                if held >= cap:
                    x, y = _mixed(xs, ys, rng if self.shuffle else None)
                    full = len(y) // self.batch_size * self.batch_size
                    yield from _cut(x[:full], y[:full], self.batch_size)
                    xs, ys, held = [x[full:]], [y[full:]], len(y) - full
        if held:
            x, y = _mixed(xs, ys, rng if self.shuffle else None)
            yield from _cut(x, y, self.batch_size)


def _mixed(xs: list[np.ndarray], ys: list[np.ndarray], rng: np.random.Generator | None
           ) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.concatenate(xs), np.concatenate(ys)
    if rng is None:
        return x, y
    perm = rng.permutation(len(y))
    return x[perm], y[perm]


def _cut(x: np.ndarray, y: np.ndarray, size: int
         ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for i in range(0, len(y), size):
        yield torch.from_numpy(np.ascontiguousarray(x[i:i + size])), \
            torch.from_numpy(np.ascontiguousarray(y[i:i + size]))


class LoaderBatches:
    """Mini-batches of a streamed split from DataLoader worker processes; a new seeded
    piece order and shuffle every epoch (`set_epoch`), as `core.data.Batches` has."""

    def __init__(self, split: LoaderSplit, batch_size: int, *, shuffle: bool, seed: int,
                 workers: int, pin_memory: bool = False, shift: int = 0,
                 noise_std: float = 0.0):
        self.split, self.batch_size, self.shuffle, self.seed = split, batch_size, shuffle, seed
        self.workers, self.pin, self.shift, self.noise_std = workers, pin_memory, shift, noise_std
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> list[int]:
        n = len(self.split.source.pieces)
        if not self.shuffle:
            return list(range(n))
        return np.random.default_rng([self.seed, self.epoch]).permutation(n).tolist()

    def __len__(self) -> int:
        """Each worker yields ceil(its rows / batch) batches."""
        order, w = self._order(), max(self.workers, 1)
        per_worker = [sum(self.split.piece_rows[i] for i in order[k::w]) for k in range(w)]
        return sum(-(-n // self.batch_size) for n in per_worker)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        data = _Pieces(self.split.source, self._order(), self.batch_size, self.shuffle,
                       self.seed, self.epoch)
        loader = DataLoader(data, batch_size=None, num_workers=self.workers,
                            pin_memory=self.pin, prefetch_factor=2 if self.workers else None,
                            persistent_workers=False)
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch + 7_919)
        augment = self.shift > 0 or self.noise_std > 0
        for x, y in loader:
            yield (augment_batch(x, self.shift, self.noise_std, g) if augment else x), y


@dataclass
class LoaderSplit(rows.HeadRows):
    """A split read from its files on demand: its Source, row counts (in all and per
    piece) and a few rows on the host (`x`/`y`: shapes, model checks, input examples)."""

    source: Source
    rows: int
    piece_rows: list[int]
    head: Split
    counts: torch.Tensor | None = None
    workers: int = 2

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                shift: int = 0, noise_std: float = 0.0) -> LoaderBatches:
        return LoaderBatches(self, batch_size, shuffle=shuffle, seed=seed,
                             workers=self.workers, pin_memory=torch.cuda.is_available(),
                             shift=shift, noise_std=noise_std)


# --------------------------------------------------------------------------- prepare


def _uniques(sources: dict[str, Source], columns: list[str]) -> dict[str, dict[str, list[Any]]]:
    """{split: {column: distinct values}}, reading only those columns."""
    import pyarrow.compute as pc

    out: dict[str, dict[str, list[Any]]] = {}
    for split, src in sources.items():
        found: dict[str, set[Any]] = {c: set() for c in columns}
        if columns:
            for piece in src.pieces:
                for batch in _table_batches(src.fmt, piece[0], piece[1], columns):
                    for c in columns:
                        found[c].update(pc.unique(batch.column(c)).to_pylist())
                if not found[columns[0]]:
                    raise SpecError([f"data.path: {src.pieces[0][0]} has no rows; allowed: a "
                                     "table with data"])
        out[split] = {c: list(v) for c, v in found.items()}
    return out


def _image_header(src: Source) -> tuple[dict[str, str], bool]:
    sizes: dict[str, str] = {}
    grey = True
    for i in range(0, len(src.images), IMAGES_PER_PIECE):
        chunk = src.images[i:i + IMAGES_PER_PIECE]
        part = rows.image_header({"path": np.array([p for p, _, _ in chunk])})
        for s, p in zip(part["size"].tolist(), part["path"].tolist(), strict=True):
            sizes.setdefault(s, p)
        grey = grey and bool(part["grey"].all())
    return sizes, grey


def prepare(spec: ExperimentSpec) -> DataBundle:
    """The streamed splits of `spec.data` and what the model needs to know of them."""
    d = spec.data
    if d.limit is not None:
        raise SpecError([f"data.limit: {d.limit} with streamed data (read piece by piece, "
                         "never cut to a count); allowed: no limit, or data.streaming false"])
    path = formats.resolve(Path(d.path), spec.project_dir)  # type: ignore[arg-type]
    if not path.exists():
        raise SpecError([f"data.path: {path} does not exist; allowed: a {d.format} file or "
                         "folder (relative paths start at project_dir)"])
    blank = rows.Layout(d.format, d.label)
    if d.format == "imagefolder":
        split_dirs, classes, files = rows.image_splits(path)
        where = {s: str(p) for s, p in split_dirs.items()}
        sources = {s: Source("imagefolder", [(s, i) for i in range(0, len(f), IMAGES_PER_PIECE)],
                             blank, spec.seed, images=f) for s, f in files.items()}
        sizes: dict[str, str] = {}
        grey = True
        for name, src in sources.items():
            found, g = _image_header(src)
            sizes = found | sizes
            grey = grey and (g or name != "train")  # channels: the training images decide
        layout = rows.image_layout(d, sizes, grey, classes)
    else:
        pieces, schemas, where = _table_pieces(d, path)
        sources = {s: Source(d.format, p, blank, spec.seed) for s, p in pieces.items()}
        numeric, label_types = rows.check_columns(d, schemas, where)
        if d.format == "csv":
            sources = {s: dataclasses.replace(src, numeric=numeric)
                       for s, src in sources.items()}
        regression = rows.is_regression(spec.task, label_types)
        uniques = _uniques(sources, [*d.categorical, *([] if regression else [d.label])])
        layout = rows.table_layout(d, spec.task, numeric, label_types, uniques, where)
    splits = {s: dataclasses.replace(sources.get(s, sources["train"]), layout=layout, keep=keep)
              for s, keep in rows.ranges(d, set(sources)).items()}
    stats: dict[str, dict[str, Any]] = {}
    piece_rows: dict[str, list[int]] = {}
    for name, src in splits.items():
        total: dict[str, Any] = {}
        counts = []
        for piece in src.pieces:
            n = 0
            for part in src.encoded(piece):
                rows.add_moments(total, {k: v[0] for k, v in rows.moments(part).items()})
                n += len(part["y"])
            counts.append(n)
        stats[name], piece_rows[name] = total, counts
    final = rows.Layout(**{f: getattr(layout, f) for f in layout.__dataclass_fields__})

    def make(name: str, lay: rows.Layout, n: int, head: Split, counts: Any) -> LoaderSplit:
        src = dataclasses.replace(splits[name], layout=lay)
        return LoaderSplit(src, n, piece_rows[name], head, counts, d.workers)

    return rows.finish(d, final, stats, where, make)
