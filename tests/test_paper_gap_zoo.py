"""NiN's recipe variants (configs/train_nin.py) and scripts/paper_gap_zoo.sh, the job that
trains, ships and searches them: here on a tiny NiN and a two-class synthetic set."""

import json
import os
import shutil
import sys

import numpy as np
import pytest
from conftest import run_job_script
from test_train import dataset  # noqa: F401  (the fixture: a two-class synthetic set)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SCRIPT = os.path.join(REPO, "scripts", "paper_gap_zoo.sh")

from configs import common, train_nin  # noqa: E402


def test_each_variant_changes_its_factor_and_nothing_else():
    short = train_nin.get_config("short").to_dict()

    def changed(variant):
        config = train_nin.get_config(variant).to_dict()
        diff = {k: config[k] for k in config if config[k] != short[k] and k != "model_overrides"}
        overrides = {k: v for k, v in config["model_overrides"].items() if v is not None}
        return diff, overrides

    assert changed("no_smoothing") == ({"label_smoothing": 0.0}, {})
    plain = {"label_smoothing": 0.0, "learning_rate": 0.1}
    lin = {"batch_norm": False, "dropout": 0.5}  # Lin et al.'s network
    assert changed("plain") == (plain, lin)
    assert changed("plain_noaug") == ({**plain, "augment": False}, lin)
    for name in train_nin.FACTOR_VARIANTS:  # configs/cifar10.py attacks each by name
        assert common.CIFAR10_MODELS[f"nin_{name}"] == f"ckpt:checkpoints/cifar10/nin_{name}"
        assert common.parse(f"nin_{name},1,targeted") == (f"nin_{name}", 1, True)
    known = "long, cpu, short, no_smoothing, plain, plain_noaug"
    with pytest.raises(ValueError, match=f"plian: expected a variant among {known}"):
        train_nin.get_config("plian")


def gap(tmp_path, data_dir, **env):
    settings = dict(
        PYTHON=sys.executable,
        GAP_RUNS=str(tmp_path / "runs"),
        GAP_CHECKPOINTS=str(tmp_path / "checkpoints"),
        GAP_VARIANTS="nin_plain",
        GAP_IMAGES="2",
        GAP_RECORDS=str(tmp_path / "records"),
        GAP_OUT=str(tmp_path / "paper_gap"),
        GAP_TRAIN_FLAGS=" ".join([
            f"--config.dataset=folder:{data_dir}", "--config.exact_test_data=",
            "--config.data_cache_dir=", "--config.model_overrides.width=0.125",
            "--config.batch_size=16", "--config.eval_batch_size=32", "--config.num_steps=4",
        ]),
        GAP_ATTACK_FLAGS=" ".join([
            f"--config.data=folder:{data_dir}", "--config.only_correct=False",
            "--config.cpu_devices=1",
        ]),
        GAP_REPORT_FLAGS=f"--exact_data=folder:{data_dir} --jpeg_data=folder:{data_dir}",
    )  # fmt: skip
    settings.update(env)
    return run_job_script(SCRIPT, tmp_path, REPO, **settings)


def test_the_job_trains_ships_searches_and_reports_and_resumes(dataset, tmp_path):  # noqa: F811
    first = gap(tmp_path, dataset)
    assert first.returncode == 0, first.stderr[-3000:]
    shipped = tmp_path / "checkpoints" / "nin_plain"
    model = json.loads((shipped / "model.json").read_text())
    assert model["model"] == "nin" and model["weights_dtype"] == "float16"
    recipe = model["train_config"]
    assert recipe["model_overrides"]["batch_norm"] is False and recipe["label_smoothing"] == 0.0
    assert "configs/train_nin.py:plain" in model["command"]
    records = tmp_path / "records" / "search_nin_plain_none"
    rows = [json.loads(line) for line in (records / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["search_complete"] and r["queries"] == 8192 for r in rows)
    assert {r["model"] for r in rows} == {f"ckpt:{shipped}"}
    report = (tmp_path / "paper_gap" / "paper_gap.md").read_text()
    assert "nin_plain" in report and "search_nin_plain_none" in report
    # The paper recipe's row needs the shipped NiN, which this tiny zoo lacks: said so.
    assert "not measured: needs a model named nin (--model=nin:SPEC)" in report

    # Again, now with a NiN shipped: the variant is kept as it was, and NiN is searched on
    # images drawn at random from a range (the test images are 1000-1031 here).
    shutil.copytree(shipped, tmp_path / "checkpoints" / "nin")
    again = gap(tmp_path, dataset, GAP_OTHER_IMAGES="1000:1032")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"nin_plain: shipped at {shipped}" in again.stdout and "training in" not in again.stdout
    kept = [json.loads(line) for line in (records / "results.jsonl").read_text().splitlines()]
    assert kept == rows
    other = tmp_path / "records" / "search_nin_other_images_none"
    drawn = np.random.default_rng(0).permutation(np.arange(1000, 1032))[:3]  # 1.4 x 2, up
    config = json.loads((other / "config.json").read_text())
    assert config["selection"] == ",".join(map(str, drawn))
    attacked = [json.loads(line) for line in (other / "results.jsonl").read_text().splitlines()]
    assert sorted(r["image"] for r in attacked) == sorted(drawn[:2])  # only_correct=False
    report = (tmp_path / "paper_gap" / "paper_gap.md").read_text()
    assert "--model=nin_other_images:ckpt:" in report and "search_nin_other_images_none" in report


def test_bad_settings_stop_before_any_work(tmp_path):
    done = gap(tmp_path, "unused", GAP_VARIANTS="nin_plain nin_bn")
    assert done.returncode == 2
    expected = "expected names among nin_no_smoothing nin_plain nin_plain_noaug"
    assert f"GAP_VARIANTS has 'nin_bn': {expected}" in done.stderr
    done = gap(tmp_path, "unused", GAP_MAX_TRAIN_HOURS="soon")
    assert done.returncode == 2 and "GAP_MAX_TRAIN_HOURS is 'soon'" in done.stderr
    done = gap(tmp_path, "unused", GAP_OTHER_IMAGES="115-1017")
    assert done.returncode == 2 and "GAP_OTHER_IMAGES is '115-1017': expected an A:B" in done.stderr
    assert not (tmp_path / "runs").exists()
