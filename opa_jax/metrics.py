"""The paper's measurements as mergeable tallies (counts and sums; rates at the end).

A `Tally` is built from result records (the lines of `results.jsonl`): the
paper's measurements (Su et al. 2019, Sec. IV-C: success rate, confidence,
number of target classes, class pairs) kept as counts and sums. A complete
exhaustive search (`search_complete` records) adds every class it pushed an
image to, so one non-targeted pass gives the targeted measurements. Two tallies
combine by addition (`merge`) into the tally of all their records, so partial
tallies (of chunks, hosts or runs) need not keep their records. The summary
and the report tally every host's records of a workdir at once.

Rates carry 95% intervals: Wilson score intervals for proportions (success
rate over attacks, and the share of images pushed to at least one class), and
a normal interval for the mean confidence over successes. In targeted runs the
attacks on one image are not independent, so the attack-level interval there
is narrower than a per-image one would be.

Clean and robust accuracy follow RobustBench and AutoAttack (Croce & Hein,
2020): over every image the run considered, the share the model classifies
correctly (clean), and the share it classifies correctly and the attack does
not fool (robust). The images considered are the run's selection up to its
last image it attacks, so with `only_correct` the misclassified images skipped
on the way count too; a misclassified image (skipped, or attacked with
`only_correct=False`) is never robust. The records hold only attacked
images, so the counts of images considered and of correctly classified ones
come from the plan (`images_considered`, `clean_correct`); the fooled images
among the correct ones come from the records. In a targeted run an image is
fooled when any of its targets is reached.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% by default)."""
    if trials <= 0:
        return (0.0, 1.0)
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    # At p = 0 or 1 the bound is exactly 0 or 1; computed, it can miss by a rounding.
    low = 0.0 if successes <= 0 else max(0.0, float(centre - half))
    high = 1.0 if successes >= trials else min(1.0, float(centre + half))
    return (low, high)


def mean_interval(
    total: float, total_sq: float, count: int, z: float = Z_95
) -> tuple[float, float]:
    """The normal interval of a mean from its sum and sum of squares (95% by default)."""
    if count <= 0:
        return (0.0, 0.0)
    mean = total / count
    if count == 1:
        return (mean, mean)
    variance = max(0.0, (total_sq - count * mean * mean) / (count - 1))
    half = z * np.sqrt(variance / count)
    return (float(mean - half), float(mean + half))


ACCURACY_FIELDS = (
    "images_considered",
    "clean_correct",
    "clean_accuracy",
    "clean_accuracy_ci95",
    "robust_images",
    "robust_accuracy",
    "robust_accuracy_ci95",
)


@dataclasses.dataclass
class Tally:
    num_classes: int
    attacks: int = 0
    successes: int = 0
    confidence_sum: float = 0.0  # adv-label probability, summed over successes
    confidence_sq_sum: float = 0.0  # and its square, for the interval
    queries_sum: float = 0.0
    queries_success_sum: float = 0.0
    generations_success_sum: float = 0.0
    queries_success: list = dataclasses.field(default_factory=list)  # for medians
    pair_counts: np.ndarray = None  # [C, C] successes, true label -> adversarial label
    pair_attempts: np.ndarray = None  # [C, C] attacks, true label -> target (targeted only)
    adv_label_counts: np.ndarray = None  # [C] adversarial labels of successes
    reached: dict = dataclasses.field(default_factory=dict)  # image -> set of labels reached
    # Complete exhaustive searches (`search_complete` records): every class each image was
    # pushed to, true label -> class, and how many such records there were.
    reach_pairs: np.ndarray = None
    complete_searches: int = 0
    attacked_images: set = dataclasses.field(default_factory=set)
    # Clean and robust accuracy: the images considered and the correctly classified ones
    # among them (from the plan, as the records hold only attacked images), and the
    # attacked images the model classified correctly (from each record's clean_probs).
    images_considered: int = 0
    clean_correct: int = 0
    correct_images: set = dataclasses.field(default_factory=set)

    def __post_init__(self):
        c = self.num_classes
        if self.pair_counts is None:
            self.pair_counts = np.zeros((c, c), np.int64)
        if self.pair_attempts is None:
            self.pair_attempts = np.zeros((c, c), np.int64)
        if self.adv_label_counts is None:
            self.adv_label_counts = np.zeros((c,), np.int64)
        if self.reach_pairs is None:
            self.reach_pairs = np.zeros((c, c), np.int64)

    def add(self, record: dict) -> None:
        self.attacks += 1
        self.queries_sum += record["queries"]
        image = record["image"]
        self.attacked_images.add(image)
        true_label, target = record["true_label"], record.get("target_label")
        if int(np.argmax(record["clean_probs"])) == true_label:
            self.correct_images.add(image)
        if target is not None:
            self.pair_attempts[true_label, target] += 1
        if record["success"]:
            adv = record["adv_label"]
            self.successes += 1
            self.confidence_sum += record["adv_prob"]
            self.confidence_sq_sum += record["adv_prob"] ** 2
            self.queries_success_sum += record["queries"]
            self.generations_success_sum += record["generations"]
            self.queries_success.append(record["queries"])
            self.pair_counts[true_label, adv] += 1
            self.adv_label_counts[adv] += 1
            self.reached.setdefault(image, set()).add(adv)
        if record.get("classes_reached"):  # a search that saw more than its answer's class
            self.reached.setdefault(image, set()).update(record["classes_reached"])
        if record.get("search_complete"):
            self.complete_searches += 1
            for reached in record["classes_reached"]:
                self.reach_pairs[true_label, reached] += 1

    def update(self, records: Iterable[dict]) -> Tally:
        for record in records:
            self.add(record)
        return self

    def merge(self, other: Tally) -> Tally:
        merged = Tally(self.num_classes)
        added = (
            "attacks",
            "successes",
            "confidence_sum",
            "confidence_sq_sum",
            "queries_sum",
            "queries_success_sum",
            "generations_success_sum",
            "complete_searches",
            "images_considered",
            "clean_correct",
        )
        for f in added:
            setattr(merged, f, getattr(self, f) + getattr(other, f))
        merged.queries_success = self.queries_success + other.queries_success
        merged.pair_counts = self.pair_counts + other.pair_counts
        merged.pair_attempts = self.pair_attempts + other.pair_attempts
        merged.adv_label_counts = self.adv_label_counts + other.adv_label_counts
        merged.reach_pairs = self.reach_pairs + other.reach_pairs
        merged.attacked_images = self.attacked_images | other.attacked_images
        merged.correct_images = self.correct_images | other.correct_images
        for tally in (self, other):
            for image, labels in tally.reached.items():
                merged.reached.setdefault(image, set()).update(labels)
        return merged

    def num_target_classes(self) -> np.ndarray:
        """Histogram [C]: how many images were pushed to exactly n classes (Fig. 3)."""
        counts = np.zeros((self.num_classes,), np.int64)
        for image in self.attacked_images:
            counts[len(self.reached.get(image, ()))] += 1
        return counts

    def accuracy(self) -> dict:
        """Clean and robust accuracy over the images considered, with Wilson intervals.

        Robust accuracy needs every correctly classified image attacked: while some
        are not (a run still going or killed), or when the images considered are
        unknown (records kept from before they were stored), it is None.
        """
        n, correct = self.images_considered, self.clean_correct
        if n <= 0:
            return dict.fromkeys(ACCURACY_FIELDS)
        fooled = len([i for i in self.correct_images if self.reached.get(i)])
        complete = len(self.correct_images) >= correct
        robust = correct - fooled if complete else None
        return {
            "images_considered": n,
            "clean_correct": correct,
            "clean_accuracy": correct / n,
            "clean_accuracy_ci95": list(wilson_interval(correct, n)),
            "robust_images": robust,
            "robust_accuracy": None if robust is None else robust / n,
            "robust_accuracy_ci95": None if robust is None else list(wilson_interval(robust, n)),
        }

    def summary(self) -> dict:
        n, s = self.attacks, self.successes
        q = np.asarray(self.queries_success, np.float64)
        images = len(self.attacked_images)
        fooled = len([i for i in self.attacked_images if self.reached.get(i)])
        summary = {
            "attacks": n,
            "images": images,
            "successes": s,
            "success_rate": s / n if n else 0.0,
            "success_rate_ci95": list(wilson_interval(s, n)),
            "images_fooled": fooled,
            "images_fooled_rate": fooled / images if images else 0.0,
            "images_fooled_rate_ci95": list(wilson_interval(fooled, images)),
            "confidence": self.confidence_sum / s if s else 0.0,
            "confidence_ci95": list(mean_interval(self.confidence_sum, self.confidence_sq_sum, s)),
            "mean_queries": self.queries_sum / n if n else 0.0,
            "mean_queries_success": self.queries_success_sum / s if s else 0.0,
            "median_queries_success": float(np.median(q)) if s else 0.0,
            "mean_generations_success": self.generations_success_sum / s if s else 0.0,
            "adv_label_counts": self.adv_label_counts.tolist(),
            "pair_counts": self.pair_counts.tolist(),
            "pair_attempts": self.pair_attempts.tolist(),
            "num_target_classes": self.num_target_classes().tolist(),
        }
        summary.update(self.accuracy())
        if self.complete_searches:
            summary["complete_searches"] = self.complete_searches
            summary["reach_pair_counts"] = self.reach_pairs.tolist()
        return summary
