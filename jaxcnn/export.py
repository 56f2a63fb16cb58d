"""Export a trained run to ONNX, checked against the run itself with onnxruntime.

    python -m jaxcnn.export --run checkpoints/finetune-folder-default/phase2 --out model.onnx

``--run`` is any run folder (a ``cifar10`` run, a fine-tuning phase, a ``fit`` of your own with a
``jaxcnn.models`` model), restored as ``jaxcnn.inference.restore`` does (``--which latest``: its
latest weights). The ONNX graph holds the whole of ``restore(RUN).predict``:

* input ``images``: uint8 ``(N, H, W, 3)`` RGB at the run's size (``config.json``'s
  ``data.image_shape``), ``N`` dynamic;
* the run's preprocessing (``"unit"``: ``x / 255``; ``"caffe"``: BGR minus the ImageNet means);
* output ``probabilities``: float32 ``(N, num_classes)``, ``softmax(logits / T)`` with the
  temperature ``T`` the run's report fitted on its validation split, when it has one, as
  ``restore(RUN).predict`` returns by default; ``--no_temperature``: the raw ``softmax(logits)``.

The graph holds one view of each image: no flip test-time augmentation. A run evaluated with it
(``FitConfig.flip_tta``: its scores, and the temperature, are those of the mean softmax of each image
and its mirror) is exported all the same, with one warning line: the file predicts without the flip
average, so its outputs differ from the run's reported scores and from ``restore(RUN).predict``'s
default; they are ``restore(RUN).predict(x, tta=False)``'s, which the check below compares against.

The model's ``metadata_props`` name what a user of the file needs: ``class_names`` (a JSON list, in
the order of the probabilities), ``image_shape`` (JSON ``[H, W, 3]``), ``preprocess``,
``temperature`` (a number, or ``none``), ``epoch`` and ``which``.

Verified before it is kept: onnxruntime runs the file on seeded random uint8 images in a batch of 1
and a batch of 5, and the export fails (exit 1, one ``error:`` line) when any probability differs
from ``restore(RUN).predict(x, tta=False)``'s (computed with full float32 matmuls, as onnxruntime's) by more
than ``TOLERANCE``. The file is written under a temporary
name beside ``--out`` (``.<name>.jaxcnn-tmp-<pid>``) and moved into place only once verified: a
failed export leaves no file, and an existing ``--out`` unchanged. An export that was killed
(SIGKILL, a power cut) cannot remove its temporary file: the next export to the same ``--out``
removes those whose process is gone, and says so. ``--out`` is checked before the run is
restored: a path under a file, or a folder this process cannot write in, is one line at once.

A run trained in bfloat16 (``--precision bfloat16``) is exported in float32, its weights
unchanged (onnxruntime's CPU convolutions take no bfloat16): one line says so, and the check is
against the run's model computed in float32.

Needs the optional ``export`` extra and jax2onnx (installed without its own dependencies: its pin
``orbax-checkpoint<0.11.37`` conflicts with this project's, and it runs without them)::

    pip install -e '.[export]' && pip install --no-deps jax2onnx==0.17.1

(``make test`` installs both; Python >= 3.11.) Without them: exit 2 and a line saying so.

Max pooling: jax2onnx lowers an NHWC ``lax.reduce_window_max`` to a 4-D ONNX ``MaxPool`` (its
window has four dims), which onnxruntime cannot run; during the export, :func:`_nhwc_max_pool`
lowers the pooling of ``jaxcnn.layers.max_pool2d`` (window ``(1, kh, kw, 1)``) to
``Transpose -> 2-D MaxPool -> Transpose`` instead. The library's own numerics do not change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import re
import sys
from collections.abc import Callable
from typing import Optional

from jaxcnn.cli import ArgumentParser, description


def _parse(argv):
    p = ArgumentParser(prog="python -m jaxcnn.export", description=description(__doc__), allow_abbrev=False)
    p.add_argument("--run", required=True, help="a run folder (a cifar10 run, a fine-tuning phase, ...)")
    p.add_argument("--out", required=True, help="the ONNX file to write (replaced once the new one is verified)")
    p.add_argument("--which", default="best", choices=("best", "latest"), help="the checkpoint (best)")
    p.add_argument("--no_temperature", action="store_true",
                   help="output the raw softmax; default: softmax(logits / T) with the run's fitted temperature "
                        "T, when it has one (as restore(RUN).predict)")
    return p.parse_args(argv)


if __name__ == "__main__":  # --help and a bad flag answer here, before the imports below load JAX (seconds)
    _parse(sys.argv[1:])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxcnn import inference, kernels  # noqa: E402
from jaxcnn.cli import check_run_flag, disk_error, path_flag, run_main  # noqa: E402
from jaxcnn.models.spec import build_model, model_spec  # noqa: E402

log = logging.getLogger("jaxcnn")

#: The largest difference in any probability between onnxruntime and ``restore(RUN).predict``.
TOLERANCE = 1e-4

#: How to install what the export needs (the ``export`` extra, then jax2onnx without its dependencies).
INSTALL = "pip install -e '.[export]' && pip install --no-deps jax2onnx==0.17.1 (Python >= 3.11)"


class ExportUnavailableError(RuntimeError):
    """jax2onnx or onnxruntime is not installed (the optional ``export`` extra)."""


class ExportMismatchError(RuntimeError):
    """The exported file's outputs differ from the run's own predictions."""


def _import_extra():
    """``(jax2onnx, onnx, onnxruntime)``, or ExportUnavailableError saying how to install them."""
    try:
        import jax2onnx
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ExportUnavailableError(f"the ONNX export needs the optional packages jax2onnx and onnxruntime "
                                     f"({e}); install them: {INSTALL}") from None
    return jax2onnx, onnx, onnxruntime


def check_out(out: pathlib.Path) -> None:
    """``--out`` can be written: not a folder, and its nearest existing parent is a folder that takes
    a new file (a real write: permission bits do not tell for root or a read-only filesystem).
    ValueError naming ``--out`` and that folder; checked before the run is restored."""
    from jaxcnn.runfolder import nearest_existing, write_refused
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; name a .onnx file")
    where = nearest_existing(out.absolute().parent)
    if not where.is_dir():
        raise ValueError(f"--out {out}: {where} is a file, not a folder; name a .onnx file in a folder")
    why = write_refused(where)
    if why is not None:
        raise ValueError(f"--out {out}: cannot write in {where} ({why}); choose a folder you can write in")


#: The temporary file beside ``--out`` that an export writes and verifies: ``.<name>.jaxcnn-tmp-<pid>``.
TMP_SUFFIX = ".jaxcnn-tmp-"


def tmp_path(out: pathlib.Path, pid: int) -> pathlib.Path:
    """The temporary file of process ``pid``'s export to ``out``."""
    return out.with_name(f".{out.name}{TMP_SUFFIX}{pid}")


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (this one included); a pid no process can have counts as
    alive, so that its file is left alone."""
    if pid == os.getpid() or not 0 < pid < 2 ** 22:  # (Linux's largest pid_max)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: another user's process
        return True
    return True


def remove_stale(out: pathlib.Path) -> list[pathlib.Path]:
    """Removes the temporary files (:func:`tmp_path`) of exports to ``out`` whose process is gone
    (killed: SIGKILL, a power cut, which no ``finally`` survives); returns them. Only regular files
    named exactly ``.<out's name>.jaxcnn-tmp-<pid>`` count: any other file stays."""
    folder = out.parent
    if not folder.is_dir():
        return []
    ours = re.compile(re.escape(f".{out.name}{TMP_SUFFIX}") + r"([0-9]+)")
    removed = []
    for p in sorted(folder.iterdir()):
        m = ours.fullmatch(p.name)
        if m and not p.is_symlink() and p.is_file() and not _alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def float32_run(run: inference.Restored) -> tuple[inference.Restored, Optional[str]]:
    """``(run, None)``, or for a run whose model computes in another dtype (``--precision
    bfloat16``): the run with its model rebuilt from its spec computing in float32 (every ``dtype``
    argument, nested models' included; the weights are the same) and the dtype it had."""
    spec = model_spec(run.model)
    if spec.get("kind") is None:  # a model outside jaxcnn.models: exported as it is
        return run, None
    found = set()

    def walk(v):
        if isinstance(v, dict):
            out = {}
            for k, x in v.items():
                if k == "dtype" and isinstance(x, dict) and set(x) == {"dtype"} and x["dtype"] != "float32":
                    found.add(x["dtype"])
                    x = {"dtype": "float32"}
                out[k] = walk(x)
            return out
        return [walk(x) for x in v] if isinstance(v, list) else v

    spec = walk(spec)
    if not found:
        return run, None
    return dataclasses.replace(run, model=build_model(spec)), ", ".join(sorted(found))


def probabilities_function(run: inference.Restored, *, temperature: bool = True) -> Callable:
    """``images (N, H, W, 3) uint8 -> probabilities (N, K) float32``: the run's preprocessing, model
    (inference mode) and softmax, with the run's temperature when ``temperature`` and it has one:
    what ``run.predict(images, temperature=temperature, tta=False)`` computes (one view: no flip
    test-time augmentation), as one traceable function."""
    t = jnp.float32(run.temperature if temperature and run.temperature is not None else 1.0)

    def probabilities(images):
        logits = run.model.apply(run.variables, run.preprocess(images), train=False)  # (N, K)
        return jax.nn.softmax(logits.astype(jnp.float32) / t, axis=-1)

    return probabilities


@contextlib.contextmanager
def _quiet(names=("jax2onnx", "onnx_ir")):
    """jax2onnx's and onnx-ir's warnings held back while exporting: jax2onnx imports every plugin it
    has and logs a traceback for each whose dependency (equinox, dm-pix: its examples) is not
    installed, none of which this export uses; a wrong export is caught by :func:`verify`."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    if not os.environ.get("JAXCNN_TRACEBACK"):
        for lg in loggers:
            lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _nhwc_max_pool():
    """While exporting, lower a max pooling over the two spatial axes of an NHWC array (window
    ``(1, kh, kw, 1)``, no padding on N or C) to ``Transpose -> 2-D MaxPool -> Transpose``: jax2onnx's
    own lowering gives a 4-D MaxPool, which onnxruntime does not run. Other windows keep jax2onnx's."""
    from jax2onnx.plugins import plugin_system
    from jax2onnx.plugins._ir_shapes import _ensure_value_metadata, _stamp_type_and_shape
    from jax2onnx.plugins.jax.lax.reduce_window_max import ReduceWindowMaxPrimitivePlugin

    plugin_system.import_all_plugins()  # its own plugin first, so that it does not replace this one
    name = jax.lax.reduce_window_max_p.name
    own = plugin_system.PLUGIN_REGISTRY[name]

    class NHWCMaxPool(ReduceWindowMaxPrimitivePlugin):
        def lower(self, ctx, eqn):
            p = eqn.params
            window, strides, pads = tuple(p["window_dimensions"]), tuple(p["window_strides"]), tuple(p["padding"])
            dilated = any(d != 1 for d in (*p["base_dilation"], *p["window_dilation"]))
            if (len(window) != 4 or window[0] != 1 or window[3] != 1 or strides[0] != 1 or strides[3] != 1
                    or tuple(pads[0]) != (0, 0) or tuple(pads[3]) != (0, 0) or dilated):
                return own.lower(ctx, eqn)
            x_var, y_var = eqn.invars[0], eqn.outvars[0]
            n, h, w, c = x_var.aval.shape
            y_shape = y_var.aval.shape
            x = ctx.get_value_for_var(x_var, name_hint=ctx.fresh_name("max_pool_in"))
            y_spec = ctx.get_value_for_var(y_var, name_hint=ctx.fresh_name("max_pool_out"))

            def stamp(value, like, shape):
                value.type = like.type
                _stamp_type_and_shape(value, shape)
                _ensure_value_metadata(ctx, value)
                return value

            nchw = stamp(ctx.builder.Transpose(x, _outputs=[ctx.fresh_name("max_pool_nchw")], perm=[0, 3, 1, 2]),
                         x, (n, c, h, w))
            pooled = ctx.builder.MaxPool(nchw, _outputs=[ctx.fresh_name("max_pool_2d")],
                                         kernel_shape=[int(window[1]), int(window[2])],
                                         strides=[int(strides[1]), int(strides[2])],
                                         pads=[int(pads[1][0]), int(pads[2][0]), int(pads[1][1]), int(pads[2][1])])
            pooled = stamp(pooled, x, (y_shape[0], y_shape[3], y_shape[1], y_shape[2]))
            out = ctx.builder.Transpose(pooled, _outputs=[getattr(y_spec, "name", None) or ctx.fresh_name("max_pool")],
                                        perm=[0, 2, 3, 1])
            ctx.bind_value_for_var(y_var, stamp(out, x, y_shape))

    mine = NHWCMaxPool()
    mine.primitive, mine.metadata = own.primitive, own.metadata
    plugin_system.PLUGIN_REGISTRY[name] = mine
    try:
        yield
    finally:
        plugin_system.PLUGIN_REGISTRY[name] = own


def to_onnx(run: inference.Restored, *, temperature: bool = True):
    """The run as an ``onnx.ModelProto`` (see the module's docstring), metadata included."""
    jax2onnx, onnx, _ = _import_extra()
    image_shape = run.config.get("data", {}).get("image_shape")
    if not image_shape:
        raise ValueError("the run's config.json records no data.image_shape: cannot tell the input size")
    t = run.temperature if temperature else None
    # jax2onnx converts XLA's convolution, not the project's oneDNN kernels (an FFI call): trace XLA's path
    with _quiet(), _nhwc_max_pool(), kernels.use("xla"):
        model = jax2onnx.to_onnx(probabilities_function(run, temperature=temperature),
                                 [jax.ShapeDtypeStruct(("N", *image_shape), jnp.uint8)], model_name="jaxcnn",
                                 input_names=["images"], output_names=["probabilities"])
    # jax2onnx 0.17.1 moves BatchNorm's layout transposes but leaves the values after them their
    # NHWC shapes (onnxruntime warns, onnx's full check fails): the shapes are inferred again.
    del model.graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    onnx.helper.set_model_props(model, {
        "class_names": json.dumps(list(run.class_names)),
        "image_shape": json.dumps(list(image_shape)),
        "preprocess": run.config.get("fit", {}).get("preprocess", "unit"),
        "temperature": "none" if t is None else repr(float(t)),
        "epoch": str(run.epoch),
        "which": run.which,
    })
    model.doc_string = ("jaxcnn: uint8 images (N, H, W, 3) -> class probabilities (N, K); "
                        + ("softmax(logits)" if t is None else f"softmax(logits / {t:.6g})"))
    return model


def verify(path, run: inference.Restored, *, temperature: bool = True, seed: int = 0) -> float:
    """The largest difference between onnxruntime's probabilities for the file at ``path`` and
    ``run.predict``'s with one view (``tta=False``, as the graph holds: a run evaluated with flip TTA
    too), on seeded random uint8 images in a batch of 1 and one of 5 (the batch dimension is dynamic);
    ExportMismatchError when it exceeds :data:`TOLERANCE`."""
    _, _, ort = _import_extra()
    shape = tuple(run.config["data"]["image_shape"])
    images = np.random.default_rng(seed).integers(0, 256, (6, *shape), dtype=np.uint8)
    # float32 matmuls and convolutions in full (a GPU's default may round them to TF32), as onnxruntime
    # computes them: the check measures the export, not the device's shortcuts.
    with jax.default_matmul_precision("float32"):
        want = run.predict(images, temperature=temperature, tta=False)
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = np.concatenate([session.run(["probabilities"], {"images": batch})[0]
                              for batch in (images[:1], images[1:])])
    except Exception as e:  # onnxruntime's own errors (Fail, InvalidGraph, ...) derive from Exception only
        line = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ExportMismatchError(f"onnxruntime cannot run the exported model: {line}; nothing written") from e
    if got.shape != want.shape:
        raise ExportMismatchError(f"the exported model gives probabilities of shape {got.shape}, the run "
                                  f"{want.shape}; nothing written")
    diff = float(np.max(np.abs(got.astype(np.float64) - want)))
    if not diff <= TOLERANCE:
        raise ExportMismatchError(f"the exported model's probabilities differ from the run's by up to {diff:.3g} "
                                  f"(more than {TOLERANCE:g}) on {len(images)} test images; nothing written")
    return diff


def export(run_dir, out, *, which: str = "best", temperature: bool = True, model=None
           ) -> tuple[inference.Restored, float]:
    """Writes the run at ``run_dir`` to the ONNX file ``out`` once :func:`verify` passes;
    returns the restored run (its model in float32: :func:`float32_run`) and the largest
    difference found. ``model``: as in ``jaxcnn.inference.restore`` (a model outside
    ``jaxcnn.models``). A write that fails (a full disk) raises its OSError, the temporary file removed."""
    _import_extra()  # before the run is restored: the missing extra is said first
    out = pathlib.Path(out)
    check_out(out)
    stale = remove_stale(out)
    if stale:
        log.warning(f"removed {len(stale)} temporary file(s) of an export to {out} that was killed: "
                    + ", ".join(p.name for p in stale))
    run, dtype = float32_run(inference.restore(run_dir, which=which, model=model,
                                                      temperature=temperature))
    if dtype is not None:
        log.warning(f"{run_dir} computes in {dtype}, which onnxruntime's CPU convolutions do not take: exporting "
                    f"it in float32 (the same weights), checked against the run's model computed in float32")
    if run.flip_tta:
        log.warning(f"{run_dir} was evaluated with flip test-time augmentation (fit.flip_tta), which the ONNX graph "
                    f"does not hold: the exported model predicts one view, without the flip average, so its outputs "
                    f"differ from the run's reported scores")
    proto = to_onnx(run, temperature=temperature)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(out, os.getpid())
    try:
        tmp.write_bytes(proto.SerializeToString())
        diff = verify(tmp, run, temperature=temperature)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return run, diff


def main(argv: Optional[list] = None) -> int:
    args = _parse(argv)
    return run_main(lambda: _main(args), user_errors=(ExportUnavailableError,))


def _main(args) -> int:
    out = path_flag("--out", args.out, required=True)
    run_dir = pathlib.Path(args.run)
    check_run_flag(run_dir)
    try:
        run, diff = export(run_dir, out, which=args.which, temperature=not args.no_temperature)
    except ExportMismatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk: --out's folder, and no --resume to offer (the run's folder is untouched)
        line = disk_error(e, folder=out.absolute().parent, resume=False)
        if line is None or os.environ.get("JAXCNN_TRACEBACK"):
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2
    t = None if args.no_temperature else run.temperature
    print(f"wrote {out}: {run_dir} ({run.which} epoch {run.epoch}), uint8 (N, "
          f"{', '.join(map(str, run.config['data']['image_shape']))}) -> {len(run.class_names)} class probabilities"
          + (f" (temperature {t:.3g})" if t is not None else "")
          + f"; onnxruntime matches the run within {diff:.2g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
