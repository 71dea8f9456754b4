"""scripts/evaluator_compare.sh: issue 14's same-results runs as one resumable job that
keeps its records after every step, here on the tiny Keras model of test_run."""

import json
import os
import shutil
import sys

import pytest
from conftest import run_job_script
from test_run import write_tiny_setup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "evaluator_compare.sh")
IMAGES = 5


def compare(tmp_path, setup, **env):
    settings = dict(
        PYTHON=sys.executable,
        COMPARE_RUNS=str(tmp_path / "runs"),
        COMPARE_RECORDS=str(tmp_path / "records"),
        COMPARE_NAME="tiny",
        COMPARE_CONFIG="configs/default.py",
        COMPARE_MODEL=setup["model"],
        COMPARE_IMAGES=str(IMAGES),
        COMPARE_STEP="2",
        COMPARE_FLAGS=" ".join([
            f"--config.data={setup['data']}", "--config.de.popsize=8",
            "--config.de.generations=3", "--config.cpu_devices=1",
        ]),
    )  # fmt: skip
    settings.update(env)
    return run_job_script(SCRIPT, tmp_path, REPO, **settings)


def lines(path) -> list[str]:
    with open(path) as f:
        return f.read().splitlines()


def test_the_job_compares_in_steps_keeps_records_and_resumes_on_a_new_machine(tmp_path):
    setup = write_tiny_setup(tmp_path / "tiny")
    first = compare(tmp_path, setup)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count(": 2 images in") == 2  # a step of 2 for each preset, then 4, 5
    assert first.stdout.count(": 5 images in") == 2
    for preset in ("scipy", "paper"):
        run = tmp_path / "runs" / f"compare_tiny_{preset}"
        comparison = json.loads((run / "comparison.json").read_text())
        assert comparison["attacks"] == comparison["same"] == IMAGES
        assert comparison["differing"] == []
        steps, last = comparison["wall_seconds_all_steps"], comparison["wall_seconds"]
        assert steps.keys() == last.keys() == {"full", "incremental"}
        assert all(steps[k] > last[k] > 0 for k in steps)  # three steps add up
        cpu_steps, cpu_last = comparison["cpu_seconds_all_steps"], comparison["cpu_seconds"]
        assert cpu_steps.keys() == cpu_last.keys() == {"full", "incremental"}
        assert all(cpu_steps[k] > cpu_last[k] > 0 for k in steps)
        assert comparison["cpu_seconds_from_attack"] == 0  # kept from the first step on
        kept = tmp_path / "records" / f"compare_tiny_{preset}"
        for kind in ("full", "incremental"):
            assert lines(kept / kind / "results.jsonl") == lines(run / kind / "results.jsonl")
            assert len(lines(kept / kind / "results.jsonl")) == IMAGES
        assert json.loads((kept / "comparison.json").read_text()) == comparison

    # A new machine: no workdirs, only the kept records, and one image more. Only it is
    # attacked. The scipy records as kept before CPU seconds were: counted from here on.
    path = tmp_path / "records" / "compare_tiny_scipy" / "comparison.json"
    old = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("cpu")}
    path.write_text(json.dumps(old))
    shutil.rmtree(tmp_path / "runs")
    again = compare(tmp_path, setup, COMPARE_IMAGES=str(IMAGES + 1))
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("restored") == 2
    assert f"{IMAGES + 1} work items ({IMAGES} already done)" in again.stderr
    assert "(0 already done)" not in again.stderr
    tallies = {}
    for preset in ("scipy", "paper"):
        run = tmp_path / "runs" / f"compare_tiny_{preset}"
        tallies[preset] = json.loads((run / "comparison.json").read_text())
        assert tallies[preset]["same"] == IMAGES + 1
        assert tallies[preset]["cpu_seconds_from_attack"] == (IMAGES if preset == "scipy" else 0)

    # Finished: the same command runs nothing, so the wall-time tallies do not grow.
    done = compare(tmp_path, setup, COMPARE_IMAGES=str(IMAGES + 1))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "images in" not in done.stdout
    for preset in ("scipy", "paper"):
        run = tmp_path / "runs" / f"compare_tiny_{preset}"
        assert json.loads((run / "comparison.json").read_text()) == tallies[preset]


@pytest.mark.parametrize(
    "env, message",
    [
        ({"COMPARE_STEP": "0"}, "COMPARE_STEP is '0': expected a positive whole number"),
        ({"COMPARE_IMAGES": "ten"}, "COMPARE_IMAGES is 'ten': expected a positive whole number"),
        ({"COMPARE_PRESETS": "scipy best"}, "COMPARE_PRESETS has 'best': expected presets among"),
        ({"COMPARE_NAME": "a/b"}, "COMPARE_NAME is 'a/b'"),
    ],
)
def test_bad_settings_stop_before_any_work(tmp_path, env, message):
    setup = {"model": "keras:nowhere.h5", "data": "folder:nowhere"}
    bad = compare(tmp_path, setup, **env)
    assert bad.returncode == 2 and message in bad.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "records").exists()
