"""`attack(config, workdir)`: a whole, resumable attack run from a config.

The workdir holds `config.json` (the run's identity), `run_info.json`
(software versions, devices, seed), `results.jsonl` (one record per attack,
appended as images finish) and `summary.json`. Rerunning the same command on
a killed run resumes it; a different config on a finished workdir is refused.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import sys
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from opa_jax import attack as attack_lib
from opa_jax import data as data_lib
from opa_jax import de, incremental, metrics, results
from opa_jax.errors import InputError
from opa_jax.models import load_model

# Fields that change how a run executes, never its results.
EXECUTION_FIELDS = (
    "slots", "chunk_size", "flush_seconds", "distributed", "cpu_devices", "evaluator",
)  # fmt: skip
RESULTS_FILE = "results.jsonl"


def de_config(config: ml_collections.ConfigDict) -> de.DEConfig:
    overrides = {k: v for k, v in config.de.items() if k != "preset"}
    return de.DEConfig.from_preset(config.de.preset, num_pixels=config.pixels, **overrides)


def _identity(config) -> dict:
    identity = json.loads(config.to_json())
    for field in EXECUTION_FIELDS:
        identity.pop(field, None)
    return identity


def _check_workdir(workdir: str, config) -> None:
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise InputError(f"workdir {workdir!r} is not writable ({e})") from e
    path = os.path.join(workdir, "config.json")
    identity = _identity(config)
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        # num_images may grow (the run is extended by the next eligible images), never shrink.
        changed = sorted(
            k for k in set(previous) | set(identity)
            if k != "num_images" and previous.get(k) != identity.get(k)
        )  # fmt: skip
        if changed:
            raise InputError(
                f"workdir {workdir!r} holds a run with a different config (fields differ: "
                f"{changed}); use a new --workdir, or rerun with the original config to resume"
            )
        before, now = previous.get("num_images", 0), identity.get("num_images", 0)
        if not (now == 0 or 0 < before <= now):  # 0 means all eligible images
            raise InputError(
                f"workdir {workdir!r} holds a run with num_images={before}; it can be resumed "
                f"or extended (num_images >= {before}, or 0 for all), not shrunk to {now}; "
                "use a new --workdir for a smaller run"
            )
        if previous == identity:
            return
    with open(path, "w") as f:
        json.dump(identity, f, indent=2, sort_keys=True)


def _run_info(config) -> dict:
    import flax

    return {
        "seed": config.seed,
        "argv": sys.argv,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "numpy": np.__version__,
        "opa_jax": __import__("opa_jax").__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "host": platform.node(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


# `cpu_devices=0` gives one CPU device per usable core, up to this many.
MAX_AUTO_CPU_DEVICES = 8
_FORCE_FLAG = "--xla_force_host_platform_device_count"


def set_cpu_devices(count: int) -> None:
    """Splits the host CPU into `count` XLA devices; call it before JAX starts.

    Each device runs its own attack loop on its own images, as GPUs do, so
    the cores work on several images' models at once. One device leaves
    cores idle: in a profile, XLA ran NiN's convolutions on one thread per
    device, and ResNet's operations covered 60% of one device's wall time.
    On 2 cores, two devices attack NiN, ResNet and LeNet 1.1-1.9x faster
    (docs/benchmarks.md). Results do not depend on the count.

    `count=0` (auto) is one device per usable core, at most
    `MAX_AUTO_CPU_DEVICES`, unless XLA_FLAGS already sets
    `--xla_force_host_platform_device_count` (then that count stands). It
    only concerns the CPU backend: accelerators keep their own devices.
    """
    if count < 0:
        raise InputError(f"cpu_devices={count}: expected >= 0 (0 = one per core)")
    if count == 0:
        if _FORCE_FLAG in os.environ.get("XLA_FLAGS", ""):
            return
        count = max(1, min(len(os.sched_getaffinity(0)), MAX_AUTO_CPU_DEVICES))
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # JAX already started in this process: the count stays
        logging.warning("cpu_devices=%d not applied: JAX's backends are already running", count)


def slot_bytes(model, popsize: int, evaluator=None) -> int:
    """Device memory one in-flight image costs: the evaluation's scratch at batch
    `popsize` (XLA's memory analysis) plus its perturbed batch, twice, and the
    image's activation cache under the incremental evaluator.

    Measured on the CPU, the whole loop's memory per slot matches this to
    within 3% (docs/benchmarks.md). Without an analysis it falls back to 64
    perturbed batches.
    """
    h, w, c = model.image_shape
    batch_bytes = popsize * h * w * c * 4
    program = getattr(evaluator, "program", None)
    cache = incremental.cache_bytes(program) if program is not None else 0
    try:
        if program is None:
            images = jax.ShapeDtypeStruct((popsize, h, w, c), np.float32)
            compiled = jax.jit(model.apply_fn).lower(model.params, images).compile()
        else:
            images = jax.ShapeDtypeStruct((1, h, w, c), np.float32)
            candidates = jax.ShapeDtypeStruct((1, popsize, 5 * program.num_pixels), np.float32)
            activations = jax.eval_shape(evaluator.activations, model.params, images)
            logits = functools.partial(evaluator.logits, round_rgb=True)
            compiled = (
                jax.jit(logits).lower(model.params, activations, images, candidates).compile()
            )
        analysis = compiled.memory_analysis()
        return int(analysis.temp_size_in_bytes + 2 * batch_bytes + cache)
    except Exception:  # noqa: BLE001 - memory analysis is optional per backend
        return 64 * batch_bytes + cache


def host_available_bytes() -> int:
    """The host memory available to new allocations (Linux `MemAvailable`), or 0 if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return 0


def auto_slots(model, popsize: int, evaluator=None) -> int:
    """In-flight images per device: enough images per model call to fill the device.

    On the CPU, each core is its own device (`set_cpu_devices`), and a batch
    of about 400 images per device is fastest: at 2 devices on 2 cores,
    ResNet ran at 620 queries/s with 1 slot of 400, 490 with 2 and 460 with 4
    (docs/benchmarks.md); with more than one slot per device (small
    populations), the slots of all devices fit in half the available host
    memory. On accelerators, half the free memory is filled with slots of
    `slot_bytes` (of `evaluator`, which counts the activation cache).
    """
    device = jax.local_devices()[0]
    if device.platform == "cpu":
        slots = max(1, 400 // popsize)
        available = host_available_bytes()
        if slots > 1 and available:  # the devices share the host's memory: half of it at most
            budget = 0.5 * available / len(jax.local_devices())
            per_slot = slot_bytes(model, popsize, evaluator)
            slots = int(max(1, min(slots, budget // max(per_slot, 1))))
        return slots
    try:
        stats = device.memory_stats() or {}
        free = stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0)
    except Exception:  # noqa: BLE001 - memory_stats is optional per backend
        free = 0
    if free <= 0:
        return max(1, 65536 // popsize)
    per_slot = slot_bytes(model, popsize, evaluator)
    return int(max(1, min(256, 0.5 * free // max(per_slot, 1))))


def wrap_precision(model, precision: str):
    """The model with bfloat16 parameters and inputs when asked; logits stay float32."""
    if precision == "float32":
        return model
    if precision != "bfloat16":
        raise InputError(f"precision={precision!r}: expected float32 or bfloat16")
    import dataclasses

    import jax.numpy as jnp

    apply_fn = model.apply_fn

    def apply_bf16(params, images):
        cast = jax.tree.map(lambda p: p.astype(jnp.bfloat16) if p.dtype == jnp.float32 else p,
                            params)  # fmt: skip
        return apply_fn(cast, images.astype(jnp.bfloat16)).astype(jnp.float32)

    return dataclasses.replace(model, apply_fn=apply_bf16, name=model.name + "@bf16")


def plan(config) -> dict:
    """Loads model and data and decides what to attack (no attack is run)."""
    if config.method not in ("de", "fgsm"):
        raise InputError(f"method={config.method!r}: expected 'de' or 'fgsm'")
    dconf = de_config(config) if config.method == "de" else None
    model = load_model(config.model, allow_pickle=config.allow_pickle)
    model = wrap_precision(model, config.precision)
    dataset = data_lib.load_dataset(
        config.data, config.split, model.image_shape, config.resize, config.data_dir or None
    )
    if len(dataset.class_names) != model.num_classes:
        raise InputError(
            f"dataset {config.data} has {len(dataset.class_names)} classes but model "
            f"{config.model} has {model.num_classes} outputs"
        )
    positions = data_lib.select(dataset, config.selection)
    if config.num_images < 0:
        raise InputError(f"num_images={config.num_images}: expected >= 0 (0 means all)")
    # Clean pass, in batches, until enough eligible images are found.
    wanted = config.num_images or len(positions)
    eligible, clean = [], {}
    batch = 256
    for start in range(0, len(positions), batch):
        chunk = positions[start : start + batch]
        probs = attack_lib.predict_probs(model, dataset.read(chunk))
        for p, prob in zip(chunk, probs, strict=True):
            clean[int(p)] = prob
            if not config.only_correct or prob.argmax() == dataset.labels[p]:
                eligible.append(int(p))
        if len(eligible) >= wanted:
            break
    eligible = np.asarray(eligible[:wanted], np.int64)
    # Work items: one per image, or one per (image, target) when targeted.
    if config.targeted:
        if config.targets == "all":
            targets = list(range(model.num_classes))
        else:
            try:
                targets = [int(t) for t in str(config.targets).split(",")]
            except ValueError as e:
                raise InputError(
                    f"targets={config.targets!r}: expected 'all' or class indices"
                ) from e
            bad = [t for t in targets if not 0 <= t < model.num_classes]
            if bad:
                raise InputError(f"targets: classes {bad} are not in [0, {model.num_classes})")
        rows = [(p, t) for p in eligible for t in targets if t != dataset.labels[p]]
    else:
        rows = [(p, -1) for p in eligible]
    pos = np.asarray([r[0] for r in rows], np.int64)
    items = attack_lib.WorkItems(
        positions=pos,
        indices=dataset.indices[pos] if len(pos) else np.zeros(0, np.int64),
        true_labels=dataset.labels[pos] if len(pos) else np.zeros(0, np.int32),
        target_labels=np.asarray([r[1] for r in rows], np.int32),
    )
    # Multi-host: each process attacks its own share.
    share = slice(jax.process_index(), None, jax.process_count())
    items = attack_lib.WorkItems(
        items.positions[share], items.indices[share], items.true_labels[share],
        items.target_labels[share],
    )  # fmt: skip
    return dict(
        model=model, dataset=dataset, de_config=dconf, items=items, clean=clean,
        checked=len(clean), eligible=len(eligible),
    )  # fmt: skip


def results_path(workdir: str) -> str:
    if jax.process_count() == 1:
        return os.path.join(workdir, RESULTS_FILE)
    return os.path.join(workdir, f"results.host{jax.process_index():03d}.jsonl")


def read_all_results(workdir: str) -> list[dict]:
    """Every host's records of a workdir."""
    names = sorted(f for f in os.listdir(workdir) if f.startswith("results") and
                   f.endswith(".jsonl"))  # fmt: skip
    return [r for name in names for r in results.read(os.path.join(workdir, name))]


def _record(config, items, clean, res: attack_lib.Results, i: int) -> dict:
    w = int(res.work_ids[i])
    p = int(items.positions[w])
    target = int(items.target_labels[w])
    record = {
        "image": int(items.indices[w]),
        "true_label": int(items.true_labels[w]),
        "target_label": None if target < 0 else target,
        "success": bool(res.success[i]),
        "adv_label": int(res.adv_label[i]),
        "adv_prob": float(res.adv_prob[i]),
        "clean_probs": [round(float(v), 7) for v in clean[p]],
        "adv_probs": [round(float(v), 7) for v in res.adv_probs[i]],
        "perturbation": res.perturbation[i].tolist(),
        "generations": int(res.generations[i]),
        "queries": int(res.queries[i]),
        "pixels": int(config.pixels),
        "model": config.model,
        "method": config.method if config.method != "de" else f"de:{config.de.preset}",
    }
    if hasattr(res, "l0_pixels"):  # dense baselines (FGSM): how many pixels, how far
        record["l0_pixels"] = int(res.l0_pixels[i])
        record["linf"] = float(res.linf[i])
    return record


def attack(config: ml_collections.ConfigDict, workdir: str, dry_run: bool = False) -> dict:
    """Runs (or resumes) the attack described by `config`; returns the summary."""
    if config.distributed and not jax.distributed.is_initialized():
        jax.distributed.initialize()  # before anything touches a backend
    the_plan = plan(config)
    model, dataset, items = the_plan["model"], the_plan["dataset"], the_plan["items"]
    dconf = the_plan["de_config"]
    devices = jax.local_devices()
    popsize = dconf.popsize if dconf else 1
    per_device_items = max(1, -(-len(items) // len(devices)))
    evaluator = (
        incremental.make_evaluator(config.evaluator, model, dconf.num_pixels) if dconf else None
    )
    slots = config.slots or min(auto_slots(model, popsize, evaluator), per_device_items)
    chunk_size = config.chunk_size or 4 * slots
    if dry_run:
        info = {
            "config": json.loads(config.to_json()),
            "de": dconf.__dict__ if dconf else None,
            "model": {
                "name": model.name,
                "image_shape": model.image_shape,
                "num_classes": model.num_classes,
            },  # fmt: skip
            "dataset": {"name": dataset.name, "size": len(dataset)},
            "images_checked": the_plan["checked"],
            "eligible_images": the_plan["eligible"],
            "work_items": len(items),
            "devices": [str(d) for d in devices],
            "evaluator": evaluator.name if evaluator else None,
            "slots_per_device": slots,
            "chunk_size_per_device": chunk_size,
            "chunks": -(-len(items) // (chunk_size * len(devices))),
        }
        print(json.dumps(info, indent=2, default=str))
        return info

    _check_workdir(workdir, config)
    with open(os.path.join(workdir, "run_info.json"), "w") as f:
        json.dump(_run_info(config) | {"de": dconf.__dict__ if dconf else None}, f, indent=2)
    path = results_path(workdir)
    results.repair(path)
    previous = results.read(path)
    done = {(r["image"], r["target_label"]) for r in previous}
    keep = np.asarray(
        [(int(i), None if t < 0 else int(t)) not in done
         for i, t in zip(items.indices, items.target_labels, strict=True)], bool,
    )  # fmt: skip
    todo = attack_lib.WorkItems(
        items.positions[keep], items.indices[keep], items.true_labels[keep],
        items.target_labels[keep],
    )  # fmt: skip
    total = len(items)
    logging.info(
        "%d work items (%d already done), %d device(s) x %d slots, chunks of %d, %s evaluator",
        total, total - len(todo), len(devices), slots, chunk_size,
        evaluator.name if evaluator else "no",
    )  # fmt: skip
    key = jax.random.key(config.seed)
    started = time.time()
    finished, successes = total - len(todo), sum(r["success"] for r in previous)
    new_done = 0
    progress = attack_lib.Progress()
    with results.Writer(path) as writer:
        if config.method == "fgsm":
            from opa_jax import baselines

            batches = baselines.fgsm_results(model, todo, dataset.read, config.fgsm.epsilon)
        else:
            attacker = attack_lib.Attacker(
                model, dconf, bool(config.targeted), slots, devices, evaluator
            )
            batches = attacker.run(
                key, todo, dataset.read, chunk_size, progress, config.flush_seconds
            )
        for res in batches:
            records = [
                _record(config, todo, the_plan["clean"], res, i) for i in range(len(res.work_ids))
            ]
            writer.write(records)
            writer.flush()  # each device call is sized to last about flush_seconds
            new_done += len(records)
            finished += len(records)
            successes += sum(r["success"] for r in records)
            elapsed = time.time() - started
            rate = new_done / elapsed if elapsed > 0 else 0.0
            qps = progress.evaluations / elapsed if elapsed > 0 else 0.0
            eta = (total - finished) / rate if rate > 0 else float("inf")
            logging.info(
                "%d/%d done, success %.1f%%, %.2f images/s, %.0f queries/s, "
                "active %.1f%% of evaluations, ETA %.0f s",
                finished, total, 100.0 * successes / max(finished, 1), rate, qps,
                100.0 * progress.active_evaluations / max(progress.evaluations, 1), eta,
            )  # fmt: skip
    wall = time.time() - started
    return write_summary(workdir, config, model, extra={
        "wall_seconds_this_run": wall,
        "evaluations_this_run": progress.evaluations,
        "active_evaluation_share": (
            progress.active_evaluations / progress.evaluations if progress.evaluations else None
        ),
        "images_checked": the_plan["checked"],
        "eligible_images": the_plan["eligible"],
    })  # fmt: skip


def write_summary(workdir, config, model, extra=None) -> dict:
    records = read_all_results(workdir)
    tally = metrics.Tally(model.num_classes).update(records)
    summary = {
        "model": config.model,
        "data": config.data,
        "pixels": config.pixels,
        "targeted": bool(config.targeted),
        "method": config.method if config.method != "de" else f"de:{config.de.preset}",
        "class_names": list(model.class_names) if model.class_names else None,
        "image_shape": list(model.image_shape),  # what the report crops resized images to
        **tally.summary(),
        **(extra or {}),
    }
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
