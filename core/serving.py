"""What the registered model needs to take raw input: the preprocessing a DataBundle
applied (task, classes, table columns and categories, normalisation), and a raw input
example rebuilt from normalised test rows (tracking/pyfunc_model.py is the other half)."""

from __future__ import annotations

from typing import Any

import numpy as np

from atoll.core.data import DataBundle


def preprocess(data: DataBundle) -> dict[str, Any]:
    """JSON-able: everything the predictor does before and after the network."""
    classes = data.classes if data.classes is not None else list(range(data.num_classes))
    enc = data.encoding or {}
    return {"task": data.task, "input_shape": list(data.input_shape),
            "classes": None if data.task == "regression" else classes,
            "int_classes": data.task != "regression" and all(isinstance(c, int)
                                                             for c in classes),
            "image": data.is_image, "numeric": enc.get("numeric"),
            "categorical": enc.get("categorical", {}),
            "categorical_encoding": enc.get("mode", "onehot"),
            "mean": data.mean.tolist(), "std": data.std.tolist(),  # broadcast as in training
            "y_mean": data.y_mean, "y_std": data.y_std}  # regression: back to units


def raw_example(data: DataBundle, n: int = 4) -> Any:
    """The first `n` test samples as a user would pass them: a table's rows with their
    original columns (a DataFrame), or un-normalised arrays."""
    x = (data.test.x[:n] * data.std + data.mean).numpy()
    enc = data.encoding
    if not enc:
        return x.astype(np.float32)
    import pandas as pd

    numeric = enc["numeric"]
    frame = pd.DataFrame(x[:, :len(numeric)].astype(np.float64), columns=numeric)
    at = len(numeric)
    for col, cats in enc["categorical"].items():
        if enc.get("mode") == "embedding":  # one column of codes
            frame[col] = [cats[int(round(c))] for c in x[:, at]]
            at += 1
        else:
            frame[col] = [cats[i] for i in x[:, at:at + len(cats)].argmax(1)]
            at += len(cats)
    return frame
