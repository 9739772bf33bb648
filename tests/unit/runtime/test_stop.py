"""Stop signals (lib/runtime/stop.py), time-out vs preemption and the restart limit of
the SLURM task environment (lib/runtime/slurm.py).

The requeue itself runs against the real test cluster in tests/slurm/test_launcher.py;
here the decisions around it, in this process.
"""

from __future__ import annotations

import os
import signal

import pytest

from lib.runtime import stop
from lib.runtime.environment import LocalEnvironment
from lib.runtime.slurm import (
    RestartLimitError,
    SlurmEnvironment,
    SlurmJob,
    classify,
    parse_duration,
)


@pytest.fixture(autouse=True)
def _restore_handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM)}
    stop.reset()
    yield
    stop.reset()
    for s, h in saved.items():
        signal.signal(s, h)


def test_signal_sets_a_flag_and_check_raises_at_the_safe_point():
    stop.install("USR2")
    stop.check()  # nothing yet
    os.kill(os.getpid(), signal.SIGUSR2)
    assert stop.requested() == "SIGUSR2"
    with pytest.raises(stop.StopRequested, match="SIGUSR2"):
        stop.check()
    os.kill(os.getpid(), signal.SIGTERM)  # a second signal does not overwrite the first
    assert stop.requested() == "SIGUSR2"


def test_time_out_and_preemption_are_told_apart_by_time_left():
    near = SlurmJob("7_1", 0, time_left_s=100)
    far = SlurmJob("7_1", 0, time_left_s=3600)
    assert classify(near, "SIGUSR2", signal_delay_s=120) == "timeout"
    assert classify(far, "SIGUSR2", signal_delay_s=120) == "preemption"
    assert classify(None, "SIGTERM", 120) == "preemption"
    assert classify(None, "SIGUSR2", 120) == "timeout"


@pytest.mark.parametrize(
    "text,seconds",
    [("1-02:03:04", 93784), ("02:03:04", 7384), ("03:04", 184), ("UNLIMITED", None)],
)
def test_slurm_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_restart_limit_fails_with_the_setting_to_change(monkeypatch):
    stop.install("USR2")
    os.kill(os.getpid(), signal.SIGUSR2)
    # A job id no scheduler knows: squeue answers nothing, so no time-left is known.
    monkeypatch.setenv("SLURM_JOB_ID", "999999991")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "999999991")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "4")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    env = SlurmEnvironment()  # max_restarts=3, signal_delay_s=120 unless configured
    with pytest.raises(RestartLimitError) as err:
        env.after_stop()
    msg = str(err.value)
    assert "job 999999991_4" in msg and "after 3 restart(s)" in msg
    assert "cluster.slurm.max_restarts=3" in msg and "cluster.slurm.resources" in msg


def test_outside_slurm_a_stop_asks_for_a_relaunch(monkeypatch):
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(var, raising=False)
    stop.install("USR2")
    os.kill(os.getpid(), signal.SIGTERM)
    assert "relaunch to continue" in LocalEnvironment().after_stop()
    assert "relaunch to continue" in SlurmEnvironment().after_stop()  # no SLURM job here
