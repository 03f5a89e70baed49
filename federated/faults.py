"""Injected faults and Byzantine behaviour, seeded so that a robustness experiment repeats.

Pure functions of (seed, round, client): the client asks what happens to it this round,
and the server can recompute the same answer when it reports who misbehaved.
"""

from __future__ import annotations

import numpy as np
import torch

from atoll.core.spec import ByzantineSpec, FaultSpec


class InjectedFault(RuntimeError):
    """A fault the spec asked for (crash, or a dropout's late reply); Flower returns it as
    an error reply."""


def round_fault(spec: FaultSpec, seed: int, server_round: int, client: int) -> str:
    """'dropout', 'crash', 'straggler' or '' for this client in this round.

    dropout: the client never replies (the server waits until round_timeout); crash: it
    fails part-way through its local training; straggler: it replies after a delay.
    """
    u = np.random.default_rng([seed, server_round, client, 17]).random(3)
    if u[0] < spec.dropout:
        return "dropout"
    if u[1] < spec.crash:
        return "crash"
    if u[2] < spec.straggler:
        return "straggler"
    return ""


def unavailable(spec: FaultSpec, seed: int, server_round: int, client: int) -> bool:
    """Is this client absent in this round? A client goes away with probability
    `unavailable` per round and stays away for `unavailable_rounds` consecutive rounds;
    the server recomputes this and samples only from the clients present."""
    if spec.unavailable <= 0:
        return False
    first = max(1, server_round - spec.unavailable_rounds + 1)
    return any(np.random.default_rng([seed, r, client, 29]).random() < spec.unavailable
               for r in range(first, server_round + 1))


def byzantine_clients(spec: ByzantineSpec, num_clients: int, seed: int) -> set[int]:
    """The fixed set of malicious partition ids (floor(fraction × clients), seeded)."""
    k = int(spec.fraction * num_clients)
    if k == 0 or spec.attack == "none":
        return set()
    return {int(i) for i in np.random.default_rng([seed, 23]).permutation(num_clients)[:k]}


def flip_labels(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """label_flip: class c becomes C-1-c."""
    return num_classes - 1 - y


def poison_update(spec: ByzantineSpec, global_state: dict[str, torch.Tensor],
                  local_state: dict[str, torch.Tensor], seed: int, server_round: int,
                  client: int) -> dict[str, torch.Tensor]:
    """What a malicious client sends instead of its honest weights.

    sign_flip sends global − scale·Δ, scaling global + scale·Δ (Δ = local − global), and
    gaussian replaces Δ by N(0, noise_std²) noise. Integer buffers (BatchNorm counters) are
    sent unchanged so the model stays loadable.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + server_round * 1_009 + client)
    out = {}
    for k, w in local_state.items():
        g0 = global_state[k]
        if not torch.is_floating_point(w):
            out[k] = w
            continue
        delta = w - g0
        if spec.attack == "sign_flip":
            out[k] = g0 - spec.scale * delta
        elif spec.attack == "scaling":
            out[k] = g0 + spec.scale * delta
        elif spec.attack == "gaussian":
            out[k] = g0 + spec.noise_std * torch.randn(w.shape, generator=g, dtype=w.dtype)
        else:
            out[k] = w
    return out
