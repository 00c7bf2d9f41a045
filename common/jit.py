"""numba compilation for the library's CPU kernels: lazy, cached on disk where it can be.

Kernels are plain Python functions (they run as such, slowly, which keeps them readable
and testable without numba); ``njit`` compiles one when it is first needed, so importing
a module that holds a kernel never imports numba. The vectorisable elementwise math the
kernels share lives in ``common.vector_math``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import types
from typing import Any, Callable, Dict, Iterable, Optional


# Found once, at import, without importing numba (that import alone takes a while).
_INSTALLED = importlib.util.find_spec("numba") is not None


def installed() -> bool:
    """Whether numba is installed: what a kernel's caller decides on, also while
    torch.compile traces it (a module constant it reads, where ``njit`` would import
    and compile)."""
    return _INSTALLED


def njit(fn: Callable, *, helpers: Iterable[Callable] = (), replace: Optional[Dict[str, str]] = None,
         **options: Any) -> Optional[Callable]:
    """``fn`` compiled by ``numba.njit(**options)``; None when numba is not importable.

    ``helpers``: plain Python functions ``fn`` calls by their global name; each is
    compiled too (inlined into ``fn``) and bound in a copy of ``fn``'s globals.
    ``replace``: global name -> attribute of numba bound instead (e.g. ``{"_prange":
    "prange"}`` turns a kernel's ``range`` stand-in into numba's parallel range).
    The machine code is cached next to the source (``__pycache__``, or numba's user
    cache directory); where no location is writable it is compiled in every process.
    numba's cache checks only ``fn``'s own file, so with helpers the cache entry is
    named after a hash of the helpers' source files: editing them recompiles.
    """
    try:
        import numba
    except ImportError:
        return None
    glob = dict(fn.__globals__)
    inlined = {k: v for k, v in options.items() if k != "parallel"}
    inlined["inline"] = "always"
    for helper in helpers:
        glob[helper.__name__] = _compile(numba, helper, inlined)
    for name, attribute in (replace or {}).items():
        glob[name] = getattr(numba, attribute)
    bound = types.FunctionType(fn.__code__, glob, fn.__name__, fn.__defaults__)
    bound.__qualname__, bound.__module__ = fn.__qualname__ + _fingerprint(helpers), fn.__module__
    return _compile(numba, bound, options)


def _compile(numba: Any, fn: Callable, options: Dict[str, Any]) -> Callable:
    try:
        return numba.njit(cache=True, **options)(fn)
    except RuntimeError:  # no writable cache location: compile in every process instead
        return numba.njit(**options)(fn)


def _fingerprint(helpers: Iterable[Callable]) -> str:
    """``""``, or ``"_"`` + a short hash of the files that define ``helpers``."""
    files = sorted({inspect.getsourcefile(h) or "" for h in helpers})
    if not files:
        return ""
    digest = hashlib.sha256()
    for name in files:
        with open(name, "rb") as f:
            digest.update(f.read())
    return "_" + digest.hexdigest()[:12]
