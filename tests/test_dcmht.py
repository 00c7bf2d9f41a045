"""DCMHT: per-bit softmax heads, margin distance loss, the runner contract."""
import math

import pytest
import torch

from common.register import MODELS
from models.base import Batch
from models.dcmht import DCMHT, SoftmaxHashHead, margin_distance_loss, squared_distances
from hash_model_checks import (
    assert_finite_loss, batch_of, retrieval_map, structured_task, train,
)


def make(bits=8, seed=0, **kw):
    torch.manual_seed(seed)
    return MODELS.get("DCMHT")(image_dim=20, text_dim=12, num_classes=4, bits=bits, **kw)


def test_registered_and_shapes():
    model = make(bits=8)
    assert isinstance(model, DCMHT)
    task = structured_task()
    model.eval()
    u = model.encode_image(task.query.image)
    v = model.encode_text(task.query.text)
    assert u.shape == (32, 8) and v.shape == (32, 8)
    assert float(u.detach().abs().max()) <= 1 and float(v.detach().abs().max()) <= 1
    probs = model.image_head(task.query.image)
    assert probs.shape == (32, 8, 2)
    torch.testing.assert_close(probs.sum(-1), torch.ones(32, 8))
    # the continuous code's sign is the argmax of each pair (index 1 -> +1)
    arg = probs.argmax(-1)
    decided = (probs[..., 1] - probs[..., 0]).abs() > 0
    assert torch.equal((u > 0)[decided], (arg == 1)[decided])


def test_width_not_divisible_by_heads_is_accepted():
    torch.manual_seed(0)
    model = MODELS.get("DCMHT")(image_dim=240, text_dim=76, num_classes=10, bits=16, heads=8)
    model.eval()
    assert model.encode_text(torch.randn(3, 76)).shape == (3, 16)


def test_attention_block_is_nn_multihead_attention_over_one_token():
    """``attend`` (out_proj of the value projection) is ``nn.MultiheadAttention`` on the
    one-token sequence: the same outputs and the same gradients of every parameter that
    reaches the output (value rows, out_proj), bit for bit on one thread; the query / key
    rows, which cannot change the output, get an exact zero gradient."""
    torch.manual_seed(0)
    head = SoftmaxHashHead(64, 8, heads=8).train()
    x, up = torch.randn(32, 64), torch.randn(32, 64)
    mha = head.attention
    seq = x.unsqueeze(1)
    ref, _ = mha(seq, seq, seq, need_weights=False)
    (ref.squeeze(1) * up).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in mha.named_parameters()}
    head.zero_grad(set_to_none=True)
    out = head.attend(x)
    (out * up).sum().backward()
    assert torch.equal(out, ref.squeeze(1))
    for name, p in mha.named_parameters():
        if name.startswith("in_proj"):
            assert torch.equal(p.grad[128:], ref_grads[name][128:]), name
            assert not p.grad[:128].any() and ref_grads[name][:128].abs().max() < 1e-5, name
        else:
            assert torch.equal(p.grad, ref_grads[name]), name


def test_margin_loss_matches_a_loop():
    torch.manual_seed(0)
    a, b = torch.rand(5, 6), torch.rand(4, 6)
    sim = (torch.rand(5, 4) > 0.5).float()
    m = 1.3
    pos = sum(sim[i, j] * ((a[i] - b[j]) ** 2).sum() for i in range(5) for j in range(4)) / 20
    neg = sum((1 - sim[i, j]) * (m - min(float((a[i] - b[j]).norm()), m)) ** 2 for i in range(5) for j in range(4)) / 20
    out = margin_distance_loss(a, b, sim, m)
    assert abs(float(out["pos"]) - float(pos)) < 1e-5
    assert abs(float(out["neg"]) - float(neg)) < 1e-5
    assert math.isclose(make(bits=16, theta=0.75).margin, math.sqrt(24))


def test_squared_distances_equal_the_direct_difference():
    g = torch.Generator().manual_seed(0)
    a = torch.softmax(torch.randn(9, 16, 2, generator=g), -1).flatten(1).requires_grad_()
    b = torch.softmax(torch.randn(7, 16, 2, generator=g), -1).flatten(1).requires_grad_()
    direct = (a.unsqueeze(1) - b.unsqueeze(0)).pow(2).sum(-1)
    fast = squared_distances(a, b)
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, direct, rtol=1e-6, atol=1e-6)
    ga, gb = torch.autograd.grad(direct.sum(), (a, b))
    fa, fb = torch.autograd.grad(fast.sum(), (a, b))
    torch.testing.assert_close(fa, ga, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fb, gb, rtol=1e-5, atol=1e-6)
    self_d = squared_distances(a, a).diagonal().detach()
    assert (self_d >= 0).all() and float(self_d.max()) < 1e-12   # below the loss's sqrt clamp


def test_loss_parts_finite_and_self_pairs_have_finite_gradient():
    model = make()
    task = structured_task()
    model.train()
    parts = model.loss(batch_of(task.train, torch.arange(16)), 0)
    assert_finite_loss(parts)
    assert set(parts) >= {"i2t", "i2i", "t2t", "quantization", "loss"}
    parts["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_learns_structured_data():
    task = structured_task()
    model = make(bits=16)
    before = retrieval_map(model, task)
    history = train(model, task, epochs=30, lr=2e-2)
    after = retrieval_map(model, task)
    assert history[-1] < 0.3 * history[0]
    assert after > 0.9 and after > before + 0.2


def test_bad_theta_refused():
    with pytest.raises(ValueError, match="theta"):
        make(theta=0.0)


def test_batch_of_one_in_eval_mode():
    model = make()
    model.eval()
    out = model(Batch(torch.randn(1, 20), torch.randn(1, 12), torch.eye(4)[:1], torch.arange(1)), 0)
    assert torch.isfinite(out["loss"])
