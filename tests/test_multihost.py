"""Two real processes joined by `jax.distributed` on the loopback address, as SLURM starts them.

Each process runs scripts/attack.py with `--config.distributed=True` in a
SLURM-style environment (`jax.distributed.initialize()` finds the job from it)
and a coordinator at 127.0.0.1 on a free port. The setup is test_run.py's tiny
conv net and folder dataset, one CPU device per process.
"""

import json
import signal
import socket
import subprocess
import time

import pytest
from test_run import (
    assert_same_records,
    attack_command,
    by_item,
    run_script,
    script_env,
    tiny_flags,
    write_tiny_setup,
)

from opa_jax import results

PROCESSES = 2
NUM_IMAGES = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_env(cache, process_id: int, port: int) -> dict:
    """What `srun --ntasks=2` on one node gives task `process_id`, with the coordinator
    (and its listening socket) on the loopback address."""
    return {
        **script_env(cache),
        "SLURM_JOB_ID": "1",
        "SLURM_NTASKS": str(PROCESSES),
        "SLURM_PROCID": str(process_id),
        "SLURM_LOCALID": str(process_id),
        "SLURM_STEP_NODELIST": "localhost",
        "SLURM_STEP_TASKS_PER_NODE": str(PROCESSES),
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "JAX_COORDINATOR_BIND_ADDRESS": f"127.0.0.1:{port}",
    }


def launch(tiny, workdir, logs, extra_flags=((), ())) -> list[subprocess.Popen]:
    """Starts both processes of a job; their output goes to `logs`/hostN.log."""
    port = free_port()
    logs.mkdir(parents=True, exist_ok=True)
    processes = []
    for i in range(PROCESSES):
        flags = [*tiny["flags"], "--config.distributed=True", *extra_flags[i]]
        with open(logs / f"host{i}.log", "w") as log:
            processes.append(subprocess.Popen(
                attack_command(flags, workdir), env=slurm_env(tiny["cache"], i, port),
                stdout=log, stderr=subprocess.STDOUT,
            ))  # fmt: skip
    return processes


def wait(processes, logs, timeout=300) -> list[str]:
    """Waits for both processes; returns their output."""
    deadline = time.time() + timeout
    for process in processes:
        try:
            process.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            raise
    return [(logs / f"host{i}.log").read_text() for i in range(PROCESSES)]


def host_records(workdir) -> list[list[dict]]:
    names = sorted(p.name for p in workdir.glob("results*.jsonl"))
    assert names == [f"results.host{i:03d}.jsonl" for i in range(PROCESSES)]
    return [results.read(str(workdir / name)) for name in names]


def assert_every_item_once(workdir, want: list[dict]):
    """Every item of the single-host run is in exactly one host file, with the same
    outcome, and summary.json counts them all."""
    shares = host_records(workdir)
    keys = [set(by_item(share)) for share in shares]
    assert [len(k) for k in keys] == [len(share) for share in shares]  # none twice in a file
    assert not keys[0] & keys[1]  # none in both files
    assert all(keys)  # each host attacked its share
    merged = [r for share in shares for r in share]
    assert_same_records(merged, want)
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["attacks"] == len(want) and summary["processes"] == PROCESSES
    assert summary["successes"] == sum(r["success"] for r in want)
    assert not list(workdir.glob("*.tmp*"))  # every atomic write was renamed into place


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_multihost")
    setup = write_tiny_setup(root, num_images=NUM_IMAGES)
    setup["cache"] = root / "jax_cache"
    setup["flags"] = tiny_flags(
        setup, targeted=True, targets="0,1,2,3", flush_seconds=1, num_images=NUM_IMAGES,
        cpu_devices=1,
    )  # fmt: skip
    return setup


@pytest.fixture(scope="module")
def reference(tiny):
    """The single-host run's records (it also fills the compilation cache)."""
    workdir = tiny["root"] / "single_host"
    done = run_script(attack_command(tiny["flags"], workdir), script_env(tiny["cache"]))
    assert done.returncode == 0, done.stderr[-3000:]
    records = results.read(str(workdir / "results.jsonl"))
    assert len(records) > 2 * PROCESSES and 0 < sum(r["success"] for r in records) < len(records)
    return records


@pytest.mark.slow
def test_two_processes_share_the_items_and_process_0_writes_the_shared_files(
    tiny, reference, tmp_path
):
    workdir = tmp_path / "run"
    logs = wait(launch(tiny, workdir, tmp_path / "logs"), tmp_path / "logs")
    for log in logs:  # each host prints the summary of both hosts' records
        assert f"over {len(reference)} attacks" in log, log[-3000:]
    assert_every_item_once(workdir, reference)
    info = json.loads((workdir / "run_info.json").read_text())
    assert info["process_count"] == PROCESSES and len(info["devices"]) == PROCESSES
    assert [p["process_index"] for p in info["processes"]] == list(range(PROCESSES))
    assert [len(p["local_devices"]) for p in info["processes"]] == [1] * PROCESSES
    assert len({p["pid"] for p in info["processes"]}) == PROCESSES
    assert all(p["jax"] == info["jax"] for p in info["processes"])


@pytest.mark.slow
def test_both_processes_killed_mid_run_resume_every_share(tiny, reference, tmp_path):
    workdir = tmp_path / "preempted"
    processes = launch(tiny, workdir, tmp_path / "killed")
    lines, deadline = 0, time.time() + 240
    while time.time() < deadline and all(p.poll() is None for p in processes):
        files = list(workdir.glob("results.host*.jsonl"))
        lines = sum(f.read_bytes().count(b"\n") for f in files)
        if 0 < lines < len(reference):
            for process in processes:  # a preempted job: no chance to clean up
                process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    for process in processes:
        process.wait(timeout=60)
    assert [p.returncode for p in processes] == [-signal.SIGKILL] * PROCESSES, (
        "the run finished before it could be killed"
    )
    killed_at = [len(share) for share in host_records(workdir)]
    assert 0 < sum(killed_at) < len(reference)
    assert not (workdir / "summary.json").exists()

    logs = wait(launch(tiny, workdir, tmp_path / "resumed"), tmp_path / "resumed")
    for i, log in enumerate(logs):
        assert f"({killed_at[i]} already done)" in log, log[-3000:]
    assert_every_item_once(workdir, reference)


@pytest.mark.slow
def test_a_host_with_another_config_stops_every_host(tiny, tmp_path):
    workdir = tmp_path / "mismatch"
    logs_dir = tmp_path / "logs"
    processes = launch(tiny, workdir, logs_dir, extra_flags=((), ("--config.seed=7",)))
    logs = wait(processes, logs_dir)
    assert [p.returncode for p in processes] == [2] * PROCESSES, logs
    for log in logs:
        assert "process 1: its config differs from process 0's (fields differ: ['seed'])" in log
    assert json.loads((workdir / "config.json").read_text())["seed"] == 0  # process 0's
    assert not list(workdir.glob("results*.jsonl")) and not (workdir / "summary.json").exists()
