"""Throughput of the attack engine against the model's forward ceiling and a per-image baseline.

`benchmark(config, workdir)` measures:

- the forward ceiling: model queries/s of the bare jitted forward pass at the
  engine's batch (slots * popsize images), after warm-up;
- the engine: queries/s and images/s of `attack.Attacker` at the configured DE
  settings with early stopping off, and images/s with it on (real images when
  the configured dataset fits the model);
- efficiency = engine queries/s / forward ceiling, with the lost time split
  into idle slots, DE mutation/selection, building the perturbed images, host
  work between device calls and the rest;
- SciPy's `differential_evolution` attacking one image at a time with the
  same jitted model, as the public Keras/PyTorch implementations do;
- scaling in slots, population, pixels, image size and device count, the
  bfloat16 forward pass, and device memory per in-flight image.

Every timed figure is repeated after a warm-up; repetitions of the ceiling, the
engine and the baseline are interleaved so that their ratios are taken over
the same stretch of a possibly shared machine. Ratios are computed per
repetition and summarised by their median and range.

The package keeps measuring apart from rendering: `measure` (the forward
pass, engine and SciPy runs), `costs` (where time and memory go), `children`
(points that need their own process), `sections` (the table of sections and
`benchmark`) and `markdown` (the tables).
"""

from opa_jax.bench.sections import benchmark

__all__ = ["benchmark"]
