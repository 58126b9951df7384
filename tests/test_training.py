"""Tests for utils.lessons.training (exported from notebook 04): precision choice, schedule,
callbacks, recipes, saving and load-or-train."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from utils import bench, devices
from utils import data as D
from utils.lessons import training

# /proc/cpuinfo texts of four kinds of CPU (two logical processors each, as Linux prints them)
AMD_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 23
model name\t: AMD EPYC 7B12
flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx f16c avx2 fma bmi2 sha_ni

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 23
model name\t: AMD EPYC 7B12
flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx f16c avx2 fma bmi2 sha_ni
"""
INTEL_AVX512_BF16 = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model name\t: Intel(R) Xeon(R) Platinum 8380
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16
"""
INTEL_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: avx2 avx512f amx_bf16 amx_tile amx_int8
"""
INTEL_AVX512_NO_BF16 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Gold 6148
flags\t\t: avx2 avx512f avx512bw avx512vl
"""
ARM_BF16 = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics sve i8mm bf16
CPU implementer\t: 0x41
"""
ARM_NO_BF16 = """processor\t: 0
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32
CPU implementer\t: 0x41
"""


@pytest.fixture(scope="module")
def tiny_data() -> D.Cifar10:
    x, y, xt, yt, names = D.make_synthetic(256, 64, seed=1)
    return D.Cifar10(x, y, xt, yt, names, source="synthetic")


# --------------------------------------------------------------------------- precision
@pytest.mark.parametrize(
    ("cpuinfo", "policy"),
    [(AMD_AVX2, "float32"), (INTEL_AVX512_NO_BF16, "float32"), (ARM_NO_BF16, "float32"), ("", "float32"),
     (INTEL_AVX512_BF16, "mixed_bfloat16"), (INTEL_AMX, "mixed_bfloat16"), (ARM_BF16, "mixed_bfloat16")],
)
def test_precision_follows_the_cpu(cpuinfo, policy):
    chosen, reason = training.choose_precision(cpuinfo, gpu=False)
    assert chosen == policy == training.default_mixed_policy(cpuinfo, gpu=False)
    assert ("natively" in reason) == (policy == "mixed_bfloat16")


@pytest.mark.parametrize("cpuinfo", [AMD_AVX2, INTEL_AVX512_BF16, INTEL_AMX, INTEL_AVX512_NO_BF16])
def test_precision_agrees_with_bench_flags(cpuinfo):
    native = bool({"avx512_bf16", "amx_bf16"} & bench.parse_cpuinfo(cpuinfo).flags)
    assert (training.default_mixed_policy(cpuinfo, gpu=False) == "mixed_bfloat16") == native


def test_gpu_gets_float16_whatever_the_cpu():
    assert training.choose_precision(AMD_AVX2, gpu=True)[0] == "mixed_float16"


def test_this_machine():
    policy, _ = training.choose_precision()
    if devices.device_kind() == "GPU":
        assert policy == "mixed_float16"
    else:
        assert policy in ("float32", "mixed_bfloat16")


def test_precision_policy_restores_after_error():
    before = keras.mixed_precision.global_policy().name
    with pytest.raises(RuntimeError):
        with training.precision_policy("mixed_bfloat16"):
            assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
            raise RuntimeError("boom")
    assert keras.mixed_precision.global_policy().name == before


# --------------------------------------------------------------------------- schedule
def test_warmup_cosine_shape():
    s = training.warmup_cosine(1.0, 10, warmup_epochs=1, min_fraction=0.1)
    rates = [s(e) for e in range(10)]
    assert rates[0] == pytest.approx(0.5) and rates[1] == pytest.approx(1.0)
    assert rates[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(rates[1:], rates[2:], strict=False))  # decays after the warm-up
    assert training.warmup_cosine(1.0, 1)(0) == pytest.approx(1.0)  # a 1-epoch run has no warm-up


# --------------------------------------------------------------------------- callbacks
def dense_model() -> keras.Model:
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    return training.compile_cnn(model)


def test_throughput_callback_per_epoch():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 4)).astype("float32"), rng.integers(0, 3, 40)
    timer = training.ThroughputCallback(batch_size=8)
    history = dense_model().fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[timer])
    assert len(timer.rates) == 2 and all(r > 0 for r in timer.rates)
    assert timer.images_per_s == timer.rates[-1]
    assert history.history["images_per_s"] == timer.rates
    one_batch = training.ThroughputCallback(batch_size=40)
    dense_model().fit(x, y, batch_size=40, epochs=1, verbose=0, callbacks=[one_batch])
    with pytest.raises(RuntimeError):
        one_batch.images_per_s  # noqa: B018  (only the warm-up batch ran)


def test_make_callbacks(tmp_path):
    kinds = [type(cb).__name__ for cb in training.make_callbacks(tmp_path, 32, training.warmup_cosine(1e-3, 2))]
    assert kinds == ["ThroughputCallback", "LearningRateScheduler", "ModelCheckpoint", "BackupAndRestore",
                     "CSVLogger", "EarlyStopping"]
    bare = training.make_callbacks(tmp_path, 32, training.warmup_cosine(1e-3, 2), checkpoint=False,
                                   logs=False, patience=None)
    assert [type(cb).__name__ for cb in bare] == ["ThroughputCallback", "LearningRateScheduler",
                                                  "BackupAndRestore"]


# --------------------------------------------------------------------------- recipes
def test_series_recipe_tiny(tiny_data, tmp_path, capsys):
    strategy = devices.make_strategy(devices.compute_devices()[:2])
    result = training.series_recipe(tiny_data, epochs=1, batch_size=32, strategy=strategy, run_dir=tmp_path,
                                    verbose=0)
    assert "precision: " in capsys.readouterr().out
    assert result.settings["replicas"] == strategy.num_replicas_in_sync
    assert result.settings["precision"] == training.default_mixed_policy()
    assert 0.0 <= result.test_accuracy <= 1.0 and result.images_per_s > 0
    assert list(result.history["epoch"]) == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.keras", "log.csv"]  # backup deleted
    assert result.row()["recipe"] == "series recipe"


def test_seed_recipe_tiny(tiny_data):
    result = training.seed_recipe(tiny_data, epochs=1, batch_size=64, verbose=0)
    assert result.settings["precision"] == "float32" and result.settings["steps/epoch"] == 4
    assert 0.0 <= result.test_accuracy <= 1.0
    assert "val_accuracy" in result.history


def test_score_accuracy_under_a_strategy_with_an_uneven_count(tiny_data):
    strategy = devices.make_strategy()
    with strategy.scope():
        model = training.compile_cnn(keras.Sequential([
            keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(10, activation="softmax")]))
    n = 61  # not a multiple of 2 or 4: the remainder is left out
    assert 0.0 <= training.score_accuracy(model, tiny_data.x_test[:n], tiny_data.y_test[:n], 16) <= 1.0


# --------------------------------------------------------------------------- saving
def test_model_path_is_per_mode():
    assert training.model_path().name == "seed_cnn_smoke.keras"
    assert training.model_path(mode="full").name == "seed_cnn_full.keras"
    assert training.model_path().parent.name == "04_training"


def test_load_or_train_cnn(tiny_data, tmp_path):
    path = tmp_path / "model.keras"
    assert training.saved_info(path) == {}
    one = devices.make_strategy(devices.compute_devices()[:1])  # one replica: the quickest to trace
    model, note = training.load_or_train_cnn(tiny_data, path, strategy=one, epochs=1)
    assert note.startswith("Trained a new model")
    assert training.saved_info(path)["mode"] == "smoke"
    again, note2 = training.load_or_train_cnn(tiny_data, path)
    assert note2.startswith("Loaded")
    for a, b in zip(model.get_weights(), again.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    # a model saved in another mode is not reused
    path.with_suffix(".json").write_text(json.dumps({"mode": "full", "synthetic": True}))
    assert training.load_or_train_cnn(tiny_data, path, strategy=one, epochs=1)[1].startswith("Trained")
