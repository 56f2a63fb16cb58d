"""Write the ELPV solar-cell set (2,624 real 300x300 greyscale electroluminescence photographs of
cells from 44 solar modules, Deitsch et al.) as a class-folder tree of PNGs: <out>/<class>/<cell>.png.

The images are camera photographs of real cells (the modules made to glow by a current, shot with
a camera, each cell cut out and corrected for lens distortion and perspective), with cracks, dark
regions and grain. Each cell is labelled by experts with a probability of being defective and with
the module type. ``--labels`` picks the classes:

* ``defect`` (default): the benchmark's 4 classes, 0 functional (1,508 cells), 1 possibly
  defective (p = 1/3, 295), 2 likely defective (p = 2/3, 106), 3 defective (p = 1, 715);
  largest 57.5 %;
* ``type``: mono (1,074) or poly (1,550) crystalline; largest 59.1 %;
* ``both``: the 8 combinations, e.g. ``poly_0_functional``; largest 35.1 %.

The files are copied as they are (300x300, 8-bit greyscale); ``--size N`` writes them resized to
NxN instead (Pillow's bilinear filter, as jaxcnn's folder loader resizes).

Source: the PyPI package elpv-dataset 1.0.0.post1 (https://github.com/zae-bayern/elpv-dataset),
which ships the images inside the wheel (87 MB; nothing is downloaded at run time). Papers:
Buerhop-Lutz et al., "A Benchmark for Visual Identification of Defective Solar Cells in
Electroluminescence Imagery", EU PVSEC 2018; Deitsch et al., "Automatic classification of
defective photovoltaic module cells in electroluminescence images", Solar Energy 185 (2019).
Licence: the images and labels CC BY-NC-SA 4.0 (non-commercial, attribution, share alike: cite
the papers above, do not commit the images); the package's code Apache-2.0.

elpv-dataset is not a jaxcnn dependency: run this with a throwaway environment

    python3.11 -m venv /tmp/photos-venv && /tmp/photos-venv/bin/pip install elpv-dataset==1.0.0.post1
    /tmp/photos-venv/bin/python experiments/small_data/make_photos.py /tmp/photos
"""

import argparse
import collections
import pathlib
import shutil

import elpv_dataset
from PIL import Image

DEFECT = {0.0: "0_functional", 1 / 3: "1_possibly_defective", 2 / 3: "2_likely_defective", 1.0: "3_defective"}


def class_name(probability: float, module_type: str, labels: str) -> str:
    defect = next(name for p, name in DEFECT.items() if abs(p - probability) < 0.01)
    return {"defect": defect, "type": module_type, "both": f"{module_type}_{defect}"}[labels]


def main(out: str, labels: str = "defect", size: int | None = None) -> None:
    data = pathlib.Path(elpv_dataset.__file__).parent / "data"
    root = pathlib.Path(out)
    counts = collections.Counter()
    for line in (data / "labels.csv").read_text().splitlines():  # "images/cell0001.png  1.0  mono"
        path, probability, module_type = line.split()
        name = class_name(float(probability), module_type, labels)
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        source, target = data / path, folder / pathlib.Path(path).name
        if size is None:
            shutil.copyfile(source, target)
        else:
            with Image.open(source) as im:
                im.resize((size, size), Image.BILINEAR).save(target)
        counts[name] += 1
    total = sum(counts.values())
    print(f"{total} images in {len(counts)} class folders under {root} "
          f"({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}; largest class {max(counts.values()) / total:.3f})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder to write (one subfolder per class)")
    parser.add_argument("--labels", choices=("defect", "type", "both"), default="defect")
    parser.add_argument("--size", type=int, default=None, help="resize to SIZE x SIZE (default: keep 300x300)")
    args = parser.parse_args()
    main(args.out, args.labels, args.size)
