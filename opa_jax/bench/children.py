"""Measurements that need a process of their own, because XLA reads its flags (and
the forced host device count) once per process.

`device_scaling` and `xla_flag_comparison` run each point with `run_child`,
which starts `python -m opa_jax.bench JOB` (`run_job` in the child) and reads
its JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np

from opa_jax import attack, plan
from opa_jax.bench import measure
from opa_jax.models import load_model


def device_scaling(
    spec: str, config, device_counts, slots: int, generations: int, repetitions: int
) -> list[dict]:
    """Engine throughput on N forced host devices, each count in its own process.

    Every count attacks the same images with `slots` per device. On a CPU the
    devices share the same cores: this shows that the sharded loop runs and
    gives identical results (equal digests), not a speed-up.
    """
    rows = []
    for count in device_counts:
        job = {
            "model": spec,
            "data": config.data,
            "split": config.split,
            "seed": config.seed,
            "pixels": config.pixels,
            "de": dict(config.de),
            "slots": slots,
            "generations": generations,
            "repetitions": repetitions,
            "images": slots * max(device_counts),  # the same images for every count
        }
        row = run_child(job, f"--xla_force_host_platform_device_count={count}")
        rows.append({"devices": count, **row} if "error" in row else row)
    return rows


def run_child(job: dict, xla_flags: str) -> dict:
    """Runs `job` in `python -m opa_jax.bench` with `xla_flags` added to XLA_FLAGS.

    Returns the child's JSON line, or {"error": the end of its stderr}.
    """
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + xla_flags).strip()
    out = subprocess.run(
        [sys.executable, "-m", "opa_jax.bench", json.dumps(job)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"error": out.stderr[-2000:]}
    return json.loads(lines[-1])


def _child_setup(job: dict):
    """The model, config and DE settings (early stop off) of a child job."""
    model = load_model(job["model"])
    config = ml_collections.ConfigDict(
        {k: job[k] for k in ("data", "split", "seed", "pixels", "de")}
    )
    return model, config, plan.de_config(config, generations=job["generations"], stop="none")


def device_child(job: dict) -> dict:
    """One device-count point (run in a subprocess with forced host devices)."""
    model, config, dconf = _child_setup(job)
    devices = jax.local_devices()
    num_images = job["images"]
    workload = measure.load_workload(model, config, num_images)
    measure.run_engine(model, dconf, job["slots"], workload, devices=devices)  # compile and warm up
    runs = [
        measure.run_engine(model, dconf, job["slots"], workload, devices=devices)
        for _ in range(job["repetitions"])
    ]
    return {
        "devices": len(devices),
        "slots_per_device": job["slots"],
        "images": num_images,
        "engine_qps": measure.spread([r["queries_per_s"] for r in runs]),
        "digest": runs[0]["digest"],
    }


def xla_flag_comparison(
    spec: str, config, flag_sets, slots: int, generations: int, rounds: int, loop_calls: int
) -> list[dict]:
    """Forward ceiling and engine queries/s under several `XLA_FLAGS` settings.

    Each (round, flag set) runs in its own process, since XLA reads its flags
    once per process. Rounds interleave the flag sets, so a slow stretch of a
    shared machine hits all of them; `speedup` is per round, against the
    first flag set. `max_prob_diff` compares the clean-image probabilities
    with the first flag set's, and `digest` the attack results;
    `xla_flags_seen` holds the XLA_FLAGS each child says it ran with.
    """
    spread = measure.spread
    runs = {flags: [] for flags in flag_sets}
    for _ in range(rounds):
        for flags in flag_sets:
            job = {
                "kind": "flags",
                "model": spec,
                "data": config.data,
                "split": config.split,
                "seed": config.seed,
                "pixels": config.pixels,
                "de": dict(config.de),
                "slots": slots,
                "generations": generations,
                "loop_calls": loop_calls,
            }
            runs[flags].append(run_child(job, flags))
    first = flag_sets[0]
    rows = []
    for flags in flag_sets:
        good = [r for r in runs[flags] if "error" not in r]
        if not good:
            rows.append({"flags": flags, "error": runs[flags][0]["error"]})
            continue
        pairs = [
            (r, b)
            for r, b in zip(runs[flags], runs[first], strict=True)
            if "error" not in r and "error" not in b
        ]
        prob_diffs = [
            np.max(np.abs(np.subtract(r["clean_probs"], b["clean_probs"]))) for r, b in pairs
        ]
        rows.append(
            {
                "flags": flags,
                "forward_qps": spread([r["forward_qps"] for r in good]),
                "engine_qps": spread([r["engine_qps"] for r in good]),
                "forward_speedup": spread([r["forward_qps"] / b["forward_qps"] for r, b in pairs]),
                "engine_speedup": spread([r["engine_qps"] / b["engine_qps"] for r, b in pairs]),
                "max_prob_diff": float(max(prob_diffs)) if prob_diffs else None,
                "digest": good[0]["digest"],
                "batch": good[0]["batch"],
                "xla_flags_seen": sorted({r["xla_flags"] for r in good}),  # as the children report
            }
        )
    return rows


def flags_child(job: dict) -> dict:
    """One flag-set point (run in a subprocess with its own XLA_FLAGS)."""
    model, config, dconf = _child_setup(job)
    workload = measure.load_workload(model, config, job["slots"])
    forward = measure.Forward(model, job["slots"] * dconf.popsize, loop_calls=job["loop_calls"])
    measure.run_engine(model, dconf, job["slots"], workload)  # compile and warm up
    engine_run = measure.run_engine(model, dconf, job["slots"], workload)
    forward_qps = forward.time_loop()["queries_per_s"]
    clean = attack.predict_probs(model, workload.images)
    return {
        "xla_flags": os.environ.get("XLA_FLAGS", ""),  # what this process ran with
        "batch": forward.batch,
        "forward_qps": forward_qps,
        "engine_qps": engine_run["queries_per_s"],
        "digest": engine_run["digest"],
        "clean_probs": np.asarray(clean).tolist(),
    }


def run_job(job: dict) -> dict:
    """The child's side of `run_child`: one point, as JSON-ready numbers."""
    return flags_child(job) if job.get("kind") == "flags" else device_child(job)
