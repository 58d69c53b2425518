# SPDX-License-Identifier: Apache-2.0
"""Tests of the Python module factorllm (python/src/module.cpp): every numeric result against an independent NumPy
float64 implementation written from docs/math.md, zero copies asserted by pointer identity (NumPy in and out,
DLPack with NumPy and torch), errors raised as ValueError / TypeError carrying the C++ library's message.

Run: PYTHONPATH=build/python /usr/bin/python3 tests/python/test_module.py     (ctest runs it as `python_module`)
The torch cases skip when torch is not importable.

Tolerances: the layer runs in float32 (weights and activations) with float32 accumulation in the cpu_simd kernels;
outputs are compared with the float64 reference at 1e-5 * (1 + max |y_ref|) absolute, ~100x the float32 rounding of
sums of d_model = 64 and d_expert = 32 products of O(0.1) terms, and far below the O(0.1) change a wrong expert,
weight or permutation makes.
"""
import os
import tempfile
import threading
import time
import unittest

import numpy as np

import factorllm as fl

try:
    import torch
    import torch.utils.dlpack
except ImportError:  # the torch cases skip
    torch = None

D_MODEL, D_FF, N_EXPERTS, TOP_K = 64, 256, 8, 2
D_EXPERT = D_FF // N_EXPERTS


def ptr(a):
    return a.__array_interface__["data"][0]


def silu(v):
    return v / (1.0 + np.exp(-v))


def dense_ref(x, gate, up, down):
    """F(x) = W_down (SiLU(W_gate x) * (W_up x)) in float64, rows of x."""
    x, gate, up, down = (np.asarray(a, np.float64) for a in (x, gate, up, down))
    return (silu(x @ gate.T) * (x @ up.T)) @ down.T


def moe_ref(x, gate_e, up_e, down_e, rw, rb, top_k, mode, output_scale=1.0):
    """K-of-N MoE in float64 (docs/math.md section 2.3): TopK by logit (lower index first on ties), weights per mode."""
    x = np.asarray(x, np.float64)
    n = gate_e.shape[0]
    z = x @ np.asarray(rw, np.float64).T + np.asarray(rb, np.float64)
    y = np.zeros((x.shape[0], down_e.shape[1]))
    for t in range(x.shape[0]):
        ids = sorted(range(n), key=lambda e: (-z[t, e], e))[:top_k]
        p = np.exp(z[t] - z[t].max())
        p /= p.sum()
        if mode == "code_ref":
            w = [float(n // top_k)] * top_k
        elif mode == "softmax_topk":
            w = [p[e] for e in ids]
        elif mode == "softmax_topk_renorm":
            s = sum(p[e] for e in ids)
            w = [p[e] / s for e in ids]
        elif mode == "sigmoid_topk":
            w = [1.0 / (1.0 + np.exp(-z[t, e])) for e in ids]
        else:
            raise ValueError(mode)
        for e, we in zip(ids, w):
            y[t] += output_scale * we * dense_ref(x[t:t + 1], gate_e[e], up_e[e], down_e[e])[0]
    return y


def bf16_bits(a):
    """float32 -> bf16 bits (uint16), round to nearest even."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_value(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


class Fixture(unittest.TestCase):
    def setUp(self):
        rng = np.random.default_rng(17)
        self.gate = (rng.standard_normal((D_FF, D_MODEL)) * 0.2).astype(np.float32)
        self.up = (rng.standard_normal((D_FF, D_MODEL)) * 0.2).astype(np.float32)
        self.down = (rng.standard_normal((D_MODEL, D_FF)) * 0.2).astype(np.float32)
        self.rw = (rng.standard_normal((N_EXPERTS, D_MODEL)) * 0.5).astype(np.float32)
        self.rb = (rng.standard_normal(N_EXPERTS) * 0.1).astype(np.float32)
        self.x = rng.standard_normal((40, D_MODEL)).astype(np.float32)
        self.part = fl.ExpertPartition.random(D_FF, N_EXPERTS, 5)
        self.experts = fl.factorize(self.gate, self.up, self.down, self.part)

    def layer(self, mode="softmax_topk_renorm", top_k=TOP_K, **kw):
        return fl.MoeFfn(*self.experts, self.rw, self.rb, top_k=top_k, mode=mode, partition=self.part, **kw)

    def assert_close(self, y, ref, what):
        tol = 1e-5 * (1.0 + np.abs(ref).max())
        err = np.abs(np.asarray(y, np.float64) - ref).max()
        self.assertLessEqual(err, tol, f"{what}: max error {err:.3g} > {tol:.3g}")


class TestPartitionAndFactorize(Fixture):
    def test_factorize_layout_and_round_trip(self):
        g, u, d = self.experts
        perm = self.part.permutation
        self.assertEqual(perm.dtype, np.int32)
        self.assertEqual(sorted(perm.tolist()), list(range(D_FF)))
        self.assertEqual((g.shape, u.shape, d.shape), ((N_EXPERTS, D_EXPERT, D_MODEL),) * 2 + ((N_EXPERTS, D_MODEL, D_EXPERT),))
        for e in range(N_EXPERTS):
            idx = perm[e * D_EXPERT:(e + 1) * D_EXPERT]
            np.testing.assert_array_equal(g[e], self.gate[idx])
            np.testing.assert_array_equal(u[e], self.up[idx])
            np.testing.assert_array_equal(d[e], self.down[:, idx])
        dg, du, dd = fl.unfactorize(g, u, d, self.part)
        np.testing.assert_array_equal(dg, self.gate)
        np.testing.assert_array_equal(du, self.up)
        np.testing.assert_array_equal(dd, self.down)

    def test_from_dense_equals_factorize_then_construct(self):
        for dense in ((self.gate, self.up, self.down), tuple(bf16_bits(w) for w in (self.gate, self.up, self.down))):
            layer = fl.MoeFfn.from_dense(*dense, self.part, self.rw, self.rb, top_k=TOP_K, mode="code_ref")
            twice = fl.MoeFfn(*fl.factorize(*dense, self.part), self.rw, self.rb, top_k=TOP_K, mode="code_ref",
                              partition=self.part)
            for a, b in zip(layer.experts, twice.experts):
                np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(layer(self.x), twice(self.x))

    def test_builders(self):
        c = fl.ExpertPartition.contiguous(D_FF, N_EXPERTS)
        np.testing.assert_array_equal(c.permutation, np.arange(D_FF))
        a = np.repeat(np.arange(N_EXPERTS), D_EXPERT)[::-1].copy()
        p = fl.ExpertPartition.from_assignment(a, N_EXPERTS)
        self.assertEqual(sorted(p.permutation[:D_EXPERT].tolist()), list(range(D_FF - D_EXPERT, D_FF)))
        q = fl.ExpertPartition.from_permutation(self.part.permutation, N_EXPERTS)
        np.testing.assert_array_equal(q.permutation, self.part.permutation)
        for part in (fl.cluster_weights(self.gate, self.up, self.down, N_EXPERTS, seed=1),
                     fl.cluster_activations(self.gate, self.up, self.down, self.x, N_EXPERTS, seed=1)):
            self.assertEqual((part.d_ff, part.n_experts, part.d_expert), (D_FF, N_EXPERTS, D_EXPERT))
            self.assertEqual(sorted(part.permutation.tolist()), list(range(D_FF)))

    def test_bad_partitions(self):
        with self.assertRaisesRegex(ValueError, "not a permutation|repeated|outside"):
            fl.ExpertPartition.from_permutation(np.zeros(D_FF, np.int32), N_EXPERTS)
        with self.assertRaisesRegex(ValueError, "outside int32"):
            fl.ExpertPartition.from_permutation(np.arange(D_FF) + 2 ** 32, N_EXPERTS)
        with self.assertRaisesRegex(TypeError, "sequence of integers"):
            fl.ExpertPartition.from_permutation(np.arange(D_FF, dtype=np.float64), N_EXPERTS)
        with self.assertRaisesRegex(ValueError, "d_ff"):
            fl.factorize(self.gate, self.up, self.down, fl.ExpertPartition.contiguous(D_FF // 2, N_EXPERTS))


class TestForward(Fixture):
    def test_modes_against_float64_reference(self):
        for mode in ("softmax_topk_renorm", "softmax_topk", "code_ref", "sigmoid_topk"):
            with self.subTest(mode=mode):
                y = self.layer(mode)(self.x)
                self.assertEqual((y.shape, y.dtype), ((40, D_MODEL), np.float32))
                self.assert_close(y, moe_ref(self.x, *self.experts, self.rw, self.rb, TOP_K, mode), mode)

    def test_all_experts_equal_dense(self):
        # code_ref with K = N: weight floor(N/N) = 1 on every expert, so the layer is the dense FFN (docs/math.md 2.3).
        y = self.layer("code_ref", top_k=N_EXPERTS)(self.x)
        self.assert_close(y, dense_ref(self.x, self.gate, self.up, self.down), "K = N")

    def test_bf16_experts(self):
        bits = tuple(bf16_bits(a) for a in self.experts)
        layer = fl.MoeFfn(*bits, self.rw, self.rb, top_k=TOP_K, partition=self.part)
        self.assertEqual(layer.weight_dtype, "bf16")
        y = layer(self.x)
        ref = moe_ref(self.x, *(bf16_value(b) for b in bits), self.rw, self.rb, TOP_K, "softmax_topk_renorm")
        # On a CPU with AVX512-BF16 the decode kernel (<= 8 rows per expert) rounds the activations to bf16, which
        # moves the output by ~2e-3 relative L2 (include/factorllm/backend/README.md): bound 1e-2, while a wrong
        # expert, weight or decoding moves it by O(1).
        rel = np.linalg.norm(y - ref) / np.linalg.norm(ref)
        self.assertLess(rel, 1e-2, f"bf16 experts: relative L2 error {rel:.3g}")
        for got, want in zip(layer.experts, bits):
            np.testing.assert_array_equal(got, want)

    def test_out_is_written_in_place(self):
        layer = self.layer()
        out = np.full((40, D_MODEL), np.nan, np.float32)
        y = layer.forward(self.x, out=out)
        self.assertIs(y, out)
        self.assertEqual(ptr(y), ptr(out))
        np.testing.assert_array_equal(out, layer(self.x))

    def test_strided_rows_without_copy(self):
        big = np.zeros((40, D_MODEL + 16), np.float32)
        big[:, 3:3 + D_MODEL] = self.x
        view = big[:, 3:3 + D_MODEL]
        out_big = np.zeros((40, 2 * D_MODEL), np.float32)
        out_view = out_big[:, :D_MODEL]
        layer = self.layer()
        y = layer(view, out=out_view)
        self.assertEqual(ptr(y), ptr(out_big))
        np.testing.assert_array_equal(out_view, layer(self.x))
        np.testing.assert_array_equal(out_big[:, D_MODEL:], 0)

    def test_empty_and_single_token(self):
        layer = self.layer()
        self.assertEqual(layer(np.zeros((0, D_MODEL), np.float32)).shape, (0, D_MODEL))
        self.assert_close(layer(self.x[:1]), moe_ref(self.x[:1], *self.experts, self.rw, self.rb, TOP_K,
                                                     "softmax_topk_renorm"), "T = 1")

    def test_routing_record(self):
        layer = self.layer()
        rec = fl.RoutingRecord()
        layer(self.x, record=rec)
        z = self.x.astype(np.float64) @ self.rw.T.astype(np.float64) + self.rb
        np.testing.assert_allclose(rec.logits, z, atol=1e-4)
        want = np.argsort(-z, axis=1, kind="stable")[:, :TOP_K]
        np.testing.assert_array_equal(rec.ids, want)
        p = np.exp(z - z.max(1, keepdims=True))
        sel = np.take_along_axis(p, want, 1)
        np.testing.assert_allclose(rec.weights, sel / sel.sum(1, keepdims=True), atol=1e-5)
        counts = np.bincount(want.ravel(), minlength=N_EXPERTS)
        np.testing.assert_array_equal(np.diff(rec.offsets), counts)
        self.assertEqual([rec.load(e) for e in range(N_EXPERTS)], counts.tolist())
        slots = rec.slots
        for e in range(N_EXPERTS):
            for s in slots[rec.offsets[e]:rec.offsets[e + 1]]:
                self.assertEqual(rec.ids[s // TOP_K, s % TOP_K], e)

    def test_threads_give_the_same_result(self):
        layer = self.layer()
        want = layer(self.x)
        got = [None] * 4

        def run(i):
            got[i] = layer(self.x)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for g in got:
            np.testing.assert_array_equal(g, want)

    def test_gil_is_released_inside_the_kernels(self):
        # While one thread is inside a long forward call, the main thread must keep running Python code: with the GIL
        # held for the call, no main-thread timestamp could fall strictly inside it.
        rng = np.random.default_rng(9)
        d, f, t = 256, 1024, 4096
        gate, up = ((rng.standard_normal((f, d)) * 0.05).astype(np.float32) for _ in range(2))
        down = (rng.standard_normal((d, f)) * 0.05).astype(np.float32)
        part = fl.ExpertPartition.contiguous(f, 8)
        layer = fl.MoeFfn(*fl.factorize(gate, up, down, part), np.zeros((8, d), np.float32), np.zeros(8, np.float32),
                          top_k=2)
        x = rng.standard_normal((t, d)).astype(np.float32)
        span = []

        def work():
            t0 = time.perf_counter()
            layer(x)
            span.extend((t0, time.perf_counter()))

        worker = threading.Thread(target=work)
        stamps = []
        worker.start()
        while worker.is_alive():
            stamps.append(time.perf_counter())
        worker.join()
        t0, t1 = span
        margin = 0.1 * (t1 - t0)
        inside = sum(t0 + margin < s < t1 - margin for s in stamps)
        self.assertGreater(inside, 0, f"no main-thread progress during a {1e3 * (t1 - t0):.1f} ms forward call")

    def test_properties_and_docs(self):
        layer = self.layer(selection_bias=np.zeros(N_EXPERTS, np.float32), output_scale=2.0)
        self.assertEqual((layer.d_model, layer.n_experts, layer.d_expert, layer.top_k), (D_MODEL, N_EXPERTS, D_EXPERT, TOP_K))
        self.assertEqual(layer.mode, "softmax_topk_renorm")
        self.assertEqual(layer.output_scale, 2.0)
        self.assertAlmostEqual(layer.ffn_flops_fraction, TOP_K / N_EXPERTS)
        np.testing.assert_array_equal(layer.router_weight, self.rw)
        np.testing.assert_array_equal(layer.partition.permutation, self.part.permutation)
        for obj in (fl, fl.MoeFfn, fl.MoeFfn.forward, fl.factorize, fl.par_loss, fl.from_dlpack, fl.train_router, fl.load):
            self.assertGreater(len(obj.__doc__ or ""), 60, obj)
        self.assertIn("without copies", fl.__doc__)


class TestErrors(Fixture):
    def test_dtype_is_type_error(self):
        layer = self.layer()
        with self.assertRaisesRegex(TypeError, r"MoeFfn.forward: argument 'x' must be a float32 array, got float64"):
            layer(self.x.astype(np.float64))
        with self.assertRaisesRegex(TypeError, "argument 'x' must be a numpy array or support __dlpack__"):
            layer([[1.0] * D_MODEL])
        with self.assertRaisesRegex(TypeError, "argument 'router_weight' must be a float32 array"):
            fl.MoeFfn(*self.experts, self.rw.astype(np.float64), self.rb, top_k=2)

    def test_shapes_and_values_are_value_errors_with_the_cpp_message(self):
        layer = self.layer()
        with self.assertRaisesRegex(ValueError, r"argument 'x' has shape \[40, 5\], expected \[n_tokens, 64\]"):
            layer(self.x[:, :5].copy())
        with self.assertRaisesRegex(ValueError, "contiguous last dimension"):
            layer(np.asfortranarray(self.x))
        with self.assertRaisesRegex(ValueError, r"argument 'out' has shape \[39, 64\]"):
            layer(self.x, out=np.zeros((39, D_MODEL), np.float32))
        with self.assertRaisesRegex(ValueError, "overlaps"):
            layer(self.x, out=self.x)
        with self.assertRaisesRegex(ValueError, r"MoeFfn: argument 'router' has shape \[7, 64\], expected \[8, 64\]"):
            fl.MoeFfn(*self.experts, self.rw[:7].copy(), self.rb[:7].copy(), top_k=2)
        with self.assertRaisesRegex(ValueError, r"top_k = 9 must be in \[1, n_experts = 8\]"):
            self.layer(top_k=9)
        with self.assertRaisesRegex(ValueError, "no_such_mode"):
            self.layer("no_such_mode")
        ro = self.x.copy()
        ro.flags.writeable = False
        with self.assertRaisesRegex(ValueError, "read-only"):
            layer(self.x, out=ro)

    def test_bad_file_is_format_error(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "bad.safetensors")
            with open(path, "wb") as f:
                f.write(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
            with self.assertRaises(fl.FormatError) as cm:
                fl.load(path)
            self.assertIsInstance(cm.exception, ValueError)
            self.assertIn("bad.safetensors", str(cm.exception))
            with self.assertRaises(ValueError):
                fl.load(os.path.join(d, "missing.safetensors"))


class TestDlpack(Fixture):
    def test_numpy_round_trip_shares_memory(self):
        y = self.layer()(self.x)
        back = np.from_dlpack(fl.to_dlpack(y))
        self.assertEqual(ptr(back), ptr(y))
        self.assertEqual(ptr(fl.from_dlpack(y)), ptr(y))
        self.assertEqual(ptr(fl.from_dlpack(fl.to_dlpack(y))), ptr(y))

    @unittest.skipIf(torch is None, "torch not importable")
    def test_torch_in_and_out_share_memory(self):
        t = torch.from_numpy(self.x.copy())
        a = fl.from_dlpack(t)
        self.assertEqual(ptr(a), t.data_ptr())
        a[0, 0] = 42.0
        self.assertEqual(float(t[0, 0]), 42.0)
        layer = self.layer()
        out_t = torch.empty(40, D_MODEL)
        y = layer(t, out=out_t)  # both cross by DLPack: no copy either way
        self.assertEqual(ptr(y), out_t.data_ptr())
        np.testing.assert_array_equal(out_t.numpy(), layer(t.numpy()))
        tt = torch.utils.dlpack.from_dlpack(fl.to_dlpack(y))
        self.assertEqual(tt.data_ptr(), ptr(y))
        del y, a
        self.assertEqual(float(tt[0, 0]), float(out_t[0, 0]))  # the exported memory lives while torch holds it
        bf = torch.zeros(4, 8, dtype=torch.bfloat16)
        self.assertEqual(fl.from_dlpack(bf).dtype, np.uint16)

    @unittest.skipIf(torch is None, "torch not importable")
    def test_torch_errors(self):
        with self.assertRaisesRegex(TypeError, "float32 array, got float64"):
            self.layer()(torch.zeros(3, D_MODEL, dtype=torch.float64))
        with self.assertRaisesRegex(TypeError, "DLPack dtype"):
            fl.from_dlpack(torch.zeros(3, dtype=torch.complex64))


class TestTrainingAndFiles(Fixture):
    def test_par_loss_gradient_against_finite_differences(self):
        layer = self.layer()
        res = fl.par_loss(layer, self.x, self.gate, self.up, self.down)
        for key in ("par_loss", "balance_loss", "total_loss", "label_accuracy"):
            self.assertTrue(np.isfinite(res[key]), key)
        np.testing.assert_allclose(res["grad_bias"], 0.05 * res["grad_bias_par"] + 0.01 * res["grad_bias_balance"],
                                   rtol=1e-5, atol=1e-9)
        # PAR reaches b_r only through softmax(z) (pseudo-labels come from the frozen experts): central differences
        # of the PAR term alone (smooth) in float32 router parameters with h = 1e-2 (error O(h^2) ~ 1e-4 relative).
        h = 1e-2
        for e in range(N_EXPERTS):
            vals = []
            for s in (1, -1):
                b = self.rb.copy()
                b[e] += s * h
                layer.set_router(self.rw, b)
                vals.append(fl.par_loss(layer, self.x, self.gate, self.up, self.down)["par_loss"])
            fd = (vals[0] - vals[1]) / (2 * h)
            self.assertAlmostEqual(fd, float(res["grad_bias_par"][e]), delta=1e-3 * abs(fd) + 1e-5)
        np.testing.assert_array_equal(res["pseudo_label"].shape, (40, TOP_K))

    def test_conversion_steps_improve_the_layer(self):
        x = np.random.default_rng(3).standard_normal((256, D_MODEL)).astype(np.float32)
        part = fl.cluster_activations(self.gate, self.up, self.down, x, N_EXPERTS, seed=0)
        rw, rb = fl.router_from_partition(self.gate, self.up, self.down, part)
        layer = fl.MoeFfn(*fl.factorize(self.gate, self.up, self.down, part), rw, rb, top_k=TOP_K, partition=part)
        rep = fl.train_router(layer, x, self.gate, self.up, self.down, steps=30, batch_tokens=64)
        self.assertLess(rep["final_loss"], rep["initial_loss"])
        self.assertFalse(np.array_equal(layer.router_weight, rw))
        target = dense_ref(x, self.gate, self.up, self.down)

        def rel_err():
            return np.linalg.norm(layer(x) - target) / np.linalg.norm(target)

        before = rel_err()
        rep = fl.recover_refit(layer, x, self.gate, self.up, self.down, ridge=1e-3)
        self.assertLess(rep["final_relative_error"], rep["initial_relative_error"])
        self.assertAlmostEqual(rel_err(), rep["final_relative_error"], delta=1e-3)
        self.assertLess(rel_err(), before)
        rep = fl.recover_distill(layer, x, self.gate, self.up, self.down, steps=20, batch_tokens=64, lr=1e-4)
        self.assertLessEqual(rep["final_loss"], rep["initial_loss"])

    def test_save_and_load_round_trip(self):
        layers = [self.layer("softmax_topk_renorm"), self.layer("code_ref", top_k=4, output_scale=0.5)]
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "moe.safetensors")
            fl.save(path, layers)
            back = fl.load(path)
            self.assertEqual(len(back), 2)
            for a, b in zip(layers, back):
                self.assertEqual((a.mode, a.top_k, a.output_scale), (b.mode, b.top_k, b.output_scale))
                np.testing.assert_array_equal(a(self.x), b(self.x))
                np.testing.assert_array_equal(a.partition.permutation, b.partition.permutation)
            fl.save(path, layers, expert_dtype="bf16")
            bf = fl.load(path, dtype="bf16")
            self.assertEqual(bf[0].weight_dtype, "bf16")
            np.testing.assert_array_equal(bf[0].experts[0], bf16_bits(self.experts[0]))
        with self.assertRaisesRegex(TypeError, "bf16 experts"):
            fl.train_router(bf[0], self.x, self.gate, self.up, self.down, steps=1)


class TestReadme(unittest.TestCase):
    def test_readme_python_example_runs(self):
        """README.md's "## Python" example, run as written (in a temporary folder: it saves a file)."""
        readme = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "README.md")
        with open(readme, encoding="utf-8") as f:
            text = f.read()
        section = text[text.index("\n## Python\n"):]
        code = section[section.index("```python\n") + len("```python\n"):]
        code = code[:code.index("\n```\n")]
        cwd = os.getcwd()
        with tempfile.TemporaryDirectory() as d:
            os.chdir(d)
            try:
                exec(compile(code, "README.md (## Python)", "exec"), {"__name__": "readme"})
            finally:
                os.chdir(cwd)


if __name__ == "__main__":
    unittest.main(verbosity=2)
