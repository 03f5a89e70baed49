"""Spec validation: every bad input exits 2 with one line naming field, value and what is
allowed, before any work starts."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from atoll.core.cli import main
from atoll.core.spec import ExperimentSpec, SpecError, apply_overrides, load_spec, validate
from tests.conftest import CONFIGS


def _validate(tmp_path: Path, text: str | None, *sets: str, capsys) -> tuple[int, str]:
    path = tmp_path / "spec.yaml"
    if text is not None:
        path.write_text(textwrap.dedent(text))
    args = ["validate", str(path)]
    for s in sets:
        args += ["--set", s]
    code = main(args)
    return code, capsys.readouterr().err


BAD = [
    # (yaml, overrides, expected fragments of the one error line)
    ("modle: local\n", (), ["modle: unknown key", "did you mean 'mode'"]),
    ("data:\n  batchsize: 3\n", (), ["data.batchsize: unknown key", "'batch_size'"]),
    ("train:\n  epochs: many\n", (), ["train.epochs: 'many'", "integer"]),
    ("optim:\n  lr: -0.1\n", (), ["optim.lr: -0.1 is out of range", "> 0"]),
    ("federated:\n  fraction_fit: 1.7\n", (), ["federated.fraction_fit: 1.7", "<= 1"]),
    ("data:\n  name: digitz\n", (), ["data.name: 'digitz'", "allowed: digits", "'digits'"]),
    ("model:\n  name: resnett\n", (), ["model.name: 'resnett'", "allowed: mlp", "'resnet'"]),
    ("optim:\n  name: adamx\n", (), ["optim.name: 'adamx'", "allowed: sgd, adam, adamw"]),
    ("mode: swarm\n", (), ["mode: 'swarm'", "'local', 'cluster' or 'federated'"]),
    ("name: x\n", ("train.epochs=0",), ["train.epochs: 0 is out of range", ">= 1"]),
    ("data:\n  val_fraction: 0.5\n  test_fraction: 0.6\n", (), ["leaves no training data"]),
    ("optim:\n  name: adam\n  nesterov: true\n", (), ["nesterov needs name: sgd"]),
    ("model:\n  name: resnet\n  depth: 9\n", (), ["model.depth: 9", "not 6n+2"]),
    ("model:\n  name: transformer\n  patch_size: 3\n", (),
     ["model.patch_size: 3", "allowed: [1, 2, 4, 8]"]),
    ("data:\n  name: synthetic\nmodel:\n  name: cnn\n", (), ["needs image data", "allowed: mlp"]),
    ("train:\n  early_stopping:\n    metric: val_acc\n", (), ["'val_accuracy'"]),
    ("- a\n- b\n", (), ["top level is a list"]),
    ("name: x\n", ("epochs",), ["expected KEY=VALUE"]),
    ("name: x\n", ("tracking.alias=has space",), ["tracking.alias: 'has space'"]),
    ("mode: cluster\ncluster:\n  strategy: hybrid\n  num_workers: 6\n  pipeline_stages: 4\n",
     (), ["cluster.num_workers: 6 is not dp × pp", "multiples of 4"]),
    ("mode: cluster\ncluster:\n  strategy: pipeline\ntrain:\n  grad_accum_steps: 2\n", (),
     ["train.grad_accum_steps: 2 with cluster.strategy 'pipeline'", "allowed: 1"]),
    ("mode: federated\nfederated:\n  engine: vectorized\n",
     ("continual.stream=permuted", "continual.scenario=domain", "continual.strategy=[ewc,lwf]"),
     ["continual.strategy: lwf with federated.engine: vectorized",
      "allowed: naive, joint, ewc, si, replay, or federated.engine: flower"]),
    ("mode: federated\n", ("federated.compression.error_feedback=true",),
     ["federated.compression.error_feedback: true with method 'none'"]),
    ("mode: federated\n", ("federated.compression.method=zip",),
     ["federated.compression.method: 'zip'"]),
    ("mode: federated\nfederated:\n  engine: vectorized\n", ("train.grad_accum_steps=2",),
     ["train.grad_accum_steps: 2 with federated.engine: vectorized"]),
    ("mode: cluster\ncluster:\n  strategy: pipeline\n  microbatches: 5\n", (),
     ["cluster.microbatches: 5 does not divide the per-replica batch 64"]),
    ("mode: cluster\ncluster:\n  strategy: pipeline\n  schedule: 1f1b\n  microbatches: 1\n",
     (), ["cluster.microbatches: 1 is fewer than the 2 stages 1F1B needs", "at least 2"]),
    ("continual:\n  ewc:\n    aggregate: server\nfederated:\n  privacy:\n    mode: server-fixed\n",
     (), ["continual.ewc.aggregate: 'server' sends each client's Fisher", "allowed with "
          "privacy: client"]),
    ("mode: cluster\ncluster:\n  num_workers: 3\n", (),
     ["data.batch_size: 64 (the global batch) does not split over 3"]),
    ("mode: federated\ntrain:\n  compile: true\n", (),
     ["train.compile: true — a client builds its model anew every round", "allowed in "
      "federated mode: false"]),
    ("mode: cluster\ncluster:\n  strategy: fsdp\ntrain:\n  compile: true\n", (),
     ["train.compile: true with cluster.strategy 'fsdp'", "allowed: cluster.strategy ddp"]),
    ("mode: federated\ndata:\n  streaming: true\n  format: csv\n  path: a.csv\n", (),
     ["data.streaming: true, but federated clients read their partition whole",
      "allowed in federated mode: auto or false"]),
    ("mode: cluster\ndata:\n  streaming: true\n  format: npz\n  path: a.npz\n", (),
     ["data.streaming: true, but data.format 'npz' is read whole",
      "allowed: data.format csv, parquet, imagefolder"]),
    ("mode: cluster\ndata:\n  streaming: true\n  format: csv\n  path: a.csv\n"
     "cluster:\n  strategy: pipeline\n  num_workers: 2\n", (),
     ["data.streaming: true with cluster.strategy 'pipeline'", "allowed with streaming: ddp"]),
    ("mode: cluster\ndata:\n  streaming: true\n  format: csv\n  path: a.csv\n"
     "continual:\n  stream: permuted\n  scenario: domain\n", (),
     ["data.streaming: true with continual.stream 'permuted'", "data.streaming false"]),
    ("train:\n  checkpoint_every: weekly\n", (),
     ["train.checkpoint_every: 'weekly' is not valid", "'N epochs'"]),
]


def _one_line_refusal(tmp_path, capsys, text, sets, fragments) -> None:
    """The spec is refused with exit 2 and one line that holds every fragment."""
    code, err = _validate(tmp_path, text, *sets, capsys=capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])


@pytest.mark.parametrize(("text", "sets", "fragments"), BAD, ids=[b[2][0][:30] for b in BAD])
def test_bad_spec_exits_2_with_one_line(tmp_path, capsys, text, sets, fragments):
    _one_line_refusal(tmp_path, capsys, text, sets, fragments)


def test_missing_file(tmp_path, capsys):
    code = main(["validate", str(tmp_path / "nope.yaml")])
    assert code == 2
    assert "nope.yaml' does not exist" in capsys.readouterr().err


def test_empty_file(tmp_path, capsys):
    code, err = _validate(tmp_path, "", capsys=capsys)
    assert code == 2 and "is empty" in err


def test_yaml_syntax_error_names_line(tmp_path, capsys):
    code, err = _validate(tmp_path, "name: x\ndata:\n  name: [digits\n  batch_size: 3\n",
                          capsys=capsys)
    assert code == 2
    assert "YAML syntax error" in err and "line 4" in err


def test_several_problems_one_line_each(tmp_path, capsys):
    code, err = _validate(tmp_path, "optim:\n  lr: 0\ntrain:\n  epochs: 0\nfoo: 1\n",
                          capsys=capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 3
    assert {ln.split(":")[1].strip() for ln in lines} == {"optim.lr", "train.epochs", "foo"}


def test_real_process_exit_code(tmp_path):
    (tmp_path / "bad.yaml").write_text("optim:\n  lr: -1\n")
    out = subprocess.run([sys.executable, "-m", "atoll.core.cli", "validate", "bad.yaml"],
                         capture_output=True, text=True, cwd=tmp_path, check=False)
    assert out.returncode == 2
    assert out.stderr.strip() == "atoll: optim.lr: -1 is out of range; allowed: > 0.0"


def test_overrides_take_the_field_type():
    spec = load_spec(None, ["federated.rounds=20", "model.hidden=[32, 16]", "name=123",
                            "optim.grad_clip=1.5", "data.normalize=false",
                            "train.checkpoint_dir=/tmp/x", "continual.strategy=naive"])
    assert spec.federated.rounds == 20
    assert spec.model.hidden == [32, 16]
    assert spec.name == "123"  # a str field keeps the raw string
    assert spec.optim.grad_clip == 1.5
    assert spec.data.normalize is False
    assert str(spec.train.checkpoint_dir) == "/tmp/x"
    assert spec.continual.strategy == ["naive"]


def test_override_unknown_path_is_reported():
    with pytest.raises(SpecError) as e:
        load_spec(None, ["federated.round=3"])
    assert len(e.value.problems) == 1
    assert e.value.problems[0].startswith(
        "federated.round: unknown key (did you mean 'rounds'?); allowed: num_clients, rounds, "
        "fraction_fit, ")


def test_shipped_configs_are_valid():
    for path in CONFIGS.glob("*.yaml"):
        assert isinstance(load_spec(path), ExperimentSpec)


def test_flat_and_roundtrip():
    spec = load_spec(CONFIGS / "demo.yaml")
    flat = spec.flat()
    assert flat["optim.scheduler.name"] == "cosine"
    assert flat["model.hidden"] == [256, 128]
    import yaml

    assert validate(yaml.safe_load(spec.to_yaml())) == spec


def test_apply_overrides_creates_sections():
    assert apply_overrides({}, ["data.augment.shift=2"]) == {"data": {"augment": {"shift": 2}}}


def test_cluster_mesh_is_dp_by_pp():
    def mesh(**c):
        return ExperimentSpec.model_validate({"mode": "cluster", "cluster": c}).cluster.mesh()

    assert mesh(strategy="ddp", num_workers=4) == (4, 1)
    assert mesh(strategy="pipeline", num_workers=3, microbatches=2) == (1, 3)
    assert mesh(strategy="hybrid", num_workers=4) == (2, 2)
    assert mesh(strategy="hybrid", num_workers=6, pipeline_stages=3) == (2, 3)


NON_FINITE = [
    ("optim:\n  lr: .inf\n", (), ["optim.lr: inf is not allowed", "allowed: a finite number"]),
    ("name: x\n", ("optim.lr=nan",), ["optim.lr: nan is not allowed", "a finite number"]),
    ("name: x\n", ("optim.lr=inf",), ["optim.lr: inf is not allowed", "a finite number"]),
    ("name: x\n", ("optim.grad_clip=inf",), ["optim.grad_clip: inf is not allowed"]),
    ("train:\n  early_stopping:\n    min_delta: .nan\n", (),
     ["train.early_stopping.min_delta: nan is not allowed"]),
    ("optim:\n  betas: [0.9, .inf]\n", (), ["optim.betas.1: inf is not allowed"]),
]


@pytest.mark.parametrize(("text", "sets", "fragments"), NON_FINITE,
                         ids=[f"{b[0]}{b[1]}" for b in NON_FINITE])
def test_non_finite_floats_are_refused(tmp_path, capsys, text, sets, fragments):
    _one_line_refusal(tmp_path, capsys, text, sets, fragments)


def test_duplicate_yaml_keys_are_refused_naming_key_and_lines(tmp_path, capsys):
    code, err = _validate(tmp_path, "name: x\noptim:\n  lr: 0.1\n  name: sgd\n  lr: 0.2\n",
                          capsys=capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "optim.lr: duplicate key at line 5 (first at line 3)" in lines[0]
    assert "spec.yaml" in lines[0]


def test_duplicate_top_level_key(tmp_path, capsys):
    code, err = _validate(tmp_path, "name: a\nseed: 1\nname: b\n", capsys=capsys)
    assert code == 2 and "name: duplicate key at line 3 (first at line 1)" in err


def test_binary_spec_file_is_one_line(tmp_path):
    (tmp_path / "spec.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary")
    out = subprocess.run([sys.executable, "-m", "atoll.core.cli", "validate", "spec.yaml"],
                         capture_output=True, text=True, cwd=tmp_path, check=False)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "atoll: spec: spec.yaml is not a UTF-8 text file (byte 0x89 at offset 0); allowed: a "
        "YAML spec such as configs/demo.yaml"]


def test_directory_given_as_spec(tmp_path, capsys):
    code = main(["validate", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "is a directory" in err and "does not exist" not in err


def test_name_pattern_is_printed_as_written(tmp_path, capsys):
    code, err = _validate(tmp_path, "name: 'my run'\n", capsys=capsys)
    assert code == 2
    assert "name: 'my run' is not allowed; allowed: a name matching ^[A-Za-z0-9]" in err


@pytest.mark.parametrize("uri", ["foo://bar", "htp://localhost:5000"])
def test_unknown_tracking_uri_scheme_is_a_spec_error(tmp_path, capsys, uri):
    code, err = _validate(tmp_path, "name: x\n", f"tracking.uri={uri}", capsys=capsys)
    assert code == 2
    assert f"tracking.uri: {uri!r} is not valid" in err and "allowed: " in err and "sqlite" in err


def test_known_tracking_uris_are_accepted():
    for uri in ("sqlite:///runs.db", "http://127.0.0.1:5000", "https://mlflow.example.com",
                "file:///tmp/mlruns", "postgresql://u:p@host/db", "mlruns", "databricks"):
        assert load_spec(None, [f"tracking.uri={uri}"]).tracking.uri == uri


def test_restore_best_defaults_to_true():
    assert load_spec(None).train.early_stopping.restore_best is True
    assert load_spec(None, ["train.early_stopping.restore_best=false"]
                     ).train.early_stopping.restore_best is False


@pytest.mark.parametrize("raw", ["null", "~"])
def test_set_null_clears_an_optional_string_field(raw):
    """`--set tracking.registered_model=null` turns registration off; it registered a model
    literally named 'null' (found in test_federated's fault test)."""
    spec = load_spec(None, [f"tracking.registered_model={raw}"])
    assert spec.tracking.registered_model is None
    assert load_spec(None, ["tracking.registered_model=nullable"]).tracking.registered_model \
        == "nullable"


def test_a_spec_error_survives_pickling():
    """Raised inside a Ray task or a DataLoader worker, it reaches the driver pickled."""
    import pickle

    e = pickle.loads(pickle.dumps(SpecError(["data.path: x; allowed: y", "b: c"])))
    assert e.problems == ["data.path: x; allowed: y", "b: c"]


def test_compress_steps_take_the_fields_of_their_method_only():
    base = {"name": "x", "tracking": {"registered_model": "m"}}
    spec = validate({**base, "compress": [
        {"method": "prune", "amount": 0.3, "finetune_epochs": 2},
        {"method": "distill", "student": {"name": "mlp", "hidden": [16]}, "alpha": 0.5}]})
    assert [s.tag for s in spec.compress] == ["pruned-30-ft2", "distilled"]
    flat = spec.flat()  # each step logged with what its method reads
    assert flat["compress.0.amount"] == 0.3 and "compress.0.temperature" not in flat
    assert flat["compress.1.student.hidden"] == [16] and "compress.1.amount" not in flat
    # spec.yaml (each step with its method's fields) reads back: `atoll compress` rebuilds it
    assert validate(yaml.safe_load(spec.to_yaml())).compress == spec.compress
    assert set(spec.model_dump()["compress"][0]) == {"method", "amount", "structured",
                                                     "finetune_epochs", "finetune_lr"}
    for step, line in [
        ({"method": "int8-static", "amount": 0.3},
         "compress.0: amount: read by method prune only; this step's method is int8-static"),
        ({"method": "onnx", "amount": 0.5},  # the default value is still a setting
         "compress.0: amount: read by method prune only; this step's method is onnx"),
        ({"method": "distill"}, "compress.0: student: method distill needs the student's"),
        ({"method": "prune", "amount": 1.0}, "compress.0.amount: 1.0 is out of range"),
        ({"method": "int8"}, "compress.0.method: 'int8' is not allowed; allowed: "
                             "'int8-dynamic', 'int8-static'"),
    ]:
        with pytest.raises(SpecError) as e:
            validate({**base, "compress": [step]})
        assert str(e.value).startswith(line), str(e.value)


@pytest.mark.parametrize("args,line", [
    (["--method", "prune", "--amount", "1.5"],
     "atoll: --amount: 1.5 is out of range; allowed: < 1.0"),
    (["--method", "int8-static", "--amount", "0.3"],
     "atoll: --amount: read by method prune only; this step's method is int8-static"),
    (["--method", "distill", "--student", "{name: mlp}", "--amount", "0.5"],
     "atoll: --amount: read by method prune only; this step's method is distill"),
    (["--amount", "0.3"], "atoll: --amount: needs --method"),
    (["--method", "distill"],
     "atoll: --student: method distill needs the student's `model:` section"),
    (["--method", "distill", "--student", "{name: mlp, hiden: [8]}"],
     "atoll: --student: hiden: unknown key"),
    (["--method", "distill", "--student", "{name: mlp"],
     "atoll: --student: not YAML"),
])
def test_bad_compress_flags_exit_2_with_one_line_before_any_store_is_read(capsys, args, line):
    assert main(["compress", "models:/x@candidate", *args, "--uri", "sqlite:///nowhere/m.db"]
                ) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(line), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
