"""Tests of the code notebook 08 saves (utils.lessons.hybrid_parallelism): 2-D meshes, the
hybrid CNN, the DTensor Adam, the Megatron-sharded transformer and its Keras reference.

They work with whatever number of devices the process has (conftest: 4 logical CPUs, or
``$SERIES_NUM_CPUS``): meshes, batches and widths are picked to divide it.
"""

from __future__ import annotations

import utils  # noqa: F401  (quiets TF's C++ log before TensorFlow loads)
from utils import devices

devices.setup_devices()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.experimental import dtensor  # noqa: E402

from utils.lessons import hybrid_parallelism as hp  # noqa: E402
from utils.lessons import tensor_parallelism as tp  # noqa: E402
from utils.lessons.mirrored_strategy import max_abs_diff, max_rel_diff  # noqa: E402

TOL = 1e-5
N = len(devices.compute_devices())
SHAPES = hp.mesh_shapes(N)
SQUARE = SHAPES[len(SHAPES) // 2]


def _images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 32, 32, 3)).astype(np.float32) / 255
    return x, rng.integers(0, 10, n).astype(np.int32)


@pytest.fixture(scope="module")
def small_cnn() -> keras.Model:
    keras.utils.set_random_seed(7)
    return hp.widened_cnn(head_units=hp.multiple_of(64, N))


# ------------------------------------------------------------------------------ meshes
def test_mesh_shapes_and_multiple_of() -> None:
    assert hp.mesh_shapes(4) == [(4, 1), (2, 2), (1, 4)]
    assert hp.mesh_shapes(1) == [(1, 1)]
    assert hp.mesh_shapes(3) == [(3, 1), (1, 3)]
    assert hp.multiple_of(128, 3) == 129 and hp.multiple_of(1024, 4) == 1024
    assert hp.multiple_of(2, 8) == 8


def test_hybrid_mesh_rows_and_columns() -> None:
    for b, m in SHAPES:
        mesh = hp.hybrid_mesh(b, m)
        assert list(mesh.dim_names) == ["batch", "model"]
        table = tp.mesh_table(mesh)
        assert table["batch index"].tolist() == [i // m for i in range(N)]
        assert table["model index"].tolist() == [i % m for i in range(N)]


def test_batch_to_mesh_splits_rows_over_batch_only() -> None:
    b, m = SQUARE
    mesh = hp.hybrid_mesh(b, m)
    x = np.arange(2 * b * 3, dtype=np.float32).reshape(2 * b, 3)
    (xd,) = hp.batch_to_mesh(mesh, x)
    assert {s for _, s in tp.shard_shapes(xd)} == {(2, 3)}
    np.testing.assert_array_equal(tp.to_numpy(xd), x)


# ---------------------------------------------------------------------------------- CNN
def test_widened_cnn_changes_only_the_head() -> None:
    from utils.models import build_seed_cnn

    seed, wide = build_seed_cnn(), hp.widened_cnn(96)
    assert [layer.name for layer in wide.layers] == [layer.name for layer in seed.layers]
    assert wide.get_layer("dense1").units == 96
    for name in hp.CONVS:
        assert wide.get_layer(name).count_params() == seed.get_layer(name).count_params()


@pytest.mark.parametrize("shape", SHAPES)
def test_hybrid_cnn_layouts_and_forward_equal_keras(small_cnn: keras.Model, shape) -> None:
    mesh = hp.hybrid_mesh(*shape)
    net = hp.HybridCNN(small_cnn, mesh)
    w = net.weights()
    assert list(w) == [f"{n}/{p}" for n in (*hp.CONVS, "dense1", "output") for p in ("kernel", "bias")]
    assert tp.spec_string(w["conv2/kernel"]) == "[unsharded, unsharded, unsharded, unsharded]"
    assert tp.spec_string(w["dense1/kernel"]) == "[unsharded, model]"
    assert tp.spec_string(w["output/kernel"]) == "[model, unsharded]"
    units = small_cnn.get_layer("dense1").units
    assert {s for _, s in tp.shard_shapes(w["dense1/kernel"])} == {(2048, units // shape[1])}
    x, _ = _images(2 * shape[0])
    logits = tp.to_numpy(net(*hp.batch_to_mesh(mesh, x)))
    assert max_abs_diff(tf.nn.softmax(logits), small_cnn(x)) <= TOL
    assert max_abs_diff(net.get_weights(), small_cnn.get_weights()) == 0.0


def test_mesh_gradients_equal_single_device_gradients(small_cnn: keras.Model) -> None:
    """Data parallelism over "batch" + tensor parallelism over "model" = one device."""
    mesh = hp.hybrid_mesh(*SQUARE)
    net = hp.HybridCNN(small_cnn, mesh)
    x, y = _images(hp.multiple_of(16, N))
    loss, grads = hp.make_grad_fn(net)(*hp.batch_to_mesh(mesh, x, y))
    with tf.GradientTape() as tape:
        ref_loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, small_cnn(x)))
    ref_grads = tape.gradient(ref_loss, small_cnn.trainable_variables)  # Keras order
    grad_of = {id(v): g for v, g in zip(net.trainable_variables, grads, strict=True)}
    ours = [tp.to_numpy(grad_of[id(v)]) for v in net.weights().values()]  # Keras order too
    assert abs(float(tp.to_numpy(loss)) - float(ref_loss)) <= TOL
    assert max_rel_diff(ours, ref_grads) <= 1e-4


# ---------------------------------------------------------------------------- optimizer
def test_adam_reproduces_keras_adam_and_keeps_layouts() -> None:
    mesh = hp.hybrid_mesh(*SQUARE)
    m = SQUARE[1]
    rng = np.random.default_rng(1)
    init = [rng.normal(size=(5, 2 * m)).astype(np.float32), rng.normal(size=(3,)).astype(np.float32)]
    layouts = [tp.layout(mesh, None, "model"), hp.replicated(mesh, 1)]
    ours = [dtensor.DVariable(tp.shard(w, lay)) for w, lay in zip(init, layouts, strict=True)]
    theirs = [tf.Variable(w) for w in init]
    opt, ref = hp.Adam(0.01), keras.optimizers.Adam(0.01)
    opt.build(ours)
    step = tf.function(lambda g: opt.apply(g, ours))
    for _ in range(4):
        g = [rng.normal(size=w.shape).astype(np.float32) for w in init]
        step([tp.shard(v, lay) for v, lay in zip(g, layouts, strict=True)])
        ref.apply_gradients(zip([tf.constant(v) for v in g], theirs, strict=True))
    assert max_abs_diff([tp.to_numpy(v) for v in ours], [v.numpy() for v in theirs]) <= 1e-6
    assert tp.spec_string(opt.m[0]) == tp.spec_string(opt.v[0]) == "[unsharded, model]"
    assert int(tp.to_numpy(opt.iterations)) == 4


def test_train_step_reduces_loss(small_cnn: keras.Model) -> None:
    mesh = hp.hybrid_mesh(*SQUARE)
    net = hp.HybridCNN(small_cnn, mesh)
    step = hp.make_train_step(net, hp.Adam(3e-3))
    batch = hp.batch_to_mesh(mesh, *_images(hp.multiple_of(32, N)))
    losses = [float(tp.to_numpy(step(*batch))) for _ in range(20)]
    assert losses[-1] < 0.8 * losses[0]  # it starts memorising the batch


# -------------------------------------------------------------------------- transformer
@pytest.fixture(scope="module")
def lm_setup():
    heads = 4 if 4 % SQUARE[1] == 0 else SQUARE[1]
    cfg = hp.TransformerConfig(vocab_size=20, seq_len=16, d_model=8 * heads, n_heads=heads,
                               d_ff=16 * heads, n_layers=2)
    return cfg, hp.init_transformer_weights(cfg, seed=3)


def test_transformer_param_count_matches_the_calculator(lm_setup) -> None:
    cfg, weights = lm_setup
    assert cfg.memory_spec().n_params == sum(v.size for v in weights.values())
    assert weights["block1/wq"].shape == (cfg.d_model, cfg.n_heads, cfg.head_dim)


def test_megatron_layouts(lm_setup) -> None:
    cfg, weights = lm_setup
    lm = hp.TransformerLM(cfg, weights, hp.hybrid_mesh(*SQUARE))
    p, m = lm.params, SQUARE[1]
    assert tp.spec_string(p["block0/wq"]) == "[unsharded, model, unsharded]"
    assert tp.spec_string(p["block0/wo"]) == "[model, unsharded, unsharded]"
    assert tp.spec_string(p["block0/w1"]) == "[unsharded, model]"
    assert tp.spec_string(p["block0/w2"]) == "[model, unsharded]"
    assert tp.spec_string(p["block0/ln1_gamma"]) == "[unsharded]"
    assert {s for _, s in tp.shard_shapes(p["block1/wk"])} == {
        (cfg.d_model, cfg.n_heads // m, cfg.head_dim)}
    assert {s for _, s in tp.shard_shapes(p["block1/w2"])} == {(cfg.d_ff // m, cfg.d_model)}


def test_sharded_block_equals_keras_block(lm_setup) -> None:
    cfg, weights = lm_setup
    mesh = hp.hybrid_mesh(*SQUARE)
    lm = hp.TransformerLM(cfg, weights, mesh)
    ref = hp.keras_block(cfg, {k.split("/", 1)[1]: v for k, v in weights.items()
                               if k.startswith("block1/")})
    assert len(ref.block_variables) == 16
    x = np.random.default_rng(0).normal(size=(2 * SQUARE[0], cfg.seq_len, cfg.d_model))
    x = x.astype(np.float32)

    @tf.function
    def block(x_in):
        with dtensor.default_mesh(mesh):
            return lm.block(1, x_in)

    (xd,) = hp.batch_to_mesh(mesh, x)
    assert max_rel_diff(tp.to_numpy(block(xd)), ref(x)) <= TOL


def test_sharded_lm_equals_unsharded_and_recompute_and_bf16(lm_setup) -> None:
    cfg, weights = lm_setup
    rng = np.random.default_rng(1)
    x = rng.integers(0, cfg.vocab_size, (2 * SQUARE[0], cfg.seq_len)).astype(np.int32)
    y = np.roll(x, -1, axis=1)
    mesh = hp.hybrid_mesh(*SQUARE)
    l1, g1 = hp.make_grad_fn(hp.TransformerLM(cfg, weights, mesh))(*hp.batch_to_mesh(mesh, x, y))
    results = {}
    for name, kw in [("float32", {}), ("recompute", {"recompute": True}),
                     ("bf16", {"compute_dtype": "bfloat16"})]:
        loss, grads = hp.make_grad_fn(hp.TransformerLM(cfg, weights, **kw))(x, y)
        results[name] = float(loss), [g.numpy() for g in grads]
    l2, g2 = results["float32"]
    assert abs(float(tp.to_numpy(l1)) - l2) <= TOL
    assert max_abs_diff([tp.to_numpy(g) for g in g1], g2) <= TOL
    assert abs(results["recompute"][0] - l2) <= 1e-6
    assert max_abs_diff(results["recompute"][1], g2) <= TOL
    assert abs(results["bf16"][0] - l2) / l2 < 1e-2
    flat = [np.concatenate([np.ravel(g) for g in results[k][1]]) for k in ("bf16", "float32")]
    cosine = flat[0] @ flat[1] / (np.linalg.norm(flat[0]) * np.linalg.norm(flat[1]))
    assert cosine > 0.99
