"""Small generated datasets in every format atoll reads (tests write them; nothing is
downloaded): a 3-class table with a categorical column, and 8x8 PNG image classes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CLASSES = ("ash", "birch", "cedar")


def table(n: int = 300, seed: int = 0):
    """A pandas frame: 4 informative numeric columns, a categorical `soil`, label `tree`."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    centers = np.array([[2, 0, 0, 1], [0, 2, 0, -1], [0, 0, 2, 0]], dtype=np.float64)
    x = centers[y] + 0.5 * rng.standard_normal((n, 4))
    soil = np.where(y == 0, "clay", np.where(rng.random(n) < 0.5, "sand", "loam"))
    frame = pd.DataFrame(x, columns=["height", "girth", "bark", "leaf"])
    frame["soil"] = soil
    frame["tree"] = [CLASSES[i] for i in y]
    return frame


def write_csv(root: Path, n: int = 300, split: bool = False) -> Path:
    """One file, or a folder with train.csv and test.csv when `split`."""
    frame = table(n)
    if not split:
        root.mkdir(parents=True, exist_ok=True)
        frame.to_csv(root / "trees.csv", index=False)
        return root / "trees.csv"
    (root / "trees").mkdir(parents=True, exist_ok=True)
    frame.iloc[: n * 3 // 4].to_csv(root / "trees" / "train.csv", index=False)
    frame.iloc[n * 3 // 4:].to_csv(root / "trees" / "test.csv", index=False)
    return root / "trees"


def write_parquet(root: Path, n: int = 300) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    table(n).to_parquet(root / "trees.parquet")
    return root / "trees.parquet"


def images(n_per_class: int = 30, size: int = 8, seed: int = 0
           ) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, size, size) images: class c is a bright bar in row band c, plus noise."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for c in range(3):
        for _ in range(n_per_class):
            img = rng.integers(0, 60, (size, size))
            band = slice(c * size // 3, (c + 1) * size // 3)
            img[band, :] += 180
            xs.append(np.clip(img, 0, 255).astype(np.uint8))
            ys.append(c)
    return np.stack(xs), np.array(ys)


def write_imagefolder(root: Path, n_per_class: int = 30, rgb: bool = False) -> Path:
    from PIL import Image

    x, y = images(n_per_class)
    for i, (img, c) in enumerate(zip(x, y, strict=True)):
        folder = root / CLASSES[c]
        folder.mkdir(parents=True, exist_ok=True)
        pic = Image.fromarray(img, mode="L")
        (pic.convert("RGB") if rgb else pic).save(folder / f"{i:04d}.png")
    return root


def write_npz(root: Path, n: int = 300) -> Path:
    frame = table(n)
    x = frame[["height", "girth", "bark", "leaf"]].to_numpy(np.float32)
    y = frame["tree"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    root.mkdir(parents=True, exist_ok=True)
    cut = n * 3 // 4
    np.savez(root / "trees.npz", x_train=x[:cut], y_train=y[:cut], x_test=x[cut:],
             y_test=y[cut:])
    return root / "trees.npz"


def write_hf_disk(root: Path, n: int = 300, image: bool = False) -> Path:
    """A DatasetDict (train, test) saved with save_to_disk: table columns, or PNG images."""
    import datasets

    if image:
        from PIL import Image

        x, y = images(n // 3)
        feats = datasets.Features({"image": datasets.Image(),
                                   "label": datasets.ClassLabel(names=list(CLASSES))})
        ds = datasets.Dataset.from_dict(
            {"image": [Image.fromarray(a, mode="L") for a in x], "label": y.tolist()},
            features=feats)
    else:
        ds = datasets.Dataset.from_pandas(table(n), preserve_index=False)
    parts = ds.train_test_split(test_size=0.25, seed=0)
    out = root / ("hf_images" if image else "hf_trees")
    parts.save_to_disk(str(out))
    return out


PYTHON_DATA = '''
import numpy as np
import torch
from torch.utils.data import TensorDataset


def make(n=300, seed=0):
    """train: a map-style Dataset of (x, y); test: a pair of arrays."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = np.eye(3)[y] * 2 + 0.5 * rng.standard_normal((n, 3))
    cut = n * 3 // 4
    train = TensorDataset(torch.tensor(x[:cut], dtype=torch.float32), torch.tensor(y[:cut]))
    return {"train": train, "test": (x[cut:].astype("float32"), y[cut:])}
'''


def write_python(root: Path) -> str:
    root.mkdir(parents=True, exist_ok=True)
    (root / "treedata.py").write_text(PYTHON_DATA)
    return "treedata:make"


USER_MODELS = '''
import math

import torch.nn as nn


class Net(nn.Module):
    """A user's MLP that is not an nn.Sequential (pipelines cut it at model.stages)."""

    def __init__(self, input_shape, num_outputs, width=64):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width),
                                  nn.ReLU())
        self.head = nn.Linear(width, num_outputs)

    def forward(self, x):
        return self.head(self.body(x))


class TinyConv(nn.Module):
    def __init__(self, input_shape, num_outputs, channels=8):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(input_shape[0], channels, 3, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d((4, 1)), nn.Flatten())
        self.fc = nn.Linear(channels * 4, num_outputs)

    def forward(self, x):
        return self.fc(self.conv(x))
'''


def write_user_models(root: Path, package: str = "mynets") -> str:
    """A user's model package `<package>/nets.py`; returns its module path."""
    (root / package).mkdir(parents=True, exist_ok=True)
    (root / package / "__init__.py").write_text("")
    (root / package / "nets.py").write_text(USER_MODELS)
    return f"{package}.nets"


def regression_table(n: int = 400, seed: int = 0, noise: float = 0.3):
    """y = x·w + region offset + N(0, noise²): R² of the true function ≈ 0.99 at noise
    0.3, so a fitted model's R² ≥ 0.9 is reachable but not free."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 4))
    region = rng.choice(["north", "south", "east"], n)
    offset = pd.Series(region).map({"north": 1.0, "south": -1.0, "east": 0.0}).to_numpy()
    y = x @ np.array([1.5, -2.0, 0.5, 1.0]) + offset + noise * rng.standard_normal(n)
    frame = pd.DataFrame(x, columns=["a", "b", "c", "d"])
    frame["region"] = region
    frame["price"] = y
    return frame


def write_regression_csv(root: Path, n: int = 400) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    regression_table(n).to_csv(root / "prices.csv", index=False)
    return root / "prices.csv"


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example(name: str, dest: Path) -> Path:
    """A copy of examples/<name> under `dest` with its data written by its own script."""
    import runpy
    import shutil

    root = dest / name
    shutil.copytree(EXAMPLES / name, root, ignore=shutil.ignore_patterns("data", "__pycache__"))
    runpy.run_path(str(root / "make_data.py"), run_name="__main__")
    return root
