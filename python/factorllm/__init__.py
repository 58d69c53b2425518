# SPDX-License-Identifier: Apache-2.0
"""factorllm: turn the dense SwiGLU FFNs of an LLM into sparse mixtures of experts (FactorLLM, arXiv 2408.11855)
and run them with the library's C++ kernels, on NumPy arrays and DLPack tensors without copies.

Quick example::

    import numpy as np
    import factorllm as fl

    d_model, d_ff, n_experts, top_k = 64, 256, 8, 2
    rng = np.random.default_rng(0)
    gate, up = (rng.standard_normal((d_ff, d_model), dtype=np.float32) * 0.1 for _ in range(2))
    down = rng.standard_normal((d_model, d_ff), dtype=np.float32) * 0.1
    part = fl.cluster_weights(gate, up, down, n_experts)                   # or fl.ExpertPartition.contiguous(...)
    experts = fl.factorize(gate, up, down, part)                           # (gate, up, down), stacked
    router = fl.router_from_partition(gate, up, down, part)                # (weight, bias)
    layer = fl.MoeFfn(*experts, *router, top_k=top_k, partition=part)
    x = rng.standard_normal((16, d_model), dtype=np.float32)
    y = layer(x)                                                           # [16, d_model] float32
    fl.save("moe.safetensors", [layer]); layer2, = fl.load("moe.safetensors")

What is here (help() on each says more):
  ExpertPartition, factorize, unfactorize          docs/math.md section 1
  MoeFfn (forward / __call__), RoutingRecord       the K-of-N layer, docs/design.md section 2
  par_loss                                         PAR and balance losses with router gradients, docs/math.md 3.2
  cluster_weights, cluster_activations, router_from_partition, train_router, recover_refit, recover_distill
                                                   the conversion steps (include/factorllm/model/convert.hpp)
  load, save                                       factorized-model safetensors files (FormatError on bad files)
  from_dlpack, to_dlpack                           DLPack in and out (torch, NumPy >= 1.22), no copies
  factorllm.torch                                  autograd functions for PyTorch (import it explicitly)

Conventions: activations are float32 NumPy arrays (or objects with __dlpack__) with a contiguous last dimension;
bf16 weights are uint16 arrays holding the bf16 bits. Inputs are read in place and never converted: a wrong dtype
raises TypeError, a wrong shape or value ValueError, with the C++ library's message. The GIL is released inside the
kernels.
"""
from ._core import (  # noqa: F401
    DLPackExport,
    ExpertPartition,
    FormatError,
    MoeFfn,
    RoutingRecord,
    __version__,
    cluster_activations,
    cluster_weights,
    factorize,
    from_dlpack,
    load,
    par_loss,
    recover_distill,
    recover_refit,
    router_from_partition,
    save,
    to_dlpack,
    train_router,
    unfactorize,
)

__all__ = [
    "DLPackExport", "ExpertPartition", "FormatError", "MoeFfn", "RoutingRecord", "cluster_activations",
    "cluster_weights", "factorize", "from_dlpack", "load", "par_loss", "recover_distill", "recover_refit",
    "router_from_partition", "save", "to_dlpack", "train_router", "unfactorize",
]
