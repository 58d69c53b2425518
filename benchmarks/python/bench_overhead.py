# SPDX-License-Identifier: Apache-2.0
"""What a MoE forward through Python costs over the same forward called from C++ (issue 17's target: < 5 % at
T = 512 tokens and < 20 us extra at T = 1). A benchmark, not a test: it prints figures and never fails on them.

Both sides come from one process and one layer, so they share weights, workspace, threads and caches:
  C++     MoeFfn._forward_loop(x, out, n): n forward calls in a C++ loop (GIL released once), seconds / n
  Python  layer.forward(x, out=out) n times from a Python loop (argument checks, GIL release per call)
  Python, allocating   layer(x): the same with a fresh output array per call
The variants run interleaved, one timed loop of each per round, for --rounds rounds; each figure is the median over
the rounds of the per-call time, and "extra" is the median of the per-round differences to C++ (paired, so a slow
phase of the shared 2-core machine hits every variant alike). The minimum over rounds is printed too.

Run: PYTHONPATH=build/python OMP_NUM_THREADS=2 /usr/bin/python3 benchmarks/python/bench_overhead.py
"""
import argparse
import statistics
import time

import numpy as np

import factorllm as fl


def per_call(fn, n):
    t0 = time.perf_counter()
    fn(n)
    return (time.perf_counter() - t0) / n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--d-ff", type=int, default=1536)
    ap.add_argument("--n-experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 512])
    ap.add_argument("--rounds", type=int, default=41)
    ap.add_argument("--seconds", type=float, default=0.05, help="target duration of one timed loop")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    d, f = args.d_model, args.d_ff
    gate, up = ((rng.standard_normal((f, d)) * d ** -0.5).astype(np.float32) for _ in range(2))
    down = (rng.standard_normal((d, f)) * f ** -0.5).astype(np.float32)
    part = fl.ExpertPartition.contiguous(f, args.n_experts)
    rw = (rng.standard_normal((args.n_experts, d)) * 0.02).astype(np.float32)
    layer = fl.MoeFfn(*fl.factorize(gate, up, down, part), rw, np.zeros(args.n_experts, np.float32),
                      top_k=args.top_k, partition=part)
    print(f"{layer!r}")
    print(f"{'T':>5} {'variant':>16} {'median us':>10} {'min us':>10} {'extra us':>9} {'extra %':>8}")
    for t in args.tokens:
        x = rng.standard_normal((t, d)).astype(np.float32)
        out = np.empty((t, d), np.float32)
        layer.forward(x, out=out)  # warm-up: workspace sized, pages touched
        n = max(1, int(args.seconds / (layer._forward_loop(x, out, 3) / 3)))

        def cpp(k):
            layer._forward_loop(x, out, k)

        def py(k):
            fwd = layer.forward
            for _ in range(k):
                fwd(x, out=out)

        def py_alloc(k):
            for _ in range(k):
                layer(x)

        variants = (("C++ loop", cpp), ("Python, out=", py), ("Python, alloc", py_alloc))
        times = {name: [] for name, _ in variants}
        for _ in range(args.rounds):
            for name, fn in variants:
                times[name].append(per_call(fn, n))
        base = times["C++ loop"]
        for name, _ in variants:
            v = times[name]
            extra = statistics.median(a - b for a, b in zip(v, base))
            print(f"{t:5d} {name:>16} {statistics.median(v) * 1e6:10.2f} {min(v) * 1e6:10.2f} {extra * 1e6:9.2f} "
                  f"{100 * extra / statistics.median(base):7.2f}%")

if __name__ == "__main__":
    main()
