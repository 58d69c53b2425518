# SPDX-License-Identifier: Apache-2.0
"""One training step (forward + backward) of the MoE FFN on the TinyLlama FFN shape (d 2048, d_ff 5632, N 4, K 1 by
default): factorllm's kernels through the PyTorch extension, against the same step written in plain PyTorch
(a) dense-then-mask as in the paper's code (every expert on every token, then the TopK mask) and (b) a per-expert
loop that gathers each expert's tokens (index_select / index_add_). All three use the same gating
(softmax_topk: w = softmax(z)_n on the K chosen experts), so outputs and gradients agree (checked here).

Run (2 threads, as in CI; numbers are ratios measured in the same process):
    /usr/bin/python3 benchmarks/bench_train_step.py [--tokens 512] [--k 1] [--repeats 5]
PyTorch's CPU matmuls go through the system BLAS (Debian: libblas.so.3). The reference BLAS is ~30x slower than an
optimized one, which would inflate the ratio: when torch got it and an OpenBLAS is installed (libopenblas0-openmp)
the script re-runs itself with OpenBLAS first on LD_LIBRARY_PATH (FLLM_KEEP_BLAS=1 opts out); it prints the BLAS
it got.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F


_REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(_REPO, "tools", "python"))  # tools/python/factorllm_locate.py finds the package
from factorllm_locate import import_factorllm_torch  # noqa: E402

fllm = import_factorllm_torch(_REPO)


def gating(x, rw, rb, k):
    z = F.linear(x, rw, rb)
    ids = torch.topk(z.detach(), k, dim=1).indices
    w = torch.softmax(z, dim=1).gather(1, ids)  # softmax_topk
    return ids, w


def step_dense_then_mask(x, rw, rb, gate, up, down, k):
    """The paper code's formulation: all N experts on all tokens, then mask and sum (docs/math.md §2.3, Q6)."""
    n = gate.shape[0]
    ids, w = gating(x, rw, rb, k)
    coef = torch.zeros(x.shape[0], n, dtype=x.dtype).scatter(1, ids, w)  # weight where chosen, 0 elsewhere
    y = 0
    for e in range(n):
        h = F.silu(F.linear(x, gate[e])) * F.linear(x, up[e])
        y = y + coef[:, e:e + 1] * F.linear(h, down[e])
    return y


def step_per_expert_loop(x, rw, rb, gate, up, down, k):
    """Sparse dispatch in plain PyTorch: each expert only on its tokens."""
    n = gate.shape[0]
    ids, w = gating(x, rw, rb, k)
    y = torch.zeros_like(x)
    for e in range(n):
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        xe = x.index_select(0, tok)
        h = F.silu(F.linear(xe, gate[e])) * F.linear(xe, up[e])
        y = y.index_add(0, tok, w[tok, slot][:, None] * F.linear(h, down[e]))
    return y


def step_factorllm(x, rw, rb, gate, up, down, k, save=True):
    return fllm.moe_ffn(x, rw, rb, gate, up, down, mode="softmax_topk", top_k=k, save_activations=save)


def time_step(fn, params, dy, repeats):
    times = []
    for i in range(repeats + 1):
        for p in params:
            p.grad = None
        t0 = time.perf_counter()
        y = fn(*params)
        y.backward(dy)
        dt = time.perf_counter() - t0
        if i > 0:  # first call warms caches, allocators, the thread pool
            times.append(dt)
    return statistics.median(times), y.detach(), [p.grad.clone() for p in params]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--d-ff", type=int, default=5632)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--tokens", type=int, nargs="+", default=[512])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    fllm.prefer_optimized_blas('# ')
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fllm.load_library()
    d, n, k = args.d_model, args.experts, args.k
    m = args.d_ff // n
    g = torch.Generator().manual_seed(1)
    base = [torch.randn(n, m, d, generator=g) / d ** 0.5, torch.randn(n, m, d, generator=g) / d ** 0.5,
            torch.randn(n, d, m, generator=g) / args.d_ff ** 0.5]
    rw0, rb0 = torch.randn(n, d, generator=g) * 0.02, torch.zeros(n)
    print(f"# training step of one MoE FFN: d_model {d}, d_ff {args.d_ff}, N {n}, K {k}, threads {args.threads}, "
          f"torch {torch.__version__}")
    print(f"# BLAS used by torch: {fllm.blas_in_use()}")
    print("tokens,impl,step_ms,speedup_of_factorllm")
    for t in args.tokens:
        x0 = torch.randn(t, d, generator=g)
        dy = torch.randn(t, d, generator=g)
        results = {}
        for name, fn in (("factorllm", step_factorllm),
                         ("factorllm_recompute", lambda *a: step_factorllm(*a, save=False)),
                         ("torch_dense_then_mask", step_dense_then_mask),
                         ("torch_per_expert_loop", step_per_expert_loop)):
            params = [x0.clone().requires_grad_(), rw0.clone().requires_grad_(), rb0.clone().requires_grad_()] + \
                     [b.clone().requires_grad_() for b in base]
            wrapped = (lambda f: (lambda x, rw, rb, ga, up, dn: f(x, rw, rb, ga, up, dn, k)))(fn)
            results[name] = time_step(wrapped, params, dy, args.repeats)
        ref_y, ref_g = results["torch_dense_then_mask"][1:]
        for name, (sec, y, grads) in results.items():  # same math: outputs and gradients agree
            err = max([((y - ref_y).norm() / ref_y.norm()).item()] +
                      [((a - b).norm() / b.norm().clamp_min(1e-12)).item() for a, b in zip(grads, ref_g)
                       if b.norm() > 0])
            if err > 1e-3:
                raise SystemExit(f"{name}: result differs from dense-then-mask (relative error {err:.2e})")
        ours = results["factorllm"][0]
        for name, (sec, _, _) in results.items():
            print(f"{t},{name},{sec * 1e3:.1f},{sec / ours:.2f}")


if __name__ == "__main__":
    main()
