"""DSPH's HyP proxy loss against a brute-force reference (loops over samples, labels
and pairs), and against the boolean-indexing form it replaced (same gradients)."""
import pytest
import torch
import torch.nn.functional as F

from models.dsph import HyPProxyLoss


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
