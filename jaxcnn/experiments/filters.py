"""First-layer filters of the CIFAR-10 CNN and of ResNet50, and one image's activations.

The seed's question 5 ("visualise the filters of the first convolutional layer of a
trained CNN"), for the two models this project trains or ports::

    # a trained CIFAR CNN (any run of jaxcnn.experiments.cifar10), offline data:
    python -m jaxcnn.experiments.cifar10 --dataset offline --preset demo --workdir runs/demo
    python -m jaxcnn.experiments.filters --run runs/demo --resnet_weights none   # -> runs/demo/plots/filters/
    # any other run folder works too, e.g. a fine-tuning phase (its backbone's conv1_conv):
    python -m jaxcnn.experiments.filters --run runs/ft/phase1 --resnet_weights none --out /tmp/ft_filters

    # ResNet50's conv1 (7×7×3×64) from the official Keras ImageNet file (the seed's VGG16
    # example, done with the model we port): needs the file in Keras' cache or a path
    python -m jaxcnn.experiments.filters --resnet_weights imagenet            # -> runs/filters/

Writes into ``--out``, by default the run's ``plots/filters/`` (``runs/filters/`` without
``--run``); the figures committed in ``experiments/filters/`` are redrawn only when
``--out experiments/filters`` says so:

* ``cifar_cnn_filters.png`` — ``block1_conv1`` (3×3×3×32), one min/max for the layer
  (the seed's normalisation); ``cifar_cnn_filters_per_filter.png`` — each filter stretched
  to its own range; ``cifar_cnn_filters_init.png`` — the same layer at initialisation
  (same seed), and ``cifar_cnn_filters_change.png`` — trained minus initial (a short run
  moves 3×3 first-layer filters little: ``filters.json`` records ``|ΔW| / |W0|``);
* ``cifar_cnn_activations.png`` — one validation image and its 32 first-layer feature
  maps (ReLU(conv), before BatchNorm); all-zero "dead" maps are dark and titled "dead",
  constant non-zero maps mid-scale and titled with their value (``dead_maps`` and
  ``constant_maps`` in the record);
  a run of another model kind writes ``<kind>_filters.png`` etc. (no ``_init``: its
  initial weights are not in its record);
* ``resnet50_filters.png`` — ``conv1_conv`` (7×7×3×64; kernels see BGR, drawn as RGB);
  only from real weights. Without them the script says so and draws nothing, unless
  ``--resnet_weights random`` asks for randomly initialised filters, which are then
  titled and recorded as such;
* ``filters.json`` — what was drawn from what (paths, shapes, weight statistics), and
  what was not drawn and why.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

from jaxcnn.cli import ArgumentParser, description

#: ``--normalize``'s values: ``jaxcnn.viz.NORMALIZE`` (viz loads matplotlib: not for ``--help``).
NORMALIZE = ("layer", "filter")


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m jaxcnn.experiments.filters", description=description(__doc__),
                       allow_abbrev=False)
    p.add_argument("--run", type=Path, help="a run folder (a cifar10 run, a fine-tuning phase, a fit() of yours)")
    p.add_argument("--which", choices=("best", "latest"), default="best", help="which checkpoint of --run")
    p.add_argument("--resnet_weights", default="imagenet",
                   help="'imagenet' (default), a Keras .h5 path, 'random' (labelled as such) or 'none'")
    p.add_argument("--out", help="the folder to draw into (default: <run>/plots/filters/ with --run, else "
                                 "runs/filters/; the committed figures of experiments/filters/ only when named here)")
    p.add_argument("--normalize", choices=NORMALIZE, default="layer",
                   help="the filters' colour scale: layer (one min / max over the whole layer, as the seed) or "
                        "filter (each filter its own); default layer")
    p.add_argument("--image_index", type=int, default=0, help="which validation image to show activations for")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed for --resnet_weights random (default 0)")
    return p


if __name__ == "__main__":  # --help and a bad flag answer here, before the imports below load JAX (seconds)
    _parser().parse_args()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxcnn import inference, layers, viz  # noqa: E402
from jaxcnn.cli import check_run_flag, path_flag, run_main  # noqa: E402
from jaxcnn.runfolder import RunFolder  # noqa: E402

CIFAR_FIRST_CONV = "block1_conv1"
RESNET_FIRST_CONV = "conv1_conv"


# ---------------------------------------------------------------------------- a run's first conv layer


def first_conv_path(params: dict) -> tuple[str, ...]:
    """The module path of the first conv layer in ``params`` (the first HWIO ``kernel``, in the
    order the model created its layers): ``("block1_conv1",)`` for the CIFAR CNN,
    ``("backbone", "conv1_conv")`` for a fine-tuning ``Classifier``."""
    def walk(tree, path):
        for k, v in tree.items():
            if isinstance(v, dict):
                found = walk(v, path + (k,))
                if found:
                    return found
            elif k == "kernel" and np.ndim(v) == 4:
                return path
        return None

    path = walk(params, ())
    if path is None:
        raise ValueError(f"first_conv: params have no conv layer (a 4-D 'kernel'); layers: {sorted(params)[:12]}")
    return path


def first_conv(params: dict, path: Optional[tuple[str, ...]] = None) -> tuple[np.ndarray, np.ndarray]:
    """``(kernel (kh, kw, C_in, C_out) HWIO, bias (C_out,))`` of the conv layer at ``path``
    (default: the first one, ``first_conv_path``)."""
    layer = params
    for k in path or first_conv_path(params):
        layer = layer[k]
    kernel = np.asarray(layer["kernel"], np.float32)
    bias = np.asarray(layer.get("bias", np.zeros(kernel.shape[-1])), np.float32)
    return kernel, bias


def first_layer_activations(image: np.ndarray, kernel: np.ndarray, bias: np.ndarray, *,
                            scale: float = 1.0 / 255.0) -> np.ndarray:
    """ReLU(conv(image * scale) + bias): the CIFAR CNN's first-layer feature maps for one image.

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


def model_activations(restored: inference.Restored, image: np.ndarray) -> np.ndarray:
    """ReLU of the first conv layer's output for one uint8 image ``(H, W, C)``, computed by the
    run's own model and preprocessing (``capture_intermediates``): ``(H', W', C_out)``."""
    path = first_conv_path(restored.variables["params"])
    x = restored.preprocess(np.asarray(image)[None])
    _, state = restored.model.apply(restored.variables, x, train=False,
                                    capture_intermediates=lambda m, method: method == "__call__" and m.name == path[-1])
    out = state["intermediates"]
    for k in path:
        out = out[k]
    return np.asarray(jax.nn.relu(out["__call__"][0])[0])


def _stats(k: np.ndarray) -> dict:
    return {"shape": list(k.shape), "min": float(k.min()), "max": float(k.max()), "std": float(k.std())}


def draw_run(params: dict, out: Path, *, prefix: str, title: str, image: Optional[np.ndarray], source: str,
             acts: Optional[np.ndarray] = None, init_params: Optional[dict] = None, normalize: str = "layer",
             image_label: str = "") -> dict:
    """Write a run's first-layer pictures into ``out`` (``<prefix>_filters*.png``, ``_activations``); return the record.

    ``acts``: the first layer's feature maps of ``image`` (``model_activations``).
    """
    path = first_conv_path(params)
    name = "/".join(path)
    kernel, _ = first_conv(params, path)
    rec: dict[str, Any] = {"source": source, "layer": name, "kernel": _stats(kernel), "files": []}
    input_order = "BGR" if path[-1] == RESNET_FIRST_CONV else "RGB"  # a ResNet's kernels see caffe (BGR) input
    viz.plot_filters(kernel, normalize=normalize, input_order=input_order, path=out / f"{prefix}_filters.png",
                     title=f"{title} {name} {kernel.shape}, as checkpointed ({normalize} normalised)")
    viz.plot_filters(kernel, normalize="filter", input_order=input_order, path=out / f"{prefix}_filters_per_filter.png",
                     title=f"{title} {name}, as checkpointed (each filter normalised)")
    rec["files"] += [f"{prefix}_filters.png", f"{prefix}_filters_per_filter.png"]
    if init_params is not None:
        k0, _ = first_conv(init_params, path)
        viz.plot_filters(k0, normalize=normalize, input_order=input_order, path=out / f"{prefix}_filters_init.png",
                         title=f"{title} {name} at initialisation (Glorot uniform, same seed)")
        change = float(np.linalg.norm(kernel - k0) / np.linalg.norm(k0))
        viz.plot_filters(kernel - k0, normalize=normalize, input_order=input_order,
                         path=out / f"{prefix}_filters_change.png",
                         title=f"trained minus initial {name}: what training changed (|ΔW| / |W0| = {change:.2f})")
        rec["init_kernel"] = _stats(k0)
        rec["relative_change"] = change  # Frobenius norm of (trained - init) / norm of init
        rec["files"] += [f"{prefix}_filters_init.png", f"{prefix}_filters_change.png"]
    if image is not None and acts is not None:
        kinds = viz.map_kinds(acts)
        rec["dead_maps"] = kinds.count("dead")  # channels all zero for this image
        rec["constant_maps"] = kinds.count("constant")  # one non-zero value everywhere: no pattern, not off
        viz.plot_activations(acts, image=image, path=out / f"{prefix}_activations.png",
                             title=f"one validation image{f' ({image_label})' if image_label else ''} and its "
                                   f"{acts.shape[-1]} first-layer feature maps (ReLU(conv), each map scaled)")
        rec["files"].append(f"{prefix}_activations.png")
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


def load_run(run: Path, *, which: str = "best") -> tuple[inference.Restored, Optional[dict], Any]:
    """``(restored, init_params, dataset)`` of any run folder.

    ``restored``: the run's ``which`` checkpoint and model (``jaxcnn.inference.restore``);
    ``init_params``: the same model as the run initialised it, for runs of
    ``jaxcnn.experiments.cifar10`` (its seed; None for other runs, e.g. a fine-tune phase,
    which starts from another run's weights); ``dataset``: the run's data, reloaded from its
    record, or None when it cannot be had here (the activation picture is then skipped).
    """
    from jaxcnn.data import DatasetUnavailableError, load_dataset
    from jaxcnn.experiments import cifar10

    restored = inference.restore(run, which=which, temperature=False)  # (the weights only)
    config = restored.config
    dataset = None
    source = config.get("data", {}).get("source")
    if source:
        try:
            dataset = load_dataset(**source)
        except DatasetUnavailableError:
            dataset = None
    init_params = None
    if config.get("experiment", {}).get("name") == "cifar10":
        init_params = cifar10.init_variables(restored.model, config["fit"]["seed"],
                                             config["data"]["image_shape"])["params"]
    return restored, init_params, dataset


def main(argv=None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.run is None and args.resnet_weights == "none":
        p.error("nothing to draw: give --run and/or --resnet_weights")
    return run_main(lambda: _main(args))


def default_out(run: Optional[Path]) -> Path:
    """Where the figures go without ``--out``: the run's ``plots/filters/``, else ``runs/filters/``
    (never a tracked folder of the project)."""
    return RunFolder(run).plot_path("filters") if run is not None else Path("runs") / "filters"


def _main(args) -> int:
    if args.run is not None:
        check_run_flag(args.run)
    args.out = path_flag("--out", args.out) or default_out(args.run)
    loaded = load_run(args.run, which=args.which) if args.run is not None else None  # before anything is written
    args.out.mkdir(parents=True, exist_ok=True)
    record_path = args.out / "filters.json"  # one record per folder; a later call updates its own part
    record: dict[str, Any] = json.loads(record_path.read_text()) if record_path.is_file() else {}

    if loaded is not None:
        restored, init_params, dataset = loaded
        kind = restored.config["model"]["kind"]
        prefix, title = ("cifar_cnn", "CIFAR CNN") if kind == "cifar_cnn" else (kind, f"{kind} run {args.run.name}")
        image = label = acts = None
        if dataset is not None:
            i = args.image_index % len(dataset.val.labels)
            image, label = dataset.val.images[i], dataset.class_names[int(dataset.val.labels[i])]
            acts = model_activations(restored, image)
        rec = record[prefix] = draw_run(restored.variables["params"], args.out, prefix=prefix, title=title,
                                        image=image, acts=acts, source=f"{args.run} ({args.which} checkpoint)",
                                        init_params=init_params, normalize=args.normalize, image_label=label or "")
        rec.update(dataset=restored.config["data"]["name"], image_index=args.image_index, image_label=label,
                   test_accuracy=RunFolder(args.run).read_summary().get("test_accuracy"))
        if init_params is None:
            rec["init_skipped"] = "the run's initial weights are not reproducible from its record (not a cifar10 run)"
        if image is None:
            rec["activations_skipped"] = f"dataset {restored.config['data']['name']!r} not available here"
        print(f"{title} {rec['layer']} {rec['kernel']['shape']}: {', '.join(rec['files'])} in {args.out}")
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
