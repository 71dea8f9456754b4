"""The measured thresholds that choose between the incremental pass's forms.

Each is a trade-off measured with XLA's CPU backend (docs/benchmarks.md);
another platform may want other values. None of them changes a result, only
how fast it is computed.
"""

# Windows whose total size is above this share of the map are computed in full.
DEFAULT_MAX_WINDOW_FRACTION = 0.5

# A one-pixel convolution is the clean output plus the change's convolution when its
# input window has at most this share of its output window's positions (NiN's conv2:
# 4x4 under 8x8). Above it (3x3 kernels on grown windows, e.g. ResNet's 5x5 -> 7x7),
# the matrix product and col2im on small maps measured slower than the window rule
# (docs/benchmarks.md, "Delta convolutions").
DELTA_MAX_INPUT_SHARE = 0.25

# A convolution whose output windows would cover too much of the map is the full clean
# output plus the windows' changes convolved (`rules.conv_delta_into_full`) when the k
# input windows hold at most this share of the output map's positions (NiN's conv2 at
# k = 3: 48 of 256); otherwise it runs in full. The products and col2im of k windows
# cost about k times one window's, and NiN's conv2 at k = 5 (80 of 256) measured slower
# than in full; one window (k = 1) is cheaper to add in, and NiN's conv3 (a 5x5 window
# of an 8x8 map, 25 of 64) measured 1.25x as fast, so one window may hold a larger share
# (docs/benchmarks.md, "Delta convolutions into the full map").
DELTA_FULL_MAX_INPUT_SHARE = 0.25
DELTA_FULL_MAX_INPUT_SHARE_ONE_WINDOW = 0.4

# Backends on which a windowed convolution's region is padded by one stride on its first
# windowed axis and the extra output row cropped: XLA's CPU convolutions (YNNPACK,
# jax 0.10) ran unpadded spatial kernels at a third to a half of the speed of padded
# ones (docs/benchmarks.md).
PADDED_WINDOW_CONVOLUTION_BACKENDS = frozenset({"cpu"})

# 'auto' takes the incremental evaluator when XLA counts at least this many times
# fewer FLOPs for it: below that, the gathers and the clean pass eat the gain.
AUTO_MIN_FLOP_RATIO = 1.2
