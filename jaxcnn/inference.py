"""Use a trained run: rebuild its model, restore its weights, predict with its preprocessing.

Any run folder this project makes (``jaxcnn.train.fit``, the ``cifar10`` and ``finetune``
experiments, a ``fit`` call of your own with a ``jaxcnn.models`` model) restores in a fresh
process from the folder alone::

    from jaxcnn import inference
    run = inference.restore("checkpoints/cifar10-offline-demo")   # the best epoch's weights
    probs = run.predict(images_uint8)                              # (N, num_classes), the run's preprocessing
    run.model, run.variables, run.config, run.class_names, run.temperature

The model is rebuilt from the spec in the run's ``config.json`` (``jaxcnn.models.build_model``);
for a model outside ``jaxcnn.models.MODEL_KINDS``, pass it: ``restore(workdir, model=MyNet())``.
Either way the restored variables are checked against ``model.init``'s structure and shapes,
and the first mismatch is named.

Probabilities are calibrated when the run has a temperature: the end-of-run report fits ``T`` on
the validation split (``summary.json``'s ``temperature``, for the weights it scored, the best
epoch's), and ``run.predict`` returns ``softmax(logits / T)``; ``run.predict(x, temperature=False)``
gives the raw ``softmax(logits)``. The ranking of the classes is the same either way. A
temperature outside ``jaxcnn.metrics.TEMPERATURE_RANGE`` (a hand-edited summary) is refused by
``restore``; ``restore(workdir, temperature=False)`` does not read it (the commands' ``--no_temperature``).

Flip test-time augmentation: a run trained with ``FitConfig.flip_tta`` was evaluated (validation,
test scores, report, temperature) with ``p``, the mean of the softmaxes of each image and of its
left-right mirror (``jaxcnn.tta``), and ``run.predict`` predicts the same way by default: ``p``, or
``softmax(log p / T)`` with the run's temperature. ``run.predict(x, tta=False)`` gives one view
(``tta=True``: the flip average, for any run); the temperature, fitted for the run's own evaluation,
is applied either way.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcnn import tta
from jaxcnn.checkpoint import BEST, LATEST, check_which
from jaxcnn.metrics import TEMPERATURE_RANGE, check_temperature
from jaxcnn.models.spec import build_model
from jaxcnn.preprocess import get_preprocess, scale_to_unit
from jaxcnn.runfolder import RunFolder, reported_weights

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Restored:
    """A trained model ready for inference.

    Attributes:
      model: the Flax module (``model.apply(variables, x, train=False)``).
      variables: ``{"params": ..., "batch_stats": ...}`` on the default device: the run's moving
        average of them when it kept one (``config["fit"]["ema_decay"]`` > 0), as it reported.
      config: the run's ``config.json``.
      epoch: the epoch whose weights these are; ``which``: ``"best"`` or ``"latest"``.
      temperature: the run's fitted temperature (``summary.json``'s ``temperature``, fitted on the
        validation split by the end-of-run report) when these are the weights it was fitted for
        (the summary's ``best_epoch``); None otherwise, when the run has none, or when restored
        with ``temperature=False``.
    """

    model: nn.Module
    variables: dict
    config: dict
    epoch: int
    which: str
    temperature: Optional[float] = None

    @property
    def preprocess(self) -> Callable:
        """The run's preprocessing (``config["fit"]["preprocess"]``: ``"unit"`` or ``"caffe"``)."""
        return get_preprocess(self.config.get("fit", {}).get("preprocess", "unit"))

    @property
    def flip_tta(self) -> bool:
        """Whether the run evaluated with flip test-time augmentation (``config["fit"]["flip_tta"]``)."""
        return bool(self.config.get("fit", {}).get("flip_tta", False))

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.config.get("data", {}).get("class_names", ()))

    def predict(self, images, *, batch_size: int = 256, return_logits: bool = False,
                temperature: bool = True, tta: Optional[bool] = None) -> np.ndarray:
        """Class probabilities ``(N, num_classes)`` for uint8 images ``(N, H, W, C)`` (see :func:`predict`):
        ``softmax(logits / self.temperature)`` when the run has one and ``temperature`` is True,
        else ``softmax(logits)``. ``return_logits``: the logits (never scaled).

        ``tta``: None (default) predicts as the run evaluated (:attr:`flip_tta`); True: flip
        test-time augmentation, the "logits" are then ``log p`` with ``p`` the mean of the softmaxes
        of each image and its mirror (so the probabilities are ``p``, or ``softmax(log p / T)``);
        False: one view."""
        if not isinstance(temperature, bool):
            raise TypeError(f"Restored.predict: temperature must be True (the run's) or False (none), "
                            f"got {temperature!r}")
        if tta is not None and not isinstance(tta, bool):
            raise TypeError(f"Restored.predict: tta must be None (as the run evaluated), True (flip test-time "
                            f"augmentation) or False (one view), got {tta!r}")
        t = self.temperature if temperature else None
        return predict(self.model, self.variables, images, preprocess=self.preprocess, batch_size=batch_size,
                       return_logits=return_logits, temperature=t, flip_tta=self.flip_tta if tta is None else tta)


def restore(workdir, *, which: str = BEST, model: Optional[nn.Module] = None, temperature: bool = True) -> Restored:
    """The model and weights of a run folder, from the folder alone.

    Args:
      workdir: a run folder (holds ``config.json`` and ``checkpoints/``).
      which: ``"best"`` (default: the weights the run reports) or ``"latest"``.
      model: the Flax module; default: rebuilt from the spec in ``config.json``. Pass it for
        a model outside ``jaxcnn.models.MODEL_KINDS``.
      temperature: read the run's temperature (``Restored.temperature``); False: leave it None
        and unread (the raw softmax, also when the recorded one is unusable).

    Raises:
      FileNotFoundError: no ``config.json`` (not a run folder) or no such checkpoint.
      jaxcnn.checkpoint.DamagedCheckpointError: the checkpoint cannot be read back whole (the
        message names its folder and what is wrong).
      ValueError: the config has no usable model spec and no ``model`` was given, the
        restored variables do not fit the model (the first mismatch is named), or the summary's
        temperature for these weights is outside ``jaxcnn.metrics.TEMPERATURE_RANGE`` (checked
        before the weights are read).
    """
    check_which(which, "restore", allowed=(BEST, LATEST))
    if not isinstance(temperature, bool):
        raise TypeError(f"restore: temperature must be True (the run's) or False (none), got {temperature!r}")
    run = RunFolder(workdir)
    config = run.read_config()
    if model is None:
        spec = config.get("model")
        if not isinstance(spec, dict) or spec.get("kind") is None:
            what = f"a model outside jaxcnn.models ({spec['class']})" if isinstance(spec, dict) else "no model spec"
            raise ValueError(f"restore: {run.path / 'config.json'} records {what}; pass the module: "
                             f"restore({str(workdir)!r}, model=...)")
        model = build_model(spec)
    with run.checkpoints(read_only=True) as ckpts:
        epoch = ckpts.latest_epoch(which)
        if epoch is None:
            raise FileNotFoundError(f"restore: no {which!r} checkpoint under {ckpts.directory}")
        t = _temperature(run, int(epoch)) if temperature else None  # (before the weights are read)
        tree, _ = ckpts.restore(which, epoch)  # as saved, checksum checked; the optimizer state is dropped below
    params, batch_stats = reported_weights(tree)  # (a run with an EMA reports the EMA's)
    variables = {"params": params}
    if batch_stats:
        variables["batch_stats"] = batch_stats
    image_shape = config.get("data", {}).get("image_shape")
    if image_shape:
        check_variables(model, variables, image_shape)
    return Restored(model=model, variables=jax.device_put(variables), config=config, epoch=int(epoch), which=which,
                    temperature=t)


def _temperature(run: RunFolder, epoch: int) -> Optional[float]:
    """The summary's fitted temperature if it was fitted for ``epoch``'s weights, else None;
    ValueError, one line, for one outside ``TEMPERATURE_RANGE`` (it would be applied)."""
    summary = run.read_summary()
    t = summary.get("temperature")
    if t is None or summary.get("best_epoch") != epoch:
        return None
    try:
        return check_temperature(t, "temperature")
    except ValueError:
        lo, hi = TEMPERATURE_RANGE
        raise ValueError(f"restore: {run.path / 'summary.json'} has temperature={t!r}; a run's temperature is a "
                         f"number in [{lo:g}, {hi:g}]: correct or remove it, or pass --no_temperature "
                         f"(restore(..., temperature=False)) for the raw softmax") from None


def check_variables(model: nn.Module, variables: dict, image_shape) -> None:
    """Raise ValueError naming the first variable whose name or shape differs from ``model.init``'s."""
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    want = jax.eval_shape(lambda k, x: model.init(k, x, train=False), jax.random.key(0), x)
    want = {k: v for k, v in want.items() if k in ("params", "batch_stats") and v}
    got = {jax.tree_util.keystr(p): np.shape(a) for p, a in jax.tree_util.tree_leaves_with_path(variables)}
    expected = {jax.tree_util.keystr(p): tuple(a.shape) for p, a in jax.tree_util.tree_leaves_with_path(want)}
    for name in sorted(set(got) | set(expected), key=lambda n: (not n.startswith("['params']"), n)):
        if name not in got:
            raise ValueError(f"restore: the model has {name} {expected[name]} but the checkpoint does not")
        if name not in expected:
            raise ValueError(f"restore: the checkpoint has {name} {got[name]} but the model does not")
        if tuple(got[name]) != expected[name]:
            raise ValueError(f"restore: {name} has shape {tuple(got[name])} in the checkpoint but "
                             f"{expected[name]} in the model")


@functools.partial(jax.jit, static_argnames=("model", "preprocess", "return_logits", "flip_tta"))
def _forward(model, variables, images, temperature, preprocess, return_logits, flip_tta):
    def one_view(x):
        return model.apply(variables, x, train=False)  # (B, K)

    x = preprocess(images)
    logits = tta.flip_tta_log_probs(one_view, x) if flip_tta else one_view(x)  # (B, K)
    return logits if return_logits else jax.nn.softmax(logits / temperature, axis=-1)


def predict(model: nn.Module, variables: dict, images, *, preprocess: Callable = scale_to_unit,
            batch_size: int = 256, return_logits: bool = False, temperature: Optional[float] = None,
            flip_tta: bool = False) -> np.ndarray:
    """Class probabilities ``(N, num_classes)`` (softmax of the logits) for uint8 images ``(N, H, W, C)``.

    Runs ``model.apply(variables, preprocess(x), train=False)`` in batches of ``batch_size``
    (the last one padded, its padding dropped), jitted once per model, preprocessing and
    input shape (JAX's own jit cache): repeated calls do not compile again. Pass the run's
    preprocessing (``Restored.predict`` does). ``return_logits``: the logits instead.
    ``temperature``: ``T`` in ``jaxcnn.metrics.TEMPERATURE_RANGE`` gives ``softmax(logits / T)``
    (temperature scaling; None: ``T = 1``). ``flip_tta``: the logits are ``log p``, ``p`` the mean
    of the softmaxes of each image and its left-right mirror (``jaxcnn.tta.flip_tta_log_probs``).
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"predict: images must be (N, H, W, C), got shape {images.shape}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"predict: batch_size={batch_size!r}; must be an int >= 1")
    t = jnp.float32(1.0 if temperature is None else check_temperature(temperature, "predict: temperature"))
    n = images.shape[0]
    batch_size = min(batch_size, max(n, 1))
    outs = []
    for start in range(0, n, batch_size):
        chunk = images[start:start + batch_size]
        pad = batch_size - chunk.shape[0]
        if pad:  # one compiled shape for every batch
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        out = _forward(model, variables, chunk, t, preprocess, bool(return_logits), bool(flip_tta))
        outs.append(np.asarray(out)[: batch_size - pad])
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)
