"""Notebook 11's shared pieces: ZeRO 1-3 steps, MoE routing, interleaved 1F1B."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from utils import devices
from utils.lessons import hybrid_parallelism as hp
from utils.lessons import pipeline_parallelism as pipe
from utils.lessons import sharded_and_expert_parallelism as sh
from utils.lessons import tensor_parallelism as tp
from utils.lessons.mirrored_strategy import max_abs_diff


def _batches(mesh, sizes, steps=2, batch=48, seed=1):
    rng = np.random.default_rng(seed)
    teacher = rng.normal(size=(sizes[0], sizes[-1])).astype(np.float32)
    out = []
    for _ in range(steps):
        x = rng.normal(size=(batch, sizes[0])).astype(np.float32)
        out.append(hp.batch_to_mesh(mesh, x, np.argmax(x @ teacher, axis=1).astype(np.int32)))
    return out


@pytest.mark.parametrize("n", [2, 4])
def test_zero_stages_equal_plain_data_parallelism(n):
    n = min(n, len(devices.compute_devices()))  # the first n devices (fewer if fewer exist)
    mesh = sh.batch_mesh(n)
    sizes = [8, 16, 8]
    weights = sh.init_mlp(sizes, seed=0)
    batches = _batches(mesh, sizes)
    ref_losses, ref_model, ref_opt, _ = sh.train_zero(0, weights, batches, mesh)
    n_params = sum(w.size for w in weights.values())
    for stage in (1, 2, 3):
        losses, model, opt, _ = sh.train_zero(stage, weights, batches, mesh)
        assert max_abs_diff(losses, ref_losses) <= 1e-5
        for k in weights:
            assert max_abs_diff(tp.to_numpy(model.params[k]), tp.to_numpy(ref_model.params[k])) <= 1e-5
        # bytes on one device: weights / n from stage 3, gradients from 2, moments from 1
        assert sh.device_bytes(model.params.values()) == 4 * n_params // (n if stage == 3 else 1)
        assert sh.device_bytes(opt.grads) == 4 * n_params // (n if stage >= 2 else 1)
        assert sh.device_bytes(opt.m + opt.v) == 8 * n_params // n


def test_moe_expert_parallel_equals_reference():
    compute = devices.compute_devices()
    rng = np.random.default_rng(0)
    num_experts, d, tokens = 4, 8, 16
    capacity = math.ceil(1.0 * tokens / num_experts)
    router = tf.constant(rng.normal(0, 1.0, (d, num_experts)).astype(np.float32))
    experts = [(tf.constant(rng.normal(0, 0.3, (d, 12)).astype(np.float32)),
                tf.constant(rng.normal(0, 0.3, (12, d)).astype(np.float32))) for _ in range(num_experts)]
    shards = [tf.constant(rng.normal(size=(tokens, d)).astype(np.float32)) for _ in compute]
    expert_devices = [compute[e % len(compute)] for e in range(num_experts)]
    out, aux, kept = sh.moe_expert_parallel(shards, router, experts, compute, expert_devices, capacity)
    ref = sh.moe_reference(shards, router, experts, capacity)
    assert max_abs_diff(out, ref) <= 1e-5
    assert kept.shape == (num_experts,)
    assert int(tf.reduce_max(kept)) <= capacity * len(compute)  # capacity respected per shard
    assert float(aux) >= 1.0 - 1e-6  # Switch loss: at least 1, 1 when perfectly balanced


def test_route_drops_tokens_past_capacity():
    x = tf.ones((6, 2))  # every token goes to the same expert
    router = tf.constant([[1.0, 0.0], [1.0, 0.0]])
    dispatch, combine, aux, kept = sh.route(x, router, 2, capacity=4)
    assert kept.numpy().sum(axis=0).tolist() == [4, 0]  # 2 of 6 dropped
    assert dispatch.numpy().sum() == 4
    assert float(aux) == pytest.approx(2 * 1.0 * float(tf.nn.softmax([2.0, 0.0])[0]))


@pytest.mark.parametrize("p,m,v", [(2, 4, 2), (4, 8, 2), (4, 8, 4), (3, 6, 3)])
def test_interleaved_schedule(p, m, v):
    order = sh.interleaved_one_f_one_b_order(p, m, v)
    tasks = [t for device in order for t in device]
    assert sorted(tasks) == sorted((k, s, i) for k in "FB" for s in range(p * v) for i in range(m))
    assert all(s % p == d for d, device in enumerate(order) for _, s, _ in device)
    times = sh.simulate_devices(order, p * v, chunk_time=1.0 / v)
    assert all(times[dep][1] <= times[t][0] for t in tasks for dep in pipe.depends_on(t, p * v))
    busy = sum(end - start for start, end in times.values())
    bubble = 1 - busy / (p * pipe.makespan(times))
    assert bubble == pytest.approx((p - 1) / (v * m + p - 1))


def test_interleaved_with_one_chunk_is_1f1b():
    assert sh.interleaved_one_f_one_b_order(4, 8, 1) == pipe.one_f_one_b_order(4, 8)


def test_zero3_gathering_again_in_backward_equals_zero3():
    mesh = sh.batch_mesh(min(2, len(devices.compute_devices())))
    weights = sh.init_mlp([8, 16, 8], seed=0)
    batches = _batches(mesh, [8, 16, 8])
    kept, _, _, _ = sh.train_zero(3, weights, batches, mesh)
    again, _, _, _ = sh.train_zero(3, weights, batches, mesh, regather=True)
    assert max_abs_diff(again, kept) <= 1e-6
