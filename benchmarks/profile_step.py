"""Where the CIFAR CNN's train step spends its time, operation by operation.

Run:  python -m benchmarks.profile_step [--batch 64 --rounds 5 --precision float32]

Each piece of the step is jitted alone at the shapes the step gives it (batch ``--batch``,
the seed's widths 32/64/128 at 32, 16 and 8 pixels) and timed: the six convolutions forward,
their input gradients (``dX``, not needed for the first) and weight gradients (``dW``, with the
bias gradient), BatchNorm + ReLU forward and backward in training mode, the max-pools forward
and backward, the dense layers, and Adam's update of every parameter. Then the whole jitted step
(``make_train_step``, donated) for comparison: the pieces' sum against the step shows what XLA's
fusion saves or what the pieces miss. All pieces run in one process, in interleaved rounds; the
table gives the median ms of ``--rounds`` rounds (each the mean of a few calls).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def _pieces(batch: int, dtype):
    import jax
    import jax.numpy as jnp
    import optax

    from jaxcnn import layers
    from jaxcnn.models import CifarCNN
    from jaxcnn.models.bricks import BatchNorm
    from jaxcnn.train import TrainState, adam, make_train_step

    key = jax.random.key(0)
    pieces = {}
    cin, size = 3, 32
    for b, w in enumerate((32, 64, 128), start=1):
        for i in (1, 2):
            x = jax.random.normal(key, (batch, size, size, cin), dtype)
            k = jax.random.normal(key, (3, 3, cin, w), dtype) * 0.1
            bias = jnp.zeros((w,), dtype)
            g = jax.random.normal(key, (batch, size, size, w), dtype)

            def conv(x, k, bias):
                return layers.conv2d(x, k, bias, padding="SAME")

            pieces[f"conv b{b}.{i} fwd ({cin}->{w}, {size}px)"] = (jax.jit(conv), (x, k, bias))
            if not (b == 1 and i == 1):
                pieces[f"conv b{b}.{i} dX"] = (jax.jit(lambda x, k, bias, g: jax.vjp(lambda x: conv(x, k, bias), x)[1](g)),
                                               (x, k, bias, g))
            pieces[f"conv b{b}.{i} dW"] = (jax.jit(lambda x, k, bias, g: jax.vjp(lambda k, b: conv(x, k, b), k, bias)[1](g)),
                                           (x, k, bias, g))
            bn = BatchNorm(use_running_average=False, dtype=dtype)
            bv = bn.init(key, g)

            def bn_relu(v, y, g):  # training mode: batch statistics, moving averages updated
                return jax.vjp(lambda y: bn.apply(v, jax.nn.relu(y), mutable=["batch_stats"])[0], y)[1](g)

            pieces[f"relu+BN b{b}.{i} fwd+bwd"] = (jax.jit(bn_relu), (bv, g, g))
            cin = w
        y = jax.random.normal(key, (batch, size, size, cin), dtype)
        gp = jax.random.normal(key, (batch, size // 2, size // 2, cin), dtype)
        pieces[f"maxpool b{b} fwd+bwd"] = (jax.jit(lambda y, g: jax.vjp(lambda y: layers.max_pool2d(y, 2), y)[1](g)),
                                           (y, gp))
        size //= 2
    model = CifarCNN(dtype=dtype)
    variables = model.init(key, jnp.zeros((1, 32, 32, 3)), train=False)
    tx = optax.adam(1e-3)
    opt = tx.init(variables["params"])
    grads = jax.tree.map(jnp.ones_like, variables["params"])
    pieces["Adam update (all parameters)"] = (
        jax.jit(lambda g, o, p: optax.apply_updates(p, tx.update(g, o, p)[0])), (grads, opt, variables["params"]))
    xd = jax.random.normal(key, (batch, 4 * 4 * 128), dtype)
    wd = jax.random.normal(key, (4 * 4 * 128, 128), dtype) * 0.01
    pieces["dense 2048->128 fwd+bwd"] = (jax.jit(lambda x, w: jax.vjp(lambda x, w: x @ w, x, w)[1](x @ w)), (xd, wd))

    state = TrainState.create(apply_fn=model.apply, variables=variables, tx=adam(1e-3), key=jax.random.key(1))
    step = jax.jit(make_train_step())  # not donated: the same state is reused every call
    data = {"image": jnp.zeros((batch, 32, 32, 3), jnp.uint8), "label": jnp.zeros((batch,), jnp.int32)}
    whole = ("whole train step (jit)", (step, (state, data)))
    return pieces, whole


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__.split("\n")[0],
                                allow_abbrev=False)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=5, help="calls per timing (their mean)")
    p.add_argument("--precision", choices=("float32", "bfloat16"), default="float32")
    args = p.parse_args(argv)
    import jax
    import jax.numpy as jnp

    dtype = jnp.bfloat16 if args.precision == "bfloat16" else jnp.float32
    pieces, (whole_name, whole) = _pieces(args.batch, dtype)
    runs = {**pieces, whole_name: whole}
    for f, a in runs.values():  # compile and warm up
        jax.block_until_ready(f(*a))
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (f, a) in runs.items():
            t = time.perf_counter()
            for _ in range(args.calls):
                out = f(*a)
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - t) / args.calls * 1e3)
    med = {name: statistics.median(v) for name, v in times.items()}
    step = med[whole_name]
    groups = {"conv fwd": "fwd (", "conv dX": " dX", "conv dW": " dW", "relu+BN": "relu+BN", "maxpool": "maxpool",
              "dense": "dense", "Adam": "Adam"}
    print(f"CifarCNN train step, batch {args.batch}, {args.precision}, jax {jax.__version__}, "
          f"{jax.devices()[0].device_kind}; median of {args.rounds} rounds\n")
    print("| piece | ms | % of the step |\n|---|---:|---:|")
    for name in pieces:
        print(f"| {name} | {med[name]:.2f} | {med[name] / step:.1%} |")
    print(f"| **{whole_name}** | **{step:.2f}** | 100% |\n")
    print("| group | ms | % of the step |\n|---|---:|---:|")
    total = 0.0
    for group, key in groups.items():
        ms = sum(v for n, v in med.items() if key in n and n != whole_name)
        total += ms
        print(f"| {group} | {ms:.2f} | {ms / step:.1%} |")
    print(f"| sum of the pieces | {total:.2f} | {total / step:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
