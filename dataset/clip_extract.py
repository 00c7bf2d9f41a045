"""CLIP feature extraction with open_clip: local weights only, batched, resumable.

Weights come from a local file (``.pt`` / ``.pth`` / ``.bin`` / ``.safetensors``; OpenAI's
TorchScript ``ViT-B-32.pt`` is recognised and built from its own state dict) or a
``local-dir:`` folder with ``open_clip_config.json``; ``none`` gives seeded random
weights (for tests and benchmarks). Hub names (``openai``, ``laion2b_...``, ``hf-hub:``)
are refused: nothing is ever downloaded.

Caption policy (fixed, never random): ``mean`` (default) encodes every caption of an
image, L2-normalises each embedding, averages them and L2-normalises the mean;
``first`` encodes only the first caption. Captions longer than the model's context
(77 tokens for CLIP) are truncated by the tokenizer.

Per-layer features (``layers`` > 0, for SCAHN): ``layers`` evenly spaced blocks of each
tower (block ``round((k + 1) * depth / layers) - 1``, so the last block is always one),
taken with ``forward_intermediates`` after the tower's final LayerNorm and pooled as the
tower pools its output (image: class token, or the token mean for ``avg`` pooling;
text: the end-of-text token), in tower width (not projected). With the ``mean`` caption
policy the text layers are the mean over the captions (not re-normalised).

Several processes (``torchrun --nproc-per-node=N main.py extract ...``): each chunk's
batches are split over the ranks, rank 0 gathers them in order and alone writes the one
cache; every batch is one a single process encodes, so the file is the same bit for bit.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from dataset.feature_cache import CacheWriter, fingerprint_difference, partial_path, read_fingerprint
from dataset.raw_sources import RawSamples
from utils import errors
from utils.distributed import DistContext, broadcast_object, gather_rows, shard_bounds
from utils.seed import resolve_device
from utils.errors import DataError, UserError

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
CAPTION_POLICIES = ("mean", "first")
HUB_HINT = (
    "this library never downloads weights: download the checkpoint file once (for example "
    "open_clip_pytorch_model.bin from the model's Hugging Face page, or OpenAI's ViT-B-32.pt) and pass "
    "pretrained=/path/to/file, or pretrained=local-dir:/folder for a folder holding open_clip_config.json "
    "and the weights; pretrained=none gives random weights for testing"
)


# ---------------------------------------------------------------------- weights
@dataclass(frozen=True)
class ModelSpec:
    """Which model to build: open_clip config name, weights and an optional config file."""

    model: str
    pretrained: str
    model_config: Optional[str] = None
    init_seed: int = 0  # random weights (pretrained: none) are drawn from this seed
    preprocess_tag: Optional[str] = None  # take mean / std / resize of this known tag (no download)
    image_resize: Optional[str] = None  # shortest (resize + centre crop) | squash | longest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _is_torchscript(path: Path) -> bool:
    """OpenAI's CLIP checkpoints are TorchScript archives (a zip with ``constants.pkl``)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("constants.pkl") for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _local_dir_weights(folder: Path) -> Optional[Path]:
    """The weights file open_clip picks in a ``local-dir:`` folder (its preference order)."""
    import open_clip.factory as factory

    finder = getattr(factory, "_find_checkpoint_in_dir", None)
    if finder is not None:
        found = finder(folder)
        return Path(found) if found else None
    for pattern in ("*.safetensors", "*.bin", "*.pth"):
        hits = sorted(folder.glob(pattern))
        if hits:
            return hits[0]
    return None


def resolve_weights(spec: ModelSpec) -> Dict[str, Any]:
    """Classify ``spec.pretrained`` without loading anything.

    Returns ``kind`` (none | file | torchscript | local-dir), the open_clip model name,
    the weights file and the config JSON (if any). Hub names raise UserError with how to
    point at a local checkpoint; a missing file or folder raises DataError.
    """
    import open_clip

    if spec.model.startswith("hf-hub:"):
        raise UserError(f"model {spec.model!r} names a Hugging Face Hub model; {HUB_HINT}")
    pre = (spec.pretrained or "").strip()
    if not pre:
        raise UserError(f"pretrained: required; {HUB_HINT}")
    if pre.lower() == "none":
        return {"kind": "none", "model_name": spec.model, "weights": None, "config_json": spec.model_config}
    if pre.startswith("hf-hub:"):
        raise UserError(f"pretrained {pre!r} is a Hugging Face Hub name; {HUB_HINT}")
    if pre.startswith("local-dir:") or spec.model.startswith("local-dir:"):
        folder = Path((pre if pre.startswith("local-dir:") else spec.model)[len("local-dir:"):]).expanduser()
        if not folder.is_dir():
            raise DataError(f"pretrained local-dir:{folder}: folder not found")
        cfg = folder / "open_clip_config.json"
        if not cfg.is_file():
            raise DataError(f"{cfg}: not found; a local-dir: folder needs open_clip_config.json (with 'model_cfg') and weights")
        weights = _local_dir_weights(folder)
        if weights is None:
            raise DataError(f"{folder}: no weights file (*.safetensors, *.bin, *.pth) beside open_clip_config.json")
        return {"kind": "local-dir", "model_name": f"local-dir:{folder}", "weights": str(weights), "config_json": str(cfg)}
    path = Path(pre).expanduser()
    if path.is_file():
        if path.suffix.lower() not in WEIGHT_SUFFIXES:
            raise DataError(f"pretrained {path}: expected a {' / '.join(WEIGHT_SUFFIXES)} weights file")
        kind = "torchscript" if _is_torchscript(path) else "file"
        return {"kind": kind, "model_name": spec.model, "weights": str(path), "config_json": spec.model_config}
    looks_like_path = os.sep in pre or "/" in pre or path.suffix.lower() in WEIGHT_SUFFIXES
    if looks_like_path:
        raise DataError(f"pretrained {path}: file not found")
    tags = open_clip.list_pretrained_tags_by_model(spec.model) if spec.model in open_clip.list_models() else []
    known = f" (a download tag of {spec.model})" if pre in tags or pre.lower() in tags else ""
    raise UserError(f"pretrained {pre!r} is not a local file{known}; {HUB_HINT}")


def register_model_config(path: Optional[str], model: str) -> str:
    """Register a custom open_clip config JSON (its file stem is the model name).

    Returns the model name to build. ``model`` may be empty (the stem is used) or must
    equal the stem. open_clip keeps model configs in a process-wide table; adding the
    same file twice is harmless.
    """
    if not path:
        return model
    import open_clip

    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"model_config {p}: file not found (expected an open_clip model config JSON)")
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"model_config {p}: not valid JSON ({exc})") from None
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
    if missing:
        raise DataError(f"model_config {p}: missing key(s) {', '.join(missing)} (an open_clip model config)")
    if model and model != p.stem:
        raise UserError(f"model {model!r} differs from the config file's name {p.stem!r}; the file stem is the model name")
    open_clip.add_model_config(p)
    return p.stem


def model_config_json(model_name: str) -> Dict[str, Any]:
    """The open_clip architecture config of ``model_name`` (raises UserError if unknown)."""
    import open_clip

    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise UserError(
            f"model {model_name!r}: unknown open_clip model config; known names include "
            f"{', '.join(open_clip.list_models()[:8])} ... (or give a model_config JSON file)"
        )
    return cfg


def model_fingerprint(spec: ModelSpec) -> Dict[str, Any]:
    """What identifies the weights and architecture (hashes, no model built)."""
    import open_clip

    weights = resolve_weights(spec)
    cfg = model_config_json(weights["model_name"]) if weights["kind"] != "torchscript" else {}
    out = {
        "model": spec.model,
        "model_config_sha256": hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest() if cfg else None,
        "weights": weights["kind"],
        "checkpoint_sha256": _sha256(Path(weights["weights"])) if weights["weights"] else None,
        "init_seed": spec.init_seed if weights["kind"] == "none" else None,
        "preprocess_tag": spec.preprocess_tag,
        "image_resize": spec.image_resize,
        "open_clip_version": open_clip.__version__,
    }
    return out


class _NoRandomInitNotice(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded ..." notice: with ``pretrained:
    none`` random weights are what was asked for (and recorded in the cache)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("No pretrained weights loaded for model")


@contextmanager
def _quiet_random_init(on: bool) -> Iterator[None]:
    """Within the block, and only when ``on``, that one notice of open_clip (logged on
    the root logger) is filtered out; every other record passes."""
    if not on:
        yield
        return
    notice = _NoRandomInitNotice()
    root = logging.getLogger()
    root.addFilter(notice)
    try:
        yield
    finally:
        root.removeFilter(notice)


@dataclass
class LoadedClip:
    """A CLIP model ready for extraction plus its image transform and tokenizer."""

    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable
    info: Dict[str, Any] = field(default_factory=dict)


def load_clip(spec: ModelSpec, device: torch.device) -> LoadedClip:
    """Build the model of ``spec`` on ``device`` in eval mode, weights from local files only."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    weights = resolve_weights(spec)
    force_pp: Dict[str, Any] = {}
    if spec.preprocess_tag:
        tag_cfg = open_clip.get_pretrained_cfg(spec.model, spec.preprocess_tag)
        if not tag_cfg:
            raise UserError(f"preprocess_tag {spec.preprocess_tag!r}: not a known pretrained tag of {spec.model}")
        force_pp.update({k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg})
    if spec.image_resize:
        force_pp["resize_mode"] = spec.image_resize
    try:
        if weights["kind"] == "torchscript":
            from open_clip.openai import load_openai_model

            model = load_openai_model(weights["weights"], precision="fp32", device="cpu")
            pp = {"size": model.visual.image_size, "mean": open_clip.OPENAI_DATASET_MEAN, "std": open_clip.OPENAI_DATASET_STD}
            pp.update(force_pp)
            preprocess = image_transform_v2(PreprocessCfg(**pp), is_train=False)
            pp_cfg = asdict(PreprocessCfg(**pp))
        else:
            pretrained = weights["weights"] if weights["kind"] == "file" else None
            fork_devices: List[int] = []
            with torch.random.fork_rng(devices=fork_devices), _quiet_random_init(pretrained is None):
                torch.manual_seed(spec.init_seed)  # random weights (pretrained none) are seeded, not global
                model = open_clip.create_model(
                    weights["model_name"], pretrained=pretrained, device="cpu", pretrained_text=False,
                    force_preprocess_cfg=force_pp or None,
                )
            pp_cfg = dict(model.visual.preprocess_cfg)
            preprocess = image_transform_v2(PreprocessCfg(**pp_cfg), is_train=False)
    except (UserError, DataError):
        raise
    except Exception as exc:
        text = " ".join(str(exc).split())[:300]
        where = weights["weights"] or weights["model_name"]
        raise DataError(f"cannot build {spec.model} from {where}: {type(exc).__name__}: {text}") from None
    model = model.to(device).eval()
    tokenizer = open_clip.get_tokenizer(weights["model_name"] if weights["kind"] != "torchscript" else spec.model)
    info = {
        "weights": weights["kind"],
        "checkpoint": Path(weights["weights"]).name if weights["weights"] else None,
        "preprocess": {k: (list(v) if isinstance(v, tuple) else v) for k, v in pp_cfg.items()},
        "context_length": int(getattr(tokenizer, "context_length", 77)),
        "embed_dim": None,
    }
    return LoadedClip(model=model, preprocess=preprocess, tokenizer=tokenizer, info=info)


# ---------------------------------------------------------------------- layers
def evenly_spaced(depth: int, count: int) -> List[int]:
    """``count`` block indices spread over ``depth`` blocks, the last block included."""
    if count < 1 or count > depth:
        raise UserError(f"layers {count}: expected 1..{depth} (the tower has {depth} blocks)")
    return [int(round((k + 1) * depth / count)) - 1 for k in range(count)]


def _tower_depths(model: torch.nn.Module) -> Tuple[int, int]:
    visual = getattr(model, "visual", None)
    vt = getattr(visual, "transformer", None)
    if vt is None or not hasattr(vt, "resblocks") or not hasattr(visual, "pool_type"):
        raise UserError("per-layer features need open_clip's own ViT image tower (not timm / ResNet towers)")
    if getattr(visual, "attn_pool", None) is not None:
        raise UserError("per-layer features are not supported for towers with attentional pooling")
    text = getattr(model, "text", None)
    tt = getattr(text, "transformer", None) if text is not None else getattr(model, "transformer", None)
    if tt is None or not hasattr(tt, "resblocks") or getattr(text, "cls_emb", None) is not None:
        raise UserError("per-layer features need open_clip's own text transformer (not Hugging Face / CoCa towers)")
    return len(vt.resblocks), len(tt.resblocks)


def layer_indices(model: torch.nn.Module, count: int) -> Dict[str, List[int]]:
    """Block indices per tower for ``count`` evenly spaced layers ({} for 0)."""
    if count <= 0:
        return {}
    dv, dt = _tower_depths(model)
    return {"image": evenly_spaced(dv, count), "text": evenly_spaced(dt, count)}


def _text_pool(model: torch.nn.Module) -> Tuple[str, Optional[int]]:
    text = getattr(model, "text", None)
    if text is not None:
        return getattr(text, "pool_type", "argmax"), getattr(text, "eos_id", None)
    return getattr(model, "text_pool_type", "argmax"), getattr(model, "text_eos_id", None)


# ---------------------------------------------------------------------- encoding
def encode_images(
    model: torch.nn.Module, images: torch.Tensor, indices: Optional[List[int]]
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(L2-normalised embeddings (B, D) float32, per-layer pooled features (B, L, W) or None)."""
    if not indices:
        return torch.nn.functional.normalize(model.encode_image(images).float(), dim=-1), None
    out = model.forward_intermediates(
        image=images, image_indices=indices, normalize=False, normalize_intermediates=True,
        image_output_fmt="NLC", image_output_extra_tokens=True,
    )
    feats = torch.nn.functional.normalize(out["image_features"].float(), dim=-1)
    if model.visual.pool_type == "avg":
        layers = [x.mean(dim=1) for x in out["image_intermediates"]]
    else:  # "tok": the class token, the prefix token of every block output
        layers = [p[:, 0] for p in out["image_intermediates_prefix"]]
    return feats, torch.stack(layers, dim=1).float()


def _trimmable(model: torch.nn.Module) -> bool:
    """True for open_clip's plain CLIP text tower: causal mask, pooled at the end-of-text token."""
    import open_clip

    return (
        type(model) is open_clip.CLIP
        and getattr(model, "text_pool_type", None) == "argmax"
        and getattr(model, "attn_mask", None) is not None
    )


def _encode_texts_trimmed(
    model: torch.nn.Module, tokens: torch.Tensor, indices: Optional[List[int]]
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``encode_text`` on the tokens up to the batch's last end-of-text token only.

    With CLIP's causal mask, a position never attends to later ones, so the padding
    after the end-of-text token cannot change the pooled feature: cutting it gives the
    same embedding (up to float rounding) at a fraction of the cost (COCO captions are
    ~15 of the 77 tokens). Deviation from open_clip's ``encode_text``: only the length.
    """
    from open_clip.transformer import text_global_pool

    length = int(tokens.argmax(dim=1).max()) + 1  # the end-of-text token has the highest id
    tok = tokens[:, :length]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tok).to(cast) + model.positional_embedding[:length].to(cast)
    mask = model.attn_mask[:length, :length]
    inter: List[torch.Tensor] = []
    if indices:
        x, inter = model.transformer.forward_intermediates(x, attn_mask=mask, indices=indices)
    else:
        x = model.transformer(x, attn_mask=mask)
    pooled = text_global_pool(model.ln_final(x), tok, "argmax")
    proj = model.text_projection
    if proj is not None:
        pooled = proj(pooled) if isinstance(proj, torch.nn.Linear) else pooled @ proj
    feats = torch.nn.functional.normalize(pooled.float(), dim=-1)
    if not indices:
        return feats, None
    layers = [text_global_pool(model.ln_final(xi), tok, "argmax") for xi in inter]
    return feats, torch.stack(layers, dim=1).float()


def encode_texts(
    model: torch.nn.Module, tokens: torch.Tensor, indices: Optional[List[int]], trim: bool = True
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(L2-normalised embeddings (M, D) float32, per-layer pooled features (M, L, W) or None).

    ``trim``: skip the padding after the last end-of-text token where that cannot change
    the result (open_clip's plain CLIP text tower; see ``_encode_texts_trimmed``).
    """
    if trim and _trimmable(model):
        return _encode_texts_trimmed(model, tokens, indices)
    if not indices:
        return torch.nn.functional.normalize(model.encode_text(tokens).float(), dim=-1), None
    from open_clip.transformer import text_global_pool

    out = model.forward_intermediates(text=tokens, text_indices=indices, normalize=False, normalize_intermediates=True)
    feats = torch.nn.functional.normalize(out["text_features"].float(), dim=-1)
    pool, eos = _text_pool(model)
    layers = [text_global_pool(x, tokens, pool, eos_token_id=eos) for x in out["text_intermediates"]]
    return feats, torch.stack(layers, dim=1).float()


def pool_captions(
    feats: torch.Tensor, owner: torch.Tensor, n: int, layers: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Mean of each sample's caption embeddings, re-normalised (the ``mean`` policy).

    ``feats`` (M, D) are already L2-normalised; ``owner`` (M,) gives each caption's sample.
    """
    counts = torch.zeros(n, dtype=feats.dtype, device=feats.device).index_add_(
        0, owner, torch.ones_like(owner, dtype=feats.dtype)
    )
    mean = torch.zeros(n, feats.shape[1], dtype=feats.dtype, device=feats.device).index_add_(0, owner, feats)
    mean = torch.nn.functional.normalize(mean / counts[:, None], dim=-1)
    if layers is None:
        return mean, None
    lay = torch.zeros(n, *layers.shape[1:], dtype=layers.dtype, device=layers.device).index_add_(0, owner, layers)
    return mean, lay / counts[:, None, None]


# ---------------------------------------------------------------------- image loading
class ImageFiles(torch.utils.data.Dataset):
    """Decodes and preprocesses images in DataLoader workers; errors are returned, not raised,
    so the main process can report the file in one line."""

    def __init__(self, paths: Sequence[str], transform: Callable) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        try:
            with Image.open(self.paths[i]) as im:
                return i, self.transform(im.convert("RGB")), ""
        except Exception as exc:
            return i, None, f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"


def collate_images(items):
    """(indices, stacked images or None, first error message or '')."""
    idx = [i for i, _, _ in items]
    errors = [(i, e) for i, _, e in items if e]
    if errors:
        return idx, None, errors[0]
    return idx, torch.stack([x for _, x, _ in items]), ""


# ---------------------------------------------------------------------- the job
@dataclass
class ExtractOptions:
    """How to run (none of these changes the numbers, except ``caption_policy``,
    ``layers`` and ``precision``, which are part of the cache fingerprint)."""

    batch_size: int = 64
    workers: int = 2
    chunk_size: int = 1024
    caption_policy: str = "mean"
    layers: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto: fp16 autocast on CUDA, fp32 on CPU | fp32 | fp16 | bf16
    progress: bool = True
    overwrite: bool = False


@dataclass
class ExtractResult:
    path: Path
    status: str  # complete | partial | up-to-date
    done: int
    total: int
    seconds: float  # the whole call: hashing, model build, extraction
    extracted: int
    encode_seconds: float = 0.0  # the chunk loop alone: decoding, both towers, writes

    @property
    def images_per_second(self) -> float:
        """Throughput of the chunk loop (model build and hashing left out)."""
        return self.extracted / self.encode_seconds if self.encode_seconds > 0 else 0.0


def pick_device(name: str) -> torch.device:
    """The extraction device: ``utils.seed.resolve_device`` naming the ``device`` option."""
    return resolve_device(name, key="device")


def resolve_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype (None: plain fp32)."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else None
    if precision == "fp32":
        return None
    if precision in ("fp16", "bf16"):
        if device.type != "cuda" and precision == "fp16":
            raise UserError("precision fp16 needs a CUDA device; use fp32 or bf16 on CPU")
        return torch.float16 if precision == "fp16" else torch.bfloat16
    raise UserError(f"precision: expected auto, fp32, fp16 or bf16, got {precision!r}")


def check_options(opt: ExtractOptions) -> None:
    if opt.caption_policy not in CAPTION_POLICIES:
        raise UserError(f"caption_policy: expected one of {', '.join(CAPTION_POLICIES)}, got {opt.caption_policy!r}")
    for name in ("batch_size", "chunk_size"):
        if getattr(opt, name) < 1:
            raise UserError(f"{name}: must be >= 1, got {getattr(opt, name)}")
    if opt.workers < 0 or opt.layers < 0:
        raise UserError(f"workers and layers: must be >= 0, got {opt.workers} and {opt.layers}")


def extract_features(
    samples: RawSamples,
    spec: ModelSpec,
    output: str | os.PathLike,
    options: ExtractOptions = ExtractOptions(),
    stop_after_chunks: Optional[int] = None,
    log: Optional[Callable[[str], None]] = None,
    ctx: Optional[DistContext] = None,
) -> ExtractResult:
    """Extract ``samples`` into the cache ``output``; continue an unfinished one.

    Re-running the same call after an interruption continues at the first unfinished
    chunk; the result equals an uninterrupted run (chunks split into the same batches).
    A finished cache with the same fingerprint is left alone (``up-to-date``); a cache
    or partial cache made with other settings is refused unless ``options.overwrite``.
    ``stop_after_chunks`` stops after that many chunks (tests, and trial runs); ``log``
    receives progress lines (resume point).

    ``ctx`` (from ``utils.distributed.init_distributed``; default one process): under
    torchrun every rank makes this call with the same arguments (``options.device`` =
    the rank's device). Each chunk's batches are split over the ranks, rank 0 gathers the
    rows in order and alone reads and writes the cache, logs and shows progress. Every
    batch is a batch a single process encodes, so the file is the one a single process
    writes, bit for bit. A failure on any rank stops every rank with the same error.
    """
    ctx = ctx or DistContext()
    main = ctx.is_main
    t0 = time.perf_counter()
    output = Path(output).expanduser()
    with collective_step(ctx):  # every rank: options, device, model config
        check_options(options)
        device = pick_device(options.device)
        amp = resolve_precision(options.precision, device)
        spec = ModelSpec(**{**asdict(spec), "model": register_model_config(spec.model_config, spec.model)})
    fingerprint: Dict[str, Any] = {}
    up_to_date: Optional[int] = None
    with collective_step(ctx):  # rank 0: is there anything to do? (reads files only there)
        if main:
            fingerprint = {
                "source_sha256": samples.fingerprint(),
                "num_samples": len(samples),
                "caption_policy": options.caption_policy,
                "layers": options.layers,
                "precision": "fp32" if amp is None else str(amp).replace("torch.", ""),
                **model_fingerprint(spec),
            }
            if output.is_file() and not options.overwrite:
                stored, done, complete = read_fingerprint(output)
                if stored != fingerprint or not complete:
                    raise DataError(
                        f"{output}: already holds features made with other settings "
                        f"({fingerprint_difference(stored, fingerprint)}); use another output file, or overwrite to replace it"
                    )
                up_to_date = done
            else:
                samples.check_images()
    up_to_date = broadcast_object(up_to_date, ctx)
    if up_to_date is not None:
        return ExtractResult(output, "up-to-date", up_to_date, up_to_date, time.perf_counter() - t0, 0)

    with collective_step(ctx):  # every rank builds the model
        clip = load_clip(spec, device)
        indices = layer_indices(clip.model, options.layers)
        with torch.no_grad():
            probe = clip.preprocess(_blank_image(clip.info["preprocess"]))[None].to(device)
            f_img, l_img = encode_images(clip.model, probe, indices.get("image"))
            f_txt, l_txt = encode_texts(clip.model, clip.tokenizer(["a"]).to(device), indices.get("text"))
        dims: Dict[str, Tuple[int, ...]] = {"image": (f_img.shape[1],), "text": (f_txt.shape[1],)}
        if indices:
            dims["image_layers"] = tuple(l_img.shape[1:])
            dims["text_layers"] = tuple(l_txt.shape[1:])
    writer: Optional[CacheWriter] = None
    with collective_step(ctx):  # rank 0 opens (or continues) the file
        if main:
            writer = _open_writer(samples, spec, output, options, clip, indices, dims, device, fingerprint)
    start_done, chunk_size = broadcast_object((writer.done, writer.chunk_size) if main else None, ctx)
    if start_done and log is not None and writer is not None:
        log(f"resuming {writer.partial} at row {writer.done} of {writer.total} (chunk size {writer.chunk_size})")
    status, done = "partial", start_done
    t1 = time.perf_counter()
    try:
        status, done = _run_chunks(
            writer, samples, clip, indices, dims, device, amp, options, stop_after_chunks, ctx, start_done, chunk_size
        )
    finally:
        if status != "complete" and writer is not None:
            writer.close()  # the partial file stays; the same call continues it
    with collective_step(ctx):
        if status == "complete" and writer is not None:
            writer.finish()
    path = output if status == "complete" else partial_path(output)
    t2 = time.perf_counter()
    return ExtractResult(path, status, done, len(samples), t2 - t0, done - start_done, t2 - t1)


def _open_writer(
    samples: RawSamples,
    spec: ModelSpec,
    output: Path,
    options: ExtractOptions,
    clip: LoadedClip,
    indices: Dict[str, List[int]],
    dims: Dict[str, Tuple[int, ...]],
    device: torch.device,
    fingerprint: Dict[str, Any],
) -> CacheWriter:
    """The cache writer (a new partial file, or the unfinished one to continue)."""
    if options.overwrite:  # only once the inputs and the model are known to be usable
        for p in (output, partial_path(output)):
            p.unlink(missing_ok=True)
    meta = {
        "model": spec.model,
        "checkpoint": clip.info["checkpoint"],
        "weights": clip.info["weights"],
        "preprocess": clip.info["preprocess"],
        "context_length": clip.info["context_length"],
        "caption_policy": options.caption_policy,
        "layer_indices": indices,
        "layer_features": "block outputs after the final LayerNorm, pooled like the tower output, tower width" if indices else None,
        "source": samples.source,
        "torch_version": torch.__version__,
        "batch_size": options.batch_size,
        "device": str(device),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        **{k: fingerprint[k] for k in ("open_clip_version", "checkpoint_sha256", "precision", "init_seed")},
    }
    writer = CacheWriter.open(
        output, fingerprint, meta, dims, samples.labels, samples.label_names, samples.ids, samples.captions,
        options.chunk_size,
    )
    if writer.done < writer.total and writer.done % writer.chunk_size:
        writer.close()
        raise DataError(
            f"{writer.partial}: {writer.done} rows done is not a chunk boundary of {writer.chunk_size}; "
            "overwrite to start afresh"
        )
    return writer


def _blank_image(pp: Dict[str, Any]):
    from PIL import Image

    size = pp.get("size", 224)
    size = size if isinstance(size, (list, tuple)) else (size, size)
    return Image.new("RGB", (int(size[1]), int(size[0])), (127, 127, 127))


# ---------------------------------------------------------------------- ranks
@contextmanager
def collective_step(ctx: DistContext) -> Iterator[None]:
    """Run the block (on whichever ranks it does work), then stop every rank if it raised
    on any: so no rank is left waiting in a collective that another rank never reaches.

    The failing rank raises its own exception; the others raise the same message (the
    lowest failing rank's) as the same UserError class, so rank 0 reports it in one line;
    any other exception becomes a RuntimeError naming the rank. One process: the block's
    exception passes through unchanged.
    """
    error: Optional[Exception] = None
    try:
        yield
    except Exception as exc:
        error = exc
    _agree(error, ctx)


def _agree(error: Optional[Exception], ctx: DistContext) -> None:
    if not ctx.enabled:
        if error is not None:
            raise error
        return
    note = None if error is None else (type(error).__name__, " ".join(str(error).split()))
    notes: List[Any] = [None] * ctx.world_size
    dist.all_gather_object(notes, note)  # the status every rank sends before the next collective
    if error is not None:
        raise error
    failed = [(r, x) for r, x in enumerate(notes) if x is not None]
    if not failed:
        return
    rank, (name, text) = failed[0]
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, UserError):
        raise cls(text)
    raise RuntimeError(f"rank {rank} of the extraction failed: {name}: {text}")


# ---------------------------------------------------------------------- the chunk loop
def _run_chunks(
    writer: Optional[CacheWriter],
    samples: RawSamples,
    clip: LoadedClip,
    indices: Dict[str, List[int]],
    dims: Dict[str, Tuple[int, ...]],
    device: torch.device,
    amp: Optional[torch.dtype],
    options: ExtractOptions,
    stop_after_chunks: Optional[int],
    ctx: DistContext,
    done: int,
    chunk_size: int,
) -> Tuple[str, int]:
    """Encode the chunks from row ``done`` on; returns ('complete' | 'partial', rows done).

    ``writer``: rank 0's (None on the other ranks)."""
    from tqdm.auto import tqdm

    n, cs, bs = len(samples), chunk_size, options.batch_size
    if done >= n:
        return "complete", done
    # The batches never cross a chunk boundary, so a resumed run sees the same batches.
    # Ranks split each chunk's list of batches (shard_bounds over batches, not rows), so
    # every batch any rank encodes is one a single process encodes: the features are
    # bit-identical. (Splitting rows would regroup them into other batches, and batch
    # composition moves features by ~1e-7: the trimmed text length follows the batch's
    # longest caption, and a batch of one takes another matmul path.)
    chunks = [(s, min(s + cs, n)) for s in range(done, n, cs)]
    plan = [[list(range(b, min(b + bs, e))) for b in range(s, e, bs)] for s, e in chunks]
    mine = [batches[slice(*shard_bounds(len(batches), ctx))] for batches in plan]
    loader = torch.utils.data.DataLoader(
        ImageFiles(samples.paths, clip.preprocess), batch_sampler=[b for own in mine for b in own],
        num_workers=options.workers, collate_fn=collate_images, pin_memory=device.type == "cuda",
    )
    show = options.progress and ctx.is_main and sys.stderr.isatty()  # no \r frames in a redirected stderr
    bar = tqdm(total=n, initial=done, unit="img", desc="extract", disable=not show, dynamic_ncols=True)
    written = 0
    it = iter(loader)
    try:
        for (start, end), batches, own in zip(chunks, plan, mine):
            with collective_step(ctx):  # every rank encodes its run of the chunk's batches
                encoded: List[Dict[str, torch.Tensor]] = []
                for _ in own:
                    idx, images, error = next(it)
                    if error:
                        i, msg = error
                        raise DataError(f"{samples.paths[i]}: cannot read the image ({msg})")
                    encoded.append(_encode_batch(clip, samples, idx, images, indices, device, amp, options.caption_policy))
                    bar.update(len(idx))
                local = _pack_batches(encoded, [len(b) for b in own], dims, bs, device)
            blocks = gather_rows(local, len(batches), ctx)  # (batches in the chunk, batch_size, width), in order
            with collective_step(ctx):  # rank 0 writes the chunk; then `done` moves
                if writer is not None:
                    writer.write(start, _unpack_chunk(blocks, batches, dims))
            bar.update(end - start - sum(len(b) for b in own))  # the other ranks' rows
            done, written = end, written + 1
            if stop_after_chunks is not None and written >= stop_after_chunks and end < n:
                return "partial", done
    finally:
        bar.close()
        del it
    return "complete", done


def _pack_batches(
    encoded: List[Dict[str, torch.Tensor]],
    sizes: List[int],
    dims: Dict[str, Tuple[int, ...]],
    bs: int,
    device: torch.device,
) -> torch.Tensor:
    """This rank's encoded batches as one (batches, batch_size, width) float32 tensor:
    every feature of a sample side by side in one row, a short batch padded with zeros,
    so that ``gather_rows`` can gather whole batches (one batch = one "row")."""
    widths = [int(np.prod(shape)) for shape in dims.values()]
    local = torch.zeros((len(encoded), bs, sum(widths)), dtype=torch.float32, device=device)
    for j, (arrays, size) in enumerate(zip(encoded, sizes)):
        local[j, :size] = torch.cat([arrays[k].reshape(size, -1) for k in dims], dim=1)
    return local


def _unpack_chunk(
    blocks: torch.Tensor, batches: List[List[int]], dims: Dict[str, Tuple[int, ...]]
) -> Dict[str, np.ndarray]:
    """The gathered batches of a chunk -> its arrays in sample order; the padding is cut
    (exact copies, no row doubled or lost). Per-layer features become float16 only here."""
    widths = [int(np.prod(shape)) for shape in dims.values()]
    rows = torch.cat([blocks[j, :len(b)] for j, b in enumerate(batches)]).cpu()
    out: Dict[str, np.ndarray] = {}
    for (name, shape), part in zip(dims.items(), rows.split(widths, dim=1)):
        arr = part.reshape(len(rows), *shape).numpy()
        out[name] = arr.astype(np.float16) if name.endswith("_layers") else arr
    return out


def _encode_batch(
    clip: LoadedClip,
    samples: RawSamples,
    idx: List[int],
    images: torch.Tensor,
    indices: Dict[str, List[int]],
    device: torch.device,
    amp: Optional[torch.dtype],
    policy: str,
) -> Dict[str, torch.Tensor]:
    """One batch's float32 features on ``device``: image, text (caption policy applied)
    and, with layers, image_layers / text_layers (B, L, W)."""
    caps: List[str] = []
    owner: List[int] = []
    for j, i in enumerate(idx):
        use = samples.captions[i] if policy == "mean" else samples.captions[i][:1]
        caps.extend(use)
        owner.extend([j] * len(use))
    tokens = clip.tokenizer(caps).to(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        f_img, l_img = encode_images(clip.model, images.to(device, non_blocking=True), indices.get("image"))
        f_txt, l_txt = encode_texts(clip.model, tokens, indices.get("text"))
    f_txt, l_txt = pool_captions(
        f_txt.float(), torch.as_tensor(owner, device=device), len(idx), None if l_txt is None else l_txt.float()
    )
    out = {"image": f_img.float(), "text": f_txt}
    if l_img is not None:
        out["image_layers"] = l_img.float()
        out["text_layers"] = l_txt
    return out
