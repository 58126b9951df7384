"""Tests of utils.hybrid: 2-D meshes, the hybrid CNN, the Keras-exact optimizer, the
Megatron-sharded transformer, the text corpus and the step measurements.

The process has 4 logical CPUs (``setup_devices()`` here or in another test module).
"""

from __future__ import annotations

import utils  # noqa: F401  (quiets TF's C++ log before TensorFlow loads)
from utils import devices

devices.setup_devices()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from utils import hybrid, memory  # noqa: E402
from utils import tensor_parallel as tp  # noqa: E402

TOL = 1e-5


def _need4() -> None:
    if len(devices.compute_devices()) != 4:
        pytest.skip("these tests expect exactly 4 devices (4 logical CPUs)")


def _images(n: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8), rng.integers(0, 10, n)


@pytest.fixture(scope="module")
def small_cnn() -> keras.Model:
    keras.utils.set_random_seed(7)
    return hybrid.widened_cnn(head_units=64)


# ------------------------------------------------------------------------------ meshes
def test_mesh_shapes() -> None:
    assert hybrid.mesh_shapes(4) == [(4, 1), (2, 2), (1, 4)]
    assert hybrid.mesh_shapes(1) == [(1, 1)]
    assert hybrid.mesh_shapes(6) == [(6, 1), (3, 2), (2, 3), (1, 6)]
    with pytest.raises(ValueError, match="whole number >= 1"):
        hybrid.mesh_shapes(0)


def test_hybrid_mesh_layout_and_clear_errors() -> None:
    _need4()
    mesh = hybrid.hybrid_mesh(2, 2)
    assert list(mesh.dim_names) == ["batch", "model"]
    table = tp.mesh_table(mesh)
    assert table["batch index"].tolist() == [0, 0, 1, 1]
    assert table["model index"].tolist() == [0, 1, 0, 1]
    with pytest.raises(ValueError, match=r"needs 6 devices, but 4 are available.*4x1, 2x2, 1x4"):
        hybrid.hybrid_mesh(3, 2)
    with pytest.raises(ValueError, match=r"needs 2 devices, but 4 are available"):
        hybrid.hybrid_mesh(1, 2)
    with pytest.raises(ValueError, match="whole-number size >= 1"):
        hybrid.hybrid_mesh(0, 4)


# --------------------------------------------------------------------------------- CNN
def test_widened_cnn_changes_only_the_head() -> None:
    from utils.models import build_seed_cnn

    wide = hybrid.widened_cnn(head_units=256)
    seed = build_seed_cnn()
    for name in ("conv1", "conv2", "conv3"):
        assert wide.get_layer(name).count_params() == seed.get_layer(name).count_params()
    assert wide.get_layer("dense1").units == 256
    assert wide.count_params() == seed.count_params() + (2048 + 1 + 10) * 128
    with pytest.raises(ValueError, match="head_units"):
        hybrid.widened_cnn(head_units=0)


def test_hybrid_cnn_layouts_and_forward_equal_keras(small_cnn: keras.Model) -> None:
    _need4()
    mesh = hybrid.hybrid_mesh(2, 2)
    net = hybrid.HybridCNN.from_keras(small_cnn, mesh)
    w = net.weights()
    assert tp.spec_string(w["conv1/kernel"]) == "[unsharded, unsharded, unsharded, unsharded]"
    assert tp.spec_string(w["dense1/kernel"]) == "[unsharded, model]"
    assert tp.spec_string(w["output/kernel"]) == "[model, unsharded]"
    assert {s for _, s in tp.shard_shapes(w["dense1/kernel"])} == {(2048, 32)}
    x, _ = _images(10)
    logits = hybrid.predict_logits(net, x, batch_size=4)  # 10 images, padded batches
    probs = tf.nn.softmax(logits).numpy()
    expected = small_cnn.predict(x.astype(np.float32) / 255, verbose=0)
    assert probs.shape == (10, 10)
    np.testing.assert_allclose(probs, expected, atol=TOL)
    acts = net.activations(hybrid.batch_to_mesh(mesh, x[:8].astype(np.float32) / 255)[0])
    assert tp.spec_string(acts["conv1 output"]) == "[batch, unsharded, unsharded, unsharded]"
    assert tp.spec_string(acts["dense1 output"]) == "[batch, model]"
    assert tp.spec_string(acts["logits"]) == "[batch, unsharded]"
    for a, b in zip(net.get_weights(), small_cnn.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_hybrid_cnn_bad_inputs(small_cnn: keras.Model) -> None:
    _need4()
    mesh = tp.create_mesh([("model", 4)])
    with pytest.raises(ValueError, match="has no dim 'batch'"):
        hybrid.HybridCNN.from_keras(small_cnn, mesh)
    no_head = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="dense1")])
    with pytest.raises(ValueError, match="lacks layers"):
        hybrid.HybridCNN.from_keras(no_head, hybrid.hybrid_mesh(2, 2))
    net = hybrid.HybridCNN.from_keras(small_cnn, hybrid.hybrid_mesh(2, 2))
    x, y = _images(8)
    with pytest.raises(ValueError, match="does not split over batch=2"):
        hybrid.hybrid_steps(net, x, y, steps=1, batch_size=3, optimizer=hybrid.Optimizer())


# --------------------------------------------------------------------------- optimizer
@pytest.mark.parametrize("kind", ["sgd", "momentum", "adam"])
def test_optimizer_reproduces_keras_updates(kind: str) -> None:
    rng = np.random.default_rng(1)
    init = [rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=(3,)).astype(np.float32)]
    grads = [[rng.normal(size=w.shape).astype(np.float32) for w in init] for _ in range(4)]
    ours = [tf.Variable(w) for w in init]
    theirs = [tf.Variable(w) for w in init]
    opt = hybrid.Optimizer(kind, 0.01)
    opt.build(ours)
    ref = opt.to_keras()
    step = tf.function(lambda g: opt.apply(g, ours))
    for g in grads:
        step([tf.constant(v) for v in g])
        ref.apply_gradients(zip([tf.constant(v) for v in g], theirs, strict=True))
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)
    assert len(opt.slot_variables()) == {"sgd": 0, "momentum": 2, "adam": 4}[kind]


def test_optimizer_bad_input() -> None:
    with pytest.raises(ValueError, match="Unknown optimizer"):
        hybrid.Optimizer("adagrad")
    with pytest.raises(ValueError, match="learning_rate"):
        hybrid.Optimizer("sgd", 0.0)
    with pytest.raises(RuntimeError, match="build"):
        hybrid.Optimizer().apply([], [])


def test_hybrid_steps_equal_mirrored_strategy(small_cnn: keras.Model) -> None:
    """Adam on the 2x2 mesh == Keras fit under MirroredStrategy, step by step."""
    _need4()
    x, y = _images(96)
    ref = hybrid.keras_data_parallel_steps(
        small_cnn, x, y, steps=2, batch_size=32, optimizer=hybrid.Optimizer("adam", 1e-3)
    )
    net = hybrid.HybridCNN.from_keras(small_cnn, hybrid.hybrid_mesh(2, 2))
    ours = hybrid.hybrid_steps(
        net, x, y, steps=2, batch_size=32, optimizer=hybrid.Optimizer("adam", 1e-3)
    )
    assert len(ours.losses) == len(ref.losses) == 2 and len(ours.weights) == 2
    assert ours.max_loss_diff(ref) <= TOL
    assert ours.max_weight_diff(ref)[0] <= 1e-6
    # the weights did move, and both runs moved them the same way
    moved = float(np.max(np.abs(ours.weights[0][-2] - small_cnn.get_weights()[-2])))
    assert moved > 1e-4
    assert not np.allclose(ref.weights[0][-2], small_cnn.get_weights()[-2])


def test_state_bytes_follow_shard_shapes(small_cnn: keras.Model) -> None:
    _need4()
    x, y = _images(256)
    table = hybrid.mesh_comparison(small_cnn, [(2, 2), (1, 4)], x, y, batch_size=64, bench_steps=1)
    trunk = sum(small_cnn.get_layer(n).count_params() for n in ("conv1", "conv2", "conv3"))
    # dense1 kernel+bias and output kernel are split over model; output bias is replicated
    split = 2048 * 64 + 64 + 64 * 10
    for m, row in zip((2, 4), table.itertuples(index=False), strict=True):
        params = 4 * (trunk + split // m + 10)
        assert row[1] == params  # params bytes/device
        assert row[2] == params  # grads
        assert row[3] == 2 * params  # Adam: m and v
        assert row[5] > 0  # images/s
    spec = memory.spec_from_keras(small_cnn, tensor_parallel_layers=["dense1", "output"])
    for i, (b, m) in enumerate([(2, 2), (1, 4)]):
        calc = memory.estimate(spec, memory.Layout(dp=b, tp=m), memory.Training("adam", "fp32"))
        assert abs(calc.model_states - table.iloc[i, 4]) / table.iloc[i, 4] < 1e-3


def test_train_reduces_loss(small_cnn: keras.Model) -> None:
    _need4()
    from utils.data import make_synthetic

    x, y, xt, yt, _ = make_synthetic(512, 128)
    net = hybrid.HybridCNN.from_keras(small_cnn, hybrid.hybrid_mesh(4, 1))
    before = hybrid.evaluate(net, xt, yt)
    hist = hybrid.train(
        net, hybrid.Optimizer("adam", 2e-3), x, y, steps=12, batch_size=64, log_every=6
    )
    assert list(hist.columns) == ["step", "loss", "images/s"]
    assert hist["loss"].iloc[-1] < hist["loss"].iloc[0]
    assert hybrid.evaluate(net, xt, yt) > max(before, 0.3)


# ------------------------------------------------------------------------- transformer
@pytest.fixture(scope="module")
def lm_setup() -> tuple[hybrid.TransformerConfig, dict[str, np.ndarray]]:
    cfg = hybrid.TransformerConfig(
        vocab_size=20, seq_len=16, d_model=32, n_heads=4, d_ff=64, n_layers=2
    )
    return cfg, hybrid.init_transformer_weights(cfg, seed=3)


def test_transformer_config_errors_and_param_count(lm_setup) -> None:
    cfg, weights = lm_setup
    assert cfg.n_params == sum(v.size for v in weights.values())
    assert cfg.memory_spec().max_tensor_parallel == 4
    with pytest.raises(ValueError, match="divisible by n_heads"):
        hybrid.TransformerConfig(vocab_size=10, d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="whole number >= 1"):
        hybrid.TransformerConfig(vocab_size=0)
    _need4()
    three_heads = hybrid.TransformerConfig(vocab_size=10, seq_len=8, d_model=12, n_heads=3, d_ff=16)
    with pytest.raises(ValueError, match="attention heads"):
        hybrid.TransformerLM(
            three_heads, hybrid.init_transformer_weights(three_heads), hybrid.hybrid_mesh(2, 2)
        )
    with pytest.raises(ValueError, match="compute_dtype"):
        hybrid.TransformerLM(cfg, weights, compute_dtype="int8")
    with pytest.raises(ValueError, match="weights lacks"):
        hybrid.TransformerLM(cfg, {"tok_emb": weights["tok_emb"]})


def test_megatron_layouts(lm_setup) -> None:
    _need4()
    cfg, weights = lm_setup
    lm = hybrid.TransformerLM(cfg, weights, hybrid.hybrid_mesh(2, 2))
    p = lm.params
    assert tp.spec_string(p["block0/wq"]) == "[unsharded, model, unsharded]"
    assert tp.spec_string(p["block0/wo"]) == "[model, unsharded, unsharded]"
    assert tp.spec_string(p["block0/w1"]) == "[unsharded, model]"
    assert tp.spec_string(p["block0/w2"]) == "[model, unsharded]"
    assert tp.spec_string(p["block0/ln1_gamma"]) == "[unsharded]"
    assert {s for _, s in tp.shard_shapes(p["block1/wk"])} == {(32, 2, 8)}
    assert {s for _, s in tp.shard_shapes(p["block1/w2"])} == {(32, 32)}


def test_sharded_block_equals_keras_block(lm_setup) -> None:
    _need4()
    cfg, weights = lm_setup
    lm = hybrid.TransformerLM(cfg, weights, hybrid.hybrid_mesh(2, 2))
    block1 = {k.split("/", 1)[1]: v for k, v in weights.items() if k.startswith("block1/")}
    ref = hybrid.keras_block(cfg, block1)
    x = np.random.default_rng(0).normal(size=(4, cfg.seq_len, cfg.d_model)).astype(np.float32)
    diffs = hybrid.compare_block(lm, ref, x, block=1)
    assert set(diffs) == {"output", "input gradient", "weight gradients"}
    assert all(v <= TOL for v in diffs.values()), diffs


def test_sharded_lm_equals_unsharded_and_recompute_and_bf16(lm_setup) -> None:
    _need4()
    cfg, weights = lm_setup
    rng = np.random.default_rng(1)
    x, y = hybrid.random_windows(np.arange(200) % cfg.vocab_size, 8, cfg.seq_len, rng)
    mesh = hybrid.hybrid_mesh(2, 2)
    sharded = hybrid.TransformerLM(cfg, weights, mesh)
    single = hybrid.TransformerLM(cfg, weights)
    l1, g1 = hybrid.make_grad_fn(sharded, list(sharded.params.values()), hybrid.lm_loss)(
        *hybrid.batch_to_mesh(mesh, x, y)
    )
    fns = {
        "float32": hybrid.make_grad_fn(single, list(single.params.values()), hybrid.lm_loss),
    }
    for name, kw in [("recompute", {"recompute": True}), ("bf16", {"compute_dtype": "bfloat16"})]:
        m = hybrid.TransformerLM(cfg, weights, **kw)
        fns[name] = hybrid.make_grad_fn(m, list(m.params.values()), hybrid.lm_loss)
    table, diffs = hybrid.compare_variants(fns, tf.constant(x), tf.constant(y), repeats=1)
    l2, g2 = fns["float32"](tf.constant(x), tf.constant(y))
    assert abs(float(tp.to_numpy(l1)) - float(l2)) <= TOL
    assert max(tp.max_abs_diff(a, b) for a, b in zip(g1, g2, strict=True)) <= TOL
    assert diffs["recompute"]["loss"] <= 1e-6 and diffs["recompute"]["gradients"] <= 1e-5
    assert 0 < diffs["bf16"]["gradients"] < 0.1 and diffs["bf16"]["cosine"] > 0.99
    assert list(table["variant"]) == ["float32", "recompute", "bf16"]
    # (peak memory: this model's tensors are below the CPU allocator's tracking threshold;
    # test_keras_recompute_same_gradients_less_memory checks the peak)


def test_train_lm_learns(lm_setup) -> None:
    _need4()
    cfg, weights = lm_setup
    ids = np.tile(np.arange(cfg.vocab_size), 40).astype(np.int32)  # a perfectly predictable text
    lm = hybrid.TransformerLM(cfg, weights, hybrid.hybrid_mesh(2, 2))
    hist = hybrid.train_lm(
        lm,
        hybrid.Optimizer("adam", 1e-2),
        ids,
        ids,
        steps=20,
        batch_size=8,
        log_every=10,
        val_batches=1,
    )
    assert hist["val loss"].iloc[-1] < 0.5 * hist["val loss"].iloc[0]


# --------------------------------------------------------------------------------- text
def test_text_corpus_and_tokenizer() -> None:
    text = hybrid.text_corpus(max_chars=20_000)
    assert len(text) == 20_000
    assert set(text) <= set("\t\n" + "".join(chr(i) for i in range(32, 127)))
    tok = hybrid.CharTokenizer()
    assert tok.vocab_size == len(hybrid.CORPUS_ALPHABET) == 97
    ids = tok.encode(text[:500])
    assert tok.decode(ids) == text[:500]
    with pytest.raises(KeyError, match="not in the vocabulary"):
        tok.encode("\u00e9")
    assert hybrid.CharTokenizer("ba").vocab_size == 2
    x, y = hybrid.random_windows(ids, 3, 10, np.random.default_rng(0))
    assert x.shape == y.shape == (3, 10)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    with pytest.raises(ValueError, match="too short"):
        hybrid.random_windows(ids[:5], 1, 10, np.random.default_rng(0))


# -------------------------------------------------------------------------- measurement
def test_keras_recompute_same_gradients() -> None:
    from utils.models import build_seed_cnn

    keras.utils.set_random_seed(0)
    model = build_seed_cnn()
    x, y = _images(64)
    xt, yt = tf.constant(x.astype(np.float32) / 255), tf.constant(y)
    l1, g1 = hybrid.keras_grad_step(model)(xt, yt)
    l2, g2 = hybrid.keras_grad_step(model, recompute_segments=3)(xt, yt)
    assert abs(float(l1) - float(l2)) < 1e-6
    assert max(float(tf.reduce_max(tf.abs(a - b))) for a, b in zip(g1, g2, strict=True)) < 1e-6
    with pytest.raises(ValueError, match="recompute_segments"):
        hybrid.keras_grad_step(model, recompute_segments=99)


def test_recompute_lowers_measured_peak_of_transformer() -> None:
    cfg = hybrid.TransformerConfig(
        vocab_size=32, seq_len=64, d_model=64, n_heads=4, d_ff=256, n_layers=4
    )
    weights = hybrid.init_transformer_weights(cfg)
    x, y = hybrid.random_windows(np.arange(1000) % 32, 16, 64, np.random.default_rng(0))
    stats = {}
    for recompute in (False, True):
        m = hybrid.TransformerLM(cfg, weights, recompute=recompute)
        fn = hybrid.make_grad_fn(m, list(m.params.values()), hybrid.lm_loss)
        stats[recompute] = hybrid.measure_step(fn, tf.constant(x), tf.constant(y), repeats=1)
    assert stats[False].seconds > 0 and stats[True].seconds > 0
    if not hybrid.memory_stats_available():
        pytest.skip("this device reports no memory statistics")
    assert stats[False].peak_bytes > 0
    assert stats[True].peak_bytes < 0.7 * stats[False].peak_bytes
