"""Checkpoints: atomic, verified, weights_only; a resumed run equals an uninterrupted one."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch

from atoll.core.checkpoint import (
    CheckpointDir,
    CheckpointError,
    load,
    rng_state,
    save,
    set_rng_state,
)
from atoll.core.runner import run_local
from atoll.core.spec import SpecError, load_spec
from atoll.tracking.base import NullTracker


class InterruptAt(NullTracker):
    """Ctrl-C right after epoch `epoch`'s metrics are logged, before its checkpoint is
    written: the window in which a real interrupt leaves an epoch logged but not saved."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if "train_loss" in metrics and step == self.epoch:
            raise KeyboardInterrupt


def test_roundtrip_and_rng_restore(tmp_path):
    torch.manual_seed(3)
    state = rng_state()
    expected = torch.rand(3)
    path = save({"rng": state, "w": torch.arange(4.0), "meta": {"epoch": 2, "best": None}},
                tmp_path / "c.ckpt")
    payload = load(path)
    assert payload["meta"] == {"epoch": 2, "best": None}
    set_rng_state(payload["rng"])
    torch.testing.assert_close(torch.rand(3), expected)


@pytest.mark.parametrize("damage", ["truncate", "flip", "header", "empty"])
def test_damaged_checkpoints_give_a_clear_error(tmp_path, damage):
    path = save({"w": torch.randn(100)}, tmp_path / "c.ckpt")
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":
        i = len(raw) - 50
        path.write_bytes(raw[:i] + bytes([raw[i] ^ 0xFF]) + raw[i + 1 :])
    elif damage == "header":
        path.write_bytes(b"PK" + raw[2:])
    else:
        path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="c.ckpt: (checkpoint is corrupt|not an atoll)"):
        load(path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="cannot read"):
        load(tmp_path / "none.ckpt")


class Evil:
    """Any class outside torch's weights_only allow-list."""


def test_weights_only_refuses_arbitrary_objects(tmp_path):
    path = save({"obj": Evil()}, tmp_path / "c.ckpt")
    with pytest.raises(CheckpointError, match="refused by a weights-only load"):
        load(path)


class RunsACommand:
    """What a crafted checkpoint holds: unpickling it calls os.system."""

    def __init__(self, flag):
        self.flag = flag

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.flag}",))


def test_a_crafted_pickle_with_a_valid_header_is_refused_and_never_runs(tmp_path):
    """The header's SHA-256 is integrity, not authenticity: anyone who can write the file
    can recompute it. The weights-only load is what stops the payload."""
    flag = tmp_path / "pwned"
    path = save({"model": RunsACommand(flag)}, tmp_path / "epoch-000001.ckpt")
    with pytest.raises(CheckpointError, match="refused by a weights-only load"):
        load(path)
    assert not flag.exists()


def test_keep_last_n_and_no_temp_files(tmp_path):
    d = CheckpointDir(tmp_path / "run", keep=2)
    for e in range(1, 6):
        d.save({"e": e}, e)
    assert [p.name for p in d.all()] == ["epoch-000004.ckpt", "epoch-000005.ckpt"]
    assert load(d.latest())["e"] == 5
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [p.name for p in d.all()]


def test_resume_after_epoch_k_equals_uninterrupted_run(tiny_spec, tmp_path):
    """Stopped after epoch 2 of 4 and resumed: bit-for-bit the uninterrupted result. Dropout,
    augmentation, a warm-up + cosine schedule and Adam state all have to come back."""
    common = ["train.epochs=4", "train.keep_checkpoints=10", "model.dropout=0.2",
              "data.augment.shift=1", "data.augment.noise_std=0.05", "optim.scheduler.name=cosine",
              "optim.scheduler.warmup_epochs=1", "data.limit=300"]
    full = run_local(tiny_spec(*common, "train.checkpoint_dir=a"), tracker=NullTracker())
    assert full.epochs == 4
    # "stop after epoch 2": the second run finds only the first two checkpoints
    (tmp_path / "b" / "atoll").mkdir(parents=True)
    for e in (1, 2):
        shutil.copy(tmp_path / f"a/atoll/epoch-00000{e}.ckpt", tmp_path / "b/atoll")
    resumed = run_local(tiny_spec(*common, "train.checkpoint_dir=b"), tracker=NullTracker())
    a, b = load(full.checkpoint), load(resumed.checkpoint)
    assert resumed.checkpoint.name == "epoch-000004.ckpt"
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(),
                      strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    timing = {"seconds", "samples_per_s"}
    strip = lambda hist: [{k: v for k, v in h.items() if k not in timing} for h in hist]  # noqa: E731
    assert strip(a["state"]["history"]) == strip(b["state"]["history"])
    assert full.metrics == resumed.metrics


def test_corrupt_latest_checkpoint_falls_back_to_previous(tiny_spec, tmp_path, caplog):
    caplog.set_level(logging.INFO, "atoll")
    spec = tiny_spec("train.epochs=3", "train.keep_checkpoints=3", "data.limit=200")
    run_local(spec, tracker=NullTracker())
    ckdir = tmp_path / ".atoll/checkpoints/atoll"
    (ckdir / "epoch-000003.ckpt").unlink()
    latest = ckdir / "epoch-000002.ckpt"
    latest.write_bytes(latest.read_bytes()[:-100])
    (ckdir / "atoll-finished-epoch.json").unlink(missing_ok=True)  # as if killed after 2
    result = run_local(spec, tracker=NullTracker())
    assert "skipping checkpoint" in caplog.text and "epoch-000002.ckpt" in caplog.text
    assert "trying an earlier one" in caplog.text
    assert "Delete it" not in caplog.text  # it is already being skipped
    assert "resumed from" in caplog.text and "epoch-000001.ckpt" in caplog.text
    assert result.epochs == 3


def test_all_checkpoints_corrupt_is_an_error(tiny_spec, tmp_path):
    spec = tiny_spec("train.epochs=2", "data.limit=100")
    ckdir = tmp_path / ".atoll/checkpoints/atoll"
    ckdir.mkdir(parents=True)
    (ckdir / "epoch-000001.ckpt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no checkpoint .* verifies"):
        run_local(spec, tracker=NullTracker())


def test_resume_with_a_changed_spec_is_refused(tiny_spec):
    from atoll.core.spec import SpecError

    base = ["train.epochs=3", "data.limit=100"]
    with pytest.raises(KeyboardInterrupt):
        run_local(tiny_spec(*base), tracker=InterruptAt(2))
    with pytest.raises(SpecError, match="optim.lr: 0.5 differs from 0.001"):
        run_local(tiny_spec(*base, "optim.lr=0.5"), tracker=NullTracker())
    # more epochs is a legitimate change: the run continues from epoch 1
    result = run_local(tiny_spec(*base, "train.epochs=4"), tracker=NullTracker())
    assert result.epochs == 4


def _ckpt_names(root) -> list[str]:
    return sorted(p.name for p in root.glob("epoch-*.ckpt"))


def test_fewer_epochs_than_an_unfinished_run_has_is_refused_and_keeps_it(tiny_spec, tmp_path):
    """Item 15: lowering train.epochs on an interrupted run never deletes its checkpoints."""
    spec = tiny_spec("train.epochs=4", "train.keep_checkpoints=4", "data.limit=200")
    with pytest.raises(KeyboardInterrupt):
        run_local(spec, tracker=InterruptAt(3))
    root = tmp_path / ".atoll/checkpoints/atoll"
    assert _ckpt_names(root) == ["epoch-000001.ckpt", "epoch-000002.ckpt"]
    with pytest.raises(SpecError) as e:
        run_local(tiny_spec("train.epochs=1", "train.keep_checkpoints=4", "data.limit=200"),
                  tracker=NullTracker())
    assert e.value.problems == [
        f"train.epochs: 1 is fewer than the 2 epochs run 'atoll' has already trained "
        f"({root.relative_to(tmp_path) / 'epoch-000002.ckpt'}); allowed: >= 2 to continue it "
        "(2 ends it now), or atoll run --restart to discard its checkpoints"]
    assert _ckpt_names(root) == ["epoch-000001.ckpt", "epoch-000002.ckpt"]
    # exactly the epochs it has: it ends at once, training nothing more
    done = run_local(tiny_spec("train.epochs=2", "train.keep_checkpoints=4", "data.limit=200"),
                     tracker=NullTracker())
    assert done.epochs == 2 and _ckpt_names(root) == ["epoch-000001.ckpt", "epoch-000002.ckpt"]


def test_restart_discards_an_unfinished_run(tiny_spec, tmp_path, caplog):
    caplog.set_level(logging.INFO, "atoll")
    spec = tiny_spec("train.epochs=3", "train.keep_checkpoints=4", "data.limit=200")
    with pytest.raises(KeyboardInterrupt):
        run_local(spec, tracker=InterruptAt(2))
    result = run_local(tiny_spec("train.epochs=1", "data.limit=200"), tracker=NullTracker(),
                       restart=True)
    assert "discarding 1 checkpoint of run atoll (--restart)" in caplog.text
    assert result.epochs == 1
    assert _ckpt_names(tmp_path / ".atoll/checkpoints/atoll") == ["epoch-000001.ckpt"]


def test_resume_false_never_deletes_an_unfinished_run(tiny_spec, tmp_path):
    spec = tiny_spec("train.epochs=3", "data.limit=200")
    with pytest.raises(KeyboardInterrupt):
        run_local(spec, tracker=InterruptAt(2))
    with pytest.raises(SpecError, match=r"train.resume: false, but run 'atoll' has an "
                       r"unfinished checkpoint .*allowed: atoll run --restart"):
        run_local(tiny_spec("train.epochs=3", "data.limit=200", "train.resume=false"),
                  tracker=NullTracker())
    assert _ckpt_names(tmp_path / ".atoll/checkpoints/atoll") == ["epoch-000001.ckpt"]


def test_finished_run_with_corrupt_final_checkpoint_trains_anew(tiny_spec, tmp_path, caplog):
    """Item 16: "finished" lives outside the newest checkpoint."""
    caplog.set_level(logging.INFO, "atoll")
    spec = tiny_spec("train.epochs=2", "data.limit=200")
    run_local(spec, tracker=NullTracker())
    last = tmp_path / ".atoll/checkpoints/atoll/epoch-000002.ckpt"
    last.write_bytes(last.read_bytes()[:-100])
    again = run_local(spec, tracker=NullTracker())
    assert "already completed 2 epochs; starting a new run" in caplog.text
    assert "resumed from" not in caplog.text
    assert again.epochs == 2 and load(again.checkpoint)["state"]["epoch"] == 2


def _best_spec(tiny_spec, *more: str):
    # train_loss falls every epoch on digits, so by "max" the first epoch is the best and
    # patience 2 stops after epoch 3: a deterministic best != last
    return tiny_spec("train.epochs=6", "train.keep_checkpoints=6", "data.limit=300",
                     "train.early_stopping.metric=train_loss",
                     "train.early_stopping.mode=max", "train.early_stopping.patience=2", *more)


def _test_metrics_of(spec, ckpt) -> dict[str, float]:
    from atoll.core.components import build_components
    from atoll.core.data import eval_batches, load_data, train_batches
    from atoll.core.loop import evaluate

    data = load_data(spec.data, spec.seed, spec.project_dir, spec.task)
    c = build_components(spec, data, len(train_batches(data, spec.data, spec.seed)))
    c.model.load_state_dict(load(ckpt)["model"])
    return evaluate(c.model, eval_batches(data.test, spec.data), c.loss_fn, data.num_classes,
                    prefix="test")


def test_early_stopping_restores_the_best_epoch(tiny_spec, tmp_path):
    """Item 8: the run ends with (tests) the best epoch's weights, not the last."""
    spec = _best_spec(tiny_spec)
    result = run_local(spec, tracker=NullTracker())
    root = tmp_path / ".atoll/checkpoints/atoll"
    assert result.epochs == 3
    assert result.details["selected"] == {"metric": "train_loss", "epoch": 1, "rule": "best"}
    assert result.metrics == pytest.approx(_test_metrics_of(spec, root / "epoch-000001.ckpt"))
    assert result.metrics != pytest.approx(_test_metrics_of(spec, root / "epoch-000003.ckpt"))
    kept_last = run_local(_best_spec(tiny_spec, "train.early_stopping.restore_best=false",
                                     "name=last"), tracker=NullTracker())
    assert kept_last.details["selected"]["rule"] == "last"
    assert kept_last.metrics == pytest.approx(
        _test_metrics_of(spec, tmp_path / ".atoll/checkpoints/last/epoch-000003.ckpt"))


def test_best_epoch_survives_a_resume(tiny_spec, tmp_path):
    spec = _best_spec(tiny_spec)
    with pytest.raises(KeyboardInterrupt):
        run_local(spec, tracker=InterruptAt(3))  # best was epoch 1, two epochs ago
    result = run_local(spec, tracker=NullTracker())
    assert result.epochs == 3 and result.details["selected"]["epoch"] == 1
    root = tmp_path / ".atoll/checkpoints/atoll"
    assert result.metrics == pytest.approx(_test_metrics_of(spec, root / "epoch-000001.ckpt"))


def test_finish_run_registers_nothing_untrained_and_takes_a_selection_made_elsewhere(tiny_spec):
    """Item 2 (the shared rank-0 finish): no completed epoch is FAILED; a harness that chose
    the weights itself (cluster.checkpoint_metric) passes its Selection."""
    from atoll.core.components import build_components
    from atoll.core.data import load_data, train_batches
    from atoll.core.loop import TrainState
    from atoll.core.runner import RunFailed, finish_run
    from atoll.tracking.base import Selection

    spec = tiny_spec("data.limit=100")
    data = load_data(spec.data, spec.seed, spec.project_dir, spec.task)
    c = build_components(spec, data, len(train_batches(data, spec.data, spec.seed)))
    with pytest.raises(RunFailed, match="completed no epoch; nothing was tested or registered"):
        finish_run(spec, data, c, TrainState(), NullTracker(), None, 0.0)
    out = finish_run(spec, data, c, TrainState(epoch=3), NullTracker(), None, 0.0,
                     selected=Selection("val_accuracy", 0.9, 2, "epoch", "best"))
    assert out.details["selected"] == {"metric": "val_accuracy", "epoch": 2, "rule": "best"}


def test_numpy_gaussian_cache_survives_a_checkpoint(tmp_path):
    """An odd number of normal draws leaves a cached value (Flower's DP noise draws so);
    a restored run must draw what an uninterrupted one draws."""
    from atoll.core.checkpoint import load, rng_state, save, set_rng_state

    np.random.seed(3)
    np.random.normal(size=3)  # odd: one value cached
    save({"rng": rng_state()}, tmp_path / "r.ckpt")
    expected = np.random.normal(size=4)
    np.random.seed(99)
    set_rng_state(load(tmp_path / "r.ckpt")["rng"])
    np.testing.assert_array_equal(np.random.normal(size=4), expected)


def test_resume_compatibility_across_the_model_union_and_dict_fields(tmp_path):
    """Found in review: a checkpoint from before per-model sections (its mlp dump holds
    cnn/resnet/transformer keys) refused to resume with a fix no one could apply, and keys
    added to model.kwargs were never compared."""
    from atoll.core.runner import check_resume_compatible

    spec = load_spec(None, ["model.hidden=[32]"])
    saved = {**spec.model_dump(mode="json")}
    saved["model"] = {**saved["model"], "channels": [32, 64], "depth": 8, "width": 16,
                      "patch_size": 4, "dim": 64, "heads": 4, "layers": 2}
    saved["train"]["loss"] = {**saved["train"]["loss"], "name": "cross_entropy"}
    check_resume_compatible(saved, spec, tmp_path)  # nothing that still exists differs
    user = load_spec(None, ["model.target=pkg.mod:build", "model.kwargs.width=32"])
    wider = load_spec(None, ["model.target=pkg.mod:build", "model.kwargs.width=32",
                             "model.kwargs.dropout=0.5"])
    with pytest.raises(SpecError, match=r"model.kwargs.dropout: 0.5 differs from None"):
        check_resume_compatible(user.model_dump(mode="json"), wider, tmp_path)


def test_the_writability_probe_leaves_no_folder_behind(tmp_path):
    """A refused run must leave nothing; the federated runner makes its run directory
    itself once every refusal is behind it (the probe used to leave it, and the log pump
    relied on that)."""
    from atoll.core.runner import check_writable

    check_writable(tmp_path / "a" / "b", "train.checkpoint_dir")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()
    check_writable(tmp_path / "kept", "train.checkpoint_dir")
    assert (tmp_path / "kept").is_dir()  # a folder that existed stays


def test_a_field_newer_than_the_checkpoint_counts_at_its_default(tmp_path):
    """Found in review: a checkpoint written before data.categorical_encoding existed,
    resumed with `embedding`, passed the check (only the checkpoint's own keys were
    compared) and failed later in load_state_dict; the old run had the default."""
    from atoll.core.runner import check_resume_compatible

    table = ["data.format=csv", "data.path=t.csv", "data.label=y", "data.categorical=[c]"]
    before = load_spec(None, table).model_dump(mode="json")
    del before["data"]["categorical_encoding"], before["data"]["embedding_dim"]
    check_resume_compatible(before, load_spec(None, table), tmp_path)  # the default: same
    with pytest.raises(SpecError, match=r"data.categorical_encoding: 'embedding' differs "
                                        r"from 'onehot'"):
        check_resume_compatible(before, load_spec(None, [*table,
                                                         "data.categorical_encoding=embedding"]),
                                tmp_path)
    check_resume_compatible({}, load_spec(None, table), tmp_path)  # a dump without a spec


def test_checkpoint_every_n_epochs_keeps_the_last_one(tiny_spec, tmp_path):
    """'2 epochs' over 5: checkpoints after epochs 2 and 4 and, always, the last; a resume
    from epoch 4 equals the uninterrupted run (the interval changes nothing else)."""
    common = ["train.epochs=5", "train.keep_checkpoints=10", "data.limit=200"]
    sparse = run_local(tiny_spec(*common, "train.checkpoint_every=2 epochs",
                                 "train.checkpoint_dir=a"), tracker=NullTracker())
    assert sorted(p.name for p in (tmp_path / "a/atoll").glob("epoch-*.ckpt")) == \
        ["epoch-000002.ckpt", "epoch-000004.ckpt", "epoch-000005.ckpt"]
    (tmp_path / "b/atoll").mkdir(parents=True)
    shutil.copy(tmp_path / "a/atoll/epoch-000004.ckpt", tmp_path / "b/atoll")
    resumed = run_local(tiny_spec(*common, "train.checkpoint_dir=b"), tracker=NullTracker())
    for k, v in load(sparse.checkpoint)["model"].items():
        assert torch.equal(v, load(resumed.checkpoint)["model"][k]), k


def test_checkpoint_intervals():
    from atoll.core.cadence import Cadence, parse

    assert parse("3 epochs") == ("epochs", 3) and parse("1 epoch") == ("epochs", 1)
    assert parse("0.5 minutes") == ("minutes", 0.5) and parse("2") == ("epochs", 2)
    for bad in ("0 epochs", "1.5 epochs", "soon", "-1 minutes"):
        with pytest.raises(ValueError, match="allowed: 'auto'"):
            parse(bad)
    every = Cadence.of("3 epochs", "cluster")
    assert [e for e in range(1, 8) if every.due(e, final=e == 7)] == [3, 6, 7]
    assert Cadence.of("auto", "local").unit == "epochs"
    assert (Cadence.of("auto", "cluster").unit, Cadence.of("auto", "cluster").every) == \
        ("minutes", 1)
    assert Cadence.of("auto", "cluster", selects_best=True).unit == "epochs"  # every epoch
    timed = Cadence.of("1 minute", "cluster")
    assert not timed.due(1, final=False)  # not a minute since the start
    timed.last -= 61
    assert timed.due(2, final=False)
    timed.saved()
    assert not timed.due(3, final=False) and timed.due(3, final=True)
    with pytest.raises(SpecError, match="train.checkpoint_every: 'weekly' is not valid"):
        load_spec(None, ["train.checkpoint_every=weekly"])


class _WrappedInterrupt(NullTracker):
    """Ctrl-C lands inside a library that turns the KeyboardInterrupt into its own error
    (pydantic's serializer raised PydanticSerializationError around it in a CI run)."""

    def __init__(self, epoch: int):
        self.epoch, self.status = epoch, None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if "train_loss" in metrics and step == self.epoch:
            from atoll.core import interrupts

            try:
                interrupts.handle(2, None)
            except KeyboardInterrupt as e:
                raise ValueError("Error calling function `ser_path`: KeyboardInterrupt") from e

    def finish(self, status: str = "FINISHED") -> None:
        self.status = status


def test_an_interrupt_a_library_wrapped_in_its_own_error_still_ends_killed(tiny_spec):
    from atoll.core import interrupts

    tracker = _WrappedInterrupt(2)
    try:
        with pytest.raises(KeyboardInterrupt, match="re-run the same command to resume"):
            run_local(tiny_spec("train.epochs=3", "data.limit=100"), tracker=tracker)
    finally:
        interrupts.reset()
    assert tracker.status == "KILLED"
