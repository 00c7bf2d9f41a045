"""Config files as data: YAML reading with ``_base_`` inheritance, ``--set`` overrides, and
checking keyword arguments against a callable's signature.

Nothing here knows the registries; ``runners/config.py`` uses these pieces to validate
and build every ``{name: ..., **kwargs}`` block of a config.
"""
from __future__ import annotations

import copy
import difflib
import inspect
import re
import typing
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import yaml

from utils.errors import ConfigError

_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping (plain YAML
    keeps the last silently); keys brought in by a ``<<`` merge may be overridden."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: Dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise ConfigError(f"key {key!r} written twice (lines {seen[key]} and {line}); keep one")
                    seen[key] = line
                except TypeError:  # an unhashable key: the base loader reports it
                    continue
        return super().construct_mapping(node, deep=deep)


def _safe_load(text: str) -> Any:
    return yaml.load(text, Loader=UniqueKeyLoader)


def load_yaml(path: str | Path) -> Dict[str, Any]:
    """Read a YAML mapping from ``path``; any problem is a one-line ConfigError."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found (expected a YAML file, e.g. configs/CASH/demo.yaml)")
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory; expected a YAML config file, e.g. configs/CASH/demo.yaml")
    if not path.is_file():
        raise ConfigError(f"{path}: not a regular file (a device or pipe); expected a YAML config file")
    try:
        data = _safe_load(path.read_text(encoding="utf-8"))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file (expected YAML)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
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
        value = _safe_load(raw) if raw.strip() else None
    except ConfigError as exc:
        raise ConfigError(f"--set {text!r}: {exc}") from None
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
        return typing.get_type_hints(fn, include_extras=True)  # keeps Annotated markers
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


AnnotatedCheck = Callable[[Tuple[Any, ...], Any, str], Any]


def check_kwargs(target: Callable, kwargs: Mapping[str, Any], path: str, skip: Sequence[str] = (),
                 annotated: Optional[AnnotatedCheck] = None) -> Dict[str, Any]:
    """Validate ``kwargs`` against ``target``'s signature; returns the coerced kwargs.

    For a key annotated ``Annotated[T, *extras]``, ``annotated(extras, value, dotted path)``
    is asked first (e.g. to validate a nested block); it returns the checked value, or
    NotImplemented to check the value against T as any other."""
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
        if annotated is not None and typing.get_origin(tp) is typing.Annotated:
            checked = annotated(typing.get_args(tp)[1:], value, f"{path}.{key}")
            if checked is not NotImplemented:
                out[key] = checked
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


# ---------------------------------------------------------------------- inheritance
BASE_KEY = "_base_"
REPLACE_KEY = "_replace_"


def load_yaml_tree(path: str | Path, _seen: Tuple[Path, ...] = ()) -> Dict[str, Any]:
    """``load_yaml`` plus inheritance: a file may name ``_base_: other.yaml`` (or a list,
    paths relative to the file); bases are merged in order, then the file over them.

    Merging is by key, recursively, except that a block whose ``name`` differs from the
    base block's replaces it whole (another class, other keys), and so does a block that
    says ``_replace_: true`` (the key itself is dropped): without it, a child that picks
    another dataset ``preset`` still inherits the base's ``scale``. A base that includes
    itself is refused.
    """
    path = Path(path)
    here = path.resolve()
    if here in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, here))
        raise ConfigError(f"{path}: {BASE_KEY} includes itself ({chain})")
    data = load_yaml(path)
    _check_replace_keys(data, path)
    bases = data.pop(BASE_KEY, None)
    if bases is None:
        return _without_replace_keys(data)
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"{path}: {BASE_KEY}: expected a file name or a list of file names, got {bases!r}")
    merged: Dict[str, Any] = {}
    for base in bases:
        base_path = path.parent / base
        if not base_path.is_file():
            raise ConfigError(f"{path}: {BASE_KEY}: {base_path}: base config not found")
        merged = merge_blocks(merged, load_yaml_tree(base_path, (*_seen, here)))
    return merge_blocks(merged, data)


def merge_blocks(base: Dict[str, Any], child: Dict[str, Any]) -> Dict[str, Any]:
    """``child`` over ``base`` (see ``load_yaml_tree``); neither input is modified."""
    out = copy.deepcopy(base)
    for key, value in child.items():
        if key == REPLACE_KEY:  # read by the caller, one level up
            continue
        old = out.get(key)
        replace = isinstance(value, dict) and value.get(REPLACE_KEY, False)
        same_class = not (isinstance(old, dict) and isinstance(value, dict)
                          and "name" in value and old.get("name", value["name"]) != value["name"])
        if isinstance(old, dict) and isinstance(value, dict) and same_class and not replace:
            out[key] = merge_blocks(old, value)
        else:
            out[key] = _without_replace_keys(value)
    return out


def _check_replace_keys(data: Any, path: Path, dotted: str = "") -> None:
    """Refuse a ``_replace_`` that is not a boolean, naming the file and the block."""
    if not isinstance(data, dict):
        return
    if REPLACE_KEY in data and not dotted:
        raise ConfigError(f"{path}: {REPLACE_KEY} belongs inside a block (e.g. dataset: {{{REPLACE_KEY}: true, ...}})")
    if REPLACE_KEY in data and not isinstance(data[REPLACE_KEY], bool):
        raise ConfigError(f"{path}: {dotted}{REPLACE_KEY}: expected true or false, got {data[REPLACE_KEY]!r}")
    for key, value in data.items():
        _check_replace_keys(value, path, f"{dotted}{key}.")


def _without_replace_keys(value: Any) -> Any:
    """A deep copy of ``value`` with every ``_replace_`` key dropped."""
    if isinstance(value, dict):
        return {k: _without_replace_keys(v) for k, v in value.items() if k != REPLACE_KEY}
    return copy.deepcopy(value)
