"""The cost of one precise-BatchNorm re-estimation against one training epoch, both compiled and
warm, on a folder dataset (the digits of make_digits.py) with the cifar10 experiment's model.

    python experiments/small_data/time_precise_bn.py /tmp/digits 20
"""

import sys
import time

import jax

from jaxcnn.experiments import cifar10
from jaxcnn.experiments.configs import get_config, load_data
from jaxcnn.train import Steps, make_mesh
from jaxcnn.train.feed import TrainFeed
from jaxcnn.train.loop import train_epoch
from jaxcnn.train.precise_bn import make_reestimate


def main(data_dir: str, batches: int, repeats: int = 3) -> None:
    config = get_config("default", dataset="folder", data_dir=data_dir)
    dataset = load_data(config)
    model = cifar10.build_model(config, dataset.num_classes)
    state = cifar10.create_state(config, model, dataset.image_shape)
    steps = Steps.build(config.fit)
    feed = TrainFeed(dataset.train, config.fit.batch_size, make_mesh(), seed=0)
    reestimate = make_reestimate(config.bn_momentum, batches)
    epoch_s, est_s = [], []
    for e in range(1, repeats + 2):  # the first of each compiles: not counted
        t0 = time.perf_counter()
        state = train_epoch(state, steps.train, feed, e, repeats + 1, progress=False).state
        jax.block_until_ready(state.params)
        t1 = time.perf_counter()
        stats = jax.block_until_ready(reestimate(state, feed, e))
        t2 = time.perf_counter()
        state = state.replace(batch_stats=stats)
        if e > 1:
            epoch_s.append(t1 - t0)
            est_s.append(t2 - t1)
    n = feed.steps_per_epoch
    print(f"{len(dataset.train)} training images, batch {config.fit.batch_size}: {n} steps per epoch; "
          f"re-estimation over {min(batches, n)} batches")
    print(f"epoch: {min(epoch_s):.2f} s (best of {repeats}); re-estimation: {min(est_s):.2f} s "
          f"= {min(est_s) / min(epoch_s):.2f} of an epoch")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
