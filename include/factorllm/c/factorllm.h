/* SPDX-License-Identifier: Apache-2.0 */
/* The factorllm C API: a C11 ABI over the MoE layer (moe::MoeFfn), its factorization, the PAR loss and the
 * factorized checkpoint, for engines written in C, Rust, Go or Zig (README "Embed in your engine", docs/c_api.md).
 *
 * Link the compiled shim: CMake target factorllm::c (library factorllm_c). The header is plain C11 (it compiles with
 * gcc -std=c11 -Wall -Wextra -Werror -pedantic) and needs no C++ header.
 *
 * Conventions
 * - Every function that can fail returns an fllm_status; FLLM_OK (0) is success. On failure, fllm_last_error()
 *   returns a message naming the function and the argument (the C++ library's message where it raised one). No C++
 *   exception crosses this boundary: every entry point catches everything.
 * - Objects are opaque handles created by fllm_*_create / fllm_moe_load and freed by the matching *_destroy
 *   (NULL is accepted there and ignored). Outputs go through pointer arguments; an output is written only on success.
 * - Matrices are row-major with a row stride in ELEMENTS (>= the number of columns); rows must not overlap.
 * - Dimension names: d_model, d_ff, n_experts, d_expert = d_ff / n_experts, top_k, n_tokens.
 *
 * Thread rules (README, "Thread safety")
 * - A fllm_moe handle is immutable after creation except through fllm_moe_set_router: any number of threads may
 *   call fllm_moe_forward, fllm_moe_par_loss, fllm_moe_get_* and fllm_moe_save on it at once.
 * - fllm_moe_forward with a workspace: the workspace belongs to one thread at a time (one per thread).
 *   With ws == NULL the handle's own internal workspace is used under a lock: calls on that handle are serialized.
 * - fllm_moe_set_router must not run while another thread uses the handle.
 * - fllm_last_error() is per thread: it describes the last failed call made by the calling thread.
 * - Results do not depend on the number of threads (OpenMP team of the calling thread). */
#ifndef FACTORLLM_C_FACTORLLM_H
#define FACTORLLM_C_FACTORLLM_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32) && defined(FLLM_C_BUILDING)
#define FLLM_C_API __declspec(dllexport)
#elif defined(__GNUC__) && defined(FLLM_C_BUILDING)
#define FLLM_C_API __attribute__((visibility("default")))
#else
#define FLLM_C_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/** Version of this C API (the library version; a major change breaks the ABI). */
#define FLLM_C_VERSION_MAJOR 0
#define FLLM_C_VERSION_MINOR 1
#define FLLM_C_VERSION_PATCH 0

/** Status codes. Each maps one exception type of the C++ library (core/error.hpp). */
typedef enum fllm_status {
  FLLM_OK = 0,
  FLLM_ERR_NULL_POINTER = 1,  /**< a required pointer argument (handle, data, path, output) is NULL */
  FLLM_ERR_SHAPE = 2,         /**< a tensor has the wrong shape or stride (factorllm::shape_error) */
  FLLM_ERR_VALUE = 3,         /**< a scalar is out of range: dtype, top_k, mode, permutation (value_error) */
  FLLM_ERR_FORMAT = 4,        /**< a file is missing, unreadable or malformed (format_error) */
  FLLM_ERR_BACKEND = 5,       /**< the kernels cannot run the call (backend_error) */
  FLLM_ERR_OUT_OF_MEMORY = 6, /**< an allocation failed */
  FLLM_ERR_INTERNAL = 7,      /**< any other failure (a bug: please report the message) */
  FLLM_STATUS_RANGE_MIN_ = -0x7fffffff - 1, /**< not a value: see FLLM_DTYPE_RANGE_MIN_ */
  FLLM_STATUS_RANGE_MAX_ = 0x7fffffff
} fllm_status;

/** Element types. Weights of a layer: every value. Activations (x, y): FLLM_F32 or FLLM_BF16. Dense input weights
 * of fllm_moe_create_from_dense and fllm_moe_par_loss: FLLM_F32. */
typedef enum fllm_dtype {
  FLLM_F32 = 0,  /**< IEEE binary32 */
  FLLM_BF16 = 1, /**< bfloat16 as uint16_t bits (upper half of a binary32); converted with round-to-nearest-even */
  FLLM_F16 = 2,  /**< IEEE binary16 */
  FLLM_Q8_0 = 3, /**< ggml's q8_0 blocks of 32 weights (d_model and d_expert multiples of 32) */
  FLLM_Q4_0 = 4, /**< ggml's q4_0 blocks of 32 weights (d_model and d_expert multiples of 32) */
  /* Not values: they make every enum of this header span all of int32 (as Vulkan's *_MAX_ENUM do), so that any
   * integer a caller casts to it is a valid value of the type in C++ too; the library refuses out-of-range values
   * with FLLM_ERR_VALUE. */
  FLLM_DTYPE_RANGE_MIN_ = -0x7fffffff - 1,
  FLLM_DTYPE_RANGE_MAX_ = 0x7fffffff
} fllm_dtype;

/** How the top_k selected experts are weighted (docs/math.md §2.3; moe/gating.hpp has the table). */
typedef enum fllm_combine_mode {
  FLLM_COMBINE_CODE_REF = 0,            /**< unweighted sum times floor(n_experts / top_k) (the paper code) */
  FLLM_COMBINE_SOFTMAX_TOPK = 1,        /**< full softmax over all logits, not renormalized */
  FLLM_COMBINE_SOFTMAX_TOPK_RENORM = 2, /**< softmax renormalized over the selected experts (Mixtral) */
  FLLM_COMBINE_TOPK_SOFTMAX = 3,        /**< softmax over the selected logits */
  FLLM_COMBINE_SIGMOID_TOPK = 4,        /**< sigmoid of the logits, optionally renormalized */
  FLLM_COMBINE_RANGE_MIN_ = -0x7fffffff - 1, /**< not a value: see FLLM_DTYPE_RANGE_MIN_ */
  FLLM_COMBINE_RANGE_MAX_ = 0x7fffffff
} fllm_combine_mode;

/** Gating of a layer: which experts a token uses and with what weight. Start from fllm_gating_default(). */
typedef struct fllm_gating {
  fllm_combine_mode mode;      /**< default FLLM_COMBINE_SOFTMAX_TOPK_RENORM */
  int64_t top_k;               /**< experts per token, 1 <= top_k <= n_experts */
  int32_t sigmoid_renormalize; /**< FLLM_COMBINE_SIGMOID_TOPK only: nonzero divides the weights by their sum */
  const float* selection_bias; /**< NULL, or n_experts finite values added to the logits for selection only */
  float output_scale;          /**< multiplies every weight; default 1 */
} fllm_gating;

/** Dense SwiGLU weights of one FFN, PyTorch nn.Linear layout, all of element type `dtype` (FLLM_F32):
 * gate, up [d_ff, d_model]; down [d_model, d_ff]; each with its row stride in elements. Not copied by the calls that
 * read it beyond the call itself. */
typedef struct fllm_dense_ffn {
  fllm_dtype dtype;
  int64_t d_model;
  int64_t d_ff;
  const void* gate;
  int64_t gate_row_stride;
  const void* up;
  int64_t up_row_stride;
  const void* down;
  int64_t down_row_stride;
} fllm_dense_ffn;

/** Shape and formats of a layer (fllm_moe_get_info). */
typedef struct fllm_moe_info {
  int64_t d_model;
  int64_t d_ff;
  int64_t n_experts;
  int64_t d_expert;
  int64_t top_k;
  fllm_dtype weight_dtype;
  fllm_combine_mode mode;
} fllm_moe_info;

/** Where fllm_moe_forward writes its routing decisions; every pointer may be NULL (that part is not written).
 * Rows are dense (row stride = number of columns). */
typedef struct fllm_routing {
  int32_t* ids;   /**< [n_tokens, top_k]: token t's experts, best selection score first, lower index on ties */
  float* weights; /**< [n_tokens, top_k]: combine weight of ids[t * top_k + j] (output_scale included) */
  float* logits;  /**< [n_tokens, n_experts]: router logits x W_r^T + b_r (without the selection bias) */
} fllm_routing;

/** PAR loss configuration (docs/math.md §3.2). Start from fllm_par_config_default(). */
typedef struct fllm_par_config {
  double par_weight;     /**< default 0.05 */
  double balance_weight; /**< default 0.01 */
  double clip;           /**< p and q are clipped to [clip, 1 - clip]; in (0, 0.5), default 1e-7 */
} fllm_par_config;

/** What fllm_moe_par_loss reports. The gradient pointers are caller buffers (NULL: not written). */
typedef struct fllm_par_result {
  double par_loss;       /**< out: mean over tokens of KL(clip(p) || clip(q)) */
  double balance_loss;   /**< out: mean over tokens and experts of TopK mask * p */
  double total_loss;     /**< out: par_weight * par_loss + balance_weight * balance_loss */
  double label_accuracy; /**< out: fraction of tokens whose router TopK set equals the oracle's */
  float* grad_weight;    /**< in: buffer [n_experts, d_model] for d total / d W_r, or NULL */
  float* grad_bias;      /**< in: buffer [n_experts] for d total / d b_r, or NULL */
} fllm_par_result;

/** A layer (opaque). */
typedef struct fllm_moe fllm_moe;
/** Scratch of fllm_moe_forward (opaque): one per thread; grows to the largest call it served. */
typedef struct fllm_workspace fllm_workspace;

/** The library version, "MAJOR.MINOR.PATCH" (static storage). */
FLLM_C_API const char* fllm_version(void);
/** The message of the last call that failed on the calling thread ("" if none); valid until the thread's next
 * failing call: copy it before calling again, and do not call it in the same expression as the failing call (C leaves
 * the order of evaluation of arguments unspecified). Thread-local storage owned by the library: never freed by the
 * caller. */
FLLM_C_API const char* fllm_last_error(void);
/** A short name of a status code ("FLLM_ERR_SHAPE", ...; "unknown status" otherwise). */
FLLM_C_API const char* fllm_status_name(fllm_status status);

/** Gating defaults: softmax_topk_renorm, the given top_k, no selection bias, output scale 1. */
FLLM_C_API fllm_gating fllm_gating_default(int64_t top_k);
/** PAR defaults: par_weight 0.05, balance_weight 0.01, clip 1e-7. */
FLLM_C_API fllm_par_config fllm_par_config_default(void);

/** Factorizes a dense SwiGLU FFN into n_experts experts and builds the layer (docs/math.md §1.2).
 * \param dense          dense weights (dtype FLLM_F32)
 * \param permutation    d_ff neuron indices: expert e owns permutation[e * d_expert .. (e + 1) * d_expert); NULL for
 *                       the contiguous split 0, 1, ..., d_ff - 1
 * \param n_experts      number of experts; must divide d_ff
 * \param router_weight  [n_experts, d_model] f32, row stride router_row_stride
 * \param router_bias    [n_experts] f32, or NULL for zeros
 * \param gating         gating (fllm_gating_default(top_k) and adjust); the selection bias is copied
 * \param weight_dtype   format the experts are stored and run in (any fllm_dtype; q8_0 / q4_0 quantize each row)
 * \param out            receives the new handle (free with fllm_moe_destroy)
 * The weights are copied: the caller's buffers may be freed after the call. */
FLLM_C_API fllm_status fllm_moe_create_from_dense(const fllm_dense_ffn* dense, const int32_t* permutation,
                                                  int64_t n_experts, const float* router_weight,
                                                  int64_t router_row_stride, const float* router_bias,
                                                  const fllm_gating* gating, fllm_dtype weight_dtype, fllm_moe** out);

/** Number of layers in a factorized checkpoint (written by fllm_moe_save or io::save_factorized). The file is
 * untrusted: it is fully validated (FLLM_ERR_FORMAT names the file and the problem). */
FLLM_C_API fllm_status fllm_checkpoint_n_layers(const char* path, int64_t* n_layers);

/** Loads layer `layer` of a factorized checkpoint with experts in weight_dtype (f32, bf16, f16 keep a file of that
 * format bit for bit; q8_0 / q4_0 quantize after loading). */
FLLM_C_API fllm_status fllm_moe_load(const char* path, int64_t layer, fllm_dtype weight_dtype, fllm_moe** out);

/** Saves n_layers layers (layer l becomes layers.{l}.ffn.* in the file) as a factorized checkpoint
 * (docs/formats.md). Every layer must have the same weight format, f32, bf16 or f16 (stored as such, so loading with
 * that format gives the same bits); q8_0 / q4_0 layers have no checkpoint format (FLLM_ERR_VALUE). */
FLLM_C_API fllm_status fllm_moe_save(const fllm_moe* const* layers, int64_t n_layers, const char* path);

/** Frees a layer (NULL is ignored). No other call may be using it. */
FLLM_C_API void fllm_moe_destroy(fllm_moe* moe);

/** Shape and formats of a layer. */
FLLM_C_API fllm_status fllm_moe_get_info(const fllm_moe* moe, fllm_moe_info* info);

/** Copies the router out: weight [n_experts, d_model] (dense rows) and bias [n_experts]; either may be NULL. */
FLLM_C_API fllm_status fllm_moe_get_router(const fllm_moe* moe, float* weight, float* bias);

/** Replaces the router (e.g. after an optimizer step on fllm_moe_par_loss's gradients): weight [n_experts, d_model]
 * with row stride weight_row_stride, bias [n_experts] (NULL for zeros). Not thread safe (see the thread rules). */
FLLM_C_API fllm_status fllm_moe_set_router(fllm_moe* moe, const float* weight, int64_t weight_row_stride,
                                           const float* bias);

/** A workspace for fllm_moe_forward; empty until its first use or fllm_workspace_reserve. */
FLLM_C_API fllm_status fllm_workspace_create(fllm_workspace** out);
/** Frees a workspace (NULL is ignored). */
FLLM_C_API void fllm_workspace_destroy(fllm_workspace* ws);
/** Grows ws so that calls of up to max_tokens tokens on `moe` (from threads with the calling thread's OpenMP team
 * size) allocate nothing. Optional: forward grows the workspace itself when needed. */
FLLM_C_API fllm_status fllm_workspace_reserve(fllm_workspace* ws, const fllm_moe* moe, int64_t max_tokens);

/** y = MoE(x) for n_tokens tokens (n_tokens may be 0).
 * \param ws          a workspace used by one thread at a time, or NULL for the handle's internal one (serialized)
 * \param act_dtype   FLLM_F32 (float) or FLLM_BF16 (uint16_t bits; converted to float and back, RNE)
 * \param x           [n_tokens, d_model], row stride x_row_stride (>= d_model)
 * \param y           [n_tokens, d_model], row stride y_row_stride (>= d_model); must not overlap x
 * \param routing     NULL, or where to write the routing decisions (fllm_routing)
 * The kernels run on the calling thread's OpenMP team; the result is the same bits for any team size. */
FLLM_C_API fllm_status fllm_moe_forward(const fllm_moe* moe, fllm_workspace* ws, fllm_dtype act_dtype, const void* x,
                                        int64_t x_row_stride, void* y, int64_t y_row_stride, int64_t n_tokens,
                                        const fllm_routing* routing);

/** The PAR and balance losses of the layer's router over the tokens x ([n_tokens >= 1, d_model] f32, row stride
 * x_row_stride) with `dense` as the teacher, and their gradients w.r.t. the router (docs/math.md §3.2). The MSE target
 * of the oracle is f / floor(n_experts / top_k) with the layer's top_k. config NULL: fllm_par_config_default().
 * Layers whose experts are not f32 are evaluated on f32 copies of their experts (dequantized: exact). */
FLLM_C_API fllm_status fllm_moe_par_loss(const fllm_moe* moe, const fllm_dense_ffn* dense, const float* x,
                                         int64_t x_row_stride, int64_t n_tokens, const fllm_par_config* config,
                                         fllm_par_result* result);

#ifdef __cplusplus
}
#endif

#endif /* FACTORLLM_C_FACTORLLM_H */
