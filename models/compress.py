"""Post-training compression of a trained model, and what it costs and saves.

`int8_dynamic`: torch.ao's dynamic quantisation — `nn.Linear` weights stored as int8,
activations quantised on the fly per batch (CPU). `int8_static`: torch.ao's FX graph mode —
Linear/Conv weights and the activations between them int8, the activations' ranges set
once from calibration batches, Conv+BatchNorm+ReLU fused (x86/fbgemm kernels); a layer it
would leave in float is refused by name. `prune`: magnitude pruning with
torch.nn.utils.prune — unstructured (the smallest |w| over every Linear/Conv weight,
globally) or structured (whole output channels/neurons by L2 norm, per layer) — made
permanent. Sizes are of the TorchScript archive a deployment loads (`scripted`), raw and
zip-compressed (pruned zeros cost nothing once compressed); latency is the median and
95th percentile of a forward at a batch size, on this CPU. `onnx_bytes` exports the graph;
running it (onnxruntime) belongs to the deployment side, `tracking/compress.py`.
"""

from __future__ import annotations

import copy
import io
import time
import warnings
import zlib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.utils.prune as prune_utils

from atoll.core.imports import first_line

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)
STATIC = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# layers with weights that int8 is about; one of these left in float is not an int8 model
WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
            nn.MultiheadAttention, nn.RNNBase, nn.Embedding, nn.EmbeddingBag)


class NotApplicable(ValueError):
    """A method that cannot apply to this model (exit 2, naming what is missing)."""


def int8_dynamic(model: nn.Module) -> nn.Module:
    """Linear layers with int8 weights (a copy; the model is left as it is)."""
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise NotApplicable("int8-dynamic quantises nn.Linear layers; the model has none")
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch.ao's deprecation notices (quantised tensors)
        warnings.simplefilter("ignore")
        _engine()
        return quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)


def _engine() -> str:
    """The quantised kernels of this CPU (x86: fbgemm/onednn; ARM: qnnpack)."""
    engines = torch.backends.quantized.supported_engines
    engine = "x86" if "x86" in engines else "qnnpack"
    torch.backends.quantized.engine = engine
    return engine


@torch.no_grad()
def int8_static(model: nn.Module, calibration: list[torch.Tensor]) -> nn.Module:
    """A copy with int8 Linear/Conv layers and int8 activations between them, whose ranges
    the `calibration` batches set (observed once, then fixed)."""
    if not any(isinstance(m, STATIC) for m in model.modules()):
        raise NotApplicable("int8-static quantises Linear and Conv layers; the model has none")
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation and observer notices
        qconfig = get_default_qconfig_mapping(_engine())
        try:
            prepared = prepare_fx(copy.deepcopy(model).eval(), qconfig,
                                  example_inputs=(calibration[0][:1],))
        except Exception as e:  # noqa: BLE001 - torch.fx could not trace it: say where
            raise NotApplicable(
                f"int8-static traces the model with torch.fx, which failed ({type(e).__name__}"
                f": {first_line(e)}); allowed: --method int8-dynamic "
                "or onnx") from None
        for x in calibration:
            prepared(x)
        out = convert_fx(prepared)
    # the generated code carries the user's annotations, which are strings under
    # `from __future__ import annotations` and TorchScript cannot resolve: types are
    # inferred without them
    for node in out.graph.nodes:
        node.type = None
    out.recompile()
    left = [(name, type(m).__name__) for name, m in out.named_modules()
            if isinstance(m, WEIGHTED) and any(p.is_floating_point()
                                               for p in m.parameters(recurse=False))]
    if left:
        name, kind = left[0]
        more = f" and {len(left) - 1} more layer(s)" if len(left) > 1 else ""
        raise NotApplicable(f"int8-static cannot quantise {name} ({kind}){more}: torch.ao "
                            "leaves it in float; allowed: --method int8-dynamic or onnx")
    return out


def prune(model: nn.Module, amount: float, structured: bool = False,
          keep_masks: bool = False) -> nn.Module:
    """A copy with `amount` of its Linear/Conv weights zeroed by magnitude (structured:
    whole output rows by L2 norm, in each layer; the last layer's outputs are kept).
    `keep_masks` leaves torch's pruning reparametrisation in place (weight = orig · mask) so
    fine-tuning cannot revive a pruned weight; `unmask` makes it permanent."""
    out = copy.deepcopy(model)
    layers = [m for m in out.modules() if isinstance(m, PRUNABLE)]
    if not layers:
        raise NotApplicable("pruning acts on Linear and Conv layers; the model has none")
    if structured:
        for m in layers[:-1]:  # removing the last layer's outputs would remove classes
            prune_utils.ln_structured(m, "weight", amount=amount, n=2, dim=0)
            if m.bias is not None:  # a removed neuron's bias would still fire
                rows = m.weight_mask.flatten(1).any(1).to(m.bias.dtype)
                prune_utils.custom_from_mask(m, "bias", rows)
    else:
        prune_utils.global_unstructured([(m, "weight") for m in layers],
                                        pruning_method=prune_utils.L1Unstructured,
                                        amount=amount)
    return out if keep_masks else unmask(out)


def unmask(model: nn.Module) -> nn.Module:
    """Make pruning permanent: the masked weights become plain parameters (in place)."""
    for m in model.modules():
        if isinstance(m, PRUNABLE):
            for name in ("weight", "bias"):
                if hasattr(m, name + "_mask"):
                    prune_utils.remove(m, name)
    return model


def sparsity(model: nn.Module) -> float:
    """Share of zeros among the Linear/Conv weights."""
    ws = [m.weight.detach() for m in model.modules() if isinstance(m, PRUNABLE)]
    total = sum(w.numel() for w in ws)
    return sum(int((w == 0).sum()) for w in ws) / max(total, 1)


def scripted(model: nn.Module) -> bytes:
    """The TorchScript archive of the model in eval mode (what `size` measures)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():  # TorchScript's deprecation and FX-module notices
        warnings.simplefilter("ignore")
        try:
            program = torch.jit.script(model.eval())
        except Exception as e:  # noqa: BLE001 - a user's model TorchScript cannot compile
            raise NotApplicable(f"TorchScript cannot compile the model ({type(e).__name__}: "
                                f"{first_line(e)})") from None
        torch.jit.save(program, buf)
    return buf.getvalue()


def size(archive: bytes) -> tuple[int, int]:
    """(bytes, bytes once zlib-compressed at level 9)."""
    return len(archive), len(zlib.compress(archive, 9))


@torch.no_grad()
def latency_ms(model: nn.Module, x: torch.Tensor, repeats: int = 50) -> tuple[float, float]:
    """(p50, p95) milliseconds of one forward of `x`, after a few warm-up calls."""
    model.eval()
    for _ in range(3):
        model(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.percentile(times, 50)), float(np.percentile(times, 95))


def onnx_bytes(model: nn.Module, x: torch.Tensor) -> bytes:
    """The model as an ONNX graph (torch's dynamo exporter), batch size left dynamic."""
    import logging

    quiet = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [q.level for q in quiet]
    for q in quiet:  # the exporter narrates every step at INFO/WARNING
        q.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model.eval(), (x,), dynamo=True, verbose=False,
                                        dynamic_shapes=({0: torch.export.Dim("batch")},))
    except Exception as e:  # noqa: BLE001 - what the exporter could not translate, in words
        raise NotApplicable(f"the model does not export to ONNX ({type(e).__name__}: "
                            f"{first_line(e)})") from None
    finally:
        for q, level in zip(quiet, levels, strict=True):
            q.setLevel(level)
    return program.model_proto.SerializeToString()


@torch.no_grad()
def parity(model: nn.Module, other: nn.Module, x: torch.Tensor) -> float:
    """max |model(x) − other(x)| over the outputs."""
    return float((model.eval()(x).float() - other(x).float()).abs().max())
