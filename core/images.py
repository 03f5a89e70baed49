"""Images into arrays with Pillow (torchvision's PyPI build does not import beside the CPU
torch): an image folder (one sub-folder per class), or decoded images from a dataset."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from atoll.core.spec import SpecError

SUFFIXES = (".png", ".jpg", ".jpeg")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
HIGH_DEPTH = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I": 65535.0, "F": 1.0}


def class_folders(root: Path) -> dict[str, list[Path]]:
    """{class name: its image files}, classes sorted by name; SpecError for an empty one."""
    if not root.is_dir():
        raise SpecError([f"data.path: {root} is not a folder; allowed: a folder with one "
                         "sub-folder of PNG/JPEG images per class"])
    found: dict[str, list[Path]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and
                         not p.name.startswith(".")):
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in SUFFIXES)
        if not files:
            raise SpecError([f"data.path: class folder {folder} holds no PNG/JPEG image; "
                             "allowed: at least one image per class folder (or remove it)"])
        found[folder.name] = files
    if len(found) < 2:
        raise SpecError([f"data.path: {root} has {len(found)} class folder(s); allowed: a folder "
                         "with one sub-folder of images per class, two classes or more"])
    return found


def _open(source: Any, name: str) -> Image.Image:
    """The image, lazily: size and mode come from the header; pixels on first use."""
    try:
        return source if isinstance(source, Image.Image) else Image.open(source)
    except (UnidentifiedImageError, OSError) as e:
        raise SpecError([f"data.path: cannot decode image {name} ({e}); allowed: PNG or "
                         "JPEG files (remove or re-save this one)"]) from None


def _pixels(img: Image.Image, name: str, channels: int, size: tuple[int, int] | None
            ) -> np.ndarray:
    """(C, H, W) float32 in [0, 1]. 16/32-bit grey is scaled by its range (convert('L')
    would clip it); resizing happens per image, so memory holds only the small ones."""
    try:
        if img.mode in HIGH_DEPTH:
            a = np.asarray(img, dtype=np.float32) / HIGH_DEPTH[img.mode]
            if size is not None and a.shape != size:
                a = np.asarray(Image.fromarray(a).resize(
                    (size[1], size[0]), Image.Resampling.BILINEAR), dtype=np.float32)
            a = np.clip(a, 0.0, 1.0)[None]
            return np.repeat(a, 3, axis=0) if channels == 3 else a
        img = img.convert("L" if channels == 1 else "RGB")
        if size is not None and img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        a = np.asarray(img, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise SpecError([f"data.path: cannot decode image {name} ({e}); allowed: PNG or "
                         "JPEG files (remove or re-save this one)"]) from None
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def to_array(images: Sequence[Any], names: Sequence[str], image_size: tuple[int, int] | None,
             channels: int | None) -> np.ndarray:
    """(N, C, H, W) float32 in [0, 1]. Sizes must agree unless `image_size` resizes them;
    `channels` None: 1 when every image is grey, else 3. Headers are read first (sizes and
    modes), then each image is decoded, converted and resized on its own."""
    sizes: dict[tuple[int, int], str] = {}
    modes = set()
    for img, name in zip(images, names, strict=True):
        opened = _open(img, name)
        sizes.setdefault(opened.size, name)
        modes.add(opened.mode)
        if not isinstance(img, Image.Image):
            opened.close()
    if channels is None:
        channels = 1 if modes <= set(GREY_MODES) else 3
    if image_size is None and len(sizes) > 1:
        (s1, n1), (s2, n2) = list(sizes.items())[:2]
        raise SpecError([f"data.image_size: images differ in size ({n1}: {s1[1]}x{s1[0]}, {n2}: "
                         f"{s2[1]}x{s2[0]}, {len(sizes)} sizes in all); allowed: data.image_size: "
                         "[height, width] to resize every image"])
    w, h = next(iter(sizes)) if image_size is None else (image_size[1], image_size[0])
    out = np.empty((len(names), channels, h, w), dtype=np.float32)
    for i, (img, name) in enumerate(zip(images, names, strict=True)):
        opened = _open(img, name)
        out[i] = _pixels(opened, name, channels, image_size)
        if not isinstance(img, Image.Image):
            opened.close()
    return out


def read_folder(root: Path, image_size: tuple[int, int] | None, channels: int | None,
                classes: list[str] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """x, integer labels and class names of an image folder; `classes` fixes the index of
    each name (a val/test folder follows train's), and a folder with an unknown class fails."""
    found = class_folders(root)
    names = classes or list(found)
    unknown = sorted(set(found) - set(names))
    if unknown:
        raise SpecError([f"data.path: class folder {root / unknown[0]} is not a class of the "
                         f"training split ({', '.join(names)}); allowed: the same class "
                         "folders in every split"])
    files = [(f, names.index(c)) for c, fs in found.items() for f in fs]
    x = to_array([f for f, _ in files], [str(f) for f, _ in files], image_size, channels)
    return x, np.array([label for _, label in files], dtype=np.int64), names

