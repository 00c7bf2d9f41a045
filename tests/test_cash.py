"""CASH: shapes, batch independence, frozen old prompts / heads, task inference,
checkpoint round trip, determinism and learning on structured data."""
from __future__ import annotations


import pytest
import torch

import models  # noqa: F401  (registers the models)
from common.code_store import CodeStore
from common.register import MODELS
from models import losses as L
from models.base import Batch
from models.cash import CASH, infer_task, select_bits
from models.prompts import PromptCrossAttention, select_prompts
from utils.config import check_kwargs
from utils.errors import ConfigError
from hash_model_checks import finish_task, run_task_sequence, task_steps

from conftest import CONTINUAL_STREAM

IMAGE_DIM, TEXT_DIM, CLASSES = CONTINUAL_STREAM["image_dim"], CONTINUAL_STREAM["text_dim"], CONTINUAL_STREAM["num_classes"]
SMALL = dict(bits=8, width=16, hidden=32, heads=2, prompt_length=4)


def build(**kw) -> CASH:
    return MODELS.get("CASH")(image_dim=IMAGE_DIM, text_dim=TEXT_DIM, num_classes=CLASSES, **{**SMALL, **kw})


def train_task(model, task, t, steps=12, **kw):
    return task_steps(model, task, t, steps, **kw)


def run_tasks(stream, n, seed=0, **kw):
    return run_task_sequence(build, stream, n, steps=12, seed=seed, **kw)


def test_shapes_and_loss_terms(stream):
    torch.manual_seed(0)
    model = build()
    task = stream.tasks[0]
    history = train_task(model, task, 0, steps=2)
    assert set(history[-1]) == {"quant", "fine", "coarse", "task", "distill", "loss"}  # no exclusion on task 1
    with torch.no_grad():
        for t in (0, None):
            assert model.encode_image(task.query.image, t).shape == (len(task.query), 8)
            assert model.encode_text(task.query.text, t).shape == (len(task.query), 8)
    finish_task(model, task, 0, CodeStore())
    history = train_task(model, stream.tasks[1], 1, steps=1)
    assert "exclusion" in history[-1] and all(torch.isfinite(torch.tensor(v)) for v in history[-1].values())
    assert model.structure() == {"bits": 8, "tasks": 2, "prompt_tokens": [4, 4], "old_codes": 0 + len(task.train),
                                 "negatives": min(256, len(task.train))}


def test_old_prompts_and_heads_frozen(stream):
    torch.manual_seed(0)
    model = build(prompt_mode="separate")
    store = CodeStore()
    train_task(model, stream.tasks[0], 0)
    finish_task(model, stream.tasks[0], 0, store)
    old = {k: v.clone() for k, v in model.state_dict().items()
           if k.startswith(("image_prompts.prompts.0", "text_prompts.prompts.0", "task_heads.0", "image_in", "text_in"))}
    assert len(old) == 2 + 2 + 4  # two prompts, head weight + bias, two input projections (w + b)
    train_task(model, stream.tasks[1], 1)
    state = model.state_dict()
    for k, v in old.items():
        assert torch.equal(state[k], v), k
    trainable = {id(p) for g in model.param_groups(1) for p in g["params"]}
    assert id(model.image_prompts[0]) not in trainable and id(model.task_heads[0].weight) not in trainable
    assert id(model.image_prompts[1]) in trainable and id(model.text_prompts[1]) in trainable
    assert not model.image_prompts[0].requires_grad and not model.task_heads[0].weight.requires_grad
    # the shared nets did train (so "unchanged" above is a real check)
    assert id(model.mask_net.net[0].weight) in trainable


def test_cascade_rule_on_hand_made_logits():
    logits = torch.tensor([[3.0, 2.0, -1.0], [0.5, -2.0, 0.1], [-1.0, -0.5, -3.0], [2.0, 5.0, 1.0]])
    assert infer_task(logits, "cascade").tolist() == [1, 2, 1, 2]
    assert infer_task(logits, "argmax").tolist() == [0, 0, 1, 1]


def test_heads_with_negatives_identify_the_task(stream):
    """Task-vs-others heads + the cascade rule find the task of unseen queries; the
    positives-only heads of the public code (head_negatives 0) cannot."""
    def accuracy(model):
        with torch.no_grad():
            hits = [
                (model.infer_tasks(getattr(task.query, m), m) == t).float().mean()
                for t, task in enumerate(stream.tasks) for m in ("image", "text")
            ]
        return float(torch.stack(hits).mean())

    torch.manual_seed(0)
    with_neg = build(head_lr=0.05)
    without = build(head_lr=0.05, head_negatives=0)
    for model in (with_neg, without):
        store = CodeStore()
        for t in range(3):
            train_task(model, stream.tasks[t], t, steps=60, lr=1e-2)
            finish_task(model, stream.tasks[t], t, store)
    assert accuracy(with_neg) > 0.6  # chance: 1/3
    assert accuracy(with_neg) > accuracy(without) + 0.2


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
    with pytest.raises(ConfigError, match="head_negatives"):
        build(head_negatives=-1)
    with pytest.raises(ConfigError, match="prompt_mode"):
        check_kwargs(CASH, {"prompt_mode": "shared"}, "model", skip=("image_dim", "text_dim", "num_classes"))
    model = build()
    with pytest.raises(ValueError, match="expected task index 0"):
        model.begin_task(None, 1)


def test_config_values_type_check():
    kw = check_kwargs(CASH, {"bits": 16, "hidden": 64, "coarse_weight": 10, "width": None, "task_inference": "argmax"},
                      "model", skip=("image_dim", "text_dim", "num_classes"))
    assert kw["coarse_weight"] == 10.0 and isinstance(kw["coarse_weight"], float)


def test_shared_blocks_against_brute_force():
    torch.manual_seed(0)
    x, pool = torch.randn(7, 6), torch.randn(5, 6)
    expected = [max(range(5), key=lambda j: float(torch.cosine_similarity(x[i], pool[j], dim=0))) for i in range(7)]
    assert select_prompts(x, pool).tolist() == expected
    attn = PromptCrossAttention(6, heads=2).eval()
    tokens = torch.randn(3, 6)
    with torch.no_grad():
        out = attn(x, tokens)
        ref = torch.stack([attn.attn(x[i:i + 1][None], tokens[None], tokens[None])[0][0, 0] for i in range(7)])
    assert torch.allclose(out, ref, atol=1e-6)
    # per-sample stacks, given whole or as an index into a set of stacks
    stacks = torch.randn(4, 3, 6)
    choice = torch.tensor([2, 0, 0, 3, 1, 2, 3])
    with torch.no_grad():
        ref = torch.stack([attn.attn(x[i:i + 1][None], stacks[c][None], stacks[c][None])[0][0, 0]
                           for i, c in enumerate(choice.tolist())])
        assert torch.allclose(attn(x, stacks, choice), ref, atol=1e-6)
        assert torch.allclose(attn(x, stacks[choice]), ref, atol=1e-6)
    with pytest.raises(ValueError, match="prompt stacks"):
        attn(x, stacks)
    f, c = torch.randn(4, 8), torch.randn(4, 8)
    assert torch.allclose(select_bits(f, c, torch.ones(4, 8)), torch.tanh(c))
    assert torch.allclose(select_bits(f, c, -torch.ones(4, 8)), torch.tanh(f))
    # InfoNCE: aligned pairs score lower than shuffled ones; balance is 0 for balanced bits
    a = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
    assert L.info_nce(a, a, 0.07) < L.info_nce(a, a.roll(1, 0), 0.07)
    assert float(L.bit_balance_loss(torch.tensor([[1.0, -2.0], [-1.0, 2.0]]))) == 0.0
    y = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 1]])
    assert L.label_overlap(y, y).tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 1]]


def test_positives_only_heads_use_the_public_gate_loss(stream):
    """head_negatives 0 trains the heads with the public mean(1 - g); with negatives the
    objective is task-vs-others cross-entropy."""
    torch.manual_seed(0)
    model = build(head_negatives=0)
    model.begin_task(stream.tasks[0], 0)
    batch = stream.tasks[0].train
    b = Batch(image=batch.image[:8], text=batch.text[:8], labels=batch.labels[:8], index=torch.arange(8))
    parts = model.loss(b, 0)
    with torch.no_grad():
        x = torch.cat([model.image_in(b.image), model.text_in(b.text)])
        expected = (1 - torch.sigmoid(model.task_heads[0](x))).mean()
    assert float(parts["task"].detach()) == pytest.approx(float(expected) * model.weights["task"], rel=1e-6)
    assert float(L.gate_loss(torch.tensor([0.0, 0.0]))) == 0.5


def test_consistency_term_keeps_saved_rows_codes(stream):
    """Saved rows keep the codes they had when their task ended (checked exactly right
    after the task); with the consistency term a later task moves them less."""
    drift = {}
    for weight in (0.0, 10.0):
        torch.manual_seed(0)
        model = build(consistency_weight=weight, head_negatives=16)
        store = CodeStore()
        train_task(model, stream.tasks[0], 0, steps=20, lr=1e-2)
        finish_task(model, stream.tasks[0], 0, store)
        with torch.no_grad():
            now_v, now_t = model._saved_row_codes()
            assert model.neg_tasks.tolist() == [0] * 16
            assert torch.allclose(now_v, model.neg_codes_image, atol=1e-6)
            assert torch.allclose(model.neg_codes_text, model.encode_text(model.neg_text, 0), atol=1e-6)
        history = train_task(model, stream.tasks[1], 1, steps=30, lr=1e-2)
        assert ("consistency" in history[0]) == (weight > 0)
        with torch.no_grad():
            now_v, now_t = model._saved_row_codes()
        drift[weight] = float((now_v - model.neg_codes_image).abs().mean() + (now_t - model.neg_codes_text).abs().mean())
    assert drift[10.0] < 0.6 * drift[0.0]


def test_banks_and_saved_codes_are_the_training_form_codes(stream):
    """The code banks (start of a task) and the saved train codes (end of a task) hold
    what the training-form forward gives each train pair in eval mode, computed without
    its cross-branch outputs."""
    torch.manual_seed(0)
    model = build()
    task = stream.tasks[0]
    model.begin_task(task, 0)
    model.begin_epoch(task, 0, 0)
    model.eval()
    with torch.no_grad():
        out = model._pair_forward(task.train.image, task.train.text, 0)
    for name, key in (("coarse_image", "cv"), ("coarse_text", "ct"), ("hash_image", "hv"), ("hash_text", "ht")):
        torch.testing.assert_close(getattr(model, f"bank_{name}"), out[key], rtol=1e-6, atol=1e-6)
    model = build()
    train_task(model, task, 0, steps=3)
    with torch.no_grad():
        out = model._pair_forward(task.train.image, task.train.text, 0)
    model.end_task(task, 0, CodeStore())
    torch.testing.assert_close(model.old_image_codes, out["hv"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model.old_text_codes, out["ht"], rtol=1e-6, atol=1e-6)
    assert model.bank_hash_image.shape[0] == 0  # banks dropped after the task
