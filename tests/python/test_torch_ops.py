# SPDX-License-Identifier: Apache-2.0
"""Tests of the PyTorch ops factorllm.torch (python/factorllm/torch.py, python/src/torch_ops.cpp): every op and every gradient against a plain PyTorch
implementation written from the spec, torch.autograd.gradcheck in float64 (the scalar oracle), float32 (cpu_simd)
within stated tolerances, bitwise determinism across thread counts, and refusal of bad inputs. Every comparison
with the reference holds for any BLAS the reference's torch links (see "Tolerances" below); ctest runs the file
twice, `torch_ops` on Debian's reference BLAS and `torch_ops_openblas` on OpenBLAS, each asserting which BLAS it got
(FACTORLLM_EXPECT_BLAS).

Run: PYTHONPATH=build/python /usr/bin/python3 tests/python/test_torch_ops.py         (ctest runs it as `torch_ops` and `torch_ops_openblas`)
FACTORLLM_EXPECT_BLAS=reference|openblas: refuse to run unless torch really uses that BLAS (ctest sets it, together
with LD_LIBRARY_PATH). FACTORLLM_TOL_REPORT=1: print every comparison's error and bound (the tightest few always are).
"""
import math
import os
import sys
import unittest

import torch
import torch.nn.functional as F

_REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.join(_REPO, "tools", "python"))  # tools/python/factorllm_locate.py finds the package
from factorllm_locate import import_factorllm_torch  # noqa: E402

fllm = import_factorllm_torch(_REPO)

torch.set_num_threads(2)
SEED = 2023  # fixed; printed by main()


def check_expected_blas():
    """FACTORLLM_EXPECT_BLAS=openblas|reference: the BLAS torch mapped must be that one, so that a run meant for one
    BLAS (ctest torch_ops_openblas, torch_ops) cannot silently run on the other. Returns what is mapped."""
    torch.ones(2, 2, dtype=torch.float64) @ torch.ones(2, 2, dtype=torch.float64)  # BLAS really in use
    mapped = fllm.blas_in_use()
    expect = os.environ.get("FACTORLLM_EXPECT_BLAS", "")
    if expect == "openblas":
        ok = "openblas" in mapped and "/blas/libblas.so" not in mapped
    elif expect == "reference":  # Debian's libblas3: /usr/lib/<triplet>/blas/libblas.so.3.*
        ok = "/blas/libblas.so" in mapped and not any(w in mapped for w in ("openblas", "mkl", "blis", "atlas"))
    elif expect:
        raise RuntimeError(f"FACTORLLM_EXPECT_BLAS must be 'openblas' or 'reference', got {expect!r}")
    else:
        ok = True
    if not ok:
        raise RuntimeError(f"FACTORLLM_EXPECT_BLAS={expect} but torch mapped {mapped or 'no BLAS'} "
                           f"(LD_LIBRARY_PATH={os.environ.get('LD_LIBRARY_PATH', '')!r})")
    return mapped


def setUpModule():
    check_expected_blas()


# ---- Tolerances (written down). They hold for any BLAS the reference's torch links (libblas.so.3: Debian's
# reference BLAS, OpenBLAS, MKL each sum in their own order). Every compared quantity q (tensor or scalar, in the
# L2 / Frobenius norm) must satisfy
#     ||q_ours - q_ref|| <= rtol * ||q_ref|| + floor,   floor = FLOOR_C * eps(dtype) * sqrt(depth) * ||M_q||.
# rtol is the stated accuracy where q is well away from zero. The floor is the rounding noise any implementation
# has: rounding errors of random sign add in quadrature, so a sum of n products a_i b_i is off by ~ eps sqrt(n)
# sqrt(sum (a_i b_i)^2) (Higham & Mary's probabilistic analysis), and M_q is the computation of q carried out that way:
# each product A B becomes sqrt(A^2 B^2) (rss() below), a softmax backward p (g - <g, p>) becomes
# p sqrt(g^2 + <g^2, p^2>). M_q is about |q| where nothing cancels (the floor then adds little to rtol: eps sqrt(depth)
# FLOOR_C ~ 5e-15 in float64, 3e-6 in float32) and the size of the terms before the cancellation where q cancels,
# above all where q is zero in exact arithmetic: the router gradient at K = 1 in softmax_topk_renorm (w = p / p = 1),
# the balance-loss gradient at K = N (the softmax sums to 1). There the reference returns its own rounding noise, and
# an error relative to it is meaningless: with rtol alone the float64 K = 1 router gradient (ours exactly 0, the
# reference ~1e-16 with Debian's reference BLAS, 1.3e-15 with OpenBLAS) met 1e-12 relative (to a norm clamped at
# 1e-3) with one BLAS and not the other. eps is that of the dtype under test (a float32 run is compared with a float64
# reference: its own noise dominates); depth is the longest reduction in the computation; FLOOR_C = 4 covers both
# sides' noise and what the factors carry (measured: error <= 0.45 floor for every q, on both BLAS). The floor still
# refuses real errors: in float64 it is < 1e-9 everywhere here, and ToleranceSelfCheckTest shows that a gradient (even
# a zero-in-exact-arithmetic one) off by 1e-6 in one entry, or in float32 by 1e-3 of its scale ||M||, fails.
# Discrete choices compared exactly (top-k routing, PAR pseudo-labels) must be well posed for any BLAS too: the
# reference's top-k gap must exceed twice the floor of the scores (assert_topk_margin), else no tolerance helps.
EPS = {torch.float64: torch.finfo(torch.float64).eps, torch.float32: torch.finfo(torch.float32).eps}
FLOOR_C = 4.0
COMPARISONS = []  # (test, what, error, bound, floor) of every comparison; the tightest are printed at the end


def tolerance(ref, magnitude, rtol, dtype, depth):
    """(bound, floor) for comparing with `ref`: rtol * ||ref|| + FLOOR_C * eps(dtype) * sqrt(depth) * ||magnitude||."""
    floor = FLOOR_C * EPS[dtype] * math.sqrt(depth) * torch.as_tensor(magnitude).double().norm().item()
    return rtol * torch.as_tensor(ref).double().norm().item() + floor, floor


def compare(actual, ref, magnitude, rtol, dtype, depth):
    """(error, bound, floor): error = ||actual - ref|| (L2)."""
    err = (torch.as_tensor(actual).double() - torch.as_tensor(ref).double()).norm().item()
    return (err,) + tolerance(ref, magnitude, rtol, dtype, depth)


def assert_close(tc, what, actual, ref, magnitude, rtol, dtype, depth):
    err, bound, floor = compare(actual, ref, magnitude, rtol, dtype, depth)
    COMPARISONS.append((tc.id().rsplit(".", 1)[-1], what, err, bound, floor))
    tc.assertLessEqual(err, bound, f"{what}: ||ours - ref|| = {err:.3g} > {rtol:g} ||ref|| + floor {floor:.3g} "
                                   f"= {bound:.3g}")


def assert_topk_margin(tc, what, scores, k, magnitude, dtype, depth, ordered=False):
    """The reference's top-k of `scores` [rows, n] must be decided by more than rounding noise: the gap between the
    k-th and (k+1)-th score (every consecutive gap of the first k + 1 when the order matters) exceeds twice the
    floor of that row's scores (each side's noise), `magnitude` [rows, n] being their M."""
    n = scores.shape[1]
    if k >= n and not ordered:
        return
    top = scores.detach().double().topk(min(k + 1, n), dim=1).values
    gaps = top[:, :-1] - top[:, 1:] if ordered else top[:, k - 1:k] - top[:, k:k + 1]
    noise = 2 * FLOOR_C * EPS[dtype] * math.sqrt(depth) * magnitude.detach().double().amax(1, keepdim=True)
    ratio = (gaps / noise).min().item()
    tc.assertGreater(ratio, 1.0, f"{what}: the top-{k} choice has a near-tie (gap / noise = {ratio:.3g}): "
                                 "another BLAS may choose differently; change the seed")


def tearDownModule():
    rows = sorted(COMPARISONS, key=lambda r: r[2] / r[3] if r[3] > 0 else 0.0, reverse=True)
    if not os.environ.get("FACTORLLM_TOL_REPORT"):
        rows = rows[:6]
    print(f"\n{'test':<48} {'quantity':<62} {'error':>9} {'bound':>9} {'floor':>9} {'err/bound':>9}")
    for test, what, err, bound, floor in rows:
        print(f"{test:<48} {what:<62} {err:9.2e} {bound:9.2e} {floor:9.2e} {err / bound if bound else 0:9.2e}")


# ---- Plain PyTorch references (docs/math.md §2.3, 3.2), computing every expert on every token then masking (paper code). ----

def ref_weights(z, ids, mode, scale, renorm):
    n, k = z.shape[1], ids.shape[1]
    zs = z.gather(1, ids)
    if mode == "code_ref":
        w = torch.full_like(zs, float(n // k))
    elif mode == "softmax_topk":
        w = torch.softmax(z, dim=1).gather(1, ids)
    elif mode == "softmax_topk_renorm":
        p = torch.softmax(z, dim=1).gather(1, ids)
        w = p / p.sum(1, keepdim=True)
    elif mode == "topk_softmax":
        w = torch.softmax(zs, dim=1)
    else:
        w = torch.sigmoid(zs)
        if renorm:
            w = w / w.sum(1, keepdim=True)
    return w * scale


def ref_experts(x, gate, up, down):
    h = F.silu(torch.einsum("td,nmd->tnm", x, gate)) * torch.einsum("td,nmd->tnm", x, up)
    return torch.einsum("tnm,ndm->tnd", h, down)  # [T, N, d]


def ref_moe_parts(x, rw, rb, gate, up, down, mode, k, scale=1.0, renorm=False, bias=None):
    """ref_moe with its intermediates (for the tolerances' magnitudes)."""
    z = x @ rw.t() + rb
    score = z if bias is None else z + bias
    ids = torch.topk(score.detach(), k, dim=1).indices
    w = ref_weights(z, ids, mode, scale, renorm)
    u, v = torch.einsum("td,nmd->tnm", x, gate), torch.einsum("td,nmd->tnm", x, up)
    h = F.silu(u) * v
    o = torch.einsum("tnm,ndm->tnd", h, down)  # ref_experts
    picked = o.gather(1, ids[:, :, None].expand(-1, -1, o.shape[2]))  # [T, K, d]
    return (w[:, :, None] * picked).sum(1), ids, dict(score=score, w=w, u=u, v=v, h=h)


def ref_moe(x, rw, rb, gate, up, down, mode, k, scale=1.0, renorm=False, bias=None):
    y, ids, _ = ref_moe_parts(x, rw, rb, gate, up, down, mode, k, scale, renorm, bias)
    return y, ids


def rss(eq, *ts):
    """A product on magnitudes, in quadrature: sqrt(einsum(eq, A^2, B^2, ...)) (see Tolerances)."""
    return torch.einsum(eq, *(t.detach().double() ** 2 for t in ts)).sqrt()


def moe_magnitudes(x, dy, rw, rb, gate, up, down, ids, parts, mode, scale, bias=None):
    """M_q (see Tolerances) of the MoE output and of each gradient of <y, dy>, from the reference's float64
    intermediates. The router gradients cancel (exactly at K = 1 in softmax_topk_renorm: w = p / p): their M starts
    from the gradient reaching the combine weights, dL/dw_tk = dy_t . o_tk, times |scale| (the weights' Jacobian
    w.r.t. the logits is bounded by |scale| in every mode), on every logit of the token."""
    x, dy, rw, rb, gate, up, down = (t.detach().double() for t in (x, dy, rw, rb, gate, up, down))
    u, v, h = (parts[n].detach().double() for n in ("u", "v", "h"))
    t_, n_ = u.shape[0], u.shape[1]
    sel = torch.zeros(t_, n_, dtype=torch.float64).scatter(1, ids, 1.0)
    wd = torch.zeros(t_, n_, dtype=torch.float64).scatter(1, ids, parts["w"].detach().double()).abs()
    m_o = rss("tnm,ndm->tnd", h, down)  # each expert's output
    m_do = wd[:, :, None] * dy[:, None, :].abs()  # dL/do, exact products
    m_dh = rss("tnd,ndm->tnm", m_do, down)
    sg = torch.sigmoid(u)
    m_du = m_dh * (v * sg * (1 + u * (1 - sg))).abs()  # dh silu'(u) v
    m_dv = m_dh * (u * sg).abs()  # dh silu(u)
    if mode == "code_ref":
        m_dz = torch.zeros(t_, n_, dtype=torch.float64)  # no router gradient (asserted exactly zero)
    else:
        m_c = rss("td,tnd->tn", dy, m_o)
        m_dz = (abs(scale) * (m_c ** 2 * sel).sum(1, keepdim=True).sqrt()).expand(t_, n_)
    z2 = rss("td,nd->tn", x, rw) ** 2 + rb ** 2 + (0 if bias is None else bias.detach().double() ** 2)
    return dict(y=rss("tn,tnd->td", wd, m_o),
                x=(rss("tnm,nmd->td", m_du, gate) ** 2 + rss("tnm,nmd->td", m_dv, up) ** 2 +
                   rss("tn,nd->td", m_dz, rw) ** 2).sqrt(),
                router_weight=rss("tn,td->nd", m_dz, x), router_bias=(m_dz ** 2).sum(0).sqrt(),
                gate=rss("tnm,td->nmd", m_du, x), up=rss("tnm,td->nmd", m_dv, x), down=rss("tnd,tnm->ndm", m_do, h),
                score=z2.sqrt())


def ref_par(x, dg, du, dd, gate, up, down, rw, rb, k, clip=1e-7):
    n = gate.shape[0]
    s = n // k
    z = x @ rw.t() + rb
    p = torch.softmax(z, dim=1)
    f = (F.silu(x @ dg.t()) * (x @ du.t())) @ dd.t()
    e = ref_experts(x, gate, up, down)
    mse = ((e - f[:, None, :] / s) ** 2).mean(-1)
    labels = torch.topk(-mse, k, dim=1).indices
    q = torch.softmax(torch.zeros_like(p).scatter(1, labels, 1.0), dim=1)
    ph, qh = p.clamp(clip, 1 - clip), q.clamp(clip, 1 - clip)
    par = (ph * (ph / qh).log()).sum(1).mean()
    sel = torch.topk(z.detach(), k, dim=1).indices
    bal = (torch.zeros_like(p).scatter(1, sel, 1.0) * p).mean()
    acc = (labels.sort(1).values == sel.sort(1).values).all(1).double().mean()
    return par, bal, acc, labels


def softmax_backward_magnitude(p, g):
    """M of the softmax backward p (g - <g, p>) for a gradient g w.r.t. p (in quadrature)."""
    return p * (g ** 2 + (g ** 2 * p ** 2).sum(1, keepdim=True)).sqrt()


def par_magnitudes(x, dg, du, dd, gate, up, down, rw, rb, k, loss_weights, clip=1e-7):
    """M_q (see Tolerances) of the PAR loss, the balance term and the router gradients of
    loss_weights[0] * par + loss_weights[1] * bal; also the M of the logits and of the experts' MSE to the dense
    output (for the margins of the selection and of the pseudo-labels), with their reference values."""
    x, dg, du, dd, gate, up, down, rw, rb = (t.detach().double() for t in (x, dg, du, dd, gate, up, down, rw, rb))
    n, t_ = gate.shape[0], x.shape[0]
    s = n // k
    z = x @ rw.t() + rb
    p = torch.softmax(z, dim=1)
    hd = F.silu(x @ dg.t()) * (x @ du.t())
    f, m_f = hd @ dd.t(), rss("tf,df->td", hd, dd)
    h = F.silu(torch.einsum("td,nmd->tnm", x, gate)) * torch.einsum("td,nmd->tnm", x, up)
    e, m_e = torch.einsum("tnm,ndm->tnd", h, down), rss("tnm,ndm->tnd", h, down)
    diff = e - f[:, None, :] / s
    mse = (diff ** 2).mean(-1)
    m_mse = (4 * diff ** 2 * (m_e ** 2 + m_f[:, None, :] ** 2 / s ** 2)).sum(-1).sqrt() / diff.shape[-1]
    labels = torch.topk(-mse, k, dim=1).indices
    q = torch.softmax(torch.zeros_like(p).scatter(1, labels, 1.0), dim=1)
    ph, qh = p.clamp(clip, 1 - clip), q.clamp(clip, 1 - clip)
    log_ratio = (ph / qh).log()
    sel = torch.zeros_like(p).scatter(1, torch.topk(z, k, dim=1).indices, 1.0)
    inside = ((p > clip) & (p < 1 - clip)).double()
    g = loss_weights[0] / t_ * (log_ratio + 1) * inside + loss_weights[1] / p.numel() * sel  # dL/dp
    m_dz = softmax_backward_magnitude(p, g)
    return dict(par=(ph * log_ratio).norm() / t_, bal=(sel * p).norm() / p.numel(),
                router_weight=rss("tn,td->nd", m_dz, x), router_bias=(m_dz ** 2).sum(0).sqrt(),
                z=(rss("td,nd->tn", x, rw) ** 2 + rb ** 2).sqrt(), z_value=z, mse=m_mse, mse_value=mse), \
        max(x.shape[1], dd.shape[1], t_)


def ref_balance(z, k):
    p = torch.softmax(z, dim=1)
    sel = torch.topk(z.detach(), k, dim=1).indices
    return (torch.zeros_like(p).scatter(1, sel, 1.0) * p).mean()


def make_layer(n, m, d, dtype, seed, router_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(n, m, d, generator=g, dtype=dtype) / d ** 0.5
    up = torch.randn(n, m, d, generator=g, dtype=dtype) / d ** 0.5
    down = torch.randn(n, d, m, generator=g, dtype=dtype) / (n * m) ** 0.5
    rw = torch.randn(n, d, generator=g, dtype=dtype) * router_scale
    rb = torch.randn(n, generator=g, dtype=dtype) * router_scale
    return rw, rb, gate, up, down


MOE_GRADS = ("x", "router_weight", "router_bias", "gate", "up", "down")


def run_moe_case(dtype, mode, n, k, scale, renorm, t=37, m=24, d=40, seed=SEED):
    """Reference (float64) and ours (dtype) forward and backward of <y, dy>, and the M of each quantity."""
    params = make_layer(n, m, d, torch.float64, seed)
    x = torch.randn(t, d, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    dy = torch.randn(t, d, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64)
    ref_in = [v.detach().clone().requires_grad_() for v in (x,) + params]
    y_ref, ids_ref, parts = ref_moe_parts(*ref_in, mode, k, scale, renorm)
    y_ref.backward(dy)
    ours_in = [v.detach().to(dtype).clone().requires_grad_() for v in (x,) + params]
    y = fllm.moe_ffn(*ours_in, mode=mode, top_k=k, output_scale=scale, sigmoid_renormalize=renorm)
    y.backward(dy.to(dtype))
    mags = moe_magnitudes(x, dy, *params, ids_ref, parts, mode, scale)
    return ref_in, y_ref, ours_in, y, parts["score"], mags, max(t, m, d)


class MoeFfnTest(unittest.TestCase):
    # Tolerances (see "Tolerances" at the top): float64 runs the scalar oracle (double accumulation): rtol 1e-12
    # against the float64 reference. float32 runs cpu_simd (float accumulation, GEMM depths <= 96): rtol 1e-5 for
    # outputs and 5e-5 for gradients against the float64 reference. Plus, for both, the floor.
    CASES = [("code_ref", 4, 2, 1.0, False), ("softmax_topk", 4, 2, 1.0, False), ("softmax_topk_renorm", 4, 2, 1.5, False),
             ("topk_softmax", 3, 2, 1.0, False), ("sigmoid_topk", 4, 2, 1.0, False), ("sigmoid_topk", 4, 3, 0.5, True),
             ("softmax_topk_renorm", 4, 1, 1.0, False), ("softmax_topk_renorm", 4, 4, 1.0, False)]
    TOLS = ((torch.float64, 1e-12, 1e-12), (torch.float32, 1e-5, 5e-5))

    def test_forward_and_gradients_match_plain_pytorch(self):
        for dtype, tol_y, tol_g in self.TOLS:
            for mode, n, k, scale, renorm in self.CASES:
                with self.subTest(dtype=dtype, mode=mode, n=n, k=k):
                    ref_in, y_ref, ours_in, y, score, mags, depth = run_moe_case(dtype, mode, n, k, scale, renorm)
                    case = f"{str(dtype)[6:]} {mode} N{n} K{k}"
                    assert_topk_margin(self, f"{case} routing", score, k, mags["score"], dtype, depth)
                    assert_close(self, f"{case} y", y, y_ref, mags["y"], tol_y, dtype, depth)
                    for name, a, b in zip(MOE_GRADS, ours_in, ref_in):
                        if mode == "code_ref" and name.startswith("router"):
                            self.assertEqual(a.grad.abs().max().item(), 0.0, name)  # no router gradient (docs/math.md §2.3)
                            continue
                        assert_close(self, f"{case} d{name}", a.grad, b.grad, mags[name], tol_g, dtype, depth)

    def test_moe_infer_matches_reference_and_moe_ffn(self):
        # moe_infer is the inference op (on CUDA tensors: the CUDA backend, docs/python.md "CUDA tensors"); on the CPU
        # it runs moe_forward's kernels: float64 against the plain float64 reference (rtol 1e-12 of the output
        # scale), float32 bitwise equal to moe_ffn's forward.
        for mode, n, k, scale, renorm in self.CASES[:5]:
            with self.subTest(mode=mode, n=n, k=k):
                rw, rb, gate, up, down = make_layer(n, 24, 40, torch.float64, SEED)
                x = torch.randn(3, 11, 40, generator=torch.Generator().manual_seed(SEED + 5), dtype=torch.float64)
                y = fllm.moe_infer(x, rw, rb, gate, up, down, mode=mode, top_k=k, output_scale=scale,
                                   sigmoid_renormalize=renorm)
                y_ref = ref_moe(x.view(-1, 40), rw, rb, gate, up, down, mode, k, scale, renorm)[0].view(x.shape)
                self.assertEqual(y.shape, x.shape)
                self.assertLessEqual((y - y_ref).abs().max().item(), 1e-12 * max(y_ref.abs().max().item(), 1.0))
                f32 = [v.float() for v in (x, rw, rb, gate, up, down)]
                self.assertTrue(torch.equal(
                    fllm.moe_infer(*f32, mode=mode, top_k=k, output_scale=scale, sigmoid_renormalize=renorm),
                    fllm.moe_ffn(*f32, mode=mode, top_k=k, output_scale=scale, sigmoid_renormalize=renorm)))

    def test_leading_dims_and_save_activations(self):
        rw, rb, gate, up, down = make_layer(4, 16, 32, torch.float32, 5)
        x = torch.randn(3, 5, 32)
        y1 = fllm.moe_ffn(x, rw, rb, gate, up, down, top_k=2, save_activations=True)
        y2 = fllm.moe_ffn(x.view(15, 32), rw, rb, gate, up, down, top_k=2, save_activations=False)
        self.assertEqual(tuple(y1.shape), (3, 5, 32))
        self.assertTrue(torch.equal(y1.view(15, 32), y2))

    def test_gradcheck_float64(self):
        for mode, n, k, renorm in (("softmax_topk_renorm", 4, 2, False), ("softmax_topk", 3, 1, False),
                                   ("sigmoid_topk", 4, 2, True), ("code_ref", 4, 2, False), ("topk_softmax", 4, 3, False)):
            with self.subTest(mode=mode):
                params = make_layer(n, 3, 5, torch.float64, SEED + n)
                x = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(SEED))
                inputs = tuple(v.clone().requires_grad_() for v in (x,) + params)
                for save in (False, True):
                    fn = lambda *a: fllm.MoeFfnFunction.apply(*a, mode, k, 1.0, renorm, None, save)  # noqa: E731
                    self.assertTrue(torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5))

    def test_selection_bias_moves_choice_not_weights(self):
        rw, rb, gate, up, down = make_layer(4, 8, 16, torch.float64, 7)
        x = torch.randn(9, 16, dtype=torch.float64)
        bias = torch.tensor([100.0, 0.0, 0.0, 0.0], dtype=torch.float64)
        y = fllm.moe_ffn(x, rw, rb, gate, up, down, mode="softmax_topk", top_k=1, selection_bias=bias)
        y_ref, ids, parts = ref_moe_parts(x, rw, rb, gate, up, down, "softmax_topk", 1, bias=bias)
        self.assertTrue(bool((ids == 0).all()))
        mags = moe_magnitudes(x, torch.zeros_like(x), rw, rb, gate, up, down, ids, parts, "softmax_topk", 1.0, bias)
        assert_topk_margin(self, "selection", parts["score"], 1, mags["score"], torch.float64, 16)
        assert_close(self, "y", y, y_ref, mags["y"], 1e-12, torch.float64, 16)

    def test_routing_ids_match_reference_topk(self):
        rw, rb, gate, up, down = make_layer(8, 8, 16, torch.float32, 8)
        x = torch.randn(50, 16)
        _, routing = torch.ops.factorllm.moe_forward(x, rw, rb, gate, up, down, "softmax_topk_renorm", 3, 1.0, False,
                                                     None, False)
        z_ref = x @ rw.t() + rb  # float32 too: both sides' noise is float32's
        ids_ref = torch.topk(z_ref, 3, dim=1).indices
        assert_topk_margin(self, "routing ids (ordered)", z_ref, 3, (rss("td,nd->tn", x, rw) ** 2 + rb ** 2).sqrt(),
                           torch.float32, 16, ordered=True)
        self.assertTrue(torch.equal(routing.ids().long(), ids_ref))
        self.assertEqual(int(routing.load().sum()), 150)
        self.assertEqual(routing.n_tokens(), 50)

    def test_bitwise_deterministic_across_threads(self):
        rw, rb, gate, up, down = make_layer(4, 200, 160, torch.float32, 9)
        x = torch.randn(300, 160, generator=torch.Generator().manual_seed(1))
        dy = torch.randn(300, 160, generator=torch.Generator().manual_seed(2))
        outs = []
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            ins = [v.clone().requires_grad_() for v in (x, rw, rb, gate, up, down)]
            y = fllm.moe_ffn(*ins, top_k=2)
            y.backward(dy)
            outs.append([y.detach()] + [v.grad for v in ins])
        torch.set_num_threads(2)
        for a, b in zip(outs[0], outs[1]):
            self.assertTrue(torch.equal(a, b))
        for a, b in zip(outs[1], outs[2]):
            self.assertTrue(torch.equal(a, b))


class ToleranceSelfCheckTest(unittest.TestCase):
    """The floors absorb rounding noise only: the comparisons above still refuse real errors, including in the
    gradients that are zero in exact arithmetic (where the floor is all there is)."""

    def test_floor_rejects_a_perturbed_gradient(self):
        for dtype, rtol in ((torch.float64, 1e-12), (torch.float32, 5e-5)):
            for mode, n, k, scale, renorm in (("softmax_topk_renorm", 4, 1, 1.0, False),
                                              ("softmax_topk_renorm", 4, 2, 1.5, False)):
                ref_in, _, ours_in, _, _, mags, depth = run_moe_case(dtype, mode, n, k, scale, renorm)
                for name, a, b in zip(MOE_GRADS, ours_in, ref_in):
                    with self.subTest(dtype=dtype, k=k, grad=name):
                        ours = a.grad.double()
                        err, bound, floor = compare(ours, b.grad, mags[name], rtol, dtype, depth)
                        self.assertLessEqual(err, bound)  # as compared above
                        # float64: one entry off by 1e-6; float32: off by 1e-3 of the gradient's scale ||M||
                        delta = 1e-6 if dtype == torch.float64 else 1e-3 * mags[name].norm().item()
                        bad = ours.clone()
                        bad.view(-1)[bad.numel() // 2] += delta
                        err, bound, floor = compare(bad, b.grad, mags[name], rtol, dtype, depth)
                        self.assertGreater(err, bound, f"a perturbation of {delta:.3g} passed (bound {bound:.3g})")
                        if dtype == torch.float64:
                            self.assertLess(floor, 1e-9)


class RouterLossTest(unittest.TestCase):
    def problem(self, dtype, n=4, k=2, t=29, d=12, m=6, seed=SEED):
        g = torch.Generator().manual_seed(seed)
        dff = n * m
        dg = torch.randn(dff, d, generator=g, dtype=torch.float64) / d ** 0.5
        du = torch.randn(dff, d, generator=g, dtype=torch.float64) / d ** 0.5
        dd = torch.randn(d, dff, generator=g, dtype=torch.float64) / dff ** 0.5
        perm = torch.randperm(dff, generator=g)
        gate, up, down = fllm.factorize(dg, du, dd, n, perm)
        x = torch.randn(t, d, generator=g, dtype=torch.float64)
        rw = torch.randn(n, d, generator=g, dtype=torch.float64) * 0.5
        rb = torch.randn(n, generator=g, dtype=torch.float64) * 0.5
        return [v.to(dtype) for v in (x, dg, du, dd, gate, up, down, rw, rb)]

    def test_factorize_matches_library_semantics(self):
        x, dg, du, dd, gate, up, down, _, _ = self.problem(torch.float64)
        hd = F.silu(x @ dg.t()) * (x @ du.t())
        f = hd @ dd.t()
        # sum of all experts = dense (docs/math.md §1.2); both sides are torch's (its BLAS sums in its own order)
        assert_close(self, "sum of experts", ref_experts(x, gate, up, down).sum(1), f, rss("tf,df->td", hd, dd), 1e-13,
                     torch.float64, dd.shape[1])

    def test_par_loss_matches_plain_pytorch(self):
        # Tolerances (see "Tolerances" at the top): float64 (oracle) rtol 1e-12 on losses and gradients; float32
        # inputs (the oracle still accumulates in double, results rounded to float) rtol 1e-5. Plus the floor.
        for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
            for n, k in ((4, 1), (4, 2), (4, 3), (3, 3)):
                with self.subTest(dtype=dtype, n=n, k=k):
                    x, dg, du, dd, gate, up, down, rw, rb = self.problem(dtype, n=n, k=k)
                    r_rw, r_rb = rw.detach().double().clone().requires_grad_(), rb.detach().double().clone().requires_grad_()
                    par_r, bal_r, acc_r, lab_r = ref_par(x.double(), dg.double(), du.double(), dd.double(), gate.double(),
                                                         up.double(), down.double(), r_rw, r_rb, k)
                    (0.05 * par_r + 0.01 * bal_r).backward()
                    o_rw, o_rb = rw.detach().clone().requires_grad_(), rb.detach().clone().requires_grad_()
                    par, bal, acc, labels = fllm.par_loss(x, dg, du, dd, gate, up, down, o_rw, o_rb, k)
                    (0.05 * par + 0.01 * bal).backward()
                    mags, depth = par_magnitudes(x, dg, du, dd, gate, up, down, rw, rb, k, (0.05, 0.01))
                    case = f"{str(dtype)[6:]} N{n} K{k}"
                    assert_topk_margin(self, f"{case} labels", -mags["mse_value"], k, mags["mse"], dtype, depth)
                    assert_topk_margin(self, f"{case} selection", mags["z_value"], k, mags["z"], dtype, depth)
                    assert_close(self, f"{case} par", par, par_r, mags["par"], tol, dtype, depth)
                    assert_close(self, f"{case} bal", bal, bal_r, mags["bal"], tol, dtype, depth)
                    self.assertAlmostEqual(acc.item(), acc_r.item(), places=6)
                    self.assertTrue(torch.equal(labels.long(), lab_r))
                    for name, ours, ref in (("router_weight", o_rw, r_rw), ("router_bias", o_rb, r_rb)):
                        assert_close(self, f"{case} d{name}", ours.grad, ref.grad, mags[name], tol, dtype, depth)

    def test_par_gradcheck_float64(self):
        x, dg, du, dd, gate, up, down, rw, rb = self.problem(torch.float64)
        fn = lambda w, b: fllm.par_loss(x, dg, du, dd, gate, up, down, w, b, 2)[:2]  # noqa: E731
        self.assertTrue(torch.autograd.gradcheck(fn, (rw.requires_grad_(), rb.requires_grad_()), eps=1e-6, atol=1e-8))

    def test_balance_loss_matches_plain_pytorch_and_gradcheck(self):
        # rtol: float64 1e-13 (value), 1e-12 (gradient); float32 1e-6. At K = N the gradient is zero in exact
        # arithmetic (the softmax sums to 1): only the floor applies there.
        for dtype, tol, tol_g in ((torch.float64, 1e-13, 1e-12), (torch.float32, 1e-6, 1e-6)):
            z = torch.randn(3, 11, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
            for k in (1, 2, 5):
                zr = z.view(33, 5).clone().requires_grad_()
                ref = ref_balance(zr, k)
                ref.backward()
                zo = z.detach().to(dtype).clone().requires_grad_()
                out = fllm.balance_loss(zo, k)
                out.backward()
                p = torch.softmax(z.view(33, 5), dim=1)
                sel = torch.zeros_like(p).scatter(1, torch.topk(z.view(33, 5), k, dim=1).indices, 1.0)
                case = f"{str(dtype)[6:]} K{k}"
                assert_topk_margin(self, f"{case} selection", z.view(33, 5), k, z.view(33, 5).abs(), dtype, 5)
                assert_close(self, f"{case} bal", out, ref, (sel * p).norm() / p.numel(), tol, dtype, 5)
                assert_close(self, f"{case} dlogits", zo.grad.view(33, 5), zr.grad,
                             softmax_backward_magnitude(p, sel / p.numel()), tol_g, dtype, 5)
        zd = torch.randn(20, 4, dtype=torch.float64, requires_grad=True)
        self.assertTrue(torch.autograd.gradcheck(lambda v: fllm.balance_loss(v, 2), (zd,), eps=1e-6, atol=1e-8))


class BadInputTest(unittest.TestCase):
    def setUp(self):
        self.rw, self.rb, self.gate, self.up, self.down = make_layer(4, 8, 16, torch.float32, 3)
        self.x = torch.randn(10, 16)

    def call(self, x=None, **over):
        args = dict(x=self.x if x is None else x, router_weight=self.rw, router_bias=self.rb, gate=self.gate,
                    up=self.up, down=self.down)
        args.update(over)
        return fllm.moe_ffn(args["x"], args["router_weight"], args["router_bias"], args["gate"], args["up"],
                            args["down"], top_k=2)

    def assert_raises(self, exc, words, fn, *a, **kw):
        with self.assertRaises(exc) as cm:
            fn(*a, **kw)
        for w in words:
            self.assertIn(w, str(cm.exception))

    def test_wrong_dtype(self):
        self.assert_raises(TypeError, ["'gate'", "Float", "Double"], self.call, gate=self.gate.double())
        self.assert_raises(TypeError, ["'x'", "float32", "Half"], self.call, x=self.x.half())
        self.assert_raises(TypeError, ["'x'"], self.call, x=self.x.long())

    def test_wrong_shape(self):
        self.assert_raises(ValueError, ["'up'", "[4, 8, 16]", "[4, 8, 15]"], self.call, up=self.up[:, :, :15].contiguous())
        self.assert_raises(ValueError, ["'down'", "[4, 16, 8]"], self.call, down=self.gate)
        self.assert_raises(ValueError, ["'router_bias'", "[4]"], self.call, router_bias=torch.zeros(5))
        self.assert_raises(ValueError, ["'x'", "at least 2 dims"], self.call, x=torch.randn(16))
        self.assert_raises(ValueError, ["top_k", "[1, n_experts = 4]"], fllm.moe_ffn, self.x, self.rw, self.rb, self.gate,
                           self.up, self.down, top_k=5)
        self.assert_raises(ValueError, ["mode"], fllm.moe_ffn, self.x, self.rw, self.rb, self.gate, self.up, self.down,
                           mode="bogus")

    def test_non_contiguous_is_refused_not_copied(self):
        self.assert_raises(ValueError, ["'x'", "contiguous"], self.call, x=torch.randn(16, 10).t())
        g = torch.randn(4, 16, 8).transpose(1, 2)  # right shape, wrong layout
        self.assert_raises(ValueError, ["'gate'", "contiguous"], self.call, gate=g)
        self.assert_raises(ValueError, ["'router_weight'", "contiguous"], self.call, router_weight=torch.randn(16, 4).t())

    def test_wrong_device_and_layout(self):
        self.assert_raises(ValueError, ["'gate'", "CPU", "meta"], self.call, gate=torch.empty(4, 8, 16, device="meta"))
        sparse = torch.randn(4, 16).to_sparse()
        self.assert_raises(ValueError, ["'router_weight'", "strided"], self.call, router_weight=sparse)

    def test_routing_from_another_forward_is_refused(self):
        ops = torch.ops.factorllm
        x2 = torch.randn(10, 16)
        args = (self.rw, self.rb, self.gate, self.up, self.down)
        y1, r1 = ops.moe_forward(self.x, *args, "softmax_topk_renorm", 2, 1.0, False, None, False)
        y2, r2 = ops.moe_forward(x2, *args, "softmax_topk_renorm", 2, 1.0, False, None, False)
        dy = torch.ones(10, 16)
        ops.moe_backward(r1, self.x, dy, *args)  # its own forward: fine
        self.assert_raises(ValueError, ["'routing'", "another forward", "'x'"], ops.moe_backward, r1, x2, dy, *args)
        x3 = torch.randn(7, 16)
        self.assert_raises(ValueError, ["'routing'"], ops.moe_backward, r1, x3, torch.ones(7, 16), *args)
        self.gate.mul_(1.0)  # in-place change of a parameter after the forward (bumps its version)
        self.assert_raises(ValueError, ["'routing'", "'gate'", "modified in place"], ops.moe_backward, r2, x2, dy, *args)
        xd = self.x.double()
        argsd = tuple(a.double() for a in args)
        self.assert_raises(ValueError, ["'routing'", "float32"], ops.moe_backward, r1, xd, dy.double(), *argsd)

    def test_routing_is_tied_to_the_tensors_not_their_addresses(self):
        # A tensor at the address the forward's x had is not that x: two tensors over one buffer (from_numpy), and
        # a new tensor over the buffer after the forward's x is gone (what the allocator does when it reuses freed
        # memory), have the data address, shape and version 0 of the forward's x, yet are other tensors.
        ops = torch.ops.factorllm
        args = (self.rw, self.rb, self.gate, self.up, self.down)
        dy = torch.ones(10, 16)
        buf = self.x.numpy().copy()
        x1 = torch.from_numpy(buf)
        _, r1 = ops.moe_forward(x1, *args, "softmax_topk_renorm", 2, 1.0, False, None, False)
        ops.moe_backward(r1, x1.view(10, 16), dy, *args)  # a view of the forward's x at the same offset: fine
        alias = torch.from_numpy(buf)
        self.assertEqual(alias.data_ptr(), x1.data_ptr())
        self.assert_raises(ValueError, ["'routing'", "another forward", "'x'"], ops.moe_backward, r1, alias, dy, *args)
        del x1, alias
        x_new = torch.from_numpy(buf)
        self.assert_raises(ValueError, ["'routing'", "another forward", "'x'", "freed"], ops.moe_backward, r1, x_new, dy,
                           *args)
        # The same for a parameter: another layer's gate of the same shape and values.
        _, r2 = ops.moe_forward(self.x, *args, "softmax_topk_renorm", 2, 1.0, False, None, False)
        other = (self.rw, self.rb, self.gate.clone(), self.up, self.down)
        self.assert_raises(ValueError, ["'routing'", "'gate'"], ops.moe_backward, r2, self.x, dy, *other)
        # And what the allocator really does: free the forward's x, allocate a new one (often at the same address).
        reused = 0
        for _ in range(20):
            xa = torch.randn(10, 16)
            ya, ra = ops.moe_forward(xa, *args, "softmax_topk_renorm", 2, 1.0, False, None, False)
            addr = xa.data_ptr()
            del xa, ya
            xb = torch.randn(10, 16)
            if xb.data_ptr() == addr:
                reused += 1
                self.assert_raises(ValueError, ["'routing'", "'x'"], ops.moe_backward, ra, xb, dy, *args)
        print(f"  (allocator reused the freed x's address in {reused} of 20 tries; each was refused)")

    def test_bad_backward_and_gating_arguments_are_named(self):
        ops = torch.ops.factorllm
        args = (self.rw, self.rb, self.gate, self.up, self.down)
        _, r = ops.moe_forward(self.x, *args, "softmax_topk_renorm", 2, 1.0, False, None, False)
        self.assert_raises(TypeError, ["'dy'", "Float", "Double"], ops.moe_backward, r, self.x, torch.ones(10, 16).double(),
                           *args)
        self.assert_raises(ValueError, ["'dy'", "[10, 16]", "[10, 15]"], ops.moe_backward, r, self.x, torch.ones(10, 15),
                           *args)
        self.assert_raises(ValueError, ["'dy'", "contiguous"], ops.moe_backward, r, self.x, torch.ones(16, 10).t(), *args)
        self.assert_raises(ValueError, ["'dy'", "CPU", "meta"], ops.moe_backward, r, self.x,
                           torch.empty(10, 16, device="meta"), *args)
        self.assert_raises(ValueError, ["'selection_bias'", "[4]", "[3]"], fllm.moe_ffn, self.x, *args, top_k=2,
                           selection_bias=torch.zeros(3))
        self.assert_raises(ValueError, ["'x'", "CPU", "meta"], self.call, x=torch.empty(10, 16, device="meta"))
        self.assert_raises(ValueError, ["'x'", "strided"], self.call, x=self.x.to_sparse())

    def test_autograd_refuses_in_place_change_before_backward(self):
        x = self.x.clone().requires_grad_()
        gate = self.gate.clone().requires_grad_()
        y = fllm.moe_ffn(x, self.rw, self.rb, gate, self.up, self.down, top_k=2)
        with torch.no_grad():
            gate.add_(1.0)
        with self.assertRaises(RuntimeError):
            y.sum().backward()

    def test_cuda_path_reports_the_build(self):
        # cuda_available mirrors the library's cuda_compiled() (python/torch_ops.cmake: only with
        # FACTORLLM_ENABLE_CUDA and a CUDA-enabled torch); with it compiled out, cuda_status says so and a CUDA
        # tensor (where this torch can make one) is refused with the compiled-out message.
        compiled = bool(torch.ops.factorllm.cuda_compiled())
        self.assertEqual(fllm.cuda_available, compiled and torch.cuda.is_available())
        if not compiled:
            self.assertIn("compiled out", fllm.cuda_status)
            self.assertIn("without CUDA support for torch tensors", fllm.cuda_status)
            if torch.cuda.is_available():
                self.assert_raises(ValueError, ["'x'", "without CUDA support"], self.call, x=self.x.cuda())
        else:
            self.assertIn("compiled in", fllm.cuda_status)

    def test_import_warns_only_when_a_gpu_meets_a_compiled_out_path(self):
        # The warning at import is for a machine whose torch sees a GPU while factorllm's CUDA path is compiled out;
        # a CPU-only machine (CI) must stay quiet. torch.cuda.is_available is patched to play the GPU machine.
        import importlib
        import warnings
        real = torch.cuda.is_available
        try:
            for gpu in (False, True):
                torch.cuda.is_available = lambda: gpu
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    importlib.reload(fllm)
                msgs = [str(w.message) for w in caught if "CUDA tensors are not supported" in str(w.message)]
                compiled = bool(torch.ops.factorllm.cuda_compiled())
                self.assertEqual(len(msgs), 1 if gpu and not compiled else 0, (gpu, msgs))
        finally:
            torch.cuda.is_available = real
            importlib.reload(fllm)

    def test_router_loss_bad_inputs(self):
        self.assert_raises(ValueError, ["top_k = 4", "n_experts = 3"], fllm.balance_loss, torch.randn(5, 3), 4)
        self.assert_raises(ValueError, ["'logits'", "contiguous"], fllm.balance_loss, torch.randn(3, 5).t(), 1)
        d, n, m = 16, 4, 8
        dg, du, dd = torch.randn(n * m, d), torch.randn(n * m, d), torch.randn(d, n * m)
        self.assert_raises(ValueError, ["'dense_down'", "[16, 32]"], fllm.par_loss, self.x, dg, du, dd.t().contiguous(),
                           self.gate, self.up, self.down, self.rw, self.rb, 2)
        self.assert_raises(TypeError, ["'dense_gate'"], fllm.par_loss, self.x, dg.double(), du, dd, self.gate, self.up,
                           self.down, self.rw, self.rb, 2)


if __name__ == "__main__":
    print(f"factorllm torch ops tests: seed {SEED}, library {fllm.load_library()}, torch {torch.__version__}, "
          f"BLAS {check_expected_blas() or 'unknown'}")
    unittest.main(verbosity=2)
