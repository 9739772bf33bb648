"""Pure rendering of sbatch scripts from Jinja2 templates (``slurm_templates/``).

One function per template; its keyword signature is the schema. Every value that lands in
the script is shell-quoted (``shlex.quote``; sbatch honours the same quoting in
``#SBATCH`` lines, which it parses without a shell); ``#SBATCH`` lines are sorted; the
script starts with a ``# Run with: sbatch ...`` line. Values that cannot be expressed in
an ``#SBATCH`` line (newlines, control characters) are refused with the key named.
``setup`` lines are shell code the user wrote on purpose (module load, conda activate)
and are rendered as given.

No secret is ever rendered: an ``env`` value that looks like one is refused; secrets reach
the job by name (``forward``: ``--export`` of sbatch's environment, checked at the job's
start) or from a file the user names (``env_file``, sourced).
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import jinja2

from lib.config.redact import looks_secret
from lib.config.schema import SlurmResources
from lib.core.errors import ConfigError
from lib.core.repo import REPO_ROOT

TEMPLATES = REPO_ROOT / "slurm_templates"
RESOURCE_KEYS = tuple(
    f.name
    for f in dataclasses.fields(SlurmResources)
    if f.name not in ("additional_parameters", "setup")
)
_FLAG = re.compile(r"^[a-z][a-z0-9-]*$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def quote(value: Any) -> str:
    """Shell-quote ``value`` on one line: ``shlex.quote``, or bash's ``$'...'`` when the
    value holds newlines or other control characters (a quoted newline inside a comment
    line would end the comment and turn the rest into code)."""
    text = str(value)
    if not any(ord(c) < 32 or ord(c) == 127 for c in text):
        return shlex.quote(text)
    out = []
    for c in text:
        if c in "\\'":
            out.append("\\" + c)
        elif ord(c) < 32 or ord(c) == 127:
            out.append(f"\\x{ord(c):02x}")
        else:
            out.append(c)
    return "$'" + "".join(out) + "'"


@cache
def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["q"] = quote
    env.filters["qjoin"] = lambda v: " ".join(quote(x) for x in v)
    return env


def _directive_value(key: str, value: Any) -> str:
    text = str(value)
    if any(ord(c) < 32 for c in text):
        raise ConfigError(
            f"slurm resource {key}={text!r} contains a newline or control character, which "
            "an #SBATCH line cannot hold; remove it"
        )
    return shlex.quote(text)


def sbatch_lines(resources: Mapping[str, Any], fixed: Mapping[str, Any]) -> list[str]:
    """``--flag=value`` lines (sorted) from resources + fixed flags.

    Raises ``ConfigError`` for an unknown resource key (listing the valid ones) or an
    invalid ``additional_parameters`` flag name.
    """
    flags: dict[str, str | None] = {}
    for key, value in resources.items():
        if key in ("additional_parameters", "setup"):
            continue
        if key not in RESOURCE_KEYS:
            raise ConfigError(
                f"unknown slurm resource {key!r}; valid: {', '.join(RESOURCE_KEYS)}, "
                "additional_parameters, setup"
            )
        if value is not None:
            flags[key.replace("_", "-")] = _directive_value(key, value)
    for key, value in (resources.get("additional_parameters") or {}).items():
        flag = str(key).replace("_", "-").removeprefix("--")
        if not _FLAG.match(flag):
            raise ConfigError(f"additional_parameters: {key!r} is not an sbatch flag name")
        # A flag without a value (--exclusive, --hold) is written `exclusive: true`.
        bare = value is None or value is True or str(value).lower() in ("", "true")
        flags[flag] = None if bare else _directive_value(flag, value)
    for key, value in fixed.items():
        flags[key] = None if value is True else _directive_value(key, value)
    return sorted(f"--{k}" if v is None else f"--{k}={v}" for k, v in flags.items())


def _env_items(env: Mapping[str, str]) -> list[tuple[str, str]]:
    for key, value in env.items():
        if not _ENV_KEY.match(str(key)):
            raise ConfigError(f"cluster.env: {key!r} is not a valid environment variable name")
        if looks_secret(str(key), str(value)):
            raise ConfigError(
                f"cluster.env.{key} looks like a secret and is not rendered into a script: "
                f"forward it by name (cluster.pass_env=[{key}]) or set it in cluster.env_file"
            )
    return sorted((str(k), str(v)) for k, v in env.items())


def _forward_checks(names: Iterable[str]) -> list[str]:
    """Lines that stop the job at once, naming the fix, when a forwarded variable did not
    arrive (set -u would only fail later, at its first use, with a less useful message)."""
    lines = []
    for name in sorted(set(names)):
        if not _ENV_KEY.match(name):
            raise ConfigError(
                f"cluster.pass_env: {name!r} is not a valid environment variable name"
            )
        lines.append(
            f': "${{{name}:?is not set: cluster.pass_env forwards it from the environment of '
            f'sbatch, so export {name} before submitting}}"'
        )
    return lines


def _signal_name(signal: str) -> str:
    name = str(signal).removeprefix("SIG")
    if not re.fullmatch(r"[A-Z0-9]+", name):
        raise ConfigError(f"cluster.slurm.signal={signal!r} is not a signal name (e.g. USR2)")
    return name


def job_name(*parts: str) -> str:
    """A job name sbatch can hold: control characters become spaces (it is a label)."""
    return "".join(" " if ord(c) < 32 or ord(c) == 127 else c for c in "-".join(parts))


def _render(
    template: str,
    *,
    fixed: dict[str, Any],
    flag_resources: Mapping[str, Any],
    resources: Mapping[str, Any],
    requeue: bool,
    env: Mapping[str, str] | None,
    forward: Iterable[str],
    env_file: str | Path | None,
    command: Iterable[str],
    **values: Any,
) -> str:
    """Render ``template`` with the sorted ``#SBATCH`` lines (``flag_resources`` +
    ``fixed``), the setup lines, the quoted environment and the command."""
    if requeue:
        fixed = {**fixed, "requeue": True}
    forward = sorted(set(forward))
    if forward:
        # ALL: a site's SBATCH_EXPORT=NONE would otherwise drop what we forward.
        fixed = {**fixed, "export": ",".join(["ALL", *forward])}
    return (
        _env()
        .get_template(template)
        .render(
            **values,
            command=list(command),
            sbatch_lines=sbatch_lines(flag_resources, fixed),
            setup=list(resources.get("setup") or []),
            env=_env_items(env or {}),
            forward_checks=_forward_checks(forward),
            env_file=str(env_file) if env_file else None,
        )
    )


def render_array_script(
    *,
    script_path: str | Path,
    run_dir: str | Path,
    stage: str,
    job_name: str,
    command: Iterable[str],
    array: str,
    task_offset: int,
    first_task: int,
    last_task: int,
    num_tasks: int,
    log_dir: str | Path,
    log_file_format: str,
    workdir: str | Path,
    resources: Mapping[str, Any],
    signal: str = "USR2",
    signal_delay_s: int = 120,
    requeue: bool = True,
    env: Mapping[str, str] | None = None,
    forward: Iterable[str] = (),
    env_file: str | Path | None = None,
) -> str:
    """The sbatch script of one job array chunk of a sharded stage. ``log_file_format`` is
    a printf format of a task's log file name in ``log_dir`` (the task index fills it)."""
    fixed: dict[str, Any] = {
        "array": array,
        "job-name": job_name,
        "open-mode": "append",
        # Relative: sbatch runs in the log dir, so no path has to fit in an #SBATCH line.
        "output": "slurm-%A_%a.out",
        # B: the batch shell, which exec's the task: it gets the signal itself.
        "signal": f"B:{signal}@{int(signal_delay_s)}",
    }
    return _render(
        "array.sbatch.j2",
        fixed=fixed,
        flag_resources=resources,
        resources=resources,
        requeue=requeue,
        env=env,
        forward=forward,
        env_file=env_file,
        command=command,
        script_path=str(script_path),
        run_dir=str(run_dir),
        stage=stage,
        array=array,
        task_offset=int(task_offset),
        first_task=first_task,
        last_task=last_task,
        num_tasks=int(num_tasks),
        log_dir=str(log_dir),
        log_file_format=log_file_format,
        workdir=str(workdir),
        signal=_signal_name(signal),
    )


def render_distributed_script(
    *,
    script_path: str | Path,
    run_dir: str | Path,
    stage: str,
    job_name: str,
    command: Iterable[str],
    nodes: int,
    ntasks_per_node: int,
    log_dir: str | Path,
    rank_log: str | Path,
    workdir: str | Path,
    resources: Mapping[str, Any],
    signal: str = "USR2",
    signal_delay_s: int = 120,
    requeue: bool = True,
    env: Mapping[str, str] | None = None,
    forward: Iterable[str] = (),
    env_file: str | Path | None = None,
) -> str:
    """The sbatch script of a multi-node torch.distributed stage (srun, one rank per task).
    ``rank_log``: srun's ``--output`` pattern of the per-rank logs (``%t`` = rank)."""
    res = {k: v for k, v in resources.items() if k not in ("nodes", "ntasks_per_node")}
    fixed: dict[str, Any] = {
        "job-name": job_name,
        "nodes": int(nodes),
        "ntasks-per-node": int(ntasks_per_node),
        "open-mode": "append",
        "output": "slurm-%j.out",
        # No B:, so every rank of the srun step gets the signal.
        "signal": f"{signal}@{int(signal_delay_s)}",
    }
    return _render(
        "distributed.sbatch.j2",
        fixed=fixed,
        flag_resources=res,
        resources=resources,
        requeue=requeue,
        env=env,
        forward=forward,
        env_file=env_file,
        command=command,
        script_path=str(script_path),
        run_dir=str(run_dir),
        stage=stage,
        world_size=int(nodes) * int(ntasks_per_node),
        log_dir=str(log_dir),
        rank_log=str(rank_log),
        workdir=str(workdir),
    )
