"""scripts/paper_zoo.sh: train, ship and attack the zoo as one resumable job,
here on a tiny NiN and a two-class synthetic set."""

import json
import os
import shutil
import subprocess
import sys

from conftest import run_job_script
from test_train import dataset  # noqa: F401  (the fixture: a two-class synthetic set)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "paper_zoo.sh")
ATTACK_RUNS = {  # workdir -> work items: images x targets (one other class of two)
    "zoo_nin_1px": 2, "zoo_nin_1px_scipy": 2, "zoo_nin_3px": 2, "zoo_nin_5px": 2,
    "zoo_nin_1px_targeted": 1,
}  # fmt: skip


def zoo_settings(tmp_path, data_dir) -> dict[str, str]:
    return dict(
        PYTHON=sys.executable,
        ZOO_RUNS=str(tmp_path / "runs"),
        ZOO_CHECKPOINTS=str(tmp_path / "checkpoints"),
        ZOO_NETWORKS="nin",
        ZOO_IMAGES="2",
        ZOO_TARGETED_IMAGES="1",
        ZOO_RECORDS=str(tmp_path / "records"),
        ZOO_TRAIN_FLAGS=" ".join([
            f"--config.dataset=folder:{data_dir}", "--config.exact_test_data=",
            "--config.data_cache_dir=", "--config.model_overrides.width=0.125",
            "--config.batch_size=16", "--config.eval_batch_size=32", "--config.num_steps=4",
        ]),
        ZOO_ATTACK_FLAGS=" ".join([
            f"--config.data=folder:{data_dir}", "--config.only_correct=False",
            "--config.de.popsize=8", "--config.de.generations=2", "--config.cpu_devices=1",
        ]),
    )  # fmt: skip


def zoo(tmp_path, data_dir, **env):
    settings = zoo_settings(tmp_path, data_dir)
    settings.update(env)
    return run_job_script(SCRIPT, tmp_path, REPO, **settings)


def results(workdir) -> list[dict]:
    with open(os.path.join(workdir, "results.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_the_zoo_job_trains_ships_attacks_and_resumes_without_redoing(dataset, tmp_path):  # noqa: F811
    first = zoo(tmp_path, dataset)
    assert first.returncode == 0, first.stderr[-3000:]
    shipped = tmp_path / "checkpoints" / "nin"
    with open(shipped / "model.json") as f:
        model = json.load(f)
    assert model["model"] == "nin" and model["weights_dtype"] == "float16"
    assert model["steps"] == 4
    card = (tmp_path / "runs" / "train_nin" / "card.md").read_text()
    assert "nin" in card and "CPU time" in card
    runs = tmp_path / "runs"
    before = {}
    for name, items in ATTACK_RUNS.items():
        rows = results(runs / name)
        assert len(rows) == items, (name, rows)
        before[name] = rows
    assert [before[f"zoo_nin_{k}px"][0]["pixels"] for k in (1, 3, 5)] == [1, 3, 5]
    assert {row["method"] for row in before["zoo_nin_1px_scipy"]} == {"de:scipy"}
    assert {row["method"] for row in before["zoo_nin_1px"]} == {"de:paper"}
    assert before["zoo_nin_1px_targeted"][0]["target_label"] is not None
    assert {row["model"] for row in before["zoo_nin_1px"]} == {f"ckpt:{shipped}"}
    assert (runs / "report_zoo").is_dir() and any((runs / "report_zoo").iterdir())

    # The records kept (scripts/keep_runs.py), the attack workdirs lost as in a
    # fresh clone, and the same command again: the model stays as shipped, and every run is
    # restored complete from the records, none redone.
    save = [sys.executable, "scripts/keep_runs.py", "save", str(tmp_path / "records")]
    kept = subprocess.run(save + [str(runs / name) for name in ATTACK_RUNS],
                          cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert kept.returncode == 0, kept.stderr
    for name in ATTACK_RUNS:
        shutil.rmtree(runs / name)
    mtime = os.path.getmtime(shipped / "model.json")
    again = zoo(tmp_path, dataset)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"nin: shipped at {shipped}" in again.stdout
    assert "training in" not in again.stdout
    assert os.path.getmtime(shipped / "model.json") == mtime
    assert {name: results(runs / name) for name in ATTACK_RUNS} == before
    assert again.stdout.count("restored") == len(ATTACK_RUNS)


def test_a_training_that_cannot_end_in_time_is_skipped_with_its_checkpoint(dataset, tmp_path):  # noqa: F811
    flags = zoo_settings(tmp_path, dataset)["ZOO_TRAIN_FLAGS"].replace(
        "--config.num_steps=4", "--config.num_steps=8 --config.log_every=2")  # fmt: skip
    done = zoo(tmp_path, dataset, ZOO_MAX_TRAIN_HOURS="0.000001", ZOO_TRAIN_FLAGS=flags)
    assert done.returncode == 3, done.stderr[-3000:]
    assert "nin: its training cannot end within ZOO_MAX_TRAIN_HOURS=0.000001 h" in done.stdout
    assert "not done: nin" in done.stdout
    assert "stopped at step 2" in done.stderr and "--config.max_hours=1e-06 h" in done.stderr
    train_dir = tmp_path / "runs" / "train_nin"
    assert (train_dir / "checkpoints").is_dir() and not (train_dir / "model").exists()
    assert not (tmp_path / "checkpoints" / "nin").exists()
    assert not any(name in ATTACK_RUNS for name in os.listdir(tmp_path / "runs"))


def test_an_unknown_network_stops_before_any_work(tmp_path):
    done = zoo(tmp_path, "unused", ZOO_NETWORKS="nin resnet50")
    assert done.returncode == 2
    assert "ZOO_NETWORKS has 'resnet50': expected names among nin allconv vgg16" in done.stderr
    assert not (tmp_path / "runs").exists()
    done = zoo(tmp_path, "unused", ZOO_RECIPE="gpu")
    assert done.returncode == 2
    assert "ZOO_RECIPE is 'gpu': expected short or cpu" in done.stderr
    assert not (tmp_path / "runs").exists()
    done = zoo(tmp_path, "unused", ZOO_MAX_TRAIN_HOURS="two")
    assert done.returncode == 2
    assert "ZOO_MAX_TRAIN_HOURS is 'two': expected a number of hours" in done.stderr
    assert not (tmp_path / "runs").exists()
