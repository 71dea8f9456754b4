"""Converts a pickled `bvlc_alexnet.npy` into a pickle-free `.npz`.

This unpickles SRC, which can run code: convert only a file you trust. The
result loads with no opt-in: `--config.model=alexnet:DST`.

    python scripts/convert_alexnet.py --src bvlc_alexnet.npy --dst bvlc_alexnet.npz
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from opa_jax.errors import exit_on_input_error  # noqa: E402
from opa_jax.models import alexnet_weights  # noqa: E402

_SRC = flags.DEFINE_string("src", None, "The pickled bvlc_alexnet.npy.")
_DST = flags.DEFINE_string("dst", None, "The .npz to write.")
flags.mark_flags_as_required(["src", "dst"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    with exit_on_input_error():
        alexnet_weights.convert_alexnet_npy(_SRC.value, _DST.value)
    print(f"wrote {_DST.value}")


if __name__ == "__main__":
    app.run(main)
