"""Report parts of the search rules beyond DE: the exhaustive one-pixel search and the
minimum-pixels run.

- An exhaustive search that ran its whole grid (`stop=none`) knows, for each image,
  every position where some colour fools (its map of vulnerable pixels) and every
  class it can be pushed to: the paper's number of target classes and class pairs,
  from one non-targeted pass.
- A minimum-pixels run knows the smallest k that fools each image: the share fooled
  against k (the robustness levels of Kotyan & Vargas, PLoS ONE 2022), its median
  and the queries it took.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections
import numpy as np

from opa_jax import charts, metrics, min_pixels


def method_name(config: dict) -> str | None:
    """A short name of the search of an exhaustive, corner-search or min_pixels run's
    `config` (as in its config.json); None for other methods."""
    method = config["method"]
    if method == "exhaustive":
        ex = config.get("exhaustive", {})
        return f"exhaustive ({ex.get('colours', 'corners')}, stop {ex.get('stop', 'first')})"
    if method == "corner_search":
        cs = config.get("corner_search", {})
        return f"corner search ({cs.get('popsize')}x{cs.get('generations')})"
    if method == "min_pixels":
        mp = config.get("min_pixels", {})
        budget = f"{mp.get('popsize')}x{mp.get('generations')}"
        return f"min pixels (1, {mp.get('ks')}; {mp.get('search')} {budget})"
    return None


def complete_searches(runs: Sequence) -> list:
    """The runs with records of exhaustive searches over their whole grid."""
    return [run for run in runs if run.tally.complete_searches]


def reach_table(runs: Sequence) -> str:
    """One row per complete exhaustive run: images fooled, vulnerable positions and
    fooling candidates, and how many images reach n classes."""
    num_classes = max(run.tally.num_classes for run in runs)
    header = [
        "run",
        "images",
        "fooled",
        "vulnerable positions (mean, of fooled)",
        "fooling candidates (mean, of fooled)",
        "classes reached (mean, of fooled)",
    ]
    header += [f"{n} classes" for n in range(num_classes)]
    rows = []
    for run in runs:
        complete = [r for r in run.records if r.get("search_complete")]
        fooled = [r for r in complete if r["classes_reached"]]
        counts = np.zeros((num_classes,), np.int64)
        for record in complete:
            counts[len(record["classes_reached"])] += 1

        def mean(field, records=fooled):
            values = [len(r[field]) if isinstance(r[field], list) else r[field] for r in records]
            return f"{np.mean(values):.1f}" if values else "-"

        low, high = metrics.wilson_interval(len(fooled), len(complete))
        rows.append(
            [
                run.name,
                str(len(complete)),
                f"{len(fooled)} ({charts.percent(len(fooled) / max(len(complete), 1))}, "
                f"95% {100 * low:.1f}-{100 * high:.1f}%)",
                mean("fooling_positions"),
                mean("fooling_candidates"),
                mean("classes_reached"),
                *(str(c) for c in counts),
            ]
        )
    return charts.table(header, rows)


def plot_vulnerable_maps(run, dataset, path: str, max_examples: int = 6) -> bool:
    """Example images (top) and their vulnerable pixels (bottom, red: some colour of the
    set fools the model there), the most vulnerable images first."""
    import matplotlib.pyplot as plt

    complete = [r for r in run.records if r.get("search_complete") and r["fooling_positions"]]
    chosen = sorted(complete, key=lambda r: (-r["fooling_positions"], r["image"]))
    chosen = chosen[:max_examples]
    if not chosen:
        return False
    names = run.class_names
    fig, axes = plt.subplots(2, len(chosen), figsize=(2.0 * len(chosen), 5.0), squeeze=False)
    for column, record in enumerate(chosen):
        image = dataset.read([dataset.position_of[record["image"]]])[0]
        height, width = image.shape[:2]
        vulnerable = np.zeros((height * width,), bool)
        vulnerable[record["vulnerable_pixels"]] = True
        image = charts.as_rgb(image)
        shown = (0.35 * image).astype(np.uint8)  # dimmed, so the red stands out
        shown.reshape(-1, image.shape[-1])[vulnerable] = (255, 40, 40)
        true = record["true_label"]
        reached = ", ".join(names[c][:6] for c in record["classes_reached"][:3])
        more = "..." if len(record["classes_reached"]) > 3 else ""
        axes[0, column].imshow(image, interpolation="nearest")
        axes[0, column].set_title(f"image {record['image']}\n{names[true][:14]}", fontsize=9)
        axes[1, column].imshow(shown, interpolation="nearest")
        axes[1, column].set_xlabel(
            f"{record['fooling_positions']} of {height * width} pixels\nto {reached}{more}",
            fontsize=8,
        )
        for ax in axes[:, column]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("original", fontsize=10)
    axes[1, 0].set_ylabel("vulnerable pixels", fontsize=10)
    fig.suptitle(f"{run.name}: {run.model}, {run.method}", fontsize=11)
    fig.tight_layout()
    charts.save(fig, path)
    return True


def min_pixels_runs(runs: Sequence) -> list:
    return [run for run in runs if run.config["method"] == "min_pixels" and run.records]


def _ks(run) -> list[int]:
    """The run's stage pixel counts, as `min_pixels` read them from its config."""
    stages = ml_collections.ConfigDict({"min_pixels": run.config.get("min_pixels", {})})
    return min_pixels.pixel_counts(stages)


def fooled_by_k(run) -> dict[int, int]:
    """The cumulative count of fooled images at each k of the run's stages."""
    counts = min_pixels.fooled_by_k(run.records, _ks(run))
    return {int(k): n for k, n in counts.items()}


def min_pixels_table(runs: Sequence) -> str:
    """One row per minimum-pixels run: the share fooled at each k (cumulative, with its
    95% interval), the median minimum k over the fooled, and the queries."""
    all_ks = sorted({k for run in runs for k in _ks(run)})
    header = ["run", "k > 1 search", "images", *(f"fooled at k <= {k}" for k in all_ks)]
    header += ["median k (fooled)", "queries (all images)", "mean queries an image"]
    rows = []
    for run in runs:
        n = len(run.records)
        by_k = fooled_by_k(run)
        cells = []
        for k in all_ks:
            if k not in by_k:
                cells.append("-")
                continue
            low, high = metrics.wilson_interval(by_k[k], n)
            cells.append(f"{by_k[k]} ({100 * by_k[k] / n:.0f}%, {100 * low:.0f}-{100 * high:.0f})")
        minima = [r["min_pixels"] for r in run.records if r.get("min_pixels") is not None]
        queries = sum(r["queries"] for r in run.records)
        mp = run.config.get("min_pixels", {})
        rows.append(
            [
                run.name,
                f"{mp.get('search')} ({mp.get('popsize')}x{mp.get('generations')})",
                str(n),
                *cells,
                f"{np.median(minima):g}" if minima else "-",
                f"{queries:,}",
                f"{queries / max(n, 1):,.0f}",
            ]
        )
    return charts.table(header, rows)


def plot_min_pixels(runs: Sequence, path: str) -> None:
    """The share of images fooled with at most k pixels, one line per run."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    for run in runs:
        by_k = fooled_by_k(run)
        ks = sorted(by_k)
        share = [100 * by_k[k] / len(run.records) for k in ks]
        ax.step(ks, share, where="post", marker="o", label=f"{run.name} ({run.model})")
        for k, value in zip(ks, share, strict=True):
            ax.annotate(
                f"{value:.0f}%",
                (k, value),
                xytext=(0, 4),
                textcoords="offset points",
                ha="center",
                fontsize=7,
            )
    ax.set_xscale("log")
    ticks = sorted({k for run in runs for k in fooled_by_k(run)})
    ax.set_xticks(ticks, [str(k) for k in ticks])
    ax.minorticks_off()
    ax.set_xlabel("pixels changed (k)")
    ax.set_ylabel("% of images fooled with <= k pixels")
    ax.set_ylim(0, 105)
    ax.set_title("Minimum pixels per image", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    charts.save(fig, path)
