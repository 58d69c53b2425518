// SPDX-License-Identifier: Apache-2.0
// Loads factorllm's GGUF exports in llama.cpp (through node-llama-cpp) and in an independent GGUF parser
// (@huggingface/gguf), and compares llama.cpp's outputs with factorllm's engine (reference.json, written by
// examples/04_export). Exit status 0 when every check passes, 1 otherwise.
//
// Usage: node check.mjs EXPORT_DIR      (run from a folder whose node_modules holds the packages of package.json;
//                                        tests/llama_cpp/run_check.sh sets that up)
//
// Checks, per exported model (dense and MoE, F32 and F16 weights):
//  1. @huggingface/gguf parses the file: GGUF v3, the llama hyper-parameters, the sentencepiece vocabulary, the MoE
//     keys (expert_count, expert_used_count, PER-EXPERT feed_forward_length) and every tensor with its ggml shape
//     and type.
//  2. llama.cpp greedy generation from BOS gives exactly our engine's tokens (all greedy_steps of them, >= 64). The
//     one exception is a near-tie: where the paths part after at least 32 equal steps and llama.cpp's own
//     probabilities for its token and ours differ by at most 2 x the tolerance below (each engine may move each
//     probability by the tolerance, so such a tie can flip; with F16 weights ggml rounds activations to F16 and
//     its SIMD kernels differ between AVX2 and AVX-512 machines).
//  3. llama.cpp's next-token probabilities on a teacher-forced sequence agree with ours: max |p_llama - p_ours|
//     over every position and every token <= the tolerance below.
//  4. llama.cpp's detokenizer prints our text for the greedy tokens, and its tokenizer encodes a probe text (spaces,
//     punctuation, digits, newline, UTF-8 byte fallback) to our tokens: the vocabulary conversion is faithful.
//
// Tolerances (written down once, here):
//  - F32 weights: 1e-4 absolute. Both engines compute in float32 with different summation orders (ggml's SIMD
//    dot products vs Eigen); measured differences are a few 1e-6.
//  - F16 weights: 5e-3 absolute. Our reference runs on the same F16-rounded weights, but ggml's CPU F16 matmul
//    also rounds the activations to F16 (2^-11 relative) before the dot products.
// The KV cache is F32 (node-llama-cpp's experimentalKvCacheKeyType/ValueType) and flash attention is off, so that
// llama.cpp adds no F16 rounding of its own; its defaults (F16 cache, flash attention) are run too and reported only.

import fs from "node:fs";
import path from "node:path";
import {getLlama, LlamaLogLevel} from "node-llama-cpp";
import {gguf} from "@huggingface/gguf";

const kTolerance = {F32: 1e-4, F16: 5e-3};
const kGgmlType = {F32: 0, F16: 1};
const kMinGreedySteps = 64;
const kMinGreedyAgreeAtTie = 32;

const exportDir = process.argv[2];
if (!exportDir) {
  console.error("usage: node check.mjs EXPORT_DIR");
  process.exit(2);
}
const ref = JSON.parse(fs.readFileSync(path.join(exportDir, "reference.json"), "utf8"));
const failures = [];
const fail = (what) => {
  failures.push(what);
  console.log(`  FAIL: ${what}`);
};
const expectEq = (what, got, want) => {
  const g = typeof got === "bigint" ? Number(got) : got;
  if (JSON.stringify(g) !== JSON.stringify(want)) fail(`${what}: got ${JSON.stringify(g)}, expected ${JSON.stringify(want)}`);
};

// ---- 1. Independent parser: @huggingface/gguf ----
async function checkWithHfParser(model) {
  const file = path.join(exportDir, model.file);
  const {metadata: md, tensorInfos} = await gguf(file, {allowLocalFile: true});
  const nLayers = Number(md["llama.block_count"]);
  const dim = Number(md["llama.embedding_length"]);
  expectEq(`${model.name}: version`, md.version, 3);
  expectEq(`${model.name}: general.architecture`, md["general.architecture"], "llama");
  expectEq(`${model.name}: general.alignment`, md["general.alignment"], 32);
  expectEq(`${model.name}: tokenizer.ggml.model`, md["tokenizer.ggml.model"], "llama");
  expectEq(`${model.name}: token count`, md["tokenizer.ggml.tokens"].length, ref.vocab_size);
  expectEq(`${model.name}: scores count`, md["tokenizer.ggml.scores"].length, ref.vocab_size);
  expectEq(`${model.name}: special tokens`,
           [md["tokenizer.ggml.tokens"][0], md["tokenizer.ggml.tokens"][1], md["tokenizer.ggml.tokens"][2]],
           ["<unk>", "<s>", "</s>"]);
  expectEq(`${model.name}: token types of 0..3 and <0x0A>`,
           [0, 1, 2, 3, 13].map((i) => md["tokenizer.ggml.token_type"][i]), [2, 3, 3, 6, 6]);
  expectEq(`${model.name}: bos/eos ids`, [md["tokenizer.ggml.bos_token_id"], md["tokenizer.ggml.eos_token_id"]],
           [ref.bos, ref.eos]);
  const type = kGgmlType[model.weight_type];
  const want = new Map();  // name -> [ggml shape (ne), ggml type]
  want.set("token_embd.weight", [[dim, ref.vocab_size], type]);
  want.set("output_norm.weight", [[dim], 0]);
  const dFf = Number(md["llama.feed_forward_length"]);
  const kvDim = dim / Number(md["llama.attention.head_count"]) * Number(md["llama.attention.head_count_kv"]);
  if (model.moe) {
    expectEq(`${model.name}: llama.expert_count`, md["llama.expert_count"], ref.moe.n_experts);
    expectEq(`${model.name}: llama.expert_used_count`, md["llama.expert_used_count"], ref.moe.top_k);
    expectEq(`${model.name}: llama.feed_forward_length (per expert)`, dFf, ref.moe.d_expert);
  } else if (md["llama.expert_count"] !== undefined) {
    fail(`${model.name}: a dense model declares llama.expert_count`);
  }
  const n = ref.moe.n_experts;
  for (let l = 0; l < nLayers; ++l) {
    const p = `blk.${l}.`;
    want.set(p + "attn_norm.weight", [[dim], 0]);
    want.set(p + "ffn_norm.weight", [[dim], 0]);
    want.set(p + "attn_q.weight", [[dim, dim], type]);
    want.set(p + "attn_k.weight", [[dim, kvDim], type]);
    want.set(p + "attn_v.weight", [[dim, kvDim], type]);
    want.set(p + "attn_output.weight", [[dim, dim], type]);
    if (model.moe) {
      want.set(p + "ffn_gate_inp.weight", [[dim, n], 0]);
      want.set(p + "ffn_gate_exps.weight", [[dim, dFf, n], type]);
      want.set(p + "ffn_up_exps.weight", [[dim, dFf, n], type]);
      want.set(p + "ffn_down_exps.weight", [[dFf, dim, n], type]);
    } else {
      want.set(p + "ffn_gate.weight", [[dim, dFf], type]);
      want.set(p + "ffn_up.weight", [[dim, dFf], type]);
      want.set(p + "ffn_down.weight", [[dFf, dim], type]);
    }
  }
  expectEq(`${model.name}: tensor count`, tensorInfos.length, want.size);
  for (const t of tensorInfos) {
    const w = want.get(t.name);
    if (!w) {
      fail(`${model.name}: unexpected tensor ${t.name}`);
      continue;
    }
    expectEq(`${model.name}: ${t.name} shape`, t.shape.map(Number), w[0]);
    expectEq(`${model.name}: ${t.name} type`, t.dtype, w[1]);
  }
  return {tensors: tensorInfos.length, keys: Object.keys(md).length};
}

// ---- 2./3. llama.cpp ----
function softmax(logitsMap, vocab) {
  const z = new Float64Array(vocab).fill(-Infinity);
  for (const [token, logit] of logitsMap) z[token] = logit;
  let mx = -Infinity;
  for (const v of z) mx = Math.max(mx, v);
  let sum = 0;
  const p = new Float64Array(vocab);
  for (let i = 0; i < vocab; ++i) sum += (p[i] = Math.exp(z[i] - mx));
  for (let i = 0; i < vocab; ++i) p[i] /= sum;
  return p;
}

/// Runs one model in llama.cpp: greedy generation from BOS with llama.cpp's own sampler (temperature 0 = argmax),
/// then the teacher-forced sequence in one batch with raw logits at every position.
/// `exact` selects the configuration the tolerances are written for: F32 KV cache and no flash attention (llama.cpp's
/// CPU flash-attention path rounds to F16 internally, measured at ~2e-3 in probability on its own). Otherwise
/// llama.cpp's defaults (F16 KV cache, flash attention "auto") are used and only reported.
async function runLlamaCpp(llama, model, exact) {
  const lm = await llama.loadModel({modelPath: path.join(exportDir, model.file)});
  const context = await lm.createContext({
    contextSize: 512, batchSize: 512, sequences: 1, threads: 1,
    ...(exact ? {flashAttention: false, experimentalKvCacheKeyType: "F32", experimentalKvCacheValueType: "F32"} : {}),
  });
  const seq = context.getSequence();
  const greedy = [];
  for await (const token of seq.evaluate([ref.bos], {temperature: 0, yieldEogToken: true})) {
    greedy.push(token);
    if (greedy.length >= ref.greedy_steps) break;
  }
  await seq.clearHistory();
  const outs = await seq.controlledEvaluate(ref.forced_tokens.map((t) => [t, {generateNext: {logits: true}}]));
  let maxDiff = 0, argmaxAgree = 0;
  for (let t = 0; t < ref.forced_tokens.length; ++t) {
    const p = softmax(outs[t].next.logits, ref.vocab_size);
    const q = model.forced_probs[t];
    let best = 0, bestRef = 0;
    for (let v = 0; v < ref.vocab_size; ++v) {
      maxDiff = Math.max(maxDiff, Math.abs(p[v] - q[v]));
      if (p[v] > p[best]) best = v;
      if (q[v] > q[bestRef]) bestRef = v;
    }
    argmaxAgree += best === bestRef;
  }
  let agree = 0;
  while (agree < greedy.length && greedy[agree] === model.greedy_tokens[agree]) ++agree;
  // Where the greedy paths part, llama.cpp's probability gap between its token and ours on the shared prefix: a gap
  // within what the weight type's rounding may move two probabilities (2 x tolerance) is a near-tie, not a bug.
  let gap = null;
  if (agree < greedy.length && agree < model.greedy_tokens.length) {
    await seq.clearHistory();
    const prefix = [ref.bos, ...greedy.slice(0, agree)];
    const pre = await seq.controlledEvaluate(prefix.map((t) => [t, {generateNext: {logits: true}}]));
    const p = softmax(pre[prefix.length - 1].next.logits, ref.vocab_size);
    gap = p[greedy[agree]] - p[model.greedy_tokens[agree]];
  }
  await context.dispose();
  // llama.cpp's own tokenizer and detokenizer on the exported vocabulary: its text for its greedy tokens, and for ours.
  const text = lm.detokenize(greedy);
  const oursText = lm.detokenize(model.greedy_tokens);
  const probeTokens = Array.from(lm.tokenize(ref.tokenizer_probe.text));
  await lm.dispose();
  return {greedy, agree, gap, maxDiff, argmaxAgree: argmaxAgree / ref.forced_tokens.length, text, oursText, probeTokens};
}

// One thread: the model is tiny, and ggml's worker threads spin while they wait for each other, which on a loaded
// CI machine made a 128-token run take a minute instead of a fraction of a second.
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error, maxThreads: 1});
console.log(`llama.cpp through node-llama-cpp (${llama.buildType} CPU build, 1 thread); ` +
            `reference: ${ref.source_model}, ${ref.greedy_steps} greedy steps, ` +
            `${ref.forced_tokens.length} teacher-forced tokens`);
if (ref.greedy_steps < kMinGreedySteps) fail(`reference has ${ref.greedy_steps} greedy steps, fewer than ${kMinGreedySteps}`);
const summary = [];
for (const model of ref.models) {
  console.log(`\n== ${model.name} (${model.file}, ${model.weight_type} weights${model.moe ?
    `, MoE ${ref.moe.top_k} of ${ref.moe.n_experts}, ${ref.moe.combine_mode}` : ", dense"})`);
  const hf = await checkWithHfParser(model);
  console.log(`  @huggingface/gguf: ${hf.keys} metadata entries, ${hf.tensors} tensors as expected`);
  const distinct = new Set(model.greedy_tokens).size;
  if (model.moe && distinct < 8) fail(`${model.name}: our greedy text has only ${distinct} distinct tokens (degenerate)`);
  const t0 = Date.now();
  const r = await runLlamaCpp(llama, model, true);
  const tol = kTolerance[model.weight_type];
  console.log(`  llama.cpp (F32 KV cache, no flash attention, ${Date.now() - t0} ms): greedy tokens equal for ${r.agree}/${r.greedy.length}; ` +
              `teacher-forced max |dp| = ${r.maxDiff.toExponential(2)} (tolerance ${tol}), ` +
              `argmax agreement ${(100 * r.argmaxAgree).toFixed(1)}%`);
  if (r.agree !== model.greedy_tokens.length || r.greedy.length !== model.greedy_tokens.length) {
    const where = `llama.cpp greedy diverges at step ${r.agree}: ` +
                  `llama.cpp ${r.greedy.slice(r.agree, r.agree + 5)} vs ours ${model.greedy_tokens.slice(r.agree, r.agree + 5)}`;
    if (r.gap !== null && r.gap <= 2 * tol && r.agree >= kMinGreedyAgreeAtTie)
      console.log(`  ${where}; accepted as a near-tie: llama.cpp's probability gap between the two tokens is ` +
                  `${r.gap.toExponential(2)} <= 2 x tolerance, after ${r.agree} equal steps`);
    else
      fail(`${model.name}: ${where}` + (r.gap === null ? "" : ` (llama.cpp's probability gap ${r.gap.toExponential(2)})`));
  }
  if (!(r.maxDiff <= tol)) fail(`${model.name}: max probability difference ${r.maxDiff} > ${tol}`);
  // Text: llama.cpp's detokenizer on its own greedy tokens must print what our decoder prints (up to the leading
  // space sentencepiece adds after BOS); its tokenizer must encode the probe text as ours does.
  console.log(`  llama.cpp text: ${JSON.stringify(r.text.slice(0, 160))}...`);
  if (r.oursText.trimStart() !== model.greedy_text.trimStart())
    fail(`${model.name}: llama.cpp's detokenizer prints our greedy tokens differently:\n    ${JSON.stringify(r.oursText)}\n    ${JSON.stringify(model.greedy_text)}`);
  if (r.agree === r.greedy.length && r.text.trimStart() !== model.greedy_text.trimStart())
    fail(`${model.name}: llama.cpp's detokenized text differs from ours:\n    ${JSON.stringify(r.text)}\n    ${JSON.stringify(model.greedy_text)}`);
  if (JSON.stringify(r.probeTokens) !== JSON.stringify(ref.tokenizer_probe.tokens))
    fail(`${model.name}: llama.cpp tokenizes the probe text as ${r.probeTokens}, ours as ${ref.tokenizer_probe.tokens}`);
  const r16 = await runLlamaCpp(llama, model, false);
  console.log(`  llama.cpp defaults (F16 KV cache, flash attention auto; informational): greedy equal for ${r16.agree}/${r16.greedy.length}, ` +
              `max |dp| = ${r16.maxDiff.toExponential(2)}`);
  summary.push({name: model.name, file: model.file, weight_type: model.weight_type, moe: model.moe,
                greedy_steps: r.greedy.length, greedy_equal: r.agree, max_prob_diff: r.maxDiff, tolerance: tol,
                argmax_agreement: r.argmaxAgree, f16_kv_greedy_equal: r16.agree, f16_kv_max_prob_diff: r16.maxDiff,
                greedy_text: model.greedy_text});
}
fs.writeFileSync(path.join(exportDir, "llama_cpp_check.json"), JSON.stringify({failures, models: summary}, null, 2));
console.log(failures.length === 0 ? "\nllama.cpp check: PASSED" : `\nllama.cpp check: FAILED (${failures.length})`);
process.exit(failures.length === 0 ? 0 : 1);
