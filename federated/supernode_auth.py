"""Register SuperNode public keys with a Flower SuperLink: the SuperNode allow-list.

A SuperLink started with `--enable-supernode-auth` admits a SuperNode only if the public
half of the key the SuperNode signs with (`--auth-supernode-private-key`) was registered
through its Control API first; any other node is refused when it activates, so it never
gets a node id or a message. Flower 1.41 has no allow-list file, so this is the one step
that turns `.pub` files (`python -m atoll.federated.certs`) into registrations, for the
deployment test and the compose service that runs before the SuperNodes start.

It drives `flwr supernode register`, Flower's own client of the Control API, with a
private temporary FLWR_HOME that names only this SuperLink: a user's ~/.flwr is neither
read nor changed. A key that is already registered counts as done, because the
SuperLink's database outlives a restart of this step. Only public keys are read.

    python -m atoll.federated.supernode_auth --superlink superlink:9093 \\
        --root-certificates certs/ca.crt certs/supernodes/*.pub
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

CONNECTION = "atoll"  # the one SuperLink connection in the private FLWR_HOME
ALREADY_REGISTERED = "Public key already in use"  # the Control API's answer to a repeat
UNREACHABLE = "Connection to the SuperLink is unavailable"
NIST_CURVES = {"secp192r1", "secp224r1", "secp256r1", "secp384r1", "secp521r1"}


class RegistrationError(Exception):
    """Input or SuperLink trouble, worded as one line for the person running the step."""


def check_public_key(path: Path) -> None:
    """Refuse, before contacting the SuperLink, what Flower would refuse: a missing file or
    anything but an OpenSSH public key line on a NIST EC curve. The messages never quote the
    file, which may be a private key passed by mistake."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not path.is_file():
        raise RegistrationError(f"{path}: no such file")
    data = path.read_bytes()
    if b"PRIVATE KEY" in data:
        raise RegistrationError(f"{path}: this is a private key; register the .pub file")
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, UnsupportedAlgorithm):
        raise RegistrationError(f"{path}: not an OpenSSH public key line "
                                "(ecdsa-sha2-nistp384 AAAA...)") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        kind = type(key).__name__.removeprefix("_").removesuffix("PublicKey")
        raise RegistrationError(f"{path}: an {kind} key; Flower needs an EC key on a NIST "
                                "curve (ecdsa-sha2-nistp384)")
    if key.curve.name not in NIST_CURVES:
        raise RegistrationError(f"{path}: EC curve {key.curve.name} is not a NIST curve")


def _host_port(address: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RegistrationError(f"--superlink {address!r}: expected host:port")
    return address


def _flwr() -> str:
    """The `flwr` next to this interpreter (a venv that is not activated), else on PATH."""
    beside = Path(sys.executable).parent / "flwr"
    found = str(beside) if beside.is_file() else shutil.which("flwr")
    if not found:
        raise RegistrationError("the flwr command is not installed")
    return found


def _answer(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The JSON `--format json` prints; failures that bypass it become an error dict."""
    out = proc.stdout
    start, end = out.find("{"), out.rfind("}")
    if start >= 0:
        try:
            return json.loads(out[start:end + 1])
        except json.JSONDecodeError:
            pass
    lines = [ln.strip(" │╭╰─") for ln in (proc.stderr + "\n" + out).splitlines()]
    lines = [ln for ln in lines if ln]
    return {"success": False,
            "error-message": lines[-1] if lines else f"flwr exited {proc.returncode}"}


def register(pub_keys: Iterable[Path], superlink_address: str, root_ca: Path,
             timeout: float = 120.0) -> dict[Path, int | None]:
    """Register every public key with the SuperLink's Control API.

    Returns each key's node id; None for a key that was already registered (Flower's CLI
    does not say which node holds it). Raises RegistrationError naming the first bad key,
    before anything is registered, or the SuperLink's refusal.
    """
    keys = [Path(p) for p in pub_keys]
    if not keys:
        raise RegistrationError("no public keys given")
    _host_port(superlink_address)
    if not Path(root_ca).is_file():
        raise RegistrationError(f"{root_ca}: no such file (the SuperLink's CA certificate)")
    for key in keys:
        check_public_key(key)
    flwr = _flwr()
    out: dict[Path, int | None] = {}
    with tempfile.TemporaryDirectory(prefix="atoll-flwr-home-") as home:
        (Path(home) / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f"address = {json.dumps(superlink_address)}\n"
            f"root-certificates = {json.dumps(str(Path(root_ca).resolve()))}\n")
        env = {**os.environ, "FLWR_HOME": home, "FLWR_DISABLE_UPDATE_CHECK": "1",
               "NO_COLOR": "1"}
        for key in keys:
            try:
                proc = subprocess.run(
                    [flwr, "supernode", "register", str(key.resolve()), CONNECTION,
                     "--format", "json"], capture_output=True, text=True, env=env,
                    timeout=timeout, stdin=subprocess.DEVNULL, check=False)
            except subprocess.TimeoutExpired:
                raise RegistrationError(f"the SuperLink at {superlink_address} did not answer "
                                        f"within {timeout:.0f}s") from None
            answer = _answer(proc)
            if answer.get("success") and "node-id" in answer:
                out[key] = int(answer["node-id"])
                continue
            message = " ".join(str(answer.get("error-message", "")).split())
            if ALREADY_REGISTERED in message:
                out[key] = None
            elif UNREACHABLE in message:
                raise RegistrationError(
                    f"cannot reach the SuperLink at {superlink_address} over TLS with CA "
                    f"{root_ca} (is it up, and does its certificate name that host?)")
            else:
                raise RegistrationError(f"{key}: the SuperLink refused it: {message}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m atoll.federated.supernode_auth",
        description="Register SuperNode public keys (OpenSSH .pub) with a Flower SuperLink "
                    "started with --enable-supernode-auth. Keys already registered are "
                    "left as they are.")
    ap.add_argument("keys", nargs="+", type=Path, metavar="KEY.pub",
                    help="SuperNode public keys, e.g. certs/supernodes/*.pub")
    ap.add_argument("--superlink", required=True, metavar="HOST:PORT",
                    help="the SuperLink's Control API (Flower 1.41: its one HTTPS port)")
    ap.add_argument("--root-certificates", required=True, type=Path, metavar="CA.crt",
                    help="CA certificate that signed the SuperLink's TLS certificate")
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="seconds to wait for each registration (default: %(default)s)")
    args = ap.parse_args(argv)
    try:
        ids = register(args.keys, args.superlink, args.root_certificates, args.timeout)
    except RegistrationError as e:
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        return 2
    for key, node_id in ids.items():
        print(f"{key}: " + (f"registered as node {node_id}" if node_id is not None
                            else "already registered"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
