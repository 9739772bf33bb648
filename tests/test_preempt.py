"""Stop signals, time-out vs preemption, and the restart limit (lib/preempt.py).

The requeue itself runs against the real test cluster in test_slurm_launcher.py; here the
decisions around it, in this process.
"""

from __future__ import annotations

import os
import signal

import pytest

from lib import preempt


@pytest.fixture(autouse=True)
def _restore_handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM)}
    preempt.reset()
    yield
    preempt.reset()
    for s, h in saved.items():
        signal.signal(s, h)


def test_signal_sets_a_flag_and_check_raises_at_the_safe_point():
    preempt.install("USR2")
    preempt.check()  # nothing yet
    os.kill(os.getpid(), signal.SIGUSR2)
    assert preempt.requested() == "SIGUSR2"
    with pytest.raises(preempt.StopRequested, match="SIGUSR2"):
        preempt.check()
    os.kill(os.getpid(), signal.SIGTERM)  # a second signal does not overwrite the first
    assert preempt.requested() == "SIGUSR2"


def test_time_out_and_preemption_are_told_apart_by_time_left():
    near = preempt.SlurmJob("7_1", 0, time_left_s=100)
    far = preempt.SlurmJob("7_1", 0, time_left_s=3600)
    assert preempt.classify(near, "SIGUSR2", signal_delay_s=120) == "timeout"
    assert preempt.classify(far, "SIGUSR2", signal_delay_s=120) == "preemption"
    assert preempt.classify(None, "SIGTERM", 120) == "preemption"
    assert preempt.classify(None, "SIGUSR2", 120) == "timeout"


@pytest.mark.parametrize(
    "text,seconds",
    [("1-02:03:04", 93784), ("02:03:04", 7384), ("03:04", 184), ("UNLIMITED", None)],
)
def test_slurm_durations(text, seconds):
    assert preempt._seconds(text) == seconds


def test_restart_limit_fails_with_the_setting_to_change(monkeypatch):
    preempt.install("USR2")
    os.kill(os.getpid(), signal.SIGUSR2)
    # A job id no scheduler knows: squeue answers nothing, so no time-left is known.
    monkeypatch.setenv("SLURM_JOB_ID", "999999991")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "999999991")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "4")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    with pytest.raises(preempt.RestartLimitError) as err:
        preempt.requeue_self(max_restarts=3, signal_delay_s=120)
    msg = str(err.value)
    assert "job 999999991_4" in msg and "after 3 restart(s)" in msg
    assert "cluster.slurm.max_restarts=3" in msg and "cluster.slurm.resources" in msg


def test_outside_slurm_a_stop_asks_for_a_relaunch(monkeypatch):
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(var, raising=False)
    preempt.install("USR2")
    os.kill(os.getpid(), signal.SIGTERM)
    assert "relaunch to continue" in preempt.requeue_self(3, 120)
