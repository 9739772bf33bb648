"""``status``, ``wait`` and ``logs``: markers decide done, the launcher's view the rest."""

from __future__ import annotations

import pytest

from cli.commands import run_subcommand
from cli.run import save_run_config
from cli.status import collect_status, render_status
from launchers.base import FAILED, RUNNING
from lib.config.compose import compose
from lib.core.markers import CompletionMarker, write_marker
from lib.core.paths import RunPaths
from lib.plan.spec import ARRAY, SINGLE, Plan, StageSpec

EMBED = StageSpec("embed", "embed", "jobs.embed", "embed", ARRAY, 4, "h")
MERGE = StageSpec("merge", "merge", "jobs.merge", "merge", SINGLE, 1, "m", depends_on=("embed",))


def _done(paths: RunPaths, spec: StageSpec, task: int, output: bytes = b"x") -> None:
    out = paths.storage.publish_bytes(f"{spec.stage_dir}/shards/{task}.bin", output)
    marker = CompletionMarker(spec.name, task, spec.num_tasks, spec.config_hash, outputs=[out])
    write_marker(paths.storage, paths.marker(spec.stage_dir, task), marker)


def _run(tmp_path) -> RunPaths:
    paths = RunPaths(tmp_path / "run")
    cfg = compose(["+experiment=quickstart", f"run.root={tmp_path}", "run.name=run"])
    save_run_config(paths, cfg)
    Plan([EMBED, MERGE], 100).save(paths)
    return paths


def test_markers_decide_done_and_the_view_tells_the_rest(tmp_path):
    paths = _run(tmp_path)
    _done(paths, EMBED, 0)
    _done(paths, EMBED, 1)
    paths.storage.remove("embed/shards/1.bin")  # its output is gone: not done any more
    view = {("embed", 1): (RUNNING, "job 17_1"), ("embed", 2): (FAILED, "FAILED exit 1:0")}
    statuses = collect_status(paths, Plan.load(paths), view)
    embed, merge = statuses
    assert embed.tasks == {0: "done", 1: "running", 2: "failed", 3: "pending"}
    assert merge.tasks == {0: "pending"} and not embed.complete
    text = render_status(paths, statuses)
    assert "embed                   4      1        1       1        1" in text
    assert "failed embed tasks 2:" in text
    assert f"task 2: FAILED exit 1:0; log {paths.root}/embed/logs/task_00002.log" in text
    assert "all stages complete" not in text


def test_status_wait_and_logs_commands(tmp_path, capsys):
    paths = _run(tmp_path)
    for t in range(4):
        _done(paths, EMBED, t)
    # merge failed under the local launcher: its attempt record says so
    paths.storage.publish_json(
        paths.attempt("merge", 0), {"host": "elsewhere", "pids": [1], "ended": 1.0, "returncode": 2}
    )
    log = paths.storage.local_file(paths.log("merge", 0))
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("line 1\nline 2\nmerge refused, nothing written\n")
    assert run_subcommand(["status", paths.root]) == 1  # a failed task: scripts see it
    out = capsys.readouterr().out
    assert "merge                   1      0        0       1        0" in out
    assert "task 0: exit code 2" in out
    assert run_subcommand(["wait", paths.root, "--interval", "0.1"]) == 1  # failed, nothing runs
    capsys.readouterr()
    assert run_subcommand(["logs", paths.root, "merge", "0", "--tail", "1"]) == 0
    assert capsys.readouterr().out == "merge refused, nothing written\n"
    _done(paths, MERGE, 0)
    assert run_subcommand(["wait", paths.root]) == 0
    assert "all stages complete" in capsys.readouterr().out


def test_a_dir_that_is_no_run_says_so(tmp_path, capsys):
    assert run_subcommand(["status", str(tmp_path)]) == 1
    assert "is not a run dir (no run.yaml)" in capsys.readouterr().err


def test_status_exit_codes_say_done_failed_or_unfinished(tmp_path, capsys):
    paths = _run(tmp_path)
    _done(paths, EMBED, 0)
    assert run_subcommand(["status", paths.root]) == 3  # pending tasks, none failed
    for t in range(1, 4):
        _done(paths, EMBED, t)
    _done(paths, MERGE, 0)
    assert run_subcommand(["status", paths.root]) == 0
    assert "all stages complete" in capsys.readouterr().out


def test_logs_refuses_tasks_ranks_and_tails_that_do_not_exist(tmp_path, capsys):
    paths = _run(tmp_path)
    assert run_subcommand(["logs", paths.root, "embed", "7"]) == 1
    assert "embed has 4 task(s), numbered 0 to 3: there is no task 7" in capsys.readouterr().err
    assert run_subcommand(["logs", paths.root, "embed", "-1"]) == 1
    assert "there is no task -1" in capsys.readouterr().err
    assert run_subcommand(["logs", paths.root, "merge", "0", "--rank", "1"]) == 1
    assert "merge runs 1 rank(s) per task" in capsys.readouterr().err
    assert run_subcommand(["logs", paths.root, "nope", "0"]) == 1
    assert "no stage 'nope' in this run's plan; stages: embed, merge" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        run_subcommand(["logs", paths.root, "embed", "0", "--tail", "-5"])
    assert exit_.value.code == 2
    assert "argument --tail: must be >= 0, got -5" in capsys.readouterr().err


def test_subcommand_help_says_what_it_does_and_its_exit_codes(capsys):
    with pytest.raises(SystemExit) as exit_:
        run_subcommand(["status", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "done (a valid completion marker), running, failed and pending" in text
    assert "3 tasks still running or pending, none failed" in text
    with pytest.raises(SystemExit):
        run_subcommand(["logs", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "task index, 0 to the stage's task count - 1" in text
    assert "only the last N lines" in text
