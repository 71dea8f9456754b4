"""scripts/background.sh: a long job in its own session at the lowest priority, paused,
resumed, refused twice, and clear errors."""

import os
import signal
import subprocess
import time

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                      "background.sh")  # fmt: skip


def background(*args):
    return subprocess.run(["bash", SCRIPT, *map(str, args)], capture_output=True, text=True)


def autogroup_scheduling() -> bool:
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def autogroup_nice(pid="self"):
    """The nice value of a process's autogroup, or None where the kernel shows none."""
    try:
        with open(f"/proc/{pid}/autogroup") as f:
            fields = f.read().split()
    except OSError:
        return None
    return int(fields[-1]) if fields and fields[-1].lstrip("-").isdigit() else None


def state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]  # R, S, T, ...


def wait_for_state(pid: int, wanted: set, seconds: float = 5.0) -> str:
    deadline = time.time() + seconds
    while state(pid) not in wanted and time.time() < deadline:
        time.sleep(0.02)
    return state(pid)


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs Linux /proc")
def test_a_job_runs_in_its_own_low_priority_session_and_pauses(tmp_path):
    job = tmp_path / "job"
    caller_group = autogroup_nice()
    started = background("start", job, "sleep", "60")
    assert started.returncode == 0, started.stderr
    pid = int((job / "pid").read_text())
    try:
        assert os.getsid(pid) == pid  # a session (and process group) of its own
        assert os.getpriority(os.PRIO_PROCESS, pid) == 19
        autogroup = f"/proc/{pid}/autogroup"
        shown = autogroup_nice(pid)
        if autogroup_scheduling() and os.access(autogroup, os.W_OK) and shown is not None:
            assert shown == 19
        assert autogroup_nice() == caller_group  # the caller's group is left alone
        assert background("pause", job).returncode == 0
        assert wait_for_state(pid, {"T"}) == "T"
        assert background("resume", job).returncode == 0
        assert wait_for_state(pid, {"S", "R"}) in {"S", "R"}
        again = background("start", job, "sleep", "1")
        assert again.returncode == 1 and "already has a running job" in again.stderr
        assert int((job / "pid").read_text()) == pid
    finally:
        os.killpg(pid, signal.SIGKILL)
    deadline = time.time() + 5
    while background("status", job).returncode == 0 and time.time() < deadline:
        time.sleep(0.05)
    ended = background("status", job)
    assert ended.returncode == 1 and "no running job" in ended.stderr


def test_unknown_actions_and_missing_arguments_exit_2(tmp_path):
    for args in (["bogus", tmp_path], ["start"], ["start", tmp_path]):
        done = background(*args)
        assert done.returncode == 2 and "background.sh start DIR COMMAND" in done.stderr
