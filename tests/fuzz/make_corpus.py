#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Writes the seed corpora of the libFuzzer targets (python3 standard library only; deterministic).

Usage: python3 tests/fuzz/make_corpus.py OUT_DIR [--shared PATH]

Creates OUT_DIR/<target>/ for fuzz_llama2c_checkpoint, fuzz_llama2c_tokenizer, fuzz_gguf, fuzz_gguf_model, fuzz_api, fuzz_safetensors
and fuzz_hf_config, each holding
small valid inputs and broken variants of them (truncated, trailing bytes, bad header fields; for GGUF, tensors of
every type the reader accepts, Q8_0 and Q4_0 blocks included). The real model files
(stories260K.bin, tok512.bin) are copied from the shared folder when present (default: ../shared next to the
repository); nothing here is committed, everything is regenerated.
"""

import argparse
import json
import os
import random
import shutil
import struct
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---------------------------------------------------------------------------------------------- llama2.c ----

def payload_floats(dim, hidden, layers, heads, kv_heads, vocab, seq_len):
    """Floats after the header in llama2.c's legacy layout (vocab < 0: an unshared classifier follows)."""
    head = dim // heads
    kv = head * kv_heads
    v = abs(vocab)
    n = v * dim + layers * (dim + dim * dim + 2 * kv * dim + dim * dim + dim + 3 * hidden * dim) + dim + seq_len * head
    if vocab < 0:
        n += v * dim
    return n


def checkpoint(header, n_floats=None, rng=None):
    if n_floats is None:
        n_floats = payload_floats(*header)
    rng = rng or random.Random(1)
    data = struct.pack("<7i", *header)
    data += struct.pack("<%df" % n_floats, *[rng.uniform(-1, 1) for _ in range(n_floats)])
    return data


def tokenizer(pieces, max_len=None):
    """pieces: list of (score, bytes)."""
    if max_len is None:
        max_len = max([1] + [len(p) for _, p in pieces])
    out = struct.pack("<i", max_len)
    for score, text in pieces:
        out += struct.pack("<fi", score, len(text)) + text
    return out


def llama_vocab():
    pieces = [(0.0, b"<unk>"), (0.0, b"\n<s>\n"), (0.0, b"\n</s>\n")]
    pieces += [(0.0, ("<0x%02X>" % b).encode()) for b in range(256)]
    merges = [" t", " a", "th", "he", "in", "er", "an", " the", "re", "on", " s", "ed", "nd", "ing", "Once", " upon"]
    pieces += [(-float(i), m.encode()) for i, m in enumerate(merges)]
    pieces += [(-1e6, bytes([c])) for c in range(32, 127)]
    return pieces


def write(directory, name, data):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, name), "wb") as f:
        f.write(data)


def checkpoint_corpus(out, shared):
    d = os.path.join(out, "fuzz_llama2c_checkpoint")
    configs = {
        "tiny": (8, 16, 1, 2, 2, 4, 2),
        "gqa": (16, 24, 2, 4, 2, 6, 3),       # n_kv_heads < n_heads
        "unshared": (8, 12, 1, 2, 1, -5, 2),  # negative vocab_size: wcls stored at the end
        "two_layers": (4, 8, 2, 1, 1, 3, 1),
    }
    for name, header in configs.items():
        good = checkpoint(header)
        write(d, name + ".bin", good)
        write(d, name + "_header_only.bin", good[:28])
        write(d, name + "_truncated_half.bin", good[: 28 + (len(good) - 28) // 2])
        write(d, name + "_minus_one.bin", good[:-1])
        write(d, name + "_trailing.bin", good + b"\0")
    bad_fields = {
        "zero_dim": (0, 16, 1, 2, 2, 4, 2),
        "negative_layers": (8, 16, -1, 2, 2, 4, 2),
        "vocab_int_min": (8, 16, 1, 2, 2, -2**31, 2),
        "heads_not_dividing": (8, 16, 1, 3, 1, 4, 2),
        "odd_head": (6, 16, 1, 2, 2, 4, 2),
        "overflow": (2**30, 2**30, 2**30, 2, 2, 2**30, 2**30),
        "huge_claim": (2**20, 2**20, 1, 2, 2, 2**20, 1),
    }
    for name, header in bad_fields.items():
        write(d, name + ".bin", struct.pack("<7i", *header) + b"\0" * 64)
    write(d, "short_header.bin", b"\x08\0\0\0\x10\0\0")
    write(d, "empty.bin", b"")
    model = os.path.join(shared, "models", "stories260K.bin")
    if os.path.isfile(model):
        shutil.copyfile(model, os.path.join(d, "stories260K.bin"))


def tokenizer_seed(flags, vocab_size, text, file_bytes):
    """fuzz_llama2c_tokenizer mode A: flags (bit 0 clear), int16 vocab_size, text length, text, tokenizer file."""
    text = text[:255]
    return bytes([flags & ~1]) + struct.pack("<h", vocab_size) + bytes([len(text)]) + text + file_bytes


def tokenizer_corpus(out, shared):
    d = os.path.join(out, "fuzz_llama2c_tokenizer")
    vocab = llama_vocab()
    good = tokenizer(vocab)
    n = len(vocab)
    text = "Once upon a time, the cat sat on the mat.".encode()
    write(d, "a_llama_vocab.bin", tokenizer_seed(2, n, text, good))
    write(d, "a_llama_vocab_eos.bin", tokenizer_seed(6, n, "th\u00e9 \U0001F600".encode(), good))
    write(d, "a_truncated.bin", tokenizer_seed(2, n, text, good[:-3]))
    write(d, "a_trailing.bin", tokenizer_seed(2, n - 1, text, good))
    write(d, "a_vocab_too_big.bin", tokenizer_seed(2, n + 1, text, good))
    write(d, "a_negative_vocab.bin", tokenizer_seed(0, -3, text, good))
    small = tokenizer([(0.0, b"<unk>"), (0.0, b"\n<s>\n"), (0.0, b"\n</s>\n"), (1.0, b"a"), (2.0, b"ab")])
    write(d, "a_no_byte_fallback.bin", tokenizer_seed(2, 5, b"ab ba", small))
    write(d, "a_max_len_zero.bin", tokenizer_seed(2, 5, b"", tokenizer([(0.0, b"")] * 5, max_len=0)))
    write(d, "a_length_past_end.bin", tokenizer_seed(2, 2, b"x", struct.pack("<ifi", 8, 0.0, 1 << 30)))
    nan = struct.pack("<i", 4) + b"\0\0\xc0\x7f" + struct.pack("<i", 1) + b"a"  # NaN score
    write(d, "a_nan_score.bin", tokenizer_seed(2, 1, b"a", nan))
    tok = os.path.join(shared, "models", "tok512.bin")
    if os.path.isfile(tok):
        with open(tok, "rb") as f:
            real = f.read()
        write(d, "a_tok512.bin", tokenizer_seed(2, 512, text, real))
        write(d, "a_tok512_truncated.bin", tokenizer_seed(2, 512, text, real[: len(real) // 2]))
    # Mode B: text for the fixed vocab (bit 0 set; bit 1 BOS, bit 2 EOS).
    texts = [b"", b"Once upon a time, there was a little girl.", "caf\u00e9 \u65e5\u672c \u2014 \U0001F600".encode(),
             b"\xff\xfe invalid \xc3( utf-8 \xf0\x9f", b"a\0b\0c", b"the the the the the", b"\n\n  \t  "]
    for i, t in enumerate(texts):
        write(d, "b_text_%d.bin" % i, bytes([1 | (2 if i % 2 == 0 else 0) | (4 if i % 3 == 0 else 0)]) + t)


# -------------------------------------------------------------------------------------------------- GGUF ----

# ggml type id -> (weights per block, bytes per block): F32, F16, Q4_0, Q8_0, I8, I16, I32, I64, F64, BF16.
GGML_TYPES = {0: (1, 4), 1: (1, 2), 2: (32, 18), 8: (32, 34), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8),
              28: (1, 8), 30: (1, 2)}


def gguf_string(text):
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def gguf_block(type_id, rng):
    """One block of random contents: Q8_0 = f16 scale + 32 int8, Q4_0 = f16 scale + 16 bytes of nibbles."""
    scale = struct.pack("<e", rng.uniform(-2, 2))
    return scale + bytes(rng.getrandbits(8) for _ in range(32 if type_id == 8 else 16))


def gguf_file(tensors, kvs=(), alignment=32, rng=None):
    """A GGUF v3 file. tensors: list of (name, ne (fastest first), ggml type id); kvs: list of (key, u32 value).
    Data is random, aligned as the writer lays it out."""
    rng = rng or random.Random(7)
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs) + 1)
    out += gguf_string("general.alignment") + struct.pack("<II", 4, alignment)
    for key, value in kvs:
        if isinstance(value, str):
            out += gguf_string(key) + struct.pack("<I", 8) + gguf_string(value)
        elif isinstance(value, float):
            out += gguf_string(key) + struct.pack("<If", 6, value)
        else:
            out += gguf_string(key) + struct.pack("<II", 4, value)
    blobs, offset = [], 0
    for name, ne, type_id in tensors:
        per_block, block_bytes = GGML_TYPES[type_id]
        numel = 1
        for e in ne:
            numel *= e
        if per_block > 1:
            blob = b"".join(gguf_block(type_id, rng) for _ in range(numel // per_block))
        else:
            blob = bytes(rng.getrandbits(8) for _ in range(numel * block_bytes))
        out += gguf_string(name) + struct.pack("<I", len(ne)) + struct.pack("<%dQ" % len(ne), *ne)
        out += struct.pack("<IQ", type_id, offset)
        blobs.append(blob)
        offset += (len(blob) + alignment - 1) // alignment * alignment
    out += b"\0" * (-len(out) % alignment)
    for blob in blobs:
        out += blob + b"\0" * (-len(blob) % alignment)
    return out


def gguf_corpus(out):
    d = os.path.join(out, "fuzz_gguf")
    every_type = [("t%d" % t, [32, 2], t) for t in sorted(GGML_TYPES)]
    files = {
        "every_type": gguf_file(every_type, [("llama.block_count", 1)]),
        "q8_0": gguf_file([("blk.0.ffn_gate_exps.weight", [64, 32, 2], 8), ("blk.0.ffn_down_exps.weight", [32, 64, 2], 8)]),
        "q4_0": gguf_file([("blk.0.ffn_up_exps.weight", [64, 32, 2], 2), ("norm", [64], 0)]),
        "q8_0_align64": gguf_file([("a", [96], 8), ("b", [32, 3], 2)], alignment=64),
    }
    for name, good in files.items():
        write(d, name + ".gguf", good)
        write(d, name + "_truncated.gguf", good[:-7])
        write(d, name + "_trailing.gguf", good + b"\0" * 5)
    # Broken block tensors: ne[0] not a multiple of 32, data a block short, a row count far beyond the data.
    write(d, "q8_0_ne0_33.gguf", gguf_file([("a", [32, 2], 8)]).replace(struct.pack("<2Q", 32, 2), struct.pack("<2Q", 33, 2), 1))
    write(d, "q4_0_short.gguf", gguf_file([("a", [64, 2], 2)])[:-30])
    write(d, "q8_0_huge.gguf", gguf_file([("a", [32, 1], 8)]).replace(struct.pack("<2Q", 32, 1), struct.pack("<2Q", 32, 1 << 52), 1))
    write(d, "empty.gguf", b"")
    write(d, "magic_only.gguf", b"GGUF")


def gguf_model_corpus(out):
    """Tiny llama-architecture models (d_model 8, 2 heads, 1 kv head, 1 layer, vocab 4), dense and 1-of-2 MoE, with
    F32 or F16 weights; and the same files cut short."""
    d = os.path.join(out, "fuzz_gguf_model")
    keys = [("general.architecture", "llama"), ("llama.embedding_length", 8), ("llama.block_count", 1),
            ("llama.attention.head_count", 2), ("llama.attention.head_count_kv", 1), ("llama.context_length", 8),
            ("llama.attention.layer_norm_rms_epsilon", 1e-5), ("llama.rope.freq_base", 10000.0)]
    common = [("token_embd.weight", [8, 4]), ("blk.0.attn_norm.weight", [8]), ("blk.0.attn_q.weight", [8, 8]),
              ("blk.0.attn_k.weight", [8, 4]), ("blk.0.attn_v.weight", [8, 4]), ("blk.0.attn_output.weight", [8, 8]),
              ("blk.0.ffn_norm.weight", [8]), ("output_norm.weight", [8])]
    dense = [("blk.0.ffn_gate.weight", [8, 16]), ("blk.0.ffn_up.weight", [8, 16]), ("blk.0.ffn_down.weight", [16, 8])]
    moe = [("blk.0.ffn_gate_inp.weight", [8, 2]), ("blk.0.ffn_gate_exps.weight", [8, 8, 2]),
           ("blk.0.ffn_up_exps.weight", [8, 8, 2]), ("blk.0.ffn_down_exps.weight", [8, 8, 2])]
    for type_id, tname in ((0, "f32"), (1, "f16")):
        norms = lambda n: 0 if "norm" in n else type_id  # noqa: E731
        dense_file = gguf_file([(n, ne, norms(n)) for n, ne in common + dense], keys + [("llama.feed_forward_length", 16)])
        moe_file = gguf_file([(n, ne, norms(n)) for n, ne in common + moe],
                             keys + [("llama.feed_forward_length", 8), ("llama.expert_count", 2), ("llama.expert_used_count", 1)])
        for name, good in (("dense_" + tname, dense_file), ("moe_" + tname, moe_file)):
            write(d, name + ".gguf", good)
            write(d, name + "_truncated.gguf", good[:-9])


def api_corpus(out):
    """fuzz_api reads its choices through FuzzedDataProvider: integers come from the END of the input (the last 4
    bytes seed the data generator, the byte before picks the operation), bytes from the front. One seed per
    operation and a few random ones."""
    d = os.path.join(out, "fuzz_api")
    rng = random.Random(2024)
    for op in range(16):
        for variant in range(3):
            body = bytes(rng.getrandbits(8) for _ in range(rng.choice([16, 64, 256])))
            write(d, "op%02d_%d.bin" % (op, variant), body + bytes([op]) + struct.pack("<I", rng.getrandbits(32)))
    for i in range(8):
        write(d, "random_%d.bin" % i, bytes(rng.getrandbits(8) for _ in range(rng.choice([8, 100, 1000]))))


# ------------------------------------------------------------------------------------------- safetensors ----

def safetensors_file(tensors, metadata=None, pad=True):
    """tensors: list of (name, dtype, shape, data bytes); offsets assigned in order, header padded to 8 bytes."""
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    at = 0
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + len(data)]}
        at += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        text += b" " * ((8 - (8 + len(text)) % 8) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(t[3] for t in tensors)


def safetensors_corpus(out):
    d = os.path.join(out, "fuzz_safetensors")
    rng = random.Random(7)
    sizes = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4,
             "I64": 8, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
    every = [("t_" + dt.lower(), dt, [2, 3], bytes(rng.getrandbits(8) for _ in range(6 * n)))
             for dt, n in sizes.items()]
    good = safetensors_file(every, {"format": "pt"})
    write(d, "every_dtype.st", good)
    write(d, "truncated.st", good[:-5])
    write(d, "trailing.st", good + b"\0")
    write(d, "empty_header.st", safetensors_file([]))
    write(d, "scalar_and_empty.st", safetensors_file([("s", "F32", [], b"\0\0\x80\x3f"), ("e", "F16", [0, 4], b"")]))
    write(d, "u64_max.st", safetensors_file([("u", "U64", [1], b"\xff" * 8)]))
    write(d, "hf_names.st", safetensors_file([("model.layers.0.self_attn.q_proj.weight", "BF16", [4, 4], b"\x80\x3f" * 16),
                                              ("model.norm.weight", "F32", [4], struct.pack("<4f", 1, 2, 3, 4))]))
    h = b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'
    write(d, "overlap.st", struct.pack("<Q", len(h)) + h + b"\0" * 8)
    h = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'
    write(d, "repeated_key.st", struct.pack("<Q", len(h)) + h + b"\0" * 8)
    h = b'{"a":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,4]}}'
    write(d, "shape_overflow.st", struct.pack("<Q", len(h)) + h + b"\0" * 4)
    write(d, "deep.st", struct.pack("<Q", 64) + b"[" * 64)
    write(d, "huge_length.st", struct.pack("<Q", 2**63) + b"{}")
    write(d, "short.st", b"\x02\0\0")


# ----------------------------------------------------------------------------------- Hugging Face config ----

def hf_config_corpus(out):
    d = os.path.join(out, "fuzz_hf_config")
    base = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "hidden_act": "silu", "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "rope_scaling": None, "vocab_size": 50, "tie_word_embeddings": True, "torch_dtype": "float32",
            "attention_bias": False, "bos_token_id": 1, "eos_token_id": 2}
    variants = {
        "llama": {},
        "mistral": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": None},
        "qwen2": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": False},
        "defaults": {"num_key_value_heads": None, "head_dim": None, "rope_theta": None, "rms_norm_eps": None},
        "rope_scaling": {"rope_scaling": {"type": "llama3", "factor": 8.0}},
        "odd_head_dim": {"head_dim": 15},
        "gelu": {"hidden_act": "gelu"},
        "gqa_bad": {"num_key_value_heads": 3},
        "negative": {"hidden_size": -64},
        "huge": {"hidden_size": 2**62, "vocab_size": 2**63 - 1},
        "float_size": {"hidden_size": 64.0},
        "string_size": {"hidden_size": "64"},
        "zero_heads": {"num_attention_heads": 0},
        "unknown_arch": {"architectures": ["GPT2LMHeadModel"]},
        "no_arch": {"architectures": []},
        "nan_theta": {"rope_theta": "NaN"},
        "tiny_eps": {"rms_norm_eps": 0},
        "attention_bias": {"attention_bias": True},
        "mlp_bias": {"mlp_bias": True},
    }
    for name, change in variants.items():
        cfg = dict(base)
        cfg.update(change)
        write(d, name + ".json", json.dumps(cfg, indent=2).encode())
    write(d, "truncated.json", json.dumps(base).encode()[:70])
    write(d, "not_object.json", b"[1, 2, 3]")
    write(d, "deep.json", b"[" * 200 + b"]" * 200)
    write(d, "bad_utf8.json", b'{"architectures": ["Llama\xff"]}')
    write(d, "empty.json", b"")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--shared", default=os.path.join(os.path.dirname(REPO), "shared"),
                        help="the shared folder holding models/ (default: ../shared next to the repository)")
    args = parser.parse_args()
    checkpoint_corpus(args.out_dir, args.shared)
    tokenizer_corpus(args.out_dir, args.shared)
    gguf_corpus(args.out_dir)
    api_corpus(args.out_dir)
    gguf_model_corpus(args.out_dir)
    safetensors_corpus(args.out_dir)
    hf_config_corpus(args.out_dir)
    for target in sorted(os.listdir(args.out_dir)):
        path = os.path.join(args.out_dir, target)
        if os.path.isdir(path):
            print("%s: %d seeds" % (target, len(os.listdir(path))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
