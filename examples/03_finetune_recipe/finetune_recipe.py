# SPDX-License-Identifier: Apache-2.0
"""FactorLLM's two-stage recipe end to end on stories260K, on factorllm's kernels (the PyTorch ops of
examples/torch_ops): factorize every FFN into K-of-N experts, stage A trains the routers with the PAR loss
(+ balance term) on the dense teacher's FFN inputs, stage B fine-tunes experts and routers by logit
distillation (KL to the dense teacher's next-token distribution) on sequences sampled from the dense model, then
measures on held-out sequences with the fidelity report's definitions and writes its CSV rows
(recovery = finetune).

Usage (Debian's python with torch; 2 threads):
    /usr/bin/python3 examples/03_finetune_recipe/finetune_recipe.py [--configs 4:2 4:1 8:2] [--csv PATH]
        [--append] [--steps 2000] [--batch 16] [--partition contiguous] [--quick]

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
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(REPO, "examples", "torch_ops"))
import factorllm_torch as fllm  # noqa: E402

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
    return student


def stage_a(teacher, student, seqs, k, steps, lr, batch_tokens, balance_ratio, log):
    """Routers by PAR (+ balance) on the dense teacher's FFN inputs (docs/math.md §3.2): per layer, Adam on
    L_PA + balance_ratio * L_bal (the paper's weights 0.05 and 0.01 give balance_ratio 0.2)."""
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
        rb = moe.router_bias.detach().clone().requires_grad_()
        opt = torch.optim.Adam([rw, rb], lr=lr)
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


def stage_b(student, pool, teacher_lp, steps, batch, lr, router_lr, log, log_every=200):
    """Experts + routers by logit distillation: mean over positions of KL(teacher || student), Adam with 20 warmup
    steps then cosine decay to 0."""
    expert_params, router_params = [], []
    for moe in student.ffns:
        expert_params += [moe.gate, moe.up, moe.down]
        router_params += [moe.router_weight, moe.router_bias]
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.path.join(REPO, "..", "shared", "models", "stories260K.bin"))
    ap.add_argument("--tokenizer", default=os.path.join(REPO, "..", "shared", "models", "tok512.bin"))
    ap.add_argument("--configs", nargs="+", default=["4:2"], help="N:K pairs (default 4:2, the 50 %% budget)")
    ap.add_argument("--mode", default="softmax_topk_renorm", choices=fllm.MODES)
    ap.add_argument("--partition", default="contiguous", choices=("contiguous", "random", "cluster_activations"))
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
    args = ap.parse_args()
    configs = []  # checked before any long computation
    for spec in args.configs:
        try:
            n, k = (int(v) for v in spec.split(":"))
        except ValueError:
            ap.error(f"--configs: '{spec}' is not N:K (e.g. 4:2)")
        if not 1 <= k <= n:
            ap.error(f"--configs: '{spec}' needs 1 <= K <= N")
        configs.append((n, k))
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
    for n, k in configs:
        t0 = time.time()
        calib = None
        if args.partition == "cluster_activations":  # co-activation statistics from the stage-A sequences
            with torch.no_grad():
                xs = []
                teacher(train_pool[:args.stage_a_seqs, :-1], ffn_inputs=xs)
            calib = [x.reshape(-1, x.shape[-1]) for x in xs]
        student = build_student(cfg, w, n, k, args.mode, args.seed, args.partition, calib)
        d_ff_used = student.ffns[0].gate.shape[0] * student.ffns[0].gate.shape[1]
        flops = k * (d_ff_used // n) / cfg["hidden"]
        before, _ = evaluate(student, held_out, dense_ref)
        log(f"\nN={n} K={k} ({args.mode}, FFN FLOPs {flops:.3f}): factorized, random routers: retention "
            f"{before['next_token_acc'] / dense_m['next_token_acc']:.3f}")
        if args.stage_a_steps > 0:
            stage_a(teacher, student, train_pool[:args.stage_a_seqs], k, args.stage_a_steps, args.stage_a_lr, 512, 0.2,
                    log)
        after_a, _ = evaluate(student, held_out, dense_ref)
        log(f"  after stage A: top1 {after_a['top1_agreement']:.3f}, retention "
            f"{after_a['next_token_acc'] / dense_m['next_token_acc']:.3f} ({time.time() - t0:.0f} s)")
        stage_b(student, train_pool, teacher_lp, args.steps, args.batch, args.lr, args.router_lr, log)
        m, _ = evaluate(student, held_out, dense_ref)
        retention = m["next_token_acc"] / dense_m["next_token_acc"]
        log(f"  after stage B: top1 {m['top1_agreement']:.4f}, acc {m['next_token_acc']:.4f}, retention "
            f"{retention:.4f}, ppl {m['ppl']:.3f} (dense {dense_m['ppl']:.3f}), KL {m['kl_to_dense']:.4f} "
            f"({time.time() - t0:.0f} s for this configuration)")
        router = "par_trained" if args.stage_a_steps > 0 else "random_init"
        label = f"N{n}K{k}-{args.partition}-{router}-finetune"  # the fidelity report's label scheme
        rows.append([label, n, k, 0, args.partition, router, "finetune", f"{flops:.6f}",
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
