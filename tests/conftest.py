"""Test-wide settings, applied before JAX starts its backends.

Most of the suite's time on a small CPU is XLA compiling many small programs, and
most of that is LLVM optimising the generated code. The tests run tiny inputs, so
they compile at `--xla_backend_optimization_level=0` (about 4x faster to compile,
the same HLO passes, no fast-math at any level). Subprocesses that the tests start
inherit it through `xla_flags()`. `OPA_TEST_XLA_OPTIMIZE=1` runs the suite with
XLA's default optimisation instead.
"""

import os
import subprocess
import sys

FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"


def base_xla_flags() -> str:
    """The XLA_FLAGS every test process runs with (before any device-count flag)."""
    if os.environ.get("OPA_TEST_XLA_OPTIMIZE", "") not in ("", "0"):
        return ""
    return FAST_COMPILE_FLAG


def xla_flags(*extra: str) -> str:
    """XLA_FLAGS for a subprocess: the test-wide flags and `extra`."""
    return " ".join(flag for flag in (base_xla_flags(), *extra) if flag)


def run_job_script(script: str, tmp_path, cwd: str, **settings) -> "subprocess.CompletedProcess":
    """Runs a job script of scripts/ (bash) on the CPU with `settings` as environment,
    a compilation cache in `tmp_path` and the test-wide XLA flags."""
    import subprocess

    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(),
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"), **settings)  # fmt: skip
    return subprocess.run(["bash", script], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=900)  # fmt: skip


def _xla_accepts(flags: str) -> bool:
    """Whether this jaxlib starts with `flags` (XLA aborts on a flag it does not know)."""
    probe = [sys.executable, "-c", "import jax; jax.devices('cpu')"]
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    return subprocess.run(probe, env=env, capture_output=True, timeout=120).returncode == 0


_flags = os.environ.get("XLA_FLAGS", "")
if base_xla_flags() and base_xla_flags() not in _flags:
    # Set once, in the first pytest process; xdist workers and subprocesses inherit it.
    if _xla_accepts(f"{_flags} {base_xla_flags()}".strip()):
        os.environ["XLA_FLAGS"] = f"{_flags} {base_xla_flags()}".strip()
    else:
        os.environ["OPA_TEST_XLA_OPTIMIZE"] = "1"  # this XLA lacks the flag: default level
