"""The smallest number of pixels that fools each image, over a whole test set.

The authors' own measure of robustness (Kotyan & Vargas, PLoS ONE 2022, count
robustness levels at k = 1, 3, 5, 10). One resumable run, in stages:

1. every image at k = 1 by the exhaustive one-pixel search
   (`opa_jax.exhaustive`), which answers k = 1 exactly for its colour set;
2. the images not yet fooled at each k of `min_pixels.ks` (default 2, 3, 5,
   10) by `min_pixels.search` (the corner search, or DE with `config.de`) at
   a budget of `min_pixels.popsize` x `min_pixels.generations` queries.

Each stage writes its records to `stages/k<k>.jsonl` as they finish, so a
killed run resumes inside the stage it was in. When every stage is done, each
image gets one record in `results.jsonl`: the record of the stage that fooled
it (or of the last stage), with `min_pixels` (null when no stage fooled it),
`queries` (the queries of every stage it went through) and `stage_queries`.
`summary.json` adds `fooled_by_k`, the cumulative count of fooled images at
each k.
"""

from __future__ import annotations

import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from opa_jax import attack, de, devices, hosts, incremental, metrics, results, search
from opa_jax import workdir as workdir_lib
from opa_jax.errors import InputError

STAGE_DIR = "stages"


def pixel_counts(config: ml_collections.ConfigDict) -> list[int]:
    """The stages' pixel counts: 1, then `min_pixels.ks` (increasing, each > 1)."""
    try:
        ks = [int(k) for k in str(config.min_pixels.ks).split(",") if k.strip()]
    except ValueError as e:
        raise InputError(
            f"min_pixels.ks={config.min_pixels.ks!r}: expected comma-separated pixel counts"
        ) from e
    if any(k <= 1 for k in ks) or ks != sorted(set(ks)):
        raise InputError(
            f"min_pixels.ks={config.min_pixels.ks!r}: expected increasing pixel counts > 1"
        )
    return [1, *ks]


def stage_rule(config: ml_collections.ConfigDict, image_shape, k: int) -> search.Search:
    """The search rule of the stage at `k` pixels."""
    if k == 1:
        return search.search_config(config, image_shape, method="exhaustive", pixels=1)
    name = config.min_pixels.search
    budget = dict(popsize=config.min_pixels.popsize, generations=config.min_pixels.generations)
    if name == "de":
        return search.de_config(
            config, num_pixels=k, channels=de.image_channels(image_shape), **budget
        )
    if name == "corner_search":
        with config.unlocked():
            stage = ml_collections.ConfigDict(config.to_dict())
        stage.corner_search.update(budget)
        return search.search_config(stage, image_shape, method="corner_search", pixels=k)
    raise InputError(f"min_pixels.search={name!r}: expected 'corner_search' or 'de'")


def _stage_path(workdir: str, k: int) -> str:
    host = f".host{jax.process_index():03d}" if jax.process_count() > 1 else ""
    return os.path.join(workdir, STAGE_DIR, f"k{k}{host}.jsonl")


def _stage_records(workdir: str, k: int) -> list[dict]:
    """Every host's records of the stage at `k` pixels."""
    folder = os.path.join(workdir, STAGE_DIR)
    if not os.path.isdir(folder):
        return []
    names = sorted(f for f in os.listdir(folder) if f.startswith(f"k{k}.") and f.endswith(".jsonl"))
    return [r for name in names for r in results.read(os.path.join(folder, name))]


def _key(record: dict) -> tuple[int, int | None]:
    return record["image"], record["target_label"]


def run_stage(config, plan, k: int, items: attack.WorkItems, workdir: str) -> list[dict]:
    """Attacks `items` at `k` pixels (resuming the stage's file); returns the stage's
    records of those items."""
    rule = stage_rule(config, plan.model.image_shape, k)
    done = {_key(r): r for r in _stage_records(workdir, k)}
    keys = [
        (int(i), None if t < 0 else int(t))
        for i, t in zip(items.indices, items.target_labels, strict=True)
    ]
    todo = items.select(np.asarray([key not in done for key in keys], bool))
    logging.info(
        "min_pixels: k=%d, %d items (%d already done)", k, len(items), len(items) - len(todo)
    )
    if len(todo):
        evaluator = incremental.make_evaluator(config.evaluator, plan.model, k)
        slots, chunk = devices.slots_and_chunk(
            config, plan.model, rule.popsize, len(todo), evaluator
        )
        attacker = attack.Attacker(
            plan.model, rule, bool(config.targeted), slots, jax.local_devices(), evaluator
        )
        with config.unlocked():
            stage_config = ml_collections.ConfigDict(config.to_dict())
        stage_config.pixels = k
        stage_config.method = "exhaustive" if k == 1 else config.min_pixels.search
        path = _stage_path(workdir, k)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        started, finished = time.time(), 0
        with results.Writer(path) as writer:
            for res in attacker.run(
                jax.random.key(config.seed),
                todo,
                plan.dataset.read,
                chunk,
                call_seconds=config.flush_seconds,
            ):
                records = [
                    workdir_lib.record(stage_config, todo, plan.clean_probs, res, i, rule)
                    for i in range(len(res.work_ids))
                ]
                writer.write(records)
                writer.flush()
                done.update((_key(r), r) for r in records)
                finished += len(records)
                logging.info(
                    "min_pixels: k=%d, %d/%d done, %.2f images/s",
                    k,
                    finished,
                    len(todo),
                    finished / max(time.time() - started, 1e-9),
                )
    return [done[key] for key in keys]


def final_record(stage_records: list[dict]) -> dict:
    """One item's record over the stages it went through, in order."""
    fooled = [r for r in stage_records if r["success"]]
    chosen = fooled[0] if fooled else stage_records[-1]
    out = dict(chosen)
    out["min_pixels"] = chosen["pixels"] if fooled else None
    out["queries"] = sum(r["queries"] for r in stage_records)
    out["stage_queries"] = {str(r["pixels"]): r["queries"] for r in stage_records}
    out["method"] = "min_pixels"
    return out


def fooled_by_k(records: list[dict], ks: list[int]) -> dict[str, int]:
    """The cumulative count of fooled items at each k."""
    found = [r["min_pixels"] for r in records if r.get("min_pixels") is not None]
    return {str(k): sum(m <= k for m in found) for k in ks}


def run_min_pixels(config: ml_collections.ConfigDict, plan, workdir: str) -> dict:
    """Runs (or resumes) every stage on this host's share of `plan`'s items, writes
    each item's record into `results.jsonl`, and returns the summary."""
    ks = pixel_counts(config)
    for k in ks:
        stage_rule(config, plan.model.image_shape, k)  # a bad setting stops before any attack
    items, per_item = plan.items, {}
    started = time.time()
    for k in ks:
        if not len(items):
            break
        records = run_stage(config, plan, k, items, workdir)
        for record in records:
            per_item.setdefault(_key(record), []).append(record)
        items = items.select(np.asarray([not r["success"] for r in records], bool))
    path = workdir_lib.results_path(workdir)
    results.repair(path)
    written = {_key(r) for r in results.read(path)}
    with results.Writer(path) as writer:
        writer.write(final_record(stages) for key, stages in per_item.items() if key not in written)
    hosts.barrier("min_pixels stages done")
    finals = workdir_lib.read_all_results(workdir)
    minima = [r["min_pixels"] for r in finals if r["min_pixels"] is not None]
    return workdir_lib.write_summary(
        workdir,
        config,
        plan.model,
        extra={
            "fooled_by_k": fooled_by_k(finals, ks),
            "fooled_by_k_ci95": {
                str(k): list(metrics.wilson_interval(n, len(finals)))
                for k, n in fooled_by_k(finals, ks).items()
            },
            "median_min_pixels": float(np.median(minima)) if minima else None,
            "queries_total": int(sum(r["queries"] for r in finals)),
            "stage_search": config.min_pixels.search,
            "stage_budget": config.min_pixels.popsize * (config.min_pixels.generations + 1),
            "wall_seconds_this_run": time.time() - started,
        },
    )
