"""cluster/auth.py: where atoll finds Ray's token (Ray's own order) and its one-line errors.

Real files and environment variables; a cluster with token authentication is exercised in
tests/integration/test_deploy_ray.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from atoll.cluster import auth


@pytest.fixture(autouse=True)
def _no_token(monkeypatch, tmp_path):
    """No RAY_AUTH_* from the caller, and a HOME without ~/.ray/auth_token."""
    for var in (auth.TOKEN_VAR, auth.PATH_VAR, auth.MODE_VAR):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def _file(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_no_token_configured_sends_nothing(tmp_path):
    _file(tmp_path / "home" / ".ray" / "auth_token", "t-home")  # read only in token mode
    assert auth.token() is None
    assert auth.headers() == ({}, None)


def test_the_file_gives_its_first_line_trimmed(tmp_path, monkeypatch):
    monkeypatch.setenv(auth.PATH_VAR, str(_file(tmp_path / "tok", "  t-file \nsecond\n")))
    found = auth.token()
    assert found.value == "t-file" and found.source == f"{auth.PATH_VAR} ({tmp_path / 'tok'})"
    assert auth.headers()[0] == {"Authorization": "Bearer t-file"}
    assert "t-file" not in repr(found)  # a stray log of the object shows no secret


def test_ray_order_the_variable_wins_then_the_file_then_home_in_token_mode(tmp_path,
                                                                           monkeypatch):
    _file(tmp_path / "home" / ".ray" / "auth_token", "t-home\n")
    monkeypatch.setenv(auth.MODE_VAR, "token")
    assert auth.token().value == "t-home"
    monkeypatch.setenv(auth.PATH_VAR, str(_file(tmp_path / "tok", "t-file")))
    assert auth.token().value == "t-file"
    monkeypatch.setenv(auth.TOKEN_VAR, " t-env ")
    assert auth.token().value == "t-env" and auth.token().source == auth.TOKEN_VAR
    monkeypatch.setenv(auth.TOKEN_VAR, "  ")  # empty: ignored, as Ray does
    assert auth.token().value == "t-file"


@pytest.mark.parametrize(("content", "why"), [(None, "does not exist"), ("\n  \n", "is empty"),
                                              ("dir", "cannot be read")])
def test_a_token_file_without_a_token_is_one_line_naming_the_variable(tmp_path, monkeypatch,
                                                                      content, why):
    path = tmp_path / "tok"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        _file(path, content)
    _file(tmp_path / "home" / ".ray" / "auth_token", "t-home")  # no fallback, as in Ray
    monkeypatch.setenv(auth.MODE_VAR, "token")
    monkeypatch.setenv(auth.PATH_VAR, str(path))
    with pytest.raises(auth.RayAuthError) as e:
        auth.token()
    line = str(e.value)
    assert "\n" not in line and why in line, line
    assert line.startswith(f"{auth.PATH_VAR} ({path}): the token file")
    assert f"set {auth.PATH_VAR} to a file holding it" in line


def test_token_mode_without_any_token_says_where_to_put_one(monkeypatch):
    monkeypatch.setenv(auth.MODE_VAR, "TOKEN")  # case-insensitive, as Ray reads it
    with pytest.raises(auth.RayAuthError, match=f"RAY_AUTH_MODE=token is set but there is no "
                                                f"token: set {auth.PATH_VAR}"):
        auth.token()


def test_refusals_name_the_source_never_the_value(tmp_path, monkeypatch):
    monkeypatch.setenv(auth.PATH_VAR, str(_file(tmp_path / "tok", "t-secret")))
    found = auth.token()
    wrong = str(auth.refused("the Ray Job API at http://h:1", found, sent=True))
    assert wrong.startswith("the Ray Job API at http://h:1 refused the token in "
                            f"{auth.PATH_VAR} ({tmp_path / 'tok'})")
    unsent = str(auth.refused("the Ray cluster at h:2", found, sent=False))
    assert "set RAY_AUTH_MODE=token before atoll starts" in unsent
    missing = str(auth.refused("the Ray Job API at http://h:1", None, sent=False))
    assert missing == ("the Ray Job API at http://h:1 requires a token (Ray token "
                       "authentication is on); set RAY_AUTH_TOKEN_PATH to a file holding it "
                       "(or RAY_AUTH_TOKEN)")
    assert all("t-secret" not in m for m in (wrong, unsent, missing))


def test_token_files_inside_the_working_dir_are_excluded_from_the_upload(tmp_path,
                                                                        monkeypatch):
    from ray._private.runtime_env.packaging import _get_excludes  # what Ray matches with

    work = tmp_path / "repo"
    secret = _file(work / "se[c]rets" / "ray*token", "t")
    _file(work / "ray*token", "not the token file")
    monkeypatch.setenv(auth.PATH_VAR, str(secret))
    excluded = _get_excludes(work, auth.excludes_for(work))
    assert excluded(secret) and not excluded(work / "ray*token")
    monkeypatch.setenv(auth.PATH_VAR, str(tmp_path / "elsewhere"))  # outside: nothing to do
    assert auth.excludes_for(work) == []
    home_token = _file(tmp_path / "home" / ".ray" / "auth_token", "t")
    assert _get_excludes(tmp_path, auth.excludes_for(tmp_path))(home_token)


def test_a_configured_token_turns_on_token_mode_unless_a_mode_is_set(tmp_path, monkeypatch):
    auth.token_mode_for_ray()
    assert auth.MODE_VAR not in os.environ  # nothing configured: Ray's default stays
    monkeypatch.setenv(auth.PATH_VAR, str(tmp_path / "tok"))
    auth.token_mode_for_ray()
    assert os.environ[auth.MODE_VAR] == "token"
    monkeypatch.setenv(auth.MODE_VAR, "disabled")  # the user's explicit choice stands
    auth.token_mode_for_ray()
    assert os.environ[auth.MODE_VAR] == "disabled"
