"""Write data/bands/<class>/*.png: 8x8 grey images whose bright band (top, middle,
bottom) is the class, over noise. Run: python make_data.py"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image

CLASSES = ("top", "middle", "bottom")


def main(per_class: int = 60, seed: int = 0,
         out: Path = Path(__file__).parent / "data" / "bands") -> Path:
    rng = random.Random(seed)
    for c, name in enumerate(CLASSES):
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = Image.new("L", (8, 8))
            for y in range(8):
                bright = 180 if c * 8 // 3 <= y < (c + 1) * 8 // 3 else 0
                for x in range(8):
                    img.putpixel((x, y), min(255, bright + rng.randrange(60)))
            img.save(folder / f"{i:03d}.png")
    return out


if __name__ == "__main__":
    print(main())
