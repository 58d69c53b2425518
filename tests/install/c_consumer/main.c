/* SPDX-License-Identifier: Apache-2.0 */
/* Links the installed factorllm::c: the version matches the installed header, an error path answers with its code
 * and message, and a tiny layer runs (exit status 0 on success). */
#include <stdio.h>
#include <string.h>

#include <factorllm/c/factorllm.h>

int main(void) {
  char expected[32];
  float gate[2 * 2] = {1, 0, 0, 1}, up[2 * 2] = {1, 0, 0, 1}, down[2 * 2] = {1, 0, 0, 1}, router[2 * 2] = {1, 0, 0, 1};
  float x[2] = {1, 2}, y[2] = {0, 0};
  fllm_dense_ffn d;
  fllm_gating const g = fllm_gating_default(1);
  fllm_moe* moe = NULL;
  snprintf(expected, sizeof expected, "%d.%d.%d", FLLM_C_VERSION_MAJOR, FLLM_C_VERSION_MINOR, FLLM_C_VERSION_PATCH);
  if (strcmp(fllm_version(), expected) != 0) {
    fprintf(stderr, "c_consumer: library version %s, header %s\n", fllm_version(), expected);
    return 1;
  }
  if (fllm_moe_load(NULL, 0, FLLM_F32, &moe) != FLLM_ERR_NULL_POINTER || strstr(fllm_last_error(), "path") == NULL) {
    fprintf(stderr, "c_consumer: the NULL path was not reported: %s\n", fllm_last_error());
    return 1;
  }
  d.dtype = FLLM_F32;
  d.d_model = 2;
  d.d_ff = 2;
  d.gate = gate;
  d.gate_row_stride = 2;
  d.up = up;
  d.up_row_stride = 2;
  d.down = down;
  d.down_row_stride = 2;
  if (fllm_moe_create_from_dense(&d, NULL, 2, router, 2, NULL, &g, FLLM_F32, &moe) != FLLM_OK ||
      fllm_moe_forward(moe, NULL, FLLM_F32, x, 2, y, 2, 1, NULL) != FLLM_OK) {
    fprintf(stderr, "c_consumer: %s\n", fllm_last_error());
    fllm_moe_destroy(moe);
    return 1;
  }
  /* Expert 1 (logit 2 > 1) alone, weight 1: y = (0, silu(2) * 2). */
  printf("factorllm C API %s: y = (%g, %g)\n", fllm_version(), (double)y[0], (double)y[1]);
  fllm_moe_destroy(moe);
  return y[0] == 0.0f && y[1] > 3.5f && y[1] < 3.6f ? 0 : 1;
}
