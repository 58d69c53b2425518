// SPDX-License-Identifier: Apache-2.0
// The bad-input contract (README "Reliability", table "Bad input"): one SECTION per row of the table, named after
// the row, that feeds the function each invalid input the row lists and checks the exception type.
#include <catch2/catch.hpp>

#include <factorllm/backend/dispatch.hpp>
#include <factorllm/factorllm.hpp>

#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include <unistd.h>

#include "reference/fixtures.hpp"
#include "reference/reference.hpp"

using namespace factorllm;
using ffn::ExpertPartition;
using io::Llama2cCheckpoint;
using io::Llama2cTokenizer;

namespace {

using Bytes = std::vector<unsigned char>;
constexpr std::ptrdiff_t kHuge = std::numeric_limits<std::ptrdiff_t>::max();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

void put_i32(Bytes& b, std::int32_t v) {
  std::uint32_t u;
  std::memcpy(&u, &v, 4);
  for (int i = 0; i < 4; ++i) b.push_back(static_cast<unsigned char>(u >> (8 * i)));
}
void put_f32(Bytes& b, float v) {
  std::int32_t i;
  std::memcpy(&i, &v, 4);
  put_i32(b, i);
}

/// A llama2.c header: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len.
using Header = std::array<std::int32_t, 7>;
constexpr Header kGoodHeader = {8, 16, 1, 2, 2, 4, 2};

/// Floats the legacy llama2.c layout stores after a (valid) header; written independently of the library.
std::int64_t payload_floats(Header const& h) {
  std::int64_t const d = h[0], hd = h[1], l = h[2], heads = h[3], kv_heads = h[4], v = h[5] < 0 ? -std::int64_t{h[5]} : h[5],
                     s = h[6];
  std::int64_t const head = d / heads, kv = head * kv_heads;
  std::int64_t n = v * d + l * (d + d * d + 2 * kv * d + d * d + d + 3 * hd * d) + d + s * head;
  if (h[5] < 0) n += v * d;
  return n;
}

/// Header + `n_floats` floats (the correct count when n_floats < 0).
Bytes checkpoint_bytes(Header const& h, std::int64_t n_floats = -1) {
  Bytes b;
  for (auto v : h) put_i32(b, v);
  if (n_floats < 0) n_floats = payload_floats(h);
  for (std::int64_t i = 0; i < n_floats; ++i) put_f32(b, 0.01f * static_cast<float>(i % 17));
  return b;
}

struct Piece {
  float score;
  std::string text;
};

Bytes tokenizer_bytes(std::int32_t max_len, std::vector<Piece> const& pieces) {
  Bytes b;
  put_i32(b, max_len);
  for (auto const& p : pieces) {
    put_f32(b, p.score);
    put_i32(b, static_cast<std::int32_t>(p.text.size()));
    b.insert(b.end(), p.text.begin(), p.text.end());
  }
  return b;
}

/// A small llama2.c-style vocab: <unk>, BOS, EOS, the 256 byte pieces, then a few merges.
std::vector<Piece> small_vocab() {
  std::vector<Piece> v = {{0.f, "<unk>"}, {0.f, "\n<s>\n"}, {0.f, "\n</s>\n"}};
  char const* hex = "0123456789ABCDEF";
  for (int b = 0; b < 256; ++b) v.push_back({0.f, std::string("<0x") + hex[b >> 4] + hex[b & 15] + ">"});
  for (char const* s : {" ", "a", "b", " a", "ab", " ab"}) v.push_back({static_cast<float>(std::strlen(s)), s});
  return v;
}

/// Writes bytes to a fresh file in the temp directory and removes it on scope exit.
class TempFile {
 public:
  explicit TempFile(Bytes const& bytes) {
    static std::atomic<int> counter{0};
    path_ = (std::filesystem::temp_directory_path() /
             ("fllm_bad_input_" + std::to_string(::getpid()) + "_" + std::to_string(counter++) + ".bin"))
                .string();
    std::ofstream(path_, std::ios::binary).write(reinterpret_cast<char const*>(bytes.data()),
                                                 static_cast<std::streamsize>(bytes.size()));
  }
  ~TempFile() {
    std::error_code ec;
    std::filesystem::remove(path_, ec);
  }
  TempFile(TempFile const&) = delete;
  TempFile& operator=(TempFile const&) = delete;
  std::string const& path() const { return path_; }

 private:
  std::string path_;
};

/// A backend tag that is never available (for dispatch's error row).
struct Unavailable : CpuScalar {
  static constexpr char const* name() noexcept { return "unavailable"; }
  static bool available() noexcept { return false; }
};

/// A valid little problem every MoE/PAR row starts from: d_model 8, d_ff 16, 4 experts, top_k 2.
struct Small {
  static constexpr int d = 8, d_ff = 16, n = 4;
  fixture::DenseWeights<float> w{ref::random_ffn(d, d_ff, 5)};
  ffn::ExpertWeights<float> experts = ffn::factorize(w.view(), ExpertPartition::contiguous(d_ff, n));
  moe::Router<float> router = moe::Router<float>::random(d, n, 6, 1.0);
  moe::Gating gating = [] {
    moe::Gating g;
    g.mode = moe::CombineMode::code_ref;
    g.top_k = 2;
    return g;
  }();
  Matrix<float> x = fixture::to_matrix<float>(ref::randn(3 * d, 7, 1.0), 3, d);
};

}  // namespace

// ---------------------------------------------------------------------------------------------------- core ----

TEST_CASE("bad input: core types", "[bad_input][core]") {
  float data[16] = {};

  SECTION("TensorView(data, extents[, strides]), matrix_view, vector_view") {
    CHECK_THROWS_AS(matrix_view(data, -1, 4), shape_error);                       // negative extent
    CHECK_THROWS_AS(vector_view(data, -3), shape_error);
    CHECK_THROWS_AS(matrix_view<float>(nullptr, 2, 2), shape_error);              // null data, non-empty
    CHECK_THROWS_AS((TensorView<float, 2>(data, {2, 2}, {2, 2})), shape_error);  // last stride != 1
    CHECK_THROWS_AS(matrix_view(data, 3, 4, 3), shape_error);                     // rows overlap
    CHECK_THROWS_AS((TensorView<float, 3>(data, {2, 2, 2}, {-4, 2, 1})), shape_error);  // negative stride
    CHECK_THROWS_AS((TensorView<float, 3>(data, {2, 1, 4}, {-3, -5, 1})), shape_error);
    // Element counts or offsets past ptrdiff_t (found by fuzz_api: they were signed-overflow UB).
    CHECK_THROWS_AS((TensorView<float, 2>(data, {kHuge / 2, 4})), shape_error);
    CHECK_THROWS_AS((TensorView<float, 3>(data, {std::ptrdiff_t{1} << 40, std::ptrdiff_t{1} << 40, 1})), shape_error);
    CHECK_THROWS_AS(matrix_view(data, 3, 4, kHuge / 2), shape_error);
    CHECK_THROWS_AS((TensorView<float, 2>(data, {2, kHuge}, {kHuge, 1})), shape_error);
    CHECK_NOTHROW(matrix_view<float>(nullptr, 0, kHuge));                         // empty views may be null
    CHECK(matrix_view<float>(nullptr, 0, kHuge).size() == 0);
    // Empty views too: row() and operator[] offsets of in-range indices, and the non-zero extents' product.
    CHECK_THROWS_AS((TensorView<float, 3>(nullptr, {std::ptrdiff_t{1} << 40, std::ptrdiff_t{1} << 40, 0})), shape_error);
    CHECK_THROWS_AS((TensorView<float, 2>(data, {3, 0}, {kHuge, 1})), shape_error);
    CHECK((TensorView<float, 2>(data, {1, 0}, {kHuge, 1})).slice_rows(1, 1).data() == data);
    // A null empty view hands out null rows and sub-views (offsetting null was undefined behaviour).
    TensorView<float, 2> const null_rows(nullptr, {3, 0}, {5, 1});
    CHECK(null_rows.row(2) == nullptr);
    CHECK(null_rows.slice_rows(1, 3).data() == nullptr);
    CHECK((TensorView<float, 3>(nullptr, {3, 2, 0}, {7, 3, 1}))[2].data() == nullptr);
  }

  SECTION("TensorView::slice_rows") {
    auto const v = matrix_view(data, 4, 4);
    CHECK_THROWS_AS(v.slice_rows(-1, 2), shape_error);
    CHECK_THROWS_AS(v.slice_rows(3, 2), shape_error);
    CHECK_THROWS_AS(v.slice_rows(0, 5), shape_error);
    CHECK(v.slice_rows(4, 4).rows() == 0);
  }

  SECTION("Tensor(extents), Tensor(view), Tensor::copy_from") {
    CHECK_THROWS_AS((Tensor<float, 2>({-1, 3})), shape_error);
    CHECK_THROWS_AS((Tensor<float, 3>({kHuge, kHuge, 4})), value_error);  // count overflows: nothing allocated
    CHECK_THROWS_AS((Tensor<float, 2>({kHuge / 2, 2})), value_error);      // count fits, bytes overflow size_t
    // Empty, but its views would index with the product of the other extents: refused as well.
    CHECK_THROWS_AS((Tensor<float, 3>({0, kHuge, 4})), value_error);
    CHECK_NOTHROW((Tensor<float, 2>({0, kHuge})));
    CHECK((Tensor<float, 2>({0, kHuge})).view().size() == 0);
    // Copying an empty view with a huge outer extent is immediate (it used to walk every empty row).
    Tensor<float, 2> const empty_copy(TensorView<float const, 2>(nullptr, {kHuge, 0}));
    CHECK(empty_copy.size() == 0);
    Matrix<float> m({2, 4});
    CHECK_THROWS_AS(m.copy_from(matrix_view<float const>(data, 4, 2)), shape_error);
    Matrix<float> const copy(matrix_view<float const>(data, 2, 3, 5));  // strided source: copied dense
    CHECK(copy.extent(1) == 3);
  }

  SECTION("Workspace(bytes), Workspace::reserve") {
    Workspace none;
    CHECK(none.bytes() == 0);
    Workspace ws(100);
    CHECK(ws.bytes() == 100);
    ws.reserve(50);  // never shrinks
    CHECK(ws.bytes() == 100);
    ws.reserve(1000);
    CHECK(ws.bytes() == 1000);
    CHECK(reinterpret_cast<std::uintptr_t>(ws.data()) % kAlignment == 0);
  }

  SECTION("Workspace cursor (detail::WorkspaceCursor::take, detail::WorkspaceLayout::add)") {
    Workspace ws(128);
    detail::WorkspaceCursor cursor(ws, "test");
    CHECK_NOTHROW(cursor.take<float>(16));
    CHECK_THROWS_AS(cursor.take<double>(9), backend_error);
    // A count whose byte size wraps around size_t must not come back as a small region.
    detail::WorkspaceCursor c2(ws, "test");
    CHECK_THROWS_AS(c2.take<double>(std::numeric_limits<std::size_t>::max() / 4), backend_error);
    CHECK_THROWS_AS(c2.take<float>(std::numeric_limits<std::size_t>::max()), backend_error);
    Workspace empty;
    detail::WorkspaceCursor c3(empty, "test");
    CHECK_THROWS_AS(c3.take<float>(1), backend_error);
    CHECK_THROWS_AS(detail::WorkspaceLayout().add(8, std::numeric_limits<std::size_t>::max() / 4), value_error);
    CHECK_THROWS_AS(detail::WorkspaceLayout()
                        .add(1, std::numeric_limits<std::size_t>::max() / 2)
                        .add(1, std::numeric_limits<std::size_t>::max() / 2),
                    value_error);
  }

  SECTION("dispatch") {
    CHECK_THROWS_AS(dispatch(BackendList<Unavailable>{}, [](auto) { return 0; }), backend_error);
    CHECK(dispatch(BackendList<Unavailable, CpuScalar>{}, [](auto b) { return std::string(decltype(b)::name()); }) ==
          "cpu_scalar");
  }
}

// ----------------------------------------------------------------------------------------------------- ffn ----

TEST_CASE("bad input: partitions, factorization, dense SwiGLU", "[bad_input][ffn]") {
  SECTION("ExpertPartition::contiguous, ExpertPartition::random") {
    CHECK_THROWS_AS(ExpertPartition::contiguous(16, 0), value_error);
    CHECK_THROWS_AS(ExpertPartition::contiguous(16, -2), value_error);
    CHECK_THROWS_AS(ExpertPartition::contiguous(0, 1), value_error);
    CHECK_THROWS_AS(ExpertPartition::contiguous(-16, 4), value_error);
    CHECK_THROWS_AS(ExpertPartition::contiguous(18, 4), value_error);
    CHECK_THROWS_AS(ExpertPartition::contiguous(std::int64_t{1} << 32, 4), value_error);  // > int32 index range
    CHECK_THROWS_AS(ExpertPartition::random(16, 0, 1), value_error);
    CHECK_THROWS_AS(ExpertPartition::random(18, 4, 1), value_error);
    CHECK_THROWS_AS(ExpertPartition::random(std::int64_t{1} << 32, 4, 1), value_error);
  }

  SECTION("ExpertPartition::from_permutation") {
    CHECK_THROWS_AS(ExpertPartition::from_permutation({}, 1), value_error);
    CHECK_THROWS_AS(ExpertPartition::from_permutation({0, 1, 2, 3}, 0), value_error);
    CHECK_THROWS_AS(ExpertPartition::from_permutation({0, 1, 2}, 2), value_error);      // not divisible
    CHECK_THROWS_AS(ExpertPartition::from_permutation({0, 1, 2, 4}, 2), value_error);   // out of range
    CHECK_THROWS_AS(ExpertPartition::from_permutation({0, 1, 2, -1}, 2), value_error);  // negative
    CHECK_THROWS_AS(ExpertPartition::from_permutation({0, 1, 1, 3}, 2), value_error);   // repeated
  }

  SECTION("ExpertPartition::from_assignment") {
    CHECK_THROWS_AS(ExpertPartition::from_assignment({}, 1), value_error);
    CHECK_THROWS_AS(ExpertPartition::from_assignment({0, 0, 1, 1}, 0), value_error);
    CHECK_THROWS_AS(ExpertPartition::from_assignment({0, 0, 1, 2}, 2), value_error);   // out of range
    CHECK_THROWS_AS(ExpertPartition::from_assignment({0, 0, 1, -1}, 2), value_error);  // negative
    CHECK_THROWS_AS(ExpertPartition::from_assignment({0, 0, 0, 1}, 2), value_error);   // unbalanced
    CHECK_THROWS_AS(ExpertPartition::from_assignment({0, 0, 1}, 2), value_error);      // not divisible
  }

  fixture::DenseWeights<float> w(ref::random_ffn(8, 16, 3));

  SECTION("ExpertWeights(gate, up, down, partition), ExpertWeights::gate/up/down/expert") {
    auto const p = ExpertPartition::contiguous(16, 4);
    using T3 = Tensor<float, 3>;
    CHECK_THROWS_AS(ffn::ExpertWeights<float>(T3({4, 4, 0}), T3({4, 4, 0}), T3({4, 0, 4}), p), shape_error);  // d_model 0
    CHECK_THROWS_AS(ffn::ExpertWeights<float>(T3({3, 4, 8}), T3({4, 4, 8}), T3({4, 8, 4}), p), shape_error);
    CHECK_THROWS_AS(ffn::ExpertWeights<float>(T3({4, 4, 8}), T3({4, 4, 7}), T3({4, 8, 4}), p), shape_error);
    CHECK_THROWS_AS(ffn::ExpertWeights<float>(T3({4, 4, 8}), T3({4, 4, 8}), T3({4, 4, 8}), p), shape_error);
    ffn::ExpertWeights<float> const ok(T3({4, 4, 8}), T3({4, 4, 8}), T3({4, 8, 4}), p);
    CHECK_THROWS_AS(ok.gate(4), value_error);
    CHECK_THROWS_AS(ok.up(-1), value_error);
    CHECK_THROWS_AS(ok.down(4), value_error);
    CHECK_THROWS_AS(ok.expert(-1), value_error);
    ffn::ExpertWeights<float> const empty;  // default-constructed: no experts (was an assertion failure)
    CHECK_THROWS_AS(empty.gate(0), value_error);
  }

  SECTION("factorize") {
    auto const v = w.view();
    CHECK_THROWS_AS(ffn::factorize(v, ExpertPartition::contiguous(32, 4)), shape_error);  // d_ff mismatch
    ffn::DenseFfnView<float> bad_up{v.gate, v.up.slice_rows(0, 8), v.down};
    CHECK_THROWS_AS(ffn::factorize(bad_up, ExpertPartition::contiguous(16, 4)), shape_error);
    ffn::DenseFfnView<float> bad_down{v.gate, v.up, v.down.slice_rows(0, 4)};
    CHECK_THROWS_AS(ffn::factorize(bad_down, ExpertPartition::contiguous(16, 4)), shape_error);
    ffn::DenseFfnView<float> empty{};
    CHECK_THROWS_AS(ffn::factorize(empty, ExpertPartition::contiguous(16, 4)), shape_error);
  }

  SECTION("unfactorize") {
    CHECK_THROWS_AS(ffn::unfactorize(ffn::ExpertWeights<float>{}), value_error);
    auto const dense = ffn::unfactorize(ffn::factorize(w.view(), ExpertPartition::random(16, 4, 9)));
    CHECK(std::memcmp(dense.gate.data(), w.gate.data(), sizeof(float) * 16 * 8) == 0);
  }

  SECTION("swiglu_workspace_bytes") {
    CHECK_THROWS_AS(ffn::swiglu_workspace_bytes(-1, 8, 16), value_error);
    CHECK_THROWS_AS(ffn::swiglu_workspace_bytes(1, 0, 16), value_error);
    CHECK_THROWS_AS(ffn::swiglu_workspace_bytes(1, 8, 0, CpuSimd<>{}), value_error);
    CHECK_THROWS_AS(ffn::swiglu_workspace_bytes(-1, 8, 16, CpuSimd<>{}), value_error);  // used to wrap around
    CHECK_THROWS_AS(ffn::swiglu_workspace_bytes(kHuge / 2, 8, 16, CpuSimd<>{}), value_error);
    CHECK_THROWS_AS(ffn::swiglu_workspace_bytes(1 << 20, kHuge / 4, 16), value_error);
    CHECK(ffn::swiglu_workspace_bytes(0, 8, 16, CpuSimd<>{}) > 0);
  }

  SECTION("swiglu_forward") {
    Matrix<float> x({3, 8}), y({3, 8}), bad({3, 9});
    CHECK_THROWS_AS(ffn::swiglu_forward(w.view(), bad.cview(), y.view()), shape_error);
    CHECK_THROWS_AS(ffn::swiglu_forward(w.view(), x.cview(), bad.view()), shape_error);
    Matrix<float> y_short({2, 8});
    CHECK_THROWS_AS(ffn::swiglu_forward(w.view(), x.cview(), y_short.view()), shape_error);
    ffn::DenseFfnView<float> bad_ffn{w.view().gate, w.view().up.slice_rows(0, 4), w.view().down};
    CHECK_THROWS_AS(ffn::swiglu_forward(bad_ffn, x.cview(), y.view()), shape_error);
    CHECK_THROWS_AS(ffn::swiglu_forward(ffn::DenseFfnView<float>{}, x.cview(), y.view(), CpuSimd<>{}), shape_error);
    Workspace tiny(8);
    CHECK_THROWS_AS(ffn::swiglu_forward(w.view(), x.cview(), y.view(), tiny), backend_error);
    CHECK_THROWS_AS(ffn::swiglu_forward(w.view(), x.cview(), y.view(), tiny, CpuSimd<>{}), backend_error);
    // CpuSimd needs dense weight rows: a padded view of the same values is refused, not misread.
    Matrix<float> padded({16, 10});
    ffn::DenseFfnView<float> strided{matrix_view<float const>(padded.data(), 16, 8, 10), w.view().up, w.view().down};
    CHECK_THROWS_AS(ffn::swiglu_forward(strided, x.cview(), y.view(), CpuSimd<>{}), backend_error);
    CHECK_NOTHROW(ffn::swiglu_forward(strided, x.cview(), y.view(), CpuScalar{}));
  }
}

// ----------------------------------------------------------------------------------------------------- moe ----

TEST_CASE("bad input: routing, dispatch, combine, MoeFfn", "[bad_input][moe]") {
  Small s;

  SECTION("Router(weight, bias), Router::from_views") {
    CHECK_THROWS_AS(moe::Router<float>(Matrix<float>({0, 8}), Vector<float>({0})), shape_error);
    CHECK_THROWS_AS(moe::Router<float>(Matrix<float>({4, 0}), Vector<float>({4})), shape_error);
    CHECK_THROWS_AS(moe::Router<float>(Matrix<float>({4, 8}), Vector<float>({3})), shape_error);
    Matrix<float> const wm({4, 8});
    Vector<float> const bv({5});
    CHECK_THROWS_AS(moe::Router<float>::from_views(wm.cview(), bv.cview()), shape_error);
  }

  SECTION("Router::random") {
    CHECK_THROWS_AS(moe::Router<float>::random(0, 4, 1), value_error);
    CHECK_THROWS_AS(moe::Router<float>::random(8, 0, 1), value_error);
    CHECK_THROWS_AS(moe::Router<float>::random(8, 4, 1, -1.0), value_error);
    CHECK_THROWS_AS(moe::Router<float>::random(8, 4, 1, std::nan("")), value_error);
    CHECK_THROWS_AS(moe::Router<float>::random(8, 4, 1, HUGE_VAL), value_error);  // was accepted: Inf weights
  }

  SECTION("router_logits") {
    Matrix<float> logits({3, 4}), bad_x({3, 7}), bad_logits({3, 5}), short_logits({2, 4});
    CHECK_THROWS_AS(moe::router_logits(s.router, bad_x.cview(), logits.view()), shape_error);
    CHECK_THROWS_AS(moe::router_logits(s.router, s.x.cview(), bad_logits.view()), shape_error);
    CHECK_THROWS_AS(moe::router_logits(s.router, s.x.cview(), short_logits.view(), CpuSimd<>{}), shape_error);
  }

  SECTION("Gating::validate, combine_mode_from_string") {
    moe::Gating g;
    g.top_k = 0;
    CHECK_THROWS_AS(g.validate(4, "test"), value_error);
    g.top_k = 5;
    CHECK_THROWS_AS(g.validate(4, "test"), value_error);
    g.top_k = 1;
    CHECK_THROWS_AS(g.validate(0, "test"), value_error);
    g.selection_bias = {0.f, 0.f, 0.f};
    CHECK_THROWS_AS(g.validate(4, "test"), shape_error);
    g.selection_bias = {0.f, kNaN, 0.f, 0.f};
    CHECK_THROWS_AS(g.validate(4, "test"), value_error);
    g.selection_bias = {0.f, 0.f, -kInf, 0.f};
    CHECK_THROWS_AS(g.validate(4, "test"), value_error);
    g.selection_bias.clear();
    g.output_scale = kInf;
    CHECK_THROWS_AS(g.validate(4, "test"), value_error);
    g.output_scale = kNaN;
    CHECK_THROWS_AS(g.validate(4, "test"), value_error);
    CHECK_THROWS_AS(moe::combine_mode_from_string("softmax"), value_error);
    CHECK_THROWS_AS(moe::combine_mode_from_string(""), value_error);
    CHECK(moe::combine_mode_from_string("topk_softmax") == moe::CombineMode::topk_softmax);
  }

  SECTION("select_experts") {
    Matrix<float> logits({3, 4});
    Matrix<std::int32_t> ids({3, 2});
    Matrix<float> weights({3, 2});
    moe::Gating g = s.gating;
    g.top_k = 5;
    CHECK_THROWS_AS(moe::select_experts(logits.cview(), g, ids.view(), weights.view()), value_error);
    Matrix<std::int32_t> bad_ids({3, 1});
    CHECK_THROWS_AS(moe::select_experts(logits.cview(), s.gating, bad_ids.view(), weights.view()), shape_error);
    Matrix<float> bad_weights({2, 2});
    CHECK_THROWS_AS(moe::select_experts(logits.cview(), s.gating, ids.view(), bad_weights.view()), shape_error);
    Matrix<float> no_experts({3, 0});
    CHECK_THROWS_AS(moe::select_experts(no_experts.cview(), s.gating, ids.view(), weights.view()), value_error);
  }

  SECTION("topk") {
    Matrix<float> scores({3, 4});
    Matrix<std::int32_t> ids({3, 2});
    CHECK_THROWS_AS(moe::topk(scores.cview(), 0, ids.view()), value_error);
    CHECK_THROWS_AS(moe::topk(scores.cview(), 5, ids.view()), value_error);
    CHECK_THROWS_AS(moe::topk(scores.cview(), 3, ids.view()), shape_error);
  }

  SECTION("group_by_expert") {
    Matrix<std::int32_t> ids({3, 2});
    Vector<std::int64_t> offsets({5});
    Vector<std::int32_t> slots({6});
    CHECK_THROWS_AS(moe::group_by_expert(ids.cview(), 0, offsets.view(), slots.view()), value_error);
    Vector<std::int64_t> bad_offsets({4});
    CHECK_THROWS_AS(moe::group_by_expert(ids.cview(), 4, bad_offsets.view(), slots.view()), shape_error);
    Vector<std::int32_t> bad_slots({5});
    CHECK_THROWS_AS(moe::group_by_expert(ids.cview(), 4, offsets.view(), bad_slots.view()), shape_error);
    ids(1, 1) = 4;
    CHECK_THROWS_AS(moe::group_by_expert(ids.cview(), 4, offsets.view(), slots.view()), value_error);
    ids(1, 1) = -1;
    CHECK_THROWS_AS(moe::group_by_expert(ids.cview(), 4, offsets.view(), slots.view()), value_error);
  }

  SECTION("combine") {
    Matrix<float> weights({3, 2}), out({6, 8}), y({3, 8});
    Matrix<float> bad_out({5, 8}), bad_out_cols({6, 7}), bad_y({2, 8});
    CHECK_THROWS_AS(moe::combine(weights.cview(), bad_out.cview(), y.view()), shape_error);
    CHECK_THROWS_AS(moe::combine(weights.cview(), bad_out_cols.cview(), y.view()), shape_error);
    CHECK_THROWS_AS(moe::combine(weights.cview(), out.cview(), bad_y.view()), shape_error);
  }

  SECTION("MoeFfn(experts, router, gating)") {
    CHECK_THROWS_AS((moe::MoeFfn<float, CpuScalar>(s.experts, moe::Router<float>::random(8, 3, 1), s.gating)), shape_error);
    CHECK_THROWS_AS((moe::MoeFfn<float, CpuScalar>(s.experts, moe::Router<float>::random(9, 4, 1), s.gating)), shape_error);
    CHECK_THROWS_AS((moe::MoeFfn<float, CpuScalar>(s.experts, moe::Router<float>{}, s.gating)), shape_error);
    CHECK_THROWS_AS((moe::MoeFfn<float, CpuScalar>(ffn::ExpertWeights<float>{}, s.router, s.gating)), shape_error);
    moe::Gating g = s.gating;
    g.top_k = 5;
    CHECK_THROWS_AS((moe::MoeFfn<float, CpuSimd<>>(s.experts, s.router, g)), value_error);
    g.top_k = 2;
    g.selection_bias = {1.f};
    CHECK_THROWS_AS((moe::MoeFfn<float, CpuScalar>(s.experts, s.router, g)), shape_error);
  }

  SECTION("MoeFfn::workspace_bytes") {
    moe::MoeFfn<float, CpuScalar> const scalar(s.experts, s.router, s.gating);
    moe::MoeFfn<float, CpuSimd<>> const simd(s.experts, s.router, s.gating);
    CHECK_THROWS_AS(scalar.workspace_bytes(-1), value_error);
    CHECK_THROWS_AS(simd.workspace_bytes(-1), value_error);
    CHECK_THROWS_AS(scalar.workspace_bytes(kHuge / 8), value_error);  // used to wrap around to a small size
    CHECK_THROWS_AS(simd.workspace_bytes(kHuge / 8), value_error);
    CHECK(simd.workspace_bytes(0) > 0);
  }

  SECTION("MoeFfn::forward") {
    moe::MoeFfn<float, CpuScalar> const scalar(s.experts, s.router, s.gating);
    moe::MoeFfn<float, CpuSimd<>> const simd(s.experts, s.router, s.gating);
    Matrix<float> y({3, 8}), bad_x({3, 9}), bad_y({2, 8});
    CHECK_THROWS_AS(scalar.forward(bad_x.cview(), y.view()), shape_error);
    CHECK_THROWS_AS(simd.forward(bad_x.cview(), y.view()), shape_error);
    CHECK_THROWS_AS(scalar.forward(s.x.cview(), bad_y.view()), shape_error);
    Workspace small(scalar.workspace_bytes(2)), simd_small(simd.workspace_bytes(2)), none;
    CHECK_THROWS_AS(scalar.forward(s.x.cview(), y.view(), small), backend_error);
    CHECK_THROWS_AS(simd.forward(s.x.cview(), y.view(), simd_small), backend_error);
    CHECK_THROWS_AS(simd.forward(s.x.cview(), y.view(), none), backend_error);
  }
}

// --------------------------------------------------------------------------------------------------- train ----

TEST_CASE("bad input: PAR loss", "[bad_input][train]") {
  Small s;

  SECTION("par_loss_workspace_bytes") {
    CHECK_THROWS_AS(train::par_loss_workspace_bytes(0, 16, 4, 2), value_error);
    CHECK_THROWS_AS(train::par_loss_workspace_bytes(8, -16, 4, 2), value_error);
    CHECK_THROWS_AS(train::par_loss_workspace_bytes(8, 16, 0, 1), value_error);
    CHECK_THROWS_AS(train::par_loss_workspace_bytes(8, 16, 4, 0), value_error);
    CHECK_THROWS_AS(train::par_loss_workspace_bytes(8, 16, 4, 5), value_error);
    CHECK_THROWS_AS(train::par_loss_workspace_bytes(kHuge / 2, 16, kHuge / 2, 2), value_error);  // used to wrap
    CHECK(train::par_loss_workspace_bytes(8, 16, 4, 2) > 0);
  }

  SECTION("par_loss") {
    auto const dense = s.w.view();
    Matrix<float> no_tokens({0, 8}), bad_x({3, 9});
    CHECK_THROWS_AS(train::par_loss(no_tokens.cview(), dense, s.experts, s.router, 2), value_error);
    CHECK_THROWS_AS(train::par_loss(bad_x.cview(), dense, s.experts, s.router, 2), shape_error);
    CHECK_THROWS_AS(train::par_loss(s.x.cview(), dense, s.experts, s.router, 0), value_error);
    CHECK_THROWS_AS(train::par_loss(s.x.cview(), dense, s.experts, s.router, 5), value_error);
    CHECK_THROWS_AS(train::par_loss(s.x.cview(), dense, s.experts, moe::Router<float>::random(8, 3, 1), 2), shape_error);
    fixture::DenseWeights<float> other(ref::random_ffn(8, 32, 1));
    CHECK_THROWS_AS(train::par_loss(s.x.cview(), other.view(), s.experts, s.router, 2), shape_error);
    ffn::DenseFfnView<float> bad_dense{dense.gate, dense.up.slice_rows(0, 8), dense.down};
    CHECK_THROWS_AS(train::par_loss(s.x.cview(), bad_dense, s.experts, s.router, 2), shape_error);
    for (double clip : {0.0, 0.5, -1.0, std::nan("")}) {
      train::ParLossConfig c;
      c.clip = clip;
      CHECK_THROWS_AS(train::par_loss(s.x.cview(), dense, s.experts, s.router, 2, c), value_error);
    }
    train::ParLossConfig c;
    c.par_weight = HUGE_VAL;
    CHECK_THROWS_AS(train::par_loss(s.x.cview(), dense, s.experts, s.router, 2, c), value_error);
    c = {};
    c.balance_weight = std::nan("");
    CHECK_THROWS_AS(train::par_loss(s.x.cview(), dense, s.experts, s.router, 2, c), value_error);
    train::ParLossResult<float> out;
    Workspace tiny(16);
    CHECK_THROWS_AS(train::par_loss(s.x.cview(), dense, s.experts, s.router, 2, train::ParLossConfig{}, out, tiny),
                    backend_error);
  }
}

// ------------------------------------------------------------------------------------------------------ io ----

TEST_CASE("bad input: llama2.c checkpoint", "[bad_input][io]") {
  SECTION("Llama2cCheckpoint::parse") {
    auto const good = checkpoint_bytes(kGoodHeader);
    CHECK_NOTHROW(Llama2cCheckpoint::parse(good.data(), good.size()));
    CHECK_THROWS_AS(Llama2cCheckpoint::parse(nullptr, 28), format_error);
    CHECK_THROWS_AS(Llama2cCheckpoint::parse(nullptr, 0), format_error);
    CHECK_THROWS_AS(Llama2cCheckpoint::parse(good.data(), 27), format_error);              // short header
    CHECK_THROWS_AS(Llama2cCheckpoint::parse(good.data(), good.size() - 1), format_error);  // truncated
    Bytes trailing = good;
    trailing.push_back(0);
    CHECK_THROWS_AS(Llama2cCheckpoint::parse(trailing.data(), trailing.size()), format_error);
    for (int field : {0, 1, 2, 3, 4, 6}) {  // every field except vocab_size must be > 0
      for (std::int32_t v : {0, -1, std::numeric_limits<std::int32_t>::min()}) {
        Header h = kGoodHeader;
        h[static_cast<std::size_t>(field)] = v;
        auto const b = checkpoint_bytes(h, 0);
        INFO("field " << field << " = " << v);
        CHECK_THROWS_AS(Llama2cCheckpoint::parse(b.data(), b.size()), format_error);
      }
    }
    for (std::int32_t v : {0, std::numeric_limits<std::int32_t>::min()}) {
      Header h = kGoodHeader;
      h[5] = v;
      auto const b = checkpoint_bytes(h, 0);
      CHECK_THROWS_AS(Llama2cCheckpoint::parse(b.data(), b.size()), format_error);
    }
    Header h = kGoodHeader;
    h[3] = 3;  // dim 8 not divisible by n_heads 3
    auto b = checkpoint_bytes(h, 0);
    CHECK_THROWS_AS(Llama2cCheckpoint::parse(b.data(), b.size()), format_error);
    h = kGoodHeader;
    h[4] = 3;  // n_heads 2 not divisible by n_kv_heads 3
    b = checkpoint_bytes(h, 0);
    CHECK_THROWS_AS(Llama2cCheckpoint::parse(b.data(), b.size()), format_error);
    h = kGoodHeader;
    h[0] = 6;
    h[3] = 2;  // head size 3: odd
    b = checkpoint_bytes(h, 0);
    CHECK_THROWS_AS(Llama2cCheckpoint::parse(b.data(), b.size()), format_error);
    h = {1 << 30, 1 << 30, 1 << 30, 2, 2, 1 << 30, 1 << 30};  // sizes overflow int64: refused before allocating
    b = checkpoint_bytes(h, 0);
    CHECK_THROWS_AS(Llama2cCheckpoint::parse(b.data(), b.size()), format_error);
    h = {1 << 20, 1 << 20, 1, 2, 2, 1 << 20, 1};  // a 2^42-float model claimed by a 28-byte buffer
    b = checkpoint_bytes(h, 0);
    CHECK_THROWS_AS(Llama2cCheckpoint::parse(b.data(), b.size()), format_error);
    h = kGoodHeader;
    h[5] = -4;  // unshared classifier: needs the wcls floats too
    b = checkpoint_bytes(h, payload_floats(kGoodHeader));
    CHECK_THROWS_AS(Llama2cCheckpoint::parse(b.data(), b.size()), format_error);
    b = checkpoint_bytes(h);
    CHECK_NOTHROW(Llama2cCheckpoint::parse(b.data(), b.size()));
  }

  SECTION("Llama2cCheckpoint::load") {
    CHECK_THROWS_AS(Llama2cCheckpoint::load("/nonexistent/factorllm/model.bin"), format_error);
    CHECK_THROWS_AS(Llama2cCheckpoint::load(std::filesystem::temp_directory_path().string()), format_error);  // a dir
    TempFile truncated(checkpoint_bytes(kGoodHeader, 10));
    CHECK_THROWS_AS(Llama2cCheckpoint::load(truncated.path()), format_error);
    TempFile empty(Bytes{});
    CHECK_THROWS_AS(Llama2cCheckpoint::load(empty.path()), format_error);
    Header h = {1 << 20, 1 << 20, 1, 2, 2, 1 << 20, 1};
    TempFile liar(checkpoint_bytes(h, 0));
    CHECK_THROWS_AS(Llama2cCheckpoint::load(liar.path()), format_error);
    TempFile good(checkpoint_bytes(kGoodHeader));
    CHECK(Llama2cCheckpoint::load(good.path()).config().dim == 8);
  }

  SECTION("Llama2cCheckpoint accessors (token_embedding ... ffn(l))") {
    auto const b = checkpoint_bytes(kGoodHeader);
    auto const c = Llama2cCheckpoint::parse(b.data(), b.size());
    for (int l : {-1, 1, std::numeric_limits<int>::min(), std::numeric_limits<int>::max()}) {
      INFO("layer " << l);
      CHECK_THROWS_AS(c.rms_att(l), value_error);
      CHECK_THROWS_AS(c.wq(l), value_error);
      CHECK_THROWS_AS(c.wk(l), value_error);
      CHECK_THROWS_AS(c.wv(l), value_error);
      CHECK_THROWS_AS(c.wo(l), value_error);
      CHECK_THROWS_AS(c.rms_ffn(l), value_error);
      CHECK_THROWS_AS(c.w1(l), value_error);
      CHECK_THROWS_AS(c.w2(l), value_error);
      CHECK_THROWS_AS(c.w3(l), value_error);
      CHECK_THROWS_AS(c.ffn(l), value_error);
    }
    CHECK(c.token_embedding().rows() == 4);
    CHECK(c.classifier().data() == c.token_embedding().data());
    CHECK(c.rms_final().extent(0) == 8);
    CHECK(c.ffn(0).d_ff() == 16);
  }
}

TEST_CASE("bad input: llama2.c tokenizer", "[bad_input][io]") {
  auto const vocab = small_vocab();
  int const n = static_cast<int>(vocab.size());
  auto const good = tokenizer_bytes(8, vocab);

  SECTION("Llama2cTokenizer::parse") {
    CHECK_NOTHROW(Llama2cTokenizer::parse(good.data(), good.size(), n));
    CHECK_THROWS_AS(Llama2cTokenizer::parse(good.data(), good.size(), 0), value_error);
    CHECK_THROWS_AS(Llama2cTokenizer::parse(good.data(), good.size(), -5), value_error);
    CHECK_THROWS_AS(Llama2cTokenizer::parse(nullptr, 100, n), format_error);
    CHECK_THROWS_AS(Llama2cTokenizer::parse(nullptr, 0, n), format_error);
    CHECK_THROWS_AS(Llama2cTokenizer::parse(good.data(), good.size(), n + 1), format_error);  // truncated
    CHECK_THROWS_AS(Llama2cTokenizer::parse(good.data(), good.size(), n - 1), format_error);  // trailing bytes
    CHECK_THROWS_AS(Llama2cTokenizer::parse(good.data(), good.size() - 1, n), format_error);
    CHECK_THROWS_AS(Llama2cTokenizer::parse(good.data(), 11, 1), format_error);  // less than 4 + 8 bytes
    // vocab_size so large that 8 bytes per token exceed the buffer: refused before reserving anything.
    CHECK_THROWS_AS(Llama2cTokenizer::parse(good.data(), good.size(), std::numeric_limits<int>::max()), format_error);
    for (std::int32_t max_len : {0, -1}) {
      auto const b = tokenizer_bytes(max_len, vocab);
      CHECK_THROWS_AS(Llama2cTokenizer::parse(b.data(), b.size(), n), format_error);
    }
    auto const too_long = tokenizer_bytes(5, vocab);  // EOS "\n</s>\n" has 6 bytes > max_token_length 5
    CHECK_THROWS_AS(Llama2cTokenizer::parse(too_long.data(), too_long.size(), n), format_error);
    auto nan_score = vocab;
    nan_score[3].score = kNaN;
    auto b = tokenizer_bytes(8, nan_score);
    CHECK_THROWS_AS(Llama2cTokenizer::parse(b.data(), b.size(), n), format_error);
    b = good;
    std::int32_t const negative = -1;  // token 0's length field
    std::memcpy(b.data() + 8, &negative, 4);
    CHECK_THROWS_AS(Llama2cTokenizer::parse(b.data(), b.size(), n), format_error);
    b = good;
    std::int32_t const past_end = 1 << 30;
    std::memcpy(b.data() + 8, &past_end, 4);
    CHECK_THROWS_AS(Llama2cTokenizer::parse(b.data(), b.size(), n), format_error);
  }

  SECTION("Llama2cTokenizer::load") {
    CHECK_THROWS_AS(Llama2cTokenizer::load("/nonexistent/factorllm/tok.bin", n), format_error);
    CHECK_THROWS_AS(Llama2cTokenizer::load(std::filesystem::temp_directory_path().string(), n), format_error);
    TempFile file(good);
    CHECK_THROWS_AS(Llama2cTokenizer::load(file.path(), 0), value_error);
    CHECK_THROWS_AS(Llama2cTokenizer::load(file.path(), n + 1), format_error);
    CHECK_THROWS_AS(Llama2cTokenizer::load(file.path(), n - 1), format_error);
    CHECK_THROWS_AS(Llama2cTokenizer::load(file.path(), std::numeric_limits<int>::max()), format_error);
    Bytes head_only;
    put_i32(head_only, 0);
    for (int i = 0; i < 2 * n; ++i) put_i32(head_only, 0);
    TempFile bad_max_len(head_only);
    CHECK_THROWS_AS(Llama2cTokenizer::load(bad_max_len.path(), n), format_error);
    CHECK(Llama2cTokenizer::load(file.path(), n).vocab_size() == n);
  }

  auto const tok = Llama2cTokenizer::parse(good.data(), good.size(), n);

  SECTION("Llama2cTokenizer::piece, score, find, decode") {
    CHECK_THROWS_AS(tok.piece(-1), value_error);
    CHECK_THROWS_AS(tok.piece(n), value_error);
    CHECK_THROWS_AS(tok.score(n), value_error);
    CHECK_THROWS_AS(tok.decode(1, n), value_error);
    CHECK_THROWS_AS(tok.decode(1, -7), value_error);
    CHECK_THROWS_AS(tok.decode(std::vector<int>{1, 5, n + 3}), value_error);
    CHECK(tok.decode(std::numeric_limits<int>::min(), 5) == std::string(1, '\x02'));  // prev is only compared with BOS
    CHECK(tok.find("not a piece") == -1);
    CHECK(tok.find("") == -1);
  }

  SECTION("Llama2cTokenizer::encode") {
    // BOS/EOS and byte-fallback ids must exist in the vocab.
    auto const tiny = tokenizer_bytes(8, {{0.f, "<unk>"}});
    auto const t1 = Llama2cTokenizer::parse(tiny.data(), tiny.size(), 1);
    CHECK_THROWS_AS(t1.encode("", true, false), value_error);
    auto const three = tokenizer_bytes(8, {{0.f, "<unk>"}, {0.f, "\n<s>\n"}, {0.f, "\n</s>\n"}});
    auto const t3 = Llama2cTokenizer::parse(three.data(), three.size(), 3);
    CHECK(t3.encode("", true, true) == std::vector<int>{1, 2});
    CHECK_THROWS_AS(t3.encode("a", false, false), value_error);  // no piece, no byte fallback
    auto const two = tokenizer_bytes(8, {{0.f, "<unk>"}, {0.f, "\n<s>\n"}});
    auto const t2 = Llama2cTokenizer::parse(two.data(), two.size(), 2);
    CHECK_THROWS_AS(t2.encode("", false, true), value_error);
    // With full byte fallback every byte string round-trips, embedded NUL and invalid UTF-8 included.
    std::string const text = std::string("ab a\0\xff\xc3(", 9) + "\xf0\x9f\x98";
    auto const ids = tok.encode(text, true, false);
    CHECK(tok.decode(ids) == text);
  }
}
