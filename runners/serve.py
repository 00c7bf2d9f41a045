"""The ``serve`` command: a run's model and index loaded once, answering a JSON search
API over HTTP (``runners.serve_app``, FastAPI on uvicorn; the optional ``serve``
extra). The search itself is ``runners.retrieval.search``.

``python main.py serve --run-dir RUN [--index DIR] [--host 127.0.0.1] [--port 8000]``
"""
from __future__ import annotations

import argparse

from runners.search_cli import add_clip_arguments
from utils.errors import UserError


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", metavar="DIR",
                        help="the run whose hash model encodes the queries (default: the run the index was built from)")
    parser.add_argument("--index", metavar="DIR",
                        help="index folder written by 'python main.py index' (default: RUN/index)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes the "
                             "service to the network, with no authentication)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    parser.add_argument("--max-batch", type=int, default=256, metavar="N",
                        help="most queries in one request (default 256); larger batches get HTTP 413")
    parser.add_argument("--max-k", type=int, default=1000, metavar="K", help="largest k a request may ask (default 1000)")
    add_clip_arguments(parser.add_argument_group(
        "raw captions / images (without a feature cache, only feature requests are served)"))
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="FAISS and torch threads per request (default 1: concurrent requests are the "
                             "parallelism; more threads per request oversubscribe the cores)")


def set_search_threads(n: int) -> None:
    """FAISS (OpenMP) and torch intra-op threads of this process: the serving process's
    own setting, made once at start-up by the command."""
    import torch

    from common.binary_index import faiss_module

    faiss_module().omp_set_num_threads(n)
    torch.set_num_threads(n)


def run_serve(args: argparse.Namespace) -> int:
    for flag, value in (("--port", args.port), ("--max-batch", args.max_batch), ("--max-k", args.max_k),
                        ("--threads", args.threads)):
        if value < 1 or (flag == "--port" and value > 65535):
            raise UserError(f"{flag}: must be {'1..65535' if flag == '--port' else '>= 1'}, got {value}")
    try:
        import uvicorn

        from runners.serve_app import build_app
    except ImportError as exc:
        raise UserError(f"serve needs FastAPI and uvicorn ({exc.name} is missing): pip install 'ccmh[serve]'") from None
    from runners.query_inputs import ClipQueryEncoder
    from runners.retrieval import open_target

    set_search_threads(args.threads)
    target = open_target(args.run_dir, args.index)
    cache = args.cache or target.feature_cache()
    encoder = ClipQueryEncoder.load(cache, args.pretrained, args.model_config, args.device) if cache else None
    app = build_app(target, encoder, max_batch=args.max_batch, max_k=args.max_k)
    info = target.info()
    print(f"serving {info['method']} after task {info['after_task']}: {info['kind']} index of {info['count']:,} items "
          f"({target.folder.path}) on http://{args.host}:{args.port} (API docs: /docs; raw captions / images: "
          f"{'yes' if encoder else 'no, features only'})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
