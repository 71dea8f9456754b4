"""Model cards: a markdown page per trained model, read from its checkpoint's
`model.json` (see `opa_jax.models.checkpoint`) as `scripts/train.py` writes it.

    python scripts/model_card.py checkpoints/cifar10/nin
"""

from __future__ import annotations

from opa_jax.errors import InputError
from opa_jax.models import checkpoint


def _accuracy_cell(result: dict | None) -> str:
    if not result:
        return "-"
    return f"{100 * result['accuracy']:.2f}% ({result['correct']}/{result['count']})"


def _cpu_hours(meta: dict) -> str:
    if meta.get("train_cpu_s") is None:
        return "not recorded (a model from before CPU time was kept)"
    since = meta.get("train_cpu_from_step", 0)
    counted = "over the whole run" if since == 0 else f"from step {since} on (not kept before)"
    return (
        f"{meta['train_cpu_s'] / 3600:.2f} h of process CPU time, every thread, "
        f"{counted}; unlike the wall time it does not grow when the machine is shared"
    )


def model_card(path: str) -> str:
    """A markdown model card of the model checkpoint at `path` written by training:
    accuracies (as stored, and in float32), recipe, epochs, wall time, devices, the exact
    command, and the epochs-to-accuracy curve from its history."""
    meta = checkpoint.read_model_json(path)
    if "train_config" not in meta:
        raise InputError(
            f"model checkpoint {path!r}: not written by scripts/train.py "
            "(no train_config in its model.json)"
        )
    c = meta["train_config"]
    epochs = meta.get("epochs")
    if epochs is None:  # written before models kept it
        epochs = c["num_steps"] / 1.0 if c.get("num_steps", -1) > 0 else c["num_epochs"]
    hours = meta.get("train_time_s", 0.0) / 3600
    lines = _description(meta, path, epochs, hours) + _history_table(meta, epochs, hours)
    return "\n".join(lines) + "\n"


def _description(meta: dict, path: str, epochs: float, hours: float) -> list[str]:
    """The card's heading and its list: architecture, data, accuracies, recipe, time."""
    c = meta["train_config"]
    accuracies, float32 = meta.get("accuracies", {}), meta.get("accuracies_float32", {})
    lines = [
        f"### {meta['model']} ({path})",
        "",
        f"- **Architecture**: `{meta['model']}` with {meta.get('model_config') or {}}, "
        f"{meta['num_params']:,} parameters, weights stored as {meta['weights_dtype']} "
        f"(SHA-256 `{meta['weights_sha256'][:12]}...`).",
        f"- **Data**: trained on `{meta.get('dataset')}`; images "
        f"{'x'.join(str(d) for d in meta['image_shape'])}.",
        "- **Accuracy** (stored weights; float32 weights in brackets):",
    ]
    for name in accuracies:
        result = accuracies[name]
        cell = _accuracy_cell(result)
        if name in float32:
            cell += f" [{_accuracy_cell(float32[name])}]"
        lines.append(f"  - {name}: `{result['dataset']}` ({result['split']}): {cell}")
    augment = f"crop (pad {c['crop_padding']}) and flip" if c["augment"] else "none"
    if c.get("progressive_resizing"):
        augment += f", progressive resizing `{c['progressive_resizing']}`"
    software = ", ".join(f"{k} {v}" for k, v in (meta.get("software") or {}).items())
    return lines + [
        f"- **Recipe**: {c['optimizer']} (momentum {c['momentum']}, nesterov {c['nesterov']}), "
        f"lr {c['learning_rate']} with a `{c['schedule']}` schedule, weight decay "
        f"{c['weight_decay']}, label smoothing {c.get('label_smoothing', 0.0)}, batch "
        f"{c['batch_size']}, augmentation {augment}, "
        f"compute {c['compute_dtype']}, seed {meta.get('seed')}.",
        f"- **Length**: {meta['steps']} steps of {c['batch_size']}, {epochs:g} epochs.",
        f"- **Wall time**: {hours:.2f} h of training over every stop and resume (evaluations "
        f"included), on {len(meta.get('devices') or [])} device(s) "
        f"({', '.join(meta.get('devices') or [])}).",
        f"- **CPU time**: {_cpu_hours(meta)}.",
        f"- **Command**: `{meta.get('command', '')}` (the same command resumes after a stop).",
        f"- **Software**: {software}.",
    ]


def _history_table(meta: dict, epochs: float, hours: float) -> list[str]:
    """The epochs-to-accuracy curve: a row per periodic evaluation and the final one;
    none for a model trained without periodic evaluations."""
    history = meta.get("history") or []
    if not history:
        return []
    lines = [
        "",
        "Epochs to accuracy (test split, every evaluation):",
        "",
        "| epoch | test accuracy | train accuracy | training hours | CPU hours |",
        "|---|---|---|---|---|",
    ]
    for record in history:
        cpu = record.get("train_cpu_seconds")
        train = record.get("train_accuracy")  # none logged yet when a resume evaluates first
        lines.append(
            f"| {record['epoch']:g} | {100 * record['test_accuracy']:.2f}% | "
            f"{'-' if train is None else f'{100 * train:.2f}%'} | "
            f"{record['train_seconds'] / 3600:.2f} | "
            f"{'-' if cpu is None else f'{cpu / 3600:.2f}'} |"
        )
    final = meta.get("accuracies", {}).get("test")
    if final:
        cpu = meta.get("train_cpu_s")
        lines.append(
            f"| {epochs:g} (final) | {100 * final['accuracy']:.2f}% | - | {hours:.2f} | "
            f"{'-' if cpu is None else f'{cpu / 3600:.2f}'} |"
        )
    return lines
