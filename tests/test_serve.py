"""Search as a batched library call, the batch ``search`` command against ``evaluate``,
and the ``serve`` HTTP service queried by a real client on loopback."""
import base64
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx  # the [serve] extra's test client, also in [dev]: CI runs these tests
import numpy as np
import pytest

import main
from runners.query_inputs import QueryFeatures
from runners.retrieval import encode_queries, open_target, search

ROOT = Path(main.__file__).parent


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The bundled demo stream (5 tasks of two digits), DSPH trained one epoch per task,
    with an exact (flat) index."""
    root = tmp_path_factory.mktemp("serve")
    run = root / "run"
    assert main.main(["--config-file", "configs/DSPH/demo.yaml", "--output-dir", str(run), "--quiet",
                      "--set", "runner.epochs=1", "runner.device=cpu", "runner.tensorboard=false"]) == 0
    assert main.main(["index", "--run-dir", str(run)]) == 0
    return run


def _stream(target):
    from runners.config import build

    return build("dataset", target.run.config).load()


def _stable_ranking(target, codes, task, stored_modality, k):
    """(position, distance) of the evaluation's order: Hamming distance, ties by database
    index, over task ``task``'s (store key) codes only."""
    db = target.run.store.get(task).codes(stored_modality).numpy().astype(np.int64)
    dist = (codes[:, None, :].astype(np.int64) != db[None]).sum(-1)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(dist, order, 1)


def test_batch_search_with_task_reproduces_evaluate(demo_run, tmp_path, capsys):
    """`search --from-dataset --task T` over every query of every task: the same
    ranking as the evaluation (exact index, stable ties) and so its task-known P@10."""
    assert main.main(["evaluate", "--run-dir", str(demo_run), "--precision-at", "10",
                      "--output", str(tmp_path / "eval.json")]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    target = open_target(demo_run)
    stream = _stream(target)
    # every task's text queries, and the image queries of the first and last task
    for direction, modality, stored, tasks in (("t2i", "text", "image", range(1, 6)), ("i2t", "image", "text", (1, 5))):
        for t in tasks:
            out = tmp_path / f"{direction}_{t}.jsonl"
            assert main.main(["search", "--run-dir", str(demo_run), "--query-modality", modality, "--from-dataset",
                              "--task", str(t), "--stable-ties", "--k", "10", "--output", str(out)]) == 0
            printed = capsys.readouterr().out
            answers = [json.loads(line) for line in out.read_text().splitlines()]
            query = stream.tasks[t - 1].query
            assert len(answers) == len(query)
            feats = (query.image if modality == "image" else query.text).numpy()
            codes = encode_queries(target.run.model, QueryFeatures(modality, feats), t - 1)
            order, dist = _stable_ranking(target, codes, t - 1, stored, 10)
            got = np.array([[r["position"] for r in a["results"]] for a in answers])
            np.testing.assert_array_equal(got, order)
            np.testing.assert_array_equal([[r["distance"] for r in a["results"]] for a in answers], dist)
            assert {r["task"] for a in answers for r in a["results"]} == {t}
            p10 = np.mean([sum(r["relevant"] for r in a["results"]) / 10 for a in answers])
            expected = report["per_task"][t - 1][direction]["precision_at"]["10"]
            assert p10 == pytest.approx(expected, abs=1e-12)
            assert f"precision@10 {expected:.4f}" in printed
            # label names of the demo (digits) for the query and every hit
            assert answers[0]["query"]["labels"] and all(isinstance(x, str) for x in answers[0]["query"]["labels"])
    # the task filter matters: task-agnostic over every task scores lower than task-known
    assert main.main(["search", "--run-dir", str(demo_run), "--query-modality", "text", "--from-dataset",
                      "--task", "3", "--agnostic", "--k", "10", "--output", str(tmp_path / "a.csv")]) == 0
    assert (tmp_path / "a.csv").read_text().splitlines()[0].startswith("query,query_source")


def test_library_search_is_batch_independent_and_refuses_bad_queries(demo_run):
    target = open_target(demo_run, catalog=False)
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((7, 76)).astype(np.float32)
    batch = search(target, QueryFeatures("text", feats), 15, task=2, stable_ties=True)
    assert batch.hits.distance.shape == (7, 15) and batch.codes.shape == (7, 16)
    for i in range(7):
        one = search(target, QueryFeatures("text", feats[i : i + 1]), 15, task=2, stable_ties=True)
        np.testing.assert_array_equal(one.hits.position[0], batch.hits.position[i])
        np.testing.assert_array_equal(one.hits.distance[0], batch.hits.distance[i])
    from utils.errors import UserError

    bad = feats.copy()
    bad[3, 5] = np.nan
    with pytest.raises(UserError, match=r"query row\(s\) 3 hold NaN"):
        search(target, QueryFeatures("text", bad), 5)
    with pytest.raises(UserError, match="expects 76 for text"):
        search(target, QueryFeatures("text", feats[:, :10]), 5)
    with pytest.raises(UserError, match="task 6: not a task"):
        search(target, QueryFeatures("text", feats), 5, task=6)


def test_search_cli_messages(demo_run, tmp_path, capsys):
    np.save(tmp_path / "nan.npy", np.full((2, 76), np.nan, np.float32))
    code = main.main(["search", "--run-dir", str(demo_run), "--query-modality", "text", "--queries",
                      str(tmp_path / "nan.npy")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "NaN" in err and len(err.splitlines()) == 1
    code = main.main(["search", "--run-dir", str(demo_run), "--query-modality", "text", "--feature-file",
                      str(tmp_path / "nan.npy"), "--row", "0", "--task", "7"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: --task 7: not a task")
    # errors name the flags, not the library's parameter names
    for args, flag in ((["evaluate", "--topk", "0"], "--topk"), (["evaluate", "--precision-at", "10", "0"], "--precision-at"),
                       (["search", "--query-modality", "text", "--queries", str(tmp_path / "nan.npy"), "--k", "0"], "--k"),
                       (["search", "--query-modality", "text", "--queries", str(tmp_path / "nan.npy"), "--nprobe", "3"],
                        "--nprobe 3: nprobe is not a search parameter of a flat index")):
        assert main.main([args[0], "--run-dir", str(demo_run), *args[1:]]) == 2
        assert capsys.readouterr().err.startswith(f"error: {flag}")
    # a flat index returns fewer than k only when the task holds fewer items, and says so
    np.save(tmp_path / "q.npy", np.zeros((1, 76), np.float32))
    assert main.main(["search", "--run-dir", str(demo_run), "--query-modality", "text", "--feature-file",
                      str(tmp_path / "q.npy"), "--row", "0", "--task", "1", "--k", "400"]) == 0
    out = capsys.readouterr().out
    assert "(360 of 400 results: task 1 holds no more items)" in out and "probe radius" not in out


# ---------------------------------------------------------------------- over HTTP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(demo_run):
    """``main.py serve`` in a subprocess on a free loopback port; (base URL, process)."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "main.py", "serve", "--run-dir", str(demo_run), "--host", "127.0.0.1", "--port", str(port),
         "--max-batch", "64"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            pytest.fail(f"serve exited with {proc.returncode}: {proc.stdout.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("serve did not answer /health within 120 s")
        time.sleep(0.5)
    yield url, proc
    proc.terminate()
    proc.wait(timeout=30)


def test_service_answers_like_the_library_and_the_evaluation(service, demo_run):
    url, _ = service
    info = httpx.get(f"{url}/info").json()
    assert info["method"] == "DSPH" and info["kind"] == "flat" and info["count"] == 1800
    assert [x["count"] for x in info["indexes"]["image"]["tasks"]] == [360] * 5
    assert info["label_names"] == [str(d) for d in range(10)]
    target = open_target(demo_run)
    query = _stream(target).tasks[1].query
    feats = query.text.numpy()[:20]
    r = httpx.post(f"{url}/search", json={"modality": "text", "features": feats.tolist(), "k": 10, "task": 2,
                                          "stable_ties": True}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    lib = search(target, QueryFeatures("text", feats), 10, task=2, stable_ties=True)
    np.testing.assert_array_equal([[h["position"] for h in row] for row in body["results"]], lib.hits.position)
    np.testing.assert_array_equal([[h["distance"] for h in row] for row in body["results"]], lib.hits.distance)
    order, _ = _stable_ranking(target, lib.codes, 1, "image", 10)
    np.testing.assert_array_equal(lib.hits.position, order)  # the evaluation's ranking
    assert body["encoded_as"] == 2 and {h["task"] for row in body["results"] for h in row} == {2}
    assert body["queries"][0]["code"] == "".join("1" if b > 0 else "0" for b in lib.codes[0])
    assert body["results"][0][0]["labels"] and isinstance(body["results"][0][0]["labels"][0], str)


def test_bad_requests_get_a_4xx_and_the_service_keeps_answering(service):
    url, proc = service
    good = {"modality": "image", "features": [[0.5] * 240], "k": 3}
    reference = httpx.post(f"{url}/search", json=good).json()
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n not really a png").decode()
    bad = [
        (b'{"modality": "text", "features": [[1, 2]', 400, "malformed JSON"),
        ({"modality": "text", "features": [[0.1] * 75], "k": 3}, 422, "expects 76 for text"),
        ({"modality": "text", "features": [[0.1] * 76], "k": 0}, 422, "k: must be 1..1000"),
        ({"modality": "text", "features": [[0.1] * 76], "k": -5}, 422, "k: must be"),
        ({"modality": "text", "features": [[0.1] * 76], "task": 9}, 422, "task 9: not a task"),
        ({"modality": "text", "features": [[0.1] * 76] * 65}, 413, "batch limit of 64"),
        ({"modality": "image", "images": [png]}, 422, "features only"),
        ({"modality": "text", "features": [[0.1] * 76, [0.1] * 70]}, 422, "different lengths"),
        ({"modality": "sound", "features": [[0.1]]}, 422, "modality"),
        ({"modality": "text", "features": [[0.1] * 76], "nprobe": 4}, 422, "nprobe is not a search parameter"),
        ({"modality": "text"}, 422, "exactly one of"),
        ({"modality": "text", "features": [["x"] * 76]}, 422, "features"),
        (b'{"modality": "text", "features": [[NaN' + b", 0.1" * 75 + b"]]}", 422, "NaN"),
        ({"modality": "text", "features": [[0.1] * 76], "colour": "red"}, 422, "colour"),
    ]
    for payload, status, reason in bad:
        if isinstance(payload, bytes):
            r = httpx.post(f"{url}/search", content=payload, headers={"content-type": "application/json"})
        else:
            r = httpx.post(f"{url}/search", json=payload)
        assert r.status_code == status, (payload if not isinstance(payload, bytes) else payload[:40], r.text)
        error = r.json()["error"]
        assert reason in error and "\n" not in error, error
    assert proc.poll() is None
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert httpx.post(f"{url}/search", json=good).json() == reference


def test_service_decodes_images_and_refuses_broken_ones(demo_run, tmp_path):
    """With a CLIP encoder, an image that does not decode is a 400; a real one is searched
    like the same features through the library (in process, FastAPI's test client is
    not used: httpx over an ASGI transport is the same HTTP handling)."""
    import asyncio
    import io

    from PIL import Image

    from runners.serve_app import build_app

    class FixedEncoder:
        """Stands in for CLIP: a fixed projection of the image's pixels to the model's
        image dimension, so the route's decode-then-search path is checked exactly."""

        def images(self, images, names):
            arr = np.stack([np.asarray(im.resize((16, 15)), np.float32).mean(-1).reshape(-1) / 255 for im in images])
            return QueryFeatures("image", arr, None, [{"source": n} for n in names])

    target = open_target(demo_run, catalog=False)
    app = build_app(target, FixedEncoder())
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buf, format="PNG")
    good = base64.b64encode(buf.getvalue()).decode()

    async def calls():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            ok = await client.post("/search", json={"images": [good], "k": 4})
            broken = await client.post("/search", json={"images": [base64.b64encode(b"GIF89a garbage").decode()]})
            not_b64 = await client.post("/search", json={"images": ["%%%"]})
            return ok, broken, not_b64

    ok, broken, not_b64 = asyncio.run(calls())
    assert ok.status_code == 200, ok.text
    feats = FixedEncoder().images([Image.open(io.BytesIO(buf.getvalue())).convert("RGB")], ["x"]).features
    lib = search(target, QueryFeatures("image", feats), 4)
    assert [h["distance"] for h in ok.json()["results"][0]] == lib.hits.distance[0].tolist()
    assert broken.status_code == 400 and "cannot decode the image" in broken.json()["error"]
    assert not_b64.status_code == 400 and "base64" in not_b64.json()["error"]
