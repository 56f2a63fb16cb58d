"""The CIFAR CNN's train step with the convolutions' formulations chosen by timing against the
untuned step (and bfloat16 compute), side by side in one process.

Run:  python -m benchmarks.tuned_step [--batch 64 --rounds 7]

Each setting is traced and compiled in turn (``JAXCNN_AUTOTUNE`` is read at trace time): ``untuned``
(``0``), ``tuned`` (``1``: shapes not in the cache are timed now, then the cache), ``bf16``
(untuned, bfloat16 compute); then the jitted steps take turns, round after round, each timing
the mean of ``--calls`` steps; median images/s and the ratio to ``untuned``. One process, so the
settings share whatever else the machine runs; the suite (``-untuned``) runs one process each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tuned_step", description=__doc__.split("\n")[0],
                                allow_abbrev=False)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=3)
    args = p.parse_args(argv)
    from jaxcnn.train.cpu import keep_host_memory

    keep_host_memory()
    import jax
    import jax.numpy as jnp

    from jaxcnn import conv_tuning
    from jaxcnn.models import CifarCNN
    from jaxcnn.train import TrainState, adam, make_train_step

    data = {"image": jnp.zeros((args.batch, 32, 32, 3), jnp.uint8), "label": jnp.zeros((args.batch,), jnp.int32)}
    steps = {}
    for name, setting, dtype in (("untuned", "0", jnp.float32), ("tuned", "1", jnp.float32),
                                 ("bf16", "0", jnp.bfloat16)):
        os.environ["JAXCNN_AUTOTUNE"] = setting
        model = CifarCNN(dtype=dtype)
        variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
        state = TrainState.create(apply_fn=model.apply, variables=variables, tx=adam(1e-3), key=jax.random.key(1))
        step = jax.jit(make_train_step())
        t = time.perf_counter()
        jax.block_until_ready(step(state, data))
        print(f"{name}: traced, tuned and compiled in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
        steps[name] = (step, state)
    times = {n: [] for n in steps}
    for _ in range(args.rounds):
        for name, (step, state) in steps.items():
            t = time.perf_counter()
            for _ in range(args.calls):
                out = step(state, data)
            jax.block_until_ready(out)
            times[name].append(args.batch * args.calls / (time.perf_counter() - t))
    base = statistics.median(times["untuned"])
    print(f"{conv_tuning.machine_key()}; batch {args.batch}; median of {args.rounds} interleaved rounds "
          f"of {args.calls} steps; load {os.getloadavg()[0]:.1f}")
    for name, v in times.items():
        print(f"| {name} | {statistics.median(v):.0f} img/s | {statistics.median(v) / base:.2f} | "
              f"{', '.join(f'{x:.0f}' for x in v)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
