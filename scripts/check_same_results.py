"""Checks that a commit gives byte-identical results to an earlier one (for refactors).

    .venv/bin/python scripts/check_same_results.py BASELINE [--head=REV] [--out=DIR]

Both commits are checked out as git worktrees beside this repository (so that the
configs' ../shared/data paths resolve), each run with this Python and its own source
first on PYTHONPATH, and compared on

- `results.jsonl` (whole bytes), `config.json` (whole bytes) and `summary.json`
  (all but `wall_seconds_this_run`) of four small attacks: the Keras LeNet
  (`configs/lenet.py`, 8 images) and the NiN checkpoint
  (`configs/cifar10.py:nin,1,nontargeted`, 3 images, 4 generations), each with the
  full and the incremental evaluator; records carry no times, so no field is left out.
  The attacks run with `flush_seconds=1e9`: a device call's generations are sized from
  the wall time of the previous ones to last about `flush_seconds`, so under another
  load records finish in other calls and reach the file in another order; this large
  value makes every call after the first (one generation) end when its chunk of images
  is drained, never on time.
  `flush_seconds` is an execution field, absent from `config.json`;
- `config.json` of every attack config: `cifar10.py`, `cifar10_scipy.py` and
  `cifar10_random_search.py` over `common.every_arg()`, `cifar10_fgsm.py` over
  `common.every_arg(with_pixels=False)`, `lenet.py` and `alexnet_imagenet_1px.py`,
  written by `opa_jax.workdir.check_workdir` (what a run calls to claim its workdir;
  it loads no model, so the AlexNet config is written without its weights);
- `scripts/attack.py --dry_run` of `alexnet_imagenet_1px.py`: exit code and last line
  of stderr (without the weights file both stop on the same error);
- XLA's cost analysis of one query (`incremental.query_costs`, as the benchmark's
  incremental section counts it): FLOPs and bytes accessed, full and incremental,
  for the Keras LeNet and ResNet and random:nin (1, 3 and 5 pixels), random:allconv
  and random:vgg16, compared as exact floats.

Prints a table of the checks and exits 1 if any differs; the worktrees are removed at
the end. Takes 4 to 7 minutes on 2 CPU cores (Intel Xeon Processor, shared with other
work), most of it the eight attacks; the cost analysis takes 20 to 40 s a side.
"""

import json
import os
import re
import subprocess
import sys
import time

from absl import app, flags

_HEAD = flags.DEFINE_string("head", "HEAD", "The commit to check against the baseline.")
_OUT = flags.DEFINE_string("out", "/tmp/check_same_results", "Directory for the runs.")
_KEEP_WORKTREES = flags.DEFINE_bool("keep_worktrees", False, "Leave the worktrees in place.")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ATTACKS = {
    "lenet": ["--config=configs/lenet.py", "--config.num_images=8"],
    "nin": [
        "--config=configs/cifar10.py:nin,1,nontargeted",
        "--config.num_images=3",
        "--config.de.generations=4",
    ],
}
# The same device calls at any load (see the docstring); records reach disk at the end.
PINNED = ["--config.flush_seconds=1e9"]
EVALUATORS = ("full", "incremental")
VOLATILE_SUMMARY_FIELDS = ("wall_seconds_this_run",)

# Run inside a worktree: writes config.json of every attack config under argv[1].
WRITE_CONFIGS = r"""
import json, os, sys
from ml_collections.config_flags import config_flags  # the parser --config uses
from configs import common
from opa_jax import workdir
names = [f"cifar10.py:{a}" for a in common.every_arg()]
names += [f"cifar10_scipy.py:{a}" for a in common.every_arg()]
names += [f"cifar10_random_search.py:{a}" for a in common.every_arg()]
names += [f"cifar10_fgsm.py:{a}" for a in common.every_arg(with_pixels=False)]
names += ["lenet.py", "alexnet_imagenet_1px.py"]
parser = config_flags.ConfigFileFlagParser(name="config")
for name in names:
    config = parser.parse(os.path.join("configs", name))
    workdir.check_workdir(os.path.join(sys.argv[1], name.replace(":", "__")), config)
print(json.dumps(names))
"""

# Run inside a worktree: prints the per-query cost analysis of each model as JSON.
QUERY_COSTS = r"""
import json
from opa_jax import incremental
from opa_jax.models import load_model
points = [("keras:../shared/data/keras/lenet.h5", 1), ("keras:../shared/data/keras/resnet.h5", 1),
          ("random:nin", 1), ("random:nin", 3), ("random:nin", 5),
          ("random:allconv", 1), ("random:vgg16", 1)]
out = {}
for spec, num_pixels in points:
    model = load_model(spec).with_precision("float32")
    out[f"{spec} k={num_pixels}"] = incremental.query_costs(model, num_pixels)
print(json.dumps(out))
"""


def git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", REPO, *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def python(worktree: str, args: list[str], log_path: str) -> tuple[int, str, float]:
    """Runs this Python in `worktree` with its source first; (exit code, stdout, seconds)."""
    env = {**os.environ, "PYTHONPATH": worktree}
    started = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run(
            [sys.executable, *args],
            cwd=worktree,
            env=env,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    return proc.returncode, proc.stdout, time.time() - started


def run_side(worktree: str, out: str) -> dict:
    """Every run of one commit; its outputs go under `out`."""
    os.makedirs(out, exist_ok=True)
    side = {"seconds": {}}
    code, stdout, _ = python(
        worktree, ["-c", "import opa_jax; print(opa_jax.__file__)"], f"{out}/import.log"
    )
    if code or not stdout.strip().startswith(worktree + os.sep):
        raise RuntimeError(f"opa_jax does not import from {worktree}: {stdout.strip()}")
    for name, args in ATTACKS.items():
        for evaluator in EVALUATORS:
            run = f"{name}_{evaluator}"
            code, _, seconds = python(
                worktree,
                [
                    "scripts/attack.py",
                    *args,
                    *PINNED,
                    f"--config.evaluator={evaluator}",
                    f"--workdir={out}/{run}",
                ],
                f"{out}/{run}.log",
            )
            if code:
                raise RuntimeError(f"{run} failed in {worktree}: see {out}/{run}.log")
            side["seconds"][run] = seconds
    code, stdout, seconds = python(
        worktree, ["-c", WRITE_CONFIGS, f"{out}/configs"], f"{out}/configs.log"
    )
    if code:
        raise RuntimeError(f"writing the configs failed in {worktree}: see {out}/configs.log")
    side["configs"], side["seconds"]["configs"] = json.loads(stdout), seconds
    code, stdout, _ = python(
        worktree,
        ["scripts/attack.py", "--config=configs/alexnet_imagenet_1px.py", "--dry_run"],
        f"{out}/alexnet_dry_run.log",
    )
    with open(f"{out}/alexnet_dry_run.log") as f:  # the error, without absl's log lines
        lines = [line for line in f.read().splitlines() if not re.match(r"[IWEF]\d{4} ", line)]
    side["alexnet_dry_run"] = f"exit {code}: " + (stdout if code == 0 else " ".join(lines))
    code, stdout, seconds = python(worktree, ["-c", QUERY_COSTS], f"{out}/costs.log")
    if code:
        raise RuntimeError(f"the cost analysis failed in {worktree}: see {out}/costs.log")
    side["costs"], side["seconds"]["costs"] = json.loads(stdout), seconds
    return side


def read_bytes(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def first_difference(a: bytes | None, b: bytes | None) -> str:
    if a is None or b is None:
        return "missing" + (" at baseline" if a is None else " at head")
    if sorted(a.splitlines()) == sorted(b.splitlines()):
        return "the same lines in another order"
    for i, (x, y) in enumerate(zip(a.splitlines(), b.splitlines(), strict=False)):
        if x != y:
            return f"line {i + 1} differs"
    return f"{len(a.splitlines())} vs {len(b.splitlines())} lines"


def compare(base: dict, head: dict, base_out: str, head_out: str) -> list[tuple[str, bool, str]]:
    """(check, identical, detail) rows."""
    rows = []
    for run in base["seconds"]:
        if run in ("configs", "costs"):
            continue
        for file in ("results.jsonl", "config.json"):
            a = read_bytes(f"{base_out}/{run}/{file}")
            b = read_bytes(f"{head_out}/{run}/{file}")
            same = a is not None and a == b
            detail = f"{len(a.splitlines())} lines" if same else first_difference(a, b)
            rows.append((f"{run} {file}", same, detail))
        summaries = []
        for out in (base_out, head_out):
            with open(f"{out}/{run}/summary.json") as f:
                summary = json.load(f)
            summaries.append({k: v for k, v in summary.items() if k not in VOLATILE_SUMMARY_FIELDS})
        changed = sorted(
            k
            for k in summaries[0].keys() | summaries[1].keys()
            if summaries[0].get(k) != summaries[1].get(k)
        )
        rows.append(
            (
                f"{run} summary.json (less {', '.join(VOLATILE_SUMMARY_FIELDS)})",
                not changed,
                f"{len(summaries[0])} fields" if not changed else f"differ: {changed}",
            )
        )
    names = base["configs"]
    differing = [n for n in names if n not in head["configs"]]
    differing += [n for n in head["configs"] if n not in names]
    for name in names:
        path = f"configs/{name.replace(':', '__')}/config.json"
        a, b = read_bytes(f"{base_out}/{path}"), read_bytes(f"{head_out}/{path}")
        if a is None or a != b:
            differing.append(name)
    rows.append(
        (
            f"config.json of {len(names)} attack configs",
            not differing,
            "all identical" if not differing else f"differ: {sorted(set(differing))}",
        )
    )
    rows.append(
        (
            "alexnet_imagenet_1px.py --dry_run",
            base["alexnet_dry_run"] == head["alexnet_dry_run"],
            base["alexnet_dry_run"]
            if base["alexnet_dry_run"] == head["alexnet_dry_run"]
            else f"{base['alexnet_dry_run']!r} vs {head['alexnet_dry_run']!r}",
        )
    )
    for point, costs in base["costs"].items():
        other = head["costs"].get(point)
        detail = ", ".join(
            f"{name} {cost['flops']:.0f} FLOPs {cost['bytes_accessed']:.0f} B"
            for name, cost in costs.items()
        )
        if costs != other:
            detail = f"baseline {costs} vs head {other}"
        rows.append((f"query costs {point}", costs == other, detail))
    return rows


def main(argv):
    if len(argv) != 2:
        raise app.UsageError("expected one argument: the baseline commit")
    commits = {"baseline": git("rev-parse", argv[1]), "head": git("rev-parse", _HEAD.value)}
    parent = os.path.dirname(REPO)
    worktrees = {role: f"{parent}/check_same_results.{role}" for role in commits}
    sides, started = {}, time.time()
    try:
        for role, commit in commits.items():
            if os.path.exists(worktrees[role]):
                git("worktree", "remove", "--force", worktrees[role])
            git("worktree", "add", "--detach", worktrees[role], commit)
            out = os.path.join(_OUT.value, role)
            subprocess.run(["rm", "-rf", out], check=True)  # attack workdirs would resume
            print(f"{role} {commit[:12]}: running in {worktrees[role]}", flush=True)
            sides[role] = run_side(worktrees[role], out)
    finally:
        if not _KEEP_WORKTREES.value:
            for worktree in worktrees.values():
                if os.path.exists(worktree):
                    git("worktree", "remove", "--force", worktree)
    rows = compare(sides["baseline"], sides["head"], f"{_OUT.value}/baseline", f"{_OUT.value}/head")
    width = max(len(check) for check, _, _ in rows)
    print(f"\nbaseline {commits['baseline'][:12]} vs head {commits['head'][:12]}")
    for check, same, detail in rows:
        print(f"{check:<{width}}  {'same' if same else 'DIFFERENT'}  {detail}")
    print("\nseconds (baseline / head):")
    for step, seconds in sides["baseline"]["seconds"].items():
        print(f"  {step:<18} {seconds:7.1f} / {sides['head']['seconds'].get(step, 0):7.1f}")
    print(f"total {time.time() - started:.0f} s; outputs in {_OUT.value}")
    different = sum(not same for _, same, _ in rows)
    print(f"{len(rows) - different} of {len(rows)} checks identical")
    sys.exit(1 if different else 0)


if __name__ == "__main__":
    app.run(main)
