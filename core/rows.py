"""Rows of a user's table or image folder that are never loaded whole: how a raw batch is
encoded and normalised (`Layout`), the per-batch sums a streaming pass adds up
(`moments`), the checks that pass makes, and the DataBundle built from its totals.

Shared by the two streaming readers: Ray Data in cluster mode (`cluster/streaming.py`) and
DataLoader workers in local mode (`core/loader.py`). The statistics equal those
`core.data.load_data` computes on the same rows (training-split normalisation, unbiased
std, per channel for images; regression targets' mean and population std).

Splits the data does not give are cut by a seeded hash of each row's content (an image's
path), so they never depend on the order rows arrive in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atoll.core import formats
from atoll.core.data import DataBundle, Split
from atoll.core.spec import DataSpec, SpecError

AUTO_BYTES = 1 << 30  # data.streaming: auto streams sources larger than this
HEAD_ROWS = 4  # rows kept on the host: model checks, input examples


def source_bytes(spec: DataSpec, project_dir: Path | None) -> int:
    """Total size of the files `spec` names (0 when it names none)."""
    if spec.path is None:
        return 0
    path = formats.resolve(Path(spec.path), project_dir)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() \
        else 0


class HeadRows:
    """What a streamed split (cluster.streaming.StreamSplit, core.loader.LoaderSplit) shows
    the code written for in-memory splits: its row count, and a few rows on the host as
    `x`/`y` (shapes, model checks, input examples). Subclasses hold `rows` and `head`."""

    rows: int
    head: Split

    def __len__(self) -> int:
        return self.rows

    @property
    def x(self) -> torch.Tensor:
        return self.head.x

    @property
    def y(self) -> torch.Tensor:
        return self.head.y


def hash_unit(frame: Any, seed: int) -> np.ndarray:
    """A number in [0, 1) per row from its content and the seed (pandas' SipHash)."""
    import pandas as pd

    key = f"atoll{seed:011d}"[-16:]
    return pd.util.hash_pandas_object(frame, index=False, hash_key=key).to_numpy() / 2.0**64


@dataclass
class Layout:
    """How raw rows become {"x", "y"}: picklable, shipped to Ray Data's tasks and to
    DataLoader workers."""

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

        from atoll.core.images import _open, _pixels

        xs = []
        for p in batch["path"].tolist():
            with _open(p, p) as img:  # a file that is no image: one SpecError line
                xs.append(_pixels(img, p, self.channels, self.image_size))
        return np.stack(xs).astype(np.float32), batch["label"].astype(np.int64)


MOMENT_ROWS = {"imagefolder": 64}  # rows per `moments` call (float64 copies of a batch)


def moments(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
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


@dataclass
class Columns:
    """What `formats._column_check` reads of a frame: its column names."""

    columns: list[str]


def label_values(spec: DataSpec, task: str | None, uniques: dict[str, dict[str, list[Any]]],
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


def image_header(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:

    from atoll.core.images import GREY_MODES, _open

    sizes, grey = [], []
    for p in batch["path"].tolist():
        with _open(p, p) as img:
            sizes.append(f"{img.size[1]}x{img.size[0]}")
            grey.append(img.mode in GREY_MODES)
    return {"path": batch["path"], "size": np.array(sizes), "grey": np.array(grey)}


def head(stats: dict[str, Any], layout: Layout) -> Split:
    """The first rows the pass kept, normalised as the pipeline will normalise them."""
    k = int(stats["hn"])
    out = layout({"x": stats["hx"][:k], "y": stats["hy"][:k]}, encoded=True)
    dtype = torch.float32 if layout.task == "regression" else torch.int64
    return Split(torch.tensor(out["x"]), torch.tensor(np.asarray(out["y"])).to(dtype))


def check_stats(stats: dict[str, dict[str, Any]], layout: Layout, where: dict[str, str]
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


def check_classes(bundle: DataBundle, stats: dict[str, dict[str, Any]], where: dict[str, str]
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


def add_moments(out: dict[str, Any], part: dict[str, Any]) -> None:
    """Add one batch's `moments` (unbatched: no leading row axis) into `out`."""
    if int(part["hn"]) and not int(out.get("hn", 0)):  # the first rows there are
        out["hx"], out["hy"], out["hn"] = part["hx"], part["hy"], part["hn"]
    for k, v in part.items():
        if k in ("hx", "hy", "hn"):
            continue
        if k == "counts":
            have = out.get(k, np.zeros(0, dtype=np.int64))
            size = max(len(have), len(v))
            out[k] = np.pad(v, (0, size - len(v))) + np.pad(have, (0, size - len(have)))
        elif k == "px":
            out[k] = v
        else:
            out[k] = out.get(k, 0) + v


def ranges(spec: DataSpec, given: set[str]) -> dict[str, tuple[float, float] | None]:
    """The hash range [lo, hi) of each split cut from train (None: a split the data gives,
    or train whole). The fractions are `load_data`'s: test of everything, then val of
    everything."""
    test = 0.0 if "test" in given else spec.test_fraction
    val = 0.0 if "val" in given else spec.val_fraction
    out: dict[str, tuple[float, float] | None] = {s: None for s in given}
    if "test" not in given:
        out["test"] = (0.0, test)
    if "val" not in given:
        out["val"] = (test, test + val)
    out["train"] = (test + val, 1.0) if test + val > 0 else None
    return out


def select(frame: Any, seed: int, keep: tuple[float, float] | None, key: str | None) -> Any:
    """The rows of a pandas frame whose seeded content hash falls in `keep`."""
    if keep is None:
        return frame
    u = hash_unit(frame[[key]] if key else frame, seed)
    return frame[(u >= keep[0]) & (u < keep[1])]


def check_columns(spec: DataSpec, schemas: dict[str, Any], where: dict[str, str]
                  ) -> tuple[list[str], dict[str, Any]]:
    """Numeric feature columns (checked by the arrow schema of each split) and the
    label's arrow type per split."""
    import pyarrow as pa

    for split, schema in schemas.items():
        frame = Columns(list(schema.names))
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
                formats._column_check(Columns(list(types)), col, "data.features", where[split])
            if not (pa.types.is_integer(t) or pa.types.is_floating(t) or
                    pa.types.is_boolean(t) or pa.types.is_null(t)):
                raise SpecError([f"data.features: column {col!r} of {where[split]} is not "
                                 f"numeric ({t}); allowed: numeric columns, or list it in "
                                 "data.categorical to one-hot encode it"])
    label_types = {s: dict(zip(sc.names, sc.types, strict=True))[spec.label]
                   for s, sc in schemas.items()}
    return numeric, label_types


def is_regression(task: str | None, label_types: dict[str, Any]) -> bool:
    import pyarrow as pa

    return task == "regression" or (
        task is None and all(pa.types.is_floating(t) for t in label_types.values()))


def csv_options(numeric: list[str] | None = None) -> Any:
    """pyarrow csv conversion: numeric features as float64 throughout (a streaming reader
    guesses a column's type from its first block, and a later 1.5 in an int column would
    fail the read), and empty text cells as missing, as pandas reads them."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    return pacsv.ConvertOptions(strings_can_be_null=True,
                                column_types={c: pa.float64() for c in numeric or []})


def read_error(e: BaseException, where: str, fmt: str) -> SpecError:
    """A file that fails while streamed (a value of the wrong type deep in a csv)."""
    return SpecError([f"data.path: cannot read {where} as {fmt} "
                      f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''});"
                      f" allowed: a {fmt} file whose columns keep one type throughout"])


def table_layout(spec: DataSpec, task: str | None, numeric: list[str],
                 label_types: dict[str, Any], uniques: dict[str, dict[str, list[Any]]],
                 where: dict[str, str]) -> Layout:
    """A table's Layout from its distinct categories and label values per split."""
    task, values = label_values(spec, task, uniques, label_types, where)
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


def image_layout(spec: DataSpec, sizes: dict[str, str], all_grey: bool, classes: list[str]
                 ) -> Layout:
    """An image folder's Layout from its headers: {"HxW": first file of that size}."""
    if spec.image_size is None and len(sizes) > 1:
        (s1, n1), (s2, n2) = list(sizes.items())[:2]
        raise SpecError([f"data.image_size: images differ in size ({n1}: {s1}, {n2}: {s2}, "
                         f"{len(sizes)} sizes in all); allowed: data.image_size: [height, "
                         "width] to resize every image"])
    return Layout("imagefolder", "label", task="classification", values=list(classes),
                  image_size=spec.image_size, channels=spec.channels or (1 if all_grey else 3))


def image_splits(path: Path) -> tuple[dict[str, Path], list[str],
                                      dict[str, list[tuple[str, int, str]]]]:
    """An image folder's split folders, classes (train's) and (file, class index, key)
    rows; the key (class/file name) cuts the splits, so moving the folder keeps them."""
    from atoll.core.images import class_folders

    split_dirs = {s: path / n for s, names in formats.SPLIT_NAMES.items() for n in names
                  if (path / n).is_dir()}
    if "train" not in split_dirs:
        split_dirs = {"train": path}
    classes = list(class_folders(split_dirs["train"]))
    rows = {}
    for split, d in split_dirs.items():
        found = class_folders(d)
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise SpecError([f"data.path: class folder {d / unknown[0]} is not a class of the "
                             f"training split ({', '.join(classes)}); allowed: the same class "
                             "folders in every split"])
        index = {c: i for i, c in enumerate(classes)}
        rows[split] = [(str(f), index[c], f"{c}/{f.name}") for c, fs in found.items()
                       for f in fs]
    return split_dirs, classes, rows


def finish(spec: DataSpec, layout: Layout, stats: dict[str, dict[str, Any]],
           where: dict[str, str],
           make_split: Callable[[str, Layout, int, Split, torch.Tensor | None], Any]
           ) -> DataBundle:
    """The bundle of a streamed dataset from its per-split totals: sets `layout`'s
    normalisation, then `make_split(name, layout, rows, head, counts)` builds each split."""
    check_stats(stats, layout, where)
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
    if not spec.normalize:
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
    heads = {s: head(st, layout) for s, st in stats.items() if int(st.get("hn", 0))}
    input_shape = tuple(heads["train"].x.shape[1:])
    for s in stats:  # an empty split: no rows, the right shapes
        heads.setdefault(s, Split(heads["train"].x[:0], heads["train"].y[:0]))
    classes = len(layout.values or []) if layout.task == "classification" else 1
    counts = None
    if layout.task == "classification":
        c = np.pad(train["counts"], (0, max(classes - len(train["counts"]), 0)))
        counts = torch.from_numpy(c[:classes].astype(np.int64))
    splits = {s: make_split(s, layout, int(stats[s].get("n", 0)), heads[s],
                            counts if s == "train" else None) for s in stats}
    features, encoding = None, None
    if not image:
        cats = layout.categories
        features = layout.numeric + (list(cats) if layout.embed else
                                     [f"{c}={v}" for c, vs in cats.items() for v in vs])
        encoding = {"numeric": layout.numeric, "categorical": cats,
                    "mode": spec.categorical_encoding}
        if layout.embed:
            encoding["dims"] = [spec.embedding_dim or min(16, (len(cats[c]) + 1) // 2)
                                for c in spec.categorical]
    bundle = DataBundle(
        train=splits["train"], val=splits["val"], test=splits["test"],
        input_shape=input_shape, num_classes=classes,
        mean=torch.from_numpy(layout.mean), std=torch.from_numpy(layout.std),
        task=layout.task, classes=layout.values, features=features, encoding=encoding,
        y_mean=layout.y_mean, y_std=layout.y_std)
    check_classes(bundle, stats, where)
    return bundle
