"""SCAHN: stage-wise outputs, per-bit fusion, code buffers, bit significance."""
import pytest
import torch

from common.register import MODELS
from models.scahn import SCAHN, buffer_likelihoods, likelihood_loss
from hash_model_checks import (
    assert_batch_independent, assert_every_parameter_gets_gradient, assert_finite_loss, batch_of, codes, retrieval_map, structured_task, train,
)


def make(bits=8, seed=0, num_classes=4, **kw):
    torch.manual_seed(seed)
    kw = {"hidden": 32, **kw}
    return MODELS.get("SCAHN")(image_dim=20, text_dim=12, num_classes=num_classes, bits=bits, **kw)


def test_likelihood_loss_matches_formula():
    theta, sim = torch.randn(4, 6) * 3, (torch.rand(4, 6) > 0.5).float()
    ref = -(sim * theta - torch.log1p(torch.exp(theta))).mean()
    torch.testing.assert_close(likelihood_loss(theta, sim), ref)


def test_buffer_likelihoods_equal_the_per_output_sums():
    g = torch.Generator().manual_seed(0)
    h = torch.tanh(torch.randn(3, 5, 8, generator=g)).requires_grad_()
    Fb, Gb = torch.tanh(torch.randn(11, 8, generator=g)), torch.tanh(torch.randn(11, 8, generator=g))
    sim, alpha = (torch.rand(5, 11, generator=g) > 0.6).float(), 0.25
    ref = torch.stack([sum(likelihood_loss(h[r] @ X.t() / alpha, sim) for r in range(3)) for X in (Fb, Gb)])
    both = buffer_likelihoods([h, h.flip(0)], [Fb, Gb], sim, alpha)
    out = both[0]
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(both[1], ref)  # the sums do not depend on the order of the outputs
    weights = torch.tensor([0.3, 1.7])
    torch.testing.assert_close(torch.autograd.grad((out * weights).sum(), h)[0],
                               torch.autograd.grad((ref * weights).sum(), h)[0])


def test_stages_built_in_begin_task_and_buffers_sized_from_train():
    model = make()
    assert isinstance(model, SCAHN)
    task = structured_task(n_train=40)
    with pytest.raises(RuntimeError, match="begin_task"):
        model.encode_image(task.query.image)
    model.begin_task(task, 0)
    assert model.structure() == {"bits": 8, "stages": {"image": ["mlp"], "text": ["mlp"]}}
    assert model.buffer_image.shape == model.buffer_text.shape == (40, 8)
    model.begin_epoch(task, 0, 0)
    model.eval()
    torch.testing.assert_close(model.buffer_text, torch.tanh(model.encode_text(task.train.text)))
    # a batch writes its rows (Batch.index) into the buffers
    model.train()
    idx = torch.tensor([3, 17, 29])
    before = model.buffer_image.clone()
    model.loss(batch_of(task.train, idx), 0)
    changed = (model.buffer_image != before).any(1).nonzero().flatten().tolist()
    assert set(changed) <= {3, 17, 29} and changed
    assert "buffer_image" not in model.state_dict()          # train-set sized: not checkpointed


def test_shapes_and_loss_parts():
    model = make()
    task = structured_task()
    model.begin_task(task, 0)
    model.begin_epoch(task, 0, 0)
    model.train()
    parts = model.loss(batch_of(task.train, torch.arange(16)), 0)
    assert_finite_loss(parts)
    assert set(parts) == {"inter", "intra", "pair", "quantization", "loss"}
    model.eval()
    assert model.encode_image(task.query.image).shape == (32, 8)
    assert model.encode_text(task.query.text).shape == (32, 8)


def test_bit_significance_rule():
    model = make(bits=5, stages=3)
    with torch.no_grad():
        model.fusion["image"].copy_(torch.tensor([[1.0, -2, 0, 0, 1], [0, 0, 0, 3, 1], [0, 0, 0.5, 0, 1]]))
        model.fusion["text"].copy_(torch.tensor([[0.0, 0, 0, 0, -1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]]))
    torch.testing.assert_close(model.bit_significance(), torch.tensor([2.0, 2.0, 0.5, 3.0, 4.0]))
    # most significant = largest
    assert torch.argsort(model.bit_significance(), descending=True, stable=True).tolist() == [4, 3, 0, 1, 2]


def test_per_layer_features_path_roundtrip_and_batch_independence():
    task = structured_task(layers=5)
    model = make()
    train(model, task, epochs=3)
    assert model.structure()["stages"]["image"] == ["layers", 5, 20]
    assert model.stages["image"].picks == [0, 1, 3, 4]          # early to late, last layer included
    assert_batch_independent(model, task.query)
    with pytest.raises(ValueError, match="per-layer"):
        model.encode_image(task.query.image)
    # a checkpoint rebuilds the shapes before load_state_dict
    fresh = make(seed=9)
    fresh.build_structure(model.structure())
    fresh.load_state_dict(model.state_dict())
    a, b = codes(model, task.query), codes(fresh, task.query)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["text"], b["text"])
    assert_every_parameter_gets_gradient(make(), structured_task(layers=5))


def test_layers_required_when_asked():
    with pytest.raises(ValueError, match="image_layers"):
        make(stage_source="layers").begin_task(structured_task(), 0)


def test_learns_structured_data():
    task = structured_task()
    model = make(bits=16)
    model.begin_task(task, 0)
    before = retrieval_map(model, task)
    history = train(model, task, epochs=15)
    after = retrieval_map(model, task)
    assert history[-1] < 0.7 * history[0]
    assert after > 0.9 and after > before + 0.2


def test_ranked_prefix_beats_arbitrary_prefixes():
    """8 classes in 32 bits: the model leaves spare bits weak, and the significance
    ranking must find the strong ones. The 8 most significant bits beat the first 8
    columns, the 8 least significant, and the mean of random 8-bit subsets."""
    task = structured_task(num_classes=8, noise=1.0, n_train=160, n_db=160, n_query=64)
    model = make(bits=32, seed=2, num_classes=8)
    train(model, task, epochs=20, seed=2)
    sig = model.bit_significance()
    assert sig.shape == (32,) and float(sig.max() - sig.min()) > 0.5       # not softmaxed flat
    order = torch.argsort(sig, descending=True, stable=True)
    ranked = retrieval_map(model, task, order[:8])
    g = torch.Generator().manual_seed(0)
    random_mean = sum(retrieval_map(model, task, torch.randperm(32, generator=g)[:8]) for _ in range(10)) / 10
    assert ranked > retrieval_map(model, task, torch.arange(8)) + 0.05
    assert ranked > retrieval_map(model, task, order[-8:]) + 0.2
    assert ranked > random_mean + 0.05


def test_bad_options_refused():
    with pytest.raises(ValueError, match="quantize"):
        make(quantize="both")
    with pytest.raises(ValueError, match="alpha"):
        make(alpha=0.0)


def test_softplus_kernel_and_torch_give_the_same_loss_and_bad_value_is_refused():
    task = structured_task(n_train=40)
    losses = []
    for kernel in ("auto", "torch"):
        model = make(softplus_kernel=kernel)
        model.begin_task(task, 0)
        model.begin_epoch(task, 0, 0)
        model.train()
        losses.append(model.loss(batch_of(task.train, torch.arange(16)), 0))
    for key in losses[1]:
        torch.testing.assert_close(losses[0][key], losses[1][key], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="softplus_kernel"):
        make(softplus_kernel="numba")


def test_label_overlap_equals_the_shared_label_test_in_fp32_and_under_autocast():
    """SCAHN's and DCMHT's similarity targets: 1 exactly where two rows share a label."""
    from models.losses import label_overlap

    g = torch.Generator().manual_seed(0)
    a = (torch.rand(37, 24, generator=g) < 0.1).float()
    b = (torch.rand(53, 24, generator=g) < 0.1).float()
    a[3], b[7] = 0, 0                                    # rows with no label share none
    brute = torch.tensor([[float(any(x > 0 and y > 0 for x, y in zip(r, s))) for s in b.tolist()] for r in a.tolist()])
    assert brute[3].sum() == 0 and 0 < brute.sum() < brute.numel()
    for labels_a, labels_b in ((a, b), (a.long(), b.long())):
        out = label_overlap(labels_a, labels_b)
        assert out.dtype == torch.float32 and torch.equal(out, brute)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = label_overlap(a, b)
    assert out.dtype == torch.float32 and torch.equal(out, brute)
