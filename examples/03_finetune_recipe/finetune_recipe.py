# SPDX-License-Identifier: Apache-2.0
"""FactorLLM's two-stage recipe end to end on stories260K, on factorllm's kernels (the PyTorch ops of
factorllm.torch): factorize every FFN into K-of-N experts, stage A trains the routers with the PAR loss
(+ balance term) on the dense teacher's FFN inputs, stage B fine-tunes experts and routers by logit
distillation (KL to the dense teacher's next-token distribution) on sequences sampled from the dense model, then
measures on held-out sequences with the fidelity report's definitions and writes its CSV rows
(recovery = finetune).

Usage (Debian's python with torch; 2 threads):
    /usr/bin/python3 examples/03_finetune_recipe/finetune_recipe.py [--configs 4:2 4:1 8:2] [--csv PATH]
        [--append] [--steps 2000] [--batch 16] [--partition contiguous] [--quick] [--init FACTORIZED]
        [--router-bias none] [--save PATH] [--save-heldout FILE]

--init FACTORIZED starts stage B from the MoE layers of a factorized safetensors file (factorllm convert's output or
a previous --save) instead of factorizing and running stage A.

Held-out set = the fidelity report's: 32 sequences of BOS + 128 tokens, sequence i drawn at temperature 1 with
its own std::mt19937_64 seeded 1000000 + i (the same draws as examples/common/calibration.hpp, reproduced
here bit for bit; the logits are this script's float32 forward). Training sequences come from disjoint seeds
(2000000 + i) and are checked never to equal a held-out sequence. Metrics, over the 32 x 128 next-token
positions: top1_agreement (argmax equals the dense model's), next_token_acc (argmax equals the sampled next
token), acc_retention (next_token_acc / dense next_token_acc), ppl (exp of the mean next-token NLL), ppl_dense,
kl_to_dense (mean KL(dense || model)).
"""
import argparse
import csv
import json
import math
import os
import struct
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))


sys.path.insert(0, os.path.join(REPO, "tools", "python"))  # tools/python/factorllm_locate.py finds the package
from factorllm_locate import import_factorllm_torch  # noqa: E402

fllm = import_factorllm_torch(REPO)

CSV_COLUMNS = ["config", "N", "K", "shared", "partition", "router", "recovery", "ffn_flops_fraction", "top1_agreement",
               "next_token_acc", "acc_retention", "ppl", "ppl_dense", "kl_to_dense"]
BOS = 1
CHECK_TEXT = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, "
              "she saw a big, red ball. She wanted to play with it, but it was too high")


# ---------------------------------------------------------------------------------------------------------------
# llama2.c checkpoint and tokenizer (format: shared/models/README.md), read with numpy and validated
# ---------------------------------------------------------------------------------------------------------------

def load_checkpoint(path):
    raw = np.fromfile(path, dtype="<u1")
    if raw.size < 28:
        raise SystemExit(f"{path}: {raw.size} bytes, too small for the 7-int32 llama2.c header")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = (int(v) for v in raw[:28].view("<i4"))
    shared = vocab > 0
    vocab = abs(vocab)
    if min(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len) <= 0 or dim % n_heads or n_heads % n_kv:
        raise SystemExit(f"{path}: invalid header dim={dim} hidden={hidden} layers={n_layers} heads={n_heads}/{n_kv}")
    hs = dim // n_heads
    kv_dim = dim * n_kv // n_heads
    shapes = [("tok", (vocab, dim)), ("rms_att", (n_layers, dim)), ("wq", (n_layers, dim, dim)),
              ("wk", (n_layers, kv_dim, dim)), ("wv", (n_layers, kv_dim, dim)), ("wo", (n_layers, dim, dim)),
              ("rms_ffn", (n_layers, dim)), ("w1", (n_layers, hidden, dim)), ("w2", (n_layers, dim, hidden)),
              ("w3", (n_layers, hidden, dim)), ("rms_final", (dim,)), ("rope", (seq_len * hs,))]
    if not shared:
        shapes.append(("wcls", (vocab, dim)))
    need = 28 + 4 * sum(int(np.prod(s)) for _, s in shapes)
    if raw.size < need:
        raise SystemExit(f"{path}: {raw.size} bytes, the header needs {need}")
    floats = raw[28:need].view("<f4")
    w, at = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        w[name] = torch.from_numpy(floats[at:at + n].astype(np.float32).reshape(shape))
        at += n
    cfg = dict(dim=dim, hidden=hidden, n_layers=n_layers, n_heads=n_heads, n_kv=n_kv, vocab=vocab, seq_len=seq_len)
    return cfg, w


def load_tokenizer(path, vocab):
    raw = open(path, "rb").read()
    at, pieces = 4, []
    for _ in range(vocab):
        if at + 8 > len(raw):
            raise SystemExit(f"{path}: truncated")
        n = int(np.frombuffer(raw[at + 4:at + 8], "<i4")[0])
        pieces.append(raw[at + 8:at + 8 + n])
        at += 8 + n
    return pieces


def decode(pieces, tokens):
    out = b""
    prev = BOS
    for t in tokens:
        p = pieces[t]
        if prev == BOS and p.startswith(b" "):
            p = p[1:]  # llama2.c strips the space after BOS
        if p.startswith(b"<0x") and p.endswith(b">") and len(p) == 6:
            p = bytes([int(p[3:5], 16)])
        out += p
        prev = t
    return out.decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------------------------
# A small PyTorch llama with llama2.c semantics and pluggable FFNs
# ---------------------------------------------------------------------------------------------------------------

class DenseFfn(torch.nn.Module):
    def __init__(self, w1, w2, w3):
        super().__init__()
        self.w1, self.w2, self.w3 = (torch.nn.Parameter(t.clone(), requires_grad=False) for t in (w1, w2, w3))

    def forward(self, x):
        return F.linear(F.silu(F.linear(x, self.w1)) * F.linear(x, self.w3), self.w2)


class Llama(torch.nn.Module):
    """stories260K's transformer (RMSNorm eps 1e-5, RoPE on pairs (i, i+1), GQA, SwiGLU FFN, tied classifier).
    Everything but the FFNs is frozen (docs/math.md §3.3)."""

    def __init__(self, cfg, w):
        super().__init__()
        self.cfg = cfg
        frozen = lambda t: torch.nn.Parameter(t.clone(), requires_grad=False)  # noqa: E731
        self.tok, self.rms_final = frozen(w["tok"]), frozen(w["rms_final"])
        self.wcls = self.tok if "wcls" not in w else frozen(w["wcls"])
        self.rms_att, self.wq, self.wk = frozen(w["rms_att"]), frozen(w["wq"]), frozen(w["wk"])
        self.wv, self.wo, self.rms_ffn = frozen(w["wv"]), frozen(w["wo"]), frozen(w["rms_ffn"])
        self.ffns = torch.nn.ModuleList(DenseFfn(w["w1"][l], w["w2"][l], w["w3"][l]) for l in range(cfg["n_layers"]))
        hs = cfg["dim"] // cfg["n_heads"]
        # RoPE angles as llama2.c computes them (float32 powf, then pos * freq in float32).
        freq = 1.0 / torch.pow(torch.tensor(10000.0), torch.arange(0, hs, 2, dtype=torch.float32) / hs)
        val = torch.arange(cfg["seq_len"], dtype=torch.float32)[:, None] * freq[None, :]
        self.register_buffer("cos", torch.cos(val), persistent=False)
        self.register_buffer("sin", torch.sin(val), persistent=False)

    @staticmethod
    def rmsnorm(x, w):
        return w * (x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-5))

    def rope(self, v, pos0):  # v [B, T, heads, hs]
        t = v.shape[1]
        c, s = self.cos[pos0:pos0 + t, None, :], self.sin[pos0:pos0 + t, None, :]
        v0, v1 = v[..., 0::2], v[..., 1::2]
        return torch.stack((v0 * c - v1 * s, v0 * s + v1 * c), dim=-1).flatten(-2)

    def forward(self, tokens, cache=None, pos0=0, ffn_inputs=None, stop_layer=None):
        """tokens [B, T] at positions pos0.. -> logits [B, T, vocab]. `cache` (a dict, filled on first use) holds
        every layer's keys and values for positions < pos0 and receives the new ones; `ffn_inputs` (a list)
        receives every layer's FFN input; `stop_layer` stops at that layer's FFN input (returns None)."""
        cfg = self.cfg
        b, t = tokens.shape
        nh, nkv, d = cfg["n_heads"], cfg["n_kv"], cfg["dim"]
        hs, rep, s_len = d // nh, nh // nkv, pos0 + t
        x = self.tok[tokens]
        mask = None
        if t > 1:  # causal; queries are grouped by KV head below, so the [T, S] mask repeats per group member
            mask = torch.full((t, s_len), float("-inf")).triu(pos0 + 1).repeat(rep, 1)
        if cache is not None and not cache:
            cache["k"] = torch.empty(cfg["n_layers"], b, nkv, cfg["seq_len"], hs)
            cache["v"] = torch.empty(cfg["n_layers"], b, nkv, cfg["seq_len"], hs)
        for l in range(cfg["n_layers"]):
            xn = self.rmsnorm(x, self.rms_att[l])
            # Heads g*rep .. g*rep+rep-1 share KV head g (GQA, llama2.c's h / kv_mul): group their queries so one
            # batched matmul per KV head serves them all, without repeating keys and values.
            q = self.rope(F.linear(xn, self.wq[l]).view(b, t, nh, hs), pos0)
            q = q.view(b, t, nkv, rep, hs).permute(0, 2, 3, 1, 4).reshape(b, nkv, rep * t, hs)
            k = self.rope(F.linear(xn, self.wk[l]).view(b, t, nkv, hs), pos0).transpose(1, 2)  # [B, nkv, T, hs]
            v = F.linear(xn, self.wv[l]).view(b, t, nkv, hs).transpose(1, 2)
            if cache is not None:
                cache["k"][l, :, :, pos0:s_len] = k
                cache["v"][l, :, :, pos0:s_len] = v
                k, v = cache["k"][l, :, :, :s_len], cache["v"][l, :, :, :s_len]
            att = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(hs))  # [B, nkv, rep*T, S]
            if mask is not None:
                att = att + mask
            o = (att.softmax(-1) @ v).view(b, nkv, rep, t, hs).permute(0, 3, 1, 2, 4).reshape(b, t, d)
            x = x + F.linear(o, self.wo[l])
            xf = self.rmsnorm(x, self.rms_ffn[l])
            if stop_layer == l:
                ffn_inputs.append(xf)
                return None
            if ffn_inputs is not None:
                ffn_inputs.append(xf)
            x = x + self.ffns[l](xf)
        return F.linear(self.rmsnorm(x, self.rms_final), self.wcls)


# ---------------------------------------------------------------------------------------------------------------
# Sampling, bit-compatible with examples/common/llama2c_engine.hpp's Sampler (std::mt19937_64, 53-bit uniform,
# double softmax, inverse CDF)
# ---------------------------------------------------------------------------------------------------------------

class MT19937_64:
    """std::mt19937_64 (default parameters), so seeds give the same draws as the C++ examples."""
    M64 = (1 << 64) - 1

    def __init__(self, seed):
        mt = [seed & self.M64]
        for i in range(1, 312):
            mt.append((6364136223846793005 * (mt[-1] ^ (mt[-1] >> 62)) + i) & self.M64)
        self.mt, self.i = mt, 312

    def _twist(self):
        mt = self.mt
        for i in range(312):
            x = (mt[i] & 0xFFFFFFFF80000000) | (mt[(i + 1) % 312] & 0x7FFFFFFF)
            mt[i] = mt[(i + 156) % 312] ^ (x >> 1) ^ (0xB5026F5AA96619E9 if x & 1 else 0)
        self.i = 0

    def __call__(self):
        if self.i >= 312:
            self._twist()
        x = self.mt[self.i]
        self.i += 1
        x ^= (x >> 29) & 0x5555555555555555
        x ^= (x << 17) & 0x71D67FFFEDA60000
        x ^= (x << 37) & 0xFFF7EEE000000000
        x ^= x >> 43
        return x & self.M64

    def uniform01(self):
        return (self() >> 11) * (1.0 / 9007199254740992.0)


def sample_token(logits_row, rng, temperature=1.0):
    """Sampler::sample: softmax in double (max subtracted), sequential sums, first index with r < cdf."""
    z = logits_row.astype(np.float64)
    mx = z[int(np.argmax(logits_row))]
    p = np.exp((z - mx) * (1.0 / temperature))
    cdf = np.cumsum(p)  # sequential, like the C++ loop
    r = rng.uniform01() * cdf[-1]
    i = int(np.searchsorted(cdf, r, side="right"))
    return min(i, len(p) - 1)


@torch.no_grad()
def sample_sequences(model, n, length, first_seed, batch=256):
    """n sequences of BOS + `length` tokens, sequence i drawn with MT19937_64(first_seed + i), as
    calibration.hpp's sample_sequences (BOS mid-sequence does not stop a sequence)."""
    out = []
    for b0 in range(0, n, batch):
        rngs = [MT19937_64(first_seed + i) for i in range(b0, min(n, b0 + batch))]
        toks = torch.full((len(rngs), 1), BOS, dtype=torch.long)
        cache, cur = {}, toks
        for pos in range(length):
            logits = model(cur, cache=cache, pos0=pos)[:, -1, :].numpy()
            nxt = [sample_token(logits[j], rngs[j]) for j in range(len(rngs))]
            cur = torch.tensor(nxt, dtype=torch.long)[:, None]
            toks = torch.cat((toks, cur), dim=1)
        out.append(toks)
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation (the fidelity report's definitions)
# ---------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, seqs, dense_ref=None, batch=32):
    """Row t of each sequence predicts token t + 1 (positions 0 .. len-2). Returns metrics and (when dense_ref is
    None) the reference (log-probs, argmax) for later models."""
    agree = correct = positions = 0
    nll = kl = 0.0
    ref_lp, ref_top = [], []
    for b0 in range(0, len(seqs), batch):
        s = seqs[b0:b0 + batch]
        lp = torch.log_softmax(model(s[:, :-1]).double(), dim=-1)  # [B, T, V]
        top = lp.argmax(-1)
        target = s[:, 1:]
        nll -= lp.gather(-1, target[..., None]).sum().item()
        correct += (top == target).sum().item()
        positions += target.numel()
        if dense_ref is None:
            ref_lp.append(lp)
            ref_top.append(top)
            agree += target.numel()
        else:
            dlp, dtop = dense_ref[0][b0 // batch], dense_ref[1][b0 // batch]
            agree += (top == dtop).sum().item()
            kl += (dlp.exp() * (dlp - lp)).sum().item()
    m = dict(top1_agreement=agree / positions, next_token_acc=correct / positions, ppl=math.exp(nll / positions),
             kl_to_dense=kl / positions, positions=positions)
    return m, (ref_lp, ref_top)


# ---------------------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------------------

def pad_ffn(w1, w2, w3, multiple):
    """Zero-pads d_ff to a multiple of N (as the fidelity report does): padded neurons contribute exactly 0."""
    dff = w1.shape[0]
    pad = (-dff) % multiple
    if pad == 0:
        return w1, w2, w3
    z = torch.zeros(pad, w1.shape[1])
    return torch.cat((w1, z)), torch.cat((w2, torch.zeros(w2.shape[0], pad)), dim=1), torch.cat((w3, z))


def random_permutation(d_ff, seed):
    """ffn::ExpertPartition::random(d_ff, n, seed)'s permutation: Fisher-Yates on std::mt19937_64 with an unbiased
    rejection draw (the library's exact sequence)."""
    perm, rng, m64 = list(range(d_ff)), MT19937_64(seed), (1 << 64) - 1
    for i in range(d_ff - 1, 0, -1):
        bound = i + 1
        limit = m64 - m64 % bound
        r = rng()
        while r >= limit:
            r = rng()
        j = r % bound
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def cluster_activations(h, n, iters=30, seed=0):
    """Balanced clustering of the d_ff neurons by co-activation (the idea of MoEfication): neuron i is described by
    its |h_i| over calibration tokens (L2-normalized); balanced k-means (every expert gets d_ff / n neurons,
    greedy assignment by similarity under capacity) groups neurons that fire together. Returns a permutation:
    expert e owns perm[e*m:(e+1)*m]."""
    feats = F.normalize(h.abs().t().double(), dim=1)  # [d_ff, tokens]
    d_ff, m = feats.shape[0], feats.shape[0] // n
    gen = torch.Generator().manual_seed(seed)
    cent = feats[torch.randperm(d_ff, generator=gen)[:n]]
    for _ in range(iters):
        sim = feats @ cent.t()  # [d_ff, n]
        order = torch.argsort(sim.flatten(), descending=True)
        owner, room = [-1] * d_ff, [m] * n
        for idx in order.tolist():
            i, e = divmod(idx, n)
            if owner[i] < 0 and room[e] > 0:
                owner[i], room[e] = e, room[e] - 1
        own = torch.tensor(owner)
        cent = F.normalize(torch.stack([feats[own == e].mean(0) for e in range(n)]), dim=1)
    return [i for e in range(n) for i in range(d_ff) if owner[i] == e]


def build_student(cfg, w, n, k, mode, seed, partition="contiguous", ffn_inputs=None):
    """The dense model with every FFN factorized into n experts (K of them per token) and a random router."""
    student = Llama(cfg, w)
    student.perms = []  # each layer's permutation of the (padded) d_ff neurons, as saved in the factorized file
    for l in range(cfg["n_layers"]):
        w1, w2, w3 = pad_ffn(w["w1"][l], w["w2"][l], w["w3"][l], n)
        perm = None
        if partition == "random":
            perm = random_permutation(w1.shape[0], seed + l)
        elif partition == "cluster_activations":
            x = ffn_inputs[l]
            perm = cluster_activations(F.silu(x @ w1.t()) * (x @ w3.t()), n, seed=seed + l)
        # Expert e owns the permuted neurons perm[e*m:(e+1)*m] (the library's ExpertPartition semantics; contiguous
        # = identity, the paper code's choice).
        # The output scale makes the combine weights of a fresh router (logits ~ 0) equal 1, so the MoE starts as
        # the plain sum of the K chosen experts (= the dense FFN minus the dropped ones). Measured on stories260K
        # this starts far closer to the dense model than the paper code's floor(N/K) * sum (retention 0.29 vs 0.12
        # at N=4, K=2 before training).
        scale = {"softmax_topk_renorm": k, "topk_softmax": k, "softmax_topk": n, "sigmoid_topk": 2,
                 "code_ref": 1.0 / (n // k)}[mode]
        student.ffns[l] = fllm.MoeFfn.from_dense(w1, w3, w2, n, k, mode=mode, permutation=perm, seed=seed + l,
                                                 output_scale=scale)
        student.perms.append(list(range(w1.shape[0])) if perm is None else [int(i) for i in perm])
    return student


def stage_a(teacher, student, seqs, k, steps, lr, batch_tokens, balance_ratio, log, train_bias=True):
    """Routers by PAR (+ balance) on the dense teacher's FFN inputs (docs/math.md §3.2): per layer, Adam on
    L_PA + balance_ratio * L_bal (the paper's weights 0.05 and 0.01 give balance_ratio 0.2). train_bias=False keeps
    the router bias at exactly 0 (not optimized): the bias-free router llama.cpp's MoE can run."""
    with torch.no_grad():
        xs = []
        teacher(seqs[:, :-1], ffn_inputs=xs)
    gen = torch.Generator().manual_seed(7)
    for l, moe in enumerate(student.ffns):
        # Position 0 (BOS) is the same row in every sequence: keep it once.
        x = torch.cat((xs[l][:1, 0], xs[l][:, 1:].reshape(-1, xs[l].shape[-1]))).contiguous()
        dense = teacher.ffns[l]
        w1, w2, w3 = pad_ffn(dense.w1.data, dense.w2.data, dense.w3.data, moe.n_experts)
        rw = moe.router_weight.detach().clone().requires_grad_()
        rb = moe.router_bias.detach().clone().requires_grad_(train_bias)
        opt = torch.optim.Adam([rw, rb] if train_bias else [rw], lr=lr)
        g, u, dn = moe.gate.detach(), moe.up.detach(), moe.down.detach()
        for step in range(steps):
            idx = torch.randint(0, x.shape[0], (min(batch_tokens, x.shape[0]),), generator=gen)
            par, bal, acc, _ = fllm.par_loss(x[idx].contiguous(), w1, w3, w2, g, u, dn, rw, rb, k)
            opt.zero_grad()
            (par + balance_ratio * bal).backward()
            opt.step()
        with torch.no_grad():
            par, bal, acc, _ = fllm.par_loss(x, w1, w3, w2, g, u, dn, rw, rb, k)
            moe.router_weight.copy_(rw)
            moe.router_bias.copy_(rb)
        log(f"  stage A layer {l}: {x.shape[0]} tokens, PAR {par.item():.4f}, balance {bal.item():.4f}, "
            f"router label accuracy {acc.item():.3f}")


@torch.no_grad()
def teacher_log_probs(teacher, pool, chunk=64):
    """The dense teacher's next-token log-probabilities on every training sequence, computed once (the teacher is
    frozen) and kept in float16 ([n_seqs, length, vocab]; 4096 x 128 x 512 x 2 bytes = 537 MB): stage B then
    runs only the student. float16 keeps log-probs to ~1e-3 absolute, far below what distillation resolves."""
    return torch.cat([torch.log_softmax(teacher(pool[i:i + chunk, :-1]), dim=-1).half()
                      for i in range(0, pool.shape[0], chunk)])


def stage_b(student, pool, teacher_lp, steps, batch, lr, router_lr, log, log_every=200, train_bias=True):
    """Experts + routers by logit distillation: mean over positions of KL(teacher || student), Adam with 20 warmup
    steps then cosine decay to 0. train_bias=False leaves the router biases out of the optimizer (they stay 0)."""
    expert_params, router_params = [], []
    for moe in student.ffns:
        expert_params += [moe.gate, moe.up, moe.down]
        router_params += [moe.router_weight]
        if train_bias:
            router_params.append(moe.router_bias)
        else:
            moe.router_bias.requires_grad_(False)
    opt = torch.optim.Adam([{"params": expert_params, "lr": lr}, {"params": router_params, "lr": router_lr}])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(11)
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, pool.shape[0], (batch,), generator=gen)
        t_lp = teacher_lp[idx].float()
        s_lp = torch.log_softmax(student(pool[idx, :-1]), dim=-1)
        loss = (t_lp.exp() * (t_lp - s_lp)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % log_every == 0 or step == 0:
            log(f"  stage B step {step + 1}/{steps}: KL {loss.item():.4f} ({time.time() - t0:.0f} s)")


# ---------------------------------------------------------------------------------------------------------------
# Saving: the library's factorized-model schema (include/factorllm/io/factorized_checkpoint.hpp), written by hand
# ---------------------------------------------------------------------------------------------------------------

# torch dtype -> (safetensors dtype, the integer view whose bits are written, its little-endian numpy type)
_ST_DTYPES = {torch.float32: ("F32", torch.int32, "<i4"), torch.float16: ("F16", torch.int16, "<i2"),
              torch.bfloat16: ("BF16", torch.int16, "<i2"), torch.int32: ("I32", torch.int32, "<i4")}


def write_safetensors(path, tensors, metadata):
    """Writes a safetensors file: 8-byte little-endian header length, the JSON header (tensors in the order given,
    back to back; __metadata__ of string values; padded with spaces so the data starts 8-byte aligned, as the
    library's SafetensorsWriter does), then the little-endian data. tensors: list of (name, torch tensor)."""
    header, blobs, at = {"__metadata__": {k: str(v) for k, v in metadata.items()}}, [], 0
    for name, t in tensors:
        t = t.detach().contiguous().cpu()
        code, view, le = _ST_DTYPES[t.dtype]
        data = t.view(view).numpy().astype(le).tobytes()
        header[name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [at, at + len(data)]}
        blobs.append(data)
        at += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((-(8 + len(text))) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def output_scale_text(v):
    """The shortest text that parses back to the float32 value (what the library's float_text writes)."""
    v32 = np.float32(v)
    for digits in range(1, 10):
        s = f"{float(v32):.{digits}g}"
        if np.float32(s) == v32:
            return s
    return repr(float(v32))


def saved_tensors(student, save_dtype):
    """Per layer (gate, up, down) as stored (rounded to save_dtype) and the router weight and bias (always F32)."""
    dt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[save_dtype]
    out = []
    for moe in student.ffns:
        out.append(tuple(t.detach().to(dt) for t in (moe.gate, moe.up, moe.down)) +
                   tuple(t.detach().float() for t in (moe.router_weight, moe.router_bias)))
    return out


def save_factorized(path, student, k, mode, save_dtype, metadata):
    """The fine-tuned MoE layers in the library's factorized schema (load_factorized reads it): per layer l, prefix
    layers.{l}.ffn.: permutation I32 [d_ff] (d_ff zero-padded to a multiple of N when N does not divide it: the
    permutation then covers the padded neurons, which are zero in every expert), experts.gate / experts.up
    [N, d_expert, d_model], experts.down [N, d_model, d_expert] (F32, or F16 / BF16 with --save-dtype), router.weight
    F32 [N, d_model], router.bias F32 [N]; __metadata__ format, format_version, n_layers, and per layer n_experts,
    top_k, combine_mode, output_scale, sigmoid_renormalize (plus the recipe's own descriptive keys)."""
    tensors, meta = [], dict(metadata)
    meta.update({"format": "factorllm.moe", "format_version": "1", "n_layers": str(len(student.ffns))})
    for l, (moe, (g, u, dn, rw, rb)) in enumerate(zip(student.ffns, saved_tensors(student, save_dtype))):
        p, m = f"layers.{l}.ffn.", f"layers.{l}."
        tensors += [(p + "permutation", torch.tensor(student.perms[l], dtype=torch.int32)),
                    (p + "experts.gate", g), (p + "experts.up", u), (p + "experts.down", dn),
                    (p + "router.weight", rw), (p + "router.bias", rb)]
        meta.update({m + "n_experts": str(moe.n_experts), m + "top_k": str(k), m + "combine_mode": mode,
                     m + "output_scale": output_scale_text(moe.output_scale), m + "sigmoid_renormalize": "false"})
    write_safetensors(path, tensors, meta)


# ---------------------------------------------------------------------------------------------------------------
# --init: start stage B from a factorized file (factorllm convert's output, or a previous --save), read by hand
# ---------------------------------------------------------------------------------------------------------------

# safetensors dtype -> (little-endian numpy type, bytes per element, how the bits become a torch tensor)
_ST_READ = {"F32": ("<f4", 4, lambda a: torch.from_numpy(a.astype(np.float32))),
            "F16": ("<f2", 2, lambda a: torch.from_numpy(a.astype(np.float32))),
            "BF16": ("<u2", 2, lambda a: torch.from_numpy((a.astype(np.uint32) << 16).view(np.float32))),
            "I32": ("<i4", 4, lambda a: torch.from_numpy(a.astype(np.int32)))}


def read_safetensors(path):
    """Reads a safetensors file (8-byte little-endian header length, JSON header, data) and validates its layout:
    the header is a JSON object, __metadata__ (optional) maps strings to strings, every tensor has a known dtype, a
    shape of non-negative ints and data_offsets [begin, end] inside the data with end - begin = its byte size, and
    tensors do not overlap. Returns (metadata, {name: (dtype, torch tensor, F16/BF16 widened to float32)})."""
    raw = open(path, "rb").read()
    fail = lambda msg: SystemExit(f"--init {path}: {msg}")  # noqa: E731
    if len(raw) < 8:
        raise fail(f"{len(raw)} bytes, too small for a safetensors file")
    n = struct.unpack("<Q", raw[:8])[0]
    if n < 2 or 8 + n > len(raw):
        raise fail(f"header length {n} does not fit the file's {len(raw)} bytes (not a safetensors file)")
    try:
        header = json.loads(raw[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise fail(f"the header is not JSON ({e})")
    if not isinstance(header, dict):
        raise fail("the header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise fail("__metadata__ is not an object of strings")
    data, tensors, spans = raw[8 + n:], {}, []
    for name, info in header.items():
        if not isinstance(info, dict) or info.get("dtype") not in _ST_READ:
            raise fail(f"tensor '{name}' has dtype {info.get('dtype') if isinstance(info, dict) else info!r}; "
                       f"this reader knows {sorted(_ST_READ)}")
        shape, offs = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise fail(f"tensor '{name}' has shape {shape!r}")
        le, size, to_torch = _ST_READ[info["dtype"]]
        count = int(np.prod(shape)) if shape else 1
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)
                and 0 <= offs[0] <= offs[1] <= len(data) and offs[1] - offs[0] == count * size):
            raise fail(f"tensor '{name}' ({info['dtype']} {shape}) has data_offsets {offs!r}, expected {count * size} "
                       f"bytes inside the {len(data)} data bytes")
        spans.append((offs[0], offs[1], name))
        tensors[name] = (info["dtype"], to_torch(np.frombuffer(data, le, count, offs[0]).reshape(shape)))
    spans.sort()
    for (_, e0, a), (b1, _, b) in zip(spans, spans[1:]):
        if b1 < e0:
            raise fail(f"tensors '{a}' and '{b}' overlap")
    return meta, tensors


def load_init(path, cfg, configs, mode, router_bias):
    """The MoE layers of a factorized file (include/factorllm/io/factorized_checkpoint.hpp's schema), validated against
    the model and the options: format factorllm.moe version 1, n_layers = the model's, per layer N experts of
    d_ff / N neurons with d_ff the model's hidden size zero-padded to a multiple of N (padded neurons zero in every
    expert), a permutation of range(d_ff), shapes gate / up [N, d_expert, d_model], down [N, d_model, d_expert],
    router [N, d_model] + [N], finite values, the same N and K in every layer (and equal to --configs when given),
    combine_mode = --mode (softmax_topk_renorm: the mode --init supports), output scale finite and > 0, no selection
    bias, and a router bias of exactly 0 with --router-bias none. Returns (n, k, output_scale, layers) with layers a
    list of dicts perm / gate / up / down / rw / rb (float32 tensors)."""
    meta, t = read_safetensors(path)
    fail = lambda msg: SystemExit(f"--init {path}: {msg}")  # noqa: E731
    if meta.get("format") != "factorllm.moe":
        raise fail(f"__metadata__ format is {meta.get('format')!r}, expected 'factorllm.moe' (a factorized model, as "
                   "written by factorllm convert or finetune_recipe.py --save)")
    if meta.get("format_version") != "1":
        raise fail(f"format_version {meta.get('format_version')!r}, this script reads '1'")
    if meta.get("n_layers") != str(cfg["n_layers"]):
        raise fail(f"n_layers {meta.get('n_layers')!r}, the model has {cfg['n_layers']}")
    d, hidden, layers, seen = cfg["dim"], cfg["hidden"], [], set()

    def meta_int(key, lo, hi):
        v = meta.get(key)
        if v is None or not v.isdigit() or not lo <= int(v) <= hi:
            raise fail(f"__metadata__ '{key}' is {v!r}, expected an integer in [{lo}, {hi}]")
        return int(v)

    def tensor(name, shape, dtypes):
        if name not in t:
            raise fail(f"tensor '{name}' is missing")
        dt, x = t[name]
        if dt not in dtypes or list(x.shape) != list(shape):
            raise fail(f"tensor '{name}' is {dt} {list(x.shape)}, expected {'/'.join(dtypes)} {list(shape)}")
        if dt != "I32" and not bool(torch.isfinite(x).all()):
            raise fail(f"tensor '{name}' has non-finite values")
        seen.add(name)
        return x

    for l in range(cfg["n_layers"]):
        p, m = f"layers.{l}.ffn.", f"layers.{l}."
        n = meta_int(m + "n_experts", 1, hidden)
        k = meta_int(m + "top_k", 1, n)
        d_ff = hidden + (-hidden) % n
        if configs is not None and (n, k) != configs[0]:
            raise fail(f"layer {l} has N={n} K={k}, --configs says {configs[0][0]}:{configs[0][1]} (leave --configs "
                       "out to take N and K from the file)")
        if layers and (n, k) != (layers[0]["n"], layers[0]["k"]):
            raise fail(f"layer {l} has N={n} K={k}, layer 0 N={layers[0]['n']} K={layers[0]['k']}; the recipe runs one "
                       "N:K for all layers")
        cm = meta.get(m + "combine_mode")
        if cm not in fllm.MODES:
            raise fail(f"layer {l} combine_mode {cm!r} is not one factorllm's torch op runs {fllm.MODES}")
        if cm != mode:
            raise fail(f"layer {l} combine_mode is {cm!r}; --init supports {mode!r} only (factorllm's torch op runs "
                       f"{', '.join(fllm.MODES)}, but the recipe's float64 reference check, finetune_recipe_check and "
                       "the llama.cpp export cover softmax_topk_renorm): convert with --gating softmax_renorm")
        if meta.get(m + "sigmoid_renormalize", "false") != "false":
            raise fail(f"layer {l} sigmoid_renormalize is {meta.get(m + 'sigmoid_renormalize')!r}, expected 'false'")
        if p + "gating.selection_bias" in t:
            raise fail(f"layer {l} has a gating.selection_bias, which the recipe's student does not model")
        try:
            scale = float(meta.get(m + "output_scale", ""))
        except ValueError:
            raise fail(f"layer {l} output_scale {meta.get(m + 'output_scale')!r} is not a number")
        if not (math.isfinite(scale) and scale > 0):
            raise fail(f"layer {l} output_scale {scale} is not finite and > 0")
        if layers and scale != layers[0]["scale"]:
            raise fail(f"layer {l} output_scale {scale} differs from layer 0's {layers[0]['scale']}")
        perm_t = t.get(p + "permutation")
        if perm_t is None or perm_t[0] != "I32" or perm_t[1].dim() != 1:
            raise fail(f"tensor '{p}permutation' is missing or not I32 [d_ff]")
        if perm_t[1].shape[0] != d_ff:
            raise fail(f"layer {l} has d_ff {perm_t[1].shape[0]}; the model's hidden size {hidden} at N={n} needs "
                       f"{d_ff}" + (f" (zero-padded from {hidden})" if d_ff != hidden else ""))
        perm = tensor(p + "permutation", [d_ff], ("I32",)).tolist()
        if sorted(perm) != list(range(d_ff)):
            raise fail(f"tensor '{p}permutation' is not a permutation of range({d_ff})")
        m_e = d_ff // n
        experts = ("F32", "F16", "BF16")
        g = tensor(p + "experts.gate", [n, m_e, d], experts)
        u = tensor(p + "experts.up", [n, m_e, d], experts)
        dn = tensor(p + "experts.down", [n, d, m_e], experts)
        rw = tensor(p + "router.weight", [n, d], ("F32",))
        rb = tensor(p + "router.bias", [n], ("F32",))
        # Padded neurons (permuted index >= hidden) must be zero in every expert: the file is then a conversion of
        # this model's FFN and finetune_recipe_check accepts the saved result.
        slots = torch.tensor(perm).view(n, m_e) >= hidden
        if slots.any() and (g[slots].abs().max() > 0 or u[slots].abs().max() > 0
                            or dn.permute(0, 2, 1)[slots].abs().max() > 0):
            raise fail(f"layer {l}: padded neurons (>= {hidden}) are not zero")
        if router_bias == "none" and bool(rb.ne(0).any()):
            raise fail(f"layer {l} router.bias is {rb.tolist()}; --router-bias none needs exactly 0 (llama.cpp's MoE "
                       "has no router bias): convert with --gating softmax_renorm, or use --router-bias trained")
        layers.append(dict(n=n, k=k, scale=scale, perm=perm, gate=g, up=u, down=dn, rw=rw, rb=rb))
    extra = sorted(set(t) - seen)
    if extra:
        raise fail(f"unexpected tensors {extra[:4]}{' ...' if len(extra) > 4 else ''}")
    return layers[0]["n"], layers[0]["k"], layers[0]["scale"], layers


def build_student_from_init(cfg, w, init_layers, mode):
    """The dense model with every FFN replaced by the file's MoE layer (experts, router and bias become the student's
    parameters, float32)."""
    student = Llama(cfg, w)
    student.perms = []
    for l, L in enumerate(init_layers):
        student.ffns[l] = fllm.MoeFfn(*(L[key].clone().float().contiguous() for key in ("gate", "up", "down", "rw", "rb")),
                                      mode=mode, top_k=L["k"], output_scale=L["scale"])
        student.perms.append(list(L["perm"]))
    return student


@torch.no_grad()
def check_init(student, init_layers, seqs, log, tol=1e-4):
    """Before training: every layer of the student built from --init, on its own FFN inputs of `seqs`, against the
    plain-torch float64 computation of the file's tensors as read (reference_moe: softmax, top-K, renormalize, output
    scale, SwiGLU experts). Tokens whose K-th and (K+1)-th logits are within 1e-4 are left out (at most 5 %)."""
    xs = []
    student(seqs[:, :-1], ffn_inputs=xs)
    worst, skipped, total = 0.0, 0, 0
    for l, (moe, L) in enumerate(zip(student.ffns, init_layers)):
        x = xs[l].reshape(-1, xs[l].shape[-1]).contiguous()
        y_ref, margin = reference_moe(x, L["gate"], L["up"], L["down"], L["rw"], L["rb"], L["k"], L["scale"])
        y_op = moe(x).double()
        ok = margin > 1e-4
        skipped, total = skipped + int((~ok).sum()), total + x.shape[0]
        err = ((y_op - y_ref)[ok].abs().max() / y_ref.abs().max().clamp_min(1e-30)).item()
        worst = max(worst, err)
    log(f"  --init check: the student's MoE layers vs the file's tensors in float64 (all {len(init_layers)} layers, "
        f"{total // len(init_layers)} tokens each, {skipped} near-tie tokens left out): max |dy| / max |y| = {worst:.2e}")
    if worst > tol or skipped > 0.05 * total:
        raise SystemExit(f"--init: the student does not compute what the file describes ({worst:.2e} > {tol}, or "
                         f"{skipped} of {total} near-tie tokens)")


def reference_moe(x, g, u, dn, rw, rb, k, scale):
    """softmax_topk_renorm MoE in float64 with plain torch (independent of factorllm's kernels): p = softmax(W x + b),
    S = the K largest, y = scale * sum_{e in S} p_e / sum_S p * down_e (silu(gate_e x) * up_e x). Also returns the
    gap between the K-th and (K+1)-th router logits (inf when K = N): where it is tiny, float rounding may choose
    another expert set."""
    x, g, u, dn, rw, rb = (t.double() for t in (x, g, u, dn, rw, rb))
    logits = x @ rw.t() + rb
    p = torch.softmax(logits, -1)
    top = torch.topk(logits, k, dim=-1)
    srt = torch.sort(logits, dim=-1, descending=True).values
    margin = (srt[:, k - 1] - srt[:, k]) if k < logits.shape[1] else torch.full((x.shape[0],), float("inf"),
                                                                                 dtype=torch.float64)
    ps = p.gather(-1, top.indices)
    wts = ps / ps.sum(-1, keepdim=True) * scale
    y = torch.zeros_like(x)
    for j in range(k):
        e = top.indices[:, j]
        h = F.silu(torch.einsum("td,tmd->tm", x, g[e])) * torch.einsum("td,tmd->tm", x, u[e])
        y += wts[:, j:j + 1] * torch.einsum("tdm,tm->td", dn[e], h)
    return y, margin


@torch.no_grad()
def save_check(path, student, seq, k, save_dtype, metadata, log):
    """Reference data for tests/recipe_checkpoint_check.cpp: per layer the FFN inputs x [T, d] of one held-out
    sequence (the fine-tuned student's own), the plain-torch float64 reference of the saved layer (weights as
    stored) y_ref [T, d] (stored F32), and the top-K logit margin [T]. Also checks here that factorllm's op (what
    the recipe trained and evaluated with) matches the reference on the same inputs."""
    xs = []
    student(seq[None, :-1], ffn_inputs=xs)
    tensors, worst = [], 0.0
    for l, (moe, (g, u, dn, rw, rb)) in enumerate(zip(student.ffns, saved_tensors(student, save_dtype))):
        x = xs[l][0].contiguous()
        y_ref, margin = reference_moe(x, g.float(), u.float(), dn.float(), rw, rb, k, moe.output_scale)
        if save_dtype == "f32":
            y_op = moe(x).double()
            ok = margin > 1e-4
            err = ((y_op - y_ref)[ok].abs().max() / y_ref.abs().max().clamp_min(1e-30)).item() if ok.any() else 0.0
            worst = max(worst, err)
        tensors += [(f"layers.{l}.x", x.float()), (f"layers.{l}.y_ref", y_ref.float()),
                    (f"layers.{l}.margin", margin.float())]
    if save_dtype == "f32":
        log(f"  check data: factorllm's moe_ffn op vs the float64 reference, max |dy| / max |y| = {worst:.2e}")
        if worst > 1e-4:
            raise SystemExit(f"factorllm's moe_ffn op differs from the plain-torch reference by {worst:.2e} > 1e-4")
    write_safetensors(path, tensors, dict(metadata, format="factorllm.recipe_check", top_k=str(k)))


def save_paths(path, label, several):
    """--save PATH: a '{config}' in PATH becomes the config (e.g. N4K2); otherwise, when several configs run,
    '-N4K2' is inserted before the extension. The check data goes next to it as <stem>.check.safetensors."""
    if "{config}" in path:
        out = path.replace("{config}", label)
    elif several:
        stem, ext = os.path.splitext(path)
        out = f"{stem}-{label}{ext or '.safetensors'}"
    else:
        out = path
    stem, ext = os.path.splitext(out)
    return out, f"{stem}.check{ext or '.safetensors'}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.path.join(REPO, "..", "shared", "models", "stories260K.bin"))
    ap.add_argument("--tokenizer", default=os.path.join(REPO, "..", "shared", "models", "tok512.bin"))
    ap.add_argument("--configs", nargs="+", default=None,
                    help="N:K pairs (default 4:2, the 50 %% budget; with --init: the file's, which --configs must equal)")
    ap.add_argument("--mode", default="softmax_topk_renorm", choices=fllm.MODES)
    ap.add_argument("--partition", default=None, choices=("contiguous", "random", "cluster_activations"),
                    help="default contiguous; not with --init (the file's permutation is kept)")
    ap.add_argument("--eval", type=int, default=32, help="held-out sequences (seeds 1000000 + i)")
    ap.add_argument("--length", type=int, default=128, help="sampled tokens per sequence after BOS")
    ap.add_argument("--train-seqs", type=int, default=4096, help="training pool (seeds 2000000 + i)")
    ap.add_argument("--stage-a-seqs", type=int, default=64)
    ap.add_argument("--stage-a-steps", type=int, default=150)
    ap.add_argument("--stage-a-lr", type=float, default=1e-2)
    ap.add_argument("--steps", type=int, default=2000, help="stage B steps (600: retention 0.93 at N=4, K=2)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-3, help="stage B Adam lr of the experts")
    ap.add_argument("--router-lr", type=float, default=5e-3, help="stage B Adam lr of the routers")
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads (default 1: stories260K's tensors are tiny, and on a shared 2-core machine "
                         "OpenMP fork/join with 2 threads measured 5-10x slower per step than 1 thread)")
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--csv", default=None, help="write (or with --append, add) the CSV rows here")
    ap.add_argument("--append", action="store_true", help="append to an existing fidelity CSV (same columns)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 8 held-out sequences, 40 steps")
    ap.add_argument("--router-bias", choices=("trained", "none"), default="trained",
                    help="trained (default): stage A and B train the router bias; none: the bias stays exactly 0 "
                         "(not optimized), the bias-free router llama.cpp's MoE runs")
    ap.add_argument("--save", default=None, metavar="PATH",
                    help="write the fine-tuned MoE layers in the library's factorized schema (load_factorized, "
                         "factorllm export --moe); with several configs, '-N4K2' etc. goes before the extension "
                         "(or replaces '{config}' in PATH); check data for tests goes to <stem>.check.safetensors")
    ap.add_argument("--save-dtype", choices=("f32", "f16", "bf16"), default="f32",
                    help="storage type of the saved experts (routers stay F32)")
    ap.add_argument("--init", default=None, metavar="FACTORIZED",
                    help="skip the factorization and stage A: start stage B from the MoE layers of a factorized "
                         "safetensors file (factorllm convert's output or a previous --save; N, K, permutation, "
                         "experts, routers and output scale from the file)")
    ap.add_argument("--save-heldout", default=None, metavar="FILE",
                    help="write the held-out token sequences (BOS + length tokens each) as a JSON list of lists")
    args = ap.parse_args()
    configs = []  # checked before any long computation
    if args.init and args.configs is not None and len(args.configs) != 1:
        ap.error("--init: the file holds one N:K; give at most one --configs (or none)")
    if args.init and args.partition is not None:
        ap.error("--init keeps the file's permutation; --partition does not apply")
    if args.init and args.mode != "softmax_topk_renorm":
        ap.error(f"--init supports --mode softmax_topk_renorm only (got {args.mode}): the mode factorllm convert "
                 "--gating softmax_renorm writes, which the recipe's float64 reference check, finetune_recipe_check "
                 "and the llama.cpp export cover")
    if args.init and not os.path.isfile(args.init):
        ap.error(f"--init: {args.init} is not a file")
    args.partition = args.partition or "contiguous"
    for spec in (args.configs if args.configs is not None else ["4:2"]):
        try:
            n, k = (int(v) for v in spec.split(":"))
        except ValueError:
            ap.error(f"--configs: '{spec}' is not N:K (e.g. 4:2)")
        if not 1 <= k <= n:
            ap.error(f"--configs: '{spec}' needs 1 <= K <= N")
        configs.append((n, k))
    explicit_configs = configs if args.configs is not None else None
    for out in (args.save, args.save_heldout):  # create output folders now, not after a long run
        if out and os.path.dirname(os.path.abspath(out)):
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fllm.prefer_optimized_blas('note: ')
    if args.quick:
        args.eval, args.train_seqs, args.stage_a_steps, args.steps = 8, 256, 20, 40
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    log = lambda s: print(s, flush=True)  # noqa: E731
    t_start = time.time()
    fllm.load_library()

    if not (os.path.isfile(args.model) and os.path.isfile(args.tokenizer)):
        print(f"finetune_recipe: model or tokenizer missing ({args.model}, {args.tokenizer}); they live in "
              "shared/models/ next to the repository", file=sys.stderr)
        sys.exit(77)  # ctest's SKIP_RETURN_CODE
    blas = fllm.blas_in_use()
    log(f"BLAS used by torch: {blas or 'unknown'}")
    if "openblas" not in blas and "mkl" not in blas and "blis" not in blas:
        log("note: Debian's reference BLAS makes the recipe ~2.5x slower end to end (install libopenblas0-openmp)")
    cfg, w = load_checkpoint(args.model)
    init_layers = None
    if args.init:  # validated before the long sampling
        n, k, scale, init_layers = load_init(args.init, cfg, explicit_configs, args.mode, args.router_bias)
        configs = [(n, k)]
        d_ff = init_layers[0]["gate"].shape[0] * init_layers[0]["gate"].shape[1]
        log(f"--init {args.init}: {cfg['n_layers']} MoE layers, N={n} K={k}, d_ff {d_ff}, output scale "
            f"{scale:g}, {args.mode}; router bias {'zero' if all(not L['rb'].any() for L in init_layers) else 'non-zero'}"
            f" (source: {read_safetensors(args.init)[0].get('source', 'unknown')})")
    pieces = load_tokenizer(args.tokenizer, cfg["vocab"])
    teacher = Llama(cfg, w).eval()
    with torch.no_grad():  # the README's check value: greedy decoding from BOS for 60 steps
        toks, cache, cur = [], {}, torch.tensor([[BOS]])
        for pos in range(60):
            cur = teacher(cur, cache=cache, pos0=pos)[:, -1].argmax(-1, keepdim=True)
            toks.append(int(cur))
    text = decode(pieces, toks)
    if os.path.basename(args.model) == "stories260K.bin":  # the README's check value is for this model
        if text.strip() != CHECK_TEXT:
            raise SystemExit(f"dense model check failed: greedy text {text!r}")
        text = "OK"
    log(f"model: dim {cfg['dim']}, hidden {cfg['hidden']}, {cfg['n_layers']} layers; greedy text {text}")

    held_out = sample_sequences(teacher, args.eval, args.length, 1000000)
    if args.save_heldout:
        with open(args.save_heldout, "w") as f:
            json.dump(held_out.tolist(), f)
        log(f"wrote the {len(held_out)} held-out sequences to {args.save_heldout}")
    train_pool = sample_sequences(teacher, args.train_seqs, args.length, 2000000, batch=512)
    held = {tuple(s.tolist()) for s in held_out}
    overlap = sum(tuple(s.tolist()) in held for s in train_pool)
    if overlap:
        raise SystemExit(f"{overlap} training sequences equal a held-out sequence; change the seeds")
    dense_m, dense_ref = evaluate(teacher, held_out)
    teacher_lp = teacher_log_probs(teacher, train_pool)
    log(f"data: {args.train_seqs} training and {args.eval} held-out sequences of BOS + {args.length} tokens "
        f"(disjoint seeds, no overlap); {dense_m['positions']} held-out positions; dense next_token_acc "
        f"{dense_m['next_token_acc']:.4f}, ppl {dense_m['ppl']:.3f} ({time.time() - t_start:.0f} s)")

    rows = []
    train_bias = args.router_bias == "trained"
    for n, k in configs:
        t0 = time.time()
        calib = None
        if args.partition == "cluster_activations":  # co-activation statistics from the stage-A sequences
            with torch.no_grad():
                xs = []
                teacher(train_pool[:args.stage_a_seqs, :-1], ffn_inputs=xs)
            calib = [x.reshape(-1, x.shape[-1]) for x in xs]
        if init_layers is not None:
            student = build_student_from_init(cfg, w, init_layers, args.mode)
        else:
            student = build_student(cfg, w, n, k, args.mode, args.seed, args.partition, calib)
        d_ff_used = student.ffns[0].gate.shape[0] * student.ffns[0].gate.shape[1]
        flops = k * (d_ff_used // n) / cfg["hidden"]
        before, _ = evaluate(student, held_out, dense_ref)
        init_retention = before["next_token_acc"] / dense_m["next_token_acc"]
        log(f"\nN={n} K={k} ({args.mode}, FFN FLOPs {flops:.3f}): "
            + (f"--init model: top1 {before['top1_agreement']:.4f}, acc {before['next_token_acc']:.4f}, retention "
               f"{init_retention:.4f}, ppl {before['ppl']:.3f}, KL {before['kl_to_dense']:.4f}" if init_layers is not None
               else f"factorized, random routers: retention {init_retention:.3f}"))
        if init_layers is not None:
            check_init(student, init_layers, held_out[:4], log)
        if args.stage_a_steps > 0 and init_layers is None:
            stage_a(teacher, student, train_pool[:args.stage_a_seqs], k, args.stage_a_steps, args.stage_a_lr, 512, 0.2,
                    log, train_bias=train_bias)
        if init_layers is None:
            after_a, _ = evaluate(student, held_out, dense_ref)
            log(f"  after stage A: top1 {after_a['top1_agreement']:.3f}, retention "
                f"{after_a['next_token_acc'] / dense_m['next_token_acc']:.3f} ({time.time() - t0:.0f} s)")
        stage_b(student, train_pool, teacher_lp, args.steps, args.batch, args.lr, args.router_lr, log,
                train_bias=train_bias)
        if not train_bias and any(bool(moe.router_bias.detach().ne(0).any()) for moe in student.ffns):
            raise SystemExit("--router-bias none: a router bias moved away from 0")
        m, _ = evaluate(student, held_out, dense_ref)
        retention = m["next_token_acc"] / dense_m["next_token_acc"]
        log(f"  after stage B: top1 {m['top1_agreement']:.4f}, acc {m['next_token_acc']:.4f}, retention "
            f"{retention:.4f}, ppl {m['ppl']:.3f} (dense {dense_m['ppl']:.3f}), KL {m['kl_to_dense']:.4f} "
            f"({time.time() - t0:.0f} s for this configuration)")
        router = "init" if init_layers is not None else "par_trained" if args.stage_a_steps > 0 else "random_init"
        if not train_bias:
            router += "_nobias"
        partition = "init_file" if init_layers is not None else args.partition
        label = f"N{n}K{k}-{partition}-{router}-finetune"  # the fidelity report's label scheme
        if args.save:
            path, check_path = save_paths(args.save, f"N{n}K{k}", len(configs) > 1)
            meta = {"source": "examples/03_finetune_recipe/finetune_recipe.py", "config": label,
                    "base_model": os.path.basename(args.model), "router_bias": args.router_bias,
                    "d_ff_dense": str(cfg["hidden"]), "steps": str(args.steps),
                    "heldout_next_token_acc": f"{m['next_token_acc']:.6f}", "heldout_acc_retention": f"{retention:.6f}",
                    "heldout_sequences": str(len(held_out))}
            if init_layers is not None:
                meta.update({"init": os.path.basename(args.init), "init_heldout_next_token_acc":
                             f"{before['next_token_acc']:.6f}", "init_heldout_acc_retention": f"{init_retention:.6f}"})
            save_factorized(path, student, k, args.mode, args.save_dtype, meta)
            if args.mode == "softmax_topk_renorm":
                save_check(check_path, student, held_out[0], k, args.save_dtype, {"model": os.path.basename(path)}, log)
            log(f"  saved {path}" + (f" (check data {check_path})" if args.mode == "softmax_topk_renorm" else ""))
        rows.append([label, n, k, 0, partition, router, "finetune", f"{flops:.6f}",
                     f"{m['top1_agreement']:.6f}", f"{m['next_token_acc']:.6f}", f"{retention:.6f}", f"{m['ppl']:.6f}",
                     f"{dense_m['ppl']:.6f}", f"{m['kl_to_dense']:.6f}"])

    print("\n" + ",".join(CSV_COLUMNS))
    for r in rows:
        print(",".join(str(v) for v in r))
    if args.csv:
        exists = os.path.exists(args.csv) and os.path.getsize(args.csv) > 0
        if args.append and exists:
            with open(args.csv, newline="") as f:
                header = next(csv.reader(f), None)
            if header != CSV_COLUMNS:
                raise SystemExit(f"{args.csv} has columns {header}, expected {CSV_COLUMNS}")
        with open(args.csv, "a" if args.append else "w", newline="") as f:
            wr = csv.writer(f)
            if not (args.append and exists):
                wr.writerow(CSV_COLUMNS)
            wr.writerows(rows)
        log(f"wrote {len(rows)} rows to {args.csv}")
    log(f"total {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
