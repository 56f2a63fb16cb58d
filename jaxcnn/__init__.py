"""jaxcnn: classic CNN questions answered in JAX/Flax.

Pure-function layers (:mod:`jaxcnn.layers`), Flax models (:mod:`jaxcnn.models`),
a jit-compiled data-parallel training loop (:mod:`jaxcnn.train`), Orbax checkpoints
(:mod:`jaxcnn.checkpoint`) and runnable experiments (:mod:`jaxcnn.experiments`).
"""

__version__ = "0.1.0"
