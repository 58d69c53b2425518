// SPDX-License-Identifier: Apache-2.0
// Must NOT compile: router_logits has no Cuda kernel, and Cuda falls back to nothing. The test that builds this
// file (tests/CMakeLists.txt: op_without_kernel_fails_to_compile) passes only when the compiler prints the op
// table's message naming the op.
#include <factorllm/backend/ops.hpp>
#include <factorllm/backend/scalar/router.hpp>

int main() {
  float x[4] = {1, 2, 3, 4}, w[8] = {}, b[2] = {}, z[4] = {};
  using namespace factorllm;
  kernel::RouterLogits<Cuda<80>>::run(matrix_view<float const>(x, 2, 2),
                                      RouterView<float>{matrix_view<float const>(w, 2, 2), vector_view<float const>(b, 2)},
                                      matrix_view(z, 2, 2));
}
