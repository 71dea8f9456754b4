"""Which torchvision and timm classifiers the ONNX importer runs, by exporter and opset;
and the incremental evaluator's FLOP ratio on them at full size.

    nice -n 10 python scripts/onnx_coverage.py [--out=runs/onnx_coverage] [--models=a,b]
    nice -n 10 python scripts/onnx_coverage.py --flops [--out=runs/onnx_coverage]

For each architecture of torchvision.models (random weights, eval mode, the
smallest image size it accepts): export with the TorchScript exporter at
opset 17 and at its default opset, and with the dynamo exporter; load with
opa_jax and compare with onnxruntime (opa_jax/models/torch_coverage.py).
Each architecture runs in its own process, smallest first, and its rows are
appended to OUT/results.jsonl as it finishes, so a second run resumes;
OUT/table.md (a row per export) and OUT/summary.md (a line per architecture) are
rewritten after each. `--redo` measures the given models again.
Each measurement runs mostly on one thread, so --workers (default 2) run at once.
timm's families ("timm:NAME", `torch_coverage.TIMM_MODELS`) come first when timm is
installed.

`--flops`: for one architecture of each family (`torch_coverage.FLOP_MODELS`, or
--models) at its full input size, XLA's FLOPs per query of the full and the
incremental evaluator for one pixel, their ratio and `auto`'s choice, into
OUT/flops.jsonl and OUT/flops.md, resumable the same way.
Needs the extra [torch], torchvision, onnxruntime and onnxscript (and timm).
"""

import concurrent.futures
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from opa_jax.models import torch_coverage  # noqa: E402

_OUT = flags.DEFINE_string("out", "runs/onnx_coverage", "Where the rows and the table go.")
_MODELS = flags.DEFINE_list("models", [], "Architectures to measure (default: all).")
_REDO = flags.DEFINE_bool("redo", False, "Measure the given models again.")
_TIMEOUT = flags.DEFINE_integer("timeout", 900, "Seconds for one architecture.")
_ONE = flags.DEFINE_string("one", None, "Measure this architecture here and print its rows.")
_WORKERS = flags.DEFINE_integer(
    "workers", 2, "Architectures measured at once, each in its own process (mostly one thread)."
)
_FLOPS = flags.DEFINE_bool("flops", False, "Full-size FLOP ratios instead of coverage.")


def read_rows(path: str) -> list[dict]:
    """The rows of each model's last measurement (each is written as one block)."""
    latest, previous = {}, None
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                if row["model"] != previous:
                    latest[row["model"]] = []
                latest[row["model"]].append(row)
                previous = row["model"]
    return [row for rows in latest.values() for row in rows]


def main(argv):
    del argv
    if _ONE.value:
        rows = [torch_coverage.flop_row(_ONE.value)] if _FLOPS.value else None
        for row in rows or torch_coverage.iter_rows(_ONE.value):
            print("ROW " + json.dumps(row), flush=True)
        return
    os.makedirs(_OUT.value, exist_ok=True)
    if _FLOPS.value:
        measure_flops()
        return
    results = os.path.join(_OUT.value, "results.jsonl")
    names = _MODELS.value or torch_coverage.architectures()
    done = {row["model"] for row in read_rows(results)}
    todo = [name for name in names if _REDO.value or name not in done]
    for number, (name, (rows, error)) in enumerate(in_parallel(todo), 1):
        print(f"[{number}/{len(todo)}] {name}", flush=True)
        measured = {(row["exporter"], row["opset_asked"]) for row in rows}
        rows += [
            {
                "exporter": exporter,
                "opset_asked": opset,
                "opset": opset,
                "loads": False,
                "error": error[:300] or "no output",
            }
            for exporter, opset in torch_coverage.EXPORTS
            if (exporter, opset) not in measured
        ]
        with open(results, "a") as f:
            for row in rows:
                f.write(json.dumps({"model": name} | row) + "\n")
        for row in rows:
            print(
                f"  {row['exporter']} {row.get('opset')}: loads={row.get('loads')} "
                f"diff={row.get('rel_diff')} missing={row.get('missing')} "
                f"{row.get('error', '')[:100]}",
                flush=True,
            )
        table = sorted(
            read_rows(results), key=lambda r: (r["model"], r["exporter"], str(r["opset_asked"]))
        )
        with open(os.path.join(_OUT.value, "table.md"), "w") as f:
            f.write(torch_coverage.render_table(table))
        with open(os.path.join(_OUT.value, "summary.md"), "w") as f:
            f.write(torch_coverage.render_summary(table))


def in_parallel(names: list[str], *flags_: str):
    """(name, `run_one(name)`) for each name as it finishes, --workers at a time."""
    with concurrent.futures.ThreadPoolExecutor(_WORKERS.value) as pool:
        futures = {pool.submit(run_one, name, *flags_): name for name in names}
        for future in concurrent.futures.as_completed(futures):
            yield futures[future], future.result()


def run_one(name: str, *flags_: str) -> tuple[list[dict], str]:
    """(rows, last error line) of `--one=name` in its own process, within --timeout."""
    command = [sys.executable, os.path.abspath(__file__), f"--one={name}", *flags_]
    try:
        process = subprocess.run(command, capture_output=True, text=True, timeout=_TIMEOUT.value)
        stdout, error = process.stdout, (process.stderr.strip().splitlines() or [""])[-1]
    except subprocess.TimeoutExpired as timeout:
        stdout, error = timeout.stdout or "", f"over {_TIMEOUT.value} s"
        stdout = stdout.decode() if isinstance(stdout, bytes) else stdout
    rows = [json.loads(line[4:]) for line in stdout.splitlines() if line.startswith("ROW ")]
    return rows, error


def measure_flops():
    """Full-size FLOP ratios into OUT/flops.jsonl (resumed) and OUT/flops.md."""
    results = os.path.join(_OUT.value, "flops.jsonl")
    names = _MODELS.value or list(torch_coverage.FLOP_MODELS)
    done = {row["model"] for row in read_rows(results)}
    todo = [name for name in names if _REDO.value or name not in done]
    for number, (name, (rows, error)) in enumerate(in_parallel(todo, "--flops"), 1):
        print(f"[{number}/{len(todo)}] {name}", flush=True)
        rows = rows or [{"model": name, "error": error[:300] or "no output"}]
        with open(results, "a") as f:
            f.write(json.dumps(rows[0]) + "\n")
        print(f"  {rows[0]}", flush=True)
        order = {name: number for number, name in enumerate(names)}
        table = sorted(read_rows(results), key=lambda r: order.get(r["model"], len(order)))
        with open(os.path.join(_OUT.value, "flops.md"), "w") as f:
            f.write(torch_coverage.render_flops(table))


if __name__ == "__main__":
    app.run(main)
