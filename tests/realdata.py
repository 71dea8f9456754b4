"""Paths into ../shared/data (relative to the repository root) for the real-data tests.

A real-data test calls `require(...)` with every file or folder it reads: when
one is missing (a fresh machine has no ../shared/data), the test skips and
says which, instead of erroring. Mark such tests `@pytest.mark.realdata`.
"""

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

LENET = SHARED / "keras" / "lenet.h5"
RESNET = SHARED / "keras" / "resnet.h5"
CIFAR10_EXACT = SHARED / "cifar10-test-exact"
NUM_EXACT_IMAGES = 1017
HYPERPARTICLE_RESULTS = SHARED / "hyperparticle-results"
IMAGENET_SAMPLE = SHARED / "imagenet-sample"


def exact_image_files() -> list[pathlib.Path]:
    """The 1,017 exact CIFAR-10 test images that a folder dataset of them reads."""
    return sorted((CIFAR10_EXACT / "test").glob("*/*.png"))


def missing(*paths) -> list[str]:
    """The given paths that do not exist; `CIFAR10_EXACT` also needs all of its images."""
    absent = [str(p) for p in paths if not pathlib.Path(p).exists()]
    if CIFAR10_EXACT in paths and not absent:
        count = len(exact_image_files())
        if count != NUM_EXACT_IMAGES:
            absent.append(f"{CIFAR10_EXACT}/test (holds {count} of {NUM_EXACT_IMAGES} images)")
    return absent


def require(*paths) -> None:
    """Skips the calling test, naming what is absent, unless every path exists."""
    absent = missing(*paths)
    if absent:
        pytest.skip(f"real data not found: {', '.join(absent)} (../shared/data is optional)")
