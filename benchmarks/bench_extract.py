"""How fast does CLIP extraction run here? ViT-B-32 with random weights (same cost as
trained ones), on this machine's CPU (or GPU with --device cuda).

Three figures, each printed as images per second:

1. image tower alone (``encode_image`` on preprocessed 224 px tensors), per batch size
   and thread count;
2. text tower alone (``encode_text``, 5 captions per image as in COCO, counted per image);
3. the whole ``extract_features`` job on generated JPEGs (decode + preprocess in
   DataLoader workers, both towers, caption pooling, HDF5 writes).

    python benchmarks/bench_extract.py                       # defaults below
    python benchmarks/bench_extract.py --batch-sizes 16 64 --threads 1 2 --images 128
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataset.clip_extract import (  # noqa: E402
    ExtractOptions, ModelSpec, encode_texts, extract_features, load_clip, pick_device,
)
from dataset.raw_sources import RawSamples  # noqa: E402


def timed(fn, repeats: int) -> float:
    """Seconds per call: one warm-up call, then the median of ``repeats`` calls."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def make_samples(folder: Path, n: int) -> RawSamples:
    """``n`` random 320 x 240 JPEGs with 5 captions each."""
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(p, quality=90)
        paths.append(str(p))
    caps = tuple(tuple(f"a photo of object {i} number {j} on a table near a window" for j in range(5)) for i in range(n))
    return RawSamples(ids=tuple(paths), paths=tuple(paths), captions=caps,
                      labels=np.zeros((n, 2), np.uint8), label_names=("a", "b"), source={"format": "bench"})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--images", type=int, default=64, help="JPEGs for the whole-job figure (0 skips it)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--job-threads", type=int, default=1, help="torch threads for the whole-job figure")
    args = ap.parse_args()

    device = pick_device(args.device)
    spec = ModelSpec(args.model, "none")
    t = time.perf_counter()
    clip = load_clip(spec, device)
    print(f"{args.model} (random weights) built on {device} in {time.perf_counter() - t:.1f}s; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads available by default")
    size = clip.info["preprocess"]["size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    amp = torch.float16 if device.type == "cuda" else None
    print("\n1. image tower (encode_image), images/s")
    print(f"{'threads':>8}" + "".join(f"{'batch ' + str(b):>12}" for b in args.batch_sizes))
    for th in args.threads if device.type == "cpu" else [torch.get_num_threads()]:
        torch.set_num_threads(th)
        row = []
        for b in args.batch_sizes:
            x = torch.randn(b, 3, size, size, device=device)

            def run():
                with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    clip.model.encode_image(x)
                if device.type == "cuda":
                    torch.cuda.synchronize()

            row.append(b / timed(run, args.repeats))
        print(f"{th:>8}" + "".join(f"{v:>12.1f}" for v in row))

    print("\n2. text tower (5 captions of ~14 tokens per image), images/s; trimmed = padding after the last "
          "end-of-text token skipped (what extraction does), full = all 77 positions (open_clip's encode_text)")
    print(f"{'threads':>8}{'':>9}" + "".join(f"{'batch ' + str(b):>12}" for b in args.batch_sizes))
    for th, trim in [(t, tr) for t in (args.threads if device.type == "cpu" else [torch.get_num_threads()])
                     for tr in (True, False)]:
        torch.set_num_threads(th)
        row = []
        for b in args.batch_sizes:
            tok = clip.tokenizer([f"a photo of object {i} on a table near a window" for i in range(5 * b)]).to(device)

            def run():
                with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    encode_texts(clip.model, tok, None, trim=trim)
                if device.type == "cuda":
                    torch.cuda.synchronize()

            row.append(b / timed(run, args.repeats))
        print(f"{th:>8}{'trimmed' if trim else 'full':>9}" + "".join(f"{v:>12.1f}" for v in row))

    if args.images > 0:
        torch.set_num_threads(args.job_threads)
        print(f"\n3. whole extraction job, {args.images} JPEGs of 320 x 240, 5 captions each, "
              f"batch {max(args.batch_sizes)}, {args.job_threads} torch threads, images/s (after the model build)")
        with tempfile.TemporaryDirectory() as tmp:
            samples = make_samples(Path(tmp) / "img", args.images)
            for w in args.workers:
                out = Path(tmp) / f"bench_w{w}.h5"
                opts = ExtractOptions(batch_size=max(args.batch_sizes), workers=w, chunk_size=1024,
                                      device=str(device), progress=False)
                res = extract_features(samples, spec, out, opts)
                print(f"  workers {w}: {res.images_per_second:.1f} images/s ({res.encode_seconds:.1f}s; "
                      f"{res.seconds:.1f}s with hashing and model build)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
