"""The hosts (JAX processes) of one run: which one writes the shared files, and how they meet.

On several hosts (`jax.distributed`), process 0 alone writes a workdir's shared
files; every host writes its own results file. The hosts meet through the
coordination service that `jax.distributed.initialize()` starts (its barriers
and key-value store, reached at the coordinator's address), never through
device collectives: the attack runs none, every host's devices work on its own
share, and a gather of a few JSON strings needs no device at all (on CPU hosts
a device collective would also need gloo, which connects on the host's own
network interface). On one host, every function here is immediate.

A host that stops on an error says so (`report_failure`) before it exits, so
that the others stop waiting for it and exit too; a host that is killed is
found dead by the coordination service's heartbeats, which stops the others.
"""

from __future__ import annotations

import itertools
import json
import time

import jax
from jax._src import distributed  # the coordination client, as jax's own checkpointing uses

from opa_jax.errors import InputError

# A host waits this long for the others at a meeting. The last meeting waits for
# the slowest host's whole share; a host that dies is reported by the coordination
# service's heartbeats (about 100 s) long before.
TIMEOUT_SECONDS = 7 * 24 * 3600
POLL_MS = 2000  # how often a waiting host looks for another host's failure
FAILED_KEYS = "opa_jax/failed/"
_meeting_numbers = itertools.count()  # every host meets in the same order


class HostFailed(RuntimeError):
    """Another host stopped on an error, so this one stops too."""


def is_main() -> bool:
    """Whether this host writes the shared files (process 0)."""
    return jax.process_index() == 0


def _client():
    client = distributed.global_state.client
    if client is None:
        raise RuntimeError(
            f"{jax.process_count()} processes but no jax.distributed client: "
            "call jax.distributed.initialize() first"
        )
    return client


def _meeting_key(name: str) -> str:
    return f"opa_jax/{next(_meeting_numbers)}/{name}"


def report_failure(error: BaseException) -> None:
    """Tells the other hosts that this one stops on `error`, so they stop waiting for it."""
    if jax.process_count() > 1 and distributed.global_state.client is not None:
        message = f"{type(error).__name__}: {error}"
        distributed.global_state.client.key_value_set(
            f"{FAILED_KEYS}{jax.process_index()}", message, allow_overwrite=True
        )


def _wait_for(client, key: str) -> str:
    """The value of `key` once some host has set it; raises `HostFailed` as soon as
    another host reports a failure."""
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while True:
        try:
            return client.blocking_key_value_get(key, POLL_MS)
        except jax.errors.JaxRuntimeError:  # not set yet (DEADLINE_EXCEEDED)
            failed = client.key_value_dir_get(FAILED_KEYS)
            if failed:
                raise HostFailed(
                    "; ".join(f"process {k.rsplit('/', 1)[1]} stopped: {v}" for k, v in failed)
                ) from None
            if time.monotonic() > deadline:
                raise


def gather(name: str, value) -> list:
    """Every host's JSON-serialisable `value`, in process order, on every host.

    Each host puts its value as JSON into the coordinator's key-value store and
    reads the others' (waiting for them), so it is also a barrier.
    """
    if jax.process_count() == 1:
        return [value]
    client, key = _client(), _meeting_key(name)
    client.key_value_set(f"{key}/{jax.process_index()}", json.dumps(value))
    return [json.loads(_wait_for(client, f"{key}/{i}")) for i in range(jax.process_count())]


def barrier(name: str) -> None:
    """Waits until every host has reached the barrier `name`."""
    gather(name, None)


def raise_if_any(name: str, error: str | None) -> None:
    """Raises the hosts' errors as an `InputError` on every host, if any host has one.

    A host that refused the run alone would leave the others waiting at the
    next barrier; this way all of them stop with the same message.
    """
    errors = [(i, e) for i, e in enumerate(gather(name, error)) if e]
    if not errors:
        return
    if jax.process_count() == 1:
        raise InputError(errors[0][1])
    raise InputError("; ".join(f"process {i}: {e}" for i, e in errors))
