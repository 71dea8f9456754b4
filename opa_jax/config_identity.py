"""What makes two runs the same run: a config's identity, and the fields two identities
differ in.

Attack workdirs (`opa_jax.workdir`: `config.json`) and training checkpoints
(`opa_jax.train`: the training state's fingerprint) both refuse to resume a run
under a config that differs from its own, each ignoring the fields that change
only how it executes.
"""

from __future__ import annotations

import json

import ml_collections


def config_identity(config: ml_collections.ConfigDict, ignored_fields=()) -> dict:
    """The config as plain JSON values, without `ignored_fields`."""
    identity = json.loads(json.dumps(config.to_dict(), sort_keys=True, default=str))
    for field in ignored_fields:
        identity.pop(field, None)
    return identity


def differing_fields(previous: dict, current: dict, ignored_fields=()) -> list[str]:
    """The top-level fields whose values differ, sorted."""
    return sorted(
        k
        for k in set(previous) | set(current)
        if k not in ignored_fields and previous.get(k) != current.get(k)
    )
