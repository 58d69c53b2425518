/* SPDX-License-Identifier: Apache-2.0 */
/* Test of the C API (include/factorllm/c/factorllm.h), written in C11 and linked to factorllm::c.
 * The references are plain loops in double written here (not the C++ oracle): MoE forward, dense FFN, routing.
 * Usage: test_c_api <folder for temporary files>. Exit status 0 when every check passes. */
/* POSIX threads rather than C11 <threads.h>: ThreadSanitizer (clang 14) does not intercept thrd_create. */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "factorllm/c/factorllm.h"

enum { D_MODEL = 64, D_FF = 128, N_EXPERTS = 4, D_EXPERT = D_FF / N_EXPERTS, TOP_K = 2, N_TOKENS = 7 };
/* Row strides larger than the rows: every call must honour strides. */
enum { GATE_STRIDE = D_MODEL + 3, DOWN_STRIDE = D_FF + 1, X_STRIDE = D_MODEL + 5, Y_STRIDE = D_MODEL + 2 };

static int g_failures = 0;

#define CHECK(cond)                                                        \
  do {                                                                     \
    if (!(cond)) {                                                         \
      fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++g_failures;                                                        \
    }                                                                      \
  } while (0)

/* A call that must succeed; prints the library's message otherwise. */
#define CHECK_OK(call)                                                                                \
  do {                                                                                                \
    fllm_status const s_ = (call);                                                                    \
    if (s_ != FLLM_OK) {                                                                              \
      fprintf(stderr, "%s:%d: %s returned %s: %s\n", __FILE__, __LINE__, #call, fllm_status_name(s_), \
              fllm_last_error());                                                                     \
      ++g_failures;                                                                                   \
    }                                                                                                 \
  } while (0)

/* A call that must fail with `code` and a message containing `needle` (the argument's name). */
static void check_error(fllm_status got, fllm_status code, char const* needle, char const* what, int line) {
  if (got != code) {
    fprintf(stderr, "line %d: %s returned %s, expected %s (message: %s)\n", line, what, fllm_status_name(got),
            fllm_status_name(code), fllm_last_error());
    ++g_failures;
  } else if (strstr(fllm_last_error(), needle) == NULL) {
    fprintf(stderr, "line %d: %s: message '%s' does not name '%s'\n", line, what, fllm_last_error(), needle);
    ++g_failures;
  }
}
#define CHECK_ERROR(call, code, needle) check_error((call), (code), (needle), #call, __LINE__)

/* Deterministic uniform numbers in [-scale, scale) (64-bit LCG, top bits). */
static uint64_t g_state = 0x9e3779b97f4a7c15ull;
static float uniform(float scale) {
  g_state = g_state * 6364136223846793005ull + 1442695040888963407ull;
  return scale * (2.0f * (float)((g_state >> 40) & 0xffffff) / 16777216.0f - 1.0f);
}

/* float -> bf16 bits, round to nearest even (finite inputs). */
static uint16_t to_bf16(float v) {
  uint32_t u;
  memcpy(&u, &v, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}
static float from_bf16(uint16_t b) {
  uint32_t const u = (uint32_t)b << 16;
  float v;
  memcpy(&v, &u, 4);
  return v;
}

static double silu(double a) { return a / (1.0 + exp(-a)); }

/* The test's data: dense FFN, permutation, router, tokens. */
static float g_gate[D_FF * GATE_STRIDE], g_up[D_FF * GATE_STRIDE], g_down[D_MODEL * DOWN_STRIDE];
static float g_router_w[N_EXPERTS * D_MODEL], g_router_b[N_EXPERTS];
static float g_x[N_TOKENS * X_STRIDE];
static int32_t g_perm[D_FF];

static fllm_dense_ffn dense(void) {
  fllm_dense_ffn d;
  d.dtype = FLLM_F32;
  d.d_model = D_MODEL;
  d.d_ff = D_FF;
  d.gate = g_gate;
  d.gate_row_stride = GATE_STRIDE;
  d.up = g_up;
  d.up_row_stride = GATE_STRIDE;
  d.down = g_down;
  d.down_row_stride = DOWN_STRIDE;
  return d;
}

static void make_data(void) {
  int i, j;
  for (i = 0; i < D_FF * GATE_STRIDE; ++i) g_gate[i] = uniform(0.25f), g_up[i] = uniform(0.25f);
  for (i = 0; i < D_MODEL * DOWN_STRIDE; ++i) g_down[i] = uniform(0.25f);
  for (i = 0; i < N_EXPERTS * D_MODEL; ++i) g_router_w[i] = uniform(0.3f);
  for (i = 0; i < N_EXPERTS; ++i) g_router_b[i] = uniform(0.1f);
  for (i = 0; i < N_TOKENS * X_STRIDE; ++i) g_x[i] = uniform(1.0f);
  for (i = 0; i < D_FF; ++i) g_perm[i] = i;
  for (i = D_FF - 1; i > 0; --i) { /* Fisher-Yates */
    g_state = g_state * 6364136223846793005ull + 1442695040888963407ull;
    j = (int)((g_state >> 33) % (uint64_t)(i + 1));
    int32_t const t = g_perm[i];
    g_perm[i] = g_perm[j];
    g_perm[j] = t;
  }
}

/* Neuron j's SwiGLU activation silu(g_j . x) * (u_j . x) for token row x. */
static double neuron(int j, float const* x) {
  double g = 0, u = 0;
  int k;
  for (k = 0; k < D_MODEL; ++k) {
    g += (double)g_gate[j * GATE_STRIDE + k] * x[k];
    u += (double)g_up[j * GATE_STRIDE + k] * x[k];
  }
  return silu(g) * u;
}

/* Reference router logits of token x (double). */
static void ref_logits(float const* x, double* z) {
  int e, k;
  for (e = 0; e < N_EXPERTS; ++e) {
    z[e] = g_router_b[e];
    for (k = 0; k < D_MODEL; ++k) z[e] += (double)g_router_w[e * D_MODEL + k] * x[k];
  }
}

/* The top_k largest of z (descending; the lower index first on ties). */
static void top_k_of(double const* z, int n, int k, int* ids) {
  int j, e, i;
  for (j = 0; j < k; ++j) {
    int best = -1;
    for (e = 0; e < n; ++e) {
      int taken = 0;
      for (i = 0; i < j; ++i) taken |= ids[i] == e;
      if (!taken && (best < 0 || z[e] > z[best])) best = e;
    }
    ids[j] = best;
  }
}

/* Reference MoE output (softmax_topk_renorm, output scale 1) of token x: y[0..D_MODEL). */
static void ref_moe(float const* x, double* y) {
  double z[N_EXPERTS], w[TOP_K], sum = 0;
  int ids[TOP_K], j, i, o;
  ref_logits(x, z);
  top_k_of(z, N_EXPERTS, TOP_K, ids);
  for (j = 0; j < TOP_K; ++j) sum += w[j] = exp(z[ids[j]] - z[ids[0]]);
  for (o = 0; o < D_MODEL; ++o) y[o] = 0;
  for (j = 0; j < TOP_K; ++j)
    for (i = ids[j] * D_EXPERT; i < (ids[j] + 1) * D_EXPERT; ++i) {
      int const n = g_perm[i];
      double const h = w[j] / sum * neuron(n, x);
      for (o = 0; o < D_MODEL; ++o) y[o] += h * g_down[o * DOWN_STRIDE + n];
    }
}

/* Reference dense FFN output of token x. */
static void ref_dense(float const* x, double* y) {
  int n, o;
  for (o = 0; o < D_MODEL; ++o) y[o] = 0;
  for (n = 0; n < D_FF; ++n) {
    double const h = neuron(n, x);
    for (o = 0; o < D_MODEL; ++o) y[o] += h * g_down[o * DOWN_STRIDE + n];
  }
}

static fllm_moe* create(fllm_dtype dtype, fllm_gating const* gating) {
  fllm_moe* moe = NULL;
  fllm_dense_ffn const d = dense();
  CHECK_OK(fllm_moe_create_from_dense(&d, g_perm, N_EXPERTS, g_router_w, D_MODEL, g_router_b, gating, dtype, &moe));
  return moe;
}

/* max |y - ref| / max |ref| over every token, for y with row stride Y_STRIDE. */
static double relative_error(float const* y, int dense_ref) {
  double err = 0, scale = 0, ref[D_MODEL];
  int t, o;
  for (t = 0; t < N_TOKENS; ++t) {
    if (dense_ref) ref_dense(g_x + t * X_STRIDE, ref);
    else ref_moe(g_x + t * X_STRIDE, ref);
    for (o = 0; o < D_MODEL; ++o) {
      double const d = fabs(y[t * Y_STRIDE + o] - ref[o]);
      if (d > err || d != d) err = d != d ? INFINITY : d;
      if (fabs(ref[o]) > scale) scale = fabs(ref[o]);
    }
  }
  return err / scale;
}

/* Forward of each weight format against the double reference. Tolerances (relative to max |y_ref|): f32 1e-5 (float
 * sums over d_model = 64 and 32-neuron experts), f16 4e-3 (11-bit mantissas), bf16 3e-2 (8-bit), q8_0 3e-2, q4_0 0.3
 * (4-bit blocks: a smoke bound; the kernels' exact q4_0 arithmetic is tested in C++ by test_quant_kernels). */
static void test_forward_formats(void) {
  static float y[N_TOKENS * Y_STRIDE];
  fllm_dtype const dtypes[5] = {FLLM_F32, FLLM_F16, FLLM_BF16, FLLM_Q8_0, FLLM_Q4_0};
  double const tol[5] = {1e-5, 4e-3, 3e-2, 3e-2, 0.3};
  double errs[5];
  fllm_gating const g = fllm_gating_default(TOP_K);
  int i;
  for (i = 0; i < 5; ++i) {
    fllm_moe* moe = create(dtypes[i], &g);
    fllm_workspace* ws = NULL;
    fllm_moe_info info;
    CHECK_OK(fllm_workspace_create(&ws));
    CHECK_OK(fllm_workspace_reserve(ws, moe, N_TOKENS));
    memset(y, 0, sizeof y);
    CHECK_OK(fllm_moe_forward(moe, ws, FLLM_F32, g_x, X_STRIDE, y, Y_STRIDE, N_TOKENS, NULL));
    errs[i] = relative_error(y, 0);
    printf("forward weight dtype %d: max relative error %.3g (tolerance %.3g)\n", (int)dtypes[i], errs[i], tol[i]);
    CHECK(errs[i] <= tol[i]);
    CHECK_OK(fllm_moe_get_info(moe, &info));
    CHECK(info.d_model == D_MODEL && info.d_ff == D_FF && info.n_experts == N_EXPERTS && info.d_expert == D_EXPERT);
    CHECK(info.top_k == TOP_K && info.weight_dtype == dtypes[i] && info.mode == FLLM_COMBINE_SOFTMAX_TOPK_RENORM);
    fllm_workspace_destroy(ws);
    fllm_moe_destroy(moe);
  }
  /* The narrower formats really run narrower weights (an f32 copy would give the f32 error). */
  CHECK(errs[2] > errs[0] && errs[4] > errs[3]);
}

/* K = N experts in code_ref mode (weight floor(N / K) = 1 each) reproduce the dense FFN (docs/math.md §1.2). */
static void test_all_experts_equal_dense(void) {
  static float y[N_TOKENS * Y_STRIDE];
  fllm_gating g = fllm_gating_default(N_EXPERTS);
  fllm_moe* moe;
  double err;
  g.mode = FLLM_COMBINE_CODE_REF;
  moe = create(FLLM_F32, &g);
  CHECK_OK(fllm_moe_forward(moe, NULL, FLLM_F32, g_x, X_STRIDE, y, Y_STRIDE, N_TOKENS, NULL));
  err = relative_error(y, 1);
  printf("all experts active vs dense FFN: max relative error %.3g (tolerance 1e-5)\n", err);
  CHECK(err <= 1e-5);
  fllm_moe_destroy(moe);
}

/* The routing record against the reference logits, and its ids and weights against its own logits. */
static void test_routing_record(void) {
  static float y[N_TOKENS * Y_STRIDE], y2[N_TOKENS * Y_STRIDE];
  int32_t ids[N_TOKENS * TOP_K];
  float weights[N_TOKENS * TOP_K], logits[N_TOKENS * N_EXPERTS];
  fllm_routing r;
  fllm_gating const g = fllm_gating_default(TOP_K);
  fllm_moe* moe = create(FLLM_F32, &g);
  int t, j, e;
  r.ids = ids;
  r.weights = weights;
  r.logits = logits;
  CHECK_OK(fllm_moe_forward(moe, NULL, FLLM_F32, g_x, X_STRIDE, y, Y_STRIDE, N_TOKENS, &r));
  /* Asking for the record changes nothing in y. */
  CHECK_OK(fllm_moe_forward(moe, NULL, FLLM_F32, g_x, X_STRIDE, y2, Y_STRIDE, N_TOKENS, NULL));
  CHECK(memcmp(y, y2, sizeof y) == 0);
  for (t = 0; t < N_TOKENS; ++t) {
    double z[N_EXPERTS], zf[N_EXPERTS], sum = 0, wsum = 0;
    int ref_ids[TOP_K];
    ref_logits(g_x + t * X_STRIDE, z);
    for (e = 0; e < N_EXPERTS; ++e) {
      CHECK(fabs(logits[t * N_EXPERTS + e] - z[e]) <= 1e-5 * (1 + fabs(z[e])));
      zf[e] = logits[t * N_EXPERTS + e];
    }
    top_k_of(zf, N_EXPERTS, TOP_K, ref_ids);
    for (j = 0; j < TOP_K; ++j) sum += exp(zf[ref_ids[j]] - zf[ref_ids[0]]);
    for (j = 0; j < TOP_K; ++j) {
      CHECK(ids[t * TOP_K + j] == ref_ids[j]);
      CHECK(fabs(weights[t * TOP_K + j] - exp(zf[ref_ids[j]] - zf[ref_ids[0]]) / sum) <= 1e-6);
      wsum += weights[t * TOP_K + j];
    }
    CHECK(fabs(wsum - 1.0) <= 1e-6);
  }
  fllm_moe_destroy(moe);
}

/* bf16 activations: the float result on the bf16-rounded input, rounded once more (within half a bf16 ulp). */
static void test_bf16_activations(void) {
  static uint16_t xb[N_TOKENS * X_STRIDE], yb[N_TOKENS * Y_STRIDE];
  static float xr[N_TOKENS * X_STRIDE], y[N_TOKENS * Y_STRIDE];
  fllm_gating const g = fllm_gating_default(TOP_K);
  fllm_moe* moe = create(FLLM_F32, &g);
  int i, t, o;
  for (i = 0; i < N_TOKENS * X_STRIDE; ++i) xb[i] = to_bf16(g_x[i]), xr[i] = from_bf16(xb[i]);
  CHECK_OK(fllm_moe_forward(moe, NULL, FLLM_BF16, xb, X_STRIDE, yb, Y_STRIDE, N_TOKENS, NULL));
  CHECK_OK(fllm_moe_forward(moe, NULL, FLLM_F32, xr, X_STRIDE, y, Y_STRIDE, N_TOKENS, NULL));
  for (t = 0; t < N_TOKENS; ++t)
    for (o = 0; o < D_MODEL; ++o) CHECK(yb[t * Y_STRIDE + o] == to_bf16(y[t * Y_STRIDE + o]));
  fllm_moe_destroy(moe);
}

/* PAR loss gradients w.r.t. every router weight and bias against central finite differences of total_loss. The
 * perturbed weights are floats: the difference quotient divides by the perturbation actually stored. */
static double par_total(fllm_moe* moe, float const* w, float const* b, fllm_par_config const* cfg) {
  fllm_dense_ffn const d = dense();
  fllm_par_result r;
  memset(&r, 0, sizeof r);
  CHECK_OK(fllm_moe_set_router(moe, w, D_MODEL, b));
  CHECK_OK(fllm_moe_par_loss(moe, &d, g_x, X_STRIDE, N_TOKENS, cfg, &r));
  return r.total_loss;
}

static void test_par_gradients(void) {
  static float w[N_EXPERTS * D_MODEL], gw[N_EXPERTS * D_MODEL];
  float b[N_EXPERTS], gb[N_EXPERTS];
  fllm_gating const g = fllm_gating_default(TOP_K);
  fllm_moe* moe = create(FLLM_F32, &g);
  fllm_dense_ffn const d = dense();
  fllm_par_config cfg = fllm_par_config_default();
  fllm_par_result r;
  double const h = 1e-3, tol = 1e-4;
  double max_g = 0, max_err = 0, min_gap = INFINITY;
  int i, t;
  cfg.par_weight = 1.0; /* both terms weigh in, so both gradients are checked */
  cfg.balance_weight = 0.5;
  memset(&r, 0, sizeof r);
  r.grad_weight = gw;
  r.grad_bias = gb;
  CHECK_OK(fllm_moe_par_loss(moe, &d, g_x, X_STRIDE, N_TOKENS, &cfg, &r));
  CHECK(r.total_loss > 0 && fabs(r.total_loss - (r.par_loss + 0.5 * r.balance_loss)) <= 1e-12 * r.total_loss);
  CHECK(r.label_accuracy >= 0 && r.label_accuracy <= 1);
  /* The balance term's TopK mask is piecewise constant: the check is valid only if no perturbation flips a token's
   * selection, i.e. the K-th and (K+1)-th logits are further apart than any perturbation can move them. */
  for (t = 0; t < N_TOKENS; ++t) {
    double z[N_EXPERTS], gap;
    int ids[TOP_K + 1];
    ref_logits(g_x + t * X_STRIDE, z);
    top_k_of(z, N_EXPERTS, TOP_K + 1, ids);
    gap = z[ids[TOP_K - 1]] - z[ids[TOP_K]];
    if (gap < min_gap) min_gap = gap;
  }
  CHECK(min_gap > 4 * h);
  memcpy(w, g_router_w, sizeof w);
  memcpy(b, g_router_b, sizeof b);
  for (i = 0; i < N_EXPERTS * D_MODEL + N_EXPERTS; ++i) {
    float* p = i < N_EXPERTS * D_MODEL ? &w[i] : &b[i - N_EXPERTS * D_MODEL];
    float const grad = i < N_EXPERTS * D_MODEL ? gw[i] : gb[i - N_EXPERTS * D_MODEL];
    float const saved = *p, plus = (float)(saved + h), minus = (float)(saved - h);
    double lp, lm, fd;
    *p = plus;
    lp = par_total(moe, w, b, &cfg);
    *p = minus;
    lm = par_total(moe, w, b, &cfg);
    *p = saved;
    fd = (lp - lm) / ((double)plus - (double)minus);
    if (fabs(fd - grad) > max_err) max_err = fabs(fd - grad);
    if (fabs(grad) > max_g) max_g = fabs(grad);
  }
  printf("PAR gradients vs central differences (h = %g): max error %.3g, max |grad| %.3g (tolerance %g relative)\n", h,
         max_err, max_g, tol);
  CHECK(max_g > 0);
  CHECK(max_err <= tol * max_g);
  fllm_moe_destroy(moe);
  { /* Non-f32 layers are evaluated on f32 copies of their experts: close to the f32 layer's loss. */
    fllm_moe* q = create(FLLM_Q8_0, &g);
    fllm_par_result rq;
    memset(&rq, 0, sizeof rq);
    CHECK_OK(fllm_moe_par_loss(q, &d, g_x, X_STRIDE, N_TOKENS, &cfg, &rq));
    CHECK(fabs(rq.total_loss - r.total_loss) <= 0.05 * r.total_loss);
    fllm_moe_destroy(q);
  }
}

/* Save two layers, read them back: the same routers and forward outputs, bit for bit (f32 and bf16 files). */
static void test_save_load(char const* dir) {
  static float y1[N_TOKENS * Y_STRIDE], y2[N_TOKENS * Y_STRIDE];
  static float w1[N_EXPERTS * D_MODEL], w2[N_EXPERTS * D_MODEL];
  char path[4096];
  fllm_gating g0 = fllm_gating_default(TOP_K), g1 = fllm_gating_default(3);
  float const bias[N_EXPERTS] = {0.5f, -0.25f, 0.f, 0.125f};
  fllm_dtype const dtypes[2] = {FLLM_F32, FLLM_BF16};
  int i, l;
  g1.mode = FLLM_COMBINE_SIGMOID_TOPK;
  g1.sigmoid_renormalize = 1;
  g1.selection_bias = bias;
  g1.output_scale = 1.5f;
  for (i = 0; i < 2; ++i) {
    fllm_moe* layers[2];
    int64_t n_layers = 0;
    snprintf(path, sizeof path, "%s/c_api_roundtrip_%d.safetensors", dir, i);
    layers[0] = create(dtypes[i], &g0);
    layers[1] = create(dtypes[i], &g1);
    CHECK_OK(fllm_moe_save((fllm_moe const* const*)layers, 2, path));
    CHECK_OK(fllm_checkpoint_n_layers(path, &n_layers));
    CHECK(n_layers == 2);
    for (l = 0; l < 2; ++l) {
      fllm_moe* back = NULL;
      fllm_moe_info a, b;
      CHECK_OK(fllm_moe_load(path, l, dtypes[i], &back));
      if (back == NULL) continue;
      CHECK_OK(fllm_moe_get_info(layers[l], &a));
      CHECK_OK(fllm_moe_get_info(back, &b));
      CHECK(memcmp(&a, &b, sizeof a) == 0);
      CHECK_OK(fllm_moe_get_router(layers[l], w1, NULL));
      CHECK_OK(fllm_moe_get_router(back, w2, NULL));
      CHECK(memcmp(w1, w2, sizeof w1) == 0);
      CHECK_OK(fllm_moe_forward(layers[l], NULL, FLLM_F32, g_x, X_STRIDE, y1, Y_STRIDE, N_TOKENS, NULL));
      CHECK_OK(fllm_moe_forward(back, NULL, FLLM_F32, g_x, X_STRIDE, y2, Y_STRIDE, N_TOKENS, NULL));
      CHECK(memcmp(y1, y2, sizeof y1) == 0);
      fllm_moe_destroy(back);
    }
    fllm_moe_destroy(layers[0]);
    fllm_moe_destroy(layers[1]);
  }
  { /* A quantized load of an f32 file runs the quantized experts (not bitwise: it is a conversion). */
    fllm_moe* q = NULL;
    fllm_moe_info info;
    snprintf(path, sizeof path, "%s/c_api_roundtrip_0.safetensors", dir);
    CHECK_OK(fllm_moe_load(path, 0, FLLM_Q8_0, &q));
    CHECK_OK(fllm_moe_get_info(q, &info));
    CHECK(info.weight_dtype == FLLM_Q8_0);
    CHECK_OK(fllm_moe_forward(q, NULL, FLLM_F32, g_x, X_STRIDE, y1, Y_STRIDE, N_TOKENS, NULL));
    CHECK(relative_error(y1, 0) <= 3e-2);
    fllm_moe_destroy(q);
  }
}

/* Threads: one workspace per thread, or the handle's internal one (serialized), give the serial bits; the last error
 * is per thread. */
typedef struct {
  fllm_moe const* moe;
  float* y;
  int own_workspace; /* 0: ws = NULL, the handle's internal workspace under its lock */
  fllm_status status;
} thread_job;

static void* run_forward(void* arg) {
  thread_job* job = (thread_job*)arg;
  fllm_workspace* ws = NULL;
  int i;
  job->status = job->own_workspace ? fllm_workspace_create(&ws) : FLLM_OK;
  for (i = 0; i < 20 && job->status == FLLM_OK; ++i)
    job->status = fllm_moe_forward(job->moe, ws, FLLM_F32, g_x, X_STRIDE, job->y, Y_STRIDE, N_TOKENS, NULL);
  fllm_workspace_destroy(ws);
  /* A failure on this thread must not show in the main thread's fllm_last_error. */
  (void)fllm_moe_forward(NULL, NULL, FLLM_F32, g_x, X_STRIDE, job->y, Y_STRIDE, 0, NULL);
  return NULL;
}

static void test_threads(void) {
  static float y0[N_TOKENS * Y_STRIDE], y[4][N_TOKENS * Y_STRIDE];
  fllm_gating const g = fllm_gating_default(TOP_K);
  fllm_moe* moe = create(FLLM_F32, &g);
  pthread_t th[4];
  thread_job jobs[4];
  int i;
  CHECK_OK(fllm_moe_forward(moe, NULL, FLLM_F32, g_x, X_STRIDE, y0, Y_STRIDE, N_TOKENS, NULL));
  /* Leave a known message on this thread. */
  CHECK_ERROR(fllm_moe_forward(moe, NULL, FLLM_Q4_0, g_x, X_STRIDE, y0, Y_STRIDE, N_TOKENS, NULL), FLLM_ERR_VALUE,
              "act_dtype");
  for (i = 0; i < 4; ++i) { /* two threads with their own workspaces, two sharing the handle's */
    jobs[i].moe = moe;
    jobs[i].y = y[i];
    jobs[i].own_workspace = i < 2;
    jobs[i].status = FLLM_ERR_INTERNAL;
    CHECK(pthread_create(&th[i], NULL, run_forward, &jobs[i]) == 0);
  }
  for (i = 0; i < 4; ++i) {
    CHECK(pthread_join(th[i], NULL) == 0);
    CHECK(jobs[i].status == FLLM_OK);
    CHECK(memcmp(y[i], y0, sizeof y0) == 0);
  }
  CHECK(strstr(fllm_last_error(), "act_dtype") != NULL);
  fllm_moe_destroy(moe);
}

/* Every error path returns its code and a message naming the argument; nothing crashes. */
static void test_errors(char const* dir) {
  static float y[N_TOKENS * Y_STRIDE];
  char path[4096];
  fllm_gating g = fllm_gating_default(TOP_K);
  fllm_dense_ffn d = dense();
  fllm_moe* moe = create(FLLM_F32, &g);
  fllm_moe* out = NULL;
  fllm_workspace* ws = NULL;
  fllm_par_result r;
  int32_t bad_perm[D_FF];
  FILE* f;
  memset(&r, 0, sizeof r);

  /* Bad shapes and strides. */
  CHECK_ERROR(fllm_moe_forward(moe, NULL, FLLM_F32, g_x, D_MODEL - 1, y, Y_STRIDE, N_TOKENS, NULL), FLLM_ERR_SHAPE,
              "x_row_stride");
  CHECK_ERROR(fllm_moe_forward(moe, NULL, FLLM_F32, g_x, X_STRIDE, y, 3, N_TOKENS, NULL), FLLM_ERR_SHAPE,
              "y_row_stride");
  CHECK_ERROR(fllm_moe_forward(moe, NULL, FLLM_F32, g_x, X_STRIDE, y, Y_STRIDE, -1, NULL), FLLM_ERR_SHAPE, "n_tokens");
  CHECK_ERROR(fllm_moe_forward(moe, NULL, FLLM_F32, g_x, X_STRIDE, g_x + 1, X_STRIDE, N_TOKENS, NULL), FLLM_ERR_SHAPE,
              "overlaps");
  d.gate_row_stride = D_MODEL - 2;
  CHECK_ERROR(fllm_moe_create_from_dense(&d, g_perm, N_EXPERTS, g_router_w, D_MODEL, NULL, &g, FLLM_F32, &out),
              FLLM_ERR_SHAPE, "dense->gate_row_stride");
  d = dense();
  CHECK_ERROR(fllm_moe_create_from_dense(&d, g_perm, N_EXPERTS, g_router_w, D_MODEL - 1, NULL, &g, FLLM_F32, &out),
              FLLM_ERR_SHAPE, "router_row_stride");
  CHECK_ERROR(fllm_moe_par_loss(moe, &d, g_x, X_STRIDE, 0, NULL, &r), FLLM_ERR_SHAPE, "n_tokens");

  /* Null pointers. */
  CHECK_ERROR(fllm_moe_forward(moe, NULL, FLLM_F32, NULL, X_STRIDE, y, Y_STRIDE, N_TOKENS, NULL), FLLM_ERR_NULL_POINTER,
              "'x'");
  CHECK_ERROR(fllm_moe_forward(moe, NULL, FLLM_F32, g_x, X_STRIDE, NULL, Y_STRIDE, N_TOKENS, NULL),
              FLLM_ERR_NULL_POINTER, "'y'");
  CHECK_ERROR(fllm_moe_forward(NULL, NULL, FLLM_F32, g_x, X_STRIDE, y, Y_STRIDE, N_TOKENS, NULL), FLLM_ERR_NULL_POINTER,
              "'moe'");
  CHECK_ERROR(fllm_moe_create_from_dense(NULL, g_perm, N_EXPERTS, g_router_w, D_MODEL, NULL, &g, FLLM_F32, &out),
              FLLM_ERR_NULL_POINTER, "'dense'");
  CHECK_ERROR(fllm_moe_create_from_dense(&d, g_perm, N_EXPERTS, NULL, D_MODEL, NULL, &g, FLLM_F32, &out),
              FLLM_ERR_NULL_POINTER, "'router_weight'");
  CHECK_ERROR(fllm_moe_create_from_dense(&d, g_perm, N_EXPERTS, g_router_w, D_MODEL, NULL, NULL, FLLM_F32, &out),
              FLLM_ERR_NULL_POINTER, "'gating'");
  CHECK_ERROR(fllm_moe_create_from_dense(&d, g_perm, N_EXPERTS, g_router_w, D_MODEL, NULL, &g, FLLM_F32, NULL),
              FLLM_ERR_NULL_POINTER, "'out'");
  d.up = NULL;
  CHECK_ERROR(fllm_moe_create_from_dense(&d, g_perm, N_EXPERTS, g_router_w, D_MODEL, NULL, &g, FLLM_F32, &out),
              FLLM_ERR_NULL_POINTER, "'dense->up'");
  d = dense();
  CHECK_ERROR(fllm_moe_load(NULL, 0, FLLM_F32, &out), FLLM_ERR_NULL_POINTER, "'path'");
  CHECK_ERROR(fllm_moe_par_loss(moe, &d, g_x, X_STRIDE, N_TOKENS, NULL, NULL), FLLM_ERR_NULL_POINTER, "'result'");
  CHECK_ERROR(fllm_workspace_reserve(NULL, moe, 4), FLLM_ERR_NULL_POINTER, "'ws'");

  /* Bad dtypes and values. */
  CHECK_ERROR(fllm_moe_forward(moe, NULL, FLLM_Q8_0, g_x, X_STRIDE, y, Y_STRIDE, N_TOKENS, NULL), FLLM_ERR_VALUE,
              "act_dtype");
  CHECK_ERROR(fllm_moe_create_from_dense(&d, g_perm, N_EXPERTS, g_router_w, D_MODEL, NULL, &g, (fllm_dtype)17, &out),
              FLLM_ERR_VALUE, "weight_dtype");
  CHECK_ERROR(fllm_moe_forward(moe, NULL, (fllm_dtype)-3, g_x, X_STRIDE, y, Y_STRIDE, N_TOKENS, NULL), FLLM_ERR_VALUE,
              "act_dtype");
  d.dtype = FLLM_BF16;
  CHECK_ERROR(fllm_moe_create_from_dense(&d, g_perm, N_EXPERTS, g_router_w, D_MODEL, NULL, &g, FLLM_F32, &out),
              FLLM_ERR_VALUE, "dense->dtype");
  d = dense();
  CHECK_ERROR(fllm_moe_create_from_dense(&d, g_perm, 3, g_router_w, D_MODEL, NULL, &g, FLLM_F32, &out), FLLM_ERR_VALUE,
              "n_experts");
  memcpy(bad_perm, g_perm, sizeof bad_perm);
  bad_perm[5] = bad_perm[6];
  CHECK_ERROR(fllm_moe_create_from_dense(&d, bad_perm, N_EXPERTS, g_router_w, D_MODEL, NULL, &g, FLLM_F32, &out),
              FLLM_ERR_VALUE, "permutation");
  g.top_k = N_EXPERTS + 1;
  CHECK_ERROR(fllm_moe_create_from_dense(&d, g_perm, N_EXPERTS, g_router_w, D_MODEL, NULL, &g, FLLM_F32, &out),
              FLLM_ERR_VALUE, "top_k");
  g = fllm_gating_default(TOP_K);
  g.mode = (fllm_combine_mode)9;
  CHECK_ERROR(fllm_moe_create_from_dense(&d, g_perm, N_EXPERTS, g_router_w, D_MODEL, NULL, &g, FLLM_F32, &out),
              FLLM_ERR_VALUE, "gating->mode");
  g = fllm_gating_default(TOP_K);
  g.output_scale = NAN;
  CHECK_ERROR(fllm_moe_create_from_dense(&d, g_perm, N_EXPERTS, g_router_w, D_MODEL, NULL, &g, FLLM_F32, &out),
              FLLM_ERR_VALUE, "output_scale");
  g = fllm_gating_default(TOP_K);
  CHECK(out == NULL); /* no failed call wrote its output */
  { /* quantized layers have no checkpoint format */
    fllm_moe* q = create(FLLM_Q4_0, &g);
    fllm_moe const* layers[1];
    layers[0] = q;
    snprintf(path, sizeof path, "%s/c_api_q4.safetensors", dir);
    CHECK_ERROR(fllm_moe_save(layers, 1, path), FLLM_ERR_VALUE, "FLLM_Q4_0");
    fllm_moe_destroy(q);
  }

  /* Bad files: missing, not a safetensors file, a layer that is not there. */
  snprintf(path, sizeof path, "%s/c_api_missing.safetensors", dir);
  remove(path);
  CHECK_ERROR(fllm_moe_load(path, 0, FLLM_F32, &out), FLLM_ERR_FORMAT, "c_api_missing.safetensors");
  CHECK_ERROR(fllm_checkpoint_n_layers(path, NULL), FLLM_ERR_NULL_POINTER, "n_layers");
  snprintf(path, sizeof path, "%s/c_api_garbage.safetensors", dir);
  f = fopen(path, "wb");
  CHECK(f != NULL);
  if (f != NULL) {
    fputs("\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": not json}", f);
    fclose(f);
  }
  CHECK_ERROR(fllm_moe_load(path, 0, FLLM_F32, &out), FLLM_ERR_FORMAT, "c_api_garbage.safetensors");
  snprintf(path, sizeof path, "%s/c_api_roundtrip_0.safetensors", dir);
  CHECK_ERROR(fllm_moe_load(path, 2, FLLM_F32, &out), FLLM_ERR_VALUE, "'layer'");
  CHECK(out == NULL);

  /* Zero tokens is a valid call; NULL handles are ignored by destroy. */
  CHECK_OK(fllm_workspace_create(&ws));
  CHECK_OK(fllm_moe_forward(moe, ws, FLLM_F32, NULL, X_STRIDE, NULL, Y_STRIDE, 0, NULL));
  fllm_workspace_destroy(ws);
  fllm_workspace_destroy(NULL);
  fllm_moe_destroy(NULL);
  CHECK(strcmp(fllm_status_name(FLLM_ERR_FORMAT), "FLLM_ERR_FORMAT") == 0);
  fllm_moe_destroy(moe);
}

int main(int argc, char** argv) {
  char const* dir = argc > 1 ? argv[1] : ".";
  char expected[32];
  snprintf(expected, sizeof expected, "%d.%d.%d", FLLM_C_VERSION_MAJOR, FLLM_C_VERSION_MINOR, FLLM_C_VERSION_PATCH);
  CHECK(strcmp(fllm_version(), expected) == 0);
  make_data();
  test_forward_formats();
  test_all_experts_equal_dense();
  test_routing_record();
  test_bf16_activations();
  test_par_gradients();
  test_save_load(dir);
  test_threads();
  test_errors(dir);
  if (g_failures != 0) {
    fprintf(stderr, "test_c_api: %d check(s) failed\n", g_failures);
    return 1;
  }
  printf("test_c_api: all checks passed\n");
  return 0;
}
