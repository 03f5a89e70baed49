"""A user's own data as arrays: csv/parquet tables, npz arrays, image folders, a saved
Hugging Face dataset, or a Python factory.

Every reader returns `Raw` (the splits the data itself gives; the rest are cut by
`core.data`) and refuses bad data with one SpecError line naming the file, the column and
the fix, so that it is exit 2 before any worker or client starts.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from atoll.core.spec import DataSpec, SpecError

SPLITS = ("train", "val", "test")
SPLIT_NAMES = {"train": ("train",), "val": ("val", "validation", "valid"), "test": ("test",)}


@dataclass
class Raw:
    """x: (N, *shape) float32; y: int64 class indices or float32 targets, per split given."""

    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    task: str  # classification | regression
    classes: list[Any] | None = None  # label value of each class index (int or str)
    features: list[str] | None = None  # column names, after one-hot encoding
    encoding: dict[str, Any] | None = None  # tables: {"numeric": [...], "categorical": {}}
    source: dict[str, str] = field(default_factory=dict)  # split -> file, for messages


def resolve(path: Path, project_dir: Path | None) -> Path:
    return path if path.is_absolute() else (project_dir or Path.cwd()) / path


def read(spec: DataSpec, project_dir: Path | None, task: str | None = None) -> Raw:
    """The data `spec` (format != builtin) names; `task` None: inferred from the labels.
    Classes: two or more in the training split, and none only in val/test."""
    raw = _read(spec, project_dir, task)
    if raw.task == "classification" and raw.classes is not None:
        seen = set(np.unique(raw.y["train"]).tolist())
        if len(seen) < 2:
            raise SpecError([f"data.label: the labels of {raw.source['train']} hold one class "
                             f"({raw.classes[next(iter(seen))]!r}); allowed: two or more "
                             "classes"])
        for split in ("val", "test"):
            extra = sorted(set(np.unique(raw.y.get(split, [])).tolist()) - seen)
            if extra:
                raise SpecError([f"data.label: class {raw.classes[extra[0]]!r} of "
                                 f"{raw.source[split]} is not in the training split; allowed: "
                                 "classes the training data has"])
    return raw


def _read(spec: DataSpec, project_dir: Path | None, task: str | None) -> Raw:
    if spec.format == "python":
        return _python(spec, project_dir, task)
    path = resolve(Path(spec.path), project_dir)  # type: ignore[arg-type]
    if not path.exists():
        raise SpecError([f"data.path: {path} does not exist; allowed: a {spec.format} file or "
                         "folder (relative paths start at project_dir)"])
    if spec.format in ("csv", "parquet"):
        return _tables(spec, path, task)
    if spec.format == "npz":
        return _npz(path, task)
    if spec.format == "imagefolder":
        if task == "regression":
            raise SpecError(["task: 'regression', but data.format 'imagefolder' holds classes "
                             "(one folder each); allowed: task classification, or images "
                             "with numeric targets through hf-disk, npz or python"])
        return _imagefolder(spec, path)
    return _hf_disk(spec, path, task)


# --------------------------------------------------------------------------- labels


def encode_labels(ys: dict[str, np.ndarray], task: str | None, where: dict[str, str],
                  column: str = "label") -> tuple[dict[str, np.ndarray], str, list[Any] | None]:
    """Class indices (classification) or float targets (regression), the same over splits.

    `task` None: a float label is regression, anything else (ints, strings, bools)
    classification. Integer labels map to indices in order of value and keep their values
    as class names; text labels map in sorted order."""
    for split, y in ys.items():
        if y.ndim != 1:
            raise SpecError([f"data.label: {column} of {where[split]} has shape {y.shape}; "
                             "allowed: one label per sample"])
        missing = _missing(y)
        if missing.any():
            raise SpecError([f"data.label: column {column!r} of {where[split]} has "
                             f"{int(missing.sum())} missing values (first in data row "
                             f"{int(np.flatnonzero(missing)[0]) + 1}); allowed: a label in every "
                             "row (drop or fill them)"])
    kinds = {y.dtype.kind for y in ys.values()}
    numeric = kinds <= set("fiub")
    whole = numeric and all(y.dtype.kind != "f" or bool(np.all(y == np.round(y)))
                            for y in ys.values())
    if task is None:  # the dtype decides; a float split beside int ones (a pandas column
        # after dropna) with whole values is still the ints' classification
        task = "regression" if "f" in kinds and numeric and \
            (kinds == {"f"} or not whole) else "classification"
    if task == "regression":
        bad = [s for s, y in ys.items() if y.dtype.kind not in "fiub"]
        if bad:
            raise SpecError([f"data.label: column {column!r} of {where[bad[0]]} is not numeric "
                             f"({ys[bad[0]].dtype}); allowed with task regression: numbers"])
        return {s: y.astype(np.float32) for s, y in ys.items()}, task, None
    if whole:  # integer labels: distinct values in order, each named by its value
        ints = {s: y.astype(np.int64) for s, y in ys.items()}
        values = np.unique(np.concatenate([y for y in ints.values()]))
        return ({s: np.searchsorted(values, y).astype(np.int64) for s, y in ints.items()},
                task, [int(v) for v in values])
    if numeric:
        raise SpecError([f"data.label: column {column!r} holds non-integer numbers; allowed "
                         "with task classification: integer or text labels (or task: "
                         "regression)"])
    texts = sorted({str(v) for y in ys.values() for v in y.tolist()})
    index = {v: i for i, v in enumerate(texts)}
    return ({s: np.array([index[str(v)] for v in y.tolist()], dtype=np.int64)
             for s, y in ys.items()}, task, texts)


def _missing(a: np.ndarray) -> np.ndarray:
    if a.dtype.kind == "f":
        return np.isnan(a)
    if a.dtype.kind == "O":
        return np.array([v is None or (isinstance(v, float) and v != v) for v in a.tolist()])
    return np.zeros(len(a), dtype=bool)


# --------------------------------------------------------------------------- tables


def _split_files(path: Path, suffixes: tuple[str, ...], what: str) -> dict[str, Path]:
    """A file is the train split; a folder holds train (required), val and test files."""
    if path.is_file():
        return {"train": path}
    found: dict[str, Path] = {}
    for split, names in SPLIT_NAMES.items():
        for name in names:
            hits = [path / f"{name}{s}" for s in suffixes if (path / f"{name}{s}").is_file()]
            if hits:
                found[split] = hits[0]
                break
    if "train" not in found:
        raise SpecError([f"data.path: folder {path} has no train{suffixes[0]}; allowed: a "
                         f"{what} file, or a folder with train{suffixes[0]} (and optional "
                         f"val{suffixes[0]}, test{suffixes[0]})"])
    return found


def _read_table(p: Path, fmt: str) -> Any:
    import pandas as pd

    try:
        if fmt == "csv":
            return pd.read_csv(p, sep=None if p.suffix.lower() == ".tsv" else ",",
                               engine="python" if p.suffix.lower() == ".tsv" else "c")
        return pd.read_parquet(p)
    except (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError,
            pd.errors.EmptyDataError) as e:
        raise SpecError([f"data.path: cannot read {p} as {fmt} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}); allowed: a {fmt} file with a header "
                         "row"]) from None
    except ImportError as e:  # pyarrow missing for parquet
        raise SpecError([f"data.format: parquet needs {e.name or 'pyarrow'}; allowed: "
                         "install it, or use csv"]) from None


def _tables(spec: DataSpec, path: Path, task: str | None) -> Raw:
    suffixes = (".csv", ".tsv") if spec.format == "csv" else (".parquet", ".pq")
    files = _split_files(path, suffixes, spec.format)
    frames = {s: _read_table(p, spec.format) for s, p in files.items()}
    return from_frames(frames, spec, {s: str(p) for s, p in files.items()}, task)


def _column_check(df: Any, name: str, field_name: str, where: str) -> None:
    if name not in df.columns:
        cols = [str(c) for c in df.columns]
        hint = difflib.get_close_matches(name, cols, n=1)
        near = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise SpecError([f"{field_name}: no column {name!r} in {where}{near}; allowed: one of "
                         f"its columns: {', '.join(cols[:20])}"])


def from_frames(frames: dict[str, Any], spec: DataSpec, where: dict[str, str],
                task: str | None) -> Raw:
    """Feature matrix and labels of pandas frames, one per split, checked column by column."""
    import pandas as pd

    for split, df in frames.items():
        if len(df) == 0:
            raise SpecError([f"data.path: {where[split]} has no rows; allowed: a table with "
                             "data"])
        _column_check(df, spec.label, "data.label", where[split])
        for col in (spec.features or []) + spec.categorical:
            _column_check(df, col, "data.features" if col not in spec.categorical
                          else "data.categorical", where[split])
    first = frames["train"]
    features = spec.features or [str(c) for c in first.columns if str(c) != spec.label]
    if not features:
        raise SpecError([f"data.features: {where['train']} has no column besides the label "
                         f"{spec.label!r}; allowed: a table with feature columns"])
    numeric = [c for c in features if c not in spec.categorical]
    for split, df in frames.items():
        for col in numeric:
            if col not in df.columns:
                _column_check(df, col, "data.features", where[split])
            series = df[col]
            if not (pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series)):
                sample = series.dropna().iloc[0] if series.notna().any() else None
                raise SpecError([f"data.features: column {col!r} of {where[split]} is not numeric "
                                 f"({series.dtype}, e.g. {sample!r}); allowed: numeric columns, "
                                 "or list it in data.categorical to one-hot encode it"])
            bad = series.isna().to_numpy()
            if bad.any():
                raise SpecError([f"data.features: column {col!r} of {where[split]} has "
                                 f"{int(bad.sum())} missing values (first in data row "
                                 f"{int(np.flatnonzero(bad)[0]) + 1}); allowed: fill or drop "
                                 "them before training"])
            inf = ~np.isfinite(series.to_numpy(dtype=np.float64))
            if inf.any():
                raise SpecError([f"data.features: column {col!r} of {where[split]} has "
                                 f"{int(inf.sum())} infinite values (first in data row "
                                 f"{int(np.flatnonzero(inf)[0]) + 1}); allowed: finite numbers"])
        for col in spec.categorical:
            bad = df[col].isna().to_numpy()
            if bad.any():
                raise SpecError([f"data.categorical: column {col!r} of {where[split]} has "
                                 f"{int(bad.sum())} missing values (first in data row "
                                 f"{int(np.flatnonzero(bad)[0]) + 1}); allowed: fill them (a "
                                 "category of its own, e.g. 'unknown') or drop those rows"])
    categories = {c: sorted({str(v) for df in frames.values() for v in df[c].tolist()})
                  for c in spec.categorical}
    embed = spec.categorical_encoding == "embedding"
    # onehot: a 0/1 column per category; embedding: one column of category codes each
    # (float, like every feature; the model's CategoricalEmbedding looks them up)
    names = numeric + (list(spec.categorical) if embed else
                       [f"{c}={v}" for c in spec.categorical for v in categories[c]])
    xs = {}
    for split, df in frames.items():
        parts = [df[numeric].to_numpy(dtype=np.float32)]
        for c in spec.categorical:
            codes = df[c].astype(str).map({v: i for i, v in enumerate(categories[c])})
            codes = codes.to_numpy(dtype=np.int64)
            parts.append(codes[:, None].astype(np.float32) if embed else
                         np.eye(len(categories[c]), dtype=np.float32)[codes])
        xs[split] = np.concatenate(parts, axis=1)
    ys = {s: _label_array(df[spec.label]) for s, df in frames.items()}
    ys, task, classes = encode_labels(ys, task, where, spec.label)
    encoding: dict[str, Any] = {"numeric": numeric, "categorical": categories,
                                "mode": spec.categorical_encoding}
    if embed:
        encoding["dims"] = [spec.embedding_dim or min(16, (len(categories[c]) + 1) // 2)
                            for c in spec.categorical]
    return Raw(xs, ys, task, classes, names, encoding, source=where)


def _label_array(series: Any) -> np.ndarray:
    """A label column as numpy: numbers keep their dtype (NaN marks a gap), text is object."""
    import pandas as pd

    if pd.api.types.is_bool_dtype(series) and not series.isna().any():
        return series.to_numpy(dtype=np.int64)
    if pd.api.types.is_integer_dtype(series) and not series.isna().any():
        return series.to_numpy(dtype=np.int64)
    if pd.api.types.is_numeric_dtype(series):
        return series.to_numpy(dtype=np.float64)
    return series.to_numpy(dtype=object)


# --------------------------------------------------------------------------- npz


def _npz(path: Path, task: str | None) -> Raw:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        what = "is not an npz archive" if "pickle" in str(e) or not _is_zip(path) else \
            f"cannot be read as npz ({str(e)[:200]})"
        raise SpecError([f"data.path: {path} {what}; allowed: a file written by numpy.savez "
                         "with numeric arrays"]) from None
    keys = {"train": ("x_train", "y_train"), "val": ("x_val", "y_val"),
            "test": ("x_test", "y_test")}
    if {"x", "y"} <= set(arrays) and "x_train" not in arrays:
        keys = {"train": ("x", "y")}
    if not set(keys["train"]) <= set(arrays):
        raise SpecError([f"data.path: {path} holds {', '.join(sorted(arrays)) or 'no arrays'}; "
                         "allowed: arrays x and y, or x_train/y_train (with optional x_val/"
                         "y_val, x_test/y_test)"])
    xs, ys, where = {}, {}, {}
    for split, (kx, ky) in keys.items():
        if kx in arrays and ky in arrays:
            x, y = arrays[kx], arrays[ky]
            where[split] = f"{path}[{kx}]"
            if x.dtype.kind not in "fiub":
                raise SpecError([f"data.path: array {kx} of {path} is {x.dtype}; allowed: "
                                 "numbers"])
            if len(x) != len(y):
                raise SpecError([f"data.path: {kx} has {len(x)} samples but {ky} {len(y)} in "
                                 f"{path}; allowed: one label per sample"])
            if x.dtype.kind == "f" and not np.isfinite(x).all():
                raise SpecError([f"data.path: array {kx} of {path} has "
                                 f"{int((~np.isfinite(x)).sum())} NaN/inf values; allowed: "
                                 "finite numbers"])
            xs[split], ys[split] = x.astype(np.float32), y
    ys, task, classes = encode_labels(ys, task, where, "y")
    return Raw(xs, ys, task, classes, source=where)


def _is_zip(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"PK\x03\x04"


# --------------------------------------------------------------------------- images


def _imagefolder(spec: DataSpec, path: Path) -> Raw:
    from atoll.core.images import read_folder

    split_dirs = {s: path / n for s, names in SPLIT_NAMES.items() for n in names
                  if (path / n).is_dir()}
    if "train" not in split_dirs:
        split_dirs = {"train": path}
    x, y, classes = read_folder(split_dirs["train"], spec.image_size, spec.channels)
    xs, ys, where = {"train": x}, {"train": y}, {"train": str(split_dirs["train"])}
    for split in ("val", "test"):
        if split in split_dirs:
            xs[split], ys[split], _ = read_folder(split_dirs[split], spec.image_size,
                                                  x.shape[1], classes)
            where[split] = str(split_dirs[split])
            if xs[split].shape[1:] != x.shape[1:]:
                raise SpecError([f"data.image_size: images of {split_dirs[split]} are "
                                 f"{xs[split].shape[2]}x{xs[split].shape[3]}, those of "
                                 f"{split_dirs['train']} {x.shape[2]}x{x.shape[3]}; allowed: "
                                 "data.image_size: [height, width] to resize every image"])
    return Raw(xs, ys, "classification", classes, source=where)


# --------------------------------------------------------------------------- hf-disk


def _hf_disk(spec: DataSpec, path: Path, task: str | None) -> Raw:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise SpecError([f"data.path: {path} is not a dataset saved with save_to_disk "
                         f"({str(e).splitlines()[0][:160]}); allowed: the folder "
                         "Dataset.save_to_disk or DatasetDict.save_to_disk wrote"]) from None
    if isinstance(loaded, datasets.DatasetDict):
        parts = {s: loaded[n] for s, names in SPLIT_NAMES.items() for n in names if n in loaded}
        if "train" not in parts:
            raise SpecError([f"data.path: {path} has splits {', '.join(loaded)}; allowed: a "
                             "DatasetDict with a train split (and optional validation, test)"])
    else:
        parts = {"train": loaded}
    where = {s: f"{path} ({s} split)" for s in parts}
    first = parts["train"]
    if spec.label not in first.column_names:
        _column_check(first.to_pandas().head(0), spec.label, "data.label", where["train"])
    images = [c for c, f in first.features.items() if isinstance(f, datasets.Image)]
    if not images:
        frames = {s: d.to_pandas() for s, d in parts.items()}
        raw = from_frames(frames, spec, where, task)
        label = first.features.get(spec.label)
        if isinstance(label, datasets.ClassLabel) and raw.classes is not None:
            raw.classes = [label.names[int(c)] for c in raw.classes]
        return raw
    from atoll.core.images import to_array

    column = (spec.features or images)[0]
    xs, ys, channels = {}, {}, spec.channels
    for split, d in parts.items():
        pictures = d[column]
        xs[split] = to_array(pictures, [f"{where[split]} row {i}" for i in range(len(d))],
                             spec.image_size, channels)
        channels = xs[split].shape[1]
        ys[split] = np.asarray(d[spec.label])
    ys, task, classes = encode_labels(ys, task, where, spec.label)
    label = first.features.get(spec.label)
    if isinstance(label, datasets.ClassLabel) and classes is not None:
        classes = [label.names[int(c)] for c in classes]
    return Raw(xs, ys, task, classes, source=where)


# --------------------------------------------------------------------------- python


def _python(spec: DataSpec, project_dir: Path | None, task: str | None) -> Raw:
    from atoll.core.imports import import_target

    factory = import_target(str(spec.target), "data.target", project_dir)
    call = f"{spec.target}(**data.kwargs)"
    try:
        out = factory(**spec.kwargs)
    except TypeError as e:
        raise SpecError([f"data.kwargs: {spec.kwargs} — {call} raised TypeError: {e}; allowed: "
                         "the factory's own parameters"]) from None
    except SpecError:
        raise
    except Exception as e:
        raise SpecError([f"data.target: {call} raised {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''}"]) from None
    if isinstance(out, Mapping):
        names = {n: s for s, ns in SPLIT_NAMES.items() for n in ns}
        unknown = sorted(str(k) for k in out if k not in names)
        if unknown or not any(names[k] == "train" for k in out):
            raise SpecError([f"data.target: {spec.target} returned splits "
                             f"{', '.join(map(str, out)) or 'none'}; allowed: train (required), "
                             "val, test"])
        given = {names[str(k)]: v for k, v in out.items()}
    else:
        given = {"train": out}
    xs, ys, where = {}, {}, {}
    for split, part in given.items():
        where[split] = f"{spec.target} ({split})"
        xs[split], ys[split] = _arrays_of(part, where[split])
    ys, task, classes = encode_labels(ys, task, where)
    return Raw(xs, ys, task, classes, source=where)


def _arrays_of(part: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) arrays of a pair of arrays/tensors or of a map-style Dataset of (x, y) items."""
    import torch

    if isinstance(part, tuple | list) and len(part) == 2 and not isinstance(part[0], tuple):
        x, y = (np.asarray(a.numpy() if isinstance(a, torch.Tensor) else a) for a in part)
    elif hasattr(part, "__len__") and hasattr(part, "__getitem__"):
        items = [part[i] for i in range(len(part))]
        if not items or not all(isinstance(it, tuple | list) and len(it) == 2 for it in items):
            raise SpecError([f"data.target: {where} is a {type(part).__name__} whose items are "
                             "not (x, y) pairs; allowed: a map-style Dataset of (x, y), or a "
                             "pair of arrays"])
        x = np.stack([np.asarray(a.numpy() if isinstance(a, torch.Tensor) else a)
                      for a, _ in items])
        y = np.asarray([b.item() if isinstance(b, torch.Tensor) else b for _, b in items])
    else:
        raise SpecError([f"data.target: {where} is a {type(part).__name__}; allowed: a map-style "
                         "torch Dataset of (x, y) items, or a pair of arrays (x, y)"])
    if x.dtype.kind not in "fiub" or len(x) != len(y):
        raise SpecError([f"data.target: {where} gives x of {x.dtype} {x.shape} and {len(y)} "
                         "labels; allowed: numeric x with one label per sample"])
    x = x.astype(np.float32)
    bad = int((~np.isfinite(x)).sum())
    if bad:
        raise SpecError([f"data.target: x of {where} has {bad} NaN/inf values; allowed: finite "
                         "numbers"])
    return x, y
