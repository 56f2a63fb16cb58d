"""Classify new images with a trained run: top-k class names and probabilities per image.

    python -m jaxcnn.predict --run checkpoints/finetune-folder-default/phase2 photo.jpg more_photos/
    python -m jaxcnn.predict --run runs/a --top_k 5 --out preds.csv ~/new/
    python -m jaxcnn.predict --run runs/a --explain explained/ photo.jpg      # + a Grad-CAM PNG per image

``--run`` is any run folder (a ``cifar10`` run, a fine-tuning phase, a ``fit`` of your own with a
``jaxcnn.models`` model). Its model is rebuilt from its ``config.json`` and given its best
checkpoint (``--which latest``: its latest), as ``jaxcnn.inference.restore`` does. Each image is
read with the folder dataset's own decoding (``jaxcnn.data.folder.decode_image``: RGB, resized
to the run's input size) and classified with the run's preprocessing, ``--batch_size`` at a time.
Folders are searched recursively (hidden files skipped).

Probabilities: ``softmax(logits / T)`` with the temperature ``T`` the run's end-of-run report
fitted on its validation split (``summary.json``'s ``temperature``; calibrated probabilities,
same ranking); ``--no_temperature`` gives the raw ``softmax(logits)``. A run without one (or
``--which latest`` on other weights than the report's) gets the raw softmax.

Flip test-time augmentation, ``--tta``: ``run`` (default) predicts as the run evaluated (its
``config.json``'s ``fit.flip_tta``); ``on``: with the mean of the softmaxes of each image and its
left-right mirror (``jaxcnn.inference.Restored.predict(..., tta=True)``); ``off``: one view. The
last line on stderr says "flip TTA" when it was used, and when a run evaluated with it was not.

``--explain DIR``: also writes ``DIR/<image name>.png`` per image: the image, its Grad-CAM heat
map (``jaxcnn.explain.grad_cam``) for the predicted class (``--explain_class NAME``: that class)
on the model's default layer (the CIFAR CNN's last conv block, a ResNet's last stage;
``--explain_layer PATH`` for another), and the top-k classes.

Nothing of the user's is replaced: before any image is classified, ``--explain DIR`` and
``--out FILE`` must take a new file, no figure may land on an input image (``--explain`` into
the photos' own folder, when a photo is a PNG) or on a file that is not a figure ``--explain``
made (a PNG text chunk marks those), and ``--out`` may replace only a prediction CSV (its
header line). Each is one ``error:`` line, and nothing is written.

Output: one line per image on stdout, ``<path>: <class> <prob>, <class> <prob>, ...`` (most
likely first); a file that cannot be read gets a line on stderr, and the rest are still
classified. ``--out FILE.csv``: ``path, label_1, prob_1, ..., label_k, prob_k, error`` (the error column says
why a file could not be read; empty otherwise). Exit status
0 when at least one image was classified; 2 (one ``error:`` line) for a missing or damaged run,
a bad flag, or when no image could be read.
"""

from __future__ import annotations

import csv
import os
import pathlib
import sys
from typing import Optional

from jaxcnn.cli import ArgumentParser, description

#: ``--tta``'s values and what ``Restored.predict``'s ``tta`` is for each.
TTA_MODES = {"run": None, "on": True, "off": False}


def _parse(argv):
    p = ArgumentParser(prog="python -m jaxcnn.predict", description=description(__doc__), allow_abbrev=False)
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG) and folders of them")
    p.add_argument("--run", required=True, help="a run folder (a cifar10 run, a fine-tuning phase, ...)")
    p.add_argument("--top_k", type=int, default=3, help="classes shown per image (3; at most the run's classes)")
    p.add_argument("--out", help="also write the predictions to this CSV file")
    p.add_argument("--which", default="best", choices=("best", "latest"), help="the checkpoint (best)")
    p.add_argument("--batch_size", type=int, default=64, help="images decoded and classified at a time (default 64)")
    p.add_argument("--no_temperature", action="store_true",
                   help="the raw softmax; default: softmax(logits / T) with the temperature T fitted on the run's "
                        "validation split (summary.json), when it has one")
    p.add_argument("--tta", default="run", choices=tuple(TTA_MODES),
                   help="flip test-time augmentation (the mean softmax of each image and its mirror): run (as the "
                        "run evaluated, its config's fit.flip_tta; default), on, off")
    p.add_argument("--explain", metavar="DIR",
                   help="also write a PNG per image into DIR: the image, its Grad-CAM heat map, the top-k classes")
    p.add_argument("--explain_class", metavar="NAME", help="with --explain: the class the maps explain "
                                                           "(default: each image's predicted class)")
    p.add_argument("--explain_layer", metavar="PATH",
                   help="with --explain: the feature map explained, a submodule path (default: the CIFAR CNN's last "
                        "conv block, block3_bn2; a ResNet's last stage, backbone/conv5_block3_out)")
    return p.parse_args(argv)


if __name__ == "__main__":  # --help and a bad flag answer here, before the imports below load JAX (seconds)
    _parse(sys.argv[1:])

import numpy as np  # noqa: E402

from jaxcnn import explain, inference, viz  # noqa: E402
from jaxcnn.cli import check_run_flag, path_flag, run_main  # noqa: E402
from jaxcnn.data.folder import decode_images  # noqa: E402

#: The PNG text chunk that marks a figure ``--explain`` wrote: a later call may replace such a file,
#: and no other.
EXPLAIN_MARK = {"jaxcnn": "predict --explain"}
#: How the CSV ``--out`` writes begins: a later call may replace such a file, and no other.
CSV_HEAD = "path,label_1,prob_1,"


def find_images(paths) -> list[str]:
    """The files named by ``paths``, in order: a file as given, a folder's files (recursively,
    sorted, hidden ones skipped). A path that does not exist is kept (it is reported unreadable)."""
    found = []
    for p in paths:
        path = pathlib.Path(p)
        if path.is_dir():
            found += [str(f) for f in sorted(path.rglob("*"))
                      if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts)]
        else:
            found.append(str(path))
    return found


def check_writable(flag: str, folder: pathlib.Path) -> None:
    """``folder``, or its first existing parent when it is still to be made, takes a new file
    (``jaxcnn.runfolder.write_refused``: a real write); ValueError naming ``flag``."""
    from jaxcnn.runfolder import nearest_existing, write_refused
    where = nearest_existing(folder)
    if not where.is_dir():
        raise ValueError(f"{flag}: {where} is a file, not a folder")
    why = write_refused(where)
    if why is not None:
        raise ValueError(f"{flag}: cannot write into {where} ({why}); name a folder you can write to")


def check_out(out: pathlib.Path) -> None:
    """``--out`` can be written: not a folder, its first existing parent takes a new file (missing folders
    below it are created at the end), and an existing file there is a prediction CSV (:data:`CSV_HEAD`),
    never an image or a file of the user's. Checked before any image is read."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; name a .csv file")
    check_writable(f"--out {out}", out.absolute().parent)
    if out.exists() and not _is_prediction_csv(out):
        raise FileExistsError(f"--out {out} exists and is not a prediction CSV (its first line is not "
                              f"{CSV_HEAD}...): name another file, or move it away")


def _is_prediction_csv(path: pathlib.Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(64 * 1024).decode("utf-8", "replace").splitlines()
    except OSError:
        return False
    return bool(head) and head[0].startswith(CSV_HEAD) and head[0].endswith(",error")


def _is_explain_figure(path: pathlib.Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.format == "PNG" and all(im.info.get(k) == v for k, v in EXPLAIN_MARK.items())
    except Exception:  # noqa: BLE001 -- a folder, not an image, unreadable: not one of ours
        return False


def figure_names(paths: list[str]) -> dict:
    """``{path: file name of its --explain figure}``: the image's name as ``.png``, ``-2``, ``-3`` ...
    when two images share a name (compared case-folded: one file on a case-insensitive disk)."""
    taken, names = set(), {}
    for path in dict.fromkeys(paths):
        stem, n = pathlib.Path(path).stem, 1
        while (name := stem + (f"-{n}" if n > 1 else "") + ".png").casefold() in taken:
            n += 1
        taken.add(name.casefold())
        names[path] = name
    return names


def check_figures(explain_dir: pathlib.Path, names: dict, out: Optional[pathlib.Path] = None) -> None:
    """No figure of ``names`` (:func:`figure_names`) replaces an input file, the ``--out`` file, or a file
    in ``explain_dir`` that ``--explain`` did not make (:data:`EXPLAIN_MARK`); FileExistsError naming the
    first. Checked before any image is classified (an unreadable image's figure counts too)."""
    inputs = set()
    for path in names:
        try:
            st = os.stat(path)
            inputs.add((st.st_dev, st.st_ino))
        except OSError:
            pass
    for path, name in names.items():
        figure = explain_dir / name
        if out is not None and figure.absolute() == out.absolute():
            raise FileExistsError(f"--explain {explain_dir}: the figure of {path} would be --out {out}; name "
                                  f"another --out or --explain")
        try:
            st = os.stat(figure)
        except OSError:
            continue  # not there: written new
        if (st.st_dev, st.st_ino) in inputs:
            raise FileExistsError(f"--explain {explain_dir}: the figure of {path} would replace {figure}, one of "
                                  f"the images to classify; name a folder of its own for the figures")
        if not _is_explain_figure(figure):
            raise FileExistsError(f"--explain {explain_dir}: the figure of {path} would replace {figure}, a file "
                                  f"--explain did not make; name another folder, or move it away")


def classify(run: inference.Restored, paths: list[str], *, top_k: int = 3, batch_size: int = 64,
             temperature: bool = True, tta: Optional[bool] = None):
    """Yields ``(path, [(class name, probability), ...] top_k, most likely first, None)`` per
    readable image, and ``(path, None, why it cannot be read)`` per unreadable one, in the order of ``paths``.
    ``temperature``: the run's temperature scales the logits; ``tta``: flip test-time augmentation
    (None: as the run evaluated) (``Restored.predict``)."""
    image_shape = run.config.get("data", {}).get("image_shape")
    if not image_shape:
        raise ValueError("the run's config.json records no data.image_shape: cannot tell the input size")
    names = list(run.class_names)
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        images, errors = decode_images(chunk, tuple(image_shape[:2]))
        bad = dict(errors)
        good = [i for i in range(len(chunk)) if i not in bad]
        probs = (run.predict(images[good], batch_size=batch_size, temperature=temperature, tta=tta)
                 if good else None)  # (n, K)
        row = dict(zip(good, range(len(good))))
        for i, path in enumerate(chunk):
            if i in bad:
                yield path, None, bad[i]
                continue
            p = probs[row[i]]
            if len(names) != p.shape[0]:
                names = [f"class {k}" for k in range(p.shape[0])]
            top = np.argsort(-p, kind="stable")[:top_k]
            yield path, [(names[k], float(p[k])) for k in top], None


def explain_images(run: inference.Restored, tops: dict, out_dir: pathlib.Path, *, class_index=None,
                   layer: Optional[str] = None, batch_size: int = 64, file_names: Optional[dict] = None
                   ) -> list[pathlib.Path]:
    """Writes one PNG per image of ``tops`` (``{path: [(class, prob), ...]}``, from :func:`classify`)
    into ``out_dir``: the image, its Grad-CAM map for ``class_index`` (None: the predicted class)
    and its top classes, marked with :data:`EXPLAIN_MARK`. Named ``file_names[path]`` (default
    :func:`figure_names` of ``tops``: after the image, ``-2``, ``-3`` ... when two images share a
    name); returns the files written, in the order of ``tops``. A ``1 x 1`` feature map (a ResNet's
    last stage on small images) is named in a warning: its maps are uniform. The caller checks
    the names first (:func:`check_figures`)."""
    image_shape = run.config["data"]["image_shape"]
    size = tuple(image_shape[:2])
    names = list(run.class_names)
    layer = layer or explain.default_layer(run.model)
    h, w = explain.check_layer(run.model, run.variables, image_shape, layer)[1:3]
    if h * w == 1:
        print(f"warning: {layer} is 1x1 at {size[0]}x{size[1]} pixels: its Grad-CAM maps are uniform; pass "
              f"--explain_layer with an earlier feature map", file=sys.stderr)
    paths, written = list(tops), []
    file_names = figure_names(paths) if file_names is None else file_names
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        images, _ = decode_images(chunk, size, warn_large=False)  # (n, H, W, 3): these all decoded once already
        maps = explain.grad_cam(run.model, run.variables, images, preprocess=run.preprocess, layer=layer,
                                class_index=class_index, batch_size=batch_size)
        for path, image, cam in zip(chunk, images, maps):
            top = tops[path]
            explained = top[0][0] if class_index is None else names[class_index]
            written.append(viz.save_figure(viz.plot_explanation(image, cam, top, explained=explained,
                                                                layer=f"{layer} ({h}x{w})",
                                                                title=str(path)), out_dir / file_names[path],
                                                 metadata=EXPLAIN_MARK))
    return written


def main(argv: Optional[list] = None) -> int:
    args = _parse(argv)
    return run_main(lambda: _main(args))


def _main(args) -> int:
    for flag in ("top_k", "batch_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag}={getattr(args, flag)}; must be >= 1")
    out = path_flag("--out", args.out)
    if out is not None:
        check_out(out)
    explain_dir = path_flag("--explain", args.explain)
    for flag in ("explain_class", "explain_layer"):
        if getattr(args, flag) is not None and explain_dir is None:
            raise ValueError(f"--{flag} applies with --explain DIR")
    if explain_dir is not None and explain_dir.exists() and not explain_dir.is_dir():
        raise ValueError(f"--explain {explain_dir} is a file; name a folder")
    paths = find_images(args.images)
    file_names = None
    if explain_dir is not None:
        check_writable(f"--explain {explain_dir}", explain_dir)
        file_names = figure_names(paths)
        check_figures(explain_dir, file_names, out)
    run_dir = pathlib.Path(args.run)
    check_run_flag(run_dir)
    run = inference.restore(run_dir, which=args.which, temperature=not args.no_temperature)
    class_index = None
    if args.explain_class is not None:
        if args.explain_class not in run.class_names:
            raise ValueError(f"--explain_class={args.explain_class!r} is not one of the run's classes: "
                             + ", ".join(run.class_names))
        class_index = run.class_names.index(args.explain_class)
    if explain_dir is not None and args.explain_layer is not None:  # before any image is read
        explain.check_layer(run.model, run.variables, run.config["data"]["image_shape"], args.explain_layer)
    top_k = min(args.top_k, int(run.config.get("data", {}).get("num_classes") or args.top_k))
    rows, n_ok, tops = [], 0, {}
    tta = TTA_MODES[args.tta]
    for path, top, error in classify(run, paths, top_k=top_k, batch_size=args.batch_size,
                                     temperature=not args.no_temperature, tta=tta):
        if error is not None:
            print(f"cannot read {path}: {error}", file=sys.stderr)
            rows.append([path] + [""] * (2 * top_k) + [error])
            continue
        n_ok += 1
        tops[path] = top
        print(f"{path}: " + ", ".join(f"{name} {prob:.4f}" for name, prob in top))
        rows.append([path] + [v for name, prob in top for v in (name, f"{prob:.6g}")] + [""] * (2 * (top_k - len(top)))
                    + [""])
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path"] + [c for k in range(1, top_k + 1) for c in (f"label_{k}", f"prob_{k}")] + ["error"])
            w.writerows(rows)
        os.replace(tmp, out)
    if n_ok == 0:
        raise ValueError(f"none of the {len(paths)} file(s) could be read as a JPEG or PNG image")
    if explain_dir is not None:
        explain_images(run, tops, explain_dir, class_index=class_index, layer=args.explain_layer,
                       batch_size=args.batch_size, file_names=file_names)
    t = None if args.no_temperature else run.temperature
    flipped = run.flip_tta if tta is None else tta
    print(f"{n_ok} of {len(paths)} file(s) classified with {run_dir} ({run.which} epoch {run.epoch}"
          + (f", temperature {t:.3g}" if t is not None else "")
          + (", flip TTA" if flipped else ", without the flip TTA the run evaluated with" if run.flip_tta else "")
          + ")"
          + (f"; predictions in {args.out}" if args.out else "")
          + (f"; Grad-CAM maps in {explain_dir}" if explain_dir is not None else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
