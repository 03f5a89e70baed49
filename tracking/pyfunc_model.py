"""The registered model's pyfunc: raw input in, class labels (or probabilities) or
regression values out.

MLflow logs this file as the model's code ("models from code"): loading it runs this
file, not an unpickled object, and needs torch, numpy and pandas, never atoll. Its
artifacts are the network as a torch.export program (`program`, loaded without
unpickling) — or, for a compressed version, a TorchScript archive (`scripted`: int8
kernels torch.export cannot hold) — and `preprocess.json`: the task, class names, the
table's columns and categories, and the training split's normalisation statistics.

    model = mlflow.pyfunc.load_model("models:/name@alias")
    model.predict(frame)                                 # labels, or values
    model.predict(images)  # float32 (N, C, H, W) in [0, 1], the training image size
    model.predict(frame, params={"probabilities": True})  # one column per class
"""

from __future__ import annotations

import json
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch


class AtollPredictor(mlflow.pyfunc.PythonModel):
    # the signature comes from the logged input example, not from predict's type hints:
    # MLflow neither wraps predict for type-hint validation nor warns that it has none
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        with open(context.artifacts["preprocess"]) as f:
            self.pre = json.load(f)
        if "scripted" in context.artifacts:  # a compressed version (`atoll compress`)
            self.net = torch.jit.load(context.artifacts["scripted"]).eval()
        elif "onnx" in context.artifacts:  # an ONNX version, run by onnxruntime
            self.net = _Onnx(context.artifacts["onnx"])
        else:
            self.net = torch.export.load(context.artifacts["program"]).module()
        self.mean = torch.tensor(self.pre["mean"], dtype=torch.float32)
        self.std = torch.tensor(self.pre["std"], dtype=torch.float32)

    def _features(self, data: Any) -> np.ndarray:
        """Raw rows or images as the float array the data reader would have produced."""
        pre = self.pre
        if isinstance(data, pd.DataFrame) and pre.get("numeric") is not None:
            missing = [c for c in pre["numeric"] + list(pre["categorical"])
                       if c not in data.columns]
            if missing:
                raise ValueError(f"input has no column {missing[0]!r}; the model takes "
                                 f"{', '.join(pre['numeric'] + list(pre['categorical']))}")
            parts = [data[pre["numeric"]].to_numpy(dtype=np.float32)]
            embedded = pre.get("categorical_encoding") == "embedding"
            for col, cats in pre["categorical"].items():
                codes = data[col].astype(str).map({v: i for i, v in enumerate(cats)})
                if embedded:  # an unseen category: the embeddings' spare row
                    parts.append(codes.fillna(len(cats)).to_numpy(dtype=np.float32)[:, None])
                    continue
                onehot = np.zeros((len(data), len(cats)), dtype=np.float32)
                known = codes.notna().to_numpy()
                onehot[np.flatnonzero(known), codes[known].astype(int).to_numpy()] = 1.0
                parts.append(onehot)  # an unseen category: all zeros, as in training
            return np.concatenate(parts, axis=1)
        # arrays as the reader made them (images: float32 (N, C, H, W) in [0, 1] at the
        # training size; the signature, from a raw example, holds MLflow to that)
        x = np.asarray(data.to_numpy() if isinstance(data, pd.DataFrame) else data)
        return x.astype(np.float32).reshape(len(x), *pre["input_shape"])

    def predict(self, context, model_input, params=None):
        # no type hints: MLflow would read them as the input schema; the signature comes
        # from the logged input example
        x = (torch.from_numpy(self._features(model_input)) - self.mean) / self.std
        with torch.no_grad():
            out = self.net(x).float()
        if self.pre["task"] == "regression":  # the network predicts z-scores
            return (out.reshape(len(x)).double() * self.pre["y_std"] +
                    self.pre["y_mean"]).numpy()
        probs = torch.softmax(out, dim=1).numpy()
        classes = self.pre["classes"] or [str(i) for i in range(probs.shape[1])]
        if (params or {}).get("probabilities"):
            return pd.DataFrame(probs, columns=classes)
        if self.pre.get("int_classes"):  # integer labels come back as integers
            return np.asarray([int(c) for c in classes], dtype=np.int64)[probs.argmax(1)]
        return np.asarray(classes, dtype=object)[probs.argmax(1)]


mlflow.models.set_model(AtollPredictor())


class _Onnx:
    """An ONNX graph behind the call the torch network answers (tensor in, tensor out)."""

    def __init__(self, path: str):
        import onnxruntime as ort

        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input: x.numpy()})[0])
