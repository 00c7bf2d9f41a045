"""The HTTP layer of ``serve``: FastAPI routes that parse a request into a query batch,
call ``runners.retrieval.search`` and format the answer; nothing else.

``GET /health``, ``GET /info`` (method, code lengths and sizes per task),
``POST /search`` (a batch of features, captions or base64 images; modality, k, task
filter, per-call search parameters). A bad request gets a 4xx whose body is
``{"error": "<one line>"}``: 400 malformed JSON or an image that does not decode,
413 a batch or body over the limits, 422 anything else the request got wrong (wrong
dimension, k out of range, unknown task, bad field). OpenAPI docs at ``/docs``.
"""
import base64
import binascii
from typing import Any, Dict, List, Literal, Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from runners.query_inputs import ClipQueryEncoder, QueryFeatures, open_image
from runners.retrieval import SearchTarget, describe, search, search_params
from utils.errors import DataError, UserError

MAX_BODY_BYTES = 64 * 2**20


class SearchRequest(BaseModel):
    """A batch of queries of one modality: exactly one of ``features`` (Q rows of the
    model's input dimension), ``captions`` (text) or ``images`` (base64-encoded files)."""

    model_config = ConfigDict(extra="forbid")

    modality: Optional[Literal["image", "text"]] = Field(
        None, description="query modality: text queries search image codes, image queries text codes "
                          "(implied by captions / images)")
    features: Optional[List[List[float]]] = None
    captions: Optional[List[str]] = None
    images: Optional[List[str]] = Field(None, description="base64-encoded image files (PNG, JPEG, ...)")
    k: int = Field(10, description="results per query")
    task: Optional[int] = Field(None, description="1-based: encode as this task and search only its codes")
    agnostic: bool = Field(False, description="encode task-agnostic even with a task filter")
    stable_ties: bool = Field(False, description="flat index: ties in the evaluation's (task, position) order")
    nflip: Optional[int] = None
    nprobe: Optional[int] = None
    ef_search: Optional[int] = None


class HTTPProblem(Exception):
    """A request the service refuses: HTTP status and one line."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:300]


def _validation_reason(exc: RequestValidationError) -> tuple:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return 400, f"malformed JSON: {first.get('ctx', {}).get('error', first.get('msg', ''))}"
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return 422, f"{where}: {first.get('msg', 'invalid')}{more}"


def build_app(target: SearchTarget, encoder: Optional[ClipQueryEncoder] = None, max_batch: int = 256,
              max_k: int = 1000) -> FastAPI:
    """The FastAPI application serving ``target`` (raw captions / images only with an
    ``encoder``)."""
    app = FastAPI(title="ccmh search", description="Cross-modal Hamming search over a trained run's binary index.",
                  version="1")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        status, reason = _validation_reason(exc)
        return JSONResponse({"error": _one_line(reason)}, status_code=status)

    @app.exception_handler(HTTPProblem)
    async def _problem(request: Request, exc: HTTPProblem):
        return JSONResponse({"error": _one_line(exc.reason)}, status_code=exc.status)

    @app.middleware("http")
    async def _body_limit(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
            return JSONResponse({"error": f"request body of {size} bytes is over the {MAX_BODY_BYTES} byte limit"},
                                status_code=413)
        return await call_next(request)

    @app.get("/health")
    def health() -> Dict[str, Any]:
        return {"status": "ok"}

    @app.get("/info")
    def info() -> Dict[str, Any]:
        return {**target.info(), "limits": {"max_batch": max_batch, "max_k": max_k},
                "raw_queries": encoder is not None}

    @app.post("/search")
    def search_route(req: SearchRequest) -> Dict[str, Any]:
        queries = _queries(req, encoder, max_batch)
        if not 1 <= req.k <= max_k:
            raise HTTPProblem(422, f"k: must be 1..{max_k}, got {req.k}")
        try:
            result = search(target, queries, req.k, task=req.task, agnostic=req.agnostic,
                            params=search_params(req.nflip, req.nprobe, req.ef_search), stable_ties=req.stable_ties)
        except UserError as exc:
            raise HTTPProblem(422, str(exc)) from None
        answers = [describe(target, result, i, (queries.meta or [{}] * len(queries))[i]) for i in range(len(queries))]
        return {"modality": result.modality, "index": {"kind": result.kind, "modality": result.index_modality},
                "task": result.task, "encoded_as": result.encoded_as, "k": req.k,
                "queries": [a["query"] for a in answers], "results": [a["results"] for a in answers]}

    return app


def _queries(req: SearchRequest, encoder: Optional[ClipQueryEncoder], max_batch: int) -> QueryFeatures:
    """The request's query batch, checked for size, shape and modality."""
    given = [name for name in ("features", "captions", "images") if getattr(req, name) is not None]
    if len(given) != 1:
        raise HTTPProblem(422, "give exactly one of features, captions, images")
    name = given[0]
    items = getattr(req, name)
    if not items:
        raise HTTPProblem(422, f"{name}: empty batch")
    if len(items) > max_batch:
        raise HTTPProblem(413, f"{name}: {len(items)} queries, over this service's batch limit of {max_batch}")
    implied = {"captions": "text", "images": "image"}.get(name)
    if implied and req.modality and req.modality != implied:
        raise HTTPProblem(422, f"modality {req.modality} contradicts {name} (a {implied} query)")
    modality = req.modality or implied
    if name == "features":
        if modality is None:
            raise HTTPProblem(422, "modality: required with features (image or text)")
        widths = {len(row) for row in items}
        if len(widths) != 1:
            raise HTTPProblem(422, f"features: rows of different lengths ({', '.join(map(str, sorted(widths)))})")
        feats = np.asarray(items, dtype=np.float32)
        return QueryFeatures(modality, feats, None, [{"source": "request", "row": i} for i in range(len(items))])
    if encoder is None:
        raise HTTPProblem(422, f"{name}: this service encodes features only (start it with --cache FILE.h5 for "
                               f"captions and images)")
    if name == "captions":
        return encoder.captions(items)
    pictures = []
    for i, data in enumerate(items):
        try:
            raw = base64.b64decode(data, validate=True)
            pictures.append(open_image(raw, f"images[{i}]"))
        except (binascii.Error, ValueError):
            raise HTTPProblem(400, f"images[{i}]: not valid base64") from None
        except DataError as exc:
            raise HTTPProblem(400, str(exc)) from None
    return encoder.images(pictures, [f"images[{i}]" for i in range(len(items))])
