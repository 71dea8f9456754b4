"""Keeps attack runs' finished records in the repository, so a run continues from them.

    python scripts/keep_runs.py save docs/runs runs/zoo_nin_1px runs/compare_resnet_scipy
    python scripts/keep_runs.py restore docs/runs runs/zoo_nin_1px runs/compare_resnet_scipy

`runs/` is git-ignored, so a run's results live only where it ran. Saving its
finished attacks into a committed store (`docs/runs`) and restoring them into an empty
workdir lets the run continue in a fresh clone, on another host, from where the
committed records end. A run's records are its identity and finished attacks:
`config.json`, `run_info.json`, `summary.json`, `results*.jsonl` and
`comparison.json`, in the run directory and in its subdirectories (a
`scripts/compare_evaluators.py` run keeps `full/` and `incremental/`). They are
results, not intermediate state: every record is one finished attack, and a run
resumed from them redoes none of those and gives the others exactly as an
uninterrupted run would (each attack's random stream is keyed by its image and
target alone).

- `save STORE RUN...` copies each run's records to `STORE/<run's name>`, whole
  lines of the results only (a line being written is left for the next save).
- `restore STORE RUN...` seeds each run directory that holds no results yet from
  `STORE/<run's name>`; a run that already has results is left as it is.
"""

import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from opa_jax import files  # noqa: E402

RECORD_FILES = ("config.json", "run_info.json", "summary.json", "comparison.json")


def _is_record(name: str) -> bool:
    return name in RECORD_FILES or (name.startswith("results") and name.endswith(".jsonl"))


def _records(run: str) -> list[str]:
    """The record files of `run`, relative to it (with a min_pixels run's stages/*.jsonl)."""
    found = []
    for root, _, names in os.walk(run):
        stage = os.path.basename(root) == "stages"
        found += [
            os.path.relpath(os.path.join(root, n), run)
            for n in names
            if _is_record(n) or (stage and n.endswith(".jsonl"))
        ]
    return sorted(found)


def _has_results(run: str) -> bool:
    return any(os.path.basename(p).startswith("results") for p in _records(run))


def _copy_whole_lines(src: str, dst: str) -> None:
    with open(src, "rb") as f:
        data = f.read()
    if src.endswith(".jsonl") and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]  # the line in progress waits for the next save
    files.write_atomic(dst, data)


def save(store: str, run: str) -> str:
    if not os.path.isdir(run) or not _has_results(run):
        raise ValueError(f"run {run!r}: expected an attack run directory with results*.jsonl")
    target = os.path.join(store, os.path.basename(os.path.normpath(run)))
    for path in _records(run):
        _copy_whole_lines(os.path.join(run, path), os.path.join(target, path))
    return f"saved {run} to {target}"


def restore(store: str, run: str) -> str:
    kept = os.path.join(store, os.path.basename(os.path.normpath(run)))
    if os.path.isdir(run) and _has_results(run):
        return f"{run} has results: left as it is"
    if not os.path.isdir(kept):
        return f"{run}: nothing kept in {kept}"
    for path in _records(kept):
        os.makedirs(os.path.dirname(os.path.join(run, path)), exist_ok=True)
        shutil.copyfile(os.path.join(kept, path), os.path.join(run, path))
    return f"restored {run} from {kept}"


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[0] not in ("save", "restore"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        print("usage: keep_runs.py save|restore STORE RUN...", file=sys.stderr)
        return 2
    action, store, runs = argv[0], argv[1], argv[2:]
    try:
        for run in runs:
            print(save(store, run) if action == "save" else restore(store, run))
    except (OSError, ValueError) as e:
        print(f"keep_runs: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
