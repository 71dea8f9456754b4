"""A training loop's progress: its rate, ETA and `max_hours` judgement, and the clock of
its training and CPU seconds over every stop and resume.

`Progress` works in the manner of clu's `periodic_actions.ReportProgress`: the loop
calls it after every step, `report` logs at the log points, and `timed` wraps the
work between steps that is not training (evaluations, checkpoints). The logged rate
is of the train steps alone; the ETA adds the evaluations still due at the last
one's cost.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import jax
from absl import logging

# `max_hours` is judged at up to this many of a process's first log lines, at the fastest
# rate among them: a run slowed only for a while (another job's burst on a shared
# machine) goes on; one over at every such line, or over twice the limit at any, stops.
MAX_HOURS_LOG_LINES = 3


class Clock:
    """Training seconds (wall) and process CPU seconds (every thread: what the run cost,
    however the machine was shared) over every stop and resume."""

    def __init__(self, wall_before: float, cpu_before: float, cpu_from_step: int):
        self.wall_before, self.cpu_before = wall_before, cpu_before
        self.cpu_from_step = cpu_from_step
        self.wall_start, self.cpu_start = time.time(), time.process_time()

    def wall(self) -> float:
        return self.wall_before + time.time() - self.wall_start

    def cpu(self) -> tuple[float, int]:
        """(CPU seconds, the step they are counted from)."""
        return self.cpu_before + time.process_time() - self.cpu_start, self.cpu_from_step


class Progress:
    """Steps per second, ETA and the `max_hours` judgement of one process's training loop,
    from step `step` to `total_steps`.

    `cost(start, stop)` is steps `start` to `stop` in native-size steps (progressive
    resizing's smaller steps count as their share of the pixels); `eval_every` is the
    steps between periodic evaluations (0: none); `max_hours` 0 means no limit.
    """

    def __init__(
        self,
        *,
        step: int,
        total_steps: int,
        steps_per_epoch: int,
        batch_size: int,
        eval_every: int,
        cost: Callable[[int, int], float],
        max_hours: float,
        checkpoint_every_seconds: float,
    ):
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.batch_size, self.eval_every, self.cost = batch_size, eval_every, cost
        self.max_hours, self.checkpoint_every_seconds = max_hours, checkpoint_every_seconds
        self.entered = self.loop_start = self.last_log_time = time.time()
        self.last_log_step = step
        self.started = False  # set after this process's first step
        self.over_time = False  # set at one of its first log lines (`MAX_HOURS_LOG_LINES`)
        self.judged, self.fastest = 0, 0.0  # log lines judged so far, their fastest cost rate
        self.paused = 0.0  # seconds in `timed` work since the last log line
        self.seconds: dict[str, float] = {}  # the last duration of each `timed` work
        self.ended: dict[str, float] = {}  # when each `timed` work last ended

    def __call__(self, step: int, metrics) -> None:
        """After each step. The first one compiles (tens of seconds for the zoo's networks
        on a CPU): the rate is timed from its end, or the first log line (and `max_hours`)
        would overestimate the run."""
        if not self.started:
            jax.block_until_ready(metrics)
            self.last_log_time = self.loop_start = time.time()
            self.last_log_step, self.started = step, True

    @contextlib.contextmanager
    def timed(self, name: str):
        """Times work between steps that is not training ("evaluation", "checkpoint"),
        which the next logged rate leaves out."""
        started = time.time()
        yield
        self.ended[name] = time.time()
        self.seconds[name] = self.ended[name] - started
        self.paused += self.seconds[name]

    def checkpoint_due(self) -> bool:
        """Whether `checkpoint_every_seconds` (0: never) have passed since the last
        checkpoint, or since the loop began."""
        since = time.time() - self.ended.get("checkpoint", self.entered)
        return 0 < self.checkpoint_every_seconds <= since

    def report(self, step: int, train_metrics: dict, learning_rate: float) -> None:
        """At a log point: logs the step, the train metrics since the last log point, the
        rate and the ETA, and judges `max_hours` at the first `MAX_HOURS_LOG_LINES`."""
        now = time.time()
        stepping = max(now - self.last_log_time - self.paused, 1e-9)
        steps_per_s = (step - self.last_log_step) / stepping
        # The ETA in native-size steps: a resized step costs its share of the pixels.
        cost_per_s = self.cost(self.last_log_step, step) / stepping
        steps_left = self.cost(step, self.total_steps)
        evaluations_left = self._evaluations_due(step) * self.seconds.get("evaluation", 0.0)
        eta = steps_left / max(cost_per_s, 1e-9) + evaluations_left
        logging.info(
            "step %d/%d epoch %.2f: loss %.4f, train accuracy %.4f, lr %.4g, %.0f images/s, "
            "ETA %.0fs",
            step,
            self.total_steps,
            step / self.steps_per_epoch,
            train_metrics["loss"],
            train_metrics["accuracy"],
            learning_rate,
            steps_per_s * self.batch_size,
            eta,
        )
        if self.judged < MAX_HOURS_LOG_LINES and self.max_hours > 0 and step > self.last_log_step:
            self.fastest = max(self.fastest, cost_per_s)
            elapsed = now - self.loop_start
            self._judge(elapsed + steps_left / self.fastest + evaluations_left)
        self.last_log_time, self.last_log_step, self.paused = now, step, 0.0

    def _evaluations_due(self, step: int) -> int:
        """The periodic evaluations still due: they follow the log line of their step, so
        those at steps `step` to `total_steps - 1`."""
        if not self.eval_every:
            return 0
        return (self.total_steps - 1) // self.eval_every - (step - 1) // self.eval_every

    def _judge(self, projected_seconds: float) -> None:
        """One log line's `max_hours` judgement of the run's projected length, elapsed
        time included: in time (judged for good), over (stop), or judged again."""
        self.judged += 1
        projected = projected_seconds / 3600
        if projected <= self.max_hours:
            self.judged = MAX_HOURS_LOG_LINES  # judged: it ends in time
        elif self.judged == MAX_HOURS_LOG_LINES or projected > 2 * self.max_hours:
            self.over_time = True
            logging.warning(
                "at %.0f images/s (its fastest, at the native size) this run needs "
                "%.2f h in all (elapsed included), over max_hours=%g: stopping with its "
                "checkpoint, to resume on a faster machine or with a larger max_hours",
                self.fastest * self.batch_size,
                projected,
                self.max_hours,
            )
        else:
            logging.info(
                "projected %.2f h in all, over max_hours=%g: judged again at the next "
                "log line (%d of %d)",
                projected,
                self.max_hours,
                self.judged,
                MAX_HOURS_LOG_LINES,
            )
