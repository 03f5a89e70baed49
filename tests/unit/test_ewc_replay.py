"""EWC and replay invariants: penalty at the anchor, analytic gradient, exact per-sample
Fisher, bounded and balanced memory, state that survives a weights_only checkpoint."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from atoll.continual.ewc import EWC, fisher_diagonal
from atoll.continual.replay import Replay
from atoll.core.checkpoint import load, save
from atoll.core.data import Batches, Split
from atoll.core.spec import EwcSpec, ReplaySpec


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))


def _data(n: int = 40, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


def test_penalty_is_zero_at_the_anchor_and_its_gradient_is_analytic():
    model, data = _model(), _data()
    ewc = EWC(EwcSpec(lam=7.0))
    assert ewc.penalty(model) is None  # nothing consolidated yet
    ewc.after_task(model, None, Batches(data, 8, shuffle=False))
    assert ewc.penalty(model).item() == 0.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.zero_grad()
    ewc.penalty(model).backward()
    fisher, anchor = ewc.fishers[0], ewc.anchors[0]
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 7.0 * fisher[n] * (p.detach() - anchor[n]))


def test_per_sample_fisher_matches_a_plain_loop():
    model, data = _model(), _data(12)
    got = fisher_diagonal(model, Batches(data, 5, shuffle=False), max_samples=12,
                          per_sample=True)
    model.eval()
    want = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for x, y in zip(data.x, data.y, strict=True):
        model.zero_grad()
        F.cross_entropy(model(x[None]), y[None]).backward()
        for n, p in model.named_parameters():
            want[n] += p.grad**2 / 12
    for n in want:
        torch.testing.assert_close(got[n], want[n])


def test_fisher_pass_freezes_batch_norm_and_restores_mode():
    model = _model().train()
    before = model[1].running_mean.clone()
    fisher_diagonal(model, Batches(_data(), 8), max_samples=40)
    assert torch.equal(model[1].running_mean, before) and model.training


def test_sampled_labels_and_sample_cap():
    model = _model()
    f = fisher_diagonal(model, Batches(_data(), 8), max_samples=10, labels="sampled",
                        generator=torch.Generator().manual_seed(0))
    assert all(torch.isfinite(v).all() and (v >= 0).all() for v in f.values())


def test_separate_keeps_one_pair_per_task_online_keeps_one_decayed():
    model = _model()
    sep, onl = EWC(EwcSpec(mode="separate")), EWC(EwcSpec(mode="online", gamma=0.5))
    loaders = [Batches(_data(seed=s), 8, shuffle=False) for s in (1, 2)]
    first = None
    for loader in loaders:
        sep.after_task(model, None, loader)
        onl.after_task(model, None, loader)
        first = first or {n: f.clone() for n, f in onl.fishers[0].items()}
    assert len(sep.fishers) == 2 and len(onl.fishers) == 1
    for n, f in onl.fishers[0].items():
        torch.testing.assert_close(f, 0.5 * first[n] + sep.fishers[1][n])


def test_replay_balanced_memory_is_bounded_and_balanced():
    r = Replay(ReplaySpec(size=30, policy="balanced"))
    for task, classes in enumerate([(0, 1), (2, 3), (4, 5)]):
        y = torch.tensor(classes).repeat(50)
        r.add(torch.randn(len(y), 3) + task, y)
        assert len(r) <= 30
        counts = torch.bincount(r.y)
        present = counts[counts > 0]
        assert len(present) == 2 * (task + 1) and present.max() - present.min() <= 1
    assert len(r) == 30


def test_replay_reservoir_is_bounded_and_uniform_enough():
    r = Replay(ReplaySpec(size=100, policy="reservoir"))
    for chunk in range(10):
        r.add(torch.full((100, 1), float(chunk)), torch.full((100,), chunk))
        assert len(r) == min(100, 100 * (chunk + 1))
    counts = torch.bincount(r.y, minlength=10)
    assert counts.min() >= 2  # every chunk kept some samples: no recency bias


def test_replay_mixes_memory_into_batches():
    r = Replay(ReplaySpec(size=10, batch=4))
    data = _data(16)
    assert [len(y) for _, y in r.batches(Batches(data, 8, shuffle=False), None)] == [8, 8]
    r.after_task(None, None, Batches(data, 8))
    assert len(r) == 10
    assert [len(y) for _, y in r.batches(Batches(data, 8, shuffle=False), None)] == [12, 12]


def test_state_survives_a_weights_only_checkpoint(tmp_path):
    model = _model()
    ewc, rep = EWC(EwcSpec()), Replay(ReplaySpec(size=8))
    ewc.after_task(model, None, Batches(_data(), 8))
    rep.after_task(model, None, Batches(_data(), 8))
    payload = load(save({"ewc": ewc.state_dict(), "replay": rep.state_dict()},
                        tmp_path / "s.ckpt"))
    ewc2, rep2 = EWC(EwcSpec()), Replay(ReplaySpec(size=8))
    ewc2.load_state_dict(payload["ewc"])
    rep2.load_state_dict(payload["replay"])
    torch.testing.assert_close(ewc2.penalty(model), ewc.penalty(model))
    assert torch.equal(rep2.x, rep.x) and rep2.seen == rep.seen
    assert torch.equal(rep2.generator.get_state(), rep.generator.get_state())


def test_regression_fisher_is_the_gaussian_one():
    """A regression model (one output, float targets, unit-variance Gaussian likelihood in
    z-score units) has the exact Fisher (∇f)²: for a linear model E[x²] for the weights
    and 1 for the bias, whatever the residuals (the empirical (y − f)²·x² vanishes on a
    fitted task) and for both label settings. (EWC on a regression stream raised
    "expected target dtype to be Long" before.)"""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x, y = torch.randn(40, 3), torch.randn(40)
    for labels, per_sample in (("empirical", False), ("sampled", True)):
        fisher = fisher_diagonal(model, [(x, y)], max_samples=40, per_sample=per_sample,
                                 labels=labels, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(fisher["weight"], (x ** 2).mean(0)[None])
        torch.testing.assert_close(fisher["bias"], torch.ones(1))
