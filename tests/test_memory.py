"""Tests for utils.memory: ZeRO figure 1, bytes per part, parallelism, recomputation, search."""

from __future__ import annotations

import pandas as pd
import pytest

from utils import memory
from utils.memory import GB, LayerSpec, Layout, ModelSpec, Training


# ----------------------------------------------------------------- ZeRO paper, figure 1
@pytest.mark.parametrize(
    ("zero", "expected_gb"),
    [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)],
)
def test_zero_figure1_7_5b_adam_mixed_64_devices(zero: int, expected_gb: float) -> None:
    """Rajbhandari et al. 2019, fig. 1: Ψ = 7.5B, K = 12, N_d = 64."""
    model = ModelSpec.from_params("7.5B", 7_500_000_000)
    training = Training(optimizer="adam", precision="mixed")
    got = memory.estimate(model, Layout(dp=64, zero=zero), training)
    assert round(got.total / GB, 1) == expected_gb
    assert got.activations == 0


def zero_figure1(n_params: float = 7.5e9, n_devices: int = 64, k: int = 12) -> pd.DataFrame:
    """The ZeRO paper's figure 1 from the paper's closed-form formulas.

    Baseline ``(2+2+K)Ψ``; ``P_os``: ``4Ψ + KΨ/N``; ``P_os+g``: ``2Ψ + (2+K)Ψ/N``;
    ``P_os+g+p``: ``(4+K)Ψ/N`` bytes per device. Useful to compare against :func:`estimate`.
    """
    psi, n = float(n_params), n_devices
    rows = {
        "baseline": (2 + 2 + k) * psi,
        "P_os (ZeRO-1)": 2 * psi + 2 * psi + k * psi / n,
        "P_os+g (ZeRO-2)": 2 * psi + (2 + k) * psi / n,
        "P_os+g+p (ZeRO-3)": (2 + 2 + k) * psi / n,
    }
    return pd.DataFrame({"stage": list(rows), "GB per device": [v / GB for v in rows.values()]})


def test_zero_figure1_closed_form_agrees_with_estimate() -> None:
    table = zero_figure1()
    model = ModelSpec.from_params("7.5B", 7_500_000_000)
    est = [memory.estimate(model, Layout(dp=64, zero=z)).total / GB for z in range(4)]
    assert table["GB per device"].tolist() == pytest.approx(est)
    assert table["GB per device"].round(1).tolist() == [120.0, 31.4, 16.6, 1.9]


def test_k_matches_zero_paper_and_optimizer_slots() -> None:
    assert memory.optimizer_bytes_per_param("adam", "mixed") == 12
    assert memory.optimizer_bytes_per_param("momentum", "mixed") == 8
    assert memory.optimizer_bytes_per_param("sgd", "mixed") == 4
    assert memory.optimizer_bytes_per_param("adam", "fp32") == 8
    assert memory.optimizer_bytes_per_param("momentum", "keras_mixed") == 4
    assert memory.optimizer_bytes_per_param("sgd", "fp32") == 0


def test_single_device_fp32_parts() -> None:
    model = ModelSpec(
        "toy", (LayerSpec("a", 1000, activations=50), LayerSpec("b", 500, activations=10))
    )
    b = memory.estimate(
        model, Layout(), Training(optimizer="momentum", precision="fp32", micro_batch=8)
    )
    assert b.params == 1500 * 4
    assert b.grads == 1500 * 4
    assert b.optimizer == 1500 * 4
    assert b.activations == 60 * 8 * 4
    assert b.total == pytest.approx(b.model_states + b.activations)


def test_keras_mixed_keeps_fp32_weights_but_halves_activations() -> None:
    model = ModelSpec("toy", (LayerSpec("a", 1000, activations=100),))
    fp32 = memory.estimate(model, training=Training(precision="fp32", micro_batch=4))
    km = memory.estimate(model, training=Training(precision="keras_mixed", micro_batch=4))
    assert km.model_states == fp32.model_states
    assert km.activations == fp32.activations / 2


# ------------------------------------------------------------------------ parallelism
def test_data_parallel_replicates_and_zero_partitions_over_dp_only() -> None:
    model = ModelSpec.from_params("m", 1_000_000)
    one = memory.estimate(model, Layout(dp=1))
    dp8 = memory.estimate(model, Layout(dp=8))
    assert dp8.total == one.total  # plain data parallelism saves nothing per device
    z3 = memory.estimate(model, Layout(dp=8, tp=2, zero=3))
    assert z3.model_states == pytest.approx(one.model_states / 16)


def test_tensor_parallel_splits_only_marked_layers() -> None:
    model = ModelSpec(
        "cnn-like",
        (
            LayerSpec("conv", 100, activations=1000, tensor_parallel=False),
            LayerSpec("dense", 800, activations=80),
        ),
    )
    tr = Training(precision="fp32", optimizer="sgd")
    b = memory.estimate(model, Layout(tp=4), tr)
    assert b.params == (100 + 800 / 4) * 4
    assert b.activations == (1000 + 80 / 4) * 4


def test_replicated_activations_are_not_split_by_tp() -> None:
    layer = LayerSpec("block", 10, activations=100, replicated_activations=20)
    assert layer.activations_per_device(4) == 20 + 80 / 4


def test_pipeline_balances_params_and_reports_fullest_stage() -> None:
    model = ModelSpec(
        "chain",
        tuple(LayerSpec(f"l{i}", p, activations=1) for i, p in enumerate([10, 10, 10, 30])),
    )
    stages = memory.pipeline_stages(model, 2)
    assert [tuple(layer.name for layer in s) for s in stages] == [("l0", "l1", "l2"), ("l3",)]
    b = memory.estimate(model, Layout(pp=2), Training(precision="fp32", optimizer="sgd"))
    # stage 0: 30 params, 3 values x 2 in flight; stage 1: 30 params, 1 value x 1 in flight
    assert b.params == 30 * 4
    assert b.activations == 3 * 2 * 4


def test_gpipe_keeps_all_microbatches_1f1b_at_most_pp() -> None:
    model = ModelSpec("c", tuple(LayerSpec(f"l{i}", 1, activations=10) for i in range(4)))
    g = memory.estimate(
        model, Layout(pp=2), Training(pipeline_schedule="gpipe", num_microbatches=8)
    )
    f = memory.estimate(model, Layout(pp=2), Training(pipeline_schedule="1f1b", num_microbatches=8))
    assert g.activations == 8 * 20 * 2
    assert f.activations == 2 * 20 * 2


# ---------------------------------------------------------------------- recomputation
def test_recompute_full_and_sqrt() -> None:
    layers = tuple(LayerSpec(f"l{i}", 0, activations=10, boundary=1) for i in range(16))
    assert memory.activation_values(layers, recompute="none") == 160
    # every layer a segment: 16 checkpoints + one layer recomputed
    assert memory.activation_values(layers, recompute="full") == 16 + 10
    # 4 segments of 4: 4 checkpoints + one segment (40)
    assert memory.activation_values(layers, recompute="sqrt") == 4 + 40
    assert memory.activation_values(layers, recompute=2) == 2 + 80


def test_recompute_never_increases_memory_for_transformers() -> None:
    spec = memory.transformer_spec("t", 12, 768, 12, 1024, 50257)
    none = memory.estimate(spec, training=Training(recompute="none")).activations
    full = memory.estimate(spec, training=Training(recompute="full")).activations
    assert full < none / 4


# ----------------------------------------------------------------------- model specs
def test_transformer_spec_matches_gpt3_sizes() -> None:
    gpt3 = memory.transformer_spec("GPT-3", 96, 12288, 96, 2048, 50257)
    assert 174e9 < gpt3.n_params < 176e9
    small = memory.transformer_spec("GPT-3 small", 12, 768, 12, 2048, 50257)
    assert 124e6 < small.n_params < 126e6
    # Korthikanti et al.: 34 s h + 5 a s^2 bytes per block and sample in 16-bit
    s, h, a = 2048, 12288, 96
    assert gpt3.layers[1].activations * 2 == pytest.approx(34 * s * h + 5 * a * s * s)


def test_spec_from_keras_seed_cnn() -> None:
    from utils.models import SEED_CNN_PARAMS, build_seed_cnn

    spec = memory.spec_from_keras(build_seed_cnn(), tensor_parallel_layers=["dense1", "output"])
    assert spec.n_params == SEED_CNN_PARAMS
    assert [layer.tensor_parallel for layer in spec.layers][-2:] == [True, True]
    assert spec.layers[0].activations == 30 * 30 * 32


# ----------------------------------------------------------------- search and sweep
def test_smallest_layout_single_device_when_it_fits() -> None:
    model = ModelSpec.from_params("small", 100_000_000)  # 1.6 GB of model states
    fit = memory.smallest_layout(model, device_gb=16)
    assert fit.layout == Layout()
    assert fit.breakdown.total <= 16 * GB


def test_smallest_layout_finds_minimum_and_it_really_fits() -> None:
    model = ModelSpec.from_params("7.5B", 7_500_000_000)  # 120 GB of model states
    fit = memory.smallest_layout(model, device_gb=32, zero_stages=(0, 1))
    assert fit.breakdown.total <= 32 * GB
    # nothing with fewer (power-of-two) devices fits, by brute force
    for n in [1, 2, 4, 8, 16, 32]:
        if n >= fit.devices:
            break
        for dp in range(1, n + 1):
            if n % dp == 0:
                b = memory.estimate(model, Layout(dp=dp, zero=1 if dp > 1 else 0))
                assert b.total > 32 * GB


def test_smallest_layout_prefers_no_recompute_and_no_zero3_at_equal_count() -> None:
    spec = memory.transformer_spec("gpt-1.3b", 24, 2048, 16, 2048, 50257)
    fit = memory.smallest_layout(spec, device_gb=80)
    assert fit.devices == 1 and fit.training.recompute == "none"


def test_smallest_layout_clear_error_when_impossible() -> None:
    model = ModelSpec.from_params("huge", 10**12)
    with pytest.raises(ValueError, match="does not fit .* Raise max_devices"):
        memory.smallest_layout(model, device_gb=1, max_devices=8)


def test_strategy_sweep_shapes_and_monotone_zero3() -> None:
    spec = memory.transformer_spec("t", 4, 256, 4, 128, 1000)
    df = memory.strategy_sweep(spec, [1, 2, 4, 8])
    assert set(df["strategy"]) == set(memory.STRATEGIES)
    # tensor: 8 > 4 heads is skipped; pipeline: 8 > 6 layers is skipped
    assert df[df.strategy == "tensor"]["devices"].max() == 4
    assert df[df.strategy == "pipeline"]["devices"].max() == 4
    z3 = df[df.strategy == "zero3"]["memory"].tolist()
    assert all(a > b for a, b in zip(z3, z3[1:], strict=False))
    data = df[df.strategy == "data"]["memory"].tolist()
    assert max(data) == pytest.approx(min(data))


# ------------------------------------------------------------------------- bad input
def test_what_a_model_cannot_run_has_clear_errors() -> None:
    spec = memory.transformer_spec("t", 2, 64, 4, 16, 100)
    with pytest.raises(ValueError):
        memory.estimate(spec, Layout(tp=8))  # more tensor-parallel devices than heads
    with pytest.raises(ValueError):
        memory.estimate(spec, Layout(pp=5))  # more stages than layers
    with pytest.raises(ValueError):
        memory.smallest_layout(spec, device_gb=1e-9, max_devices=8)  # nothing fits


# ------------------------------------------------------------------------- partition
def test_partition_balances_the_bottleneck() -> None:
    assert memory.partition([1, 1, 1, 1], 2) == [0, 2]
    assert memory.partition([5, 1, 1, 1, 1, 1], 2) == [0, 1]
    # equal bottleneck: the more even split wins, and no stage starts on a zero-cost layer
    assert memory.partition([1, 0, 5, 0, 2, 0, 0.5, 0.01], 4) == [0, 2, 4, 6]
    assert memory.partition([3, 2], 1) == [0]
    assert memory.partition((2, 2, 2), 3) == [0, 1, 2]
    with pytest.raises(ValueError):
        memory.partition([1, 2], 3)
    with pytest.raises(ValueError):
        memory.partition([1, 2], 0)


def test_partition_is_optimal_on_small_cases() -> None:
    import itertools
    import random

    rng = random.Random(0)
    for _ in range(50):
        costs = [rng.choice([0, 1, 2, 3, 5]) for _ in range(rng.randint(1, 7))]
        k = rng.randint(1, len(costs))
        starts = memory.partition(costs, k)
        bounds = [*starts, len(costs)]
        worst = max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds))
        best = min(
            max(sum(costs[a:b]) for a, b in itertools.pairwise([0, *cuts, len(costs)]))
            for cuts in itertools.combinations(range(1, len(costs)), k - 1)
        )
        assert starts[0] == 0 and len(starts) == k and worst == best


def test_layout_str_and_devices() -> None:
    layout = Layout(dp=4, tp=2, pp=2, zero=1)
    assert layout.devices == 16
    assert str(layout) == "dp=4 x tp=2 x pp=2, ZeRO-1"


def test_breakdown_table_columns() -> None:
    model = ModelSpec.from_params("m", 1_000_000_000)
    table = memory.breakdown_table([("one", model, Layout(), Training("adam", "mixed"))])
    assert table.loc[0, "parameters"] == 1_000_000_000
    assert table.loc[0, "params"] == pytest.approx(2.0)  # GB of 16-bit weights
    assert table.loc[0, "total"] == pytest.approx(16.0)


@pytest.mark.parametrize(
    "name,config,published",
    [  # (layers, hidden, heads, kv heads, MLP size, vocabulary): the models' config.json
        ("Llama-2-7B", (32, 4096, 32, 32, 11008, 32000), 6_738_415_616),
        ("Llama-3-8B", (32, 4096, 32, 8, 14336, 128256), 8_030_261_248),
        ("Mistral-7B", (32, 4096, 32, 8, 14336, 32000), 7_241_732_096),
    ],
)
def test_llama_style_parameter_counts(name, config, published):
    layers, hidden, heads, kv, ff, vocab = config
    spec = memory.transformer_spec(name, layers, hidden, heads, 4096, vocab, ff, tied_embeddings=False,
                                   n_kv_heads=kv, gated_mlp=True, biases=False, rms_norm=True,
                                   learned_positions=False)
    assert spec.n_params == published


def test_sequence_parallelism_splits_the_replicated_activations():
    spec = memory.transformer_spec("gpt", 2, 64, 4, 32, 100)
    training = memory.Training("adam", "mixed")
    plain = memory.estimate(spec, memory.Layout(tp=4), training).activations
    sp = memory.estimate(spec, memory.Layout(tp=4, sp=True), training).activations
    block = spec.layers[1]
    assert plain - sp == pytest.approx(2 * 2 * block.replicated_activations * (1 - 1 / 4))


def test_fp32_gradient_accumulation_doubles_mixed_gradients():
    spec = memory.ModelSpec.from_params("m", 1000)
    mixed = memory.estimate(spec, training=memory.Training("adam", "mixed"))
    fp32 = memory.estimate(spec, training=memory.Training("adam", "mixed", fp32_grads=True))
    assert (mixed.grads, fp32.grads) == (2000, 4000)
