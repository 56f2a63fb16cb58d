"""Flax Linen models assembled from :mod:`jaxcnn.layers`, and the specs that rebuild them.

* :class:`CifarCNN` — the seed's CIFAR-10 CNN (three conv blocks, dense head; logits out).
* :class:`ResNet50` — Keras' v1 ResNet50 with Keras layer names (:mod:`jaxcnn.models.resnet`);
  :class:`Classifier` puts a new head on a backbone for fine-tuning.
* :func:`model_spec` / :func:`build_model` — a model as JSON and back (``MODEL_KINDS``).
"""

from jaxcnn.models.bricks import BatchNorm, Conv2D
from jaxcnn.models.cifar_cnn import CifarCNN
from jaxcnn.models.resnet import Classifier, ResNet, ResNet50, ResNetTiny
from jaxcnn.models.spec import MODEL_KINDS, build_model, model_spec, module_of

__all__ = ["MODEL_KINDS", "BatchNorm", "CifarCNN", "Classifier", "Conv2D", "ResNet", "ResNet50", "ResNetTiny",
           "build_model", "model_spec", "module_of"]
