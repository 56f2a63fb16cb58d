"""Orbax checkpoints of a training run: latest (for resume) and best (for results), and restore in scripts.

A run's workdir holds two Orbax ``CheckpointManager`` directories, kept apart on purpose::

    <workdir>/checkpoints/latest/<epoch>/   the last ``keep`` epochs (``LatestN``), for --resume
    <workdir>/checkpoints/best/<epoch>/     the epoch with the lowest validation loss, for results

One manager with ``best_fn`` + ``max_to_keep`` would evict the latest steps when they are
not among the best and break resume (orbax issue 526); two managers cannot. Each
checkpoint has two items: ``state`` (the ``TrainState`` arrays: step, params,
batch_stats, opt_state, raw key data) and ``meta`` (JSON: epoch, history, callbacks'
state). Saving is synchronous, so a donated state is never read after the step.

In a script::

    from jaxcnn import checkpoint
    model, variables, config = checkpoint.restore_for_inference("checkpoints/cifar10-offline-demo")
    probs = checkpoint.predict(model, variables, images_uint8)   # (N, num_classes)
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxcnn.train.state import TrainState
from jaxcnn.train.steps import scale_to_unit

PyTree = Any
LATEST, BEST = "latest", "best"


def checkpoint_dir(workdir) -> pathlib.Path:
    """``<workdir>/checkpoints``."""
    return pathlib.Path(workdir).absolute() / "checkpoints"


def has_checkpoints(workdir) -> bool:
    """True when ``workdir`` holds a saved epoch (latest or best)."""
    for which in (LATEST, BEST):
        d = checkpoint_dir(workdir) / which
        if d.is_dir() and any(p.name.isdigit() for p in d.iterdir()):
            return True
    return False


def _to_saveable(state: TrainState) -> dict:
    return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state, "key": jax.random.key_data(state.key)}


def _from_saveable(template: TrainState, tree: dict) -> TrainState:
    key = jax.random.wrap_key_data(tree["key"], impl=jax.random.key_impl(template.key))
    return template.replace(step=tree["step"], params=tree["params"], batch_stats=tree["batch_stats"],
                            opt_state=tree["opt_state"], key=key)


class Checkpoints:
    """The two managers of a workdir. ``keep``: how many latest epochs to keep (default 3).

    ``save(epoch, state, meta, best=...)`` writes the latest checkpoint and, when ``best``,
    replaces the best one. ``restore(template, which)`` returns ``(state, meta)`` with the
    arrays placed like ``template``'s (same shardings).
    """

    def __init__(self, workdir, *, keep: int = 3):
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"Checkpoints: keep={keep!r}; must be an int >= 1")
        root = checkpoint_dir(workdir)
        self._managers = {
            which: ocp.CheckpointManager(
                root / which,
                options=ocp.CheckpointManagerOptions(
                    preservation_policy=ocp.checkpoint_managers.LatestN(n=n),
                    enable_async_checkpointing=False, create=True),
                item_names=("state", "meta"))
            for which, n in ((LATEST, keep), (BEST, 1))
        }

    def latest_epoch(self, which: str = LATEST) -> Optional[int]:
        """The newest saved epoch of ``which`` ("latest" or "best"), or None."""
        return self._manager(which).latest_step()

    def all_epochs(self, which: str = LATEST) -> list[int]:
        return sorted(self._manager(which).all_steps())

    def save(self, epoch: int, state: TrainState, meta: dict, *, best: bool = False) -> None:
        """Save ``state`` and JSON ``meta`` as epoch ``epoch`` (1-based) in latest, and in best if ``best``."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(_to_saveable(state)), meta=ocp.args.JsonSave(meta))
        # Best before latest: a crash in between leaves latest at the previous epoch, so a resume
        # repeats this epoch (bitwise the same) instead of trusting a best that was never written.
        for which in (BEST, LATEST) if best else (LATEST,):
            mgr = self._managers[which]
            if int(epoch) in mgr.all_steps():  # written before a crash; a resumed run recomputes it identically
                continue
            mgr.save(int(epoch), args=args, force=True)
            mgr.wait_until_finished()

    def restore(self, template: TrainState, which: str = LATEST, epoch: Optional[int] = None
                ) -> tuple[TrainState, dict]:
        """``(state, meta)`` of ``epoch`` (default: the newest) from ``which``; raises FileNotFoundError if none."""
        mgr = self._manager(which)
        epoch = mgr.latest_step() if epoch is None else epoch
        if epoch is None:
            raise FileNotFoundError(f"no {which!r} checkpoint in {mgr.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_saveable(template))
        out = mgr.restore(epoch, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                        meta=ocp.args.JsonRestore()))
        return _from_saveable(template, out["state"]), dict(out["meta"])

    def close(self) -> None:
        for m in self._managers.values():
            m.close()

    def _manager(self, which: str) -> ocp.CheckpointManager:
        if which not in self._managers:
            raise ValueError(f"which={which!r}; allowed: {LATEST!r}, {BEST!r}")
        return self._managers[which]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------- scripts

_MODEL_BUILDERS: dict[str, Callable[[dict], Any]] = {}


def register_model(name: str, build: Callable[[dict], Any]) -> None:
    """Teach ``restore_for_inference`` to rebuild the model a ``config.json`` names (``config["model"]``)."""
    _MODEL_BUILDERS[name] = build


def _build_cifar_cnn(config: dict):
    from jaxcnn.models.cifar_cnn import CifarCNN

    return CifarCNN(num_classes=int(config["num_classes"]), widths=tuple(config["widths"]),
                    dense_units=int(config["dense_units"]), conv_dropout=config["conv_dropout"],
                    conv_dropout_rate=float(config["conv_dropout_rate"]),
                    dense_dropout=float(config["dense_dropout"]))


register_model("cifar_cnn", _build_cifar_cnn)


def restore_for_inference(workdir, *, which: str = BEST, model=None) -> tuple[Any, dict, dict]:
    """One call from a finished (or running) workdir to a usable model.

    Args:
      workdir: a training run's directory (holds ``config.json`` and ``checkpoints/``).
      which: ``"best"`` (default: the weights the run reports) or ``"latest"``.
      model: the Flax module; default: rebuilt from ``config.json`` (``config["model"]``,
        e.g. ``"cifar_cnn"``; see ``register_model``).

    Returns:
      ``(model, variables, config)``: ``variables = {"params": ..., "batch_stats": ...}`` as
      host-side NumPy arrays for ``model.apply(variables, x, train=False)`` and ``predict``;
      ``config`` the run's config dict.
    """
    workdir = pathlib.Path(workdir)
    config_path = workdir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"restore_for_inference: {config_path} not found; is {workdir} a training workdir?")
    config = json.loads(config_path.read_text())
    if model is None:
        name = config.get("model")
        if name not in _MODEL_BUILDERS:
            raise ValueError(f"restore_for_inference: config model={name!r} has no builder; pass model=... "
                             f"or register_model(); known: {sorted(_MODEL_BUILDERS)}")
        model = _MODEL_BUILDERS[name](config)
    if which not in (LATEST, BEST):
        raise ValueError(f"restore_for_inference: which={which!r}; allowed: {LATEST!r}, {BEST!r}")
    d = checkpoint_dir(workdir) / which
    if not d.is_dir():
        raise FileNotFoundError(f"restore_for_inference: no {which!r} checkpoints under {d}")
    with ocp.CheckpointManager(d, options=ocp.CheckpointManagerOptions(create=False),  # read_only logs warnings
                               item_names=("state", "meta")) as mgr:
        epoch = mgr.latest_step()
        if epoch is None:
            raise FileNotFoundError(f"restore_for_inference: no {which!r} checkpoint under {d}")
        # No target: the arrays come back as they were saved (NumPy), the optimizer state unused.
        out = mgr.restore(epoch, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    tree = out["state"]
    variables = {"params": tree["params"]}
    if tree.get("batch_stats"):
        variables["batch_stats"] = tree["batch_stats"]
    return model, variables, config


def predict(model, variables: dict, images, *, batch_size: int = 256,
            preprocess: Callable = scale_to_unit, return_logits: bool = False) -> np.ndarray:
    """Class probabilities ``(N, num_classes)`` (softmax of the logits) for uint8 images ``(N, H, W, C)``.

    Runs ``model.apply(variables, preprocess(x), train=False)`` under jit in batches of
    ``batch_size`` (the last one padded, its padding dropped). ``return_logits``: the logits instead.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"predict: images must be (N, H, W, C), got shape {images.shape}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"predict: batch_size={batch_size!r}; must be an int >= 1")

    @jax.jit
    def forward(variables, x):
        logits = model.apply(variables, preprocess(x), train=False)
        return logits if return_logits else jax.nn.softmax(logits, axis=-1)

    n = images.shape[0]
    outs = []
    for start in range(0, n, batch_size):
        chunk = images[start:start + batch_size]
        pad = batch_size - chunk.shape[0]
        if pad:  # one compiled shape for every batch
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        outs.append(np.asarray(forward(variables, jnp.asarray(chunk)))[: batch_size - pad])
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)
