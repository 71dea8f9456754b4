"""Append-only, kill-safe JSONL result files.

Each flush appends whole lines, then flushes and fsyncs. A kill can leave at
most one partial last line; opening the file for a resumed run cuts it off,
so no half-written record survives and no finished one is lost.
`compare_records` matches two runs' records attack by attack.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import numpy as np

from opa_jax.errors import InputError


def repair(path: str) -> None:
    """Truncates a trailing partial line left by a kill."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            f.truncate(end)


def read(path: str) -> list[dict]:
    """All complete records; a partial last line is ignored."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    complete = lines[:-1]  # whatever follows the last newline is partial (or empty)
    for number, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise InputError(f"results file {path}: line {number} is not valid JSON ({e})") from e
    return records


class Writer:
    """Appends records; `flush()` makes them durable."""

    def __init__(self, path: str):
        repair(path)
        self.path = path
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, records: Iterable[dict]) -> None:
        for record in records:
            self._file.write(json.dumps(record, separators=(",", ":")) + "\n")

    def flush(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self.flush()
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def compare_records(full: list[dict], incremental: list[dict], prob_tolerance=1e-4) -> dict:
    """Per-attack agreement of two runs' records (results.jsonl), keyed by image and target.

    An attack agrees when success, adversarial label, applied pixels,
    generations and queries are equal and the probabilities within
    `prob_tolerance`. Differing attacks are listed with both records' figures.
    """
    by_key = {(r["image"], r["target_label"]): r for r in incremental}
    common = [r for r in full if (r["image"], r["target_label"]) in by_key]
    fields = ("success", "adv_label", "perturbation", "generations", "queries")
    differing, max_prob_diff = [], 0.0
    for a in common:
        b = by_key[(a["image"], a["target_label"])]
        prob_diff = float(np.max(np.abs(np.subtract(a["adv_probs"], b["adv_probs"]))))
        max_prob_diff = max(max_prob_diff, prob_diff)
        if any(a[f] != b[f] for f in fields) or prob_diff > prob_tolerance:
            differing.append(
                {
                    "image": a["image"],
                    "target_label": a["target_label"],
                    **{f"full_{f}": a[f] for f in fields},
                    **{f"incremental_{f}": b[f] for f in fields},
                    "max_prob_diff": prob_diff,
                }
            )
    success_incremental = sum(by_key[(r["image"], r["target_label"])]["success"] for r in common)
    return {
        "attacks": len(common),
        "same": len(common) - len(differing),
        "success_full": sum(r["success"] for r in common),
        "success_incremental": success_incremental,
        "max_prob_diff": max_prob_diff,
        "differing": differing,
    }
