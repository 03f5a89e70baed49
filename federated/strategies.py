"""Flower's own Message-API strategies, configured from the spec, plus their checkpoint state.

Sampling is done by atoll's seeded sampler (see `federated/driver.py`): each strategy sees
only the sampled nodes and takes all of them, so `fraction_*` and `min_*` are set to pass
everything through. Aggregation, robust rules and DP are Flower's, unchanged.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from atoll.core.spec import ExperimentSpec
from atoll.federated import records as R


def num_malicious(spec: ExperimentSpec) -> int:
    return spec.federated.malicious()


def build_strategy(spec: ExperimentSpec, sampled: int) -> Any:
    """The Flower strategy for `spec.federated.strategy`, DP-wrapped if the spec says so.

    `sampled` is the number of clients per training round (the DP wrappers need it).
    """
    from flwr.serverapp import strategy as fs

    f = spec.federated
    common = dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=1,
                  min_evaluate_nodes=1, min_available_nodes=1,
                  weighted_by_key=R.NUM_EXAMPLES, arrayrecord_key=R.ARRAYS,
                  configrecord_key=R.CONFIG)
    name = f.strategy
    # server_lr unset: Flower's own defaults (FedAvgM 1.0, FedAdam/FedAdagrad 0.1, FedYogi 0.01)
    opt: dict[str, Any] = dict(eta_l=spec.optim.lr, tau=f.tau)
    if f.server_lr is not None:
        opt["eta"] = f.server_lr
    if name == "fedavg":
        s = fs.FedAvg(**common)
    elif name == "fedavgm":
        s = fs.FedAvgM(**common, server_learning_rate=f.server_lr or 1.0,
                       server_momentum=f.server_momentum)
    elif name == "fedprox":
        s = fs.FedProx(**common, proximal_mu=f.proximal_mu)
    elif name == "fedadam":
        s = fs.FedAdam(**common, **opt)
    elif name == "fedyogi":
        s = fs.FedYogi(**common, **opt)
    elif name == "fedadagrad":
        s = fs.FedAdagrad(**common, **opt)
    elif name == "fedtrimmedavg":
        s = fs.FedTrimmedAvg(**common, beta=f.trim_beta)
    elif name == "fedmedian":
        s = fs.FedMedian(**common)
    elif name == "krum":
        s = fs.Krum(**common, num_malicious_nodes=num_malicious(spec))
    elif name == "multikrum":
        s = fs.MultiKrum(**common, num_malicious_nodes=num_malicious(spec),
                         num_nodes_to_select=f.num_selected)
    elif name == "bulyan":
        s = fs.Bulyan(**common, num_malicious_nodes=num_malicious(spec))
    else:  # the spec validator lists the allowed names; this is a programming error
        raise AssertionError(name)
    return _with_privacy(spec, s, sampled)


def _with_privacy(spec: ExperimentSpec, s: Any, sampled: int) -> Any:
    from flwr.serverapp import strategy as fs

    p = spec.federated.privacy
    if p.mode == "none":
        return s
    if p.mode in ("server-fixed", "client-fixed"):
        cls = (fs.DifferentialPrivacyServerSideFixedClipping if p.mode == "server-fixed"
               else fs.DifferentialPrivacyClientSideFixedClipping)
        try:  # Flower's RDP accountant when this combination supports it
            return cls(s, noise_multiplier=p.noise_multiplier, clipping_norm=p.clipping_norm,
                       num_sampled_clients=sampled, accountant=_accountant(spec))
        except (ValueError, ImportError):
            return cls(s, noise_multiplier=p.noise_multiplier, clipping_norm=p.clipping_norm,
                       num_sampled_clients=sampled)
    cls = (fs.DifferentialPrivacyServerSideAdaptiveClipping if p.mode == "server-adaptive"
           else fs.DifferentialPrivacyClientSideAdaptiveClipping)
    return cls(s, noise_multiplier=p.noise_multiplier, num_sampled_clients=sampled,
               initial_clipping_norm=p.clipping_norm, target_clipped_quantile=p.target_quantile)


def _accountant(spec: ExperimentSpec) -> Any:
    from flwr.supercore.privacy_accounting import (
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    if spec.federated.privacy.noise_multiplier <= 0:
        raise ValueError("no noise, nothing to account")
    return RdpAccountant(PrivacyConfig(
        target_delta=spec.federated.privacy.delta, population_size=spec.federated.num_clients,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION))


def epsilon(strategy: Any) -> float | None:
    """Cumulative ε from Flower's accountant, when the strategy has one."""
    spent = getattr(strategy, "privacy_spent", None)
    result = spent() if callable(spent) else None
    return float(result.epsilon) if result is not None else None


# ----------------------------------------------------------------------- checkpoint state
# Flower's strategies keep their round-to-round state in plain attributes (FedAdam's m_t
# and v_t, FedAvgM's momentum_vector, the DP wrappers' clipping norm and accountant).
# Capturing every array- or number-valued attribute covers all of them without a list
# that would silently go stale when Flower adds a strategy.


def strategy_state(s: Any) -> dict[str, Any]:
    from flwr.app import ArrayRecord
    from flwr.serverapp.strategy import Strategy

    out: dict[str, Any] = {}
    for name, v in vars(s).items():
        if isinstance(v, ArrayRecord):
            out[name] = {"kind": "arrays", "value": R.arrays_to_state(v)}
        elif isinstance(v, np.ndarray):
            out[name] = {"kind": "ndarray", "value": torch.from_numpy(v.copy())}
        elif isinstance(v, dict) and v and all(isinstance(x, np.ndarray) for x in v.values()):
            out[name] = {"kind": "ndict",
                         "value": {k: torch.from_numpy(x.copy()) for k, x in v.items()}}
        elif isinstance(v, list) and v and all(isinstance(x, np.ndarray) for x in v):
            out[name] = {"kind": "nlist", "value": [torch.from_numpy(x.copy()) for x in v]}
        elif isinstance(v, bool | int | float) and not name.startswith("_"):
            out[name] = {"kind": "scalar", "value": v}
        elif name == "accountant" and v is not None:
            out[name] = {"kind": "accountant", "value": json.dumps(v.state_dict())}
        elif isinstance(v, Strategy):
            out[name] = {"kind": "strategy", "value": strategy_state(v)}
    return out


def load_strategy_state(s: Any, state: dict[str, Any]) -> None:
    from flwr.app import ArrayRecord

    for name, item in state.items():
        kind, v = item["kind"], item["value"]
        if kind == "arrays":
            setattr(s, name, ArrayRecord({k: t for k, t in v.items()}))
        elif kind == "ndarray":
            setattr(s, name, v.numpy())
        elif kind == "ndict":
            setattr(s, name, {k: t.numpy() for k, t in v.items()})
        elif kind == "nlist":
            setattr(s, name, [t.numpy() for t in v])
        elif kind == "scalar":
            setattr(s, name, v)
        elif kind == "accountant":
            getattr(s, name).load_state_dict(json.loads(v))
        elif kind == "strategy":
            load_strategy_state(getattr(s, name), v)
