"""One `make bench` measurement, run in a fresh Python process: `python scripts/bench_children.py '<spec JSON>'`.

Thread pools and the number of logical devices are fixed once TensorFlow starts, so
`utils.bench.run_in_fresh_process` starts this script once per measurement; it prints
`RESULT <json>` as its last line. See `run_in_fresh_process` for the spec's keys.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def feeds(spec: dict, ds) -> dict:
    """The input pipeline against naive NumPy feeding and the in-memory ceiling."""
    from utils import throughput

    results = throughput.measure_feeds(ds.x_train, ds.y_train, batch_size=spec["batch"], n_batches=spec["steps"],
                                       rounds=spec.get("rounds", 3))
    return throughput.pipeline_ratios(results)


def pipeline_parallel(spec: dict, ds) -> dict:
    """Notebook 06's pipelined step, p stages on p devices, against the unsplit model's step."""
    import keras

    from utils import bench, devices, models
    from utils.data import to_float
    from utils.lessons import pipeline_parallelism as pp

    model = models.build_seed_cnn()
    names = devices.compute_devices()[: spec["stages"]]
    stages = pp.split_model(model, pp.stage_starts(model, spec["stages"]), names)
    split = pp.make_pipeline_step(stages, names, spec["micro"], optimizer=keras.optimizers.SGD(0.01),
                                  strict=spec.get("strict", False))
    whole = pp.make_unsplit_step(model, optimizer=keras.optimizers.SGD(0.01))
    x, y = to_float(ds.x_train[: spec["batch"]]), ds.y_train[: spec["batch"]]
    ms = bench.time_interleaved({"split": lambda: split(x, y), "whole": lambda: whole(x, y)}, spec["steps"])
    out = {"images_per_s": spec["batch"] / ms["split"] * 1e3, "baseline_images_per_s": spec["batch"] / ms["whole"] * 1e3}
    if spec.get("trace"):  # steps under the profiler: how much of the time were two stages busy at once?
        overlaps = [pp.busy_and_overlap(pp.op_intervals(pp.capture_trace(split, x, y, f"{spec['trace']}/{k}")))[2]
                    for k in range(5)]  # one traced step each; the median of 5 (one step varies)
        out["overlap"] = sorted(overlaps)[2]
    return out


def mesh_vs_mirrored(spec: dict, ds) -> dict:
    """Notebook 08's DTensor mesh step (batch x model) against notebook 02's MirroredStrategy
    step on the same devices, the same widened CNN and the same global batch."""
    import keras
    import numpy as np
    import tensorflow as tf

    from utils import bench, devices
    from utils.data import to_float
    from utils.lessons import hybrid_parallelism as hp
    from utils.lessons import mirrored_strategy as ms

    (b, m), batch = spec["mesh"], spec["batch"]
    wide = hp.widened_cnn()
    x, y = to_float(ds.x_train[:batch]), ds.y_train[:batch].astype(np.int32)
    mesh = hp.hybrid_mesh(b, m)
    mesh_step, xb, yb = hp.make_train_step(hp.HybridCNN(wide, mesh), hp.Adam(1e-3)), *hp.batch_to_mesh(mesh, x, y)
    strategy = devices.make_strategy(devices.compute_devices()[: b * m])
    with strategy.scope():
        ref = keras.models.clone_model(wide)
        ref_step = ms.make_train_step(strategy, ref, keras.optimizers.Adam(1e-3), batch)
    batches = iter(strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors((x, y)).repeat()))
    times = bench.time_interleaved({"mesh": lambda: mesh_step(xb, yb).numpy(),
                                    "mirrored": lambda: ref_step(next(batches)).numpy()}, spec["steps"])
    return {"images_per_s": batch / times["mesh"] * 1e3, "baseline_images_per_s": batch / times["mirrored"] * 1e3}


def tensor_parallel(spec: dict, ds) -> dict:
    """Notebook 07's Megatron MLP head, sharded over N devices, against the same module on 1."""
    import numpy as np

    from utils import bench
    from utils.lessons import tensor_parallelism as tp

    feats = np.random.default_rng(0).normal(size=(spec["batch"], 2048)).astype("float32")
    labels = ds.y_train[: spec["batch"]].astype("int32")
    steps = {}
    for label, n in (("sharded", spec["replicas"]), ("one", 1)):
        mesh = tp.model_mesh(n)
        step = tp.make_sgd_step(tp.ShardedMLP.create(2048, 1024, 10, mesh, seed=0), 0.05)
        xd, yd = tp.shard(feats, tp.layout(mesh, None, None)), tp.shard(labels, tp.layout(mesh, None))
        steps[label] = lambda step=step, xd=xd, yd=yd: step(xd, yd).numpy()
    ms = bench.time_interleaved(steps, spec["steps"])
    return {"images_per_s": spec["batch"] / ms["sharded"] * 1e3, "baseline_images_per_s": spec["batch"] / ms["one"] * 1e3}


def fit_or_time_to_accuracy(spec: dict, ds) -> dict:
    """`model.fit` images/s ("fit") or seconds to a test accuracy ("tta"), seed or series recipe."""
    import tensorflow as tf

    from utils import bench, devices, models
    from utils.data import to_float
    from utils.lessons.cifar10_pipeline import make_dataset

    names = devices.compute_devices()
    strategy = tf.distribute.MirroredStrategy(names[: spec["replicas"]]) if spec.get("replicas") else tf.distribute.get_strategy()
    with strategy.scope():
        model = models.build_seed_cnn()
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    if spec["recipe"] == "seed":  # the article: float64 NumPy arrays, batch 32
        x, y = ds.x_train / 255.0, ds.y_train
    else:
        x, y = make_dataset(ds.x_train, ds.y_train, spec["batch"], training=True), None
    if spec["kind"] == "fit":
        return {"images_per_s": bench.fit_throughput(model, x, y, batch_size=spec["batch"], steps=spec["steps"],
                                                     warmup=spec["warmup"])}
    elapsed, acc, epoch = 0.0, 0.0, 0
    for epoch in range(1, spec["max_epochs"] + 1):
        start = time.perf_counter()
        model.fit(x, y, batch_size=spec["batch"] if y is not None else None, epochs=1, verbose=0)
        elapsed += time.perf_counter() - start
        acc = float(model.evaluate(to_float(ds.x_test), ds.y_test, batch_size=500, verbose=0)[1])
        print(f"  [{spec['name']}] epoch {epoch}: test accuracy {acc:.3f} after {elapsed:.0f} s", flush=True)
        if acc >= spec["target"]:
            break
    return {"seconds": elapsed, "accuracy": acc, "epochs": epoch, "reached": acc >= spec["target"]}


KINDS = {"feeds": feeds, "pp": pipeline_parallel, "tp": tensor_parallel, "mesh": mesh_vs_mirrored,
         "fit": fit_or_time_to_accuracy, "tta": fit_or_time_to_accuracy}


def run_measurement(spec: dict) -> dict:
    """Set up threads, devices, seed, data and dtype policy for `spec`, then measure it."""
    from utils import config, data, devices

    if spec["kind"] not in KINDS:
        raise ValueError(f"unknown kind {spec['kind']!r}")
    if spec.get("tuned_threads"):
        devices.set_threads(*devices.replica_threads(spec["replicas"]))
    elif spec.get("threads"):  # [intra_op, inter_op]; 0 keeps TensorFlow's default
        devices.set_threads(*(t or None for t in spec["threads"]))
    devices.setup_devices(spec.get("cpus", 1))
    import keras

    config.seed_everything(0)
    ds = data.load_cifar10(allow_synthetic=True, n_train=spec["n_train"], n_test=spec.get("n_test"))
    keras.mixed_precision.set_global_policy(spec.get("policy", "float32"))
    import tensorflow as tf

    pools = [tf.config.threading.get_intra_op_parallelism_threads(), tf.config.threading.get_inter_op_parallelism_threads()]
    return {**KINDS[spec["kind"]](spec, ds), "synthetic": ds.is_synthetic, "threads": pools}


if __name__ == "__main__":
    print("RESULT " + json.dumps(run_measurement(json.loads(sys.argv[1]))), flush=True)
