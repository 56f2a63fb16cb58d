"""First-layer filters of the CIFAR-10 CNN and of ResNet50, and one image's activations.

The seed's question 5 ("visualise the filters of the first convolutional layer of a
trained CNN"), for the two models this project trains or ports::

    # a trained CIFAR CNN (any run of jaxcnn.experiments.cifar10), offline data:
    python -m jaxcnn.experiments.cifar10 --dataset offline --workdir runs/cifar10_offline
    python -m jaxcnn.experiments.filters --run runs/cifar10_offline --out experiments/filters

    # ResNet50's conv1 (7×7×3×64) from the official Keras ImageNet file (the seed's VGG16
    # example, done with the model we port): needs the file in Keras' cache or a path
    python -m jaxcnn.experiments.filters --resnet_weights imagenet --out experiments/filters

Writes into ``--out``:

* ``cifar_cnn_filters.png`` — ``block1_conv1`` (3×3×3×32), one min/max for the layer
  (the seed's normalisation); ``cifar_cnn_filters_per_filter.png`` — each filter stretched
  to its own range; ``cifar_cnn_filters_init.png`` — the same layer at initialisation
  (same seed), and ``cifar_cnn_filters_change.png`` — trained minus initial (a short run
  moves 3×3 first-layer filters little: ``filters.json`` records ``|ΔW| / |W0|``);
* ``cifar_cnn_activations.png`` — one validation image and its 32 first-layer feature
  maps (ReLU(conv), before BatchNorm; all-zero "dead" maps are dark, counted in the record);
* ``resnet50_filters.png`` — ``conv1_conv`` (7×7×3×64; kernels see BGR, drawn as RGB);
  only from real weights. Without them the script says so and draws nothing, unless
  ``--resnet_weights random`` asks for randomly initialised filters, which are then
  titled and recorded as such;
* ``filters.json`` — what was drawn from what (paths, shapes, weight statistics), and
  what was not drawn and why.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxcnn import layers, viz

CIFAR_FIRST_CONV = "block1_conv1"
RESNET_FIRST_CONV = "conv1_conv"


# ---------------------------------------------------------------------------- CIFAR CNN


def first_conv(params: dict, name: str = CIFAR_FIRST_CONV) -> tuple[np.ndarray, np.ndarray]:
    """``(kernel (kh, kw, C_in, C_out) HWIO, bias (C_out,))`` of layer ``name`` in ``params``."""
    if name not in params or "kernel" not in params[name]:
        raise ValueError(f"first_conv: params have no {name!r} conv layer; layers: {sorted(params)[:12]}")
    layer = params[name]
    kernel = np.asarray(layer["kernel"], np.float32)
    bias = np.asarray(layer.get("bias", np.zeros(kernel.shape[-1])), np.float32)
    if kernel.ndim != 4:
        raise ValueError(f"first_conv: {name}.kernel has shape {kernel.shape}, expected (kh, kw, C_in, C_out)")
    return kernel, bias


def first_layer_activations(image: np.ndarray, kernel: np.ndarray, bias: np.ndarray, *,
                            scale: float = 1.0 / 255.0) -> np.ndarray:
    """ReLU(conv(image * scale) + bias): the first layer's feature maps for one image.

    Args:
      image: uint8 ``(H, W, C_in)``.
      kernel: ``(3, 3, C_in, C_out)`` HWIO; ``bias``: ``(C_out,)``.
      scale: the model's input scaling (the CIFAR CNN takes [0, 1] images).

    Returns:
      ``(H, W, C_out)`` float32 ('SAME' padding, as the CIFAR CNN).
    """
    x = jnp.asarray(image, jnp.float32)[None] * scale  # (1, H, W, C_in)
    y = layers.conv2d(x, jnp.asarray(kernel), jnp.asarray(bias), padding="SAME")
    return np.asarray(jax.nn.relu(y)[0])  # (H, W, C_out)


def _stats(k: np.ndarray) -> dict:
    return {"shape": list(k.shape), "min": float(k.min()), "max": float(k.max()), "std": float(k.std())}


def draw_cifar(params: dict, out: Path, *, image: Optional[np.ndarray], source: str,
               init_params: Optional[dict] = None, normalize: str = "layer", image_label: str = "") -> dict:
    """Write the CIFAR CNN's first-layer pictures into ``out``; return their record."""
    kernel, bias = first_conv(params)
    rec: dict[str, Any] = {"source": source, "layer": CIFAR_FIRST_CONV, "kernel": _stats(kernel), "files": []}
    viz.plot_filters(kernel, normalize=normalize, path=out / "cifar_cnn_filters.png",
                     title=f"CIFAR CNN {CIFAR_FIRST_CONV} {kernel.shape}, trained ({normalize} normalised)")
    viz.plot_filters(kernel, normalize="filter", path=out / "cifar_cnn_filters_per_filter.png",
                     title=f"CIFAR CNN {CIFAR_FIRST_CONV}, trained (each filter normalised)")
    rec["files"] += ["cifar_cnn_filters.png", "cifar_cnn_filters_per_filter.png"]
    if init_params is not None:
        k0, _ = first_conv(init_params)
        viz.plot_filters(k0, normalize=normalize, path=out / "cifar_cnn_filters_init.png",
                         title=f"CIFAR CNN {CIFAR_FIRST_CONV} at initialisation (Glorot uniform, same seed)")
        change = float(np.linalg.norm(kernel - k0) / np.linalg.norm(k0))
        viz.plot_filters(kernel - k0, normalize=normalize, path=out / "cifar_cnn_filters_change.png",
                         title=f"trained minus initial {CIFAR_FIRST_CONV}: what training changed "
                               f"(|ΔW| / |W0| = {change:.2f})")
        rec["init_kernel"] = _stats(k0)
        rec["relative_change"] = change  # Frobenius norm of (trained - init) / norm of init
        rec["files"] += ["cifar_cnn_filters_init.png", "cifar_cnn_filters_change.png"]
    if image is not None:
        acts = first_layer_activations(image, kernel, bias)  # (H, W, 32)
        rec["dead_maps"] = int(np.sum(acts.max(axis=(0, 1)) <= 0.0))  # channels all zero for this image
        viz.plot_activations(acts, image=image, path=out / "cifar_cnn_activations.png",
                             title=f"one validation image{f' ({image_label})' if image_label else ''} and its "
                                   f"{acts.shape[-1]} first-layer feature maps (ReLU(conv), each map scaled)")
        rec["files"].append("cifar_cnn_activations.png")
    return rec


# ---------------------------------------------------------------------------- ResNet50


def resnet_conv1(weights: str, *, seed: int = 0, model=None) -> tuple[np.ndarray, str]:
    """ResNet50's ``conv1_conv`` kernel ``(7, 7, 3, 64)`` and a description of where it came from.

    Args:
      weights: ``"imagenet"`` (the official Keras file, from Keras' cache or downloaded),
        a path to a Keras legacy ``.h5`` ResNet50 file (with or without the top), or
        ``"random"`` (Keras' Glorot-uniform initialisation, **not** pretrained).
      seed: the initialisation seed for ``"random"``.
      model: the Flax model the file is for (default ``ResNet50``; tests pass ``ResNetTiny``).

    Raises:
      RuntimeError / FileNotFoundError / ValueError: the weights cannot be had or read
        (the message says why and what to do).
    """
    from jaxcnn.models.resnet import ResNet50
    from jaxcnn.weights import load_keras_h5, resolve_weights

    if weights == "random":
        m = model if model is not None else ResNet50(include_top=False)
        variables = jax.jit(lambda k: m.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(jax.random.key(seed))
        return np.asarray(variables["params"][RESNET_FIRST_CONV]["kernel"]), f"random initialisation (seed {seed})"
    errors = []
    for include_top in (False, True):  # "imagenet" means the no-top file; a path may be either
        try:
            path = resolve_weights(weights, include_top=include_top)
            m = model.clone(include_top=include_top) if model is not None else ResNet50(include_top=include_top)
            variables = load_keras_h5(path, include_top=include_top, model=m)
            return np.asarray(variables["params"][RESNET_FIRST_CONV]["kernel"]), str(path)
        except ValueError as e:  # a top file read as no-top (or back): try the other
            errors.append(str(e))
            if weights == "imagenet":
                break
    raise ValueError(f"resnet_conv1: could not read {weights!r} as a ResNet50 weight file: {' | '.join(errors)}")


def draw_resnet(weights: str, out: Path, *, seed: int = 0, model=None) -> dict:
    """Write ``resnet50_filters.png`` (real weights, or ``"random"`` clearly labelled); return the record.

    When the weights cannot be had, nothing is drawn and the record says why.
    """
    try:
        kernel, source = resnet_conv1(weights, seed=seed, model=model)
    except (RuntimeError, OSError, ValueError) as e:
        return {"drawn": False, "requested": weights,
                "reason": f"cannot draw pretrained ResNet50 filters: {e}"}
    pretrained = weights != "random"
    label = "ImageNet-pretrained" if weights == "imagenet" else ("pretrained" if pretrained else
                                                                 "RANDOMLY INITIALISED, NOT PRETRAINED")
    name = "resnet50_filters.png" if pretrained else "resnet50_filters_random_init.png"
    viz.plot_filters(kernel, input_order="BGR", path=out / name,
                     title=f"ResNet50 {RESNET_FIRST_CONV} {kernel.shape}: {label} ({source})")
    return {"drawn": True, "pretrained": pretrained, "requested": weights, "source": source,
            "layer": RESNET_FIRST_CONV, "kernel": _stats(kernel), "files": [name]}


# ---------------------------------------------------------------------------- CLI


def load_run(run: Path, *, which: str = "best") -> tuple[dict, dict, dict, Any]:
    """``(params, init_params, config, dataset)`` of a ``jaxcnn.experiments.cifar10`` run folder.

    ``params``: the run's ``which`` checkpoint (``jaxcnn.checkpoint.restore_for_inference``);
    ``init_params``: the same model initialised as the run began (its seed, via
    ``cifar10.create_state``); ``dataset``: the run's data, or None when it cannot be had
    (e.g. CIFAR-10 without network: the activation picture is then skipped).
    """
    import dataclasses

    from jaxcnn import checkpoint
    from jaxcnn.data import DatasetUnavailableError
    from jaxcnn.experiments import cifar10
    from jaxcnn.experiments.configs import ExperimentConfig

    model, variables, config = checkpoint.restore_for_inference(run, which=which)
    fields = {f.name for f in dataclasses.fields(ExperimentConfig)}
    cfg = ExperimentConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items() if k in fields})
    try:
        dataset = cifar10.load_data(cfg)
    except DatasetUnavailableError:
        dataset = None
    shape = dataset.image_shape if dataset is not None else (32, 32, 3)
    init_params = cifar10.create_state(cfg, model, shape).params
    return variables["params"], init_params, config, dataset


def _summary(run: Path) -> dict:
    path = Path(run) / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxcnn.experiments.filters", description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, help="a run folder of jaxcnn.experiments.cifar10 (its best checkpoint)")
    p.add_argument("--which", choices=("best", "latest"), default="best", help="which checkpoint of --run")
    p.add_argument("--resnet_weights", default="imagenet",
                   help="'imagenet' (default), a Keras .h5 path, 'random' (labelled as such) or 'none'")
    p.add_argument("--out", type=Path, default=Path("experiments/filters"))
    p.add_argument("--normalize", choices=viz.NORMALIZE, default="layer")
    p.add_argument("--image_index", type=int, default=0, help="which validation image to show activations for")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed for --resnet_weights random")
    args = p.parse_args(argv)
    if args.run is None and args.resnet_weights == "none":
        p.error("nothing to draw: give --run and/or --resnet_weights")
    args.out.mkdir(parents=True, exist_ok=True)
    record_path = args.out / "filters.json"  # one record per folder; a later call updates its own part
    record: dict[str, Any] = json.loads(record_path.read_text()) if record_path.is_file() else {}

    if args.run is not None:
        params, init_params, config, dataset = load_run(args.run, which=args.which)
        image = label = None
        if dataset is not None:
            i = args.image_index % len(dataset.val.labels)
            image, label = dataset.val.images[i], dataset.class_names[int(dataset.val.labels[i])]
        record["cifar_cnn"] = draw_cifar(params, args.out, image=image, source=f"{args.run} ({args.which} checkpoint)",
                                         init_params=init_params, normalize=args.normalize, image_label=label or "")
        record["cifar_cnn"].update(dataset=config.get("dataset"), image_index=args.image_index, image_label=label,
                                   test_accuracy=_summary(args.run).get("test_accuracy"))
        if image is None:
            record["cifar_cnn"]["activations_skipped"] = f"dataset {config.get('dataset')!r} not available here"
        print(f"CIFAR CNN {CIFAR_FIRST_CONV} {record['cifar_cnn']['kernel']['shape']}: "
              f"{', '.join(record['cifar_cnn']['files'])} in {args.out}")
    if args.resnet_weights != "none":
        rec = record["resnet50"] = draw_resnet(args.resnet_weights, args.out, seed=args.seed)
        if rec["drawn"]:
            print(f"ResNet50 {RESNET_FIRST_CONV} from {rec['source']}: {rec['files'][0]}"
                  + ("" if rec["pretrained"] else "  (RANDOM INITIALISATION, NOT PRETRAINED)"))
        else:
            print(rec["reason"], file=sys.stderr)
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
