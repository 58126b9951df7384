#!/usr/bin/env python
"""Benchmark: the tuned tf.data pipeline's throughput as a ratio of the in-memory ceiling
and of naive NumPy feeding (the seed article's feed). A benchmark, not a test.

Run on a quiet machine (other processes on the same cores make the ratios noisy):

    .venv/bin/python scripts/bench_pipeline.py                  # full sizes, real CIFAR-10
    SERIES_MODE=smoke .venv/bin/python scripts/bench_pipeline.py   # seconds, may be synthetic

All three feeds drive the same compiled training step of the seed CNN on one device, in
many short interleaved rounds (the order rotates, with a pause after each round); a ratio is
the median of the per-round ratios (see utils/throughput.py). On a 2-core VM single rounds
vary by +-10%, hence the many rounds.
Target of issue 3: tuned / ceiling >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import utils  # noqa: F401  (quiets TensorFlow's C++ start-up log)
from utils import config, devices

TARGET = 0.95


def main(argv: list[str] | None = None) -> int:
    sizes = config.sizes()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=sizes.batch_size, help="images per step (default: %(default)s)")
    parser.add_argument("--batches", type=int, default=config.pick(smoke=sizes.bench_batches, full=20), help="timed steps per round and feed (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=config.pick(smoke=2, full=45), help="interleaved rounds (default: %(default)s)")
    parser.add_argument("--n-train", type=int, default=sizes.n_train, help="training images to feed from (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    args = parser.parse_args(argv)

    devices.setup_devices()
    config.seed_everything()
    from utils import data, throughput

    cifar = data.load_for_mode(n_train=args.n_train, n_test=1)
    print(f"mode={config.get_mode()}  data: {cifar.label} ({cifar.source})  images={len(cifar.x_train)}  "
          f"device={devices.device_kind()}  batch={args.batch_size}  batches/round={args.batches}  rounds={args.rounds}")
    start = time.perf_counter()
    results = throughput.measure_feeds(
        cifar.x_train, cifar.y_train, batch_size=args.batch_size, n_batches=args.batches, rounds=args.rounds
    )
    table = throughput.feeds_table(results)
    ratios = throughput.pipeline_ratios(results)
    print(table.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:,.0f}" if v >= 10 else f"{v:.3f}"))
    print(f"tuned / ceiling = {ratios['tuned / ceiling']:.3f}   (target >= {TARGET}: "
          f"{'met' if ratios['tuned / ceiling'] >= TARGET else 'NOT met'})")
    print(f"tuned / naive   = {ratios['tuned / naive']:.3f}")
    tuned_row = table[table["feed"] == "tuned tf.data"].iloc[0]
    print(f"tuned feed alone: {tuned_row['feed alone images/s']:,.0f} images/s -> predicted share of the "
          f"ceiling when input and model share fully used cores: {tuned_row['predicted share (no spare core)']:.3f}")
    print(f"benchmark wall time {time.perf_counter() - start:.0f} s")
    if args.json:
        print(json.dumps({"mode": config.get_mode(), **ratios,
                          **{f"{r.feed} img/s": round(r.rate(min(r.seconds))) for r in results}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
