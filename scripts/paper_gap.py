"""Takes apart the gap between the paper's one-pixel success rates and ours: each model's
accuracy and clean margins, each run's images fooled, and one row per factor (search,
protocol, label smoothing, the paper's recipe) with 95% intervals; Markdown and PNGs.

python scripts/paper_gap.py --out=docs/paper_gap \
  --model=nin:ckpt:checkpoints/cifar10/nin \
  --runs=nin:docs/runs/zoo_nin_1px,docs/runs/zoo_nin_1px_targeted,docs/runs/search_nin_none \
  --model=allconv:ckpt:checkpoints/cifar10/allconv --runs=allconv:docs/runs/zoo_allconv_1px

Model names pick the factor rows (opa_jax.paper_gap.MODEL_FACTORS): `nin_no_smoothing`,
`nin_plain` and `nin_other_images` (the shipped NiN attacked on other images) are compared
with `nin`, `nin_plain_noaug` with `nin_plain`; `nin`, `allconv` and `vgg16` with the
paper's figures.
"""

import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from opa_jax import paper_gap  # noqa: E402
from opa_jax.errors import exit_on_input_error  # noqa: E402

_MODEL = flags.DEFINE_multi_string(
    "model", [], "NAME:SPEC, e.g. nin:ckpt:checkpoints/cifar10/nin; repeat for each model."
)
_RUNS = flags.DEFINE_multi_string(
    "runs", [], "NAME:WORKDIR[,WORKDIR...]: attack runs on the model called NAME."
)
_OUT = flags.DEFINE_string("out", None, "Folder for paper_gap.md and the figures.", required=True)
_EXACT_DATA = flags.DEFINE_string(
    "exact_data",
    "folder:../shared/data/cifar10-test-exact",
    "The exact test images the runs attacked (accuracy, margins).",
)
_JPEG_DATA = flags.DEFINE_string(
    "jpeg_data",
    "folder:runs/data/cifar10-jpeg",
    "The JPEG test set (scripts/prepare_cifar10_jpeg.sh); its accuracy is 'not measured' "
    "when the folder is absent, and skipped when empty.",
)
_CACHE_DIR = flags.DEFINE_string(
    "cache_dir", "", "Keep the decoded JPEG test set here as .npy (as training does)."
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 250, "Images per forward pass.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    command = "python " + shlex.join(["scripts/paper_gap.py", *sys.argv[1:]])
    with exit_on_input_error():
        entries = paper_gap.parse_entries(_MODEL.value, _RUNS.value)
        measures = paper_gap.measure_all(
            entries, _EXACT_DATA.value, _JPEG_DATA.value, _CACHE_DIR.value, _BATCH_SIZE.value
        )
        path = paper_gap.write_report(measures, _OUT.value, command)
    print(f"written to {path}")


if __name__ == "__main__":
    app.run(main)
