"""Config assembly: validate and build every ``{name: <registered name>, **kwargs}`` block.

This is the one construction path of the library. Top-level blocks (dataset, model,
optimizer, scheduler, runner), the per-group optimiser blocks a model declares in
``param_groups`` and nested blocks all go through ``validate_block`` / ``build_block``:
each key is checked against the signature of the callable the block names, and every
error is one line with the key's dotted path. It lives in the runners layer because it
knows the registries of every layer and what the library injects (feature dimensions,
parameters, step counts).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Sequence, Tuple

import yaml

from common.register import DATASETS, MODELS, OPTIMIZERS, RUNNERS, SCHEDULERS, NestedBlock, Registry, RegistryError
from utils.config import apply_overrides, check_kwargs, load_yaml_tree
from utils.errors import ConfigError


@dataclass(frozen=True)
class BlockKind:
    """What a block names (its registry), whether a config must have it, and the
    constructor arguments the library fills in itself (a config may not set them)."""

    registry: Registry
    required: bool
    injected: Tuple[str, ...] = ()


BLOCKS: Dict[str, BlockKind] = {
    "dataset": BlockKind(DATASETS, True),
    "model": BlockKind(MODELS, True, ("image_dim", "text_dim", "num_classes")),
    "optimizer": BlockKind(OPTIMIZERS, True, ("params",)),
    "scheduler": BlockKind(SCHEDULERS, False, ("optimizer", "total_steps", "steps_per_epoch")),
    "runner": BlockKind(RUNNERS, True),
}


def block_target(kind: str, spec: Any, path: str) -> Tuple[Callable, Dict[str, Any]]:
    """The registered callable and the keyword arguments of one block at ``path``."""
    return _target(BLOCKS[kind].registry, spec, path)


def _target(registry: Registry, spec: Any, path: str) -> Tuple[Callable, Dict[str, Any]]:
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: expected a block with a 'name' key, got {type(spec).__name__}")
    if "name" not in spec:
        raise ConfigError(f"{path}.name: required key missing (one of: {', '.join(registry.names())})")
    try:
        target = registry.get(spec["name"])
    except RegistryError as exc:
        raise ConfigError(f"{path}.name: {exc}") from None
    return target, {k: v for k, v in spec.items() if k != "name"}


def validate_block(kind: str, spec: Any, path: str) -> Dict[str, Any]:
    """``spec`` checked against the signature of what it names; returns a coerced copy
    (e.g. ``1e-5`` read as a string becomes a float)."""
    return _validate(BLOCKS[kind].registry, BLOCKS[kind].injected, spec, path)


def _validate(registry: Registry, injected: Sequence[str], spec: Any, path: str) -> Dict[str, Any]:
    target, kwargs = _target(registry, spec, path)
    coerced = check_kwargs(target, kwargs, path, skip=injected, annotated=_nested_block)
    return {"name": spec["name"], **coerced}


def _nested_block(extras: Tuple[Any, ...], value: Any, path: str) -> Any:
    """A key marked ``Annotated[..., NestedBlock(registry, injected)]`` (e.g. the ``base``
    model a strategy wraps) is validated like a top-level block, at its dotted path."""
    marker = next((m for m in extras if isinstance(m, NestedBlock)), None)
    if marker is None:
        return NotImplemented
    return _validate(marker.registry, marker.injected, value, path)


def build_block(kind: str, spec: Any, path: str, **injected: Any) -> Any:
    """Validate ``spec`` and call what it names with its kwargs plus ``injected``. A
    ``ValueError`` from the constructor (a value out of range) becomes a ConfigError
    naming the block."""
    checked = validate_block(kind, spec, path)
    target = BLOCKS[kind].registry.get(checked.pop("name"))
    try:
        return target(**injected, **checked)
    except ValueError as exc:
        raise ConfigError(f"{path} ({spec['name']}): {exc}") from None


def validate_config(cfg: Dict[str, Any], source: str = "config") -> None:
    """Check every block of ``cfg`` in place (values coerced); errors start with ``source``."""
    for key in cfg:
        if key not in BLOCKS:
            close = difflib.get_close_matches(str(key), list(BLOCKS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{source}: {key}: unknown block{hint}; known: {', '.join(BLOCKS)}")
    for kind, spec in BLOCKS.items():
        if cfg.get(kind) is None:
            if spec.required:
                raise ConfigError(f"{source}: {kind}: required block missing (a mapping with 'name' and its keys)")
            cfg.pop(kind, None)
            continue
        try:
            cfg[kind] = validate_block(kind, cfg[kind], kind)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None


def build(kind: str, cfg: Dict[str, Any], **injected: Any) -> Any:
    """The object of the top-level block ``cfg[kind]``."""
    return build_block(kind, cfg[kind], kind, **injected)


def read_config(path: str | Path, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """Read a config file (with ``_base_`` inheritance) and apply ``--set`` overrides, not
    yet validated: ``runners.experiment.prepare`` validates it once, with the run."""
    return apply_overrides(load_yaml_tree(path), overrides)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """Read, override and validate a config file."""
    cfg = read_config(path, overrides)
    validate_config(cfg, source=str(path))
    return cfg


def dump_config(cfg: Dict[str, Any]) -> str:
    """The resolved config as YAML text, blocks in their canonical order."""
    ordered = {k: cfg[k] for k in BLOCKS if k in cfg}
    return yaml.safe_dump(ordered, sort_keys=False, default_flow_style=False)
