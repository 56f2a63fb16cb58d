"""Training: ``TrainState``, pure jitted steps, the ``fit`` loop, Keras-style callbacks, sharding.

>>> from jaxcnn.train import FitConfig, TrainState, adam, fit, make_eval_step, make_train_step
"""

from jaxcnn.train.callbacks import EarlyStopping, EpochCallbacks, ReduceLROnPlateau
from jaxcnn.train.config import FitConfig
from jaxcnn.train.feed import EvalFeed, TrainFeed, evaluate, shuffle_key
from jaxcnn.train.loop import RunInterrupted, TrainingDiverged, fit, run_config, train_epoch
from jaxcnn.train.steps import Steps
from jaxcnn.train.cpu import keep_host_memory, use_cpu_devices
from jaxcnn.train.sharding import make_mesh, replicate, shard_batch
from jaxcnn.train.state import (TrainState, accumulate_gradients, adam, get_learning_rate, get_weight_decay,
                                set_learning_rate, state_from_tree, state_to_tree)
from jaxcnn.train.steps import make_eval_step, make_train_step, step_keys

__all__ = [
    "EarlyStopping", "EpochCallbacks", "EvalFeed", "FitConfig", "ReduceLROnPlateau", "RunInterrupted", "Steps", "TrainFeed",
    "TrainState", "TrainingDiverged",
    "accumulate_gradients",
    "adam", "evaluate", "fit", "get_learning_rate", "get_weight_decay", "keep_host_memory", "make_eval_step", "make_mesh", "make_train_step",
    "replicate", "run_config", "set_learning_rate", "shard_batch", "shuffle_key", "state_from_tree",
    "state_to_tree", "step_keys", "train_epoch", "use_cpu_devices",
]
