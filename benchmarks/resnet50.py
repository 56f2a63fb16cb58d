"""ResNet50 throughput: the Flax port against Keras 3 (JAX backend), and fine-tuning steps
with the whole backbone frozen against nothing frozen.

Run:  JAX_PLATFORMS=cpu python -m benchmarks.resnet50 [--batch 8 --size 224 --rounds 3]

All variants run in one process, interleaved round by round (one timed call per variant
per round, after a compile/warm-up call); the table gives the median img/s. Weights are
random (speed does not depend on them). Variants:

* forward, jit: ``jax.jit(model.apply)`` (``train=False``) vs Keras ``predict_on_batch``
  (Keras jits it too).
* train step, backbone frozen, grad w.r.t. the head only: ``freeze.partition`` splits the
  params and ``jax.grad`` sees only the head (BN of the backbone in inference mode).
* train step, backbone frozen, mask only: ``jax.grad`` over all params, ``freeze.masked``
  zeroes the frozen updates (same jit; shows what XLA can or cannot drop by itself).
* train step, nothing frozen.

Every train step is Adam behind ``freeze.masked`` in one ``jax.jit``.

Measured (2-core Intel Xeon VM shared with other jobs, CPU only, jax 0.10.2, keras 3.15.1,
batch 8, 224×224, median of 5 interleaved rounds; two runs):

    forward flax (jit)                              19.0 / 19.4 img/s
    forward keras-jax (predict_on_batch)            20.4 / 20.2 img/s
    train, backbone frozen, grad w.r.t. head only   20.7 / 20.3 img/s
    train, backbone frozen, mask only (grad all)    20.6 / 20.8 img/s
    train, nothing frozen                            2.2 /  2.1 img/s

The port runs at Keras' speed (a separate A/B of the forward alone gave 20.7 img/s);
a frozen-backbone step costs one forward pass, ~10x less than full training. Inside one
jit, XLA also drops the gradients that the mask zeroes (mask-only is as fast); the
partition is still what guarantees it, e.g. when a metric reads the full gradient tree.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcnn import freeze
from jaxcnn.models.resnet import Classifier, ResNet50


def _block(tree):
    jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, tree)
    return tree


def train_step_fn(model, labels, *, grad_all: bool):
    """One jitted Adam step; ``grad_all`` differentiates every parameter (mask only)."""
    tx = freeze.masked(optax.adam(1e-3), labels)
    frozen_bn = freeze.frozen_layer_names(labels, under="backbone")

    def loss_fn(params, stats, x, y):
        logits, upd = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                                  frozen_bn=frozen_bn, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd["batch_stats"]

    @jax.jit
    def step(params, stats, opt_state, x, y):
        if grad_all:
            (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, y)
        else:
            trainable, frozen = freeze.partition(params, labels)
            (loss, stats), g = jax.value_and_grad(
                lambda t: loss_fn(freeze.combine(t, frozen), stats, x, y), has_aux=True)(trainable)
            grads = freeze.fill_frozen(g, frozen)
        updates, opt_state = tx.update(grads, opt_state, params)
        return freeze.apply_trainable_updates(params, updates, labels), stats, opt_state, loss

    return tx, step


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--classes", type=int, default=5, help="fine-tuning head width (tf_flowers: 5)")
    p.add_argument("--no-keras", action="store_true", help="skip the Keras forward")
    p.add_argument("--only", default="", help="comma-separated variant names to run (default all)")
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    x_np = rng.uniform(-120, 150, (args.batch, args.size, args.size, 3)).astype(np.float32)
    x = jnp.asarray(x_np)
    y = jnp.asarray(rng.integers(0, args.classes, args.batch))
    variants = {}

    # Forward: Flax port vs Keras-JAX.
    net = ResNet50()
    v = jax.jit(lambda k: net.init(k, x[:1], train=False))(jax.random.key(0))
    fwd = jax.jit(lambda v, x: net.apply(v, x, train=False))
    variants["forward flax (jit)"] = lambda: _block(fwd(v, x))
    if not args.no_keras:
        import keras

        kmodel = keras.applications.ResNet50(weights=None, input_shape=(args.size, args.size, 3))
        variants["forward keras-jax (predict_on_batch)"] = lambda: kmodel.predict_on_batch(x_np)

    # Fine-tuning steps on Classifier(ResNet50 no-top, avg) + Dense(classes).
    clf = Classifier(ResNet50(include_top=False, pooling="avg"), num_classes=args.classes)
    cv = jax.jit(lambda k: clf.init(k, x[:1], train=False))(jax.random.key(1))
    for name, rule, grad_all in [
        ("train backbone frozen, grad head only", freeze.backbone(), False),
        ("train backbone frozen, mask only (grad all)", freeze.backbone(), True),
        ("train nothing frozen", freeze.nothing(), True),
    ]:
        labels = freeze.label_tree(cv["params"], rule)
        tx, step = train_step_fn(clf, labels, grad_all=grad_all)
        state = [cv["params"], cv["batch_stats"], tx.init(cv["params"])]

        def run(step=step, state=state):
            out = _block(step(*state, x, y))
            state[:] = out[:3]

        variants[name] = run

    if args.only:
        keep = [s.strip() for s in args.only.split(",")]
        variants = {k: f for k, f in variants.items() if any(s in k for s in keep)}

    compile_s, times = {}, {k: [] for k in variants}
    for name, fn in variants.items():
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # report, keep measuring the others
            compile_s[name] = f"failed: {type(e).__name__}: {str(e)[:120]}"
            continue
        compile_s[name] = time.perf_counter() - t0
    ok = [k for k in variants if not isinstance(compile_s[k], str)]
    for _ in range(args.rounds):
        for name in ok:
            t0 = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - t0)

    device = f"{jax.devices()[0].platform} x{jax.device_count()} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    print(f"ResNet50, batch {args.batch}, {args.size}x{args.size}, {args.rounds} rounds, {device}")
    print(f"{'variant':<46} {'median s/batch':>14} {'img/s':>8} {'first call s':>12}")
    results = {}
    for name in variants:
        if name not in ok:
            print(f"{name:<46} {compile_s[name]}")
            results[name] = {"error": compile_s[name]}
            continue
        med = statistics.median(times[name])
        results[name] = {"median_s": med, "images_per_s": args.batch / med, "first_call_s": compile_s[name]}
        print(f"{name:<46} {med:>14.3f} {args.batch / med:>8.1f} {compile_s[name]:>12.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": args.batch, "size": args.size, "rounds": args.rounds, "device": device,
                       "jax": jax.__version__, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
