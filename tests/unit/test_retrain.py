"""Training compressed networks on the one loop: the distillation loss by hand, fine-tuning
that cannot revive a pruned weight, and a student that learns from its teacher alone."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from atoll.core.data import load_data
from atoll.core.loop import evaluate
from atoll.core.spec import validate
from atoll.models import build_model
from atoll.models import compress as C
from atoll.models.retrain import SoftTargets, _Taught, retrain


def test_the_distillation_loss_by_hand():
    s = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 1.0]])
    t = torch.tensor([[1.0, 1.0, -2.0], [0.0, 3.0, 0.0]])
    y = torch.tensor([0, 2])
    ce = F.cross_entropy(s, y)
    loss = SoftTargets(torch.nn.CrossEntropyLoss(), temperature=2.0, alpha=0.25)
    assert loss(s, y) == ce  # no teacher logits (evaluation): the labels alone
    loss.teacher_logits = t
    soft = 0.0  # T² · mean over samples of Σ p_t (log p_t − log p_s), at T = 2
    for i in range(2):
        pt = [math.exp(v / 2) for v in t[i].tolist()]
        ps = [math.exp(v / 2) for v in s[i].tolist()]
        pt, ps = [p / sum(pt) for p in pt], [p / sum(ps) for p in ps]
        soft += sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps, strict=True)) / 2
    assert float(loss(s, y)) == pytest.approx(0.75 * float(ce) + 0.25 * 4 * soft, rel=1e-6)
    loss.teacher_logits = s  # a student that already agrees: only the labels' part is left
    assert float(loss(s, y)) == pytest.approx(0.75 * float(ce), rel=1e-6)


def _digits(epochs: int = 3):
    spec = validate({"name": "t", "data": {"name": "digits", "batch_size": 32},
                     "model": {"name": "mlp", "hidden": [64]}, "train": {"epochs": epochs,
                     "progress": "off"}, "optim": {"name": "adam", "lr": 0.003}})
    return spec, load_data(spec.data, spec.seed, spec.project_dir, spec.task)


def _accuracy(model, data) -> float:
    batches = [(data.test.x[i:i + 256], data.test.y[i:i + 256])
               for i in range(0, len(data.test), 256)]
    return evaluate(model, batches, torch.nn.CrossEntropyLoss(), data.num_classes)[
        "val_accuracy"]


def test_fine_tuning_a_pruned_model_never_revives_a_pruned_weight():
    spec, data = _digits()
    torch.manual_seed(0)
    model = build_model(spec.model, data.input_shape, data.num_classes)
    pruned = C.prune(model, 0.7, keep_masks=True)
    zeros = [(m.weight == 0).clone() for m in pruned.modules() if isinstance(m, C.PRUNABLE)]
    before = _accuracy(pruned, data)
    retrain(pruned, spec, data, epochs=2)
    C.unmask(pruned)
    after = [m.weight == 0 for m in pruned.modules() if isinstance(m, C.PRUNABLE)]
    assert all(torch.equal(a, b) for a, b in zip(zeros, after, strict=True))
    assert C.sparsity(pruned) == pytest.approx(0.7, abs=0.01)
    assert _accuracy(pruned, data) > max(0.8, before + 0.3)


def test_a_student_taught_without_labels_learns_what_its_teacher_knows():
    spec, data = _digits()
    torch.manual_seed(0)
    teacher = build_model(spec.model, data.input_shape, data.num_classes)
    untrained = build_model(spec.model, data.input_shape, data.num_classes).eval()
    retrain(teacher, spec, data, epochs=3)
    assert _accuracy(teacher, data) > 0.9
    student_spec = validate({"name": "s", "model": {"name": "mlp", "hidden": [16]}}).model
    taught = {}
    for name, t in (("trained", teacher), ("untrained", untrained)):
        torch.manual_seed(1)
        student = build_model(student_spec, data.input_shape, data.num_classes)
        retrain(student, spec, data, epochs=3, teacher=t, alpha=1.0)  # labels weigh 0
        taught[name] = _accuracy(student, data)
    assert taught["trained"] > 0.8 and taught["untrained"] < 0.3, taught


def test_teacher_logits_are_handed_out_per_batch_and_cleared_after_the_epoch():
    teacher = torch.nn.Linear(2, 3)
    loss = SoftTargets(torch.nn.CrossEntropyLoss(), 1.0, 0.5)
    batches = [(torch.randn(4, 2), torch.zeros(4, dtype=torch.long)) for _ in range(3)]
    seen = []
    for x, _ in _Taught(batches, teacher, loss):
        seen.append(torch.equal(loss.teacher_logits, teacher(x).detach()))
    assert seen == [True, True, True] and loss.teacher_logits is None


def test_a_regression_student_learns_from_its_teacher_and_is_evaluated_in_target_units(
        tmp_path):
    from tests import datagen

    path = datagen.write_regression_csv(tmp_path)
    spec = validate({"name": "r", "data": {"format": "csv", "path": str(path),
                                           "label": "price", "batch_size": 32,
                                           "categorical": ["region"]},
                     "model": {"name": "mlp", "hidden": [32]},
                     "train": {"epochs": 8, "progress": "off"},
                     "optim": {"name": "adam", "lr": 0.01}})
    data = load_data(spec.data, spec.seed, spec.project_dir, spec.task)
    assert data.task == "regression"
    torch.manual_seed(0)
    teacher = build_model(spec.model, data.input_shape, data.num_classes)
    retrain(teacher, spec, data, epochs=8)
    student = build_model(validate({"name": "s", "model": {"name": "mlp", "hidden": [8]}})
                          .model, data.input_shape, data.num_classes)
    m = retrain(student, spec, data, epochs=8, teacher=teacher, alpha=1.0)  # no labels
    assert m["val_r2"] > 0.8, m


def test_fine_tuning_starts_at_its_own_learning_rate_without_warm_up():
    spec, data = _digits()
    spec = spec.model_copy(update={"optim": spec.optim.model_copy(update={
        "lr": 0.01, "scheduler": spec.optim.scheduler.model_copy(update={
            "warmup_epochs": 5.0})})})
    torch.manual_seed(0)
    model = build_model(spec.model, data.input_shape, data.num_classes)
    assert retrain(model, spec, data, epochs=1, lr=0.001)["lr"] == pytest.approx(0.001)
    # from scratch (a student): the spec's own schedule, a fifth of the way up its warm-up
    assert retrain(model, spec, data, epochs=1)["lr"] == pytest.approx(0.002, rel=0.05)
