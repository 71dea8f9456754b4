"""Reports over attack workdirs: `report.md` with the paper's tables, and PNG figures.

Each workdir is read from its `config.json` and every host's `results*.jsonl`
(merged), so a report also covers a run that is still going or was killed.
The measurements are `metrics.Tally`'s (Su et al. 2019, Sec. IV-C): success
rate, confidence, number of target classes, class pairs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

from opa_jax import charts, data, de, metrics, report_search
from opa_jax import workdir as workdir_lib
from opa_jax.errors import InputError

MAX_LABELLED_CLASSES = 20  # more classes than this: plots show the ones that occur


@dataclasses.dataclass
class RunResults:
    """One attack run's config, records and tally, read from its workdir."""

    workdir: str
    name: str
    config: dict
    records: list[dict]
    tally: metrics.Tally
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int] | None  # the model's input, when the summary says

    @property
    def model(self) -> str:
        """A short model name: 'keras:.../lenet.h5' -> 'lenet'."""
        kind, _, arg = self.config["model"].partition(":")
        name = os.path.splitext(os.path.basename(arg.rstrip("/")))[0]
        return f"{name} (random init)" if kind == "random" else name

    @property
    def mode(self) -> str:
        return "targeted" if self.config["targeted"] else "non-targeted"

    @property
    def method(self) -> str:
        if self.config["method"] == "fgsm":
            return f"FGSM (eps {self.config['fgsm']['epsilon']:g})"
        searched = report_search.method_name(self.config)
        if searched:
            return searched
        settings = self.config["de"]
        preset = settings["preset"]
        budget = {
            k: settings.get(k) or de.PRESETS.get(preset, {}).get(k)
            for k in ("popsize", "generations")
        }
        size = f"{budget['popsize']}x{budget['generations']}"
        return f"random search ({size})" if preset == "random" else f"DE ({preset}, {size})"

    @property
    def pixels(self) -> int | None:
        if self.config["method"] in ("fgsm", "min_pixels"):  # no one pixel count
            return None
        return int(self.config["pixels"])


def _unique_names(workdirs: Sequence[str]) -> list[str]:
    names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
    if len(set(names)) == len(names):
        return names
    return [os.path.normpath(w).strip(os.sep).replace(os.sep, "_") for w in workdirs]


def _file_name(prefix: str, run: RunResults) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run.name)
    return f"{prefix}_{safe}.png"


def load_run_results(workdir: str, name: str | None = None) -> RunResults:
    """Reads a workdir; every host's results are merged."""
    config_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(config_path):
        raise InputError(f"workdir {workdir!r}: no config.json, so not an attack workdir")
    with open(config_path) as f:
        config = json.load(f)
    records = workdir_lib.read_all_results(workdir)
    summary = {}
    if os.path.isfile(os.path.join(workdir, "summary.json")):
        with open(os.path.join(workdir, "summary.json")) as f:
            summary = json.load(f)
    if records:
        num_classes = len(records[0]["clean_probs"])
    elif summary.get("adv_label_counts"):
        num_classes = len(summary["adv_label_counts"])
    else:
        num_classes = 0
    class_names = tuple(summary.get("class_names") or ())
    if len(class_names) != num_classes:
        class_names = tuple(str(c) for c in range(num_classes))
    image_shape = summary.get("image_shape")
    return RunResults(
        workdir=workdir,
        name=name or os.path.basename(os.path.normpath(workdir)),
        config=config,
        records=records,
        tally=workdir_lib.read_tally(workdir, num_classes),
        class_names=class_names,
        image_shape=tuple(image_shape) if image_shape else None,
    )


# ---------------------------------------------------------------------------
# Tables.


def summary_table(runs: Sequence[RunResults]) -> str:
    """One row per run, in the form of the paper's Table 2 (success rate over attacks:
    images, or image-target pairs when targeted; confidence over successes)."""
    header = [
        "run",
        "model",
        "pixels",
        "mode",
        "method",
        "images",
        "attacks",
        "success rate",
        "confidence",
        "images with >= 1 success",
        "mean queries",
        "mean queries (successes)",
    ]
    rows = []
    for run in runs:
        s = run.tally.summary()
        rows.append(
            [
                run.name,
                run.model,
                "-" if run.pixels is None else str(run.pixels),
                run.mode,
                run.method,
                str(s["images"]),
                str(s["attacks"]),
                charts.percent(s["success_rate"]),
                charts.percent(s["confidence"]),
                charts.percent(s["images_fooled_rate"]) if s["images"] else "-",
                f"{s['mean_queries']:.0f}",
                f"{s['mean_queries_success']:.0f}",
            ]
        )
    return charts.table(header, rows)


def _interval(values) -> str:
    return f"{100 * values[0]:.1f}-{100 * values[1]:.1f}%"


def interval_table(runs: Sequence[RunResults]) -> str:
    """95% intervals, one row per run: Wilson intervals of the success rate (over attacks)
    and of the share of images fooled, and a normal interval of the mean confidence."""
    header = [
        "run",
        "success rate",
        "95% interval",
        "confidence",
        "95% interval",
        "images with >= 1 success",
        "95% interval",
    ]
    rows = []
    for run in runs:
        s = run.tally.summary()
        rows.append(
            [
                run.name,
                charts.percent(s["success_rate"]),
                _interval(s["success_rate_ci95"]),
                charts.percent(s["confidence"]) if s["successes"] else "-",
                _interval(s["confidence_ci95"]) if s["successes"] > 1 else "-",
                f"{s['images_fooled']}/{s['images']}",
                _interval(s["images_fooled_rate_ci95"]),
            ]
        )
    return charts.table(header, rows)


def accuracy_table(runs: Sequence[RunResults]) -> str | None:
    """Clean and robust accuracy over the images each run considered (RobustBench's and
    AutoAttack's definitions, `opa_jax.metrics`), with Wilson intervals; None when no
    run knows its images considered (runs from before run_info.json held them)."""
    header = [
        "run",
        "images considered",
        "clean accuracy",
        "95% interval",
        "robust accuracy",
        "95% interval",
        "success rate (attacks)",
    ]
    rows = []
    for run in runs:
        s = run.tally.summary()
        if not s["images_considered"]:
            continue
        robust = s["robust_images"] is not None
        rows.append(
            [
                run.name,
                str(s["images_considered"]),
                f"{charts.percent(s['clean_accuracy'])} ({s['clean_correct']})",
                _interval(s["clean_accuracy_ci95"]),
                f"{charts.percent(s['robust_accuracy'])} ({s['robust_images']})"
                if robust
                else "- (run not finished)",
                _interval(s["robust_accuracy_ci95"]) if robust else "-",
                charts.percent(s["success_rate"]),
            ]
        )
    return charts.table(header, rows) if rows else None


def pixel_table(runs: Sequence[RunResults]) -> str | None:
    """Success rate by pixel count, one row per model, mode and method (the paper's Table 3
    form); None unless some row has more than one pixel count."""
    groups: dict[tuple, dict[int, str]] = {}
    for run in runs:
        if run.pixels is not None and run.records:
            s = run.tally.summary()
            cell = f"{charts.percent(s['success_rate'])} ({s['attacks']})"
            groups.setdefault((run.model, run.mode, run.method), {})[run.pixels] = cell
    if not any(len(cells) > 1 for cells in groups.values()):
        return None
    pixel_counts = sorted({p for cells in groups.values() for p in cells})
    header = ["model", "mode", "method"] + [f"{p} px" for p in pixel_counts]
    rows = [
        [*key, *(cells.get(p, "-") for p in pixel_counts)] for key, cells in sorted(groups.items())
    ]
    return charts.table(header, rows)


def perturbation_size(run: RunResults, dataset=None) -> tuple[float | None, float | None]:
    """Mean number of changed pixels and mean L-inf change (0-255) over the records.

    FGSM records carry both. For DE the pixels written are known, and what they
    replaced is read from the dataset when it is given.
    """
    if not run.records:
        return None, None
    if all("l0_pixels" in r for r in run.records):
        return (
            float(np.mean([r["l0_pixels"] for r in run.records])),
            float(np.mean([r["linf"] for r in run.records])),
        )
    if dataset is None:
        return float(run.pixels), None
    changed, linf = [], []
    for record in run.records:
        original = dataset.read([dataset.position_of[record["image"]]])[0].astype(np.int64)
        adversarial = apply_perturbation(original, record["perturbation"])
        diff = np.abs(adversarial - original).max(-1)
        changed.append(int(np.sum(diff > 0)))
        linf.append(int(diff.max()))
    return float(np.mean(changed)), float(np.mean(linf))


def comparison_table(runs: Sequence[RunResults], datasets: dict) -> str | None:
    """DE vs random search vs FGSM, for each model and mode run with more than one method."""
    groups: dict[tuple, list[RunResults]] = {}
    for run in runs:
        groups.setdefault((run.model, run.mode), []).append(run)
    rows = []
    for (model, mode), group in groups.items():
        if len({run.method for run in group}) < 2:
            continue
        for run in sorted(group, key=lambda r: (r.config["method"], r.method, r.pixels or 0)):
            s = run.tally.summary()
            changed, linf = perturbation_size(run, datasets.get(run.name))
            rows.append(
                [
                    model,
                    mode,
                    run.method,
                    "-" if run.pixels is None else str(run.pixels),
                    str(s["attacks"]),
                    charts.percent(s["success_rate"]),
                    charts.percent(s["confidence"]),
                    f"{s['mean_queries']:.0f}",
                    "-" if changed is None else f"{changed:.1f}",
                    "-" if linf is None else f"{linf:.1f}",
                ]
            )
    if not rows:
        return None
    header = [
        "model",
        "mode",
        "method",
        "pixels",
        "attacks",
        "success rate",
        "confidence",
        "mean queries",
        "mean pixels changed",
        "mean L-inf (0-255)",
    ]
    return charts.table(header, rows)


# ---------------------------------------------------------------------------
# Images.


def apply_perturbation(image: np.ndarray, perturbation) -> np.ndarray:
    """Writes recorded pixels (x = row, y = column, then one value per channel: r, g, b,
    or v for grayscale) into a copy of the image."""
    adversarial = np.array(image, copy=True)
    for x, y, *rgb in perturbation:
        adversarial[int(x), int(y)] = np.asarray(rgb).astype(adversarial.dtype)
    return adversarial


def _existing_path(path: str, workdir: str) -> str | None:
    """A path from a run's config: as given, or relative to the directory the run
    started in (its run_info.json), or to the workdir."""
    started_in = workdir_lib.read_run_info(workdir).get("cwd", "")
    for candidate in (path, os.path.join(started_in, path), os.path.join(workdir, path)):
        if os.path.exists(candidate):
            return candidate
    return None


def open_dataset(run: RunResults):
    """The run's dataset, or None (with the reason) when it cannot be read here."""
    config = run.config
    # Each alternative of `folder:A|tfds:B` as the run read it: folders found here,
    # relative paths resolved as the run started; the first readable one is used.
    alternatives, missing = [], []
    for alternative in (part.strip() for part in config["data"].split("|")):
        kind, _, arg = alternative.partition(":")
        if kind == "folder":
            found = _existing_path(arg, run.workdir)
            if found is None:
                missing.append(arg)
                continue
            alternative = f"folder:{found}"
        alternatives.append(alternative)
    if not alternatives:
        return None, f"dataset folder {' or '.join(repr(m) for m in missing)} not found"
    spec = "|".join(alternatives)
    shape = run.image_shape
    if config.get("resize", "none") != "none" and shape is None:
        return None, "the images are resized, but the summary holds no model input shape"
    try:
        dataset = data.load_dataset(
            spec,
            config["split"],
            shape,  # the model's input, so the images come with its channels
            config.get("resize", "none"),
            config.get("data_dir") or None,
        )
    except InputError as e:
        return None, str(e)
    return dataset, None


def _short(name: str, length: int = 14) -> str:
    return name if len(name) <= length else name[: length - 1] + "."


def plot_examples(run: RunResults, dataset, path: str, max_examples: int = 6) -> bool:
    """Original and attacked images of successful attacks, the changed pixels circled."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle

    chosen, seen = [], set()
    successes = sorted(
        (r for r in run.records if r["success"] and r["perturbation"]),
        key=lambda r: (-r["adv_prob"], r["image"]),
    )
    for record in successes:
        if record["image"] not in seen:
            chosen.append(record)
            seen.add(record["image"])
        if len(chosen) == max_examples:
            break
    if not chosen:
        return False
    names = run.class_names
    fig, axes = plt.subplots(2, len(chosen), figsize=(2.0 * len(chosen), 5.2), squeeze=False)
    for column, record in enumerate(chosen):
        original = dataset.read([dataset.position_of[record["image"]]])[0]
        adversarial = apply_perturbation(original, record["perturbation"])
        true, adv = record["true_label"], record["adv_label"]
        top, bottom = axes[0, column], axes[1, column]
        top.imshow(charts.as_rgb(original), interpolation="nearest")
        top.set_title(
            f"image {record['image']}\n{_short(names[true])} "
            f"{100 * record['clean_probs'][true]:.0f}%",
            fontsize=9,
        )
        bottom.imshow(charts.as_rgb(adversarial), interpolation="nearest")
        bottom.set_xlabel(
            f"{_short(names[adv])} {100 * record['adv_prob']:.0f}%\n"
            f"({_short(names[true])} {100 * record['adv_probs'][true]:.0f}%)",
            fontsize=9,
        )
        radius = max(1.2, original.shape[0] / 24)
        for x, y, *_ in record["perturbation"]:
            bottom.add_patch(Circle((y, x), radius, fill=False, color="red", lw=1.5))
        for ax in (top, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("original", fontsize=10)
    axes[1, 0].set_ylabel("attacked", fontsize=10)
    if run.config["targeted"]:
        axes[1, 0].set_ylabel("attacked (to target)", fontsize=10)
    fig.suptitle(f"{run.name}: {run.model}, {run.pixels} px {run.mode}, {run.method}", fontsize=11)
    fig.tight_layout()
    charts.save(fig, path)
    return True


# ---------------------------------------------------------------------------
# Figures.


def _shown_classes(counts: np.ndarray) -> np.ndarray:
    """All classes, or (when there are many) those that occur, most frequent first."""
    if len(counts) <= MAX_LABELLED_CLASSES:
        return np.arange(len(counts))
    order = np.argsort(-counts, kind="stable")
    return np.sort(order[: min(MAX_LABELLED_CLASSES, max(1, int(np.sum(counts > 0))))])


def plot_pair_heatmap(run: RunResults, path: str, pairs=None, what="successful attacks") -> None:
    """Successful attacks (or `pairs`) by true class (rows) and adversarial class (columns)."""
    import matplotlib.pyplot as plt

    pairs = run.tally.pair_counts if pairs is None else np.asarray(pairs)
    shown = _shown_classes(pairs.sum(0) + pairs.sum(1))
    pairs = pairs[np.ix_(shown, shown)]
    labels = [_short(run.class_names[c]) for c in shown]
    size = 1.6 + 0.45 * len(shown)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    image = ax.imshow(pairs, cmap="Blues")
    peak = max(int(pairs.max()), 1)
    for i in range(len(shown)):
        for j in range(len(shown)):
            if pairs[i, j]:
                ax.text(
                    j,
                    i,
                    str(pairs[i, j]),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if pairs[i, j] > 0.6 * peak else "black",
                )
    ax.set_xticks(range(len(shown)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(shown)), labels, fontsize=8)
    ax.set_xlabel("adversarial class")
    ax.set_ylabel("true class")
    ax.set_title(f"{run.name}: {what}\n{run.model}, {run.mode}, {run.method}", fontsize=10)
    from matplotlib.ticker import MaxNLocator

    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, ticks=MaxNLocator(integer=True))
    fig.tight_layout()
    charts.save(fig, path)


def _annotate_bars(ax, bars, texts):
    for bar, text in zip(bars, texts, strict=True):
        if text:
            ax.annotate(
                text,
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
                xytext=(0, 1),
                textcoords="offset points",
            )


def plot_target_classes(runs: Sequence[RunResults], path: str) -> None:
    """Share of images perturbed to exactly n target classes (the paper's Fig. 3)."""
    import matplotlib.pyplot as plt

    num_classes = max(r.tally.num_classes for r in runs)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / len(runs)
    for k, run in enumerate(runs):
        counts = run.tally.num_target_classes()
        share = 100 * counts / max(counts.sum(), 1)
        x = np.arange(len(counts)) + (k - (len(runs) - 1) / 2) * width
        bars = ax.bar(x, share, width, label=f"{run.name} ({counts.sum()} images)")
        _annotate_bars(ax, bars, [f"{v:.0f}" if v else "" for v in share])
    ax.set_xticks(range(num_classes))
    ax.set_xlabel("number of target classes reached")
    ax.set_ylabel("% of images")
    ax.set_title("Targeted attacks: to how many classes can an image be pushed?", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    charts.save(fig, path)


def plot_success_by_pixels(runs: Sequence[RunResults], path: str) -> None:
    """Success rate against the number of pixels, one bar group per pixel count."""
    import matplotlib.pyplot as plt

    groups: dict[str, dict[int, float]] = {}
    for run in runs:
        label = f"{run.model}, {run.mode}, {run.method}"
        if run.pixels in groups.get(label, {}):  # two such runs: tell them apart
            label += f" [{run.name}]"
        groups.setdefault(label, {})[run.pixels] = run.tally.summary()["success_rate"]
    pixel_counts = sorted({p for g in groups.values() for p in g})
    labels = sorted(groups)
    colours = {label: f"C{k % 10}" for k, label in enumerate(labels)}
    widest = max(sum(p in groups[label] for label in labels) for p in pixel_counts)
    width = 0.8 / widest
    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 + 0.6 * len(pixel_counts) * widest), 4.2))
    for x, p in enumerate(pixel_counts):  # the bars at a pixel count, centred on its tick
        present = [label for label in labels if p in groups[label]]
        for k, label in enumerate(present):
            value = 100 * groups[label][p]
            bars = ax.bar(
                x + (k - (len(present) - 1) / 2) * width, value, width, color=colours[label]
            )
            _annotate_bars(ax, bars, [f"{value:.0f}%"])
    for label in labels:
        ax.bar([0], [0], 0, color=colours[label], label=label)  # one legend entry each
    ax.set_xticks(range(len(pixel_counts)), [f"{p} px" for p in pixel_counts])
    ax.set_ylabel("success rate (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Success rate by number of pixels", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=1, frameon=False)
    fig.tight_layout()
    charts.save(fig, path)


def plot_adv_labels(runs: Sequence[RunResults], path: str) -> None:
    """Which classes the successful attacks land in, as a share of each run's successes."""
    import matplotlib.pyplot as plt

    total = sum((r.tally.adv_label_counts for r in runs), np.zeros(runs[0].tally.num_classes))
    shown = _shown_classes(total)
    width_inches = max(6.0, 0.55 * len(shown) * max(1, len(runs) / 2)) + 2.5  # legend
    fig, ax = plt.subplots(figsize=(width_inches, 3.8))
    width = 0.8 / len(runs)
    for k, run in enumerate(runs):
        counts = run.tally.adv_label_counts[shown]
        share = 100 * counts / max(run.tally.successes, 1)
        x = np.arange(len(shown)) + (k - (len(runs) - 1) / 2) * width
        ax.bar(x, share, width, label=f"{run.name} ({run.tally.successes} successes)")
    ax.set_xticks(
        range(len(shown)),
        [_short(runs[0].class_names[c]) for c in shown],
        rotation=45,
        ha="right",
        fontsize=8,
    )
    ax.set_ylabel("% of successful attacks")
    ax.set_title("Adversarial class of successful attacks", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    charts.save(fig, path)


# ---------------------------------------------------------------------------
# The report.


def _search_sections(runs, datasets, out: str) -> list[str]:
    """The report's parts on complete exhaustive searches (classes reached, vulnerable
    pixels) and on minimum-pixels runs (share fooled against k)."""
    lines = []

    def figure(title: str, file_name: str, caption: str):
        lines.extend([f"### {title}", "", f"![{title}]({file_name})", "", caption, ""])

    complete = report_search.complete_searches(runs)
    if complete:
        lines += [
            "## Exhaustive search: classes reached and vulnerable pixels",
            "",
            "Every position times every colour of the set, for each image: the positions "
            "where some colour fools the model, the candidates that fool it, and the "
            "classes it can be pushed to (the paper's number of target classes; an image "
            "counts as fooled when it reaches at least one).",
            "",
            report_search.reach_table(complete),
            "",
        ]
        for run in complete:
            file_name = _file_name("reached_pairs", run)
            what = "classes reached (images)"
            plot_pair_heatmap(run, os.path.join(out, file_name), run.tally.reach_pairs, what)
            figure(
                f"{run.name}: classes reached",
                file_name,
                "Images by true class (rows) and each class the search pushed them to.",
            )
            dataset = datasets.get(run.name)
            file_name = _file_name("vulnerable", run)
            if dataset is not None and report_search.plot_vulnerable_maps(
                run, dataset, os.path.join(out, file_name)
            ):
                figure(
                    f"{run.name}: vulnerable pixels",
                    file_name,
                    "The most vulnerable images; red marks each position where some "
                    "colour of the set fools the model.",
                )
    fewest = report_search.min_pixels_runs(runs)
    if fewest:
        lines += [
            "## Minimum pixels",
            "",
            "The smallest number of pixels that fools each image: the exhaustive one-pixel "
            "search first, then each larger k on the images not yet fooled. Shares are "
            "cumulative, with 95% Wilson intervals; queries sum every stage an image "
            "went through.",
            "",
            report_search.min_pixels_table(fewest),
            "",
        ]
        report_search.plot_min_pixels(fewest, os.path.join(out, "min_pixels.png"))
        figure(
            "Share fooled against pixels",
            "min_pixels.png",
            "Cumulative share of images fooled with at most k pixels.",
        )
    return lines


def _open_datasets(runs: Sequence[RunResults]) -> tuple[dict, list[str]]:
    """Each run's dataset (None where it cannot be read, with a note saying why); class
    names from the dataset where the model has none."""
    datasets, notes = {}, []
    for run in runs:
        dataset, reason = open_dataset(run) if run.records else (None, "no results yet")
        if dataset is None:
            notes.append(f"- {run.name}: no example images ({reason}).")
        elif run.class_names == tuple(str(c) for c in range(run.tally.num_classes)):
            if len(dataset.class_names) == run.tally.num_classes:  # the model has no names
                run.class_names = tuple(dataset.class_names)
        datasets[run.name] = dataset
    return datasets, notes


def _tables(runs: Sequence[RunResults], datasets: dict) -> list[str]:
    """The report's title, tables and settings, as lines."""
    lines = ["# One-pixel attack report", ""]
    lines += [
        "Success rate is over attacks: images, or (image, target class) pairs when "
        "targeted. Confidence is the mean probability of the adversarial class over "
        "successful attacks. Queries are model evaluations per attack.",
        "",
    ]
    lines += ["## Results", "", summary_table(runs), ""]
    lines += [
        "### 95% intervals",
        "",
        "Wilson score intervals for the rates; a normal interval for the mean "
        "confidence. In targeted runs an image's attacks are not independent, so the "
        "success rate's interval is too narrow there; the per-image column is not.",
        "",
        interval_table(runs),
        "",
    ]
    accuracy = accuracy_table(runs)
    if accuracy:
        lines += [
            "### Clean and robust accuracy",
            "",
            "As RobustBench and AutoAttack define them, over every image a run "
            "considered: the misclassified images it skipped (`only_correct`) or "
            "attacked count as considered and never as robust. Clean accuracy is the "
            "share classified correctly; robust accuracy the share classified correctly "
            "and not fooled (by any target, when targeted). Counts in brackets; Wilson "
            "intervals.",
            "",
            accuracy,
            "",
        ]
    by_pixels = pixel_table(runs)
    if by_pixels:
        lines += [
            "## Success rate by number of pixels",
            "",
            "Success rate (attacks) for each pixel count.",
            "",
            by_pixels,
            "",
        ]
    comparison = comparison_table(runs, datasets)
    if comparison:
        lines += ["## DE, random search and FGSM", "", comparison, ""]
    lines += ["## Settings", ""]
    for run in runs:
        c = run.config
        de_settings = {k: v for k, v in c["de"].items() if v is not None}
        detail = f"fgsm={c['fgsm']}" if c["method"] == "fgsm" else f"de={de_settings}"
        if c["method"] in ("exhaustive", "corner_search", "min_pixels"):
            detail = f"{c['method']}={c.get(c['method'])}"
        lines.append(
            f"- **{run.name}**: model `{c['model']}`, data `{c['data']}` ({c['split']}), "
            f"selection `{c['selection'] or 'all'}`, num_images {c['num_images'] or 'all'}, "
            f"only_correct {c['only_correct']}, targets `{c['targets']}`, seed {c['seed']}, "
            f"{detail}."
        )
    lines.append("")
    return lines


def write_report(workdirs: Sequence[str], out: str) -> str:
    """Writes `out/report.md` and its figures; returns the report's path."""
    import matplotlib

    matplotlib.use("Agg")
    if not workdirs:
        raise InputError("no workdirs given")
    runs = [load_run_results(w, n) for w, n in zip(workdirs, _unique_names(workdirs), strict=True)]
    os.makedirs(out, exist_ok=True)
    datasets, notes = _open_datasets(runs)
    lines = _tables(runs, datasets)

    def figure(title: str, file_name: str, caption: str = ""):
        lines.extend([f"### {title}", "", f"![{title}]({file_name})", ""])
        if caption:
            lines.extend([caption, ""])

    lines += ["## Figures", ""]
    de_runs = [r for r in runs if r.pixels is not None and r.records]
    if de_runs:
        plot_success_by_pixels(de_runs, os.path.join(out, "success_by_pixels.png"))
        figure("Success rate by number of pixels", "success_by_pixels.png")
    targeted = [r for r in runs if r.config["targeted"] and r.records]
    if targeted:
        plot_target_classes(targeted, os.path.join(out, "target_classes.png"))
        figure(
            "Number of target classes",
            "target_classes.png",
            "For each image, the number of target classes it was successfully pushed "
            "to (Su et al. 2019, Fig. 3).",
        )
    with_successes = [r for r in runs if r.tally.successes]
    by_classes: dict[tuple, list[RunResults]] = {}
    for run in with_successes:
        by_classes.setdefault(run.class_names, []).append(run)
    for k, group in enumerate(by_classes.values()):
        file_name = "adversarial_labels.png" if k == 0 else f"adversarial_labels_{k}.png"
        plot_adv_labels(group, os.path.join(out, file_name))
        figure("Adversarial classes", file_name)
    lines += _search_sections(runs, datasets, out)
    if with_successes:
        lines += [
            "## Class pairs",
            "",
            "Successful attacks by true class (rows) and adversarial class (columns).",
            "",
        ]
    for run in with_successes:
        file_name = _file_name("pairs", run)
        plot_pair_heatmap(run, os.path.join(out, file_name))
        figure(run.name, file_name)
    examples = []
    for run in runs:
        dataset = datasets.get(run.name)
        file_name = _file_name("examples", run)
        if dataset is not None and plot_examples(run, dataset, os.path.join(out, file_name)):
            examples.append((run.name, file_name))
    if examples:
        lines += [
            "## Examples",
            "",
            "Top: the original image, its true class and the model's "
            "confidence. Bottom: the attacked image (changed pixels circled), the "
            "adversarial class and its probability, and the true class's probability "
            "(in brackets). The most confident successes, one per image.",
            "",
        ]
    for name, file_name in examples:
        figure(name, file_name)
    if notes:
        lines += ["## Notes", "", *notes, ""]
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path
