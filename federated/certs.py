"""Credentials for a Flower federation: TLS, SuperNode identities, the SuperExec secret.

For tests and small deployments (docker/compose.yaml), into one directory:
- `ca.crt`, `server.pem`, `server.key`: a self-signed CA and the SuperLink's certificate for
  the names it is reached by; SuperNodes, `flwr run` and SuperExecs trust `ca.crt`.
- `supernodes/supernode-K.key` / `.pub`: one EC P-384 key pair per SuperNode (OpenSSH
  formats, what `flower-supernode --auth-supernode-private-key` and `flwr supernode
  register` read). The SuperLink admits a SuperNode only once its `.pub` is registered
  (`python -m atoll.federated.supernode_auth`); the registered `.pub` files are the allow-list.
- `superexec.secret`: random bytes shared by a SuperLink/SuperNode in process isolation
  and the `flower-superexec` that runs its apps (`--superexec-auth-secret-file`).

Private material is created 0600. A real deployment uses its organisation's CA instead.

    python -m atoll.federated.certs docker/certs [--host superlink --host localhost] \
        [--supernodes 2]
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import secrets
from pathlib import Path

from atoll.core.private_files import write_private

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "superlink")
DEFAULT_SUPERNODES = 2


def generate(out: Path, hosts: tuple[str, ...] = DEFAULT_HOSTS, days: int = 365) -> dict[str, Path]:
    """Write ca.crt, server.pem and server.key into `out`; returns their paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "atoll test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                       crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False,
                                       decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {"ca": out / "ca.crt", "cert": out / "server.pem", "key": out / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    write_private(paths["key"], key.private_bytes(serialization.Encoding.PEM,
                                                   serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    return paths


def supernode_keypair(private: Path) -> Path:
    """Write a SuperNode's key pair: `private` (OpenSSH private key, unencrypted, 0600 --
    Flower loads it with `load_ssh_private_key`) and its `.pub` (an OpenSSH public key
    line, what `flwr supernode register` accepts); returns the `.pub` path."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())  # Flower's own choice of curve
    write_private(private, key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()))
    pub = private.with_suffix(".pub")
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                  serialization.PublicFormat.OpenSSH) + b"\n")
    return pub


def supernode_keys(out: Path, n: int = DEFAULT_SUPERNODES) -> list[tuple[Path, Path]]:
    """`n` key pairs as `out/supernodes/supernode-K.key` / `.pub`; [(private, public)]."""
    keys = []
    for k in range(n):
        private = out / "supernodes" / f"supernode-{k}.key"
        keys.append((private, supernode_keypair(private)))
    return keys


def superexec_secret(out: Path) -> Path:
    """A random shared secret, `out/superexec.secret` (0600; Flower reads the raw bytes)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "superexec.secret"
    write_private(path, secrets.token_hex(32).encode())
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="directory for ca.crt, server.pem, server.key, "
                    "supernodes/ and superexec.secret")
    ap.add_argument("--host", action="append", default=None,
                    help=f"a name the SuperLink is reached by (default: {DEFAULT_HOSTS})")
    ap.add_argument("--days", type=int, default=365)
    ap.add_argument("--supernodes", type=int, default=DEFAULT_SUPERNODES, metavar="N",
                    help="SuperNode key pairs to write (default: %(default)s)")
    args = ap.parse_args()
    if args.supernodes < 0:
        ap.error("--supernodes must be >= 0")
    paths = generate(args.out, tuple(args.host) if args.host else DEFAULT_HOSTS, args.days)
    for kind, p in paths.items():
        print(f"{kind}: {p}")
    for private, public in supernode_keys(args.out, args.supernodes):
        print(f"supernode: {private} (public: {public})")
    print(f"superexec secret: {superexec_secret(args.out)}")


if __name__ == "__main__":
    main()
