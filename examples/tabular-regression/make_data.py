"""Write data/prices.csv: a price that is linear in four measurements plus a region
offset, with noise (R² of the true function ≈ 0.99). Run: python make_data.py"""

from __future__ import annotations

import csv
import random
from pathlib import Path

WEIGHTS = (1.5, -2.0, 0.5, 1.0)
REGIONS = {"north": 1.0, "south": -1.0, "east": 0.0}


def main(rows: int = 400, seed: int = 0, out: Path = Path(__file__).parent / "data") -> Path:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "prices.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["a", "b", "c", "d", "region", "price"])
        for _ in range(rows):
            x = [rng.gauss(0, 1) for _ in WEIGHTS]
            region = rng.choice(sorted(REGIONS))
            price = sum(wi * xi for wi, xi in zip(WEIGHTS, x, strict=True)) + REGIONS[region]
            w.writerow([f"{v:.5f}" for v in x] + [region, f"{price + rng.gauss(0, 0.3):.5f}"])
    return path


if __name__ == "__main__":
    print(main())
