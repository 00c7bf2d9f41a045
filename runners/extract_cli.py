"""The ``extract`` command: raw images + captions -> one CLIP feature cache (HDF5).

``python main.py extract --source DATA --pretrained CKPT --output FEATURES.h5``; see
``add_extract_arguments`` for every option. Re-running an interrupted command continues
where it stopped.
"""
from __future__ import annotations

import argparse
import sys

from dataset.label_names import LABEL_SETS


def add_extract_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``main.py extract``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (
        "Extract CLIP image and text features from raw images and captions into one HDF5 feature cache, "
        "read by the 'clip_cache' dataset. Weights come from a local file only (nothing is downloaded). "
        "An interrupted extraction continues when the same command is run again."
    )
    parser.epilog = (
        "examples:\n"
        "  python main.py extract --source data/coco_raw --image-root ~/data/coco/images \\\n"
        "      --model ViT-B-32 --pretrained ~/ckpt/ViT-B-32.pt --output features/coco_vitb32.h5\n"
        "  python main.py extract --source my_folder/annotations.jsonl --pretrained local-dir:~/ckpt/vitb32 \\\n"
        "      --output features/mine.h5 --layers 4\n"
    )
    src = parser.add_argument_group("input")
    src.add_argument("--source", required=True, metavar="PATH",
                     help="a folder in the DCMHT / DSPH .mat layout (index.mat, caption.mat or caption.txt, label.mat) or a folder / "
                          "file with a .jsonl or .csv annotation file (image, captions, labels)")
    src.add_argument("--image-root", metavar="DIR",
                     help="folder holding the images; stored paths (minus --strip-prefix) are joined to it")
    src.add_argument("--strip-prefix", metavar="PREFIX",
                     help="prefix cut from each stored image path before joining it to --image-root "
                          "(default with --image-root: the folder all stored paths share)")
    src.add_argument("--label-names", metavar="SET|FILE", default="auto",
                     help=f"names of the label columns: {', '.join(LABEL_SETS)}, or a text file with one name a "
                          "line (default auto: guessed from the column count, else labels.txt / class_<i>)")
    src.add_argument("--limit", type=int, metavar="N", help="extract only the first N samples (a trial run)")
    mod = parser.add_argument_group("model")
    mod.add_argument("--model",
                     help="open_clip model config name (default ViT-B-32, or the --model-config file's stem; use ViT-B-32-quickgelu for OpenAI-trained "
                          "weights saved as a state dict)")
    mod.add_argument("--pretrained", required=True, metavar="FILE|local-dir:DIR|none",
                     help="local weights: a .pt / .pth / .bin / .safetensors file (OpenAI's TorchScript ViT-B-32.pt "
                          "works too), local-dir:/folder with open_clip_config.json, or none for random weights")
    mod.add_argument("--model-config", metavar="FILE.json",
                     help="register a custom open_clip model config; its file stem becomes the model name")
    mod.add_argument("--preprocess-tag", metavar="TAG",
                     help="use the image mean / std / resize of this open_clip pretrained tag (read from open_clip's "
                          "table, nothing downloaded), when your checkpoint came from that tag")
    mod.add_argument("--image-resize", choices=("shortest", "squash", "longest"),
                     help="resize mode (default: the model's, shortest side + centre crop; squash = resize to a square "
                          "without cropping, as the DCMHT evaluation transform does)")
    out = parser.add_argument_group("output")
    out.add_argument("--output", required=True, metavar="FILE.h5", help="the feature cache to write")
    out.add_argument("--caption-policy", choices=("mean", "first"), default="mean",
                     help="text feature of an image with several captions: mean = mean of the L2-normalised "
                          "caption embeddings, re-normalised (default); first = the first caption only")
    out.add_argument("--layers", type=int, default=0, metavar="N",
                     help="also store N evenly spaced per-layer features per tower (image_layers / text_layers, "
                          "for SCAHN); 0 = none (default)")
    out.add_argument("--overwrite", action="store_true",
                     help="replace an existing cache or unfinished extraction made with other settings")
    run = parser.add_argument_group("running")
    run.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    run.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                     help="auto = fp16 autocast on CUDA, fp32 on CPU")
    run.add_argument("--batch-size", type=int, default=64)
    run.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding images (0 = main process)")
    run.add_argument("--chunk-size", type=int, default=1024,
                     help="rows written per chunk; an interrupted run resumes at the last finished chunk")
    run.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch (default: torch's choice)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")


def run_extract(args: argparse.Namespace) -> int:
    """Run the ``extract`` command; returns the exit status.

    Under ``torchrun --nproc-per-node=N`` the ranks share the encoding (NCCL on GPUs,
    gloo on CPU) and write the one cache a single process writes; rank 0 alone logs,
    shows progress, writes and reports. An error stops every rank; rank 0 prints it.
    """
    import torch

    from dataset.clip_extract import pick_device
    from utils.distributed import init_distributed, shutdown
    from utils.errors import UserError

    try:
        device, bad_device = pick_device(args.device), False
    except UserError:
        device, bad_device = torch.device("cpu"), True  # join on gloo; the ranks then stop together
    ctx, device = init_distributed(device)
    try:
        result = _extract(args, ctx, args.device if bad_device or not ctx.enabled else str(device))
    except UserError as exc:
        if not ctx.enabled:
            raise
        if ctx.is_main:
            print(f"error: {exc}", file=sys.stderr)
        shutdown(ctx)  # rank 0 has printed before any rank exits (torchrun stops the rest at the first exit)
        return 2
    shutdown(ctx)
    if not ctx.is_main:
        return 0
    if result.status == "up-to-date":
        print(f"{result.path}: already complete with these settings ({result.total} samples); nothing to do")
    else:
        print(f"{result.path}: {result.done} of {result.total} samples, {result.extracted} extracted in "
              f"{result.seconds:.1f}s ({result.images_per_second:.1f} images/s after the model build)")
    return 0


def _extract(args: argparse.Namespace, ctx, device: str):
    """Read the inputs (on every rank) and run the extraction; returns its ExtractResult."""
    import torch

    from dataset.clip_extract import (
        ExtractOptions, ModelSpec, collective_step, extract_features, register_model_config, resolve_weights,
    )
    from dataset.raw_sources import PathRewrite, read_source
    from utils.errors import UserError

    with collective_step(ctx):  # every rank reads the same inputs; a failure anywhere stops all
        if args.threads is not None:
            if args.threads < 1:
                raise UserError(f"--threads: must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        spec = ModelSpec(
            model=register_model_config(args.model_config, args.model or ("" if args.model_config else "ViT-B-32")),
            pretrained=args.pretrained, model_config=args.model_config,
            preprocess_tag=args.preprocess_tag, image_resize=args.image_resize,
        )
        resolve_weights(spec)  # refuse hub names / missing files before reading any data
        samples = read_source(args.source, PathRewrite(args.image_root, args.strip_prefix), args.label_names)
        if args.limit is not None:
            if args.limit < 1:
                raise UserError(f"--limit: must be >= 1, got {args.limit}")
            samples = samples.head(args.limit)
    quiet = args.quiet or not ctx.is_main
    log = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr))
    log(f"{len(samples)} samples, {len(samples.label_names)} labels "
        f"({samples.source.get('label_names')}), format {samples.source.get('format')}"
        + (f"; {ctx.world_size} processes" if ctx.enabled else ""))
    options = ExtractOptions(
        batch_size=args.batch_size, workers=args.workers, chunk_size=args.chunk_size,
        caption_policy=args.caption_policy, layers=args.layers, device=device,
        precision=args.precision, progress=not quiet, overwrite=args.overwrite,
    )
    return extract_features(samples, spec, args.output, options, log=log, ctx=ctx)
