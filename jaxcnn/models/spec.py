"""Model specs: a JSON description of a model that rebuilds it, in any process.

A spec is the model's kind and every constructor argument, nested for a model that holds
another (a :class:`~jaxcnn.models.Classifier` and its backbone)::

    >>> model_spec(CifarCNN(widths=(8, 16)))
    {'kind': 'cifar_cnn', 'num_classes': 10, 'widths': [8, 16], 'dense_units': 128, ...}
    >>> build_model(model_spec(m)) == m
    True

``MODEL_KINDS`` is the static table of the kinds this project builds. Every run writes its
model's spec into its ``config.json`` (``jaxcnn.train.fit``), and ``jaxcnn.inference``
rebuilds the model from it without importing the code that trained it. A model of another
class gets ``{"kind": None, "class": "module.Name"}``: recorded, but only rebuilt by
passing the module itself (``jaxcnn.inference.restore(workdir, model=...)``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from jaxcnn.models.cifar_cnn import CifarCNN
from jaxcnn.models.resnet import Classifier, ResNet

#: kind -> Flax module class. ``ResNet50`` and ``ResNetTiny`` are ``ResNet`` with set sizes.
MODEL_KINDS: dict[str, type[nn.Module]] = {"cifar_cnn": CifarCNN, "resnet": ResNet, "classifier": Classifier}

_NOT_ARGUMENTS = ("parent", "name")  # Flax's own dataclass fields


def _kind_of(model: nn.Module) -> Optional[str]:
    return next((k for k, cls in MODEL_KINDS.items() if type(model) is cls), None)


def _encode(name: str, value: Any) -> Any:
    if isinstance(value, nn.Module):
        return model_spec(value)
    if isinstance(value, (tuple, list)):
        return [_encode(name, v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    try:  # a dtype (jnp.float32, np.dtype("bfloat16"), ...)
        return {"dtype": jnp.dtype(value).name}
    except TypeError:
        raise ValueError(f"model_spec: argument {name}={value!r} cannot be written as JSON") from None


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and "kind" in value:
        return build_model(value)
    if isinstance(value, dict) and set(value) == {"dtype"}:
        return getattr(jnp, value["dtype"])  # jnp.float32, jnp.bfloat16, ... as a model is written
    if isinstance(value, list):
        return tuple(_decode(v) for v in value)  # module fields must be hashable
    return value


def model_spec(model: nn.Module) -> dict:
    """The JSON-ready spec of ``model``: ``{"kind": ..., <every constructor argument>}``.

    A module whose class is not in ``MODEL_KINDS`` gets ``{"kind": None, "class": "module.Name"}``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_spec: model must be a flax.linen.Module, got {type(model).__name__}")
    kind = _kind_of(model)
    if kind is None:
        return {"kind": None, "class": f"{type(model).__module__}.{type(model).__qualname__}"}
    spec = {"kind": kind}
    for f in dataclasses.fields(model):
        if f.name not in _NOT_ARGUMENTS:
            spec[f.name] = _encode(f.name, getattr(model, f.name))
    return spec


def build_model(spec: dict) -> nn.Module:
    """The model a spec describes (``build_model(model_spec(m)) == m``).

    Raises:
      ValueError: the spec has no known kind (the message lists them), or names an
        argument the model does not have.
    """
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ValueError(f"build_model: spec must be a dict with a 'kind', got {spec!r}")
    kind = spec["kind"]
    if kind not in MODEL_KINDS:
        where = f" (class {spec['class']})" if spec.get("class") else ""
        raise ValueError(f"build_model: kind={kind!r}{where} is not in jaxcnn.models.MODEL_KINDS "
                         f"({', '.join(MODEL_KINDS)}); pass the model itself instead")
    cls = MODEL_KINDS[kind]
    fields = {f.name for f in dataclasses.fields(cls)} - set(_NOT_ARGUMENTS)
    unknown = sorted(set(spec) - fields - {"kind"})
    if unknown:
        raise ValueError(f"build_model: {kind} has no argument(s) {unknown}; allowed: {sorted(fields)}")
    return cls(**{k: _decode(v) for k, v in spec.items() if k != "kind"})


def module_of(apply_fn) -> Optional[nn.Module]:
    """The Flax module behind ``apply_fn`` (``model.apply``, or a ``functools.partial`` of it), or None."""
    while isinstance(apply_fn, functools.partial):
        apply_fn = apply_fn.func
    owner = getattr(apply_fn, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None
