"""Logins resolved from the config: exactly one method, secrets never in text."""

from __future__ import annotations

import json

import pytest

from lib.remote.credentials import resolve_login
from lib.remote.errors import CredentialsError


def test_exactly_one_method():
    with pytest.raises(CredentialsError, match="exactly one way to log in.*got none"):
        resolve_login("sync source a", "me")
    with pytest.raises(CredentialsError, match="got key_file, password_env"):
        resolve_login("sync source a", "me", key_file="/k", password_env="X")


def test_unset_password_variable_says_to_export_it():
    with pytest.raises(CredentialsError, match="export SYNC_PW="):
        resolve_login("sync source a", "me", password_env="SYNC_PW", environ={})


def test_credentials_file_errors_never_quote_its_content(tmp_path):
    bad = tmp_path / "c"
    bad.write_text('{"password": "leaky-77", ')
    bad.chmod(0o600)
    with pytest.raises(CredentialsError) as err:
        resolve_login("sync source a", None, credentials_file=str(bad))
    assert "not a readable JSON object" in str(err.value) and "leaky-77" not in str(err.value)
    bad.write_text(json.dumps({"password": "leaky-77"}))
    with pytest.raises(CredentialsError, match="no username"):
        resolve_login("sync source a", None, credentials_file=str(bad))


def test_password_is_not_in_repr(tmp_path):
    login = resolve_login("s", "me", password_env="PW", environ={"PW": "hidden-123"})
    assert login.password == "hidden-123" and "hidden-123" not in repr(login)
    assert login.method == "password from $PW" and login.secrets() == ["hidden-123"]
