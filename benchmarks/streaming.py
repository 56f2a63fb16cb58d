"""A folder of photos in memory against streamed from disk: the ResNet50 fine-tuning step (phase 1,
backbone frozen) on the same images, in the same order.

Run:  python -m benchmarks.streaming [--images 120 --photo_size 320 --size 224 --batch 8 --steps 10 --rounds 3]

Writes a folder of JPEG photos (``--images`` in 3 classes, ``--photo_size`` pixels square, made
from the embedded generator's images) into a temporary folder, loads it twice with
``load_dataset("folder", ...)`` — ``stream=False`` (decoded into memory once; batches gathered
on the device) and ``stream=True`` (each batch decoded from disk in background threads while the
device trains) — and times ``--steps`` steps of ``fit``'s jitted, donated phase-1 train step
(ResNet50 with its backbone frozen, caffe preprocessing, augmentation) per round, the two paths
taking turns. Reports images/s and, for the streamed path, the fraction of the time the loop
waited for a batch (``TrainFeed.source.wait_s``). Weights are random (speed does not depend on them).
The measured table is in ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time


def write_photos(root: str, n: int, size: int) -> None:
    import numpy as np
    from PIL import Image

    from jaxcnn.data import make_offline_dataset

    data = make_offline_dataset(num_train=n * 4, num_val=1, num_test=1, num_classes=3, seed=0).train
    for c, name in enumerate(("disk", "ring", "square")):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i, img in enumerate(data.images[data.labels == c][: n // 3]):
            Image.fromarray(np.asarray(img)).resize((size, size), Image.BILINEAR).save(
                os.path.join(root, name, f"{i:04d}.jpg"), quality=90)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.streaming", description=__doc__.split("\n")[0],
                                allow_abbrev=False)
    p.add_argument("--images", type=int, default=120)
    p.add_argument("--photo_size", type=int, default=320, help="side of the JPEG files (320)")
    p.add_argument("--size", type=int, default=224, help="model input size (224)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from jaxcnn import freeze
    from jaxcnn.data import AugmentConfig, load_dataset
    from jaxcnn.models import Classifier, ResNet50
    from jaxcnn.preprocess import caffe_preprocess
    from jaxcnn.train import TrainFeed, TrainState, adam, make_mesh, make_train_step
    from jaxcnn.train.sharding import replicate

    with tempfile.TemporaryDirectory() as root:
        t = time.perf_counter()
        write_photos(root, args.images, args.photo_size)
        print(f"wrote {args.images} JPEG photos of {args.photo_size}x{args.photo_size} in {time.perf_counter() - t:.1f} s")
        mesh = make_mesh()
        model = Classifier(ResNet50(include_top=False, pooling="avg"), num_classes=3, hidden=256, dropout_rate=0.5)
        variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, args.size, args.size, 3)), train=False))(
            jax.random.key(0))
        labels = freeze.label_tree(variables["params"], freeze.backbone())
        frozen_bn = freeze.frozen_layer_names(labels, under="backbone")
        step = jax.jit(make_train_step(labels=labels, augment_fn=AugmentConfig(rotation=0.0).fn(),
                                       preprocess=caffe_preprocess), donate_argnums=0)
        paths = {}
        for name, stream in (("in memory", False), ("streamed", True)):
            t = time.perf_counter()
            ds = load_dataset("folder", data_dir=root, image_size=args.size, stream=stream, val_fraction=0.05,
                              test_fraction=0.05)
            load_s = time.perf_counter() - t
            state = replicate(TrainState.create(apply_fn=functools.partial(model.apply, frozen_bn=frozen_bn),
                                                variables=jax.tree.map(jnp.copy, variables),  # own buffers: donated
                                                tx=adam(1e-3, labels=labels),
                                                key=jax.random.key(1)), mesh)
            feed = TrainFeed(ds.train, args.batch, mesh, seed=0)
            paths[name] = {"feed": feed, "state": state, "load_s": load_s, "ips": [], "wait": [], "epoch": 0}
        for r in range(args.rounds + 1):  # round 0: compile and warm up
            for name, rec in paths.items():
                feed = rec["feed"]
                waited = feed.source.wait_s
                rec["epoch"] += 1
                t = time.perf_counter()
                for i, batch in enumerate(feed.epoch(rec["epoch"])):
                    if i == args.steps:
                        break
                    rec["state"], m = step(rec["state"], batch)
                jax.block_until_ready(m)
                dt = time.perf_counter() - t
                if r:
                    rec["ips"].append(args.steps * args.batch / dt)
                    rec["wait"].append((feed.source.wait_s - waited) / dt)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"\nResNet50 fine-tuning phase 1 (backbone frozen), {args.size}x{args.size}, batch {args.batch}, "
          f"median of {args.rounds} rounds of {args.steps} steps; CPU {cpu}, {os.cpu_count()} cores, "
          f"jax {jax.__version__}\n")
    print("| path | load (s) | images/s | waiting for data |\n|---|---:|---:|---:|")
    for name, rec in paths.items():
        print(f"| {name} | {rec['load_s']:.1f} | {statistics.median(rec['ips']):.1f} | "
              f"{100 * statistics.median(rec['wait']):.1f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
