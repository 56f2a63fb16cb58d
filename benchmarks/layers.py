"""Layer benchmark: jaxcnn's pure functions (jit) against the seed's NumPy loops.

Run:  python -m benchmarks.layers          (or `make bench`)
Both implementations run side by side in one process, interleaved round by round, and
the table reports medians and the speed ratio; absolute times on a shared machine are
noisy, the ratio much less so. Results measured for the README are quoted there with
the hardware.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxcnn import layers, reference


def _time(fn, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--cin", type=int, default=16)
    p.add_argument("--cout", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, args.size, args.size, args.cin)).astype(np.float32)
    w = rng.standard_normal((3, 3, args.cin, args.cout)).astype(np.float32)
    b = np.zeros(args.cout, np.float32)
    xj, wj, bj = jnp.asarray(x), jnp.asarray(w), jnp.asarray(b)

    conv_jit = jax.jit(lambda x_, w_, b_: layers.conv2d(x_, w_, b_, padding=1))
    grad_jit = jax.jit(jax.grad(lambda x_, w_, b_: layers.conv2d(x_, w_, b_, padding=1).sum(), argnums=(0, 1, 2)))
    pool_jit = jax.jit(lambda x_: layers.max_pool2d(x_, 2))
    dout = np.ones((args.batch, args.size, args.size, args.cout), np.float32)

    cases = {
        "conv2d forward 3x3": (
            lambda: conv_jit(xj, wj, bj).block_until_ready(),
            lambda: reference.conv2d_forward(x, w, b, (1, 1), ((1, 1), (1, 1))),
        ),
        "conv2d backward (dX, dW, db)": (
            lambda: jax.block_until_ready(grad_jit(xj, wj, bj)),
            lambda: reference.conv2d_backward(dout, reference.conv2d_forward(x, w, b, (1, 1), ((1, 1), (1, 1)))[1]),
        ),
        "max_pool2d 2x2": (
            lambda: pool_jit(xj).block_until_ready(),
            lambda: reference.max_pool2d_forward(x),
        ),
    }
    print(f"# jaxcnn.layers (jit) vs NumPy loops: x {x.shape}, w {w.shape}; "
          f"{platform.processor() or platform.machine()}, {jax.devices()[0].platform} x{jax.device_count()}, "
          f"median of {args.rounds} interleaved rounds")
    print("| op | jaxcnn (ms) | NumPy loops (ms) | speed-up |")
    print("|---|---:|---:|---:|")
    for name, (fast, slow) in cases.items():
        fast()  # compile
        tf, ts = [], []
        for _ in range(args.rounds):  # interleave, so both see the same machine load
            tf += _time(fast, 5)
            ts += _time(slow, 1)
        mf, ms = statistics.median(tf) * 1e3, statistics.median(ts) * 1e3
        print(f"| {name} | {mf:.3f} | {ms:.1f} | {ms / mf:,.0f}x |")


if __name__ == "__main__":
    main()
