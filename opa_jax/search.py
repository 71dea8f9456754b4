"""What a search rule is: the interface the device loop (`opa_jax.engine`) runs.

A search rule is a frozen, hashable config (jit specialises on it) whose
methods are pure functions of one image's state, vmapped by the engine over
the in-flight slots. Each generation the engine asks the rule for `popsize`
candidates, evaluates them as one batch with the rest of the slots, and hands
the probabilities back:

- `empty_state(num_classes, image_shape)`: the state of an idle slot. It has at
  least the fields the engine reads when an image finishes: `best_candidate`
  `[genes]`, `best_is_adv`, `best_probs` `[C]`, `generation`, `queries` and
  `stopped`.
- `propose(key, state, fresh, low, high)`: the candidates `[popsize, genes]`;
  `fresh` is true for the first generation of a new image.
- `update(state, fresh, candidates, probs, true_label, target_label, targeted)`:
  the state after evaluating `candidates` (`probs` `[popsize, C]`).
- `outputs(state)`: extra per-image arrays the loop returns when the image
  finishes (a dict, empty for most rules), and `record_fields(outputs)`, their
  JSON fields in the image's record.

The rules: DE and random search (`opa_jax.de.DEConfig`), the exhaustive
one-pixel grid (`opa_jax.exhaustive.ExhaustiveConfig`) and the random search
over corner colours (`opa_jax.corner_search.CornerSearchConfig`). A new rule is
one such class; `search_config` below builds it from a run's config.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import ml_collections

from opa_jax import corner_search, de, exhaustive
from opa_jax.errors import InputError

# The attack methods a search rule runs, and those that are not searches.
SEARCH_METHODS = ("de", "exhaustive", "corner_search")
METHODS = (*SEARCH_METHODS, "fgsm", "min_pixels")


class Search(Protocol):
    """A search rule (see the module docstring)."""

    num_pixels: int
    popsize: int
    round_rgb: bool

    @property
    def num_genes(self) -> int: ...

    def empty_state(self, num_classes: int, image_shape) -> Any: ...

    def propose(self, key, state, fresh, low, high) -> jax.Array: ...

    def update(
        self, state, fresh, candidates, probs, true_label, target_label, targeted: bool
    ) -> Any: ...

    def outputs(self, state) -> dict: ...

    def record_fields(self, outputs: dict) -> dict: ...


def de_config(config: ml_collections.ConfigDict, **overrides) -> de.DEConfig:
    """The DE settings of `config.de` (its preset, then every field set), with the
    `overrides` that are not None on top."""
    fields = {"num_pixels": config.pixels}
    fields.update({k: v for k, v in config.de.items() if k != "preset"})
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return de.DEConfig.from_preset(config.de.preset, **fields)


def search_config(
    config: ml_collections.ConfigDict,
    image_shape,
    method: str | None = None,
    pixels: int | None = None,
) -> Search:
    """The search rule of `config.method` (or `method`) for images of `image_shape`,
    at `config.pixels` (or `pixels`) pixels."""
    method = method or config.method
    pixels = pixels or config.pixels
    channels = de.image_channels(image_shape)
    if method == "de":
        return de_config(config, num_pixels=pixels, channels=channels)
    if method == "exhaustive":
        if pixels != 1:
            raise InputError(
                f"pixels={pixels}: method=exhaustive searches one pixel; use "
                "method=min_pixels (or de, corner_search) for more"
            )
        ex = config.exhaustive
        return exhaustive.ExhaustiveConfig(
            image_shape=tuple(image_shape[:2]),
            colours=ex.colours,
            stop=ex.stop,
            popsize=ex.popsize,
            channels=channels,
        )
    if method == "corner_search":
        cs = config.corner_search
        return corner_search.CornerSearchConfig(
            image_shape=tuple(image_shape[:2]),
            num_pixels=pixels,
            popsize=cs.popsize,
            generations=cs.generations,
            colours=cs.colours,
            stop=cs.stop,
            channels=channels,
        )
    raise InputError(f"method={method!r}: expected one of {SEARCH_METHODS}")


def settings(search: Search | None) -> dict | None:
    """A search rule's settings as JSON values (for run_info.json and --dry_run)."""
    if search is None:
        return None
    return dict(search.__dict__)
