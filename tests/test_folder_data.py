"""A folder of class subfolders as a dataset (``jaxcnn.data.folder``), on real PNG / JPEG files written
at test time (``conftest.write_photo_folder``): classes, counts, pixels against independent oracles,
the one warning for bad files, the seeded split, split folders, and the errors."""

import logging
import os
import pathlib

import numpy as np
import pytest
from conftest import PHOTO_CLASSES, PHOTOS_PER_CLASS, write_photo_folder
from PIL import Image

from jaxcnn.data import Dataset, ImageReadError, decode_image, load_dataset, load_folder, scan_folder

CLASSES = ("disk", "ring", "square")


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def jaxcnn_log():
    """The records of the ``jaxcnn`` logger (it may not propagate: a CLI test may have set it up)."""
    handler = Records()
    logger = logging.getLogger("jaxcnn")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield handler.records
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture(scope="module")
def photos(photo_folder, tmp_path_factory):
    """(root, manifest, dataset loaded at 32x32 and the warnings it logged)."""
    root, manifest = photo_folder
    handler = Records()
    logger = logging.getLogger("jaxcnn")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        ds = load_folder(root, image_size=32)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return root, manifest, ds, handler.records


def composite_over_white(rgb, alpha):
    """The documented alpha rule, in integers: (rgb * a + 255 * (255 - a) + 127) // 255."""
    a = alpha.astype(np.uint32)[..., None]
    return ((rgb.astype(np.uint32) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


# --------------------------------------------------------------------------- the dataset


def test_the_folder_loads_with_its_classes_and_counts(photos):
    root, manifest, ds, _ = photos
    assert isinstance(ds, Dataset) and ds.name == "folder"
    assert ds.class_names == CLASSES and ds.num_classes == PHOTO_CLASSES  # subfolder names, sorted
    n_good = PHOTO_CLASSES * PHOTOS_PER_CLASS
    assert len(ds.train) + len(ds.val) + len(ds.test) == n_good == len(manifest["files"])
    # 43 files pass the header check (42 + the truncated JPEG): round(0.1 * 43) = 4 for val and test each,
    # then the truncated one is dropped from its split when it fails to decode
    sizes = sorted([len(ds.train), len(ds.val), len(ds.test)])
    assert sizes in ([3, 4, 35], [4, 4, 34])
    for split in (ds.train, ds.val, ds.test):
        assert split.images.dtype == np.uint8 and split.images.shape[1:] == (32, 32, 3)
        assert split.labels.dtype == np.int32
    labels = np.concatenate([ds.train.labels, ds.val.labels, ds.test.labels])
    assert np.bincount(labels).tolist() == [PHOTOS_PER_CLASS] * PHOTO_CLASSES


def test_every_image_is_the_decoding_of_its_file_and_carries_its_folders_label(photos):
    root, manifest, ds, _ = photos
    listing = scan_folder(root)
    assert listing.class_names == CLASSES
    for name, split in (("train", ds.train), ("val", ds.val), ("test", ds.test)):
        files = [f for f in listing.files[name] if not f.endswith("broken.jpg")]
        labels = [y for f, y in zip(listing.files[name], listing.labels[name]) if not f.endswith("broken.jpg")]
        assert len(files) == len(split)
        for i, f in enumerate(files):
            np.testing.assert_array_equal(split.images[i], decode_image(f, 32), err_msg=f)
            assert CLASSES[split.labels[i]] == pathlib.Path(f).parent.name == CLASSES[labels[i]]


def test_bad_files_are_skipped_and_listed_in_one_warning(photos):
    root, manifest, _, records = photos
    warnings = [r for r in records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert message.startswith(f"{root}: skipped 3 file(s) that are not usable images:")
    for bad in manifest["bad"]:
        assert bad in message
    assert "broken.jpg: unreadable (OSError: image file is truncated" in message  # found when decoded
    assert "garbage.jpg: not a JPEG or PNG image" in message  # found by its header
    assert ".DS_Store" not in message  # hidden files are ignored, not reported
    listing = scan_folder(root)
    assert sorted(p for p, _ in listing.skipped) == sorted(manifest["bad"][1:])  # the header check only


def test_pixels_follow_the_documented_decoding(photo_folder):
    """Each mode and size against an oracle that is not decode_image: the source array (lossless
    PNG at 32x32), the alpha rule in integers, greyscale repeated, Pillow's bilinear resize."""
    _, manifest = photo_folder
    seen = set()
    for f in manifest["files"]:
        got = decode_image(f["path"], 32)
        assert got.shape == (32, 32, 3) and got.dtype == np.uint8
        src, fmt, mode, size = f["source"], f["format"], f["mode"], f["size"]
        seen.add((fmt, mode, size))
        with Image.open(f["path"]) as im:
            stored = np.asarray(im)  # what the file holds, undecoded by our code
        if fmt == "PNG" and mode == "RGB" and size == (32, 32):
            np.testing.assert_array_equal(got, src)
        elif mode == "RGBA":
            alpha = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (32, 1))
            np.testing.assert_array_equal(got, composite_over_white(src, alpha))
            assert (got[:, 0] == 255).all() and (got[:, -1] == src[:, -1]).all()  # clear left, opaque right
        elif mode == "L":
            assert stored.ndim == 2
            grey = stored if size == (32, 32) else np.asarray(Image.fromarray(stored).resize((32, 32),
                                                                                            Image.BILINEAR))
            np.testing.assert_array_equal(got, np.repeat(grey[:, :, None], 3, axis=2))
        else:  # RGB at another size: Pillow's bilinear resize of the stored pixels
            want = np.asarray(Image.fromarray(stored).resize((32, 32), Image.BILINEAR))
            np.testing.assert_array_equal(got, want)
        if mode != "RGBA":  # and it is the generator's image (lossy JPEG, a resize there and back)
            ref = src if mode == "RGB" else np.repeat(np.asarray(Image.fromarray(src).convert("L"))[..., None], 3, 2)
            assert np.abs(got.astype(int) - ref).mean() < 25, f["path"]
    assert len(seen) == 6  # every variant was written


def test_decode_image_sizes_modes_and_errors(tmp_path, photo_folder):
    _, manifest = photo_folder
    src = manifest["files"][0]["source"]
    path = tmp_path / "a.png"
    Image.fromarray(src).save(path)
    assert decode_image(path, (16, 24)).shape == (16, 24, 3)
    np.testing.assert_array_equal(decode_image(path, (16, 24)),
                                  np.asarray(Image.fromarray(src).resize((24, 16), Image.BILINEAR)))
    # 16-bit greyscale PNG: divided by 257, rounded
    deep = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 61)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    np.testing.assert_array_equal(decode_image(tmp_path / "deep.png", 32)[..., 0], (deep.astype(int) + 128) // 257)
    # a palette PNG
    Image.fromarray(src).convert("P").save(tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as im:
        np.testing.assert_array_equal(decode_image(tmp_path / "p.png", 32), np.asarray(im.convert("RGB")))
    # a phone photo stored sideways with EXIF orientation 6 (turn 90 degrees clockwise to view)
    exif = Image.Exif()
    exif[0x0112] = 6
    tall = np.asarray(Image.fromarray(src).resize((32, 20)))  # stored 20 high, 32 wide
    Image.fromarray(tall).save(tmp_path / "side.png", exif=exif)
    np.testing.assert_array_equal(decode_image(tmp_path / "side.png", (32, 20)), np.rot90(tall, k=-1))
    # what cannot be read says which file and why
    Image.fromarray(src).save(tmp_path / "x.gif")
    (tmp_path / "t.txt").write_text("hello")
    for name, why in (("x.gif", "a GIF image, not JPEG or PNG"), ("t.txt", "not a JPEG or PNG image"),
                      ("missing.png", "no such file")):
        with pytest.raises(ImageReadError, match=f"cannot read {tmp_path / name}: {why}") as info:
            decode_image(tmp_path / name, 32)
        assert isinstance(info.value, ValueError) and info.value.reason == why
    with pytest.raises(ValueError, match=r"image_size=0; must be >= 1"):
        decode_image(path, 0)


# --------------------------------------------------------------------------- the split


def test_the_split_is_seeded(photo_folder):
    root, _ = photo_folder
    a, b, other = scan_folder(root, seed=0), scan_folder(root, seed=0), scan_folder(root, seed=1)
    assert a.files == b.files and all((a.labels[s] == b.labels[s]).all() for s in a.labels)
    assert a.files["val"] != other.files["val"] and a.files["test"] != other.files["test"]
    for listing in (a, other):  # every file in exactly one split, sorted by (class, path) in each
        every = [f for s in ("train", "val", "test") for f in listing.files[s]]
        assert len(every) == len(set(every)) == PHOTO_CLASSES * PHOTOS_PER_CLASS + 1
        for s in listing.files:
            assert list(listing.files[s]) == sorted(listing.files[s])
    wide = scan_folder(root, seed=0, val_fraction=0.2, test_fraction=0.3)
    assert (len(wide.files["val"]), len(wide.files["test"])) == (round(0.2 * 43), round(0.3 * 43))


def _split_layout(root, sizes):
    for seed, (split, per_class) in enumerate(sizes.items()):
        write_photo_folder(root / split, per_class=per_class, bad_files=False, seed=seed)


def test_train_val_test_subfolders_are_honoured(tmp_path):
    root = tmp_path / "photos"
    _split_layout(root, {"train": 6, "val": 2, "test": 3})
    ds = load_folder(root, image_size=16, val_fraction=0.5, test_fraction=0.4)  # fractions unused here
    assert (len(ds.train), len(ds.val), len(ds.test)) == (18, 6, 9) and ds.class_names == CLASSES
    listing = scan_folder(root)
    assert all(pathlib.Path(f).parts[-3] == "val" for f in listing.files["val"])
    for i, f in enumerate(listing.files["val"]):
        np.testing.assert_array_equal(ds.val.images[i], decode_image(f, 16))
        assert CLASSES[ds.val.labels[i]] == pathlib.Path(f).parent.name
    # without val/: val is cut from train/ by its fraction (seeded); test/ stays as it is
    os.rename(root / "val", tmp_path / "val_aside")
    listing = scan_folder(root, val_fraction=0.25)
    assert len(listing.files["val"]) == round(0.25 * 18) and len(listing.files["test"]) == 9
    assert all(pathlib.Path(f).parts[-3] == "train" for f in listing.files["val"] + listing.files["train"])


def test_split_folders_must_agree_on_their_classes(tmp_path):
    root = tmp_path / "photos"
    _split_layout(root, {"train": 4, "val": 2})
    write_photo_folder(tmp_path / "two", classes=2, per_class=2, bad_files=False)
    os.rename(root / "val", tmp_path / "x")
    os.rename(tmp_path / "two", root / "val")
    with pytest.raises(ValueError, match=rf"{root / 'val'} has other class folders than {root / 'train'}: "
                                         r"missing \['square'\]"):
        scan_folder(root)
    os.rename(root / "val", root / "valid")
    with pytest.raises(ValueError, match=r"holds train/ and also valid/: with split folders, only train/, val/ and "
                                         r"test/ may be there"):
        scan_folder(root)


# --------------------------------------------------------------------------- clear errors


def test_an_empty_class_a_single_class_or_no_images_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty_class"
    write_photo_folder(empty, classes=2, per_class=3, bad_files=False)
    (empty / "cat").mkdir()
    (empty / "cat" / "readme.txt").write_text("no photos yet")
    with pytest.raises(ValueError, match=rf"{empty}: class folder\(s\) 'cat' hold no JPEG or PNG images \(found 3 "
                                         r"class subfolder\(s\) \(cat, disk, ring\), 6 JPEG/PNG image\(s\) and 1 "
                                         r"other file\(s\)\)"):
        load_folder(empty, image_size=16)

    single = tmp_path / "single"
    write_photo_folder(single, classes=2, per_class=3, bad_files=False)
    os.rename(single / "ring", tmp_path / "ring_aside")
    with pytest.raises(ValueError, match=rf"{single} holds a single class \('disk'\): found 1 class subfolder\(s\) "
                                         r"\(disk\), 3 JPEG/PNG image\(s\)"):
        load_folder(single, image_size=16)

    nothing = tmp_path / "nothing"
    for name in ("a", "b"):
        (nothing / name).mkdir(parents=True)
        (nothing / name / "x.txt").write_text("text")
    with pytest.raises(ValueError, match=rf"{nothing} holds no JPEG or PNG images in class subfolders: found 2 class "
                                         r"subfolder\(s\) \(a, b\), 0 JPEG/PNG image\(s\) and 2 other file\(s\)"):
        load_folder(nothing, image_size=16)
    bare = tmp_path / "bare"
    bare.mkdir()
    Image.new("RGB", (8, 8)).save(bare / "loose.png")
    with pytest.raises(ValueError, match=rf"{bare} holds no JPEG or PNG images in class subfolders: found 0 class "
                                         r"subfolder\(s\), 0 JPEG/PNG image\(s\) and 1 other file\(s\)"):
        load_folder(bare, image_size=16)

    with pytest.raises(FileNotFoundError, match=r"data_dir='.*missing' is not a folder"):
        load_folder(tmp_path / "missing")
    few = tmp_path / "few"
    write_photo_folder(few, classes=2, per_class=1, bad_files=False)
    with pytest.raises(ValueError, match=rf"{few} has 2 image\(s\), too few to split off 1 \+ 1 for val and test"):
        load_folder(few, image_size=16)
    with pytest.raises(ValueError, match=r"load_dataset\('folder'\) needs data_dir"):
        load_dataset("folder")
    with pytest.raises(ValueError, match=r"val_fraction \+ test_fraction = 1.0; must be < 1"):
        scan_folder(few, val_fraction=0.5, test_fraction=0.5)


# --------------------------------------------------------------------------- load_dataset


def test_load_dataset_records_a_source_that_loads_it_again(photo_folder, monkeypatch):
    root, _ = photo_folder
    monkeypatch.chdir(root.parent)
    ds = load_dataset("folder", data_dir=root.name, image_size=24, seed=3, val_fraction=0.2, test_fraction=0.2)
    assert ds.source == {"name": "folder", "data_dir": str(root), "seed": 3, "image_size": 24,
                         "val_fraction": 0.2, "test_fraction": 0.2}  # absolute: a run reloads it from anywhere
    monkeypatch.chdir("/")
    again = load_dataset(**ds.source)
    for a, b in ((ds.train, again.train), (ds.val, again.val), (ds.test, again.test)):
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)
    assert ds.image_shape == (24, 24, 3)


def test_class_imbalance_is_named_above_three_to_one():
    from jaxcnn.data.folder import class_imbalance

    assert class_imbalance([30, 10, 12], ("a", "b", "c")) is None  # 3x exactly: not imbalanced
    text = class_imbalance([31, 10, 12], ("a", "b", "c"))
    assert text.startswith("the classes are imbalanced: 'a' has 31 images, 'b' 10 (3.1x, more than 3x)")
    assert "right on 58% of them" in text  # 31 / 53, the majority share


def test_an_imbalanced_folder_gets_one_warning_and_a_balanced_one_none(tmp_path, caplog):
    write_photo_folder(tmp_path / "even", bad_files=False)
    caplog.set_level(logging.WARNING, logger="jaxcnn")
    load_folder(tmp_path / "even", image_size=16, val_fraction=0.2, test_fraction=0.2)
    assert not caplog.records
    write_photo_folder(tmp_path / "odd", bad_files=False)
    for p in sorted((tmp_path / "odd" / "ring").iterdir())[4:]:  # ring: 4 of 14 images
        p.unlink()
    load_folder(tmp_path / "odd", image_size=16, val_fraction=0.25, test_fraction=0.25)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "the classes are imbalanced: 'disk' has 14 images, 'ring' 4 (3.5x" in warnings[0]


# --------------------------------------------------------------------------- a changed folder, a leak (issue 26)


def test_the_fingerprint_tells_what_changed_and_ignores_where_the_folder_is(tmp_path):
    from jaxcnn.data.folder import changes, fingerprint

    root = tmp_path / "photos"
    write_photo_folder(root, per_class=4, bad_files=False)
    before = fingerprint(scan_folder(root), root)
    assert before["class_names"] == list(CLASSES) and before["files"] == 12
    os.rename(root, tmp_path / "moved")
    assert changes(before, fingerprint(scan_folder(tmp_path / "moved"), tmp_path / "moved")) is None
    root = tmp_path / "moved"
    os.rename(root / "disk" / "disk_00.png", root / "disk" / "disk_00b.png")  # same count, another name
    assert changes(before, fingerprint(scan_folder(root), root)) == \
        "the same number of files (12), but other names or sizes"
    (root / "tri").mkdir()
    for i in (1, 2):
        (root / "tri" / f"{i}.png").write_bytes((root / "disk" / f"disk_0{i}.png").read_bytes())
    (root / "ring" / "ring_00.png").unlink()
    assert changes(before, fingerprint(scan_folder(root), root)) == "classes added: ['tri']; 1 file more (13, the run had 12)"


def test_a_resume_on_a_folder_that_changed_is_refused_in_one_line_before_anything_loads(tmp_path, capsys):
    from test_reliability import snapshot

    from jaxcnn.experiments import cifar10
    from jaxcnn.runfolder import RunFolder

    photos, run = tmp_path / "photos", tmp_path / "run"
    write_photo_folder(photos, per_class=6, bad_files=False)
    assert cifar10.main(["--preset", "smoke", "--dataset", "folder", "--data_dir", str(photos), "--epochs", "1",
                         "--batch_size", "8", "--no_progress", "--workdir", str(run)]) == 0
    assert RunFolder(run).read_config()["data"]["fingerprint"]["files"] == 18
    (photos / "tri").mkdir()
    for i in (1, 2):  # a class added
        (photos / "tri" / f"{i}.png").write_bytes((photos / "disk" / f"disk_0{i}.png").read_bytes())
    capsys.readouterr()
    before = snapshot(run)
    assert cifar10.main(["--workdir", str(run), "--epochs", "2", "--resume", "--no_progress"]) == 2
    assert capsys.readouterr().err == (
        f"error: --resume: the images in {photos} are not those {run} trained on (classes added: ['tri']; 2 files "
        f"more (20, the run had 18)); a run resumes on its own data: put the folder back as it was, or train on it "
        f"as it is now with another --workdir (nothing was changed)\n")
    assert snapshot(run) == before


def test_copies_of_training_images_in_test_are_named_in_one_warning(tmp_path, jaxcnn_log):
    root = tmp_path / "photos"
    _split_layout(root, {"train": 4, "test": 2})
    for name in ("disk_00.png", "disk_01.png"):  # two training images copied into test/ under other names
        (root / "test" / "disk" / f"copy_{name}").write_bytes((root / "train" / "disk" / name).read_bytes())
    load_folder(root, image_size=16)
    leaks = [r.getMessage() for r in jaxcnn_log if "copies of training files" in r.getMessage()]
    assert leaks == [f"{root}: 2 image file(s) in test (2) are byte for byte copies of training files (a data leak: "
                     f"the scores on those splits overstate what the model does on new images), e.g. "
                     f"test/disk/copy_disk_00.png = train/disk/disk_00.png; test/disk/copy_disk_01.png = "
                     f"train/disk/disk_01.png"]
    (root / "test" / "disk" / "copy_disk_00.png").unlink()
    (root / "test" / "disk" / "copy_disk_01.png").unlink()
    jaxcnn_log.clear()
    load_folder(root, image_size=16)
    assert not [r for r in jaxcnn_log if "copies" in r.getMessage()]
