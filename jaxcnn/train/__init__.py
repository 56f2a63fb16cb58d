"""Training: ``TrainState``, pure jitted steps, the ``fit`` loop, Keras-style callbacks, sharding.

>>> from jaxcnn.train import TrainState, adam, make_train_step, make_eval_step, fit, FitConfig
"""

from jaxcnn.train.callbacks import EarlyStopping, ReduceLROnPlateau
from jaxcnn.train.loop import FitConfig, evaluate, fit, pad_split
from jaxcnn.train.sharding import make_mesh, replicate, shard_batch
from jaxcnn.train.state import TrainState, adam, get_learning_rate, set_learning_rate
from jaxcnn.train.steps import make_eval_step, make_train_step, scale_to_unit, step_keys

__all__ = [
    "EarlyStopping", "FitConfig", "ReduceLROnPlateau", "TrainState", "adam", "evaluate", "fit",
    "get_learning_rate", "make_eval_step", "make_mesh", "make_train_step", "pad_split", "replicate",
    "scale_to_unit", "set_learning_rate", "shard_batch", "step_keys",
]
