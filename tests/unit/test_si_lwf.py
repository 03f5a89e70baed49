"""SI and LwF invariants: zero penalty where they should be, importances, state round trips."""

from __future__ import annotations

import io

import pytest
import torch

from atoll.continual.lwf import LwF
from atoll.continual.si import SI
from atoll.core.spec import LwfSpec, SiSpec


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def _steps(model, strategy, n=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(n):
        x, y = torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        extra = strategy.penalty(model)
        (loss + extra if extra is not None else loss).backward()
        strategy.after_backward(model)
        opt.step()


def test_si_importance_is_nonnegative_and_the_penalty_zero_at_the_anchor():
    model, si = _net(), SI(SiSpec(c=0.5))
    si.before_task(model, None)
    _steps(model, si)
    si.after_task(model, None, [])
    assert si.omega and all((o >= 0).all() for o in si.omega.values())
    assert any(o.sum() > 0 for o in si.omega.values())
    assert si.penalty(model).item() == pytest.approx(0.0)
    with torch.no_grad():
        model[0].weight.add_(0.1)
    model.zero_grad()
    p = si.penalty(model)
    p.backward()
    expected = 2 * 0.5 * si.omega["0.weight"] * 0.1  # d/dθ c·Ω(θ−θ*)²
    torch.testing.assert_close(model[0].weight.grad, expected)


def test_si_path_integral_matches_a_hand_computed_step():
    """One SGD step of lr η on L = ½θ²: ω = −g·Δθ = η·g², Ω = ω/(Δθ² + ξ)."""
    w = torch.nn.Parameter(torch.tensor([2.0]))
    model = torch.nn.Module()
    model.w = w
    si = SI(SiSpec(xi=0.1))
    si.before_task(model, None)
    opt = torch.optim.SGD([w], lr=0.5)
    (0.5 * w.pow(2)).sum().backward()
    si.after_backward(model)
    opt.step()
    si.after_task(model, None, [])
    g, dtheta = 2.0, -0.5 * 2.0
    torch.testing.assert_close(si.omega["w"], torch.tensor([(0.5 * g * g) / (dtheta ** 2 + 0.1)]))


def test_lwf_is_zero_against_itself_and_positive_after_drift():
    model, lwf = _net(), LwF(LwfSpec(alpha=1.0, temperature=2.0))
    lwf.after_task(model, None, [])
    x = torch.randn(8, 4)
    batches = list(lwf.batches([(x, torch.zeros(8, dtype=torch.long))], None))
    assert len(batches) == 1
    gen = lwf.batches([(x, torch.zeros(8, dtype=torch.long))], None)
    next(gen)  # inside the batch: the penalty sees its inputs
    assert lwf.penalty(model).item() == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():
        model[2].bias[0] += 1.0  # a shift common to all logits would not change softmax
    assert lwf.penalty(model).item() > 1e-3


@pytest.mark.parametrize("make", [lambda: SI(SiSpec()), lambda: LwF(LwfSpec())])
def test_state_dict_round_trips_through_a_weights_only_load(make):
    model, s = _net(), make()
    s.before_task(model, None)
    _steps(model, s, n=3)
    s.after_task(model, None, [])
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    other = make()
    other.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    other.before_task(model, None)
    with torch.no_grad():
        model[0].bias.add_(0.3)
    if isinstance(s, LwF):
        gen = s.batches([(torch.randn(4, 4), torch.zeros(4, dtype=torch.long))], None)
        x, _ = next(gen)
        other._x = x
    torch.testing.assert_close(other.penalty(model), s.penalty(model))


def test_agem_projection_removes_the_conflict_and_keeps_agreeing_gradients():
    from atoll.continual.agem import project

    g, ref = torch.tensor([1.0, -2.0]), torch.tensor([0.0, 1.0])
    p = project(g, ref)
    assert torch.dot(p, ref).item() == pytest.approx(0.0)
    torch.testing.assert_close(p, torch.tensor([1.0, 0.0]))
    agree = torch.tensor([1.0, 3.0])
    assert project(agree, ref) is agree


def test_agem_step_does_not_increase_the_memory_loss_to_first_order():
    from atoll.continual.agem import AGEM
    from atoll.core.spec import AgemSpec

    model, agem = _net(), AGEM(AgemSpec(size=32, batch=32))
    g = torch.Generator().manual_seed(3)
    mx, my = torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)
    agem.memory.add(mx, my)
    x, y = torch.randn(16, 4, generator=g), (my[:16] + 1) % 3  # a conflicting task
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    agem.after_backward(model)
    ref = torch.autograd.grad(torch.nn.functional.cross_entropy(model(mx), my),
                              list(model.parameters()))
    dot = sum((p.grad * r).sum() for p, r in zip(model.parameters(), ref, strict=True))
    assert dot.item() >= -1e-5  # the step −η·g cannot raise the memory loss
    assert agem.projected == 1


def test_joint_epoch_covers_every_stored_sample_once():
    from atoll.continual.joint import Joint
    from atoll.core.data import Batches, Split

    j = Joint(seed=0)
    old = Split(torch.arange(40, dtype=torch.float32).view(40, 1),
                torch.zeros(40, dtype=torch.long))
    j.after_task(None, None, Batches(old, 8, shuffle=False))
    cur = Split(torch.full((20, 1), -1.0), torch.ones(20, dtype=torch.long))
    seen = torch.cat([x for x, _ in j.batches(Batches(cur, 5, shuffle=True, seed=1), None)])
    assert sorted(seen[seen >= 0].tolist()) == list(range(40))  # each old sample once
    assert (seen < 0).sum() == 20
    other = Joint(seed=0)
    other.load_state_dict(j.state_dict())
    assert torch.equal(other.x, j.x)


def _saved(si: SI) -> SI:
    """`si` as a checkpoint or a federated client's Context.state brings it back."""
    buf = io.BytesIO()
    torch.save(si.state_dict(), buf)
    buf.seek(0)
    out = SI(si.cfg)
    out.load_state_dict(torch.load(buf, weights_only=True))
    return out


def test_si_resumed_mid_task_ends_the_task_as_an_uninterrupted_one():
    """A checkpoint between two epochs of a task (or a federated round boundary) keeps the
    task's running path integral: the KeyError of a strategy restored without it is gone,
    and Ω at the task's end is the uninterrupted one."""
    model, si = _net(), SI(SiSpec(c=0.5))
    si.before_task(model, None)
    _steps(model, si, n=10, seed=1)
    _steps(model, si, n=10, seed=2)
    si.after_task(model, None, [])

    model2, first = _net(), SI(SiSpec(c=0.5))
    first.before_task(model2, None)
    _steps(model2, first, n=10, seed=1)
    resumed = _saved(first)
    _steps(model2, resumed, n=10, seed=2)
    resumed.after_task(model2, None, [])
    for n, o in si.omega.items():
        torch.testing.assert_close(resumed.omega[n], o)


def test_si_across_federated_rounds_counts_local_steps_not_the_servers_jump():
    """A federated client trains one task over several rounds, each from a new global
    model: `pause` closes a round's last step, so what the server's averaging moved is
    never taken for a gradient step's contribution."""
    model, si = _net(), SI(SiSpec(c=0.5))
    si.before_task(model, None)
    _steps(model, si, n=5, seed=1)
    si.pause(model)
    after_round = {n: w.clone() for n, w in si._w.items()}
    si = _saved(si)
    with torch.no_grad():  # the server's aggregate replaces the client's weights
        for p in model.parameters():
            p.add_(1.0)
    _steps(model, si, n=1, seed=2)  # one step: nothing closed until the next one or a pause
    for n, w in after_round.items():
        torch.testing.assert_close(si._w[n], w)
    si.pause(model)
    assert any((si._w[n] != w).any() for n, w in after_round.items())
