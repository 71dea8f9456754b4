"""The same attack on 1 and on 8 devices gives the same per-image results.

The 8 CPU devices come from XLA_FLAGS=--xla_force_host_platform_device_count=8,
which must be set before JAX starts, so both runs are subprocesses of
scripts/attack.py. (Several hosts are tested in test_multihost.py.)
"""

import json

from test_run import (
    assert_same_records,
    attack_command,
    run_script,
    script_env,
    tiny_flags,
    write_tiny_setup,
)


def test_one_and_eight_devices_give_identical_results(tmp_path):
    setup = write_tiny_setup(tmp_path / "tiny", num_images=13)
    # 13 images x 2 targets (minus the images already in a target class): an uneven
    # number of items per device, and some devices with no work in the last chunk.
    flags = tiny_flags(setup, targeted=True, targets="1,2", **{"de.generations": 20})
    runs = {}
    for devices in (1, 8):
        workdir = tmp_path / f"devices{devices}"
        done = run_script(attack_command(flags, workdir), script_env(tmp_path / "cache", devices))
        assert done.returncode == 0, done.stderr[-3000:]
        info = json.loads((workdir / "run_info.json").read_text())
        assert len(info["devices"]) == devices
        runs[devices] = [json.loads(line) for line in (workdir / "results.jsonl").open()]
    assert 13 < len(runs[1]) <= 26
    assert 0 < sum(r["success"] for r in runs[1]) < len(runs[1])
    assert_same_records(runs[8], runs[1])
