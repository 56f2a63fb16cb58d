"""Flax Linen models assembled from :mod:`jaxcnn.layers`.

* :class:`CifarCNN` — the seed's CIFAR-10 CNN (three conv blocks, dense head; logits out).
* :class:`ResNet50` — Keras' v1 ResNet50 with Keras layer names (:mod:`jaxcnn.models.resnet`);
  :class:`Classifier` puts a new head on a backbone for fine-tuning.
"""

from jaxcnn.models.cifar_cnn import CifarCNN
from jaxcnn.models.resnet import Classifier, ResNet, ResNet50, ResNetTiny

__all__ = ["CifarCNN", "Classifier", "ResNet", "ResNet50", "ResNetTiny"]
