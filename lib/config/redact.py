"""Secrets never reach a run dir, a script, a log or a message.

- ``redact(tree)``: a copy of a config tree for ``run.yaml`` and summaries, with the
  values of secret-looking keys replaced by ``REDACTED`` and the password of every URL
  value (``postgres://u:***REDACTED***@h/db``) too.
- ``redact_url(text)``: the same for the URLs in any text (error messages, log lines).
- ``mask(text, values)``: ``redact_url`` plus every known secret value replaced.
- ``task_env(cluster)``: what a launcher hands its tasks: ``cluster.env`` literals,
  variables forwarded by name (``cluster.pass_env``), and the secrets a reloaded
  ``run.yaml`` no longer holds, read again from this process's environment.

Which key is secret-looking: the key is split into words (``_``, ``-``, ``.``, camelCase);
an environment variable name (upper case, as in ``cluster.env``) is secret when any word
is key, secret, token, pass, passwd, password, pwd, passphrase, credential(s), auth,
apikey, cookie or ends in one of them as a compound (``PGPASSWORD``, ``AUTHTOKEN``); a
config key (lower case) when a word is secret/password/credential/... or its *last* word
is token/pass/auth/apikey, or it ends in ``key`` qualified as a secret (``api_key``,
``access_key``; not ``role_key``, a column name). Whole words, not substrings: ``author``,
``passage``, ``monkey``, ``max_tokens_per_batch``, ``token_filter`` are not secrets, and a
name ending in file/path/dir/sock names where a secret is, not the secret.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lib.core.errors import ConfigError

REDACTED = "***REDACTED***"

# Anywhere in a name.
_STRONG = {
    "secret", "secrets", "password", "passwords", "passwd", "pwd", "passphrase",
    "credential", "credentials", "apikey", "privatekey", "accesskey", "secretkey",
}  # fmt: skip
# Anywhere in an environment variable name; only as the last word of a config key.
_WEAK = {"key", "token", "pass", "auth", "authorization", "cookie", "bearer"}
# A single word ending in one of these is a compound of a secret word (PGPASSWORD).
_SUFFIXES = ("password", "passwd", "secret", "token", "apikey", "credentials", "passphrase")
# A last word that names where a secret is, or a setting about it, not the secret.
_NOT_SECRET_LAST = {"file", "files", "path", "dir", "sock", "socket", "env", "mode", "type"}
# ``<word>_key`` config keys that name a column or a field, not a key.
_KEY_NOT_SECRET = {
    "role", "content", "think", "sort", "group", "id", "text", "join", "partition",
    "primary", "foreign", "cache", "hash", "dict", "map", "lookup", "column", "field",
}  # fmt: skip
_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")
_ENV_NAME = re.compile(r"^[A-Z0-9_]*[A-Z][A-Z0-9_]*$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# scheme://userinfo@ : greedy up to the last @ before the path, so a password with an @
# in it is covered whole.
_URL_USERINFO = re.compile(
    r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^\s/?#@'\"]*(?:@[^\s/?#@'\"]*)*)@"
)
_TOKEN_USER_SCHEMES = ("http://", "https://", "ws://", "wss://", "git+https://")


def _words(key: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(key)]


def is_secret_key(key: str) -> bool:
    """Whether a config key or environment variable name names a secret (see module doc)."""
    words = _words(str(key))
    if not words or words[-1] in _NOT_SECRET_LAST:
        return False
    if any(w in _STRONG or (w not in _WEAK and w.endswith(_SUFFIXES)) for w in words):
        return True
    if _ENV_NAME.match(str(key)):
        return any(w in _WEAK for w in words)
    last = words[-1]
    if last == "key":
        return len(words) > 1 and words[-2] not in _KEY_NOT_SECRET
    return last in _WEAK


def _redact_userinfo(m: re.Match[str]) -> str:
    scheme, userinfo = m.group("scheme"), m.group("userinfo")
    user, colon, _ = userinfo.partition(":")
    if colon:
        return f"{scheme}{user}:{REDACTED}@"
    # A lone user name is who, not a secret (sftp://me@host); over http(s) it is how a
    # token travels (https://ghp_xxx@github.com).
    if scheme.lower() in _TOKEN_USER_SCHEMES and userinfo:
        return f"{scheme}{REDACTED}@"
    return m.group(0)


def redact_url(text: str) -> str:
    """``text`` with the password (or an http token) of every URL in it replaced:
    ``postgres://u:pw@h/db`` -> ``postgres://u:***REDACTED***@h/db``. Any text: a value,
    an error message, a log line."""
    if "://" not in text:
        return text
    return _URL_USERINFO.sub(_redact_userinfo, text)


def mask(text: str, values: Iterable[str] = ()) -> str:
    """``redact_url(text)`` with every one of ``values`` (known secrets) replaced too."""
    for v in sorted({v for v in values if v and len(v) >= 4}, key=len, reverse=True):
        text = text.replace(v, REDACTED)
    return redact_url(text)


def _secret_value(key: Any, value: Any) -> bool:
    # A flag (use_auth: true) is not a secret; an empty value hides nothing.
    return (
        isinstance(key, str)
        and is_secret_key(key)
        and value not in (None, "")
        and not isinstance(value, bool | dict | list)
    )


def redact(obj: Any) -> Any:
    """A copy of a plain config tree with the values of secret-looking keys replaced by
    ``REDACTED`` and the userinfo of every URL string redacted (``redact_url``)."""
    if isinstance(obj, dict):
        return {k: REDACTED if _secret_value(k, v) else redact(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return redact_url(obj)
    return obj


def redacted_keys(obj: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, redacted value) of each value of a plain config tree ``redact`` changes."""
    out: list[tuple[str, str]] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            key = f"{prefix}{k}"
            if _secret_value(k, v):
                out.append((key, REDACTED))
            elif isinstance(v, str) and redact_url(v) != v:
                out.append((key, redact_url(v)))
            else:
                out += redacted_keys(v, key + ".")
    elif isinstance(obj, list):
        base = prefix.rstrip(".")
        for i, v in enumerate(obj):
            if isinstance(v, str) and redact_url(v) != v:
                out.append((f"{base}[{i}]", redact_url(v)))
            else:
                out += redacted_keys(v, f"{base}[{i}].")
    return out


def secret_overrides(overrides: Iterable[str]) -> list[str]:
    """The keys of Hydra command-line overrides (``+cluster.env.HF_TOKEN=...``) that carry
    a secret: a secret-looking last key, or a URL with a password in the value."""
    found = []
    for arg in overrides:
        key, eq, value = str(arg).partition("=")
        key = key.lstrip("+~")
        if eq and value and (is_secret_key(key.rsplit(".", 1)[-1]) or redact_url(value) != value):
            found.append(key)
    return found


def is_redacted(value: Any) -> bool:
    return isinstance(value, str) and REDACTED in value


def redacted_values(obj: Any, prefix: str = "") -> list[str]:
    """The dotted keys of a plain tree (a reloaded ``run.yaml``) whose value was redacted."""
    if isinstance(obj, dict):
        return [k for key, v in obj.items() for k in redacted_values(v, f"{prefix}{key}.")]
    if isinstance(obj, list):
        base = prefix.rstrip(".")
        return [k for i, v in enumerate(obj) for k in redacted_values(v, f"{base}[{i}].")]
    return [prefix.rstrip(".")] if is_redacted(obj) else []


def check_no_secret_outside_env(plain: Mapping[str, Any]) -> None:
    """Refuse a secret anywhere in a config but ``cluster.env``: ``run.yaml`` keeps it
    redacted, so the tasks, which read their config from it, would get ``REDACTED``.

    Raises ``ConfigError`` naming the keys and the fix.
    """
    found = [f"{k}={v}" for k, v in redacted_keys(plain) if not k.startswith("cluster.env.")]
    if found:
        raise ConfigError(
            f"{', '.join(found)}: a secret (a password in a URL, or a secret-looking key) in "
            "the config would be saved redacted in run.yaml, from which the tasks read their "
            "config; give it through the environment instead (fsspec and its file systems "
            "read credentials from environment variables and their own config files): "
            "export it, then forward it with cluster.pass_env=[NAME] or "
            "cluster.env_file=FILE"
        )


def restore_env_secrets(env: Any, environ: Mapping[str, str] | None = None) -> None:
    """In a config reloaded from ``run.yaml``: each redacted ``cluster.env`` value becomes
    the variable's value in ``environ`` (the task's environment, where the launcher put
    it) when set; ``task_env`` refuses the ones still redacted."""
    environ = os.environ if environ is None else environ
    for name in list(env or {}):
        if is_redacted(env[name]) and str(name) in environ:
            env[name] = environ[str(name)]


@dataclass
class TaskEnv:
    """The environment a launcher gives its tasks.

    ``plain``: ``cluster.env`` literals that are not secrets (may appear in a script);
    ``secret``: values that must reach the tasks only through a process environment;
    ``forwarded``: the names of the ``secret`` values taken from this process's
    environment (``cluster.pass_env``, and secrets of a reloaded ``run.yaml``), which a
    scheduler forwards from the submitting environment instead of a script;
    ``env_file``: a file the tasks ``source`` (``cluster.env_file``), expanded.
    """

    plain: dict[str, str] = field(default_factory=dict)
    secret: dict[str, str] = field(default_factory=dict)
    forwarded: list[str] = field(default_factory=list)
    env_file: str | None = None


def _fix(name: str) -> str:
    return (
        f"export {name}=... in the shell you launch from and add cluster.pass_env=[{name}] "
        f"(forwarded by name, never written), or put `export {name}=...` in a file only you "
        "can read and set cluster.env_file=FILE (the task scripts source it)"
    )


def looks_secret(name: str, value: str) -> bool:
    """Whether an environment variable (name and value) holds a secret."""
    return is_secret_key(name) or redact_url(value) != value


def refuse_secret_literals(
    cluster: Any, launcher: str, environ: Mapping[str, str] | None = None
) -> None:
    """For a launcher that writes task scripts: refuse a secret literal in ``cluster.env``
    at launch, before anything is written, with the fix. Raises ``ConfigError``."""
    environ = os.environ if environ is None else environ
    for key, value in (getattr(cluster, "env", None) or {}).items():
        name, text = str(key), str(value)
        if is_redacted(text) or environ.get(name) == text or not looks_secret(name, text):
            continue
        raise ConfigError(
            f"cluster.env.{name} looks like a secret, and cluster={launcher} would write it "
            f"into the job script in the run dir; remove it from cluster.env and {_fix(name)}"
        )


def task_env(
    cluster: Any,
    *,
    literal_secrets: bool,
    launcher: str,
    environ: Mapping[str, str] | None = None,
    check_environ: bool = True,
) -> TaskEnv:
    """Split ``cluster.env`` / ``cluster.pass_env`` / ``cluster.env_file`` into a ``TaskEnv``.

    ``literal_secrets``: whether a secret literal in ``cluster.env`` may be used (the local
    launcher passes it straight to its processes; a scheduler would have to write it into a
    script). Raises ``ConfigError``: a refused literal, a forwarded name not set in
    ``environ``, a redacted value of a reloaded ``run.yaml`` not set in ``environ``, an
    invalid name, a missing env file.
    """
    environ = os.environ if environ is None else environ
    if not literal_secrets:
        refuse_secret_literals(cluster, launcher, environ)
    out = TaskEnv()
    for key, value in (getattr(cluster, "env", None) or {}).items():
        name, text = str(key), str(value)
        if not _ENV_KEY.match(name):
            raise ConfigError(f"cluster.env: {name!r} is not a valid environment variable name")
        if environ.get(name) == text and looks_secret(name, text):
            # The variable of the same name in this environment (`${oc.env:NAME}`, or a
            # reloaded run.yaml's secret restored from it): forwarded by name.
            out.secret[name] = text
            out.forwarded.append(name)
        elif is_redacted(text):
            # A reloaded run.yaml (retry): the secret is read again from the environment,
            # as the first launch read it from its command line or environment.
            if name not in environ:
                if not check_environ:
                    out.forwarded.append(name)
                    continue
                raise ConfigError(
                    f"cluster.env.{name} is a secret, which run.yaml does not keep: export "
                    f"{name} in this shell and run the command again (or launch with "
                    f"cluster.pass_env=[{name}], which a retry reads the same way)"
                )
            out.secret[name] = environ[name]
            out.forwarded.append(name)
        elif looks_secret(name, text):  # only with literal_secrets (refused above)
            out.secret[name] = text
        else:
            out.plain[name] = text
    for key in getattr(cluster, "pass_env", None) or []:
        name = str(key)
        if not _ENV_KEY.match(name):
            raise ConfigError(
                f"cluster.pass_env: {name!r} is not a valid environment variable name"
            )
        if name not in environ:
            if not check_environ:
                out.forwarded.append(name)
                continue
            raise ConfigError(
                f"cluster.pass_env: {name} is not set in this environment; export {name} "
                "before launching (it is forwarded by name, never written)"
            )
        out.secret[name] = environ[name]
        if name not in out.forwarded:
            out.forwarded.append(name)
    env_file = getattr(cluster, "env_file", None)
    if env_file:
        path = os.path.abspath(os.path.expanduser(str(env_file)))
        if not os.path.isfile(path):
            raise ConfigError(f"cluster.env_file={env_file}: {path} is not a file")
        out.env_file = path
    return out


def env_file_values(path: str) -> dict[str, str]:
    """The variables ``source``-ing ``path`` in bash sets or changes (for launchers that
    start tasks without a shell). Raises ``ConfigError`` when bash fails on it."""
    import subprocess

    proc = subprocess.run(
        ["bash", "-c", 'set -a; . "$1" >&2 || exit 1; exec env -0', "env_file", path],
        capture_output=True,
        env=dict(os.environ),
        timeout=60,
    )
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        raise ConfigError(f"cluster.env_file={path}: sourcing it failed: {mask(err)}")
    out = {}
    for item in proc.stdout.split(b"\0"):
        name, eq, value = item.decode(errors="replace").partition("=")
        if eq and _ENV_KEY.match(name) and os.environ.get(name) != value and name != "_":
            out[name] = value
    out.pop("SHLVL", None)
    out.pop("PWD", None)
    out.pop("OLDPWD", None)
    return out


def config_secret_values(obj: Any) -> list[str]:
    """The values of a plain config tree that ``redact`` hides (to mask them in text)."""
    out: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if _secret_value(k, v):
                out.append(str(v))
            else:
                out += config_secret_values(v)
    elif isinstance(obj, list):
        for v in obj:
            out += config_secret_values(v)
    return [v for v in out if not is_redacted(v)]


def environ_secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of the secret-looking variables of ``environ`` (masked in log lines)."""
    environ = os.environ if environ is None else environ
    return [v for k, v in environ.items() if is_secret_key(k) and v and not is_redacted(v)]
