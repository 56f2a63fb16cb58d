"""Write sklearn's real handwritten digits (1,797 8x8 greyscale images, UCI) as a class-folder tree
of 32x32 PNGs: <out>/<digit>/<index>.png. sklearn is not a jaxcnn dependency: run this with a
throwaway environment (python3 -m venv /tmp/skl && /tmp/skl/bin/pip install scikit-learn pillow).

    /tmp/skl/bin/python experiments/small_data/make_digits.py /tmp/digits
"""

import pathlib
import sys

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def main(out: str) -> None:
    digits = load_digits()
    root = pathlib.Path(out)
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        pixels = np.round(image * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, mode="L").resize((32, 32), Image.BILINEAR).save(folder / f"{i:04d}.png")
    counts = np.bincount(digits.target)
    print(f"{len(digits.target)} images in {len(counts)} class folders under {root} "
          f"(largest class {counts.max() / counts.sum():.3f})")


if __name__ == "__main__":
    main(sys.argv[1])
