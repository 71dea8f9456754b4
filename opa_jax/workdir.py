"""An attack workdir: its identity, run record, results and summary.

- `config.json`: the run's identity, the config without the execution fields.
  Rerunning on the workdir resumes the run; a larger `num_images` (or 0, for
  all) extends it; any other change of the identity is refused.
- `run_info.json`: software versions, devices, seed, command line and the
  directory the run started in (relative data paths are relative to it), and
  each host's name, devices and versions (`processes`).
- `results.jsonl` (`results.hostNNN.jsonl` per host on several hosts): one
  record per attack, appended as images finish.
- `summary.json`: the tally of every host's records.

On several hosts, process 0 alone writes the shared files (`config.json`,
`run_info.json`, `summary.json`), each atomically; the others meet it at
barriers (`opa_jax.hosts`) before they read them.

A run's identity and the fields two identities differ in come from
`opa_jax.config_identity`, which training's resumption check uses as well.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import ml_collections

from opa_jax import attack, files, hosts, metrics, provenance, results
from opa_jax.config_identity import config_identity, differing_fields
from opa_jax.errors import InputError
from opa_jax.models import LoadedModel

# Fields that change how a run executes, never its results.
EXECUTION_FIELDS = (
    "slots",
    "chunk_size",
    "flush_seconds",
    "distributed",
    "cpu_devices",
    "evaluator",
)
CONFIG_FILE = "config.json"
RESULTS_FILE = "results.jsonl"
RUN_INFO_FILE = "run_info.json"
SUMMARY_FILE = "summary.json"


def writable_error(workdir: str) -> str | None:
    """Why this host cannot write into `workdir`, or None when it can."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test.{jax.process_index()}.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        return f"workdir {workdir!r} is not writable ({e})"
    return None


def claim(workdir: str, identity: dict) -> None:
    """Writes the run's identity into `config.json`, or refuses a workdir that holds
    another run (a shrunk `num_images` included)."""
    path = os.path.join(workdir, CONFIG_FILE)
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        # num_images may grow (the run is extended by the next eligible images), never shrink.
        changed = differing_fields(previous, identity, ignored_fields=("num_images",))
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
    files.write_atomic(path, json.dumps(identity, indent=2, sort_keys=True))


def check_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Claims `workdir` for the run, or refuses one that holds another run.

    Process 0 claims it (`claim`); every other host reads `config.json` once
    process 0 has written it, and refuses a config that differs from its own.
    A refusal on any host stops every host with it.
    """
    identity = config_identity(config, EXECUTION_FIELDS + unused_sections(config))
    error = writable_error(workdir)
    if error is None and hosts.is_main():
        try:
            claim(workdir, identity)
        except InputError as e:
            error = str(e)
    hosts.raise_if_any("workdir claimed", error)
    if not hosts.is_main():  # process 0 has written config.json: read it
        path = os.path.join(workdir, CONFIG_FILE)
        try:
            with open(path) as f:
                written = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            error = (
                f"cannot read {path!r}, which process 0 wrote ({e}); the workdir must be on a "
                "filesystem that every host shares"
            )
        else:
            changed = differing_fields(written, identity)
            if changed:
                error = (
                    f"its config differs from process 0's (fields differ: {changed}); every "
                    "host must run the same config"
                )
    hosts.raise_if_any("config read", error)


def write_run_info(
    workdir: str,
    config: ml_collections.ConfigDict,
    de_settings: dict | None,
    considered: dict | None = None,
):
    """Process 0 writes `run_info.json`: the run's record and every host's (`processes`).

    `considered` holds the plan's `images_considered` and `clean_correct`, which
    clean and robust accuracy count over (`opa_jax.metrics`); the records hold only
    the attacked images, so a resumed run and a report read them from here.
    """
    processes = hosts.gather("run info", provenance.process())
    if not hosts.is_main():
        return
    info = {
        "seed": config.seed,
        "argv": sys.argv,
        "cwd": os.getcwd(),
        **provenance.software_versions(),
        **provenance.devices(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "de": de_settings,
        "processes": processes,
        **(considered or {}),
    }
    files.write_atomic(os.path.join(workdir, RUN_INFO_FILE), json.dumps(info, indent=2))


def read_run_info(workdir: str) -> dict:
    """The workdir's run record, or {} when it has none."""
    path = os.path.join(workdir, RUN_INFO_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def results_path(workdir: str) -> str:
    """This host's results file."""
    if jax.process_count() == 1:
        return os.path.join(workdir, RESULTS_FILE)
    return os.path.join(workdir, f"results.host{jax.process_index():03d}.jsonl")


def read_tally(workdir: str, num_classes: int) -> metrics.Tally:
    """The tally of every host's records of a workdir, with the images considered and
    correctly classified that `run_info.json` holds (unknown, so no clean or robust
    accuracy, for runs from before it held them)."""
    info = read_run_info(workdir)
    return metrics.Tally(
        num_classes,
        images_considered=info.get("images_considered", 0),
        clean_correct=info.get("clean_correct", 0),
    ).update(read_all_results(workdir))


def read_all_results(workdir: str) -> list[dict]:
    """Every host's records of a workdir."""
    names = sorted(
        f for f in os.listdir(workdir) if f.startswith("results") and f.endswith(".jsonl")
    )
    return [r for name in names for r in results.read(os.path.join(workdir, name))]


# The config sections of the methods that read them; a run's identity leaves out the
# sections its method does not read.
METHOD_SECTIONS = {
    "exhaustive": ("exhaustive",),
    "corner_search": ("corner_search",),
    "min_pixels": ("exhaustive", "corner_search", "min_pixels"),
}


def unused_sections(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The method sections of `config` that its method does not read."""
    used = METHOD_SECTIONS.get(config.method, ())
    every = {s for sections in METHOD_SECTIONS.values() for s in sections}
    return tuple(sorted(s for s in every if s not in used and s in config))


def method_name(config: ml_collections.ConfigDict) -> str:
    """How records and summaries name the method: 'de:<preset>', 'exhaustive:<colours>',
    'fgsm', 'corner_search' or 'min_pixels'."""
    if config.method == "de":
        return f"de:{config.de.preset}"
    if config.method == "exhaustive":
        return f"exhaustive:{config.exhaustive.colours}"
    return config.method


def record(
    config, items: attack.WorkItems, clean_probs: dict, res: attack.Results, i: int, rule=None
):
    """The `results.jsonl` record of row `i` of `res`; `rule`, the search rule, adds the
    fields of its extra outputs."""
    w = int(res.work_ids[i])
    p = int(items.positions[w])
    target = int(items.target_labels[w])
    out = {
        "image": int(items.indices[w]),
        "true_label": int(items.true_labels[w]),
        "target_label": None if target < 0 else target,
        "success": bool(res.success[i]),
        "adv_label": int(res.adv_label[i]),
        "adv_prob": float(res.adv_prob[i]),
        "clean_probs": [round(float(v), 7) for v in clean_probs[p]],
        "adv_probs": [round(float(v), 7) for v in res.adv_probs[i]],
        "perturbation": res.perturbation[i].tolist(),
        "generations": int(res.generations[i]),
        "queries": int(res.queries[i]),
        "pixels": int(config.pixels),
        "model": config.model,
        "method": method_name(config),
    }
    if hasattr(res, "l0_pixels"):  # dense baselines (FGSM): how many pixels, how far
        out["l0_pixels"] = int(res.l0_pixels[i])
        out["linf"] = float(res.linf[i])
    if rule is not None and res.outputs:
        out.update(rule.record_fields({k: v[i] for k, v in res.outputs.items()}))
    return out


def write_summary(workdir: str, config, model: LoadedModel, extra: dict | None = None) -> dict:
    """Tallies every host's records into the summary, which process 0 writes into
    `summary.json`; returns it.

    Every host calls it once its share is done. It first waits for all of them
    (a barrier), so the tally holds every host's last records.
    """
    hosts.barrier("shares done")
    tally = read_tally(workdir, model.num_classes)
    summary = {
        "model": config.model,
        "data": config.data,
        "pixels": config.pixels,
        "targeted": bool(config.targeted),
        "method": method_name(config),
        "class_names": list(model.class_names) if model.class_names else None,
        "image_shape": list(model.image_shape),  # what the report crops resized images to
        **tally.summary(),
        **(extra or {}),
    }
    if hosts.is_main():
        files.write_atomic(os.path.join(workdir, SUMMARY_FILE), json.dumps(summary, indent=2))
    return summary
