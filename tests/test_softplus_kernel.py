"""The softplus row-sum and elementwise kernels, the polynomials they are built from, and
the compile helper."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common import jit, vector_math
from models import softplus_kernel
from models.softplus_kernel import product_softplus_row_sums

needs_kernel = pytest.mark.skipif(softplus_kernel._kernel() is None, reason="numba is not installed")
ONE = torch.ones(1, 1)


def test_exp_and_log_ratio_against_numpy_uncompiled():
    x = np.linspace(-708.0, 708.0, 4001)
    got = np.array([vector_math.exp(v) for v in x])
    np.testing.assert_allclose(got, np.exp(x), rtol=1e-13, atol=0)
    assert vector_math.exp(-800.0) == vector_math.exp(-708.0) > 0  # clamped, not underflowed
    assert np.isfinite(vector_math.exp(800.0))
    u = np.linspace(0.0, 1.0, 2001)  # the kernel's use: log(1 + u) = log_ratio(u / (2 + u))
    np.testing.assert_allclose([vector_math.log_ratio(v / (2.0 + v)) for v in u], np.log1p(u), rtol=1e-13, atol=0)
    assert vector_math.log_ratio(1e-30 / 2.0) == pytest.approx(1e-30, rel=1e-14)  # no cancellation for tiny u
    s = np.linspace(0.0, 1.0 / 3.0, 2001)
    np.testing.assert_allclose([vector_math.log_ratio(v) for v in s], 2.0 * np.arctanh(s), rtol=1e-13, atol=0)


@needs_kernel
def test_float32_values_are_within_one_rounding_of_the_exact_softplus():
    x = torch.linspace(-110.0, 110.0, 40001)
    exact = F.softplus(x.double())
    got = product_softplus_row_sums(x.view(-1, 1), ONE)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), exact, rtol=1.2e-7, atol=1e-45)


@needs_kernel
def test_row_sums_and_gradients_equal_torch():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 16, generator=g)
    H = (torch.randn(40, 16, generator=g) * 2).requires_grad_()
    up = torch.randn(300, generator=g)
    got = product_softplus_row_sums(X, H)
    ref = F.softplus(X @ H.t()).sum(1)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
    (gk,) = torch.autograd.grad((got * up).sum(), H)
    (gr,) = torch.autograd.grad((ref * up).sum(), H)
    torch.testing.assert_close(gk, gr, rtol=1e-5, atol=1e-5)
    # both inputs, in float64, against finite differences
    Xd = X[:6].double().requires_grad_()
    Hd = H.detach()[:5].double().requires_grad_()
    assert torch.autograd.gradcheck(product_softplus_row_sums, (Xd, Hd))


@needs_kernel
def test_nan_and_infinities_keep_their_meaning():
    out = product_softplus_row_sums(torch.tensor([[float("nan")], [float("inf")], [-float("inf")], [0.0]]), ONE)
    assert torch.isnan(out[0]) and out[1] == float("inf") and out[2] == 0.0
    assert out[3] == pytest.approx(np.log(2.0), rel=1e-7)


@needs_kernel
def test_bf16_scores_are_computed_in_float32_and_kernel_torch_is_plain_torch():
    X, H = torch.randn(50, 8), torch.randn(7, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = product_softplus_row_sums(X, H)
        ref = F.softplus((X @ H.t()).float()).sum(1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(product_softplus_row_sums(X, H, kernel="torch"), F.softplus(X @ H.t()).sum(1))


@needs_kernel
def test_under_autocast_the_backward_matmuls_run_in_bf16_like_torchs():
    """Autocast's policy for the operator's matmuls, backward included: bf16 operands,
    a float32 gradient for a float32 leaf, close to the gradient of torch's own path."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class MatmulDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.mm.default:
                self.seen.append({a.dtype for a in args})
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(1)
    X = torch.randn(200, 16, generator=g)
    H = torch.randn(24, 16, generator=g, requires_grad=True)
    up = torch.randn(200, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = product_softplus_row_sums(X, H)
        ref = F.softplus(X @ H.t()).sum(1)
    mode = MatmulDtypes()
    with mode:
        (grad,) = torch.autograd.grad((got * up).sum(), H)
    (ref_grad,) = torch.autograd.grad((ref.float() * up).sum(), H)
    assert mode.seen == [{torch.bfloat16}]
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad, ref_grad, rtol=0.02, atol=0.05 * ref_grad.abs().max().item())


@needs_kernel
def test_kernel_runs_eagerly_under_torch_compile(monkeypatch):
    """Under ``runner.compile`` the numba call runs eagerly, not traced by torch.compile
    (tracing into numba's dispatcher broke dynamo on a first call for new argument
    types), with the eager values and gradients."""
    real = softplus_kernel._kernel()
    traced = []

    def spy(*args):
        traced.append(torch.compiler.is_compiling())
        return real(*args)

    monkeypatch.setattr(softplus_kernel, "_kernel", lambda: spy)
    X, H = torch.randn(30, 8), torch.randn(12, 8, requires_grad=True)
    compiled = torch.compile(lambda X, H: product_softplus_row_sums(X, H).square().sum(), backend="eager")
    got = compiled(X, H)
    (grad,) = torch.autograd.grad(got, H)
    ref = product_softplus_row_sums(X, H).square().sum()
    (ref_grad,) = torch.autograd.grad(ref, H)
    assert traced and not any(traced)
    assert torch.equal(got, ref) and torch.equal(grad, ref_grad)


def test_numba_that_does_not_import_is_one_line_naming_the_way_out(monkeypatch):
    from utils.errors import UserError

    monkeypatch.setattr(softplus_kernel, "available", lambda: True)   # numba found
    monkeypatch.setattr(softplus_kernel, "_kernel", lambda: None)   # what njit gives when the import fails
    with pytest.raises(UserError, match="numba is installed but does not import.*model.softplus_kernel: torch"):
        product_softplus_row_sums(torch.randn(3, 2), torch.randn(4, 2))


def test_helper_fingerprint_follows_the_helper_files(tmp_path, monkeypatch):
    for name, body in (("mod_a", "def f(x):\n    return x + 1\n"), ("mod_b", "def f(x):\n    return x + 2\n")):
        (tmp_path / f"{name}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    import mod_a
    import mod_b

    assert jit._fingerprint([]) == ""
    assert jit._fingerprint([mod_a.f]) != jit._fingerprint([mod_b.f])
    assert jit._fingerprint([mod_a.f]) == jit._fingerprint([mod_a.f])


def test_njit_is_none_without_numba(monkeypatch):
    import builtins

    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__",
                        lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name)) if name == "numba" else real(name, *a, **k))
    assert jit.njit(vector_math.exp) is None


@needs_kernel
def test_elementwise_softplus_is_correctly_rounded_and_its_gradient_is_the_sigmoid():
    x = torch.linspace(-110.0, 110.0, 40001)
    kept = x.clone()
    got = softplus_kernel.softplus(x)
    assert torch.equal(x, kept)                                   # the input is not overwritten
    assert torch.equal(got, F.softplus(x.double()).float())       # correctly rounded everywhere here
    assert torch.equal(got[x > 20], x[x > 20])                    # torch's threshold: x itself
    special = softplus_kernel.softplus(torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0]))
    assert torch.isnan(special[0]) and special[1] == float("inf") and special[2] == 0.0
    assert special[3] == pytest.approx(np.log(2.0), rel=1e-7)
    z = torch.randn(3, 50, generator=torch.Generator().manual_seed(1)).mul(8).requires_grad_()
    up = torch.randn(3, 50)
    (grad,) = torch.autograd.grad((softplus_kernel.softplus(z) * up).sum(), z)
    torch.testing.assert_close(grad, up * torch.sigmoid(z.detach()), rtol=2.4e-7, atol=1e-30)


@needs_kernel
def test_elementwise_softplus_of_bf16_is_float32_and_float64_or_kernel_torch_is_torchs():
    x = torch.randn(40, 7, generator=torch.Generator().manual_seed(2)).bfloat16().requires_grad_()
    out = softplus_kernel.softplus(x)
    assert out.dtype == torch.float32 and torch.equal(out, F.softplus(x.detach().double()).float())
    out.sum().backward()
    assert x.grad.dtype == torch.bfloat16
    assert torch.equal(softplus_kernel.softplus(x.detach(), kernel="torch"), F.softplus(x.detach()))
    wide = x.detach().double()
    assert torch.equal(softplus_kernel.softplus(wide), F.softplus(wide))   # float64 keeps its precision


@needs_kernel
def test_elementwise_softplus_runs_eagerly_under_torch_compile():
    x = torch.randn(5, 9, requires_grad=True)
    compiled = torch.compile(lambda t: softplus_kernel.softplus(t).square().sum(), backend="eager")
    got = compiled(x)
    (grad,) = torch.autograd.grad(got, x)
    ref = softplus_kernel.softplus(x).square().sum()
    (ref_grad,) = torch.autograd.grad(ref, x)
    assert torch.equal(got, ref) and torch.equal(grad, ref_grad)


def test_elementwise_numba_that_does_not_import_names_the_scan_kernel_key(monkeypatch):
    from utils.errors import UserError

    monkeypatch.setattr(softplus_kernel, "available", lambda: True)
    monkeypatch.setattr(softplus_kernel, "_elements_kernel", lambda: None)
    with pytest.raises(UserError, match="numba is installed but does not import.*model.scan_kernel: torch"):
        softplus_kernel.softplus(torch.randn(3))
