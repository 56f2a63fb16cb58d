"""Keras legacy HDF5 weight files -> Flax variables for ``jaxcnn.models.resnet``.

The layout (what ``keras.applications.ResNet50(weights="imagenet")`` downloads, and what
``keras.src.legacy.saving.legacy_h5_format.save_weights_to_hdf5_group`` writes)::

    /  attrs["layer_names"] = every layer of the model, in model.layers order
    /<layer>  attrs["weight_names"] = ["<layer>/kernel:0", "<layer>/bias:0"]   (TF-era Keras)
                                   or ["<layer>/kernel",   "<layer>/bias"]     (Keras 3)
    /<layer>/<weight name>  the array (conv kernels HWIO, dense kernels (in, out))

BatchNorm layers hold ``gamma, beta, moving_mean, moving_variance`` (-> Flax ``scale``,
``bias`` in ``params``; ``mean``, ``var`` in ``batch_stats``). A file written by
``model.save`` keeps the same layout under ``/model_weights``.

Keras loads such a file **by the order of the layers that hold weights**, not by name. We do
the same, and in addition check that every layer name and weight name agrees (``:0``
suffixes ignored), that every shape matches, and that nothing is missing or left over;
all problems are collected and raised together in one ``ValueError``.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import h5py
import jax
import jax.numpy as jnp
import numpy as np

from jaxcnn.models.resnet import ResNet, ResNet50

# Flax (collection, name) for each Keras weight, by layer kind, in Keras' legacy order.
_CONV = (("params", "kernel", "kernel"), ("params", "bias", "bias"))
_BN = (
    ("params", "scale", "gamma"),
    ("params", "bias", "beta"),
    ("batch_stats", "mean", "moving_mean"),
    ("batch_stats", "var", "moving_variance"),
)
_MAX_LISTED = 25


def _attr_list(group: h5py.Group, name: str) -> list[str]:
    """Read a (possibly chunked: name0, name1, ...) string-list attribute, as Keras does."""
    if name in group.attrs:
        raw = list(group.attrs[name])
    else:
        raw, k = [], 0
        while f"{name}{k}" in group.attrs:
            raw.extend(group.attrs[f"{name}{k}"])
            k += 1
    return [v.decode("utf8") if hasattr(v, "decode") else str(v) for v in raw]


def _basename(weight_name: str) -> str:
    """``"conv1_conv/kernel:0"`` -> ``"kernel"``; ``"conv1_bn/moving_mean"`` -> ``"moving_mean"``."""
    base = weight_name.rsplit("/", 1)[-1]
    return base[:-2] if base.endswith(":0") else base


def _fail(path, problems: list[str]) -> None:
    shown = problems[:_MAX_LISTED]
    more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    raise ValueError(f"load_keras_h5: {path} does not match the model:\n  " + "\n  ".join(shown) + more)


def _expected(model: ResNet) -> tuple[list[str], dict]:
    """(weighted layer names in Keras order, abstract variables) of ``model``."""
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape, x.dtype), train=False))
    order = [n for n in model.layer_order() if n in variables["params"]]
    return order, variables


def _read_layers(path) -> list[tuple[str, list[tuple[str, np.ndarray]]]]:
    """[(layer name, [(weight name, array), ...]), ...] for the layers that hold weights."""
    try:
        f = h5py.File(path, "r")
    except (OSError, ValueError) as e:
        raise ValueError(
            f"load_keras_h5: cannot read {path} as HDF5 ({e}). A truncated download? "
            "Delete the file and fetch it again."
        ) from None
    with f:
        root = f
        if "layer_names" not in f.attrs and "layer_names0" not in f.attrs and "model_weights" in f:
            root = f["model_weights"]  # a full model saved with model.save(...h5)
        names = _attr_list(root, "layer_names")
        if not names:
            raise ValueError(
                f"load_keras_h5: {path} is HDF5 but not a Keras legacy weight file (no 'layer_names' "
                f"attribute; top-level keys {sorted(f.keys())[:8]}). Keras 3 '.weights.h5' files "
                "(model.save_weights) use another layout: write the legacy layout with "
                "keras.src.legacy.saving.legacy_h5_format.save_weights_to_hdf5_group(h5file, model)."
            )
        out = []
        try:
            for name in names:
                if name not in root:
                    raise ValueError(f"load_keras_h5: {path} lists layer {name!r} but has no group for it (truncated file?)")
                g = root[name]
                wnames = _attr_list(g, "weight_names")
                if wnames:
                    out.append((name, [(w, np.asarray(g[w])) for w in wnames]))
        except (OSError, KeyError) as e:
            raise ValueError(f"load_keras_h5: {path} is damaged or truncated ({e}); fetch it again.") from None
        return out


def load_keras_h5(
    path: str | os.PathLike, *, include_top: bool, model: Optional[ResNet] = None, check_names: bool = True
) -> dict[str, Any]:
    """Convert a Keras legacy HDF5 ResNet weight file to Flax variables.

    Args:
      path: ``resnet50_weights_tf_dim_ordering_tf_kernels.h5`` (``include_top=True``), the
        ``..._notop.h5`` file (``include_top=False``), or any legacy file of the same model.
      include_top: whether the file (and the model) has the ``predictions`` layer.
      model: the Flax model the variables are for; default ``ResNet50(include_top=...)``.
        Pass e.g. ``ResNetTiny(...)`` or a different ``classes`` for other files.
      check_names: require the file's layer and weight names to be the Keras names (the
        default). ``False`` follows Keras' order-only rule exactly (for files whose layers
        were auto-named, e.g. ``conv2d_12``); shapes are checked either way.

    Returns:
      ``{"params": ..., "batch_stats": ...}`` float32 arrays keyed by Keras layer name
      (conv kernels ``(kh, kw, C_in, C_out)`` HWIO, dense ``(in, out)``), ready for
      ``model.apply(variables, x, train=False)``.

    Raises:
      ValueError: unreadable / truncated / foreign file, or any layer or weight missing,
        unexpected, misnamed or of the wrong shape (all listed in the message).
    """
    if not isinstance(include_top, bool):
        raise TypeError(f"load_keras_h5: include_top must be a bool, got {include_top!r}")
    if model is None:
        model = ResNet50(include_top=include_top)
    elif model.include_top != include_top:
        raise ValueError(f"load_keras_h5: include_top={include_top} but model.include_top={model.include_top}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_keras_h5: no such file: {path}")

    order, abstract = _expected(model)
    saved = _read_layers(path)
    problems: list[str] = []

    # Keras' rule: pair the weighted layers by position. Report the count mismatch by name.
    if len(saved) != len(order):
        saved_names = [n for n, _ in saved]
        missing = [n for n in order if n not in saved_names]
        unexpected = [n for n in saved_names if n not in order]
        problems.append(f"the file has {len(saved)} layers with weights, the model {len(order)}"
                        + (" (a top file for a no-top model, or the reverse?)" if "predictions" in missing + unexpected else ""))
        problems += [f"missing from the file: {n}" for n in missing]
        problems += [f"unexpected in the file: {n}" for n in unexpected]
        _fail(path, problems)

    params: dict[str, dict] = {}
    stats: dict[str, dict] = {}
    for k, (name, (file_name, weights)) in enumerate(zip(order, saved)):
        if check_names and file_name != name:
            problems.append(f"layer #{k}: model has {name!r}, file has {file_name!r}")
            continue
        kind = _BN if name in abstract.get("batch_stats", {}) else _CONV
        if len(weights) != len(kind):
            problems.append(f"{name}: file has {len(weights)} weights {[w for w, _ in weights]}, expected {[k_[2] for k_ in kind]}")
            continue
        if check_names:
            by_base = {_basename(w): (w, a) for w, a in weights}
        else:  # Keras' legacy order within a layer
            by_base = {keras_name: wa for (_, _, keras_name), wa in zip(kind, weights)}
        for col, flax_name, keras_name in kind:
            if keras_name not in by_base:
                problems.append(f"{name}: no weight {keras_name!r} in the file (has {sorted(by_base)})")
                continue
            wname, arr = by_base[keras_name]
            want = abstract[col][name][flax_name].shape
            if tuple(arr.shape) != tuple(want):
                problems.append(f"{wname}: shape {tuple(arr.shape)} in the file, model expects {tuple(want)}")
                continue
            tree = params if col == "params" else stats
            tree.setdefault(name, {})[flax_name] = jnp.asarray(arr, jnp.float32)
    if problems:
        _fail(path, problems)
    return {"params": params, "batch_stats": stats}
