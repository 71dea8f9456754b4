"""The gap between the paper's one-pixel success rates and ours, one factor at a time.

For each model: its accuracy on the exact CIFAR-10 test images and on the JPEG test
set, and, on the images its attack runs saw, the clean probability of the true class
and the logit margin (the true class's logit minus the largest other one). For each
run: the images it fooled. Then one row per factor: the difference in share fooled
between a condition nearer the paper's (Su et al. 2019) and ours, in points.

Intervals, all 95%:
- a share: Wilson's score interval;
- a difference on the same images (two searches, two protocols): Newcombe's hybrid
  score interval for paired proportions (Newcombe 1998, Stat. Med. 17:2635, method 10);
- a difference between two models: each model is attacked on its own first 100
  correctly classified images, so the samples are unpaired: Newcombe's hybrid score
  interval for independent proportions (Newcombe 1998, Stat. Med. 17:873, method 10).

The measurements (`measure_model`, `factor_rows`) are kept apart from their tables and
plots (`write_report`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

import jax
import numpy as np

from opa_jax import charts, data, metrics, report, train_data
from opa_jax.errors import InputError
from opa_jax.models import load_model

# Su et al., first arXiv abstract: share of Kaggle CIFAR-10 test images fooled, 1 pixel.
PAPER_RATES = {"nin": 0.7166, "allconv": 0.6871, "vgg16": 0.6353}
# Model-against-model factors: (factor, the model nearer the paper's, ours, what it is).
# `nin_other_images` is the shipped NiN under another name, attacked on other images: the
# paper drew its images at random, ours are the first correctly classified ones.
MODEL_FACTORS = (
    ("label smoothing", "nin_no_smoothing", "nin", "NiN trained with label_smoothing=0"),
    ("paper recipe", "nin_plain", "nin", "NiN trained as Lin et al.: dropout, no batch norm"),
    ("crops and flips", "nin_plain_noaug", "nin_plain", "NiN as Lin et al., without crops, flips"),
    ("images", "nin_other_images", "nin", "the same NiN on images drawn at random from the rest"),
)
NUM_MARGIN_BINS = 5


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """A model to measure: a short name, its spec, and the attack workdirs run on it."""

    name: str
    spec: str
    workdirs: tuple[str, ...] = ()


def parse_entries(models: Sequence[str], runs: Sequence[str]) -> list[ModelEntry]:
    """Entries from `NAME:SPEC` (e.g. `nin:ckpt:checkpoints/cifar10/nin`) and
    `NAME:DIR[,DIR...]` strings; a name may take runs more than once."""
    specs = {}
    for text in models:
        name, _, spec = text.partition(":")
        if not name or not spec:
            raise InputError(f"--model={text!r}: expected NAME:SPEC, e.g. nin:ckpt:PATH")
        if name in specs:
            raise InputError(f"--model: the name {name!r} is given twice")
        specs[name] = spec
    workdirs = {name: [] for name in specs}
    for text in runs:
        name, _, dirs = text.partition(":")
        if name not in specs:
            raise InputError(f"--runs={text!r}: no --model is named {name!r}")
        workdirs[name] += [d for d in dirs.split(",") if d]
    return [ModelEntry(name, specs[name], tuple(workdirs[name])) for name in specs]


# ---------------------------------------------------------------------------
# Intervals.


def unpaired_difference_interval(
    successes_a: int, trials_a: int, successes_b: int, trials_b: int, z: float = metrics.Z_95
) -> tuple[float, float]:
    """Newcombe's hybrid score interval of p_a - p_b for independent samples (method 10):
    each side's Wilson interval, squared and added."""
    p_a, p_b = successes_a / trials_a, successes_b / trials_b
    low_a, high_a = metrics.wilson_interval(successes_a, trials_a, z)
    low_b, high_b = metrics.wilson_interval(successes_b, trials_b, z)
    difference = p_a - p_b
    lower = difference - math.hypot(p_a - low_a, high_b - p_b)
    upper = difference + math.hypot(high_a - p_a, p_b - low_b)
    return max(-1.0, lower), min(1.0, upper)


def paired_difference_interval(
    both: int, only_a: int, only_b: int, neither: int, z: float = metrics.Z_95
) -> tuple[float, float]:
    """Newcombe's hybrid score interval of p_a - p_b on paired data (method 10): the
    Wilson intervals of the two marginal shares, combined with their correlation phi,
    whose numerator (both * neither - only_a * only_b) is shrunk by n/2 towards 0 when
    positive, as Newcombe does."""
    n = both + only_a + only_b + neither
    if n == 0:
        return (-1.0, 1.0)
    p_a, p_b = (both + only_a) / n, (both + only_b) / n
    low_a, high_a = metrics.wilson_interval(both + only_a, n, z)
    low_b, high_b = metrics.wilson_interval(both + only_b, n, z)
    marginals = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    phi = 0.0
    if marginals > 0:
        cross = both * neither - only_a * only_b
        numerator = max(cross - n / 2, 0.0) if cross > 0 else cross
        phi = numerator / math.sqrt(marginals)
    da, db = p_a - low_a, high_b - p_b
    lower = p_a - p_b - math.sqrt(max(0.0, da * da - 2 * phi * da * db + db * db))
    ua, lb = high_a - p_a, p_b - low_b
    upper = p_a - p_b + math.sqrt(max(0.0, ua * ua - 2 * phi * ua * lb + lb * lb))
    return max(-1.0, lower), min(1.0, upper)


# ---------------------------------------------------------------------------
# Runs.


@dataclasses.dataclass
class RunOutcome:
    """What one attack run did to each image it attacked."""

    workdir: str
    kind: str  # de | de_targeted | exhaustive | other
    method: str  # as the report names it, e.g. "DE (paper, 400x100)"
    fooled: dict[int, bool]  # image -> fooled (targeted runs: pushed to >= 1 target)
    classes_reached: dict[int, int]  # image -> classes reached (complete searches, targeted)
    complete: bool  # every record an exhaustive search over its whole grid
    planned_images: int | None  # the config's num_images (None: all)
    targets_per_image: float | None  # targeted runs: mean targets attacked per image
    preferred: bool  # DE with the paper preset; the exhaustive search over corner colours
    clean: dict[int, tuple[int, list]]  # image -> (true label, recorded clean probabilities)

    @property
    def images(self) -> int:
        return len(self.fooled)

    @property
    def fooled_count(self) -> int:
        return sum(self.fooled.values())

    @property
    def partial(self) -> bool:
        return self.planned_images is not None and self.images < self.planned_images


def _run_kind(config: dict) -> str:
    if config.get("pixels") != 1:
        return "other"
    if config["method"] == "de":
        return "de_targeted" if config["targeted"] else "de"
    if config["method"] == "exhaustive" and not config["targeted"]:
        return "exhaustive"
    return "other"


def read_run(workdir: str) -> RunOutcome:
    """A workdir's outcome per image (every host's records, a running run's so far)."""
    if not os.path.isdir(workdir):
        raise InputError(f"run {workdir!r}: no such workdir")
    run = report.load_run_results(workdir)
    kind = _run_kind(run.config)
    fooled, reached, attempts, clean = {}, {}, {}, {}
    for record in run.records:
        image = record["image"]
        clean[image] = (record["true_label"], record["clean_probs"])
        fooled[image] = fooled.get(image, False) or bool(record["success"])
        attempts[image] = attempts.get(image, 0) + 1
    for image, labels in run.tally.reached.items():
        reached[image] = len(labels)
    complete = bool(run.records) and all(r.get("search_complete") for r in run.records)
    if kind == "de_targeted" or complete:
        reached = {image: reached.get(image, 0) for image in fooled}
    else:
        reached = {}
    colours = run.config.get("exhaustive", {}).get("colours", "corners")
    preset = run.config.get("de", {}).get("preset")
    return RunOutcome(
        workdir=workdir,
        kind=kind,
        method=run.method,
        fooled=fooled,
        classes_reached=reached,
        complete=complete,
        planned_images=run.config.get("num_images") or None,
        targets_per_image=float(np.mean(list(attempts.values())))
        if kind == "de_targeted" and attempts
        else None,
        preferred=colours == "corners" if kind == "exhaustive" else preset == "paper",
        clean=clean,
    )


def best_run(runs: Sequence[RunOutcome], kind: str) -> RunOutcome | None:
    """The run of `kind` that measures most: the paper's DE preset or the corner colours
    first, then the most images, then a complete search."""
    found = [r for r in runs if r.kind == kind and r.images]
    if not found:
        return None
    return max(found, key=lambda r: (r.preferred, r.images, r.complete))


# ---------------------------------------------------------------------------
# Models.


@dataclasses.dataclass
class ModelMeasures:
    """One model's accuracies, clean confidence on its attacked images, and runs."""

    name: str
    spec: str
    num_classes: int
    exact: tuple[int, int]  # (correct, images)
    jpeg: tuple[int, int] | None  # None: the JPEG test set is absent
    images: np.ndarray  # [n] the attacked images' dataset indices
    p_true: np.ndarray  # [n] clean probability of the true class
    margin: np.ndarray  # [n] true logit minus the largest other logit
    record_prob_diff: float  # max |recomputed - recorded| clean probability
    runs: list[RunOutcome]

    def fooled_for_plot(self) -> tuple[RunOutcome | None, str]:
        """The run behind the margin plot: the exhaustive search when it covers at least
        the images DE does, else DE."""
        de, exhaustive = best_run(self.runs, "de"), best_run(self.runs, "exhaustive")
        if exhaustive and (de is None or exhaustive.images >= de.images):
            return exhaustive, "exhaustive"
        return de, "DE"


def logits_of(model, images: np.ndarray, batch_size: int = 250) -> np.ndarray:
    """Logits [N, C] of uint8 images [N, H, W, 3], in fixed-size batches (the last one
    padded) so the forward pass compiles once."""
    forward = jax.jit(model.apply_fn)
    out = []
    for start in range(0, len(images), batch_size):
        batch = np.asarray(images[start : start + batch_size], np.float32)
        count = len(batch)
        if count < batch_size:
            padding = np.zeros((batch_size - count, *batch.shape[1:]), np.float32)
            batch = np.concatenate([batch, padding])
        out.append(np.asarray(forward(model.params, batch))[:count])
    if not out:
        return np.zeros((0, model.num_classes), np.float32)
    return np.concatenate(out)


def _softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(-1, keepdims=True))
    return exp / exp.sum(-1, keepdims=True)


def _margins(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(p(true), true logit minus the largest other logit) per row."""
    probs = _softmax(logits)
    rows = np.arange(len(labels))
    others = logits.copy()
    others[rows, labels] = -np.inf
    return probs[rows, labels], logits[rows, labels] - others.max(-1)


def _attacked_images(runs: Sequence[RunOutcome]) -> list[int]:
    """The images of the non-targeted one-pixel runs (all runs' when there are none)."""
    main = [r for r in runs if r.kind in ("de", "exhaustive")] or list(runs)
    return sorted({image for r in main for image in r.fooled})


def measure_model(entry: ModelEntry, exact: data.Dataset, jpeg, batch_size: int = 250):
    """A model's `ModelMeasures`: `exact` is the exact test set, `jpeg` (images uint8
    [N, H, W, 3], labels [N]) the JPEG test set or None."""
    model = load_model(entry.spec)
    runs = [read_run(w) for w in entry.workdirs]
    exact_images = exact.read(range(len(exact)))
    exact_logits = logits_of(model, exact_images, batch_size)
    exact_correct = int((exact_logits.argmax(-1) == exact.labels).sum())
    jpeg_result = None
    if jpeg is not None:
        jpeg_logits = logits_of(model, jpeg[0], batch_size)
        jpeg_result = (int((jpeg_logits.argmax(-1) == jpeg[1]).sum()), len(jpeg[1]))
    images = _attacked_images(runs)
    missing = sorted({i for r in runs for i in r.fooled} - set(exact.position_of))
    if missing:
        raise InputError(
            f"model {entry.name}: the runs attacked images {missing[:5]} that are not in "
            f"{exact.name}; give the data the runs read (--exact_data)"
        )
    positions = np.asarray([exact.position_of[i] for i in images], np.int64)
    labels = exact.labels[positions]
    p_true, margin = _margins(exact_logits[positions], labels)
    return ModelMeasures(
        name=entry.name,
        spec=entry.spec,
        num_classes=model.num_classes,
        exact=(exact_correct, len(exact)),
        jpeg=jpeg_result,
        images=np.asarray(images, np.int64),
        p_true=p_true,
        margin=margin,
        record_prob_diff=_record_prob_diff(runs, exact, exact_logits),
        runs=runs,
    )


def _record_prob_diff(runs, exact: data.Dataset, logits: np.ndarray) -> float:
    """The largest difference between a record's clean probabilities and the model's
    here: a check that the runs attacked these images with this model."""
    probs = _softmax(logits)
    largest = 0.0
    for run in runs:
        for image, (true_label, clean_probs) in run.clean.items():
            position = exact.position_of[image]
            if true_label != exact.labels[position]:
                raise InputError(
                    f"run {run.workdir}: image {image} has true label {true_label}, but "
                    f"{exact.name} says {exact.labels[position]}"
                )
            diff = np.abs(np.asarray(clean_probs) - probs[position]).max()
            largest = max(largest, float(diff))
    return largest


def load_test_images(spec: str, image_shape, cache_dir: str = ""):
    """(images uint8 [N, H, W, 3], labels [N]) of a test split, or None when its
    folder is absent."""
    kind, _, path = spec.partition(":")
    if kind == "folder" and not os.path.isdir(path):
        return None
    images, labels, _ = train_data.load_split(spec, "test", tuple(image_shape), cache_dir)
    return images, labels


# ---------------------------------------------------------------------------
# Factors.


@dataclasses.dataclass(frozen=True)
class FactorRow:
    """One factor of the gap: share fooled nearer the paper's condition (a) minus ours (b)."""

    factor: str
    model: str
    comparison: str  # "a vs b"
    images: str = "-"
    share_a: float | None = None
    share_b: float | None = None
    interval: tuple[float, float] | None = None
    interval_method: str = ""
    note: str = ""

    @property
    def points(self) -> float | None:
        if self.share_a is None:
            return None
        return 100 * (self.share_a - self.share_b)


def not_measured(factor: str, model: str, comparison: str, needs: str) -> FactorRow:
    return FactorRow(factor, model, comparison, note=f"not measured: needs {needs}")


def paired_row(factor, model, comparison, fooled_a: dict, fooled_b: dict, note="") -> FactorRow:
    """The difference on the images both conditions attacked, with Newcombe's paired
    interval."""
    common = sorted(set(fooled_a) & set(fooled_b))
    if not common:
        return not_measured(factor, model, comparison, "runs on the same images")
    a = np.asarray([fooled_a[i] for i in common], bool)
    b = np.asarray([fooled_b[i] for i in common], bool)
    counts = [int((a & b).sum()), int((a & ~b).sum()), int((~a & b).sum()), int((~a & ~b).sum())]
    return FactorRow(
        factor,
        model,
        comparison,
        images=f"{len(common)}, paired",
        share_a=float(a.mean()),
        share_b=float(b.mean()),
        interval=paired_difference_interval(*counts),
        interval_method="Newcombe paired (method 10)",
        note=note or f"fooled by both {counts[0]}, a only {counts[1]}, b only {counts[2]}",
    )


def search_row(m: ModelMeasures) -> FactorRow:
    """The exhaustive one-pixel search (corner colours) against the paper's DE."""
    de, exhaustive = best_run(m.runs, "de"), best_run(m.runs, "exhaustive")
    comparison = "exhaustive search vs DE, non-targeted"
    if de is None or exhaustive is None:
        need = "an exhaustive one-pixel run" if exhaustive is None else "a one-pixel DE run"
        return not_measured("search", m.name, comparison, f"{need} of {m.name}")
    comparison = f"{exhaustive.method} vs {de.method}"
    return paired_row("search", m.name, comparison, exhaustive.fooled, de.fooled)


def protocol_rows(m: ModelMeasures) -> list[FactorRow]:
    """At least one of the other classes reached against non-targeted: from a complete
    exhaustive search (equal by construction) and from targeted DE runs."""
    others = m.num_classes - 1
    complete = [r for r in m.runs if r.kind == "exhaustive" and r.complete]
    comparison = f">= 1 of {others} classes reached vs non-targeted, exhaustive"
    if complete:
        run = max(complete, key=lambda r: (r.preferred, r.images))
        reached = {i: n > 0 for i, n in run.classes_reached.items()}
        note = (
            "equal by construction: a non-targeted exhaustive search reaches a class "
            "exactly when it fools"
        )
        rows = [paired_row("protocol", m.name, comparison, reached, run.fooled, note)]
    else:
        rows = [not_measured("protocol", m.name, comparison, "an exhaustive run with stop=none")]
    de, targeted = best_run(m.runs, "de"), best_run(m.runs, "de_targeted")
    comparison = f"pushed to >= 1 of {others} targets (targeted DE) vs non-targeted DE"
    if de is None or targeted is None:
        need = "a targeted" if targeted is None else "a non-targeted"
        rows.append(not_measured("protocol (DE)", m.name, comparison, f"{need} DE run"))
    else:
        rows.append(paired_row("protocol (DE)", m.name, comparison, targeted.fooled, de.fooled))
    return rows


def model_factor_row(factor, name_a, name_b, what, by_name: dict) -> FactorRow:
    """Model a against model b, each on its own images (unpaired), by the exhaustive
    search where both have one, else by DE."""
    models = f"{name_a} vs {name_b}"
    if name_a not in by_name or name_b not in by_name:
        absent = name_a if name_a not in by_name else name_b
        needs = f"a model named {absent} (--model={absent}:SPEC) and its attack runs"
        return not_measured(factor, models, what, needs)
    a, b = by_name[name_a], by_name[name_b]
    searches = (("exhaustive", "exhaustive search"), ("de", "DE"))
    found = [(label, best_run(a.runs, kind), best_run(b.runs, kind)) for kind, label in searches]
    found = [(label, run_a, run_b) for label, run_a, run_b in found if run_a and run_b]
    if not found:
        return not_measured(factor, models, what, "the same one-pixel search run on both")
    label, run_a, run_b = found[0]
    return FactorRow(
        factor,
        models,
        f"{what}; {label}, each model on its own images",
        images=f"{run_a.images} vs {run_b.images}, unpaired",
        share_a=run_a.fooled_count / run_a.images,
        share_b=run_b.fooled_count / run_b.images,
        interval=unpaired_difference_interval(
            run_a.fooled_count, run_a.images, run_b.fooled_count, run_b.images
        ),
        interval_method="Newcombe independent (method 10)",
    )


def factor_rows(measures: Sequence[ModelMeasures], model_factors=MODEL_FACTORS):
    """Every factor's row: search and protocol per model, then the model factors."""
    rows = []
    for m in measures:
        rows += [search_row(m), *protocol_rows(m)]
    by_name = {m.name: m for m in measures}
    rows += [model_factor_row(*factor, by_name) for factor in model_factors]
    return rows


def margin_bins(measures: Sequence[ModelMeasures], num_bins: int = NUM_MARGIN_BINS):
    """Bin edges [B + 1] at quantiles of every model's attacked images' margins, pooled,
    so that each model's line has the same bins."""
    pooled = np.concatenate([m.margin for m in measures if len(m.margin)] or [np.zeros(1)])
    edges = np.unique(np.quantile(pooled, np.linspace(0, 1, num_bins + 1)))
    return edges if len(edges) > 1 else np.array([edges[0], edges[0] + 1.0])


def fooled_by_margin(m: ModelMeasures, edges: np.ndarray):
    """Per bin: (images, fooled, mean margin) by the run behind the plot."""
    run, _ = m.fooled_for_plot()
    bins = []
    if run is None:
        return bins
    keep = np.asarray([int(i) in run.fooled for i in m.images], bool)
    margin = m.margin[keep]
    fooled = np.asarray([run.fooled[int(i)] for i in m.images[keep]], bool)
    which = np.clip(np.searchsorted(edges, margin, side="right") - 1, 0, len(edges) - 2)
    for b in range(len(edges) - 1):
        inside = which == b
        mean = float(margin[inside].mean()) if inside.any() else float("nan")
        bins.append((int(inside.sum()), int(fooled[inside].sum()), mean))
    return bins


# ---------------------------------------------------------------------------
# Tables and plots.


def share_cell(count: int, total: int) -> str:
    """`count/total (share, 95% Wilson interval)`."""
    if not total:
        return "-"
    low, high = metrics.wilson_interval(count, total)
    return f"{count}/{total} ({100 * count / total:.1f}%, 95% {100 * low:.1f}-{100 * high:.1f}%)"


def _quartiles(values: np.ndarray, digits: int) -> str:
    if not len(values):
        return "-"
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return f"{median:.{digits}f} [{q1:.{digits}f}, {q3:.{digits}f}]"


def model_table(measures: Sequence[ModelMeasures]) -> str:
    header = [
        "model",
        "spec",
        "accuracy, exact test images",
        "accuracy, JPEG test set",
        "attacked images",
        "clean p(true): median [quartiles]",
        "logit margin: median [quartiles]",
        "records vs model (max prob. diff.)",
    ]
    rows = [
        [
            m.name,
            f"`{m.spec}`",
            share_cell(*m.exact),
            share_cell(*m.jpeg) if m.jpeg else "not measured: JPEG test set absent",
            str(len(m.images)),
            _quartiles(m.p_true, 4),
            _quartiles(m.margin, 2),
            f"{m.record_prob_diff:.1e}",
        ]
        for m in measures
    ]
    return charts.table(header, rows)


def run_table(measures: Sequence[ModelMeasures]) -> str:
    header = ["model", "run", "method", "images", "fooled", ">= 1 other class reached"]
    header.append("classes reached (mean over fooled)")
    rows = []
    for m in measures:
        for run in m.runs:
            images = str(run.images) + (
                f" (of {run.planned_images}, so far)" if run.partial else ""
            )
            fooled = share_cell(run.fooled_count, run.images)
            reached, mean = "-", "-"
            if run.classes_reached:
                reached = f"{fooled} = fooled" if run.kind == "exhaustive" else fooled
                counts = [n for n in run.classes_reached.values() if n]
                mean = f"{np.mean(counts):.2f}" if counts else "-"
            if run.kind == "de_targeted":
                fooled = "- (targeted)"
                images += f" x {run.targets_per_image:g} targets"
            rows.append([m.name, f"`{run.workdir}`", run.method, images, fooled, reached, mean])
    return charts.table(header, rows)


def gap_table(measures: Sequence[ModelMeasures], paper_rates=PAPER_RATES) -> str:
    """The paper's share fooled against ours (DE and the exhaustive search)."""
    header = ["model", "paper", "ours, DE", "gap (points)", "ours, exhaustive search", "gap"]
    rows = []
    for m in measures:
        paper = paper_rates.get(m.name)
        cells = [m.name, "-" if paper is None else f"{100 * paper:.2f}%"]
        for kind in ("de", "exhaustive"):
            run = best_run(m.runs, kind)
            share = run.fooled_count / run.images if run else None
            cells.append(share_cell(run.fooled_count, run.images) if run else "-")
            gap = "-" if share is None or paper is None else f"{100 * (paper - share):.1f}"
            cells.append(gap)
        rows.append(cells)
    return charts.table(header, rows)


def factor_table(rows: Sequence[FactorRow]) -> str:
    header = ["factor", "model", "comparison (a vs b)", "images", "a fooled", "b fooled"]
    header += ["points of the gap it explains (a - b)", "95% interval", "interval", "note"]
    lines = []
    for row in rows:
        if row.share_a is None:
            lines.append([row.factor, row.model, row.comparison, *"-----", "-", row.note])
            continue
        low, high = row.interval
        lines.append(
            [
                row.factor,
                row.model,
                row.comparison,
                row.images,
                f"{100 * row.share_a:.1f}%",
                f"{100 * row.share_b:.1f}%",
                f"{row.points:+.1f}",
                f"{100 * low:+.1f} to {100 * high:+.1f}",
                row.interval_method,
                row.note,
            ]
        )
    return charts.table(header, lines)


def margin_table(measures: Sequence[ModelMeasures], edges: np.ndarray) -> str:
    header = ["model (run)"] + [
        f"margin {low:.2f}-{high:.2f}" for low, high in zip(edges[:-1], edges[1:], strict=True)
    ]
    rows = []
    for m in measures:
        run, label = m.fooled_for_plot()
        if run is None:
            continue
        cells = [f"{fooled}/{n}" if n else "-" for n, fooled, _ in fooled_by_margin(m, edges)]
        rows.append([f"{m.name} ({label})", *cells])
    return charts.table(header, rows)


def plot_fooled_by_margin(measures: Sequence[ModelMeasures], edges: np.ndarray, path: str):
    """Share fooled against clean logit margin, binned, one line per model, with 95%
    Wilson intervals."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    for m in measures:
        run, label = m.fooled_for_plot()
        points = [(x, f, n) for n, f, x in fooled_by_margin(m, edges) if n] if run else []
        if not points:
            continue
        x = np.asarray([p[0] for p in points])
        share = np.asarray([100 * f / n for _, f, n in points])
        bounds = np.asarray([metrics.wilson_interval(f, n) for _, f, n in points]) * 100
        error = np.stack([share - bounds[:, 0], bounds[:, 1] - share])
        ax.errorbar(x, share, yerr=error, marker="o", capsize=3, label=f"{m.name} ({label})")
    for edge in edges[1:-1]:
        ax.axvline(edge, color="0.85", linewidth=0.8, zorder=0)
    ax.set_xlabel("clean logit margin (true logit minus the largest other)")
    ax.set_ylabel("% of images fooled (1 pixel)")
    ax.set_ylim(-3, 103)
    ax.set_title("Share fooled by clean margin (bins: pooled quantiles)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    charts.save(fig, path)


def plot_margins(measures: Sequence[ModelMeasures], path: str):
    """The distributions of the clean logit margin and p(true) over the attacked
    images, as cumulative shares, one line per model."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(8.0, 3.4))
    for m in measures:
        if not len(m.margin):
            continue
        share = np.arange(1, len(m.margin) + 1) / len(m.margin) * 100
        left.step(np.sort(m.margin), share, where="post", label=m.name)
        right.step(np.sort(m.p_true), share, where="post", label=m.name)
    left.set_xlabel("clean logit margin")
    right.set_xlabel("clean p(true class)")
    left.set_ylabel("% of attacked images at or below")
    for ax in (left, right):
        ax.set_ylim(0, 101)
        ax.grid(color="0.9")
    left.legend(fontsize=8)
    fig.suptitle("Clean confidence on the attacked images", fontsize=10)
    fig.tight_layout()
    charts.save(fig, path)


def write_report(measures: Sequence[ModelMeasures], out: str, command: str = "") -> str:
    """Writes `out/paper_gap.md` and its two figures; returns the Markdown's path."""
    import matplotlib

    from opa_jax import provenance

    matplotlib.use("Agg")
    os.makedirs(out, exist_ok=True)
    edges = margin_bins(measures)
    plot_fooled_by_margin(measures, edges, os.path.join(out, "fooled_by_margin.png"))
    plot_margins(measures, os.path.join(out, "margins.png"))
    machine = f"{provenance.cpu_model()}, {os.cpu_count()} cores, JAX {jax.__version__}"
    lines = [
        "# The paper's one-pixel figures and ours, factor by factor",
        "",
        f"Made by `{command}` on {machine}." if command else f"Made on {machine}.",
        "",
        *_text(measures, edges),
    ]
    path = os.path.join(out, "paper_gap.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _text(measures: Sequence[ModelMeasures], edges: np.ndarray) -> list[str]:
    """The Markdown's sections below its heading."""
    return [
        "## Models",
        "",
        "Accuracy: a float32 forward pass of the stored weights over every image, with "
        "95% Wilson intervals. On the attacked images (each model's own): the clean "
        "probability of the true class and the logit margin, the true class's logit "
        "minus the largest other one. The last column compares the clean probabilities "
        "the runs recorded with this pass: a check that the runs attacked these images "
        "with this model.",
        "",
        model_table(measures),
        "",
        "## Runs",
        "",
        "Images fooled, with 95% Wilson intervals. A complete exhaustive search "
        "(`stop=none`) knows every class an image can be pushed to: it reaches at least "
        "one of the other classes exactly when it fools, so the paper's protocol and "
        "the non-targeted count are one number there. A targeted run counts an image "
        "when it was pushed to at least one of its target classes.",
        "",
        run_table(measures),
        "",
        "## The gap",
        "",
        "The paper's share fooled (Su et al., first arXiv abstract: 1 pixel, Kaggle "
        "CIFAR-10 test images) against ours, and the points between them.",
        "",
        gap_table(measures),
        "",
        "## Factors",
        "",
        "Each row: the share fooled under a condition nearer the paper's (a) minus ours "
        "(b), in points. The same images: Newcombe's hybrid score interval for paired "
        "proportions (Newcombe 1998, Stat. Med. 17:2635, method 10). Two models: each "
        "is attacked on its own first correctly classified images, so the samples are "
        "unpaired: Newcombe's interval for independent proportions (Stat. Med. 17:873, "
        "method 10).",
        "",
        factor_table(factor_rows(measures)),
        "",
        "## Share fooled against clean margin",
        "",
        "![Share fooled by clean margin](fooled_by_margin.png)",
        "",
        "Images fooled per margin bin (bin edges: quantiles of every model's margins, "
        "pooled; the exhaustive search where it covers the DE run's images, else DE):",
        "",
        margin_table(measures, edges),
        "",
        "## Clean margins",
        "",
        "![Clean margins](margins.png)",
    ]


def measure_all(
    entries: Sequence[ModelEntry],
    exact_spec: str,
    jpeg_spec: str = "",
    cache_dir: str = "",
    batch_size: int = 250,
) -> list[ModelMeasures]:
    """Every entry's `ModelMeasures`; the test sets are read once for all models."""
    if not entries:
        raise InputError("no models given (--model=NAME:SPEC)")
    exact = data.load_dataset(exact_spec, "test")
    image_shape = exact.read([0]).shape[1:]
    jpeg = load_test_images(jpeg_spec, image_shape, cache_dir) if jpeg_spec else None
    return [measure_model(entry, exact, jpeg, batch_size) for entry in entries]
