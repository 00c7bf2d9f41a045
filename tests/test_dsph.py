"""DSPH's HyP proxy loss against a brute-force reference (loops over samples, labels
and pairs), against the boolean-indexing form and the autograd form it replaced (same
gradients), and its written-out backward against finite differences."""
import pytest
import torch
import torch.nn.functional as F

from models.dsph import HyPProxyLoss, _HyPTerms


def loop_reference(loss: HyPProxyLoss, u_img, u_txt, labels):
    """The HyP loss written out element by element (see the HyPProxyLoss docstring)."""
    P = F.normalize(loss.proxies.detach(), dim=1)
    d = loss.delta
    proxy = 0.0
    for u in (u_img, u_txt):
        un = F.normalize(u, dim=1)
        pos = [(i, k) for i in range(len(u)) for k in range(len(P)) if labels[i, k] > 0]
        neg = [(i, k) for i in range(len(u)) for k in range(len(P)) if labels[i, k] == 0]
        proxy += sum(1 - float(un[i] @ P[k]) for i, k in pos) / max(1, len(pos))
        proxy += sum(max(0.0, float(un[i] @ P[k]) - d) for i, k in neg) / max(1, len(neg))
    multi = [i for i in range(len(labels)) if labels[i].sum() > 1]
    pairs = [(i, j) for i in multi for j in multi if float(labels[i] @ labels[j]) == 0]
    sep = 0.0
    if pairs:
        for a, b in ((u_img, u_img), (u_txt, u_txt), (u_img, u_txt)):
            an, bn = F.normalize(a, dim=1), F.normalize(b, dim=1)
            sep += sum(max(0.0, float(an[i] @ bn[j]) - d) for i, j in pairs) / len(pairs)
    return proxy, loss.alpha * sep


def gathered_form(loss: HyPProxyLoss, u_img, u_txt, labels):
    """The boolean-indexing form of the same loss (masked rows gathered, then summed)."""
    P = F.normalize(loss.proxies, dim=1)
    pos = labels > 0
    proxy = 0
    for u in (u_img, u_txt):
        cos = F.normalize(u, dim=1) @ P.t()
        proxy = proxy + (1 - cos)[pos].sum() / pos.sum() + F.relu(cos - loss.delta)[~pos].sum() / (~pos).sum()
    multi = labels.sum(1) > 1
    lab = labels[multi]
    disjoint = (lab @ lab.t()) == 0
    sep = sum(F.relu(F.normalize(a[multi], dim=1) @ F.normalize(b[multi], dim=1).t() - loss.delta)[disjoint].mean()
              for a, b in ((u_img, u_img), (u_txt, u_txt), (u_img, u_txt)))
    return proxy + loss.alpha * sep


def autograd_form(loss: HyPProxyLoss, u_img, u_txt, labels):
    """The masked form as autograd differentiates it (the loss before ``_HyPTerms``)."""
    labels = labels.to(u_img.dtype)
    pos = (labels > 0).to(labels.dtype)
    neg = 1 - pos
    P = F.normalize(loss.proxies, dim=1)
    units = [F.normalize(u, dim=1) for u in (u_img, u_txt)]
    proxy = sum(((1 - u @ P.t()) * pos).sum() / pos.sum().clamp(min=1)
                + (F.relu(u @ P.t() - loss.delta) * neg).sum() / neg.sum().clamp(min=1) for u in units)
    multi = (labels.sum(dim=1) > 1).to(labels.dtype)
    pairs = (labels @ labels.t() == 0).to(labels.dtype) * multi[:, None] * multi[None, :]
    img, txt = units
    sep = sum((F.relu(a @ b.t() - loss.delta) * pairs).sum() / pairs.sum().clamp(min=1)
              for a, b in ((img, img), (txt, txt), (img, txt)))
    return proxy, loss.alpha * sep


def random_case(n=12, classes=7, bits=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, classes, generator=g) < 0.3).float()
    labels[0] = 0
    labels[0, 0] = labels[0, 1] = 1          # at least two multi-label rows sharing no label
    labels[1] = 0
    labels[1, 2] = labels[1, 3] = 1
    return torch.randn(n, bits, generator=g), torch.randn(n, bits, generator=g), labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hyp_loss_matches_the_loop_reference(seed):
    torch.manual_seed(seed)
    loss = HyPProxyLoss(num_classes=7, bits=8, delta=0.1)
    u_img, u_txt, labels = random_case(seed=seed)
    with torch.no_grad():
        out = loss(u_img, u_txt, labels)
    proxy, sep = loop_reference(loss, u_img, u_txt, labels)
    assert sep > 0
    assert abs(float(out["proxy"]) - proxy) < 1e-5
    assert abs(float(out["separation"]) - sep) < 1e-5


def test_no_disjoint_multi_label_pair_gives_zero_separation_with_zero_gradient():
    loss = HyPProxyLoss(num_classes=4, bits=8)
    labels = torch.eye(4)[[0, 1, 2, 3, 0, 1]]          # single-label rows only
    u = torch.randn(6, 8, requires_grad=True)
    out = loss(u, u * 2, labels)
    assert float(out["separation"].detach()) == 0.0
    out["separation"].backward()
    assert torch.count_nonzero(u.grad) == 0


def test_gradients_equal_the_gathered_form():
    torch.manual_seed(3)
    loss = HyPProxyLoss(num_classes=7, bits=8, delta=0.1)
    u_img, u_txt, labels = random_case(seed=3)
    grads = []
    for form in ("masked", "gathered"):
        a, b = u_img.clone().requires_grad_(), u_txt.clone().requires_grad_()
        loss.proxies.grad = None
        total = sum(loss(a, b, labels).values()) if form == "masked" else gathered_form(loss, a, b, labels)
        total.backward()
        grads.append((a.grad, b.grad, loss.proxies.grad.clone()))
    for masked, gathered in zip(*grads):
        torch.testing.assert_close(masked, gathered, rtol=1e-5, atol=1e-7)


def dsph_sized_case(seed=0, n=128, bits=64, classes=80, dtype=torch.float32):
    """A DSPH coco.yaml-sized batch: one to four labels per sample, one code row zero
    (its norm is clamped, as F.normalize clamps it)."""
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, classes, generator=g) < 0.03).to(dtype)
    labels[torch.arange(n), torch.randint(0, classes, (n,), generator=g)] = 1
    u_img, u_txt = (torch.randn(n, bits, generator=g, dtype=dtype).tanh() for _ in range(2))
    u_img[5] = 0
    return u_img, u_txt, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_and_gradients_equal_the_autograd_form(dtype):
    torch.manual_seed(4)
    loss = HyPProxyLoss(num_classes=80, bits=64, delta=0.1).to(dtype)
    u_img, u_txt, labels = dsph_sized_case(dtype=dtype)
    results = []
    for form in (lambda a, b: autograd_form(loss, a, b, labels), lambda a, b: tuple(loss(a, b, labels).values())):
        a, b = u_img.clone().requires_grad_(), u_txt.clone().requires_grad_()
        proxy, sep = form(a, b)
        assert float(sep.detach()) > 0
        grads = torch.autograd.grad(proxy + sep, [a, b, loss.proxies])
        results.append(((proxy.detach(), sep.detach()), grads))
    rtol = 1e-5 if dtype == torch.float32 else 1e-12   # the sums run in another order
    for ref, new in zip(results[0][0] + results[0][1], results[1][0] + results[1][1]):
        torch.testing.assert_close(new, ref, rtol=rtol, atol=rtol * float(ref.abs().max()))
    assert results[1][1][0][5].abs().max() > 1e6   # the clamped row's gradient is g / eps, as autograd's


def test_written_out_backward_passes_gradcheck():
    u_img, u_txt, labels = (t.double() for t in random_case(n=9, classes=5, bits=6, seed=5))
    proxies = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    u_img.requires_grad_(), u_txt.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, p: _HyPTerms.apply(a, b, p, labels, 0.1, 0.8),
                                    (u_img, u_txt, proxies))


def test_backward_leaves_what_it_saved_intact():
    """A second backward through the same graph (retain_graph) gives the same gradients."""
    loss = HyPProxyLoss(num_classes=80, bits=64, delta=0.1)
    u_img, u_txt, labels = dsph_sized_case(seed=1)
    u_img.requires_grad_()
    total = sum(loss(u_img, u_txt, labels).values())
    first = torch.autograd.grad(total, [u_img, loss.proxies], retain_graph=True)
    second = torch.autograd.grad(total, [u_img, loss.proxies])
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_under_autocast_the_loss_runs_in_float32_and_gradients_reach_bf16_codes():
    loss = HyPProxyLoss(num_classes=80, bits=64, delta=0.1)
    u_img, u_txt, labels = dsph_sized_case(seed=2)
    a = u_img.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(a, u_txt.bfloat16(), labels)
    assert all(v.dtype == torch.float32 for v in out.values())
    reference = loss(a.detach().float(), u_txt.bfloat16().float(), labels)
    for k in out:
        assert torch.equal(out[k], reference[k])
    sum(out.values()).backward()
    assert a.grad.dtype == torch.bfloat16 and a.grad.abs().sum() > 0


def test_codes_of_different_shapes_are_refused():
    loss = HyPProxyLoss(num_classes=4, bits=8)
    with pytest.raises(ValueError, match="one shape"):
        loss(torch.randn(6, 8), torch.randn(5, 8), torch.eye(4)[[0, 1, 2, 3, 0, 1]])
