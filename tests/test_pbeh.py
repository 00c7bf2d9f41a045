"""PBEH: shapes, prompt pools, batch independence, frozen old prompts, the exact
extension test, bit growth at the end of the last layer, the prompt-hash anchor,
checkpoint round trip, determinism and learning on structured data."""
from __future__ import annotations

import math

import pytest
import torch

import models  # noqa: F401  (registers the models)
from common.code_store import CodeStore
from common.register import MODELS
from models import losses as L
from models.base import Batch, sign_codes
from models.pbeh import PBEH, count_far_from_centre, majority_centre
from models.prompts import PromptCrossAttention, top_prompts
from utils.config import check_kwargs
from utils.errors import ConfigError
from hash_model_checks import finish_task, run_task_sequence, task_steps

from conftest import CONTINUAL_STREAM

IMAGE_DIM, TEXT_DIM, CLASSES = CONTINUAL_STREAM["image_dim"], CONTINUAL_STREAM["text_dim"], CONTINUAL_STREAM["num_classes"]
SMALL = dict(bits=8, width=16, hidden=32, heads=2, prompt_divisor=20)


def build(**kw) -> PBEH:
    return MODELS.get("PBEH")(image_dim=IMAGE_DIM, text_dim=TEXT_DIM, num_classes=CLASSES, **{**SMALL, **kw})


def train_task(model, task, t, steps=10, **kw):
    return task_steps(model, task, t, steps, **kw)


def run_tasks(stream, n, seed=0, **kw):
    return run_task_sequence(build, stream, n, steps=10, seed=seed, **kw)


# ---------------------------------------------------------------------- the extension test
def brute_far(codes: torch.Tensor) -> int:
    """Reference: majority per bit by counting, distances by a Python loop."""
    n, k = codes.shape
    centre = [1 if sum(int(codes[i, j] > 0) for i in range(n)) * 2 >= n else -1 for j in range(k)]
    return sum(1 for i in range(n) if 2 * sum(int(codes[i, j]) != centre[j] for j in range(k)) > k)


def store_with(codes_by_task):
    store = CodeStore()
    for t, (img, txt) in enumerate(codes_by_task):
        store.add(t, img, txt, torch.zeros(img.shape[0], 2))
    return store


def test_majority_centre_and_far_count_are_exact():
    gen = torch.Generator().manual_seed(0)
    for n, k in ((7, 8), (10, 9), (1, 4), (6, 16)):
        codes = (torch.randint(0, 2, (n, k), generator=gen) * 2 - 1).to(torch.int8)
        assert count_far_from_centre(codes) == brute_far(codes)
    ties = torch.tensor([[1, -1], [-1, 1]], dtype=torch.int8)
    assert majority_centre(ties).tolist() == [1, 1]  # a tied bit counts as +1


def test_extension_fires_only_when_codes_spread():
    k = 8
    centre = torch.ones(k, dtype=torch.int8)
    near = centre.repeat(20, 1)
    near[::4, 0] = -1  # one flipped bit: 1 <= K/2, never far
    spread = near.clone()
    spread[:6, :5] = -1  # 6 of 20 codes at distance 5 > K/2
    model = build(extend_threshold=0.1, extend_bits=2)
    assert count_far_from_centre(spread) == 6
    assert not model.decide_extension(store_with([(near, near)]), 0)
    assert model.decide_extension(store_with([(near, spread)]), 1)  # one modality is enough
    # the test reads only the codes of the newest length
    long_near = torch.ones(20, k + 2, dtype=torch.int8)
    assert not model.decide_extension(store_with([(spread, spread), (long_near, long_near)]), 2)
    assert [r["extend"] for r in model.extension_tests] == [False, True, False]
    assert model.extension_tests[1]["far_text"] == 6 and model.extension_tests[1]["far_image"] == 0
    # threshold 0 extends after every task; extend_bits 0 never extends
    assert build(extend_threshold=0.0).decide_extension(store_with([(near, near)]), 0)
    assert not build(extend_threshold=0.0, extend_bits=0).decide_extension(store_with([(spread, spread)]), 0)


def test_extension_appends_bits_at_the_end_and_keeps_old_prefixes(stream):
    torch.manual_seed(0)
    model = build(extend_threshold=0.0, extend_bits=3)
    store = CodeStore()
    train_task(model, stream.tasks[0], 0)
    finish_task(model, stream.tasks[0], 0, store)
    assert model.pending_extension and model.bits == 8
    old_last = {m: (getattr(model, m).last.weight.clone(), getattr(model, m).last.bias.clone())
                for m in ("image_net", "text_net")}
    q = stream.tasks[0].query
    with torch.no_grad():
        before = (model.encode_image(q.image, 0), model.encode_text(q.text, 0))
    torch.manual_seed(1)
    model.begin_task(stream.tasks[1], 1)
    assert model.bits == 11 and model.bit_history == [8, 11]
    for m, (w, b) in old_last.items():
        last = getattr(model, m).last
        assert last.out_features == 11
        assert torch.equal(last.weight[:8], w) and torch.equal(last.bias[:8], b)
        assert not torch.equal(last.weight[8:], torch.zeros_like(last.weight[8:]))  # new rows initialised
    with torch.no_grad():
        after = (model.encode_image(q.image, 0), model.encode_text(q.text, 0))
    for b, a in zip(before, after):
        assert a.shape == (len(q), 11)
        assert torch.equal(sign_codes(a[:, :8]), sign_codes(b))  # old bits keep their meaning


def test_anchor_keeps_old_prompt_codes(stream):
    """Training a later task with the prompt-hash anchor moves the old prompts' codes
    (their first K_k bits) less than training without it."""
    drift = {}
    for weight in (0.0, 5.0):
        torch.manual_seed(0)
        model = build(anchor_weight=weight, extend_threshold=0.0, extend_bits=2)
        store = CodeStore()
        train_task(model, stream.tasks[0], 0, steps=15)
        finish_task(model, stream.tasks[0], 0, store)
        saved = model.anchor_0.clone()
        history = train_task(model, stream.tasks[1], 1, steps=40, lr=1e-2)
        assert ("anchor" in history[-1]) and model.bits == 10
        with torch.no_grad():
            now = torch.nn.functional.normalize(model.prompt_logits(0)[:, :8], dim=1)
        drift[weight] = float(L.anchor_l1(now, saved))
        flips = int((torch.sign(now) != torch.sign(saved)).sum())
        drift[(weight, "flips")] = flips
    assert drift[5.0] < 0.5 * drift[0.0]
    assert drift[(5.0, "flips")] <= drift[(0.0, "flips")]


# ---------------------------------------------------------------------- the model
def test_shapes_and_prompt_pools(stream):
    model, _ = run_tasks(stream, 2, extend_threshold=0.0, extend_bits=1)
    # one prompt per 20 train pairs, counted before the validation carve (the public code's whole train file)
    whole = [len(t.train) + len(t.val) for t in stream.tasks[:2]]
    assert all(t.val for t in stream.tasks[:2]) and math.ceil(whole[0] / 20) > math.ceil(len(stream.tasks[0].train) / 20)
    assert model.prompts.sizes() == [math.ceil(n / 20) for n in whole]
    assert model.bits == 9 and model.pending_extension
    q = stream.tasks[1].query
    with torch.no_grad():
        for t in (0, 1, None):
            assert model.encode_image(q.image, t).shape == (len(q), 9)
            assert model.encode_text(q.text, t).shape == (len(q), 9)
    history = train_task(model, stream.tasks[2], 2, steps=1)
    assert set(history[0]) == {"cosine", "similarity", "quant", "contrastive", "distill", "anchor", "loss"}
    assert model.bits == 10


def test_old_queries_use_their_own_prompt_pool(stream):
    model, _ = run_tasks(stream, 2)
    q = stream.tasks[0].query
    with torch.no_grad():
        own = model.encode_image(q.image, 0)
        newest = model.encode_image(q.image, 1)
        pool = model.prompts[0]
        x = model.image_in(q.image)
        manual = model.image_net(model._enhance(x, pool, model.image_attn))
    assert torch.equal(own, manual)
    assert not torch.equal(own, newest)


def test_old_prompts_frozen(stream):
    torch.manual_seed(0)
    model = build()
    store = CodeStore()
    train_task(model, stream.tasks[0], 0)
    finish_task(model, stream.tasks[0], 0, store)
    old = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("prompts.prompts.0", "image_in", "text_in"))}
    assert len(old) == 5
    net_before = model.image_net.body[0].weight.clone()
    train_task(model, stream.tasks[1], 1, lr=1e-2)
    state = model.state_dict()
    for k, v in old.items():
        assert torch.equal(state[k], v), k
    assert not torch.equal(model.image_net.body[0].weight, net_before)  # the shared nets did train
    trainable = {id(p) for g in model.param_groups(1) for p in g["params"]}
    assert id(model.prompts[0]) not in trainable and id(model.prompts[1]) in trainable
    groups = {g["name"]: g for g in model.param_groups(1)}
    assert groups["nets"]["lr_scale"] == 0.1 and groups["prompt"]["lr_scale"] == 1.0


def test_loss_decreases_on_structured_data(stream):
    torch.manual_seed(0)
    model = build()
    history = train_task(model, stream.tasks[0], 0, steps=40, lr=3e-3)
    first = sum(h["loss"] for h in history[:5]) / 5
    last = sum(h["loss"] for h in history[-5:]) / 5
    assert last < 0.8 * first


def test_bad_config_refused():
    with pytest.raises(ConfigError, match="model.width"):
        build(width=15, heads=2)
    with pytest.raises(ConfigError, match="extend_threshold"):
        build(extend_threshold=-0.1)
    with pytest.raises(ConfigError, match="extend_bits"):
        check_kwargs(PBEH, {"extend_bits": 1.5}, "model", skip=("image_dim", "text_dim", "num_classes"))
    with pytest.raises(ValueError, match="expected task index 0"):
        build().begin_task(None, 2)


def test_supervised_contrastive_prefers_label_structure():
    torch.manual_seed(0)
    labels = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]])
    good = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1], [1.0, -0.1], [-1.0, 0.1], [-1.0, -0.1]]), dim=1)
    bad = good[[0, 2, 1, 3]]
    assert L.supervised_contrastive_loss(good, labels, 0.1) < L.supervised_contrastive_loss(bad, labels, 0.1)
    target = L.sigmoid_label_similarity(labels, labels, 16.0)
    assert torch.allclose(target.diagonal(), torch.full((4,), 2 * torch.sigmoid(torch.tensor(1 / 16)) - 1))
    assert float(target[0, 2]) == 0.0


# ---------------------------------------------------------------------- attention over the pool
def test_pooled_attention_against_brute_force():
    """Sample i attends over pool rows index[i] only: the same as nn.MultiheadAttention
    fed exactly those rows."""
    torch.manual_seed(0)
    attn = PromptCrossAttention(6, heads=2).eval()
    x, pool = torch.randn(5, 6), torch.randn(7, 6)
    index = top_prompts(x, pool, 3)
    sims = torch.nn.functional.cosine_similarity(x[:, None], pool[None], dim=2)
    for i in range(5):  # the 3 nearest rows by cosine, nearest first
        assert index[i].tolist() == sorted(range(7), key=lambda j: -float(sims[i, j]))[:3]
    assert top_prompts(x, pool, None).tolist() == [list(range(7))] * 5
    with torch.no_grad():
        ref = torch.stack([attn.attn(x[i:i + 1][None], pool[index[i]][None], pool[index[i]][None])[0][0, 0]
                           for i in range(5)])
        assert torch.allclose(attn(x, pool, index), ref, atol=1e-6)
    with pytest.raises(ValueError, match="token pool"):
        attn(x, torch.randn(2, 7, 6), index)


def test_attention_gradients_are_reproducible_on_two_threads():
    """The backward of the pool read sums each row's gradient in a fixed order: the same
    inputs give bit-identical gradients every time on two torch threads (advanced indexing
    ``k[index]`` did not: its accumulating backward changed from call to call), and on one
    thread the same gradients as ``k[index]``."""
    torch.manual_seed(0)
    attn = PromptCrossAttention(256, heads=8)
    x, pool = torch.randn(64, 256), torch.randn(40, 256, requires_grad=True)
    index = top_prompts(x, pool, 5)
    upstream = torch.randn(64, 256)

    def grads():
        attn.zero_grad(set_to_none=True)
        pool.grad = None
        (attn(x, pool, index) * upstream).sum().backward()
        return [pool.grad.clone(), attn.attn.in_proj_weight.grad.clone()]

    torch.set_num_threads(2)  # the autouse fixture puts back one thread afterwards
    first = grads()
    for _ in range(10):
        assert all(torch.equal(a, b) for a, b in zip(first, grads()))
    torch.set_num_threads(1)
    mine = grads()
    attn.zero_grad(set_to_none=True)
    pool.grad = None
    D = 256
    w_q, w_kv = attn.attn.in_proj_weight.split([D, 2 * D])
    b_q, b_kv = attn.attn.in_proj_bias.split([D, 2 * D])
    q = torch.nn.functional.linear(x, w_q, b_q).view(64, 8, 1, D // 8)
    k, v = torch.nn.functional.linear(pool, w_kv, b_kv).chunk(2, dim=-1)
    k, v = (t[index].view(64, 5, 8, D // 8).transpose(1, 2) for t in (k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    (attn.attn.out_proj(out.reshape(64, D)) * upstream).sum().backward()
    assert torch.equal(mine[0], pool.grad) and torch.equal(mine[1], attn.attn.in_proj_weight.grad)


def test_attention_reads_the_sample_and_trains_queries_and_keys(stream):
    """Over several prompts the attention output depends on x and W_q / W_k get a
    gradient; the single-prompt form of the paper (prompt_top_k 1) gives neither."""
    task = stream.tasks[0]
    grads = {}
    for k in (None, 1):
        torch.manual_seed(0)
        model = build(prompt_top_k=k)
        model.begin_task(task, 0)
        pool = model.prompts[0]
        assert pool.shape[0] > 1
        x = model.image_in(task.train.image[:16])
        e = model._enhance(x, pool, model.image_attn)[:, model.width:]
        w_q = model.image_attn.attn.in_proj_weight
        (g,) = torch.autograd.grad(e.square().sum(), [w_q])
        grads[k] = float(g[: model.width].abs().sum()), float(g[model.width: 2 * model.width].abs().sum())
        if k == 1:  # one key: the output is a function of the chosen prompt alone
            chosen = top_prompts(x, pool, 1)[:, 0]
            same = chosen == chosen[0]
            assert torch.allclose(e[same], e[same][:1].expand(int(same.sum()), -1), atol=1e-6)
        else:
            assert not torch.allclose(e[0], e[1], atol=1e-4)
    assert grads[None][0] > 0 and grads[None][1] > 0
    # one key: zero up to rounding of the one-entry softmax
    assert grads[1][0] < 1e-4 * grads[None][0] and grads[1][1] < 1e-4 * grads[None][1]


def test_supervised_contrastive_against_brute_force():
    """Both anchor conventions against a loop over anchors: Khosla et al. (anchor in
    neither positives nor denominator) and the public code's (anchor in both)."""
    torch.manual_seed(1)
    codes = torch.nn.functional.normalize(torch.randn(6, 5), dim=1)
    labels = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 1, 0], [0, 0, 1], [0, 0, 0]])
    tau = 0.3

    def reference(include_self):
        terms = []
        for i in range(6):
            others = [j for j in range(6) if include_self or j != i]
            pos = [j for j in others if j == i or int((labels[i] * labels[j]).sum()) > 0]
            if not pos:
                continue
            denom = math.log(sum(math.exp(float(codes[i] @ codes[j]) / tau) for j in others))
            terms.append(-sum(float(codes[i] @ codes[j]) / tau - denom for j in pos) / len(pos))
        return sum(terms) / len(terms)

    for include_self in (False, True):
        got = float(L.supervised_contrastive_loss(codes, labels, tau, include_self))
        assert got == pytest.approx(reference(include_self), rel=1e-5)


def test_match_term_pulls_prompts_to_their_task_and_infers_it(stream):
    """With the matching term the nearest prompt of an unseen query belongs to its own
    task far more often than chance and than without it; infer_tasks is the choice
    task-agnostic encoding makes."""
    def accuracy(match_weight):
        torch.manual_seed(0)
        model = build(match_weight=match_weight, prompt_lr_scale=10.0)
        store = CodeStore()
        for t in range(3):
            train_task(model, stream.tasks[t], t, steps=40, lr=1e-2)
            finish_task(model, stream.tasks[t], t, store)
        with torch.no_grad():
            hits = [float((model.infer_tasks(getattr(task.query, m), m) == t).float().mean())
                    for t, task in enumerate(stream.tasks[:3]) for m in ("image", "text")]
        return model, sum(hits) / len(hits)

    model, matched = accuracy(5.0)
    _, unmatched = accuracy(0.0)
    assert matched > 0.6 and matched > unmatched + 0.2  # chance: 1/3
    with torch.no_grad():  # task-agnostic codes are the task-known codes of the inferred task
        q = stream.tasks[1].query
        chosen = model.infer_tasks(q.image, "image")
        agnostic = model.encode_image(q.image, None)
        for k in chosen.unique().tolist():
            rows = chosen == k
            assert torch.allclose(agnostic[rows], model.encode_image(q.image[rows], k), atol=1e-6)


def test_lwf_term_holds_old_task_codes_and_stays_out_of_the_checkpoint(stream):
    """``lwf_weight``: zero on the first step of a new task (the frozen copy is the model
    as the task began), then it keeps the codes of old-task queries under their own pool
    closer to where they were than training without it; the copy is not a parameter,
    not in the state dict, and is taken again by ``begin_task`` (so a resumed run has it)."""
    q = stream.tasks[0].query
    drift = {}
    for weight in (0.0, 50.0):
        torch.manual_seed(0)
        model = build(lwf_weight=weight, anchor_weight=0.0)
        store = CodeStore()
        train_task(model, stream.tasks[0], 0, steps=15)
        finish_task(model, stream.tasks[0], 0, store)
        with torch.no_grad():
            before = model.encode_image(q.image, 0).clone()
        history = train_task(model, stream.tasks[1], 1, steps=40, lr=1e-2)
        if weight:
            assert history[0]["lwf"] == 0.0 and history[-1]["lwf"] > 0.0
            assert len(model._previous) == 1
            assert not any(k.startswith("_previous") for k in model.state_dict())
        else:
            assert "lwf" not in history[-1] and model._previous == []
        with torch.no_grad():
            drift[weight] = float((model.encode_image(q.image, 0) - before).pow(2).sum(1).mean())
        drift[(weight, "params")] = sum(p.numel() for p in model.parameters())
    assert drift[50.0] < 0.5 * drift[0.0]
    assert drift[(50.0, "params")] == drift[(0.0, "params")]  # the copy adds no parameter
    with pytest.raises(ConfigError, match="model.lwf_weight"):
        build(lwf_weight=-1.0)


def test_lwf_targets_come_from_one_pass_over_the_train_split(stream):
    """The frozen copy's outputs are read from a per-task table for runner batches; the
    term equals the per-batch teacher's (a hand-built batch of the same rows) up to float
    rounding, with and without the table, on the second and third tasks."""
    torch.manual_seed(0)
    model, store = build(lwf_weight=10.0), CodeStore()
    for t in range(3):
        task = stream.tasks[t]
        train_task(model, task, t, steps=5)
        if t:
            idx = torch.arange(0, len(task.train), 3)
            runner_batch = Batch.rows(task.train, idx)
            hand_built = Batch(image=runner_batch.image, text=runner_batch.text, labels=runner_batch.labels,
                               index=idx)
            cached = model.loss(runner_batch, t)["lwf"]
            direct = model.loss(hand_built, t)["lwf"]
            assert cached.item() > 0
            torch.testing.assert_close(cached, direct)
            assert len(model._lwf_targets._table) == 2 * t  # image and text under each earlier pool
        finish_task(model, task, t, store)


def test_resume_with_the_lwf_term_equals_uninterrupted(tmp_path, monkeypatch):
    """The frozen copy is not checkpointed: a run interrupted in its second task and
    resumed takes it again in ``begin_task`` and ends with the uninterrupted numbers."""
    from conftest import tiny_config
    from runners import continual
    from runners.experiment import run_config

    cfg = tiny_config("PBEH")
    cfg["model"]["lwf_weight"] = 10.0
    whole = run_config(cfg, tmp_path / "whole", quiet=True)
    assert "lwf" in whole.val[1]["history"][0]
    real = continual.ContinualRunner._evaluate_after

    def interrupt_in_task_2(self, model, tasks, t, *args):
        if t == 1:
            raise KeyboardInterrupt
        return real(self, model, tasks, t, *args)

    monkeypatch.setattr(continual.ContinualRunner, "_evaluate_after", interrupt_in_task_2)
    with pytest.raises(KeyboardInterrupt):
        run_config(cfg, tmp_path / "resumed", quiet=True)
    monkeypatch.setattr(continual.ContinualRunner, "_evaluate_after", real)
    resumed = run_config(cfg, tmp_path / "resumed", resume=True, quiet=True)
    assert resumed.map == whole.map and resumed.summary == whole.summary
