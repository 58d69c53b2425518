# SPDX-License-Identifier: Apache-2.0
"""The PyTorch ops on CUDA tensors (issue 16 part 7) against the same ops on CPU float64 tensors (the scalar
oracle), run by tests/cuda/run_on_gpu.sh when a CUDA-enabled torch is importable. Writes a JSON report (argv[1]).

Checked: par_loss (losses, router gradients, pseudo-labels) and moe_infer (y) in every combine mode, on the
caller's current stream (a non-default torch stream), plus the refusals (float64 on CUDA, mixed devices, the
training moe_forward). Tolerances (f32 GEMMs on the GPU vs a double oracle): losses relative 1e-4, gradients and y
relative L2 1e-3, pseudo-labels equal on >= 99% of the rows (near-tied MSEs may swap).
Exit 0 when every check passes, 1 otherwise, 77 when no CUDA device or the CUDA path is compiled out."""
import json
import sys

import torch

import factorllm.torch as fllm


def rel_l2(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main(report):
    out = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_status": None, "checks": []}
    fllm.load_library()
    out["cuda_status"] = fllm.cuda_status
    if not (fllm.cuda_available and torch.cuda.is_available()):
        out["skipped"] = "no CUDA device or factorllm's CUDA path compiled out"
        json.dump(out, open(report, "w"), indent=2)
        print(out["skipped"], fllm.cuda_status)
        return 77
    ok = True

    def check(name, value, limit, cmp="<="):
        nonlocal ok
        passed = value <= limit if cmp == "<=" else value >= limit
        ok &= passed
        out["checks"].append({"name": name, "value": value, "limit": limit, "cmp": cmp, "passed": passed})
        print(f"{'ok  ' if passed else 'FAIL'} {name}: {value:.3g} {cmp} {limit}")

    gen = torch.Generator().manual_seed(7)
    t, d, n, m, k = 300, 64, 8, 24, 2
    x = torch.randn(t, d, generator=gen, dtype=torch.float64)
    wg, wu = torch.randn(n * m, d, generator=gen, dtype=torch.float64) * 0.2, torch.randn(n * m, d, generator=gen, dtype=torch.float64) * 0.2
    wd = torch.randn(d, n * m, generator=gen, dtype=torch.float64) * 0.2
    gate, up, down = fllm.factorize(wg, wu, wd, n)
    rw = torch.randn(n, d, generator=gen, dtype=torch.float64) * 0.3
    rb = torch.randn(n, generator=gen, dtype=torch.float64) * 0.1
    cpu = [v.float().double() for v in (x, wg, wu, wd, gate, up, down, rw, rb)]  # f32-representable inputs
    gpu = [v.float().cuda() for v in cpu]
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # the ops must use the caller's current stream
        res_g = torch.ops.factorllm.par_loss(*gpu, k, 1e-7)
        ys_g = {mode: fllm.moe_infer(gpu[0], gpu[7], gpu[8], gpu[4], gpu[5], gpu[6], mode=mode, top_k=k)
                for mode in fllm.MODES}
    stream.synchronize()
    res_c = torch.ops.factorllm.par_loss(*cpu, k, 1e-7)
    for i, name in enumerate(("par_loss", "balance_loss", "label_accuracy")):
        check(f"par_loss/{name} relative", abs(float(res_g[i]) - float(res_c[i])) / max(abs(float(res_c[i])), 1e-12), 1e-4)
    for i, name in zip(range(3, 7), ("d_par/dW", "d_par/db", "d_bal/dW", "d_bal/db")):
        check(f"par_loss/{name} relative L2", rel_l2(res_g[i], res_c[i]), 1e-3)
    same = (res_g[7].cpu().sort(1).values == res_c[7].sort(1).values).all(1).double().mean().item()
    check("par_loss/pseudo_labels equal rows", same, 0.99, ">=")
    for mode, y in ys_g.items():
        y_ref = torch.ops.factorllm.moe_infer(cpu[0], cpu[7], cpu[8], cpu[4], cpu[5], cpu[6], mode, k, 1.0, False, None)
        check(f"moe_infer/{mode} y relative L2", rel_l2(y, y_ref), 1e-3)
    refusals = {
        "float64 on CUDA": lambda: torch.ops.factorllm.par_loss(*[v.cuda() for v in cpu], k, 1e-7),
        "mixed devices": lambda: torch.ops.factorllm.moe_infer(gpu[0], cpu[7].float(), gpu[8], gpu[4], gpu[5], gpu[6],
                                                               "softmax_topk", k, 1.0, False, None),
        "training moe_forward": lambda: fllm.moe_ffn(gpu[0], gpu[7], gpu[8], gpu[4], gpu[5], gpu[6], top_k=k),
    }
    for name, f in refusals.items():
        try:
            f()
            msg = None
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as e:
            msg = str(e).splitlines()[0]
        passed = msg is not None
        ok &= passed
        out["checks"].append({"name": f"refuses {name}", "passed": passed, "message": msg})
        print(f"{'ok  ' if passed else 'FAIL'} refuses {name}: {msg}")
    out["passed"] = ok
    json.dump(out, open(report, "w"), indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "torch_gpu.json"))
