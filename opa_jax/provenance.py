"""What a result was made with: software versions, devices and the host.

Recorded with every attack run (`run_info.json`), model checkpoint
(`model.json`) and benchmark (`benchmark.json`).
"""

from __future__ import annotations

import os
import platform

import flax
import jax
import numpy as np
import optax

from opa_jax._version import __version__


def software_versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "opa_jax": __version__,
    }


def devices() -> dict:
    """The backend and devices JAX runs on, and this host and its place among the hosts."""
    return {
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "host": platform.node(),
    }


def process() -> dict:
    """This host: its name, its place among the hosts, its own devices and its software."""
    return {
        "process_index": jax.process_index(),
        "host": platform.node(),
        "pid": os.getpid(),
        "backend": jax.default_backend(),
        "local_devices": [str(d) for d in jax.local_devices()],
        **software_versions(),
    }


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    """The host's processor, cores, load and XLA flags, with `devices()` and the versions."""
    return {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)),
        "load_average_at_start": list(os.getloadavg()),
        **devices(),
        "device_kind": jax.devices()[0].device_kind,
        **software_versions(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
