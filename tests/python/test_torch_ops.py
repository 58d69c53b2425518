# SPDX-License-Identifier: Apache-2.0
"""Tests of the PyTorch extension (examples/torch_ops): every op and every gradient against a plain PyTorch
implementation written from the spec, torch.autograd.gradcheck in float64 (the scalar oracle), float32 (cpu_simd)
within stated tolerances, bitwise determinism across thread counts, and refusal of bad inputs.

Run: FACTORLLM_TORCH_LIB=build/examples/torch_ops/libfactorllm_torch.so PYTHONPATH=examples/torch_ops \
     /usr/bin/python3 tests/python/test_torch_ops.py        (ctest runs it as `torch_ops`)
"""
import os
import sys
import unittest

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "torch_ops"))
import factorllm_torch as fllm  # noqa: E402

torch.set_num_threads(2)
SEED = 2023  # fixed; printed by main()


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


def ref_moe(x, rw, rb, gate, up, down, mode, k, scale=1.0, renorm=False, bias=None):
    z = x @ rw.t() + rb
    score = z if bias is None else z + bias
    ids = torch.topk(score.detach(), k, dim=1).indices
    w = ref_weights(z, ids, mode, scale, renorm)
    o = ref_experts(x, gate, up, down)
    picked = o.gather(1, ids[:, :, None].expand(-1, -1, o.shape[2]))  # [T, K, d]
    return (w[:, :, None] * picked).sum(1), ids


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


def rel_err(a, b):
    """Relative L2 error; against a reference that is zero up to round-off (e.g. the router gradient at K = 1 in the
    renormalized modes, exactly zero in exact arithmetic) it is the absolute error over 1e-3 (every other reference
    here has norm >= 0.1)."""
    return ((a - b).norm() / b.norm().clamp_min(1e-3)).item()


class MoeFfnTest(unittest.TestCase):
    # Tolerances (written down): float64 runs the scalar oracle (double accumulation): relative L2 <= 1e-12 against
    # the float64 reference. float32 runs cpu_simd (float accumulation, GEMM depths <= 96): relative L2 <= 1e-5 for
    # outputs and <= 5e-5 for gradients against the float64 reference.
    CASES = [("code_ref", 4, 2, 1.0, False), ("softmax_topk", 4, 2, 1.0, False), ("softmax_topk_renorm", 4, 2, 1.5, False),
             ("topk_softmax", 3, 2, 1.0, False), ("sigmoid_topk", 4, 2, 1.0, False), ("sigmoid_topk", 4, 3, 0.5, True),
             ("softmax_topk_renorm", 4, 1, 1.0, False), ("softmax_topk_renorm", 4, 4, 1.0, False)]

    def run_case(self, dtype, mode, n, k, scale, renorm, t=37, m=24, d=40, seed=SEED):
        params = make_layer(n, m, d, torch.float64, seed)
        x = torch.randn(t, d, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
        dy = torch.randn(t, d, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64)
        ref_in = [v.detach().clone().requires_grad_() for v in (x,) + params]
        y_ref, ids_ref = ref_moe(*ref_in, mode, k, scale, renorm)
        y_ref.backward(dy)
        ours_in = [v.detach().to(dtype).clone().requires_grad_() for v in (x,) + params]
        y = fllm.moe_ffn(*ours_in, mode=mode, top_k=k, output_scale=scale, sigmoid_renormalize=renorm)
        y.backward(dy.to(dtype))
        return ref_in, y_ref, ours_in, y

    def test_forward_and_gradients_match_plain_pytorch(self):
        for dtype, tol_y, tol_g in ((torch.float64, 1e-12, 1e-12), (torch.float32, 1e-5, 5e-5)):
            for mode, n, k, scale, renorm in self.CASES:
                with self.subTest(dtype=dtype, mode=mode, n=n, k=k):
                    ref_in, y_ref, ours_in, y = self.run_case(dtype, mode, n, k, scale, renorm)
                    self.assertLess(rel_err(y.double(), y_ref), tol_y)
                    for name, a, b in zip(("x", "router_weight", "router_bias", "gate", "up", "down"), ours_in, ref_in):
                        if mode == "code_ref" and name.startswith("router"):
                            self.assertEqual(a.grad.abs().max().item(), 0.0, name)  # no router gradient (docs/math.md §2.3)
                            continue
                        self.assertLess(rel_err(a.grad.double(), b.grad), tol_g, name)

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
        y_ref, ids = ref_moe(x, rw, rb, gate, up, down, "softmax_topk", 1, bias=bias)
        self.assertTrue(bool((ids == 0).all()))
        self.assertLess(rel_err(y, y_ref), 1e-12)

    def test_routing_ids_match_reference_topk(self):
        rw, rb, gate, up, down = make_layer(8, 8, 16, torch.float32, 8)
        x = torch.randn(50, 16)
        _, routing = torch.ops.factorllm.moe_forward(x, rw, rb, gate, up, down, "softmax_topk_renorm", 3, 1.0, False,
                                                     None, False)
        ids_ref = torch.topk(x @ rw.t() + rb, 3, dim=1).indices
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
        f = (F.silu(x @ dg.t()) * (x @ du.t())) @ dd.t()
        self.assertLess(rel_err(ref_experts(x, gate, up, down).sum(1), f), 1e-13)  # sum of all experts = dense (docs/math.md §1.2)

    def test_par_loss_matches_plain_pytorch(self):
        # Tolerances: float64 (oracle) 1e-12 relative on losses and gradients; float32 inputs (the oracle still
        # accumulates in double, results rounded to float) 1e-5.
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
                    self.assertLess(abs(par.item() - par_r.item()) / par_r.item(), tol)
                    self.assertLess(abs(bal.item() - bal_r.item()) / bal_r.item(), tol)
                    self.assertAlmostEqual(acc.item(), acc_r.item(), places=6)
                    self.assertTrue(torch.equal(labels.long(), lab_r))
                    self.assertLess(rel_err(o_rw.grad.double(), r_rw.grad), tol)
                    self.assertLess(rel_err(o_rb.grad.double(), r_rb.grad), tol)

    def test_par_gradcheck_float64(self):
        x, dg, du, dd, gate, up, down, rw, rb = self.problem(torch.float64)
        fn = lambda w, b: fllm.par_loss(x, dg, du, dd, gate, up, down, w, b, 2)[:2]  # noqa: E731
        self.assertTrue(torch.autograd.gradcheck(fn, (rw.requires_grad_(), rb.requires_grad_()), eps=1e-6, atol=1e-8))

    def test_balance_loss_matches_plain_pytorch_and_gradcheck(self):
        for dtype, tol in ((torch.float64, 1e-13), (torch.float32, 1e-6)):
            z = torch.randn(3, 11, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
            for k in (1, 2, 5):
                zr = z.view(33, 5).clone().requires_grad_()
                ref = ref_balance(zr, k)
                ref.backward()
                zo = z.detach().to(dtype).clone().requires_grad_()
                out = fllm.balance_loss(zo, k)
                out.backward()
                self.assertLess(abs(out.item() - ref.item()) / ref.item(), tol)
                self.assertLess(rel_err(zo.grad.double().view(33, 5), zr.grad), max(tol, 1e-6))
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
    print(f"factorllm torch ops tests: seed {SEED}, library {fllm.load_library()}, torch {torch.__version__}")
    unittest.main(verbosity=2)
