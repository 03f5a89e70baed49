"""Ray token authentication, the client side: which token atoll sends, and one-line errors.

A Ray cluster started with `RAY_AUTH_MODE=token` (Ray >= 2.52) refuses every Job API
request and every driver connection without its token. atoll finds the token where Ray
does, in Ray's own order (its `AuthenticationTokenLoader`), and never takes it from argv,
a spec or a parameter:

1. `RAY_AUTH_TOKEN`: the token itself (trimmed; an empty value is ignored);
2. `RAY_AUTH_TOKEN_PATH`: a file whose first line (trimmed) is the token; a file that is
   missing, empty or unreadable is an error, with no fallback (as in Ray);
3. `~/.ray/auth_token`: only when `RAY_AUTH_MODE=token` is set, as Ray's own clients read
   a token only in that mode; a stray file does not make atoll send a token.

Job API (`atoll submit`, `atoll jobs`): the token goes in an explicit
`Authorization: Bearer` header (`headers()`), so it works whatever `RAY_AUTH_MODE` this
process had when ray was imported (Ray's client adds a token only in token mode).

Drivers (`atoll run` with `mode: cluster` against RAY_ADDRESS): `ray.init` reads the
token itself, but only if `RAY_AUTH_MODE=token` was set before ray was first imported
(Ray reads its config at import). Decision: a token the user configured is meant to be
used, so importing the `cluster` package (the only one that imports ray) calls
`token_mode_for_ray()`, which sets `RAY_AUTH_MODE=token` for this process when
`RAY_AUTH_TOKEN` or `RAY_AUTH_TOKEN_PATH` is set and `RAY_AUTH_MODE` is not. An explicit
`RAY_AUTH_MODE` (e.g. `disabled`) is left alone. The variables are inherited by what atoll
starts; the token's value is never copied anywhere (a job inherits the cluster's own
environment, not the submitter's).

Failures are `RayAuthError`: one line naming the variable to set (the CLI prints it and
exits 2), raised before anything is written or uploaded.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

TOKEN_VAR = "RAY_AUTH_TOKEN"
PATH_VAR = "RAY_AUTH_TOKEN_PATH"
MODE_VAR = "RAY_AUTH_MODE"
SET_IT = f"set {PATH_VAR} to a file holding it (or {TOKEN_VAR})"


class RayAuthError(RuntimeError):
    """Ray's token authentication refused us, or the configured token cannot be read:
    one line for the user, never a traceback (exit 2: a setting to fix, nothing ran)."""


@dataclass(frozen=True)
class Token:
    value: str
    source: str  # where it came from, for messages: never the value

    def __repr__(self) -> str:  # a stray repr/log of this object shows no secret
        return f"Token(source={self.source!r})"


def _token_mode() -> bool:
    return os.environ.get(MODE_VAR, "").strip().lower() == "token"


def _read_file(path: Path, source: str) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="strict")
    except FileNotFoundError:
        raise RayAuthError(f"{source}: the token file does not exist; {SET_IT}") from None
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise RayAuthError(f"{source}: the token file cannot be read ({why}); {SET_IT}"
                           ) from None
    lines = text.splitlines()
    value = lines[0].strip() if lines else ""
    if not value:
        raise RayAuthError(f"{source}: the token file is empty (the token is its first "
                           f"line); {SET_IT}")
    return value


def token() -> Token | None:
    """The configured token (Ray's order), None when none is configured; RayAuthError
    for a token file that cannot give one."""
    value = os.environ.get(TOKEN_VAR, "").strip()
    if value:
        return Token(value, TOKEN_VAR)
    path = os.environ.get(PATH_VAR, "")
    if path:
        source = f"{PATH_VAR} ({path})"
        return Token(_read_file(Path(path).expanduser(), source), source)
    if _token_mode():
        home = Path.home() / ".ray" / "auth_token"
        if home.is_file():
            return Token(_read_file(home, str(home)), str(home))
        raise RayAuthError(f"{MODE_VAR}=token is set but there is no token: {SET_IT}, "
                           f"or write it to {home}")
    return None


def excludes_for(working_dir: Path) -> list[str]:
    """Ray `excludes` patterns for the token files (RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)
    that lie inside `working_dir`, so a job's upload never carries one."""
    root = working_dir.resolve()
    candidates = [os.environ.get(PATH_VAR, ""), str(Path.home() / ".ray" / "auth_token")]
    out = []
    for raw in filter(None, candidates):
        path = Path(raw).expanduser().resolve()
        if path.is_relative_to(root) and path != root:
            rel = path.relative_to(root).as_posix()
            out.append("/" + re.sub(r"([*?\[\]\\!#])", r"\\\1", rel))  # gitwildmatch
    return out


def headers() -> tuple[dict[str, str], Token | None]:
    """HTTP headers for Ray's dashboard / Job API, and the token they carry."""
    found = token()
    return ({"Authorization": f"Bearer {found.value}"} if found else {}), found


def refused(what: str, found: Token | None, sent: bool) -> RayAuthError:
    """The one line for Ray's AuthenticationError from `what` ("the Ray Job API at URL");
    `sent`: whether the request carried `found`."""
    if found is not None and sent:
        return RayAuthError(f"{what} refused the token in {found.source} (Ray token "
                            f"authentication: not the cluster's token); set {PATH_VAR} to a "
                            f"file holding the cluster's token (or {TOKEN_VAR})")
    if found is not None:
        return RayAuthError(f"{what} requires a token and {found.source} holds one, but Ray "
                            f"in this process does not send it: set {MODE_VAR}=token before "
                            "atoll starts")
    return RayAuthError(f"{what} requires a token (Ray token authentication is on); {SET_IT}")


def check_cluster(address: str, sent: Token | None, found: Token | None,
                  timeout: float = 10.0) -> None:
    """Before `ray.init(address)`: one call to the cluster's GCS carrying `sent` (what Ray
    will send: the token in token mode, else nothing). A refusal is a RayAuthError.

    Ray's own driver does not say so: it retries for ~20 s, writes a warning per second to
    stderr, then raises "Failed to connect". Anything but a refusal (unreachable, TLS, an
    address that is not host:port such as `auto` or `ray://`) is left to ray.init.
    """
    if "://" in address or ":" not in address:
        return
    try:
        import grpc
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    except ImportError:  # pragma: no cover - both ship with ray
        return
    metadata = [("authorization", f"Bearer {sent.value}")] if sent else []
    with grpc.insecure_channel(address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), metadata=metadata,
                              timeout=timeout)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise refused(f"the Ray cluster at {address}", found,
                              sent=sent is not None) from None


def alive_nodes(address: str, sent: Token | None, timeout: float = 10.0) -> int | None:
    """How many nodes of the cluster at `address` are alive, asked of its GCS with what
    Ray will send; None when it cannot be asked here (`ray://`, `auto`, no answer)."""
    if "://" in address or ":" not in address:
        return None
    import grpc
    from ray.core.generated import gcs_pb2, gcs_service_pb2, gcs_service_pb2_grpc

    metadata = [("authorization", f"Bearer {sent.value}")] if sent else []
    with grpc.insecure_channel(address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            reply = stub.GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(),
                                        metadata=metadata, timeout=timeout)
        except grpc.RpcError:
            return None  # ray.init says what is wrong
    return sum(1 for n in reply.node_info_list if n.state == gcs_pb2.GcsNodeInfo.ALIVE)


def new_token(path: Path) -> Path:
    """Write a fresh token (64 hex characters, as Ray's own generator makes) to `path`,
    created 0600 from the first byte; an existing file is replaced (rotation)."""
    import secrets

    from atoll.core.private_files import write_private

    return write_private(path, (secrets.token_hex(32) + "\n").encode())


def main(argv: list[str] | None = None) -> int:
    """`python -m atoll.cluster.auth PATH`: a new cluster token file (docker/secrets/ray_token)."""
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m atoll.cluster.auth",
        description="Write a new Ray cluster token to PATH (0600). Start every Ray node "
                    f"with {MODE_VAR}=token and {PATH_VAR}=PATH; give submitters the file.")
    ap.add_argument("path", type=Path, help="where to write the token, e.g. "
                    "docker/secrets/ray_token")
    args = ap.parse_args(argv)
    try:
        print(f"token: {new_token(args.path)}")  # the path, never the value
    except OSError as e:
        print(f"python -m atoll.cluster.auth: {args.path}: cannot write ({e.strerror})",
              file=sys.stderr)
        return 2
    return 0


def token_mode_for_ray() -> None:
    """RAY_AUTH_MODE=token for this process when a token is configured and no mode is set
    (before ray is imported; see the module docstring)."""
    configured = os.environ.get(TOKEN_VAR, "").strip() or os.environ.get(PATH_VAR, "")
    if configured and MODE_VAR not in os.environ:
        os.environ[MODE_VAR] = "token"


if __name__ == "__main__":
    raise SystemExit(main())
