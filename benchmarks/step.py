"""The seed CNN's train step alone, for A/B runs of one setting at a time (an environment variable,
a flag of XLA or OpenMP): a donated jitted step on random uint8 data in memory, Adam, one device.

Run:  JAXCNN_KERNELS=xla python -m benchmarks.step [--batch 64 --rounds 5 --steps 10]

Prints the median of ``--rounds`` rounds of ``--steps`` steps, in ms per step and images/s, and the
convolution path it ran. Compare settings run in turn on a quiet machine, or pair them with
``farm-bench``-style interleaving; the suite (``benchmarks.suite``) is the side-by-side reference.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.step", description=__doc__.split("\n")[0],
                                allow_abbrev=False)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args(argv)

    from jaxcnn.train.cpu import keep_host_memory

    keep_host_memory()  # as the CLIs do
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxcnn import kernels
    from jaxcnn.models import CifarCNN
    from jaxcnn.train import TrainState, adam, make_train_step

    model = CifarCNN()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    state = TrainState.create(apply_fn=model.apply, variables=variables, tx=adam(1e-3), key=jax.random.key(1))
    step = jax.jit(make_train_step(), donate_argnums=0)
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.integers(0, 256, (args.batch, 32, 32, 3), dtype=np.uint8)),
             "label": jnp.asarray(rng.integers(0, 10, args.batch).astype(np.int32))}
    for _ in range(3):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.rounds):
        t = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append((time.perf_counter() - t) / args.steps)
    s = statistics.median(times)
    path, why = kernels.choose("float32")
    print(f"batch {args.batch}: {s * 1e3:.1f} ms/step, {args.batch / s:.0f} img/s; convolutions: {path}"
          + (f" ({why})" if why else ""))


if __name__ == "__main__":
    main()
