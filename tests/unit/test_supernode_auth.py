"""SuperNode identities and their registration step, without a SuperLink: the key pairs and
the SuperExec secret `python -m atoll.federated.certs` writes are what Flower loads, private
material is 0600 and never printed, and `python -m atoll.federated.supernode_auth` refuses bad
input (and a SuperLink it cannot reach) in one line with exit 2, before registering
anything. Registration against a real SuperLink: tests/integration/test_deploy_flower.py.
"""

from __future__ import annotations

import sys

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from atoll.core.procs import free_port
from atoll.federated import certs
from atoll.federated.supernode_auth import main


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    out = tmp_path_factory.mktemp("certs")
    paths = certs.generate(out, hosts=("localhost", "127.0.0.1"))
    return {"out": out, "ca": paths["ca"], "keys": certs.supernode_keys(out, 2),
            "secret": certs.superexec_secret(out)}


def test_supernode_keys_are_openssh_p384_pairs_the_private_half_0600(material):
    names = [(p.relative_to(material["out"]).as_posix(), q.relative_to(material["out"])
              .as_posix()) for p, q in material["keys"]]
    assert names == [("supernodes/supernode-0.key", "supernodes/supernode-0.pub"),
                     ("supernodes/supernode-1.key", "supernodes/supernode-1.pub")]
    publics = set()
    for private, public in material["keys"]:
        assert private.stat().st_mode & 0o777 == 0o600
        assert private.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
        key = serialization.load_ssh_private_key(private.read_bytes(), None)  # what Flower calls
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        line = public.read_text()
        assert line.startswith("ecdsa-sha2-nistp384 ") and line.count("\n") == 1
        pub = serialization.load_ssh_public_key(line.encode())
        assert pub.public_numbers() == key.public_key().public_numbers()
        publics.add(line)
    assert len(publics) == 2  # every SuperNode its own identity


def test_superexec_secret_is_random_and_0600(material, tmp_path):
    secret = material["secret"]
    assert secret.name == "superexec.secret" and secret.stat().st_mode & 0o777 == 0o600
    assert len(secret.read_bytes()) >= 32
    assert certs.superexec_secret(tmp_path).read_bytes() != secret.read_bytes()


def test_certs_cli_writes_everything_and_prints_no_private_material(tmp_path, monkeypatch,
                                                                      capsys):
    out = tmp_path / "c"
    monkeypatch.setattr(sys, "argv", ["certs", str(out), "--supernodes", "3"])
    certs.main()
    printed = capsys.readouterr().out
    assert sorted(p.name for p in (out / "supernodes").iterdir()) == [
        f"supernode-{k}.{ext}" for k in range(3) for ext in ("key", "pub")]
    assert {"ca.crt", "server.pem", "server.key", "superexec.secret"} <= {
        p.name for p in out.iterdir()}
    assert "PRIVATE" not in printed and (out / "superexec.secret").read_text() not in printed
    assert "supernode-2.pub" in printed


def _refused(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("python -m atoll.federated.supernode_auth: error: ")
    return err


@pytest.mark.parametrize("case, fragment", [
    ("missing", "no such file"),
    ("private", "this is a private key; register the .pub file"),
    ("ed25519", "an Ed25519 key; Flower needs an EC key on a NIST curve"),
    ("garbage", "not an OpenSSH public key line"),
    ("certificate", "not an OpenSSH public key line"),
])
def test_register_refuses_a_key_flower_would_refuse_in_one_line(material, tmp_path, capsys,
                                                                  case, fragment):
    private, public = material["keys"][0]
    ed = tmp_path / "ed.pub"
    ed.write_bytes(ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("hello\n")
    bad = {"missing": tmp_path / "nope.pub", "private": private, "ed25519": ed,
           "garbage": garbage, "certificate": material["ca"]}[case]
    # the good key first: nothing is registered while any key is bad (no SuperLink runs)
    err = _refused(capsys, ["--superlink", "127.0.0.1:9", "--root-certificates",
                            str(material["ca"]), str(public), str(bad)])
    assert fragment in err and str(bad) in err
    secret_body = private.read_text().splitlines()[1]
    assert secret_body not in err


def test_register_refuses_a_bad_address_or_a_missing_ca(material, capsys):
    public = str(material["keys"][0][1])
    err = _refused(capsys, ["--superlink", "superlink", "--root-certificates",
                            str(material["ca"]), public])
    assert "expected host:port" in err
    err = _refused(capsys, ["--superlink", "127.0.0.1:9093", "--root-certificates",
                            str(material["out"] / "missing.crt"), public])
    assert "missing.crt: no such file" in err


def test_register_says_in_one_line_when_the_superlink_is_unreachable(material, capsys):
    port = free_port()  # nothing listens there
    err = _refused(capsys, ["--superlink", f"127.0.0.1:{port}", "--root-certificates",
                            str(material["ca"]), str(material["keys"][0][1])])
    assert f"cannot reach the SuperLink at 127.0.0.1:{port}" in err
