# SPDX-License-Identifier: Apache-2.0
"""PyTorch autograd Functions over factorllm's C++ kernels: the MoE FFN (forward and backward through the
library's cpu_simd kernels in float32, the scalar oracle in float64), the PAR loss with its router gradient and
the paper code's balance term (docs/math.md §3.2).

Usage::

    import factorllm.torch as fllm            # loads libfactorllm_torch.so from the package (see load_library)
    y = fllm.moe_ffn(x, router_weight, router_bias, gate, up, down, mode="softmax_topk_renorm", top_k=2)
    par, bal, label_acc, labels = fllm.par_loss(x, dense_gate, dense_up, dense_down, gate, up, down,
                                                router_weight, router_bias, top_k=2)
    bal = fllm.balance_loss(logits, top_k=2)

Shapes (the library's stacked expert layout, llama.cpp's ffn_*_exps): x [..., d_model]; gate, up
[n_experts, d_expert, d_model]; down [n_experts, d_model, d_expert]; router_weight [n_experts, d_model];
router_bias [n_experts]. Every tensor must be on the CPU, dense and contiguous, with the dtype of x (float32 or
float64): anything else raises TypeError/ValueError naming the argument; the ops never copy a tensor behind your
back. Gradient semantics: see include/factorllm/train/moe_backward.hpp (the router gets gradient through the
combine weights in the softmax/sigmoid modes, none in `code_ref`) and train/par_loss.hpp (PAR reaches only
W_r and b_r).
"""
import glob
import os
import sys

import torch

# Whether the ops run on CUDA tensors (docs/python.md "CUDA tensors"): set at import from the loaded library's
# cuda_compiled() (python/src/torch_ops_cuda.cpp, built only with FACTORLLM_ENABLE_CUDA and a CUDA-enabled torch).
# Without it a CUDA tensor is refused with "factorllm was built without CUDA support for torch tensors" (never
# copied to the host behind your back). cuda_status says which case holds, and why.
cuda_available = False
cuda_status = "not determined (libfactorllm_torch.so not loaded yet)"

__all__ = [
    "load_library", "MoeFfnFunction", "ParLossFunction", "BalanceLossFunction", "moe_ffn", "par_loss",
    "balance_loss", "MoeFfn", "factorize", "MODES", "blas_in_use", "prefer_optimized_blas", "cuda_available",
    "cuda_status", "moe_infer",
]

def blas_in_use():
    """The BLAS shared objects this process mapped (torch's CPU matmuls go through it), comma-separated: mapped
    files whose name (not folder: a checkout may live under .../wt-blas/) contains "blas", resolved."""
    try:
        with open("/proc/self/maps") as f:
            paths = {os.path.realpath(l.split()[-1]) for l in f if "/" in l}
    except OSError:
        return ""
    return ", ".join(sorted(p for p in paths if "blas" in os.path.basename(p).lower()))


def prefer_optimized_blas(note_prefix="note: "):
    """Re-executes the running script with Debian's OpenBLAS first on the library path when torch got the reference
    BLAS (libblas3, ~30x slower GEMMs) and an OpenBLAS is installed but is not the system default: PyTorch baselines
    and the recipe's budget assume an optimized BLAS. Results differ only by float rounding. Opt out with
    FLLM_KEEP_BLAS=1. Returns (does not re-execute) when nothing better is installed."""
    if os.environ.get("FLLM_KEEP_BLAS") or "openblas" in blas_in_use():
        return
    for d in sorted(glob.glob("/usr/lib/*/openblas-*/libblas.so.3")):
        lib_dir = os.path.dirname(d)
        env = dict(os.environ, FLLM_KEEP_BLAS="1",
                   LD_LIBRARY_PATH=os.pathsep.join(p for p in (lib_dir, os.environ.get("LD_LIBRARY_PATH")) if p))
        print(f"{note_prefix}torch got the reference BLAS; re-running with {lib_dir} (FLLM_KEEP_BLAS=1 to keep it)",
              flush=True)
        os.execve(sys.executable, [sys.executable] + sys.argv, env)


MODES = ("code_ref", "softmax_topk", "softmax_topk_renorm", "topk_softmax", "sigmoid_topk")
_LIB_NAME = "libfactorllm_torch.so"
_loaded_path = None


def load_library(path=None):
    """Loads the extension once and returns its path. Search order: `path`, $FACTORLLM_TORCH_LIB, then
    libfactorllm_torch.so next to this file (where the build and `cmake --install` put it)."""
    global _loaded_path
    if _loaded_path is not None:
        return _loaded_path
    candidates = [p for p in (path, os.environ.get("FACTORLLM_TORCH_LIB")) if p]
    if not candidates:
        candidates = [os.path.join(os.path.dirname(os.path.abspath(__file__)), _LIB_NAME)]
    for c in candidates:
        if os.path.isfile(c):
            torch.ops.load_library(c)
            _loaded_path = c
            _set_cuda_status()
            return c
    raise FileNotFoundError(
        f"{_LIB_NAME} not found (tried {candidates or 'nothing'}); build it with "
        "`cmake -S . -B build -DFACTORLLM_BUILD_TORCH=ON && cmake --build build --target factorllm_torch` "
        "and put build/python on PYTHONPATH, or set FACTORLLM_TORCH_LIB")


def _set_cuda_status():
    """cuda_available / cuda_status from the loaded library and the running torch."""
    global cuda_available, cuda_status
    compiled = bool(torch.ops.factorllm.cuda_compiled())
    torch_cuda = getattr(torch.version, "cuda", None)
    if compiled:
        cuda_available = bool(torch.cuda.is_available())
        cuda_status = ("CUDA kernels compiled in (par_loss, moe_infer on CUDA tensors; torch CUDA "
                       f"{torch_cuda}); device {'available' if cuda_available else 'not available'}")
    else:
        cuda_available = False
        cuda_status = ("compiled out: factorllm's torch ops were built without CUDA support for torch tensors "
                       f"(needs FACTORLLM_ENABLE_CUDA=ON and a CUDA-enabled torch; this torch: "
                       f"{'CUDA ' + torch_cuda if torch_cuda else 'CPU-only'})")


def _ops():
    load_library()
    return torch.ops.factorllm


def _flatten_tokens(x, fn, arg="x"):
    """[..., n] -> [n_tokens, n] as a view (refuses what would need a copy)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: argument '{arg}' must be a torch.Tensor, got {type(x).__name__}")
    if x.is_cuda and not cuda_available:
        raise ValueError(f"{fn}: argument '{arg}' is a CUDA tensor; factorllm was built without CUDA support for torch "
                         "tensors: move it to the CPU (.cpu())")
    if x.layout != torch.strided:  # checked first: a sparse tensor has no strides, and view() would fail unnamed
        raise ValueError(f"{fn}: argument '{arg}' must have the strided (dense) layout, got {x.layout}")
    if x.dim() < 2:
        raise ValueError(f"{fn}: argument '{arg}' must have shape [..., n] with at least 2 dims, got {list(x.shape)}")
    if not x.is_contiguous():
        raise ValueError(f"{fn}: argument '{arg}' must be contiguous (got strides {list(x.stride())}); "
                         "the op does not copy: call .contiguous() if you mean to")
    return x.view(-1, x.shape[-1])


class MoeFfnFunction(torch.autograd.Function):
    """y = MoE(x) through factorllm's kernels; backward through moe_backward with the forward's own routing."""

    @staticmethod
    def forward(ctx, x, router_weight, router_bias, gate, up, down, mode, top_k, output_scale, sigmoid_renormalize,
                selection_bias, save_activations):
        y, routing = _ops().moe_forward(x, router_weight, router_bias, gate, up, down, mode, int(top_k),
                                        float(output_scale), bool(sigmoid_renormalize), selection_bias,
                                        bool(save_activations))
        ctx.routing = routing
        ctx.save_for_backward(x, router_weight, router_bias, gate, up, down)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, rw, rb, gate, up, down = ctx.saved_tensors
        # Autograd may hand an expanded or strided gradient (e.g. from .sum()): it is the op's own intermediate,
        # of the size of y, so densifying it here is not the silent copy of a user tensor the ops refuse.
        dy = dy.contiguous()
        dx, drw, drb, dg, du, dd = _ops().moe_backward(ctx.routing, x, dy, rw, rb, gate, up, down)
        return dx, drw, drb, dg, du, dd, None, None, None, None, None, None


def moe_ffn(x, router_weight, router_bias, gate, up, down, mode="softmax_topk_renorm", top_k=2, output_scale=1.0,
            sigmoid_renormalize=False, selection_bias=None, save_activations=True):
    """The MoE FFN of x [..., d_model] (differentiable w.r.t. x and all five parameter tensors).
    save_activations keeps the experts' pre-activations (2 x n_tokens x top_k x d_expert values) so that the
    backward skips two of its eight GEMMs."""
    if mode not in MODES:
        raise ValueError(f"moe_ffn: argument 'mode' must be one of {MODES}, got {mode!r}")
    x2 = _flatten_tokens(x, "moe_ffn")
    y = MoeFfnFunction.apply(x2, router_weight, router_bias, gate, up, down, mode, top_k, output_scale,
                             sigmoid_renormalize, selection_bias, save_activations)
    return y.view(x.shape)


def moe_infer(x, router_weight, router_bias, gate, up, down, mode="softmax_topk_renorm", top_k=2, output_scale=1.0,
              sigmoid_renormalize=False, selection_bias=None):
    """y = MoE(x) for inference (no autograd, no routing kept). On CUDA tensors (float32) it runs the CUDA backend's
    fused forward on torch's current stream; on CPU tensors the same kernels as moe_ffn."""
    if mode not in MODES:
        raise ValueError(f"moe_infer: argument 'mode' must be one of {MODES}, got {mode!r}")
    x2 = _flatten_tokens(x, "moe_infer")
    with torch.no_grad():
        y = _ops().moe_infer(x2, router_weight, router_bias, gate, up, down, mode, int(top_k), float(output_scale),
                             bool(sigmoid_renormalize), selection_bias)
    return y.view(x.shape)


class ParLossFunction(torch.autograd.Function):
    """(par_loss, balance_loss, label_accuracy, pseudo_labels) of one layer (docs/math.md §3.2); gradients reach only the
    router weight and bias (the teacher, the experts and x are constants of this loss, as in the paper code)."""

    @staticmethod
    def forward(ctx, router_weight, router_bias, x, dense_gate, dense_up, dense_down, gate, up, down, top_k, clip):
        par, bal, acc, gwp, gbp, gwb, gbb, labels = _ops().par_loss(
            x, dense_gate, dense_up, dense_down, gate, up, down, router_weight, router_bias, int(top_k), float(clip))
        ctx.save_for_backward(gwp, gbp, gwb, gbb)
        ctx.mark_non_differentiable(acc, labels)
        return par, bal, acc, labels

    @staticmethod
    def backward(ctx, g_par, g_bal, _g_acc, _g_labels):
        gwp, gbp, gwb, gbb = ctx.saved_tensors
        dw = g_par * gwp + g_bal * gwb
        db = g_par * gbp + g_bal * gbb
        return dw, db, None, None, None, None, None, None, None, None, None


def par_loss(x, dense_gate, dense_up, dense_down, gate, up, down, router_weight, router_bias, top_k, clip=1e-7):
    """PAR loss (KL(clip(p) || clip(q)), mean over tokens) and the balance term, with the oracle's label accuracy
    and pseudo-labels [n_tokens, top_k]. x [n_tokens, d_model] is the layer's FFN input; dense_* the frozen
    teacher FFN (nn.Linear layout: gate/up [d_ff, d_model], down [d_model, d_ff])."""
    x2 = _flatten_tokens(x, "par_loss")
    return ParLossFunction.apply(router_weight, router_bias, x2, dense_gate, dense_up, dense_down, gate, up, down,
                                 top_k, clip)


class BalanceLossFunction(torch.autograd.Function):
    """L_bal = mean_{t,n} 1[n in TopK(p_t)] p_tn on router logits [n_tokens, n_experts] (docs/math.md §3.2)."""

    @staticmethod
    def forward(ctx, logits, top_k):
        loss, grad = _ops().balance_loss(logits, int(top_k))
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return g * grad, None


def balance_loss(logits, top_k):
    """The paper code's balance term on router logits [..., n_experts]."""
    return BalanceLossFunction.apply(_flatten_tokens(logits, "balance_loss", "logits"), top_k)


def factorize(w_gate, w_up, w_down, n_experts, permutation=None):
    """Splits a dense SwiGLU FFN (nn.Linear layout: w_gate, w_up [d_ff, d_model], w_down [d_model, d_ff]) into
    stacked experts with the library's semantics (docs/math.md §1.2): expert e owns the permuted neurons
    permutation[e*m:(e+1)*m], m = d_ff / n_experts, the SAME permutation for gate rows, up rows and down columns
    (identity when None). Returns new contiguous tensors (gate, up [N, m, d]; down [N, d, m])."""
    d_ff, d = w_gate.shape
    if d_ff % n_experts != 0:
        raise ValueError(f"factorize: n_experts = {n_experts} must divide d_ff = {d_ff}")
    m = d_ff // n_experts
    perm = torch.arange(d_ff) if permutation is None else torch.as_tensor(permutation, dtype=torch.long)
    if sorted(perm.tolist()) != list(range(d_ff)):
        raise ValueError("factorize: argument 'permutation' is not a permutation of range(d_ff)")
    gate = w_gate[perm].reshape(n_experts, m, d).contiguous()
    up = w_up[perm].reshape(n_experts, m, d).contiguous()
    down = w_down[:, perm].reshape(d, n_experts, m).permute(1, 0, 2).contiguous()
    return gate, up, down


class MoeFfn(torch.nn.Module):
    """A trainable K-of-N MoE SwiGLU layer backed by factorllm's kernels."""

    def __init__(self, gate, up, down, router_weight, router_bias, mode="softmax_topk_renorm", top_k=2,
                 output_scale=1.0, save_activations=True):
        super().__init__()
        self.gate = torch.nn.Parameter(gate)
        self.up = torch.nn.Parameter(up)
        self.down = torch.nn.Parameter(down)
        self.router_weight = torch.nn.Parameter(router_weight)
        self.router_bias = torch.nn.Parameter(router_bias)
        self.mode, self.top_k, self.output_scale, self.save_activations = mode, top_k, output_scale, save_activations

    @classmethod
    def from_dense(cls, w_gate, w_up, w_down, n_experts, top_k, mode="softmax_topk_renorm", permutation=None,
                   router_std=0.02, seed=0, **kw):
        """Factorizes a dense FFN and adds a router with the paper's init N(0, router_std^2), bias 0 (docs/math.md §2.2)."""
        gate, up, down = factorize(w_gate.detach(), w_up.detach(), w_down.detach(), n_experts, permutation)
        gen = torch.Generator().manual_seed(seed)
        rw = torch.randn(n_experts, w_gate.shape[1], generator=gen, dtype=w_gate.dtype) * router_std
        rb = torch.zeros(n_experts, dtype=w_gate.dtype)
        return cls(gate, up, down, rw, rb, mode=mode, top_k=top_k, **kw)

    @property
    def n_experts(self):
        return self.gate.shape[0]

    def router_logits(self, x):
        return torch.nn.functional.linear(x, self.router_weight, self.router_bias)

    def forward(self, x):
        return moe_ffn(x, self.router_weight, self.router_bias, self.gate, self.up, self.down, self.mode, self.top_k,
                       self.output_scale, save_activations=self.save_activations)


# Resolve cuda_available / cuda_status now when the library is where load_library looks by default. Warn only when
# this torch sees a GPU but factorllm's CUDA path is compiled out: CPU-only machines (and CI) stay quiet.
try:
    load_library()
except FileNotFoundError:
    pass
if torch.cuda.is_available() and not cuda_available:
    import warnings

    warnings.warn(f"factorllm.torch: CUDA tensors are not supported: {cuda_status}", RuntimeWarning, stacklevel=2)
