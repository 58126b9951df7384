"""How many bytes does training a model need on each device? A memory calculator.

It counts, per device, the four things that fill accelerator memory during training:

* **parameters** (the weights the forward pass reads),
* **gradients** (one value per parameter),
* **optimizer states** (SGD: none; momentum: one buffer; Adam: two; plus, in mixed
  precision, the fp32 master copy of the weights),
* **activations** (what the forward pass saves for the backward pass), from per-layer
  activation sizes, the micro-batch and the recomputation policy,

under data (``dp``), tensor (``tp``, optionally with sequence parallelism ``sp``) and
pipeline (``pp``) parallelism and ZeRO stages 1-3 (Rajbhandari et al. 2019), which
partition optimizer states (1), gradients (2) and parameters (3) over the data-parallel
group. :func:`transformer_spec` describes GPT-style and Llama/Mistral-style models
(grouped-query attention, SwiGLU MLP, untied embeddings) from their published sizes.

Bytes per parameter (``precision``)
-----------------------------------
========================  ======  =========  ==================================  ========
precision                 params  gradients  optimizer (SGD / momentum / Adam)    acts
========================  ======  =========  ==================================  ========
``"fp32"``                4       4          0 / 4 / 8                            4
``"mixed"`` (ZeRO paper)  2       2          4 / 8 / 12 (fp32 master copy + …)     2
``"keras_mixed"``         4       4          0 / 4 / 8                            2
========================  ======  =========  ==================================  ========

``"mixed"`` is the fp16/bf16 recipe of the ZeRO and Megatron papers: 16-bit weights and
gradients plus an fp32 master copy inside the optimizer, so Adam costs ``K = 12`` bytes per
parameter of optimizer state. ``"keras_mixed"`` is what Keras's ``mixed_float16`` /
``mixed_bfloat16`` policies do: float32 variables (and gradients), 16-bit computation,
so only the activations shrink.

Simplifications (stated so that you can judge the numbers)
-----------------------------------------------------------
* Temporary buffers, communication buckets, the CUDA context and fragmentation are not
  counted; real frameworks need 10-30% on top.
* Tensor parallelism splits the parameters and the "shardable" activations of layers
  marked ``tensor_parallel`` evenly over ``tp`` devices (Megatron-LM); the rest stays
  replicated.
* Pipeline parallelism cuts the layers into ``pp`` contiguous stages with the most even
  parameter split; the numbers reported are those of the fullest stage. Under 1F1B the
  first stage keeps ``min(pp, num_microbatches)`` micro-batches in flight, under GPipe all
  of them.
* Recomputation (Chen et al. 2016, ``tf.recompute_grad``) keeps only the outputs of
  segment boundaries and recomputes one segment at a time during the backward pass.

Units: all results are bytes; :data:`GB` is 10**9 bytes, as in the ZeRO paper.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache

import pandas as pd

GB = 1e9

STRATEGIES = ("data", "zero1", "zero2", "zero3", "tensor", "pipeline")

_SLOTS = {"sgd": 0, "momentum": 1, "adam": 2}


def bytes_per_param(precision: str) -> tuple[int, int]:
    """Bytes of one parameter and of one gradient value under ``precision``."""
    return (2, 2) if precision == "mixed" else (4, 4)


def optimizer_bytes_per_param(optimizer: str, precision: str) -> int:
    """The ZeRO paper's ``K``: optimizer-state bytes per parameter.

    >>> optimizer_bytes_per_param("adam", "mixed")  # fp32 master copy, momentum, variance
    12
    >>> optimizer_bytes_per_param("sgd", "fp32")
    0
    """
    master = 4 if precision == "mixed" else 0
    return master + 4 * _SLOTS[optimizer]


def activation_bytes_per_value(precision: str) -> int:
    """Bytes of one stored activation value: 4 in fp32, 2 under either mixed precision."""
    return 4 if precision == "fp32" else 2


# --------------------------------------------------------------------------- model specs


@dataclass(frozen=True)
class LayerSpec:
    """One layer (or block) of a model, as the calculator sees it.

    Attributes:
        name: label used in tables.
        params: number of trainable parameters.
        activations: values *per sample* this layer keeps for the backward pass.
        boundary: values per sample of the layer's output, i.e. what a recomputation
            checkpoint after this layer keeps. Defaults to ``activations``.
        tensor_parallel: whether tensor parallelism splits this layer (its parameters
            and activations) over ``tp`` devices. A data-parallel conv trunk is ``False``.
        replicated_activations: the part of ``activations`` that stays whole on every
            tensor-parallel device (layer-norm inputs, dropout masks, ...).
    """

    name: str
    params: int
    activations: float = 0.0
    boundary: float | None = None
    tensor_parallel: bool = True
    replicated_activations: float = 0.0

    @property
    def checkpoint(self) -> float:
        """Values per sample a checkpoint after this layer stores."""
        return self.activations if self.boundary is None else self.boundary

    def activations_per_device(self, tp: int, sp: bool = False) -> float:
        """Saved values per sample on one of ``tp`` tensor-parallel devices; with sequence
        parallelism (``sp``, Korthikanti et al. 2022) the replicated part is split too."""
        if not self.tensor_parallel:
            return self.activations
        if sp:
            return self.activations / tp
        return self.replicated_activations + (self.activations - self.replicated_activations) / tp

    def params_per_device(self, tp: int) -> float:
        """Parameters on one of ``tp`` tensor-parallel devices."""
        return self.params / tp if self.tensor_parallel else float(self.params)


@dataclass(frozen=True)
class ModelSpec:
    """A model as a sequence of :class:`LayerSpec` (in forward order).

    Attributes:
        name: label used in tables.
        layers: the layers, in order.
        max_tensor_parallel: largest useful ``tp`` (e.g. the number of attention heads);
            ``None`` means no limit.
    """

    name: str
    layers: tuple[LayerSpec, ...]
    max_tensor_parallel: int | None = None

    @property
    def n_params(self) -> int:
        """Total trainable parameters."""
        return sum(layer.params for layer in self.layers)

    @property
    def activations_per_sample(self) -> float:
        """Values per sample saved for backward without recomputation."""
        return sum(layer.activations for layer in self.layers)

    @classmethod
    def from_params(
        cls, name: str, n_params: int, activations_per_sample: float = 0.0
    ) -> ModelSpec:
        """A one-layer model: handy when only the parameter count matters (ZeRO figure 1)."""
        return cls(name, (LayerSpec(name, int(n_params), activations_per_sample),))


def spec_from_keras(
    model: object,
    name: str | None = None,
    tensor_parallel_layers: Iterable[str] = (),
) -> ModelSpec:
    """Build a :class:`ModelSpec` from a built Keras model, one entry per layer.

    Each layer's activations are its output size per sample (as in
    ``utils.models.layer_table``), which is also its checkpoint size.

    Args:
        model: a built ``keras.Model`` (e.g. ``utils.models.build_seed_cnn()``).
        name: label; defaults to ``model.name``.
        tensor_parallel_layers: names of layers that tensor parallelism splits; all others
            (e.g. a data-parallel conv trunk) are replicated on every ``tp`` device.
    """
    tp_names = set(tensor_parallel_layers)
    layers = []
    for layer in model.layers:  # type: ignore[attr-defined]
        values = math.prod(int(d) for d in layer.output.shape[1:])
        layers.append(
            LayerSpec(
                layer.name,
                int(layer.count_params()),
                float(values),
                tensor_parallel=layer.name in tp_names,
            )
        )
    return ModelSpec(name or model.name, tuple(layers))  # type: ignore[attr-defined]


def transformer_spec(
    name: str,
    n_layers: int,
    d_model: int,
    n_heads: int,
    seq_len: int,
    vocab_size: int,
    d_ff: int | None = None,
    tied_embeddings: bool = True,
    *,
    n_kv_heads: int | None = None,
    gated_mlp: bool = False,
    biases: bool = True,
    rms_norm: bool = False,
    learned_positions: bool = True,
) -> ModelSpec:
    """A decoder-only transformer: embeddings, ``n_layers`` blocks, LM head.

    The defaults are GPT-2/3: learned positions, biases, layer norms, a 2-matrix GELU MLP,
    tied embeddings. Llama/Mistral-style models: ``n_kv_heads`` (grouped-query attention:
    keys and values have ``n_kv_heads`` heads), ``gated_mlp=True`` (SwiGLU: 3 matrices),
    ``biases=False``, ``rms_norm=True`` (a gain, no bias), ``learned_positions=False``
    (rotary) and ``tied_embeddings=False``.

    Activations per block and sample follow Korthikanti et al. 2022 ("Reducing activation
    recomputation in large transformer models"), converted from 16-bit bytes to values:
    ``9 s h + 2 s d_ff + 2.5 a s^2`` (``34 s h + 5 a s^2`` bytes for ``d_ff = 4h``), of which
    ``5 s h`` (layer-norm inputs, block inputs, dropout masks) is not split by tensor
    parallelism without sequence parallelism. A checkpoint keeps the block input, ``s h``.
    The LM head keeps the logits, ``s V`` values (vocabulary-parallel under ``tp``).
    """
    d_ff = 4 * d_model if d_ff is None else d_ff
    s, h, a = seq_len, d_model, n_heads
    kv = h * (n_kv_heads or n_heads) // n_heads  # width of the keys (and of the values)
    norm = h if rms_norm else 2 * h
    attention = 2 * h * h + 2 * h * kv + (2 * h + 2 * kv if biases else 0)  # q, o; k, v
    mlp = (3 if gated_mlp else 2) * h * d_ff + ((d_ff + h) if biases else 0)
    block_params = attention + mlp + 2 * norm
    embed = LayerSpec("embedding", vocab_size * h + (s * h if learned_positions else 0), float(s * h))
    block_acts = 9 * s * h + 2 * s * d_ff + 2.5 * a * s * s
    blocks = [
        LayerSpec(
            f"block{i + 1}",
            block_params,
            block_acts,
            boundary=float(s * h),
            replicated_activations=float(5 * s * h),
        )
        for i in range(n_layers)
    ]
    head_params = norm + (0 if tied_embeddings else vocab_size * h)  # final norm (+ untied head)
    head = LayerSpec("lm_head", head_params, float(s * vocab_size), boundary=float(s * vocab_size))
    return ModelSpec(name, (embed, *blocks, head), max_tensor_parallel=n_heads)


# --------------------------------------------------------------------- layout & training


@dataclass(frozen=True)
class Layout:
    """How devices are arranged: ``dp × tp × pp`` devices and a ZeRO stage (0 = off).

    ZeRO partitions over the ``dp`` devices that hold the same shard: stage 1 the
    optimizer states, stage 2 also the gradients, stage 3 also the parameters.
    """

    dp: int = 1
    tp: int = 1
    pp: int = 1
    zero: int = 0
    sp: bool = False  # sequence parallelism over the tp group (Korthikanti et al. 2022)

    @property
    def devices(self) -> int:
        """Total number of devices, ``dp * tp * pp``."""
        return self.dp * self.tp * self.pp

    def __str__(self) -> str:
        zero = f", ZeRO-{self.zero}" if self.zero else ""
        return f"dp={self.dp} x tp={self.tp}{' (sp)' if self.sp else ''} x pp={self.pp}{zero}"


@dataclass(frozen=True)
class Training:
    """What the training run does, beyond the layout.

    Attributes:
        optimizer: ``"sgd"``, ``"momentum"`` or ``"adam"``.
        precision: ``"fp32"``, ``"mixed"`` (16-bit weights + fp32 master copy) or
            ``"keras_mixed"`` (fp32 weights, 16-bit activations); see the module docstring.
        micro_batch: samples one data-parallel replica runs forward at a time (gradient
            accumulation over micro-batches reaches any global batch without more memory).
        recompute: ``"none"``; ``"full"`` (checkpoint every layer); ``"sqrt"`` (about
            ``sqrt(L)`` segments, Chen et al. 2016); or an int, the number of segments.
        pipeline_schedule: ``"1f1b"`` or ``"gpipe"`` (how many micro-batches a stage keeps).
        num_microbatches: micro-batches per step under pipeline parallelism (default
            ``pp``).
        fp32_grads: under ``"mixed"``, gradients accumulated in float32 (Megatron-LM's
            default): 4 bytes per gradient value instead of 2.
    """

    optimizer: str = "adam"
    precision: str = "mixed"
    micro_batch: int = 1
    recompute: str | int = "none"
    pipeline_schedule: str = "1f1b"
    num_microbatches: int | None = None
    fp32_grads: bool = False  # "mixed": accumulate gradients in float32 (4 bytes, not 2)


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per device (fullest pipeline stage) of each part, and their total."""

    params: float
    grads: float
    optimizer: float
    activations: float
    layout: Layout = field(default_factory=Layout)
    training: Training = field(default_factory=Training)

    @property
    def total(self) -> float:
        """Sum of the four parts, in bytes."""
        return self.params + self.grads + self.optimizer + self.activations

    @property
    def model_states(self) -> float:
        """Parameters + gradients + optimizer states (what ZeRO partitions), in bytes."""
        return self.params + self.grads + self.optimizer

    def as_dict(self, unit: float = GB) -> dict[str, float]:
        """The parts and total divided by ``unit`` (default GB = 1e9 bytes)."""
        return {
            "params": self.params / unit,
            "grads": self.grads / unit,
            "optimizer": self.optimizer / unit,
            "activations": self.activations / unit,
            "total": self.total / unit,
        }


# ------------------------------------------------------------------------------ estimate


def _segments(n_layers: int, recompute: str | int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) segments of ``n_layers`` layers for a recompute policy."""
    if recompute == "none":
        return [(0, n_layers)]
    if recompute == "full":
        k = n_layers
    elif recompute == "sqrt":
        k = max(1, math.ceil(math.sqrt(n_layers)))
    else:
        k = min(int(recompute), n_layers)
    bounds = [round(i * n_layers / k) for i in range(k + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(k) if bounds[i + 1] > bounds[i]]


def activation_values(
    layers: Sequence[LayerSpec],
    tp: int = 1,
    recompute: str | int = "none",
    in_flight: int = 1,
    sp: bool = False,
) -> float:
    """Values per sample that stay in memory for backward, on one device.

    Without recomputation: every layer's saved activations, for each of ``in_flight``
    micro-batches. With it: only the segment-boundary checkpoints per micro-batch, plus the
    activations of the one segment being recomputed (the peak during backward).
    """
    if not layers:
        return 0.0
    acts = [layer.activations_per_device(tp, sp) for layer in layers]
    if recompute == "none":
        return in_flight * sum(acts)
    segs = _segments(len(layers), recompute)
    checkpoints = sum(layers[stop - 1].checkpoint for _, stop in segs)
    peak_segment = max(sum(acts[start:stop]) for start, stop in segs)
    return in_flight * checkpoints + peak_segment


def partition(costs: Sequence[float], num_stages: int) -> list[int]:
    """Cut a chain of layers with ``costs`` into ``num_stages`` contiguous, non-empty stages.

    Minimises the cost of the most expensive stage (the pipeline's bottleneck), then the
    sum of squared stage costs (balance), then prefers stages that start with a layer of
    non-zero cost (so a pooling layer stays with the convolution before it).

    Returns:
        The index of the first layer of each stage (``[0, ...]``, length ``num_stages``).
    """
    n = len(costs)
    if not 1 <= num_stages <= n:
        raise ValueError(
            f"Cannot cut {n} layers into {num_stages} non-empty stages; use 1 <= num_stages <= {n}."
        )
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    # best[k][j]: best key for the first j layers in k stages; the key compares
    # (max stage cost, sum of squares, number of later stages starting on a zero-cost layer)
    inf = (math.inf, math.inf, math.inf)
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    prev = [[-1] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = (0.0, 0.0, 0)
    for k in range(1, num_stages + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                b = best[k - 1][i]
                c = prefix[j] - prefix[i]
                key = (max(b[0], c), b[1] + c * c, b[2] + (i > 0 and costs[i] == 0))
                if key < best[k][j]:
                    best[k][j], prev[k][j] = key, i
    starts, j = [], n
    for k in range(num_stages, 0, -1):
        j = prev[k][j]
        starts.append(j)
    return starts[::-1]


_cached_partition = lru_cache(maxsize=256)(partition)  # the sweeps ask the same cuts often


def pipeline_stages(model: ModelSpec, pp: int) -> list[tuple[LayerSpec, ...]]:
    """Cut the model into ``pp`` contiguous stages with the most even parameter split.

    Raises:
        ValueError: if ``pp`` exceeds the number of layers.
    """
    if pp > len(model.layers):
        raise ValueError(
            f"pp={pp} pipeline stages need at least {pp} layers, but {model.name!r} has "
            f"{len(model.layers)}. Use pp <= {len(model.layers)}."
        )
    starts = _cached_partition(tuple(layer.params for layer in model.layers), pp)
    return [model.layers[a:b] for a, b in zip(starts, [*starts[1:], len(model.layers)], strict=True)]


def estimate(
    model: ModelSpec, layout: Layout | None = None, training: Training | None = None
) -> MemoryBreakdown:
    """Bytes per device needed to train ``model`` with ``layout`` and ``training``.

    Reports the fullest pipeline stage (for ``pp = 1``, the whole model).

    Raises:
        ValueError: if ``tp`` exceeds the model's ``max_tensor_parallel`` or ``pp`` its
            number of layers.
    """
    layout = Layout() if layout is None else layout
    training = Training() if training is None else training
    if model.max_tensor_parallel is not None and layout.tp > model.max_tensor_parallel:
        raise ValueError(
            f"tp={layout.tp} exceeds what {model.name!r} can split ({model.max_tensor_parallel}, "
            "e.g. its number of attention heads). Use a smaller tp and add pp or dp instead."
        )
    p_bytes, g_bytes = bytes_per_param(training.precision)
    g_bytes = 4 if training.fp32_grads else g_bytes
    k = optimizer_bytes_per_param(training.optimizer, training.precision)
    a_bytes = activation_bytes_per_value(training.precision)
    m = layout.pp if training.num_microbatches is None else training.num_microbatches
    dp = layout.dp
    best: MemoryBreakdown | None = None
    for index, stage in enumerate(pipeline_stages(model, layout.pp)):
        n = sum(layer.params_per_device(layout.tp) for layer in stage)
        params = n * p_bytes / (dp if layout.zero >= 3 else 1)
        grads = n * g_bytes / (dp if layout.zero >= 2 else 1)
        optim = n * k / (dp if layout.zero >= 1 else 1)
        if layout.pp == 1:
            in_flight = 1
        elif training.pipeline_schedule == "gpipe":
            in_flight = m
        else:  # 1F1B: stage i keeps at most pp - i micro-batches in flight
            in_flight = min(layout.pp - index, m)
        acts = activation_values(stage, layout.tp, training.recompute, in_flight, layout.sp)
        acts *= training.micro_batch * a_bytes
        candidate = MemoryBreakdown(params, grads, optim, acts, layout, training)
        if best is None or candidate.total > best.total:
            best = candidate
    assert best is not None
    return best


# ------------------------------------------------------------------------------ tables


def breakdown_table(
    rows: Iterable[tuple[str, ModelSpec, Layout, Training]], unit: float = GB
) -> pd.DataFrame:
    """One row per ``(label, model, layout, training)``: parameter count and memory per device.

    Columns: ``case``, ``model``, ``parameters`` (count), ``layout``, then ``params``,
    ``grads``, ``optimizer``, ``activations`` and ``total`` in ``unit`` (default GB).
    """
    out = []
    for label, model, layout, training in rows:
        b = estimate(model, layout, training)
        out.append(
            {
                "case": label,
                "model": model.name,
                "parameters": model.n_params,
                "layout": str(layout),
                **b.as_dict(unit),
            }
        )
    return pd.DataFrame(out)


def strategy_sweep(
    model: ModelSpec,
    device_counts: Iterable[int],
    training: Training | None = None,
    strategies: Iterable[str] = STRATEGIES,
    unit: float = GB,
) -> pd.DataFrame:
    """Memory per device vs number of devices for each pure strategy (long format).

    Combinations a model cannot run (``tp`` above its head count, ``pp`` above its layer
    count) are left out rather than raising.
    """
    training = Training() if training is None else training
    rows = []
    for strategy in strategies:
        for n in device_counts:
            zero = int(strategy[-1]) if strategy.startswith("zero") else 0
            layout = {"tensor": Layout(tp=n), "pipeline": Layout(pp=n)}.get(strategy, Layout(dp=n, zero=zero))
            try:
                b = estimate(model, layout, training)
            except ValueError:
                continue
            rows.append(
                {
                    "strategy": strategy,
                    "devices": n,
                    "layout": str(layout),
                    "memory": b.total / unit,
                }
            )
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------ smallest layout


@dataclass(frozen=True)
class Fit:
    """The answer of :func:`smallest_layout`: a layout, the training settings, the bytes."""

    layout: Layout
    training: Training
    breakdown: MemoryBreakdown
    device_bytes: float

    @property
    def devices(self) -> int:
        """Number of devices the layout uses."""
        return self.layout.devices

    def __str__(self) -> str:
        rc = self.training.recompute
        rc_text = "" if rc == "none" else f", recompute={rc}"
        plural = "device" if self.layout.devices == 1 else "devices"
        return (
            f"{self.layout.devices} {plural}: {self.layout}{rc_text} -> "
            f"{self.breakdown.total / GB:.1f} GB of {self.device_bytes / GB:.1f} GB per device"
        )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def smallest_layout(
    model: ModelSpec,
    device_gb: float,
    training: Training | None = None,
    *,
    max_devices: int = 4096,
    device_counts: Iterable[int] | None = None,
    max_tp: int = 8,
    zero_stages: Iterable[int] = (0, 1, 2, 3),
    recompute_options: Iterable[str | int] = ("none", "full"),
    usable_fraction: float = 1.0,
) -> Fit:
    """Answer "what is the smallest layout that fits my model on devices of X GB?".

    Tries device counts in increasing order (powers of two up to ``max_devices`` unless
    ``device_counts`` is given) and, for each, every ``dp × tp × pp`` factorisation,
    ZeRO stage and recomputation option. Returns the first count at which something fits;
    among the layouts that fit at that count it prefers, in order: no recomputation
    (it costs about a third more compute), no ZeRO-3 (50% more communication), fewer
    pipeline stages (bubble), smaller ``tp`` (all-reduces in every layer), lower ZeRO stage.

    Args:
        model: what to train.
        device_gb: memory of one device in GB (1e9 bytes).
        training: optimizer, precision, micro-batch; its ``recompute`` is overridden by
            ``recompute_options``.
        max_devices: largest device count tried.
        device_counts: explicit counts to try instead of powers of two.
        max_tp: largest tensor-parallel degree (8 = one node with NVLink, by convention).
        zero_stages: ZeRO stages allowed.
        recompute_options: recomputation policies allowed.
        usable_fraction: share of ``device_gb`` the model states and activations may use
            (e.g. 0.8 leaves room for buffers and fragmentation).

    Raises:
        ValueError: on bad arguments, or when nothing fits within ``max_devices``; the
            message says how close the best layout came and what to change.
    """
    training = Training() if training is None else training
    capacity = device_gb * GB * usable_fraction
    if device_counts is None:
        counts = [2**i for i in range(int(math.log2(max_devices)) + 1)]
    else:
        counts = sorted(set(device_counts))
    zero_stages = tuple(zero_stages)
    options = tuple(recompute_options)
    tp_limit = min(max_tp, model.max_tensor_parallel or max_tp)
    smallest_seen: MemoryBreakdown | None = None
    for n in counts:
        fits: list[tuple[tuple, Fit]] = []
        for tp in _divisors(n):
            if tp > tp_limit:
                continue
            for pp in _divisors(n // tp):
                if pp > len(model.layers):
                    continue
                dp = n // (tp * pp)
                for zero in zero_stages:
                    if zero and dp == 1:
                        continue  # ZeRO partitions over dp; with dp = 1 it changes nothing
                    for rc in options:
                        layout = Layout(dp=dp, tp=tp, pp=pp, zero=zero)
                        tr = replace(training, recompute=rc)
                        b = estimate(model, layout, tr)
                        if smallest_seen is None or b.total < smallest_seen.total:
                            smallest_seen = b
                        if b.total <= capacity:
                            key = (rc != "none", zero == 3, pp, tp, zero)
                            fits.append((key, Fit(layout, tr, b, capacity)))
        if fits:
            return min(fits, key=lambda item: item[0])[1]
    assert smallest_seen is not None
    raise ValueError(
        f"{model.name!r} ({model.n_params / 1e9:.2f}B parameters) does not fit on devices of "
        f"{device_gb} GB (usable {capacity / GB:.1f} GB) with up to {counts[-1]} devices: the "
        f"best layout tried, {smallest_seen.layout} with recompute={smallest_seen.training.recompute!r}, "
        f"needs {smallest_seen.total / GB:.1f} GB per device. Raise max_devices, lower the "
        "micro-batch, allow ZeRO-3 and recomputation, or use devices with more memory."
    )
