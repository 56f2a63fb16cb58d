"""A folder of class subfolders as a dataset (Keras' ``image_dataset_from_directory``, PyTorch's
``ImageFolder``), in memory; and the listing and decoding a streaming loader reuses.

    photos/                        photos/
      cat/ a.jpg b.png ...           train/ cat/ ... dog/ ...
      dog/ c.jpeg ...        or      val/   cat/ ... dog/ ...      (val/, test/ optional)
                                     test/  cat/ ... dog/ ...

* **Classes** are the subfolder names, sorted; a label is the index of its class. Class folders
  are searched recursively; hidden files and folders (``.DS_Store``, ``.ipynb_checkpoints``) are
  ignored.
* **Images** are JPEG or PNG files of any size and mode, recognised by their content (not the
  name). :func:`decode_image` is the one decoding: the EXIF orientation applied (phone photos),
  greyscale / palette / CMYK / 16-bit converted to RGB, transparency composited over white,
  then resized with Pillow's bilinear filter (antialiased when shrinking) to a square
  ``image_size x image_size`` (aspect ratio not kept, as Keras' default). The in-memory dataset
  and any streaming loader that calls it give the same pixels.
* **Splits**: with ``train/`` (and optionally ``val/``, ``test/``) subfolders, those; a missing
  ``val/`` or ``test/`` is cut from ``train/`` by its fraction. Otherwise one seeded split of all
  images: a permutation of the sorted file list, ``round(fraction * N)`` (at least 1) for val
  and for test, the rest for training.
* **Bad files** (not a JPEG or PNG, unreadable, or outside a class folder) are skipped and
  listed in one warning on the ``jaxcnn`` logger. An empty class, a single class or no images at
  all is a ValueError naming the folder and what it holds.

:func:`scan_folder` lists the files, labels and split without decoding pixels (it reads each
file's header); :func:`load_folder` decodes everything into a :class:`Dataset`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import logging
import os
import pathlib
import re
from collections.abc import Sequence
from typing import NamedTuple, Optional, Union

import numpy as np

from jaxcnn.data.core import Dataset, Split, seeded_parts

#: Image formats read (Pillow's names); other files in a class folder are skipped and listed.
FORMATS = ("JPEG", "PNG")
SPLITS = ("train", "val", "test")
_MAX_LISTED = 20  # bad files named in the warning; the rest are counted

logger = logging.getLogger("jaxcnn")


class FolderListing(NamedTuple):
    """What :func:`scan_folder` found.

    Attributes:
      files: ``{"train" | "val" | "test": tuple of paths (str)}``, each split sorted by (class, path).
      labels: ``{split: int32 (N,)}``, the class index of each file.
      class_names: the class subfolder names, sorted (index = label).
      skipped: ``((path, reason), ...)`` of the files that are not used.
    """

    files: dict
    labels: dict
    class_names: tuple
    skipped: tuple


class ImageReadError(ValueError):
    """A file that is not a JPEG or PNG, or cannot be decoded; ``path`` and ``reason`` say which and why."""

    def __init__(self, path, reason: str):
        super().__init__(f"cannot read {path}: {reason}")
        self.path, self.reason = str(path), reason


def decode_image(path: Union[str, os.PathLike], image_size: Union[int, Sequence[int]], *,
                 warn_large: bool = True) -> np.ndarray:
    """Reads one JPEG or PNG as uint8 RGB ``(H, W, 3)`` of the requested size.

    The steps, in order: EXIF orientation applied (``PIL.ImageOps.exif_transpose``); the mode
    made RGB (greyscale repeated, palette and CMYK through Pillow, 16-bit greyscale divided by
    257); transparency (RGBA, LA, palette with a transparent colour) composited over white as
    ``(rgb * a + 255 * (255 - a) + 127) // 255``; then, when the size differs, Pillow's
    ``resize(..., Image.BILINEAR)`` (a triangle filter widened by the scale factor when
    shrinking, so it is antialiased). The aspect ratio is not kept.

    An image of more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (Pillow's guard against
    decompression bombs, which it states in a ``DecompressionBombWarning``) is decoded anyway,
    as a file the user chose, with one warning on the ``jaxcnn`` logger naming it and its size
    (``warn_large=False``: none; the commands silence Pillow's own, ``jaxcnn.cli.setup_logging``);
    one of more than twice that, which Pillow refuses to open, is an ImageReadError saying so.

    Args:
      path: the image file.
      image_size: ``S`` for ``S x S``, or ``(H, W)``.

    Raises:
      ImageReadError (a ValueError): the file is not a JPEG or PNG, or cannot be decoded (the
        message names it and says why).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    height, width = _size_hw(image_size)
    rgb = None
    try:
        with Image.open(path) as im:
            kind = im.format
            if kind in FORMATS:
                limit = Image.MAX_IMAGE_PIXELS
                if warn_large and limit and im.size[0] * im.size[1] > limit:
                    logger.warning("warning: %s is %dx%d pixels (%s), more than PIL.Image.MAX_IMAGE_PIXELS (%s), "
                                   "Pillow's guard against decompression bombs: decoded anyway, as a file you chose",
                                   path, im.size[0], im.size[1], f"{im.size[0] * im.size[1]:,}", f"{limit:,}")
                rgb = _to_rgb(ImageOps.exif_transpose(im))  # exif_transpose decodes (a copy)
    except Image.DecompressionBombError as e:  # more than twice the limit: Pillow does not open it
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        pixels = f"{int(pixels.group(1)):,}" if pixels else "more"
        raise ImageReadError(path, f"too large: {pixels} pixels, more than "
                                   f"twice PIL.Image.MAX_IMAGE_PIXELS, the most Pillow opens; shrink it first "
                                   f"(or raise PIL.Image.MAX_IMAGE_PIXELS in a script of your own)") from None
    except UnidentifiedImageError:
        raise ImageReadError(path, f"not a {' or '.join(FORMATS)} image") from None
    except FileNotFoundError:
        raise ImageReadError(path, "no such file") from None
    except IsADirectoryError:
        raise ImageReadError(path, "a folder, not an image file") from None
    except Exception as e:  # noqa: BLE001 -- truncated, corrupt: whatever Pillow raises, the file is unreadable
        raise ImageReadError(path, f"unreadable ({type(e).__name__}: {e})") from None
    if rgb is None:
        raise ImageReadError(path, f"a {kind} image, not {' or '.join(FORMATS)}")
    if rgb.shape[:2] != (height, width):
        rgb = np.asarray(Image.fromarray(rgb).resize((width, height), Image.BILINEAR))
    return np.ascontiguousarray(rgb, dtype=np.uint8)


def _to_rgb(im) -> np.ndarray:
    """A decoded Pillow image as uint8 ``(h, w, 3)``, transparency over white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit PNG greyscale
        grey = np.asarray(im, dtype=np.int64)
        grey = np.clip((grey + 128) // 257, 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if (im.mode == "P" and "transparency" in im.info) or im.mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        a = np.asarray(im, dtype=np.uint32)
        alpha = a[:, :, 3:]
        return ((a[:, :, :3] * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8)


def _size_hw(image_size) -> tuple[int, int]:
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        size = (int(image_size), int(image_size))
    elif isinstance(image_size, Sequence) and len(image_size) == 2:
        size = tuple(int(s) for s in image_size)
    else:
        raise ValueError(f"decode_image: image_size={image_size!r}; must be an int or (height, width)")
    if min(size) < 1:
        raise ValueError(f"decode_image: image_size={image_size!r}; must be >= 1")
    return size


def _image_format(path) -> str | None:
    """Why ``path`` is not a usable image (reading its header only), or None when it may be one."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return None if im.format in FORMATS else f"a {im.format} image, not {' or '.join(FORMATS)}"
    except UnidentifiedImageError:
        return f"not a {' or '.join(FORMATS)} image"
    except Exception as e:  # noqa: BLE001 -- a header Pillow cannot parse: unreadable, whatever the error
        return f"unreadable ({type(e).__name__}: {e})"


def _visible(path: pathlib.Path, root: pathlib.Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def _subfolders(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan_classes(folder: pathlib.Path, skipped: list) -> tuple[dict, tuple]:
    """``({class name: [image paths, sorted]}, class names)`` of one folder of class subfolders;
    stray files beside the class folders and bad files inside them go to ``skipped``."""
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.startswith("."):
            skipped.append((str(p), "not in a class folder"))
    classes = {}
    for class_dir in _subfolders(folder):
        good = []
        for p in sorted(class_dir.rglob("*")):
            if not p.is_file() or not _visible(p, class_dir):
                continue
            reason = _image_format(p)
            if reason is None:
                good.append(str(p))
            else:
                skipped.append((str(p), reason))
        classes[class_dir.name] = good
    return classes, tuple(classes)


def _check_classes(folder: pathlib.Path, classes: dict, skipped: list) -> None:
    """ValueError naming ``folder`` when it has no images, one class, or an empty class."""
    n_images = sum(len(v) for v in classes.values())
    bad_here = [p for p, _ in skipped if pathlib.Path(p).is_relative_to(folder)]
    found = (f"found {len(classes)} class subfolder(s)"
             + (f" ({', '.join(classes)})" if 0 < len(classes) <= 10 else "")
             + f", {n_images} JPEG/PNG image(s) and {len(bad_here)} other file(s)")
    if n_images == 0:
        raise ValueError(f"{folder} holds no {' or '.join(FORMATS)} images in class subfolders: {found}. "
                         f"Expected one subfolder of images per class, e.g. {folder}/cat/1.jpg, {folder}/dog/2.jpg")
    if len(classes) < 2:
        raise ValueError(f"{folder} holds a single class ({next(iter(classes))!r}): {found}; a classifier needs "
                         f"at least two class subfolders")
    empty = [name for name, files in classes.items() if not files]
    if empty:
        raise ValueError(f"{folder}: class folder(s) {', '.join(repr(e) for e in empty)} hold no "
                         f"{' or '.join(FORMATS)} images ({found}); add images or remove the folder(s)")


def _check_fraction(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"load_folder: {name}={value!r}; must be a fraction in (0, 1)")


def _cut(files: list, labels: list, fractions: Sequence[float], seed: int, what: str) -> list[tuple[list, list]]:
    """Seeded split of ``files``: ``[rest, part_1, ...]``, part i of ``max(1, round(f_i * N))`` files;
    each part keeps the sorted order of ``files``."""
    n = len(files)
    sizes = [max(1, round(f * n)) for f in fractions]
    if sum(sizes) >= n:
        raise ValueError(f"{what} has {n} image(s), too few to split off {' + '.join(map(str, sizes))} for "
                         f"{'val and test' if len(sizes) == 2 else 'this split'} and keep one to train on")
    return [([files[i] for i in idx], [labels[i] for i in idx]) for idx in seeded_parts(n, sizes, seed)]


def scan_folder(path: Union[str, os.PathLike], *, seed: int = 0, val_fraction: float = 0.1,
                test_fraction: float = 0.1) -> FolderListing:
    """Lists a folder of class subfolders: files, labels and split, without decoding pixels.

    Each file's header is read to tell images from other files (a file that is damaged past its
    header is only found when decoded: :func:`load_folder` skips it then, a streaming loader must
    too). Nothing is logged; :func:`warn_skipped` reports ``skipped``.

    Args:
      path: the folder (see the module docstring for the layouts).
      seed: seed of the split (int >= 0).
      val_fraction, test_fraction: fractions of the images for val and test (each in ``(0, 1)``,
        sum < 1), used where there is no ``val/`` or ``test/`` subfolder.

    Raises:
      FileNotFoundError: ``path`` is not a folder.
      ValueError: no images, a single class, an empty class, split folders whose class names
        differ, or too few images to split; the message names the folder and what it holds.
    """
    root = pathlib.Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data_dir={str(path)!r} is not a folder (expected a folder with one subfolder "
                                f"of images per class)")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"load_folder: seed={seed!r}; must be an int >= 0")
    _check_fraction("val_fraction", val_fraction)
    _check_fraction("test_fraction", test_fraction)
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"load_folder: val_fraction + test_fraction = {val_fraction + test_fraction}; must be "
                         f"< 1 to leave images to train on")
    skipped: list = []
    split_dirs = {s: root / s for s in SPLITS if (root / s).is_dir()}
    if "train" not in split_dirs:  # one folder of classes, split here
        classes, names = _scan_classes(root, skipped)
        _check_classes(root, classes, skipped)
        files = [f for name in names for f in classes[name]]
        labels = [k for k, name in enumerate(names) for _ in classes[name]]
        (tr, tr_y), (va, va_y), (te, te_y) = _cut(files, labels, [val_fraction, test_fraction], seed, str(root))
        by_split = {"train": (tr, tr_y), "val": (va, va_y), "test": (te, te_y)}
    else:
        others = [p.name for p in _subfolders(root) if p.name not in SPLITS]
        if others:
            raise ValueError(f"{root} holds train/ and also {', '.join(o + '/' for o in others)}: with split "
                             f"folders, only train/, val/ and test/ may be there (each holding the class subfolders)")
        for p in sorted(root.iterdir()):
            if p.is_file() and not p.name.startswith("."):
                skipped.append((str(p), "not in a split's class folder"))
        scanned = {}
        for s, d in split_dirs.items():
            classes, names = _scan_classes(d, skipped)
            _check_classes(d, classes, skipped)
            scanned[s] = (classes, names)
        names = scanned["train"][1]
        for s, (_, other) in scanned.items():
            if other != names:
                missing, extra = sorted(set(names) - set(other)), sorted(set(other) - set(names))
                raise ValueError(f"{split_dirs[s]} has other class folders than {split_dirs['train']}: "
                                 + "; ".join(w for w in (f"missing {missing}" if missing else "",
                                                         f"not in train/: {extra}" if extra else "") if w))
        by_split = {}
        for s, (classes, _) in scanned.items():
            by_split[s] = ([f for n in names for f in classes[n]],
                           [k for k, n in enumerate(names) for _ in classes[n]])
        missing = [s for s in ("val", "test") if s not in by_split]
        if missing:
            fractions = [val_fraction if s == "val" else test_fraction for s in missing]
            rest, *parts = _cut(*by_split["train"], fractions, seed, str(split_dirs["train"]))
            by_split["train"] = rest
            by_split.update(zip(missing, parts))
    return FolderListing(
        files={s: tuple(by_split[s][0]) for s in SPLITS},
        labels={s: np.asarray(by_split[s][1], np.int32) for s in SPLITS},
        class_names=tuple(names), skipped=tuple(skipped))


#: Largest class over smallest above which a folder's classes count as imbalanced.
IMBALANCE_RATIO = 3.0


def class_imbalance(counts, names: Sequence[str], ratio: float = IMBALANCE_RATIO) -> Optional[str]:
    """One sentence when the largest class has more than ``ratio`` times the images of the
    smallest (``counts``: images per class, by label), else None."""
    counts = np.asarray(counts, np.int64)
    big, small = int(np.argmax(counts)), int(np.argmin(counts))
    if counts[small] * ratio >= counts[big]:
        return None
    share = counts[big] / counts.sum()
    return (f"the classes are imbalanced: {names[big]!r} has {counts[big]} images, {names[small]!r} "
            f"{counts[small]} ({counts[big] / max(counts[small], 1):.1f}x, more than {ratio:g}x). A model that "
            f"always answers {names[big]!r} is right on {share:.0%} of them: judge the accuracy against that "
            f"share (the end-of-run report gives it per split) and the per-class recall")


def fingerprint(listing: FolderListing, root) -> dict:
    """What a folder's images are, cheaply (no pixel is read): its class names, its number of image
    files, and a SHA-256 over their sorted paths relative to ``root`` and their sizes in bytes. A
    run records it, so that a resume on a folder that changed since is refused (:func:`changes`);
    the folder itself may move (``--data_dir`` may change on a resume)."""
    root = pathlib.Path(root).expanduser()
    files = sorted((os.path.relpath(f, root), os.path.getsize(f)) for s in SPLITS for f in listing.files[s])
    digest = hashlib.sha256("".join(f"{path}\0{size}\n" for path, size in files).encode()).hexdigest()
    return {"class_names": list(listing.class_names), "files": len(files), "sha256": digest}


def changes(old: dict, new: dict) -> Optional[str]:
    """How the folder of fingerprint ``new`` differs from that of ``old`` (:func:`fingerprint`), in
    words ("classes added: ['tri']; 5 files more (47, the run had 42)"), or None when it is the same."""
    if old == new:
        return None
    added = sorted(set(new["class_names"]) - set(old["class_names"]))
    removed = sorted(set(old["class_names"]) - set(new["class_names"]))
    said = [f"classes added: {added}" if added else "", f"classes removed: {removed}" if removed else ""]
    more = new["files"] - old["files"]
    said.append(f"{abs(more)} {'file' if abs(more) == 1 else 'files'} {'more' if more > 0 else 'fewer'} "
                f"({new['files']}, the run had {old['files']})"
                if more else "" if added or removed else
                f"the same number of files ({new['files']}), but other names or sizes")
    return "; ".join(w for w in said if w)


def duplicates(listing: FolderListing) -> dict:
    """The files of val and test whose bytes are those of a training file: ``{"val" | "test":
    [(file, training file), ...]}``. Cheap: only files of a size that a training file has too
    are read and hashed."""
    by_size = collections.defaultdict(list)
    for s in SPLITS:
        for f in listing.files[s]:
            by_size[os.path.getsize(f)].append((s, f))

    def digest(path) -> str:
        with open(path, "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()

    found = {"val": [], "test": []}
    for group in by_size.values():
        if len({s for s, _ in group}) < 2 or not any(s == "train" for s, _ in group):
            continue
        train = {}
        for s, f in group:
            if s == "train":
                train.setdefault(digest(f), f)
        for s, f in group:
            if s != "train":
                match = train.get(digest(f))
                if match is not None:
                    found[s].append((f, match))
    return {s: sorted(v) for s, v in found.items()}


def warn_duplicates(root, found: dict, examples: int = 3) -> None:
    """One warning on the ``jaxcnn`` logger when val or test holds copies of training files (a data
    leak: the scores on them overstate what the model does on new images); nothing when none."""
    pairs = found["val"] + found["test"]
    if not pairs:
        return
    counts = " and ".join(f"{s} ({len(found[s])})" for s in ("val", "test") if found[s])
    shown = "; ".join(f"{os.path.relpath(a, root)} = {os.path.relpath(b, root)}" for a, b in sorted(pairs)[:examples])
    logger.warning("%s: %d image file(s) in %s are byte for byte copies of training files (a data leak: the scores "
                   "on those splits overstate what the model does on new images), e.g. %s%s", root, len(pairs), counts,
                   shown,
                   f" (and {len(pairs) - examples} more)" if len(pairs) > examples else "")


def warn_skipped(root, skipped: Sequence[tuple[str, str]]) -> None:
    """One warning on the ``jaxcnn`` logger listing the skipped files and why (nothing when none)."""
    if not skipped:
        return
    lines = [f"  {p}: {why}" for p, why in skipped[:_MAX_LISTED]]
    if len(skipped) > _MAX_LISTED:
        lines.append(f"  ... and {len(skipped) - _MAX_LISTED} more")
    logger.warning("%s: skipped %d file(s) that are not usable images:\n%s", root, len(skipped), "\n".join(lines))


def decode_images(paths: Sequence[str], image_size, *, workers: int | None = None,
                  warn_large: bool = True) -> tuple[np.ndarray, list]:
    """:func:`decode_image` of each path, in threads (Pillow decodes without the GIL); ``warn_large``
    as there (False for images decoded, and warned about, once already).

    Returns ``(images uint8 (n, H, W, 3), errors)``: ``errors`` lists ``(index, reason)`` of the
    paths that could not be decoded; their rows of ``images`` are zeros.
    """
    height, width = _size_hw(image_size)
    images = np.zeros((len(paths), height, width, 3), np.uint8)
    errors = []

    def one(i):
        try:
            images[i] = decode_image(paths[i], (height, width), warn_large=warn_large)
        except ImageReadError as e:
            errors.append((i, e.reason))

    workers = workers or min(8, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, range(len(paths))))
    return images, sorted(errors)


class FileSplit:
    """A split whose images stay on disk until a batch needs them (the streaming path).

    ``read(rows)`` decodes those files with :func:`decode_image` (the in-memory path's
    decoding, so both give the same pixels), in a thread pool; ``jaxcnn.train`` feeds prefetch
    the next batches in the background while the device trains.

    Attributes:
      paths: the image files, a label each; ``labels``: int32 ``(N,)``.
      image_shape: ``(H, W, 3)`` of every decoded image.
    """

    images = None  # not in memory: ``jaxcnn.train`` reads batches of files through ``read(rows)``

    def __init__(self, paths: Sequence[str], labels: np.ndarray, image_shape: tuple[int, int, int], *,
                 workers: int | None = None):
        self.paths = np.asarray([str(p) for p in paths], dtype=object)
        self.labels = np.asarray(labels, np.int32)
        self.image_shape = tuple(int(d) for d in image_shape)
        self.workers = workers or min(8, os.cpu_count() or 1)
        if self.paths.shape != self.labels.shape:
            raise ValueError(f"FileSplit: {len(self.paths)} paths for {len(self.labels)} labels")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        return f"FileSplit({len(self)} files, image_shape={self.image_shape})"

    def read(self, rows) -> np.ndarray:
        """The decoded images of ``rows``, uint8 ``(n, H, W, 3)``; a file that cannot be decoded
        (damaged after the check at load time) raises :class:`ImageReadError` naming it."""
        paths = self.paths[np.asarray(rows)]
        images, errors = decode_images(list(paths), self.image_shape[:2], workers=self.workers)
        if errors:
            i, reason = errors[0]
            raise ImageReadError(paths[i], reason)
        return images


def check_decodable(paths: Sequence[str], *, workers: int | None = None) -> list[tuple[int, str]]:
    """``(index, reason)`` of the files that do not decode, found cheaply: a JPEG is decoded at
    an eighth of its size (Pillow's ``draft``), which still reads every byte of it; a PNG whole.
    The streaming path drops these before it forms an epoch's order, as the in-memory path
    drops the files it cannot decode, so that both paths see the same images."""
    from PIL import Image

    errors = []

    def one(i):
        try:
            with Image.open(paths[i]) as im:
                if im.format == "JPEG":
                    im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()
        except Exception as e:  # noqa: BLE001 -- whatever Pillow raises, the file does not decode
            errors.append((i, f"unreadable ({type(e).__name__}: {e})"))

    with concurrent.futures.ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(one, range(len(paths))))
    return sorted(errors)


def fits_in_memory(num_images: int, image_size, *, fraction: float = 0.25) -> bool:
    """True when ``num_images`` decoded images take at most ``fraction`` of this machine's memory."""
    height, width = _size_hw(image_size)
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 8 << 30
    return num_images * height * width * 3 <= fraction * memory


def load_folder(data_dir: Union[str, os.PathLike], *, image_size: int = 224, val_fraction: float = 0.1,
                test_fraction: float = 0.1, seed: int = 0, stream: bool | None = None) -> Dataset:
    """A folder of class subfolders as an in-memory :class:`Dataset` named ``"folder"``.

    Args:
      data_dir: the folder (layouts in the module docstring).
      image_size: side of the square output images, >= 8 (default 224, ResNet50's).
      val_fraction, test_fraction: as in :func:`scan_folder`.
      seed: seed of the split.
      stream: keep the images on disk and decode each batch when it is needed
        (:class:`FileSplit`) instead of decoding them all into memory; None (default): stream
        when the decoded images would take more than a quarter of this machine's memory
        (:func:`fits_in_memory`). Both give the same images in the same order.

    Returns:
      uint8 ``(N, image_size, image_size, 3)`` images (:func:`decode_image`), int32 labels, the
      class subfolder names, sorted, as ``class_names``.

    Raises:
      FileNotFoundError, ValueError: as :func:`scan_folder`; also when a split has no decodable image.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 8:
        raise ValueError(f"load_folder: image_size={image_size!r}; must be an int >= 8")
    if stream is not None and not isinstance(stream, bool):
        raise TypeError(f"load_folder: stream={stream!r}; must be True, False or None (automatic)")
    listing = scan_folder(data_dir, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
    if stream is None:
        stream = not fits_in_memory(sum(len(f) for f in listing.files.values()), image_size)
    skipped = list(listing.skipped)
    splits = {}
    for s in SPLITS:
        files, labels = listing.files[s], listing.labels[s]
        if stream:
            errors = check_decodable(files)
        else:
            images, errors = decode_images(files, image_size)
        keep = np.ones(len(files), bool)
        for i, reason in errors:
            keep[i] = False
            skipped.append((files[i], reason))
        if not keep.any():
            raise ValueError(f"{data_dir}: none of the {len(files)} {s} image(s) could be decoded")
        if stream:
            splits[s] = FileSplit(np.asarray(files, dtype=object)[keep], labels[keep], (image_size, image_size, 3))
        else:
            splits[s] = Split(images=images[keep], labels=labels[keep])
    warn_skipped(data_dir, skipped)
    warn_duplicates(data_dir, duplicates(listing))
    names = listing.class_names
    counts = np.bincount(np.concatenate([splits[s].labels for s in SPLITS]), minlength=len(names))
    imbalance = class_imbalance(counts, names)
    if imbalance:
        logger.warning("%s: %s", data_dir, imbalance)
    return Dataset(name="folder", train=splits["train"], val=splits["val"], test=splits["test"],
                   num_classes=len(names), class_names=tuple(names), fingerprint=fingerprint(listing, data_dir))
