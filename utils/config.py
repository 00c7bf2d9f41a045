"""Config files: YAML blocks ``{name: <registered name>, **kwargs}`` plus ``--set`` overrides.

Every block is checked against the signature of the class it names before anything
runs: an unknown key, a missing required key or a value of the wrong type is refused
with the key's dotted path and what was expected.
"""
from __future__ import annotations

import copy
import difflib
import inspect
import re
import typing
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Sequence, Tuple

import yaml

from common.register import DATASETS, MODELS, OPTIMIZERS, RUNNERS, NestedBlock, Registry, RegistryError
from utils.errors import ConfigError

# The blocks a config may hold, the registry each names, and whether it is required.
BLOCKS: Dict[str, Tuple[Registry, bool]] = {
    "dataset": (DATASETS, True),
    "model": (MODELS, True),
    "optimizer": (OPTIMIZERS, True),
    "scheduler": (OPTIMIZERS, False),
    "runner": (RUNNERS, True),
}
# Constructor arguments the library fills in itself; a config may not set them.
INJECTED: Dict[str, Tuple[str, ...]] = {
    "dataset": (),
    "model": ("image_dim", "text_dim", "num_classes"),
    "optimizer": ("params",),
    "scheduler": ("optimizer", "total_steps", "steps_per_epoch"),
    "runner": (),
}
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def load_yaml(path: str | Path) -> Dict[str, Any]:
    """Read a YAML mapping from ``path``; any problem is a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found (expected a YAML file, e.g. configs/CASH/demo.yaml)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file (expected YAML)") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of blocks (dataset, model, ...), got {type(data).__name__}")
    return data


def parse_override(text: str) -> Tuple[List[str], Any]:
    """``"a.b=value"`` -> (["a", "b"], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. runner.epochs=5")
    key, _, raw = text.partition("=")
    parts = key.strip().split(".")
    if not key.strip() or any(not p or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", p) for p in parts):
        raise ConfigError(f"--set {text!r}: {key!r} is not a dotted key like model.bits")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"--set {text!r}: the value {raw!r} is not valid YAML") from None
    return parts, value


def apply_overrides(cfg: Dict[str, Any], overrides: Iterable[str]) -> Dict[str, Any]:
    """A copy of ``cfg`` with each ``a.b=value`` override set."""
    out = copy.deepcopy(cfg)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {text!r}: {'.'.join(parts[: i + 1])} is a value, not a block")
            node = nxt
        node[parts[-1]] = value
    return out


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """Read, override and validate a config; returns the resolved dict."""
    cfg = apply_overrides(load_yaml(path), overrides)
    validate_config(cfg, source=str(path))
    return cfg


# ---------------------------------------------------------------------- validation
def signature_params(target: Callable) -> Dict[str, inspect.Parameter]:
    """Keyword parameters of a class constructor or function."""
    fn = target.__init__ if inspect.isclass(target) else target
    return {
        n: p for n, p in inspect.signature(fn).parameters.items()
        if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _type_hints(target: Callable) -> Dict[str, Any]:
    fn = target.__init__ if inspect.isclass(target) else target
    try:
        return typing.get_type_hints(fn, include_extras=True)  # keeps NestedBlock markers
    except Exception:  # unresolvable annotations: accept any value rather than crash
        return {}


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _describe(typing.get_args(tp)[0])
    if tp is type(None):
        return "null"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is typing.Union:
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin in (list, tuple, Sequence, typing.Sequence, List, Tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin in (dict, Mapping, typing.Mapping, Dict):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def check_value(value: Any, tp: Any) -> Tuple[bool, Any]:
    """(ok, coerced value) for ``value`` against the annotation ``tp``."""
    if tp is Any or tp is inspect.Parameter.empty:
        return True, value
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return check_value(value, typing.get_args(tp)[0])
    if origin is typing.Union:
        for arg in typing.get_args(tp):
            ok, coerced = check_value(value, arg)
            if ok:
                return True, coerced
        return False, value
    if tp is type(None):
        return value is None, value
    if origin is typing.Literal:
        return value in typing.get_args(tp), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):  # YAML 1.1 reads 1e-5 as a string
            return True, float(value)
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if origin in (list, tuple, Sequence, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, value
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if origin is tuple and len(args) > 1 and Ellipsis not in typing.get_args(tp):
            if len(args) != len(value):
                return False, value
            pairs = zip(value, args)
        else:
            pairs = ((v, args[0] if args else Any) for v in value)
        out = []
        for v, a in pairs:
            ok, c = check_value(v, a)
            if not ok:
                return False, value
            out.append(c)
        return True, out
    if origin in (dict, Mapping, typing.Mapping) or tp is dict:
        return isinstance(value, dict), value
    if isinstance(tp, type):
        return isinstance(value, tp), value
    return True, value


def check_kwargs(target: Callable, kwargs: Mapping[str, Any], path: str, skip: Sequence[str] = ()) -> Dict[str, Any]:
    """Validate ``kwargs`` against ``target``'s signature; returns the coerced kwargs."""
    params = signature_params(target)
    hints = _type_hints(target)
    known = [n for n in params if n not in skip]
    out: Dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in skip:
            raise ConfigError(f"{path}.{key}: set by the library, not by the config; remove it")
        if key not in params:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{path}.{key}: unknown key{hint}; known: {', '.join(known) or '(none)'}")
        tp = hints.get(key, params[key].annotation)
        nested = nested_marker(tp)
        if nested is not None:
            out[key] = check_nested(value, nested, f"{path}.{key}")
            continue
        ok, coerced = check_value(value, tp)
        if not ok:
            raise ConfigError(
                f"{path}.{key}: expected {_describe(tp)}, got {type(value).__name__} {value!r}"
            )
        out[key] = coerced
    for name, param in params.items():
        if name in skip or name in kwargs:
            continue
        if param.default is inspect.Parameter.empty:
            raise ConfigError(f"{path}.{name}: required key missing ({_describe(hints.get(name, Any))})")
    return out


def nested_marker(tp: Any) -> NestedBlock | None:
    """The NestedBlock marker of an ``Annotated[..., NestedBlock(...)]`` hint, if any."""
    if typing.get_origin(tp) is typing.Annotated:
        return next((m for m in typing.get_args(tp)[1:] if isinstance(m, NestedBlock)), None)
    return None


def check_nested(spec: Any, marker: NestedBlock, path: str) -> Dict[str, Any]:
    """Validate a nested ``{name: ..., **kwargs}`` block at ``path`` (recursively, so a
    wrapper may wrap a wrapper); returns it with coerced values."""
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: expected a block with a 'name' key, got {type(spec).__name__}")
    if "name" not in spec:
        raise ConfigError(f"{path}.name: required key missing (one of: {', '.join(marker.registry.names())})")
    try:
        target = marker.registry.get(spec["name"])
    except RegistryError as exc:
        raise ConfigError(f"{path}.name: {exc}") from None
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    return {"name": spec["name"], **check_kwargs(target, kwargs, path, skip=marker.injected)}


def block_target(block: str, spec: Any, source: str) -> Tuple[Callable, Dict[str, Any]]:
    """The registered callable and its kwargs for one config block."""
    registry, _ = BLOCKS[block]
    if not isinstance(spec, dict):
        raise ConfigError(f"{source}: {block}: expected a block with a 'name' key, got {type(spec).__name__}")
    if "name" not in spec:
        raise ConfigError(f"{source}: {block}.name: required key missing (one of: {', '.join(registry.names())})")
    try:
        target = registry.get(spec["name"])
    except RegistryError as exc:
        raise ConfigError(f"{source}: {block}.name: {exc}") from None
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    return target, kwargs


def validate_config(cfg: Dict[str, Any], source: str = "config") -> None:
    """Check every block; coerces values in place (e.g. ``1e-5`` -> float)."""
    for key in cfg:
        if key not in BLOCKS:
            close = difflib.get_close_matches(str(key), list(BLOCKS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{source}: {key}: unknown block{hint}; known: {', '.join(BLOCKS)}")
    for block, (registry, required) in BLOCKS.items():
        if block not in cfg or cfg[block] is None:
            if required:
                raise ConfigError(f"{source}: {block}: required block missing (a mapping with 'name' and its keys)")
            cfg.pop(block, None)
            continue
        target, kwargs = block_target(block, cfg[block], source)
        try:
            coerced = check_kwargs(target, kwargs, block, skip=INJECTED[block])
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        cfg[block] = {"name": cfg[block]["name"], **coerced}


def build(block: str, cfg: Dict[str, Any], **injected: Any) -> Any:
    """Instantiate the registered class of ``cfg[block]`` with its kwargs plus ``injected``.

    A ``ValueError`` raised by the constructor (a value out of range) becomes a
    ConfigError naming the block.
    """
    target, kwargs = block_target(block, cfg[block], "config")
    try:
        return target(**injected, **kwargs)
    except ValueError as exc:
        raise ConfigError(f"{block} ({cfg[block]['name']}): {exc}") from None


def dump_config(cfg: Dict[str, Any]) -> str:
    """The resolved config as YAML text, blocks in their canonical order."""
    ordered = {k: cfg[k] for k in BLOCKS if k in cfg}
    return yaml.safe_dump(ordered, sort_keys=False, default_flow_style=False)
