"""CAGMH: the plain-PyTorch selective scan, per-sample guidance, training contract."""
import pytest
import torch

from common.register import MODELS
from models.cagmh import CAGMH, covariance_guidance, hadamard_centres
from models import scan_kernel, softplus_kernel
from models.selective_scan import (
    SelectiveScanBlock, causal_depthwise_conv, selective_scan_parallel, selective_scan_sequential,
)
from hash_model_checks import (
    assert_every_parameter_gets_gradient, assert_finite_loss, batch_of, retrieval_map, structured_task, train,
)


def make(bits=8, seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"num_tokens": 4, "token_dim": 8, "hidden": 32, **kw}
    return MODELS.get("CAGMH")(image_dim=20, text_dim=12, num_classes=4, bits=bits, **kw)


@pytest.mark.parametrize("L", [1, 2, 3, 7, 8])
def test_parallel_scan_equals_sequential(L):
    g = torch.Generator().manual_seed(L)
    b, d, n = 2, 5, 3
    x, B, C = torch.randn(b, L, d, generator=g), torch.randn(b, L, n, generator=g), torch.randn(b, L, n, generator=g)
    dt, A, D = torch.rand(b, L, d, generator=g), -4 * torch.rand(d, n, generator=g), torch.randn(d, generator=g)
    seq = selective_scan_sequential(x, dt, A, B, C, D)
    torch.testing.assert_close(selective_scan_parallel(x, dt, A, B, C, D), seq, atol=1e-5, rtol=1e-5)
    # the recurrence by hand for the last token of the first sample
    h = torch.zeros(d, n)
    for t in range(L):
        h = torch.exp(dt[0, t, :, None] * A) * h + dt[0, t, :, None] * x[0, t, :, None] * B[0, t]
    torch.testing.assert_close(seq[0, -1], (h * C[0, -1]).sum(-1) + D * x[0, -1], atol=1e-5, rtol=1e-5)


def scan_inputs(L, b=3, d=5, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, B, C = torch.randn(b, L, d, generator=g), torch.randn(b, L, n, generator=g), torch.randn(b, L, n, generator=g)
    dt, A = torch.rand(b, L, d, generator=g), -4 * torch.rand(d, n, generator=g)
    return x, dt, A, B, C


@pytest.mark.parametrize("L, d, n", [(1, 5, 4), (2, 5, 4), (8, 5, 4), (3, 37, 16)])
def test_compiled_scan_kernel_equals_the_pytorch_loop_values_and_gradients(L, d, n):
    if not scan_kernel.available():
        pytest.skip("numba is not installed: the PyTorch loop is the only path")
    inputs = scan_inputs(L, d=d, n=n)   # 37 channels: full vectors and a remainder
    D = torch.zeros(inputs[0].shape[-1])
    ref_in = [v.clone().requires_grad_() for v in inputs]
    ker_in = [v.clone().requires_grad_() for v in inputs]
    ref = selective_scan_sequential(*ref_in, D)
    out = scan_kernel.sequential_scan(*ker_in)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    weight = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad((out * weight).sum(), ker_in),
                    torch.autograd.grad((ref * weight).sum(), ref_in)):   # x, dt, A, B, C
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_scan_kernel_runs_eagerly_under_torch_compile(monkeypatch):
    """Under ``runner.compile`` the numba scan runs eagerly, forward and backward, not
    traced by torch.compile, with the eager values and gradients."""
    if not scan_kernel.available():
        pytest.skip("numba is not installed: the PyTorch loop is the only path")
    forward, backward = scan_kernel._kernels()
    traced = []

    def spy(kernel):
        def call(*args):
            traced.append(torch.compiler.is_compiling())
            return kernel(*args)
        return call

    monkeypatch.setattr(scan_kernel, "_kernels", lambda: (spy(forward), spy(backward)))
    torch.manual_seed(0)
    block = SelectiveScanBlock(8, d_state=4, scan="sequential", kernel="auto")
    tokens = torch.randn(6, 5, 8)
    compiled = torch.compile(lambda t: block(t).square().sum(), backend="eager")
    got = compiled(tokens)
    grads = torch.autograd.grad(got, list(block.parameters()))
    ref = block(tokens).square().sum()
    ref_grads = torch.autograd.grad(ref, list(block.parameters()))
    assert len(traced) == 4 and not any(traced)   # forward and backward, compiled and eager
    assert torch.equal(got, ref)
    for a, b in zip(grads, ref_grads):
        assert torch.equal(a, b)


def test_numba_that_does_not_import_is_one_line_naming_the_way_out(monkeypatch):
    from utils.errors import UserError

    monkeypatch.setattr(scan_kernel, "available", lambda: True)   # numba found
    monkeypatch.setattr(scan_kernel, "_kernels", lambda: None)   # what njit gives when the import fails
    with pytest.raises(UserError, match="numba is installed but does not import.*model.scan_kernel: torch"):
        scan_kernel.sequential_scan(*scan_inputs(2))


def test_scan_block_uses_the_kernel_on_cpu_and_matches_the_torch_loop(monkeypatch):
    if not scan_kernel.available():
        pytest.skip("numba is not installed: the PyTorch loop is the only path")
    torch.manual_seed(0)
    fast = SelectiveScanBlock(8, d_state=4, scan="sequential", kernel="auto")
    slow = SelectiveScanBlock(8, d_state=4, scan="sequential", kernel="torch")
    slow.load_state_dict(fast.state_dict())
    tokens = torch.randn(6, 5, 8)
    calls = []
    real, real_softplus = scan_kernel.sequential_scan, softplus_kernel.softplus
    monkeypatch.setattr(scan_kernel, "sequential_scan", lambda *a: calls.append("scan") or real(*a))
    monkeypatch.setattr(softplus_kernel, "softplus", lambda *a: calls.append("softplus") or real_softplus(*a))
    y_fast = fast(tokens)
    assert calls == ["softplus", "scan"]
    y_slow = slow(tokens)
    torch.testing.assert_close(y_fast, y_slow, atol=1e-5, rtol=1e-5)
    y_fast.square().sum().backward()
    y_slow.square().sum().backward()
    for (name, p), q in zip(fast.named_parameters(), slow.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=name)
    with torch.autocast("cpu", dtype=torch.bfloat16):   # bf16 inputs run in float32
        assert fast(tokens).isfinite().all()
    with pytest.raises(ValueError, match="kernel must be 'auto' or 'torch'"):
        SelectiveScanBlock(8, kernel="numba")


@pytest.mark.parametrize("L,k", [(1, 4), (3, 4), (8, 4), (5, 2)])
def test_causal_depthwise_conv_equals_the_conv1d_form(L, k):
    torch.manual_seed(L)
    d = 6
    conv = torch.nn.Conv1d(d, d, k, groups=d, padding=k - 1)
    x = torch.randn(3, L, d, requires_grad=True)
    ref = conv(x.transpose(1, 2))[..., :L].transpose(1, 2)
    out = causal_depthwise_conv(x, conv.weight, conv.bias)
    torch.testing.assert_close(out, ref)
    grads = [torch.autograd.grad(y.pow(2).sum(), (x, conv.weight, conv.bias)) for y in (out, ref)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_scan_block_is_causal_and_per_sample():
    torch.manual_seed(0)
    for scan in ("sequential", "parallel"):
        torch.manual_seed(0)
        block = SelectiveScanBlock(6, d_state=4, d_conv=3, expand=2, scan=scan)
        x = torch.randn(3, 5, 6)
        y = block(x)
        x2 = x.clone()
        x2[0, 3:] += 1.0          # change later tokens of sample 0
        x2[1] += 1.0              # and all of sample 1
        y2 = block(x2)
        torch.testing.assert_close(y2[0, :3], y[0, :3])   # earlier tokens unchanged (causal)
        torch.testing.assert_close(y2[2], y[2])           # other samples unchanged
        assert not torch.allclose(y2[0, 3:], y[0, 3:])


def test_scan_choice_gives_the_same_model():
    a, b = make(scan="sequential"), make(scan="parallel")
    task = structured_task()
    a.eval(), b.eval()
    torch.testing.assert_close(a.encode_image(task.query.image), b.encode_image(task.query.image), atol=1e-5, rtol=1e-5)


def test_shapes_and_unit_norm_codes():
    model = make()
    assert isinstance(model, CAGMH)
    model.eval()
    task = structured_task()
    u, v = model.encode_image(task.query.image), model.encode_text(task.query.text)
    assert u.shape == v.shape == (32, 8)
    torch.testing.assert_close(u.norm(dim=1), torch.ones(32))
    A = covariance_guidance(torch.randn(5, 4, 8), torch.randn(5, 4, 8))
    assert A.shape == (5, 4, 4) and float(A.min()) >= 0 and float(A.max()) <= 0.25 + 1e-6


def test_hadamard_centres_balanced_and_orthogonal():
    c = hadamard_centres(7, 8)
    assert c.shape == (7, 8) and set(c.unique().tolist()) == {-1.0, 1.0}
    assert torch.all(c.sum(1) == 0)                      # balanced: half +1
    torch.testing.assert_close(c @ c.t(), 8 * torch.eye(7))
    many = hadamard_centres(80, 16)                      # more classes than Hadamard rows
    assert many.shape == (80, 16) and torch.all(many.sum(1) == 0)
    assert torch.equal(many, hadamard_centres(80, 16))   # fixed, no global RNG
    assert hadamard_centres(3, 12).shape == (3, 12)      # K not a power of two


def test_loss_parts_and_param_groups():
    model = make()
    task = structured_task()
    model.train()
    parts = model.loss(batch_of(task.train, torch.arange(16)), 0)
    assert_finite_loss(parts)
    assert set(parts) >= {"proxy", "separation", "center", "loss"}
    groups = model.param_groups(0)
    proxies = [g for g in groups if g.get("optimizer")]
    assert len(proxies) == 1 and proxies[0]["params"] == [model.criterion.proxies]
    assert proxies[0]["optimizer"]["name"] == "sgd"


@pytest.mark.parametrize("share", [True, False])
def test_every_block_is_trained(share):
    model = make(share_scan=share)
    assert_every_parameter_gets_gradient(model, structured_task())
    names = {n.split(".")[1] for n, _ in model.named_parameters() if n.startswith("image_encoder.")}
    assert {"tokenizer", "norm", "scan"} <= names


def test_learns_structured_data():
    task = structured_task()
    model = make(bits=16)
    before = retrieval_map(model, task)
    history = train(model, task, epochs=15, lr=5e-3)
    after = retrieval_map(model, task)
    assert history[-1] < 0.8 * history[0]
    assert after > 0.9 and after > before + 0.2


def test_bad_sizes_refused():
    with pytest.raises(ValueError, match="num_tokens"):
        make(num_tokens=0)
    with pytest.raises(ValueError, match="scan"):
        make(scan="fast")
