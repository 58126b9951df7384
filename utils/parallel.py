"""Pipeline (model) parallelism with ``tf.device``: stages, micro-batches and schedules.

TensorFlow 2.21 has no pipeline API, so this module builds a small, readable one:

* :meth:`Pipeline.from_sequential` cuts a built ``keras.Sequential`` into ``p`` contiguous
  *stages* and rebuilds each stage under ``tf.device(stage_device)``, so its variables live
  on that device. Activations cross devices explicitly (``tf.identity`` on the receiving
  device) on the way forward, and gradients cross back on the way backward.
* :meth:`Pipeline.compute_gradients` runs one batch as ``m`` *micro-batches* through the
  stages in the order of a pipeline schedule (GPipe or 1F1B), each stage doing its own
  forward (``F``) and backward (``B``) task, accumulates the gradients and returns them.
  :meth:`Pipeline.train_step` then applies them once, like the unsplit model would.
* :func:`schedule_order`, :func:`simulate` and :func:`pipeline_schedule` produce GPipe and
  1F1B schedules for any ``p`` and ``m`` and place them in time, with unit or measured
  per-stage task times. :class:`Timeline` computes the bubble fraction and the peak number
  of micro-batches whose activations each stage holds; :func:`plot_gantt` draws it.

Notation: ``p`` stages (one per device), ``m`` micro-batches per batch; ``F(s, i)`` is the
forward of micro-batch ``i`` on stage ``s`` and ``B(s, i)`` its backward. Dependencies:
``F(s, i)`` needs ``F(s-1, i)``; ``B(s, i)`` needs ``F(s, i)`` and ``B(s+1, i)``.

The loss of micro-batch ``i`` is ``sum(per-example loss) / batch_size``, so the sum over
micro-batches *is* the batch-mean loss and the accumulated gradients are those of the
unsplit model on the whole batch (up to float rounding), whatever ``m`` and the schedule.
Against the unsplit model accumulating the same micro-batches on one device
(``reference_gradients(..., num_micro_batches=m)``) there is no rounding difference at all
on the CPU: the same kernels add the same numbers in the same order.
Layers that mix examples inside a batch (``BatchNormalization``) break that equality.

On a CPU-only machine the devices are logical CPUs that share the same cores: the code
shows the *semantics* (placement, transfers, order, memory), not a speed-up. On ``p``
real GPUs the same code places each stage on its own GPU.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from utils import devices as _devices
from utils.models import layer_flops

SCHEDULES = ("gpipe", "1f1b")
BALANCE_MODES = ("flops", "params", "layers")

LossFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


class NotEnoughDevicesError(RuntimeError):
    """There are fewer devices than pipeline stages. The message says how to get more."""


# --------------------------------------------------------------------------- devices
def short_device(name: str) -> str:
    """``'/job:localhost/replica:0/task:0/device:CPU:1'`` -> ``'CPU:1'`` (``''`` stays ``''``)."""
    if not name:
        return ""
    return name.rsplit("device:", 1)[-1]


def stage_devices(
    num_stages: int, devices: Sequence[str] | None = None, *, allow_reuse: bool = False
) -> list[str]:
    """The device of each of ``num_stages`` stages: stage ``k`` on ``devices[k]``.

    Args:
        num_stages: number of pipeline stages ``p`` (>= 1).
        devices: device names to use; default :func:`utils.devices.compute_devices` (all
            GPUs, else all logical CPUs).
        allow_reuse: place stages round-robin when there are fewer devices than stages
            (same arithmetic, but stages on one device never overlap).

    Raises:
        ValueError: ``num_stages`` < 1 or an empty device list.
        NotEnoughDevicesError: fewer devices than stages and ``allow_reuse`` is False; the
            message says how to get more logical CPUs (``SERIES_NUM_CPUS`` + restart).
    """
    if not isinstance(num_stages, int | np.integer) or num_stages < 1:
        raise ValueError(f"num_stages must be a whole number >= 1, got {num_stages!r}.")
    available = list(devices) if devices is not None else _devices.compute_devices()
    if not available:
        raise ValueError("The device list is empty; pass at least one device name.")
    if num_stages > len(available) and not allow_reuse:
        names = ", ".join(short_device(d) or d for d in available)
        on_gpu = any("GPU" in d.upper() for d in available)
        if on_gpu:
            how = (
                f"Use a machine with at least {num_stages} GPUs, or fewer stages "
                f"(num_stages <= {len(available)})."
            )
        else:
            how = (
                f"On a CPU-only machine, ask for more logical CPUs: set the environment "
                f"variable {_devices.NUM_CPUS_ENV}={num_stages} (or more) before starting "
                f"Python/JupyterLab (e.g. `export {_devices.NUM_CPUS_ENV}={num_stages}`), "
                "restart the kernel, and call utils.devices.setup_devices() before any other "
                f"TensorFlow code. Or use fewer stages (num_stages <= {len(available)})."
            )
        raise NotEnoughDevicesError(
            f"A pipeline with {num_stages} stages needs {num_stages} devices, but only "
            f"{len(available)} are available ({names}). {how} To put several stages on one "
            "device anyway (same results, no overlap), pass allow_reuse=True."
        )
    return [available[k % len(available)] for k in range(num_stages)]


# --------------------------------------------------------------------------- splitting
def layer_costs(model: keras.Model, balance: str = "flops") -> list[float]:
    """Cost of each layer of a built Sequential model, used to balance the stages.

    ``"flops"``: forward FLOPs per example (:func:`utils.models.layer_flops`, conv and
    dense only); ``"params"``: parameter count; ``"layers"``: 1 per layer.
    """
    if balance not in BALANCE_MODES:
        raise ValueError(f"balance must be one of {BALANCE_MODES}, got {balance!r}.")
    layers = model.layers
    if balance == "layers":
        return [1.0] * len(layers)
    if balance == "params":
        return [float(layer.count_params()) for layer in layers]
    return [float(layer_flops(layer)) for layer in layers]


def partition(costs: Sequence[float], num_stages: int) -> list[int]:
    """Cut a chain of layers with ``costs`` into ``num_stages`` contiguous, non-empty stages.

    Minimises the cost of the most expensive stage (the pipeline's bottleneck), then the
    sum of squared stage costs (balance), then prefers stages that start with a layer of
    non-zero cost (so a pooling layer stays with the convolution before it).

    Returns:
        The index of the first layer of each stage (``[0, ...]``, length ``num_stages``).

    Raises:
        ValueError: ``num_stages`` < 1 or more stages than layers.
    """
    n = len(costs)
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}.")
    if num_stages > n:
        raise ValueError(
            f"Cannot cut {n} layers into {num_stages} non-empty stages; use num_stages <= {n}."
        )
    prefix = np.concatenate([[0.0], np.cumsum(np.asarray(costs, dtype=float))])
    zero_start = [1 if c == 0 else 0 for c in costs]

    def seg(i: int, j: int) -> float:
        return float(prefix[j] - prefix[i])

    # best[k][j]: best key for cutting the first j layers into k stages; key compares
    # (max stage cost, sum of squares, number of stages starting on a zero-cost layer).
    inf = (float("inf"), float("inf"), float("inf"))
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    prev = [[-1] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = (0.0, 0.0, 0)
    for k in range(1, num_stages + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                if best[k - 1][i] == inf:
                    continue
                c = seg(i, j)
                b = best[k - 1][i]
                penalty = zero_start[i] if i > 0 else 0
                key = (max(b[0], c), b[1] + c * c, b[2] + penalty)
                if key < best[k][j]:
                    best[k][j], prev[k][j] = key, i
    starts, j = [], n
    for k in range(num_stages, 0, -1):
        i = prev[k][j]
        starts.append(i)
        j = i
    return starts[::-1]


def micro_batch_sizes(batch_size: int, num_micro_batches: int) -> list[int]:
    """Sizes of ``num_micro_batches`` near-equal micro-batches (the first ones get the extra).

    Raises:
        ValueError: ``num_micro_batches`` < 1 or larger than ``batch_size``.
    """
    if num_micro_batches < 1:
        raise ValueError(f"num_micro_batches must be >= 1, got {num_micro_batches}.")
    if batch_size < num_micro_batches:
        raise ValueError(
            f"A batch of {batch_size} examples cannot be split into {num_micro_batches} "
            f"non-empty micro-batches; use num_micro_batches <= {batch_size}."
        )
    q, r = divmod(batch_size, num_micro_batches)
    return [q + (1 if i < r else 0) for i in range(num_micro_batches)]


def split_batch(x: tf.Tensor | np.ndarray, num_micro_batches: int) -> list[tf.Tensor]:
    """Split a batch along axis 0 into ``num_micro_batches`` near-equal micro-batches."""
    x = tf.convert_to_tensor(x)
    return tf.split(x, micro_batch_sizes(int(x.shape[0]), num_micro_batches), axis=0)


# --------------------------------------------------------------------------- schedules
@dataclass(frozen=True, order=True)
class Task:
    """One unit of pipeline work: ``kind`` ``"F"`` (forward) or ``"B"`` (backward) of
    ``micro_batch`` on ``stage``."""

    stage: int
    micro_batch: int
    kind: str

    def __str__(self) -> str:
        return f"{self.kind}({self.stage},{self.micro_batch})"


@dataclass(frozen=True)
class TimedTask:
    """A :class:`Task` placed in time on its stage's device."""

    task: Task
    start: float
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start


def _check_pm(num_stages: int, num_micro_batches: int) -> None:
    for value, what in ((num_stages, "num_stages (p)"), (num_micro_batches, "num_micro_batches (m)")):
        if not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{what} must be a whole number >= 1, got {value!r}.")


def schedule_order(num_stages: int, num_micro_batches: int, kind: str = "gpipe") -> list[list[Task]]:
    """The order in which each stage runs its tasks, for GPipe or 1F1B.

    * ``"gpipe"``: every stage runs all ``m`` forwards, then all ``m`` backwards
      (Huang et al., 2019). Each stage holds the activations of all ``m`` micro-batches.
    * ``"1f1b"``: stage ``s`` runs ``min(p - s - 1, m)`` warm-up forwards, then alternates one
      forward and one backward, then drains the remaining backwards (PipeDream-Flush,
      Narayanan et al., 2021). Stage ``s`` holds at most ``min(p - s, m)`` micro-batches.

    Returns:
        ``order[s]``: the tasks of stage ``s`` in execution order (``2 * m`` tasks).
    """
    _check_pm(num_stages, num_micro_batches)
    if kind not in SCHEDULES:
        raise ValueError(f"kind must be one of {SCHEDULES}, got {kind!r}.")
    p, m = num_stages, num_micro_batches
    order = []
    for s in range(p):
        warmup = m if kind == "gpipe" else min(p - s - 1, m)
        seq = [Task(s, i, "F") for i in range(warmup)]
        next_f, next_b = warmup, 0
        while next_b < m:
            if next_f < m:
                seq.append(Task(s, next_f, "F"))
                next_f += 1
            seq.append(Task(s, next_b, "B"))
            next_b += 1
        order.append(seq)
    return order


def _dependencies(task: Task, num_stages: int) -> list[Task]:
    s, i = task.stage, task.micro_batch
    if task.kind == "F":
        return [Task(s - 1, i, "F")] if s > 0 else []
    deps = [Task(s, i, "F")]
    if s < num_stages - 1:
        deps.append(Task(s + 1, i, "B"))
    return deps


def _per_stage(value: float | Sequence[float], p: int, what: str) -> list[float]:
    if isinstance(value, int | float | np.integer | np.floating):
        values = [float(value)] * p
    else:
        values = [float(v) for v in value]
    if len(values) != p:
        raise ValueError(f"{what} needs one value per stage ({p}), got {len(values)}.")
    if any(not np.isfinite(v) or v < 0 for v in values):
        raise ValueError(f"{what} must be finite and >= 0, got {values}.")
    return values


def simulate(
    order: Sequence[Sequence[Task]],
    forward_times: float | Sequence[float] = 1.0,
    backward_times: float | Sequence[float] | None = None,
    comm_time: float = 0.0,
    label: str = "",
) -> Timeline:
    """Place the tasks of ``order`` in time: each device runs its tasks in the given order,
    each task as soon as its device is free and its inputs have arrived.

    Args:
        order: ``order[s]`` = tasks of stage ``s`` in execution order (e.g. from
            :func:`schedule_order`).
        forward_times: duration of one forward task, one number or one per stage.
        backward_times: duration of one backward task (default: same as forward).
        comm_time: delay for an activation or gradient to cross from one stage to the next.
        label: a name for the timeline (used as plot title).

    Raises:
        ValueError: bad times, or an order that can never finish (deadlock).
    """
    p = len(order)
    if p < 1:
        raise ValueError("order must have at least one stage.")
    fwd = _per_stage(forward_times, p, "forward_times")
    bwd = _per_stage(fwd if backward_times is None else backward_times, p, "backward_times")
    if comm_time < 0:
        raise ValueError(f"comm_time must be >= 0, got {comm_time}.")
    m = 1 + max((t.micro_batch for seq in order for t in seq), default=0)
    end: dict[Task, float] = {}
    placed: list[TimedTask] = []
    heads = [0] * p
    free = [0.0] * p
    remaining = sum(len(seq) for seq in order)
    while remaining:
        progressed = False
        for s in range(p):
            while heads[s] < len(order[s]):
                task = order[s][heads[s]]
                deps = _dependencies(task, p)
                if any(d not in end for d in deps):
                    break
                ready = max(
                    [end[d] + (comm_time if d.stage != task.stage else 0.0) for d in deps],
                    default=0.0,
                )
                start = max(free[s], ready)
                duration = fwd[s] if task.kind == "F" else bwd[s]
                end[task] = start + duration
                free[s] = end[task]
                placed.append(TimedTask(task, start, end[task]))
                heads[s] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = [str(order[s][heads[s]]) for s in range(p) if heads[s] < len(order[s])]
            raise ValueError(
                f"The schedule deadlocks: the next tasks {stuck} all wait for tasks that "
                "come later in their stage's order."
            )
    return Timeline(num_stages=p, num_micro_batches=m, tasks=placed, label=label)


def pipeline_schedule(
    num_stages: int,
    num_micro_batches: int,
    kind: str = "gpipe",
    forward_times: float | Sequence[float] = 1.0,
    backward_times: float | Sequence[float] | None = None,
    comm_time: float = 0.0,
) -> Timeline:
    """The GPipe or 1F1B schedule of ``p`` stages and ``m`` micro-batches, placed in time.

    With the defaults every task takes one time slot, which gives the textbook pictures.
    Pass measured per-stage times to see what this model would do on ``p`` devices.
    """
    order = schedule_order(num_stages, num_micro_batches, kind)
    label = f"{'GPipe' if kind == 'gpipe' else '1F1B'}: p={num_stages}, m={num_micro_batches}"
    return simulate(order, forward_times, backward_times, comm_time, label=label)


def ideal_bubble_fraction(num_stages: int, num_micro_batches: int) -> float:
    """``(p - 1) / (m + p - 1)``: the idle share of a GPipe/1F1B pipeline with equal stages."""
    _check_pm(num_stages, num_micro_batches)
    return (num_stages - 1) / (num_micro_batches + num_stages - 1)


def execution_order(num_stages: int, num_micro_batches: int, kind: str = "gpipe") -> list[Task]:
    """All tasks of a schedule as one sequence that respects every dependency.

    This is the order a single Python thread issues them in: sorted by their start time in
    the unit-time schedule (ties: lower stage first).
    """
    timeline = pipeline_schedule(num_stages, num_micro_batches, kind)
    ordered = sorted(timeline.tasks, key=lambda t: (t.start, t.task.stage))
    return [t.task for t in ordered]


@dataclass
class Timeline:
    """Tasks of a pipeline placed in time (simulated or measured)."""

    num_stages: int
    num_micro_batches: int
    tasks: list[TimedTask]
    label: str = ""
    unit: str = "slot"

    @property
    def start(self) -> float:
        return min((t.start for t in self.tasks), default=0.0)

    @property
    def makespan(self) -> float:
        """Time from the first task's start to the last task's end."""
        if not self.tasks:
            return 0.0
        return max(t.end for t in self.tasks) - self.start

    def busy(self) -> list[float]:
        """Total task time on each stage's device."""
        out = [0.0] * self.num_stages
        for t in self.tasks:
            out[t.task.stage] += t.duration
        return out

    @property
    def bubble_fraction(self) -> float:
        """Share of device time spent idle: ``1 - sum(busy) / (p * makespan)``."""
        span = self.makespan
        if span <= 0:
            return 0.0
        return 1.0 - sum(self.busy()) / (self.num_stages * span)

    def peak_in_flight(self) -> list[int]:
        """Per stage: the most micro-batches whose activations it holds at once.

        A stage holds micro-batch ``i`` from the start of ``F(s, i)`` to the end of
        ``B(s, i)`` (the stashed inputs and intermediate results its backward needs).
        """
        events: list[list[tuple[float, int]]] = [[] for _ in range(self.num_stages)]
        for t in self.tasks:
            if t.task.kind == "F":
                events[t.task.stage].append((t.start, 1))
            else:
                events[t.task.stage].append((t.end, -1))
        peaks = []
        for evs in events:
            level = peak = 0
            for _, delta in sorted(evs):  # at equal times -1 sorts first: free, then stash
                level += delta
                peak = max(peak, level)
            peaks.append(peak)
        return peaks

    def violations(self) -> list[str]:
        """Every way this timeline breaks the rules of a pipeline (empty when valid).

        Checks: each ``F``/``B`` of every stage and micro-batch appears exactly once; ``F``
        before its ``B``; ``F(s-1, i)`` before ``F(s, i)``; ``B(s+1, i)`` before
        ``B(s, i)``; at most one task at a time on each device.
        """
        problems: list[str] = []
        p, m = self.num_stages, self.num_micro_batches
        seen: dict[Task, TimedTask] = {}
        for t in self.tasks:
            if t.task in seen:
                problems.append(f"{t.task} appears more than once")
            seen[t.task] = t
            if t.end < t.start:
                problems.append(f"{t.task} ends before it starts")
        expected = {Task(s, i, k) for s in range(p) for i in range(m) for k in "FB"}
        for task in sorted(expected - set(seen)):
            problems.append(f"{task} is missing")
        for task in sorted(set(seen) - expected):
            problems.append(f"{task} is not a task of a p={p}, m={m} pipeline")
        eps = 1e-12
        for task, t in seen.items():
            for dep in _dependencies(task, p):
                if dep in seen and seen[dep].end > t.start + eps:
                    problems.append(f"{task} starts before {dep} ends")
        for s in range(p):
            on_device = sorted((t for t in self.tasks if t.task.stage == s), key=lambda t: t.start)
            for a, b in zip(on_device, on_device[1:], strict=False):
                if b.start < a.end - eps:
                    problems.append(f"stage {s} runs {a.task} and {b.task} at the same time")
        return problems

    def grid(self) -> list[list[str]]:
        """For unit-time schedules: ``grid[s][slot]`` = ``"F3"``/``"B0"`` or ``""`` (idle).

        Raises:
            ValueError: if task times are not whole time slots.
        """
        t0 = self.start
        slots = int(round(self.makespan))
        rows = [[""] * slots for _ in range(self.num_stages)]
        for t in self.tasks:
            a, b = t.start - t0, t.end - t0
            if abs(a - round(a)) > 1e-9 or abs(b - round(b)) > 1e-9:
                raise ValueError("grid() needs whole time slots; this timeline has other times.")
            for slot in range(int(round(a)), int(round(b))):
                rows[t.task.stage][slot] = f"{t.task.kind}{t.task.micro_batch}"
        return rows

    def to_text(self, stage_names: Sequence[str] | None = None) -> str:
        """A text Gantt chart of a unit-time schedule: one row per device, ``..`` = idle."""
        names = list(stage_names) if stage_names else [f"stage {s}" for s in range(self.num_stages)]
        width = max(len(n) for n in names)
        cell = max([2] + [len(c) for row in self.grid() for c in row])
        lines = []
        for name, row in zip(names, self.grid(), strict=True):
            cells = " ".join((c or "." * cell).rjust(cell) for c in row)
            lines.append(f"{name.ljust(width)} | {cells}")
        return "\n".join(lines)

    def summary(self) -> dict[str, object]:
        """Makespan, bubble fraction and peak in-flight micro-batches, as a dict."""
        return {
            "schedule": self.label,
            "makespan": self.makespan,
            "bubble fraction": self.bubble_fraction,
            "peak in flight per stage": self.peak_in_flight(),
        }


def bubble_table(
    num_stages: Iterable[int], micro_batches: Iterable[int], kinds: Sequence[str] = SCHEDULES
) -> pd.DataFrame:
    """Bubble fraction and peak in-flight micro-batches from simulated unit-time schedules,
    next to the formula ``(p-1)/(m+p-1)``: one row per ``(p, m)``."""
    rows = []
    ms = list(micro_batches)
    for p in num_stages:
        for m in ms:
            row: dict[str, object] = {"p": p, "m": m, "formula": ideal_bubble_fraction(p, m)}
            for kind in kinds:
                tl = pipeline_schedule(p, m, kind)
                row[f"bubble {kind}"] = tl.bubble_fraction
                row[f"peak in flight {kind}"] = max(tl.peak_in_flight())
            rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- plotting
def plot_gantt(
    timeline: Timeline,
    ax=None,
    title: str | None = None,
    stage_names: Sequence[str] | None = None,
    annotate: bool = True,
):
    """Draw a timeline as a Gantt chart: one row per device, forward tasks in blue,
    backward tasks in orange, the micro-batch number written on each box.

    Returns the matplotlib ``Axes``.
    """
    import matplotlib.pyplot as plt  # local: the module stays importable without matplotlib

    if ax is None:
        _, ax = plt.subplots(figsize=(10, 0.55 * timeline.num_stages + 1.2))
    colors = {"F": "#4C72B0", "B": "#DD8452"}
    t0 = timeline.start
    span = timeline.makespan or 1.0
    for t in timeline.tasks:
        y = timeline.num_stages - 1 - t.task.stage
        ax.broken_barh(
            [(t.start - t0, t.duration)], (y - 0.4, 0.8),
            facecolors=colors[t.task.kind], edgecolor="white", linewidth=0.6,
        )
        if annotate and t.duration > 0.025 * span:
            ax.text(
                t.start - t0 + t.duration / 2, y, str(t.task.micro_batch),
                ha="center", va="center", color="white", fontsize=8,
            )
    names = list(stage_names) if stage_names else [f"stage {s}" for s in range(timeline.num_stages)]
    ax.set_yticks(range(timeline.num_stages))
    ax.set_yticklabels(names[::-1])
    ax.set_xlim(0, span)
    ax.set_xlabel(f"time ({timeline.unit})")
    from matplotlib.patches import Patch

    ax.legend(
        handles=[Patch(color=colors["F"], label="forward"), Patch(color=colors["B"], label="backward")],
        loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False,
    )
    head = title if title is not None else timeline.label
    ax.set_title(f"{head} (bubble {timeline.bubble_fraction:.0%})" if head else "")
    return ax


# --------------------------------------------------------------------------- the pipeline
def per_example_sparse_ce(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    """Default loss: sparse categorical cross-entropy per example (softmax outputs)."""
    return keras.losses.sparse_categorical_crossentropy(y_true, y_pred)


@dataclass
class StepResult:
    """What one pipelined forward/backward pass over a batch produced."""

    loss: tf.Tensor  # batch-mean loss (sum of the micro-batch losses)
    gradients: list[list[tf.Tensor]]  # per stage, in the order of the stage's variables
    order: list[Task]  # tasks in the order they ran
    peak_in_flight: list[int]  # per stage, counted while running
    bytes_between_stages: int  # activations forward + gradients backward, all micro-batches
    timeline: Timeline | None = None  # measured wall-clock times when record=True

    @property
    def flat_gradients(self) -> list[tf.Tensor]:
        """All gradients in the unsplit model's variable order."""
        return [g for stage in self.gradients for g in stage]


@dataclass
class _Stash:
    tape: tf.GradientTape
    x_in: tf.Tensor
    target: tf.Tensor  # stage output, or the micro-batch loss on the last stage
    grad_in: tf.Tensor | None = field(default=None)


def _sync() -> None:
    """Wait for queued device work (GPUs run eager ops asynchronously; CPUs do not)."""
    if tf.config.list_logical_devices("GPU"):
        tf.test.experimental.sync_devices()


def _nbytes(t: tf.Tensor) -> int:
    return int(np.prod(t.shape)) * t.dtype.size


class Pipeline:
    """A Keras ``Sequential`` model cut into stages, each stage on its own device.

    Build one with :meth:`from_sequential`. Stage ``k`` is a ``keras.Sequential`` whose
    variables were created under ``tf.device(devices[k])``.
    """

    def __init__(self, stages: Sequence[keras.Model], devices: Sequence[str], source_name: str = ""):
        if len(stages) != len(devices):
            raise ValueError(f"{len(stages)} stages but {len(devices)} devices.")
        if not stages:
            raise ValueError("A pipeline needs at least one stage.")
        self.stages = list(stages)
        self.devices = list(devices)
        self.source_name = source_name

    # ----- construction
    @classmethod
    def from_sequential(
        cls,
        model: keras.Model,
        num_stages: int | None = None,
        *,
        devices: Sequence[str] | None = None,
        boundaries: Sequence[str] | None = None,
        balance: str = "flops",
        allow_reuse: bool = False,
    ) -> Pipeline:
        """Cut a built ``keras.Sequential`` into stages and place stage ``k`` on device ``k``.

        The stages are fresh copies of the layers, built under ``tf.device`` and given the
        model's current weights; the original model is left untouched (its variables stay
        where they are), so it serves as the unsplit reference.

        Args:
            model: a built ``keras.Sequential`` (give it a ``keras.Input``).
            num_stages: ``p``; default ``len(boundaries) + 1``, else ``len(devices)``, else
                the number of compute devices.
            devices: device names (default :func:`utils.devices.compute_devices`).
            boundaries: names of the layers that start stages 1..p-1 (optional; default:
                cut automatically with :func:`partition` on ``balance`` costs).
            balance: ``"flops"``, ``"params"`` or ``"layers"``.
            allow_reuse: allow fewer devices than stages (see :func:`stage_devices`).

        Raises:
            TypeError: ``model`` is not a ``keras.Sequential``.
            ValueError: an unbuilt model, unknown boundary names, too many stages.
            NotEnoughDevicesError: fewer devices than stages (message says what to do).
        """
        if not isinstance(model, keras.Sequential):
            raise TypeError(
                f"Pipeline.from_sequential needs a keras.Sequential, got {type(model).__name__}. "
                "Rewrite the model as a Sequential stack of layers (a chain), or build the "
                "stages yourself and pass them to Pipeline(stages, devices)."
            )
        if not model.built or not model.inputs:
            raise ValueError(
                "The model is not built: start it with keras.Input(shape=...) (or call it once "
                "on a batch) so every layer has its input shape and weights."
            )
        layers = model.layers
        if boundaries is not None:
            names = [layer.name for layer in layers]
            unknown = [b for b in boundaries if b not in names]
            if unknown:
                raise ValueError(f"Unknown boundary layer(s) {unknown}; the layers are {names}.")
            starts = [0] + [names.index(b) for b in boundaries]
            if starts != sorted(set(starts)):
                raise ValueError(
                    f"boundaries {list(boundaries)} must name layers in model order, each "
                    f"after the first layer ({names[0]!r}), without repeats."
                )
            if num_stages is not None and num_stages != len(starts):
                raise ValueError(
                    f"num_stages={num_stages} but {len(boundaries)} boundaries give {len(starts)} stages."
                )
            num_stages = len(starts)
        else:
            if num_stages is None:
                num_stages = len(devices) if devices is not None else len(_devices.compute_devices())
            starts = None
        devs = stage_devices(num_stages, devices, allow_reuse=allow_reuse)  # fails early, clearly
        if starts is None:
            starts = partition(layer_costs(model, balance), num_stages)
        if any(isinstance(layer, keras.layers.BatchNormalization) for layer in layers):
            warnings.warn(
                "The model has BatchNormalization: its batch statistics are computed per "
                "micro-batch, so pipelined gradients will not equal the unsplit model's.",
                stacklevel=2,
            )
        ends = starts[1:] + [len(layers)]
        stages = []
        shape = tuple(model.inputs[0].shape)
        dtype = model.inputs[0].dtype
        for k, (a, b) in enumerate(zip(starts, ends, strict=True)):
            with tf.device(devs[k]):
                clones = [type(layer).from_config(layer.get_config()) for layer in layers[a:b]]
                stage = keras.Sequential(
                    [keras.Input(shape=shape[1:], dtype=dtype), *clones], name=f"stage{k}"
                )
                for clone, layer in zip(clones, layers[a:b], strict=True):
                    clone.set_weights(layer.get_weights())
            shape = tuple(stage.outputs[0].shape)
            dtype = stage.outputs[0].dtype
            stages.append(stage)
        return cls(stages, devs, source_name=model.name)

    # ----- introspection
    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def trainable_variables(self) -> list:
        """All trainable variables, stage by stage (= the unsplit Sequential's order)."""
        return [v for stage in self.stages for v in stage.trainable_variables]

    def stage_table(self) -> pd.DataFrame:
        """One row per stage: device, layers, parameters, output shape (per example)."""
        rows = []
        for k, (stage, dev) in enumerate(zip(self.stages, self.devices, strict=True)):
            rows.append(
                {
                    "stage": k,
                    "device": short_device(dev) or dev,
                    "layers": ", ".join(layer.name for layer in stage.layers),
                    "params": stage.count_params(),
                    "output shape": str(tuple(stage.outputs[0].shape[1:])),
                    "output values/example": int(np.prod(stage.outputs[0].shape[1:])),
                }
            )
        return pd.DataFrame(rows)

    def variable_table(self) -> pd.DataFrame:
        """Every variable with the device it lives on, read from the variable itself."""
        rows = []
        for k, stage in enumerate(self.stages):
            for layer in stage.layers:
                for v in layer.weights:
                    rows.append(
                        {
                            "stage": k,
                            "layer": layer.name,
                            "variable": v.name,
                            "shape": str(tuple(v.shape)),
                            "device": short_device(v.value.device),
                        }
                    )
        return pd.DataFrame(rows)

    def copy_weights_from(self, model: keras.Model) -> None:
        """Load the unsplit model's current weights into the stages (same layer order)."""
        src = model.weights
        dst = [w for stage in self.stages for w in stage.weights]
        if [tuple(w.shape) for w in src] != [tuple(w.shape) for w in dst]:
            raise ValueError("The model's weights do not match the pipeline's stages.")
        for s, d in zip(src, dst, strict=True):
            d.assign(s)

    # ----- forward only
    def forward_trace(self, x: tf.Tensor | np.ndarray, training: bool = False) -> list[tf.Tensor]:
        """Run a batch through every stage on its device; return each stage's output.

        The input of stage ``k`` is copied to ``devices[k]`` first (the activation
        crossing devices), so each output's ``.device`` shows where that stage ran.
        """
        outs = []
        h = tf.convert_to_tensor(x)
        for stage, dev in zip(self.stages, self.devices, strict=True):
            with tf.device(dev):
                h = stage(tf.identity(h), training=training)
            outs.append(h)
        return outs

    def __call__(self, x: tf.Tensor | np.ndarray, training: bool = False) -> tf.Tensor:
        """Naive model parallelism: the batch goes through the stages one after another."""
        return self.forward_trace(x, training=training)[-1]

    # ----- forward + backward with micro-batches
    def compute_gradients(
        self,
        x: tf.Tensor | np.ndarray,
        y: tf.Tensor | np.ndarray,
        num_micro_batches: int = 1,
        schedule: str = "gpipe",
        loss_fn: LossFn | None = None,
        record: bool = False,
    ) -> StepResult:
        """Forward and backward of one batch as ``m`` micro-batches, in schedule order.

        Each ``F(s, i)`` copies its input to stage ``s``'s device, runs the stage under a
        ``GradientTape`` and stashes the tape; each ``B(s, i)`` takes the gradient arriving
        from stage ``s+1`` (or the micro-batch loss on the last stage), computes the
        gradients of the stage's variables and of its input, adds the former to the
        stage's accumulators and frees the stash.

        Args:
            x, y: the whole batch (inputs, labels).
            num_micro_batches: ``m`` (1 = naive model parallelism).
            schedule: ``"gpipe"`` or ``"1f1b"`` (same gradients, different order/memory).
            loss_fn: ``loss_fn(y_true, y_pred)`` -> per-example losses (default sparse
                categorical cross-entropy).
            record: measure each task's wall-clock start and end (adds a device sync per
                task on GPUs) and return them as ``result.timeline``.

        Returns:
            A :class:`StepResult` with the batch-mean loss and per-stage summed gradients.
        """
        loss_fn = loss_fn or per_example_sparse_ce
        x = tf.convert_to_tensor(x)
        y = tf.convert_to_tensor(y)
        batch = int(x.shape[0])
        if int(y.shape[0]) != batch:
            raise ValueError(f"x has {batch} examples but y has {int(y.shape[0])}.")
        p, m = self.num_stages, num_micro_batches
        xs, ys = split_batch(x, m), split_batch(y, m)
        order = execution_order(p, m, schedule)
        inv_batch = 1.0 / batch
        accum: list[list[tf.Tensor] | None] = [None] * p
        stash: list[dict[int, _Stash]] = [{} for _ in range(p)]
        arriving: dict[tuple[int, int], tf.Tensor] = {}  # (stage, mb) -> activation to consume
        grad_back: dict[tuple[int, int], tf.Tensor] = {}  # (stage, mb) -> d loss / d output
        peaks = [0] * p
        sent = 0
        losses = []
        timed: list[TimedTask] = []
        t_start = time.perf_counter()
        for task in order:
            s, i = task.stage, task.micro_batch
            stage, dev = self.stages[s], self.devices[s]
            t0 = time.perf_counter()
            with tf.device(dev):
                if task.kind == "F":
                    incoming = xs[i] if s == 0 else arriving.pop((s, i))
                    with tf.GradientTape() as tape:
                        x_in = tf.identity(incoming)  # the copy onto this stage's device
                        tape.watch(x_in)
                        out = stage(x_in, training=True)
                        if s == p - 1:
                            per_example = loss_fn(ys[i], out)
                            target = tf.reduce_sum(tf.cast(per_example, tf.float32)) * inv_batch
                            losses.append(target)
                        else:
                            target = out
                    if s < p - 1:
                        arriving[(s + 1, i)] = out
                        sent += _nbytes(out)
                    stash[s][i] = _Stash(tape, x_in, target)
                    peaks[s] = max(peaks[s], len(stash[s]))
                else:
                    st = stash[s].pop(i)
                    upstream = None if s == p - 1 else tf.identity(grad_back.pop((s, i)))
                    sources = list(stage.trainable_variables) + ([st.x_in] if s > 0 else [])
                    grads = st.tape.gradient(
                        st.target, sources, output_gradients=upstream,
                        unconnected_gradients=tf.UnconnectedGradients.ZERO,
                    )
                    n_vars = len(stage.trainable_variables)
                    var_grads = grads[:n_vars]
                    if s > 0:
                        grad_back[(s - 1, i)] = grads[n_vars]
                        sent += _nbytes(grads[n_vars])
                    if accum[s] is None:
                        accum[s] = list(var_grads)
                    else:
                        accum[s] = [a + g for a, g in zip(accum[s], var_grads, strict=True)]
            if record:
                _sync()
                t1 = time.perf_counter()
                timed.append(TimedTask(task, (t0 - t_start) * 1e3, (t1 - t_start) * 1e3))
        if stash != [{} for _ in range(p)] or arriving or grad_back:  # pragma: no cover
            raise RuntimeError("Internal error: the schedule left work unfinished.")
        with tf.device(self.devices[-1]):
            loss = tf.add_n(losses)
        timeline = None
        if record:
            label = f"measured on this machine ({schedule}, p={p}, m={m})"
            timeline = Timeline(p, m, timed, label=label, unit="ms")
        return StepResult(
            loss=loss,
            gradients=[list(a or []) for a in accum],
            order=order,
            peak_in_flight=peaks,
            bytes_between_stages=sent,
            timeline=timeline,
        )

    def apply_gradients(self, optimizer: keras.optimizers.Optimizer, gradients: Sequence[Sequence[tf.Tensor]]) -> None:
        """Apply per-stage gradients once. Optimizer slots are created next to each variable."""
        flat = [g for stage in gradients for g in stage]
        optimizer.apply_gradients(zip(flat, self.trainable_variables, strict=True))

    def train_step(
        self,
        optimizer: keras.optimizers.Optimizer,
        x: tf.Tensor | np.ndarray,
        y: tf.Tensor | np.ndarray,
        num_micro_batches: int = 1,
        schedule: str = "gpipe",
        loss_fn: LossFn | None = None,
    ) -> tf.Tensor:
        """One optimisation step: pipelined forward/backward, then one update. Returns the loss."""
        result = self.compute_gradients(x, y, num_micro_batches, schedule, loss_fn)
        self.apply_gradients(optimizer, result.gradients)
        return result.loss


# --------------------------------------------------------------------------- reference & checks
def reference_gradients(
    model: keras.Model,
    x: tf.Tensor | np.ndarray,
    y: tf.Tensor | np.ndarray,
    loss_fn: LossFn | None = None,
    num_micro_batches: int = 1,
) -> tuple[tf.Tensor, list[tf.Tensor]]:
    """Batch-mean loss and gradients of the unsplit model, on one device.

    With ``num_micro_batches=1`` (default) the whole batch goes through at once: the plain
    training step. With ``m > 1`` the unsplit model runs the same micro-batches as the
    pipeline, with the same loss scaling, and sums the gradients in micro-batch order:
    single-device gradient accumulation, which does the pipeline's arithmetic in the
    pipeline's order, so it isolates what the split into devices adds (nothing).
    """
    loss_fn = loss_fn or per_example_sparse_ce
    x, y = tf.convert_to_tensor(x), tf.convert_to_tensor(y)
    vars_ = model.trainable_variables
    zero = tf.UnconnectedGradients.ZERO
    if num_micro_batches == 1:
        with tf.GradientTape() as tape:
            out = model(x, training=True)
            loss = tf.reduce_mean(tf.cast(loss_fn(y, out), tf.float32))
        return loss, tape.gradient(loss, vars_, unconnected_gradients=zero)
    inv_batch = 1.0 / int(x.shape[0])
    losses, accum = [], None
    for xi, yi in zip(split_batch(x, num_micro_batches), split_batch(y, num_micro_batches), strict=True):
        with tf.GradientTape() as tape:
            out = model(xi, training=True)
            loss_i = tf.reduce_sum(tf.cast(loss_fn(yi, out), tf.float32)) * inv_batch
        grads = tape.gradient(loss_i, vars_, unconnected_gradients=zero)
        accum = list(grads) if accum is None else [a + g for a, g in zip(accum, grads, strict=True)]
        losses.append(loss_i)
    return tf.add_n(losses), accum


def reference_train_step(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    x: tf.Tensor | np.ndarray,
    y: tf.Tensor | np.ndarray,
    loss_fn: LossFn | None = None,
    num_micro_batches: int = 1,
) -> tf.Tensor:
    """One optimisation step of the unsplit model (see :func:`reference_gradients`)."""
    loss, grads = reference_gradients(model, x, y, loss_fn, num_micro_batches)
    optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
    return loss


def max_abs_diff(a: Sequence, b: Sequence) -> float:
    """Largest ``|a - b|`` over two equally long lists of same-shaped tensors or variables."""
    if len(a) != len(b):
        raise ValueError(f"Lists differ in length: {len(a)} vs {len(b)}.")
    worst = 0.0
    for k, (u, v) in enumerate(zip(a, b, strict=True)):
        u, v = np.asarray(u), np.asarray(v)
        if u.shape != v.shape:
            raise ValueError(f"Item {k}: shapes differ, {u.shape} vs {v.shape}.")
        if u.size:
            worst = max(worst, float(np.max(np.abs(u.astype(np.float64) - v.astype(np.float64)))))
    return worst


def compare_training(
    model: keras.Model,
    pipeline: Pipeline,
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    make_optimizer: Callable[[], keras.optimizers.Optimizer],
    num_micro_batches: int,
    schedule: str = "gpipe",
    loss_fn: LossFn | None = None,
    reference_micro_batches: int = 1,
) -> pd.DataFrame:
    """Train the unsplit model and the pipeline side by side on the same batches.

    Both start from ``model``'s current weights (they are loaded into the pipeline) and
    get a fresh optimizer from ``make_optimizer``. The unsplit model trains on whole
    batches (``reference_micro_batches=1``) or with single-device gradient accumulation
    over that many micro-batches. ``model`` is trained in place.

    Returns:
        One row per step: both losses, their absolute difference and the largest weight
        difference after the update.
    """
    pipeline.copy_weights_from(model)
    opt_ref, opt_pipe = make_optimizer(), make_optimizer()
    rows = []
    for step, (x, y) in enumerate(batches):
        loss_ref = float(reference_train_step(model, opt_ref, x, y, loss_fn, reference_micro_batches))
        loss_pipe = float(pipeline.train_step(opt_pipe, x, y, num_micro_batches, schedule, loss_fn))
        rows.append(
            {
                "step": step,
                "loss unsplit": loss_ref,
                "loss pipeline": loss_pipe,
                "|loss diff|": abs(loss_ref - loss_pipe),
                "max |weight diff|": max_abs_diff(model.trainable_variables, pipeline.trainable_variables),
            }
        )
    return pd.DataFrame(rows)


def time_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int = 5, stat: str = "median"
) -> dict[str, float]:
    """Wall-clock milliseconds of each function, timed in turns (a, b, a, b, ...).

    Interleaving makes the comparison fair on a shared machine whose load changes. Each
    function runs once untimed first (warm-up). On GPUs the devices are synchronised
    after each call. ``stat``: ``"median"`` of the repeats, or ``"min"`` (the run least
    disturbed by other programs, the usual choice on a busy machine).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    if stat not in ("median", "min"):
        raise ValueError(f"stat must be 'median' or 'min', got {stat!r}.")
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    _sync()
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    reduce = np.median if stat == "median" else np.min
    return {name: float(reduce(v)) for name, v in samples.items()}


def stage_times_from(pipeline: Pipeline, results: Iterable[StepResult]) -> pd.DataFrame:
    """Median wall-clock ms of one forward and one backward task per stage, taken from
    results recorded with ``compute_gradients(..., record=True)``. One row per stage."""
    samples: dict[tuple[int, str], list[float]] = {}
    for result in results:
        if result.timeline is None:
            raise ValueError("A result has no timeline: run compute_gradients(..., record=True).")
        for t in result.timeline.tasks:
            samples.setdefault((t.task.stage, t.task.kind), []).append(t.duration)
    if not samples:
        raise ValueError("No recorded results given.")
    rows = []
    for s in range(pipeline.num_stages):
        rows.append(
            {
                "stage": s,
                "device": short_device(pipeline.devices[s]) or pipeline.devices[s],
                "forward ms": float(np.median(samples[(s, "F")])),
                "backward ms": float(np.median(samples[(s, "B")])),
            }
        )
    return pd.DataFrame(rows)


def measure_stage_times(
    pipeline: Pipeline,
    x: tf.Tensor | np.ndarray,
    y: tf.Tensor | np.ndarray,
    num_micro_batches: int,
    repeats: int = 5,
    loss_fn: LossFn | None = None,
) -> pd.DataFrame:
    """Median wall-clock time of one forward and one backward task per stage, in ms.

    Runs ``repeats + 1`` recorded pipelined passes of the batch (the first warms up and is
    dropped) and takes the median over all micro-batches and passes. One row per stage.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    results = [
        pipeline.compute_gradients(x, y, num_micro_batches, loss_fn=loss_fn, record=True)
        for _ in range(repeats + 1)
    ]
    return stage_times_from(pipeline, results[1:])
