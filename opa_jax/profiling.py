"""Where the device time goes: a `jax.profiler` trace summarised by XLA operation.

`trace(fn, logdir)` runs `fn` under `jax.profiler.trace`, which writes the
trace for TensorBoard/XProf (`*.xplane.pb`) and for Perfetto
(`perfetto_trace.json.gz`). `op_table(trace_file)` reads the Perfetto file
and sums the *self* time of every operation on the device's timelines (its
duration minus that of the operations nested in it, so a `while` loop does
not count its body twice). Operations are grouped by name without XLA's
numeric suffix (`conv_general_dilated.18` -> `conv_general_dilated`), and
spans that only wait for other threads are left out.

The device timelines are the `XLA Ops` lines of the processes named
`/device:...` (GPUs, TPUs) when the trace has any, otherwise the XLA CPU
client's threads (`tf_XLA...`).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import time
from collections.abc import Callable

import jax

_SUFFIX = re.compile(r"\.\d+$")
_WAIT = re.compile(r"wait|Await")  # a thread waiting for others' work: not device time


def trace(fn: Callable[[], object], logdir: str) -> tuple[object, str, float]:
    """Runs `fn()` under the profiler; returns its result, the Perfetto trace file and
    the wall time of `fn` (which must wait for its device work)."""
    with jax.profiler.trace(logdir, create_perfetto_trace=True):
        started = time.perf_counter()
        out = fn()
        wall = time.perf_counter() - started
    files = sorted(
        glob.glob(os.path.join(logdir, "**", "perfetto_trace.json.gz"), recursive=True),
        key=os.path.getmtime,
    )
    if not files:
        raise RuntimeError(f"jax.profiler wrote no perfetto_trace.json.gz under {logdir}")
    return out, files[-1], wall


def _device_timelines(events: list[dict]) -> set[tuple]:
    """(pid, tid) pairs of the device's timelines: one span per operation.

    On accelerators, the `XLA Ops` lines of the `/device:...` processes where
    the trace has them (their `XLA Modules` and `Steps` lines enclose the
    operations, and the stream lines repeat them as kernels); otherwise the
    XLA CPU client's threads (`tf_XLA...`).
    """
    process = {
        e["pid"]: e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    thread = {
        (e["pid"], e["tid"]): e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "thread_name"
    }
    slices = {(e.get("pid"), e.get("tid")) for e in events if e.get("ph") == "X"}
    devices = {k for k in slices if process.get(k[0], "").startswith("/device:")}
    if devices:
        ops = {k for k in devices if thread.get(k, "") == "XLA Ops"}
        return ops or {
            k for k in devices if not thread.get(k, "").startswith(("XLA Modules", "Steps"))
        }
    return {k for k in slices if thread.get(k, "").startswith("tf_XLA")}


def self_times(events: list[dict]) -> collections.Counter:
    """Seconds of self time per operation name, over one timeline's complete events."""
    spans = sorted((e["ts"], -e.get("dur", 0), e["name"]) for e in events)
    totals = collections.Counter()
    stack: list[list] = []  # [end, name, self time]: the enclosing events

    def close(until):
        while stack and stack[-1][0] <= until:
            _, name, own = stack.pop()
            totals[name] += own

    for ts, neg_dur, name in spans:
        dur = -neg_dur
        close(ts)
        if stack:  # nested: its time is not its parent's own
            stack[-1][2] -= dur
        stack.append([ts + dur, name, dur])
    close(float("inf"))
    return collections.Counter({k: v * 1e-6 for k, v in totals.items()})  # us -> s


def op_table(trace_file: str, top: int = 15) -> dict:
    """Self time per operation on the device timelines, largest first.

    Returns `ops` (name, seconds, share of all device self time, count), the
    `device_seconds` summed over the timelines and the `timelines` counted.
    """
    with gzip.open(trace_file, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    timelines = _device_timelines(events)
    by_timeline = collections.defaultdict(list)
    counts = collections.Counter()
    for e in events:
        key = (e.get("pid"), e.get("tid"))
        if e.get("ph") == "X" and key in timelines and not _WAIT.search(e["name"]):
            name = _SUFFIX.sub("", e["name"])
            by_timeline[key].append({"ts": e["ts"], "dur": e.get("dur", 0), "name": name})
            counts[name] += 1
    totals = collections.Counter()
    for spans in by_timeline.values():
        totals.update(self_times(spans))
    device_seconds = sum(totals.values())
    share = lambda seconds: seconds / device_seconds if device_seconds else 0.0
    ops = [
        {"name": name, "seconds": seconds, "share": share(seconds), "count": counts[name]}
        for name, seconds in totals.most_common(top)
    ]
    return {
        "ops": ops,
        "device_seconds": device_seconds,
        "timelines": len(timelines),
        "trace_file": trace_file,
    }
