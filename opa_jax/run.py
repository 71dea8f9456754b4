"""`run_attack(config, workdir)`: a whole, resumable attack run from a config.

The plan (`opa_jax.plan`) says what to attack; the workdir (`opa_jax.workdir`)
holds the run's identity, its results and summary. Rerunning the same command
on a killed run resumes it, and a larger `num_images` extends it; a run whose
config differs in any other field than the execution ones is refused.
"""

from __future__ import annotations

import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from opa_jax import attack, baselines, files, hosts, min_pixels, results, search
from opa_jax import workdir as workdir_lib
from opa_jax.plan import make_plan


def run_attack(config: ml_collections.ConfigDict, workdir: str, dry_run: bool = False):
    """Runs (or resumes) the attack described by `config`; returns the summary
    (with `dry_run`, the plan's description, printed instead).

    On several hosts, every host calls it with the same config; each attacks its
    share of the items, and a host that stops on an error stops the others.
    """
    if config.distributed and not jax.distributed.is_initialized():
        jax.distributed.initialize()  # before anything touches a backend
    try:
        return _run_attack(config, workdir, dry_run)
    except Exception as e:
        hosts.report_failure(e)
        raise


def _run_attack(config: ml_collections.ConfigDict, workdir: str, dry_run: bool):
    plan = make_plan(config)
    if dry_run:
        description = plan.describe(config)
        print(json.dumps(description, indent=2, default=str))
        return description

    workdir_lib.check_workdir(workdir, config)
    considered = {"images_considered": plan.images_considered, "clean_correct": plan.clean_correct}
    workdir_lib.write_run_info(workdir, config, search.settings(plan.search), considered)
    if config.method == "min_pixels":
        return min_pixels.run_min_pixels(config, plan, workdir)
    path = workdir_lib.results_path(workdir)
    results.repair(path)
    # Done items from every host's file: a rerun on another number of hosts (whose
    # shares differ) redoes none of them.
    done = {
        (r["image"], r["target_label"]): r["success"] for r in workdir_lib.read_all_results(workdir)
    }
    items = plan.items
    item_keys = [
        (int(i), None if t < 0 else int(t))
        for i, t in zip(items.indices, items.target_labels, strict=True)
    ]
    not_done = np.asarray([key not in done for key in item_keys], bool)
    todo = items.select(not_done)
    local_devices = jax.local_devices()
    logging.info(
        "%d work items (%d already done), %d device(s) x %d slots, chunks of %d, %s evaluator",
        len(items),
        len(items) - len(todo),
        len(local_devices),
        plan.slots,
        plan.chunk_size,
        plan.evaluator.name if plan.evaluator else "no",
    )
    started = time.time()
    finished = len(items) - len(todo)
    successes = sum(done[key] for key in item_keys if key in done)
    counters = attack.LoopCounters()
    with results.Writer(path) as writer:
        for res in _batches(config, plan, todo, counters):
            records = [
                workdir_lib.record(config, todo, plan.clean_probs, res, i, plan.search)
                for i in range(len(res.work_ids))
            ]
            writer.write(records)
            writer.flush()  # each device call is sized to last about flush_seconds
            finished += len(records)
            successes += sum(r["success"] for r in records)
            elapsed = time.time() - started
            rate = (finished - (len(items) - len(todo))) / elapsed if elapsed > 0 else 0.0
            qps = counters.evaluations / elapsed if elapsed > 0 else 0.0
            eta = (len(items) - finished) / rate if rate > 0 else float("inf")
            logging.info(
                "%d/%d done, success %.1f%%, %.2f images/s, %.0f queries/s, "
                "active %.1f%% of evaluations, ETA %.0f s",
                finished,
                len(items),
                100.0 * successes / max(finished, 1),
                rate,
                qps,
                100.0 * counters.active_evaluations / max(counters.evaluations, 1),
                eta,
            )
    return _summarise(config, plan, workdir, counters, time.time() - started)


def _batches(config, plan, todo: attack.WorkItems, counters: attack.LoopCounters):
    """The results of `todo`'s attacks (FGSM's, or the search rule's), as they finish."""
    if config.method == "fgsm":
        return baselines.fgsm_results(plan.model, todo, plan.dataset.read, config.fgsm.epsilon)
    attacker = attack.Attacker(
        plan.model,
        plan.search,
        bool(config.targeted),
        plan.slots,
        jax.local_devices(),
        plan.evaluator,
    )
    return attacker.run(
        jax.random.key(config.seed),
        todo,
        plan.dataset.read,
        plan.chunk_size,
        counters,
        config.flush_seconds,
    )


def _summarise(config, plan, workdir: str, counters: attack.LoopCounters, wall_seconds: float):
    """Writes (and returns) the run's summary, with this run's figures of every host."""
    # Each host's share is done (a barrier): its figures, summed over the hosts.
    shares = hosts.gather(
        "share figures",
        {
            "wall_seconds": wall_seconds,
            "evaluations": counters.evaluations,
            "active_evaluations": counters.active_evaluations,
        },
    )
    evaluations = sum(s["evaluations"] for s in shares)
    return workdir_lib.write_summary(
        workdir,
        config,
        plan.model,
        extra={
            "wall_seconds_this_run": max(s["wall_seconds"] for s in shares),
            "evaluations_this_run": evaluations,
            "active_evaluation_share": (
                sum(s["active_evaluations"] for s in shares) / evaluations if evaluations else None
            ),
            "processes": len(shares),
            "images_checked": plan.images_checked,
            "eligible_images": plan.eligible_images,
        },
    )


def compare_evaluators(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs `config` with the full and with the incremental evaluator (into
    `workdir`/full and `workdir`/incremental, each resumable), and compares their
    records attack by attack (`results.compare_records`); writes and returns
    `workdir`/comparison.json.

    `wall_seconds` is this call's time per evaluator; `wall_seconds_all_steps` adds
    it to that of the earlier calls on the same workdir (a run extended in steps,
    or resumed from kept records), as read from the comparison.json they left.
    `cpu_seconds` and `cpu_seconds_all_steps` are the same for this process's CPU time
    (every thread), which a paused job or a shared machine does not inflate; they are
    counted from the attack `cpu_seconds_from_attack` on (the comparisons before it did
    not keep them)."""
    path = os.path.join(workdir, "comparison.json")
    previous = {}
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
    earlier = previous.get("wall_seconds_all_steps") or previous.get("wall_seconds") or {}
    summaries, cpu_seconds = {}, {}
    for kind in ("full", "incremental"):
        with config.unlocked():
            config.evaluator = kind
        cpu_start = time.process_time()
        summaries[kind] = run_attack(config, os.path.join(workdir, kind))
        cpu_seconds[kind] = time.process_time() - cpu_start
    runs = {kind: workdir_lib.read_all_results(os.path.join(workdir, kind)) for kind in summaries}
    comparison = results.compare_records(runs["full"], runs["incremental"])
    comparison["wall_seconds"] = {k: s.get("wall_seconds_this_run") for k, s in summaries.items()}
    comparison["wall_seconds_all_steps"] = {
        kind: (earlier.get(kind) or 0.0) + (seconds or 0.0)
        for kind, seconds in comparison["wall_seconds"].items()
    }
    comparison["cpu_seconds"] = cpu_seconds
    if "cpu_seconds_all_steps" in previous:
        earlier_cpu = previous["cpu_seconds_all_steps"]
        comparison["cpu_seconds_from_attack"] = previous["cpu_seconds_from_attack"]
    else:
        earlier_cpu = {}
        comparison["cpu_seconds_from_attack"] = previous.get("attacks", 0)
    comparison["cpu_seconds_all_steps"] = {
        kind: earlier_cpu.get(kind, 0.0) + seconds for kind, seconds in cpu_seconds.items()
    }
    files.write_atomic(path, json.dumps(comparison, indent=2))
    return comparison
