"""The benchmark report as Markdown tables: median [min, max] over repetitions."""

from __future__ import annotations

import json
import os
import time


def fmt(s, digits=1) -> str:
    if s is None:
        return "-"
    if isinstance(s, dict):
        if s.get("median") is None:
            return "-"
        return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"
    return f"{s:.{digits}f}"


def xla_flags_table(rows) -> list[str]:
    """The Markdown table of `xla_flag_comparison`."""
    lines = [
        "| XLA_FLAGS (one process per round and setting) | batch | forward q/s, in loop | "
        "engine q/s | forward speed-up | engine speed-up | max prob diff | results |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        name = f"`{row['flags']}`" if row["flags"] else "(default)"
        if "error" in row:
            lines.append(f"| {name} | - | failed | - | - | - | - | - |")
            continue
        diff = "-" if row["max_prob_diff"] is None else f"{row['max_prob_diff']:.1e}"
        lines.append(
            f"| {name} | {row['batch']} | {fmt(row['forward_qps'])} | "
            f"{fmt(row['engine_qps'])} | {fmt(row['forward_speedup'], 2)} | "
            f"{fmt(row['engine_speedup'], 2)} | {diff} | {row['digest']} |"
        )
    return lines


def scipy_baseline_lines(report: dict) -> list[str]:
    lines = []
    b = report["scipy_baseline"]
    lines += [
        f"| SciPy per-image baseline (queries/s) | {fmt(b['queries_per_s'])} |",
        f"| SciPy per-image baseline (images/s) | {fmt(b['images_per_s'], 3)} |",
        f"| speed-up over SciPy (images/s) | {fmt(b['speedup_images_per_s'], 2)} |",
    ]
    return lines


def early_stop_lines(report: dict) -> list[str]:
    lines = []
    e = report["early_stop"]
    lines += [
        f"| engine, early stop `{e['stop']}`, {e['generations']} generations (images/s) | "
        f"{fmt(e['images_per_s'], 3)} |",
        f"| ... successes / images, mean queries | {e['successes']} / {e['images']}, "
        f"{e['mean_queries']:.0f} |",
    ]
    return lines


def breakdown_lines(report: dict) -> list[str]:
    lines = []
    b = report["breakdown"]
    s = b["seconds_per_generation"]
    lines += [
        "",
        f"| share of engine wall time ({b['ceiling'].replace('_', '-')} ceiling) | value |",
        "|---|---|",
        f"| model at the ceiling, useful (= efficiency) | {b['efficiency']:.3f} |",
        f"| efficiency accounted from the loop without a model | {b['accounted_efficiency']:.4f} |",
        f"| idle slots | {b['idle_slots']:.3f} |",
        f"| DE mutation + selection | {b['de_step']:.4f} |",
        f"| building perturbed images | {b['perturb']:.4f} |",
        f"| host work between device calls | {b['host']:.4f} |",
        f"| other (loop bookkeeping, in-loop model vs alone) | {b['other']:.3f} |",
        "",
        "| seconds per generation | value |",
        "|---|---|",
        *[f"| {name} | {value:.5f} |" for name, value in s.items()],
    ]
    return lines


def profile_lines(report: dict) -> list[str]:
    lines = []
    p = report["profile"]
    lines += [
        "",
        f"Profile of one engine run ({p['wall_seconds']:.2f} s, "
        f"{p['engine_queries_per_s']:.1f} queries/s): device self time "
        f"{p['device_seconds']:.2f} s on {p['timelines']} timelines, "
        f"{p['mean_operations_running']:.2f} operations running on average. "
        f"Trace: `{p['trace_file']}`.",
        "",
        "| operation | self seconds | share | count |",
        "|---|---|---|---|",
        *[
            f"| `{op['name']}` | {op['seconds']:.4f} | {op['share']:.3f} | {op['count']} |"
            for op in p["ops"]
        ],
    ]
    return lines


def bf16_lines(report: dict) -> list[str]:
    lines = []
    b = report["bf16"]
    lines += [
        "",
        "| bfloat16 | value |",
        "|---|---|",
        f"| forward (queries/s) | {fmt(b['forward_qps_bf16'])} |",
        f"| forward speed-up over float32 | {fmt(b['forward_speedup'], 2)} |",
        f"| engine speed-up over float32 | {fmt(b.get('engine_speedup'), 2)} |",
        f"| clean images: max abs prob difference, argmax agreement | "
        f"{b['clean_max_abs_prob_diff']:.4f}, {b['clean_argmax_agreement']:.3f} "
        f"({b['clean_images']} images) |",
    ]
    if "successes_bf16" in b:
        lines.append(
            f"| successes float32 / bfloat16 (same images, seed) | {b['successes_float32']}"
            f" / {b['successes_bf16']} of {b['success_images']} (difference "
            f"{b['success_rate_difference']:+.3f} +- {b['success_rate_difference_stderr']:.3f}"
            f" s.e.; same outcome {b['same_outcome_share']:.2f}) |"
        )
    return lines


def memory_lines(report: dict) -> list[str]:
    lines = []
    mem = report["memory"]
    lines += ["", "| memory (XLA analysis of the loop) | bytes |", "|---|---|"]
    for row in mem["loop"]:
        if "per_slot_bytes" in row:
            lines.append(
                f"| {row['slots']} slot(s): temp {row['temp_bytes'] / 2**20:.1f} MiB + "
                f"arguments {row['argument_bytes'] / 2**20:.1f} MiB, per slot | "
                f"{row['per_slot_bytes'] / 2**20:.1f} MiB |"
            )
    if "marginal_bytes_per_slot" in mem:
        marginal = mem["marginal_bytes_per_slot"] / 2**20
        lines.append(f"| marginal per extra slot | {marginal:.1f} MiB |")
    if mem.get("forward_temp_bytes_per_popsize_batch") is not None:
        lines.append(
            f"| bare forward temporaries at batch popsize | "
            f"{mem['forward_temp_bytes_per_popsize_batch'] / 2**20:.1f} MiB |"
        )
    lines.append(
        f"| devices.auto_slots' accelerator estimate per slot | "
        f"{mem['auto_slots_estimate_bytes_per_slot'] / 2**20:.1f} MiB |"
    )
    if mem.get("device_peak_bytes") is not None:
        peak = mem["device_peak_bytes"] / 2**20
        lines.append(f"| device peak (memory_stats) | {peak:.1f} MiB |")
    return lines


def scaling_lines(report: dict) -> list[str]:
    lines = []
    sc = report["scaling"]
    lines += [
        "",
        "| scaling | batch | forward q/s, one call | forward q/s, in loop | "
        "engine q/s | efficiency (one call) | efficiency (in loop) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("slots", "popsize", "pixels"):
        for row in sc[name]:
            lines.append(
                f"| {name} = {row[name]} | {row['batch']} | {fmt(row['forward_qps'])} | "
                f"{fmt(row.get('forward_in_loop_qps'))} | {fmt(row['engine_qps'])} | "
                f"{fmt(row['efficiency'], 3)} | {fmt(row.get('efficiency_in_loop'), 3)} |"
            )
    for row in sc.get("image_size", []):
        shape = "x".join(map(str, row["image_shape"][:2]))
        weights = "" if row["trained"] else ", random weights"
        lines.append(
            f"| {row['model']} ({shape}{weights}) | {row['slots'] * row['popsize']} | "
            f"{fmt(row['forward_qps'])} | {fmt(row.get('forward_in_loop_qps'))} | "
            f"{fmt(row['engine_qps'])} | {fmt(row['efficiency'], 3)} | "
            f"{fmt(row.get('efficiency_in_loop'), 3)} |"
        )
    for row in sc.get("forward_batches", []):
        lines.append(
            f"| bare forward, batch {row['batch']} (interleaved rounds; relative to batch "
            f"{sc['forward_batches'][0]['batch']}: {fmt(row['relative_to_first'], 3)}) | "
            f"{row['batch']} | {fmt(row['forward_qps'])} | - | - | - | - |"
        )
    for row in sc.get("devices", []):
        if "error" in row:
            lines.append(f"| devices = {row['devices']} | - | - | - | failed | - | - |")
            continue
        lines.append(
            f"| devices = {row['devices']} ({row['slots_per_device']} slots each, results "
            f"{row['digest']}) | {row['images']} images | - | - | {fmt(row['engine_qps'])} "
            "| - | - |"
        )
    return lines


def xla_flags_lines(report: dict) -> list[str]:
    lines = []
    lines += ["", *xla_flags_table(report["xla_flags"])]
    return lines


def incremental_lines(report: dict) -> list[str]:
    """One row per model and pixel count: queries/s of the forward pass and of both
    evaluators (interleaved), XLA's GFLOP and MB per query, the cache per image."""
    lines = [
        "",
        "| model | k | devices x batch | forward q/s, in loop | full q/s | "
        "incremental q/s | speed-up over full | without delta convolutions, q/s | "
        "delta convolutions' speed-up | GFLOP per query, full / incr. | "
        "MB accessed per query, full / incr. | convs + matmuls on windows | cache per image | "
        "auto |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["incremental"]:
        costs = r["costs_per_query"]
        full, incr = costs["full"], costs["incremental"]
        name = r["model"] + ("" if r["trained"] else " (random)")
        lines.append(
            f"| {name} | {r['num_pixels']} | {r['devices']} x {r['popsize']} | "
            f"{fmt(r['forward_qps'])} | {fmt(r['full_qps'])} | {fmt(r['incremental_qps'])} | "
            f"**{fmt(r['speedup'], 2)}** | {fmt(r['windows_qps'])} | "
            f"{fmt(r['speedup_over_windows'], 2)} | {full['flops'] / 1e9:.4f} / "
            f"{incr['flops'] / 1e9:.4f} ({full['flops'] / incr['flops']:.2f}x) | "
            f"{full['bytes_accessed'] / 1e6:.2f} / {incr['bytes_accessed'] / 1e6:.2f} | "
            f"{r['convolutions_windowed']} of {r['convolutions']} | "
            f"{r['cache_bytes_per_image'] / 2**20:.2f} MiB | {r['auto']} |"
        )
    taps = [r for r in report["incremental"] if "valid_taps_speedup_full" in r]
    if taps:
        lines += [
            "",
            "Convolutions on mostly padding as one product per valid tap (models.layers), "
            "against their previous routes, interleaved:",
            "",
            "| model | k | full q/s, without / with | speed-up | "
            "incremental q/s, without / with | speed-up |",
            "|---|---|---|---|---|---|",
        ]
        for r in taps:
            lines.append(
                f"| {r['model']} | {r['num_pixels']} | {fmt(r['no_taps_full_qps'])} / "
                f"{fmt(r['full_qps'])} | **{fmt(r['valid_taps_speedup_full'], 2)}** | "
                f"{fmt(r['no_taps_incremental_qps'])} / {fmt(r['incremental_qps'])} | "
                f"**{fmt(r['valid_taps_speedup_incremental'], 2)}** |"
            )
    return lines


def search_lines(report: dict) -> list[str]:
    r = report["search"]
    de_run, grid_run = r["de_run"], r["exhaustive_run"]
    de_name = f"DE ({r['de']['popsize']} x {r['de']['generations']}, stop {r['de']['stop']})"
    grid_name = f"exhaustive ({r['exhaustive']['colours']}, {r['exhaustive']['grid_size']})"
    lines = [
        "",
        f"**Exhaustive search against DE** ({r['images']} images, {r['evaluator']} evaluator, "
        "interleaved in one process):",
        "",
        "| search | images/s | queries/s | mean queries an image | fooled |",
        "|---|---|---|---|---|",
    ]
    for name, run in ((de_name, de_run), (grid_name, grid_run)):
        lines.append(
            f"| {name} | {fmt(run['images_per_s'], 3)} | {fmt(run['queries_per_s'])} | "
            f"{run['mean_queries']:.0f} | {run['successes']} |"
        )
    lines += [
        "",
        f"Exhaustive / DE images per second: **{fmt(r['images_per_s_ratio'], 2)}**; the "
        f"exhaustive search fools every image DE fools: {r['exhaustive_fools_every_de_success']}.",
    ]
    return lines


# Rows of the main table (scipy_baseline, early_stop), then one table per section.
SECTION_LINES = (
    ("scipy_baseline", scipy_baseline_lines),
    ("early_stop", early_stop_lines),
    ("breakdown", breakdown_lines),
    ("profile", profile_lines),
    ("bf16", bf16_lines),
    ("memory", memory_lines),
    ("scaling", scaling_lines),
    ("xla_flags", xla_flags_lines),
    ("incremental", incremental_lines),
    ("search", search_lines),
)


def markdown(report: dict) -> str:
    """The report as Markdown tables: median [min, max] over repetitions."""
    m = report["machine"]
    lines = [
        f"### {report['model']['name']} ({'x'.join(map(str, report['model']['image_shape']))}, "
        f"{'trained' if report['model']['trained'] else 'random weights'}), "
        f"{time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"{m['cpu_model']}, {m['cpu_cores']} cores, jax {m['jax']} {m['backend']} "
        f"({len(m['devices'])} device(s): {m['device_kind']}); load average "
        f"{m['load_average_at_start'][0]:.1f} at start, "
        f"{m.get('load_average_at_end', [float('nan')])[0]:.1f} at end. "
        f"{report['slots']} slots x popsize {report['de']['popsize']} = batch {report['batch']}, "
        f"{report['de']['num_pixels']} pixel(s), {report['de']['generations']} generations, "
        f"{report['config']['repetitions']} repetitions; images: {report['images']}. "
        f"Median [min, max].",
        "",
        "| measure | value |",
        "|---|---|",
        f"| forward ceiling, one jitted call (queries/s) | "
        f"{fmt(report['forward_ceiling']['queries_per_s'])} |",
        f"| forward ceiling, {report['forward_ceiling'].get('in_loop_calls')} calls in a jitted "
        f"loop (queries/s) | {fmt(report['forward_ceiling'].get('in_loop_queries_per_s'))} |",
        f"| engine, early stop off, {report['engine'].get('evaluator', 'full')} evaluator "
        f"(queries/s) | {fmt(report['engine']['queries_per_s'])} |",
        f"| engine, early stop off (images/s) | {fmt(report['engine']['images_per_s'], 3)} |",
        f"| efficiency = engine / one-call ceiling | {fmt(report['efficiency'], 3)} |",
        f"| efficiency against the in-loop ceiling | {fmt(report.get('efficiency_in_loop'), 3)} |",
        f"| efficiency, one-call ceiling, process CPU time | "
        f"{fmt(report['efficiency_cpu_time'], 3)} |",
    ]
    for key, render in SECTION_LINES:
        if report.get(key):
            lines += render(report)
    parts = ", ".join(f"{k} {v:.0f}" for k, v in report.get("section_seconds", {}).items())
    lines.append(f"\nTotal benchmark wall time {report['wall_seconds']:.0f} s ({parts}).\n")
    return "\n".join(lines)


def write_report(report: dict, workdir: str, out: str = "") -> None:
    """Writes the JSON (`out`, or <workdir>/benchmark.json), prints the Markdown and
    appends it to <workdir>/benchmark.md."""
    os.makedirs(workdir, exist_ok=True)
    path = out or os.path.join(workdir, "benchmark.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    text = markdown(report)
    print(text)
    with open(os.path.join(workdir, "benchmark.md"), "a") as f:
        f.write(text + "\n")
