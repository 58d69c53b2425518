// SPDX-License-Identifier: Apache-2.0
// Expert parallelism without MPI (docs/expert_parallel.md): placements and their errors, the all-to-all layout's
// order, and R ranks simulated in one process (their buffers exchanged in memory exactly as MPI_Alltoall(v) would),
// checked bitwise against the single-process oracle (MoeFfn forward, train::moe_backward) for R = 1..4 and several
// placements; the CpuSimd shard against its single-process layer to rounding.
#include <catch2/catch.hpp>

#include <factorllm/moe/all_to_all.hpp>
#include <factorllm/moe/expert_placement.hpp>
#include <factorllm/moe/expert_shard.hpp>

#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "reference/expert_parallel_fixtures.hpp"

using namespace factorllm;
using ep_fixture::bit_mismatches;

namespace {

/// Copies, for every pair (src, dst), the rows src's `from` buffer holds for dst into dst's `to` buffer: what one
/// MPI_Alltoallv does. from_offsets(src)[dst] / to_offsets(dst)[src] give the row blocks; width values a row.
template <class State, class V, class FromOff, class ToOff>
void exchange(std::vector<State>& st, V State::*from, V State::*to, FromOff from_offsets, ToOff to_offsets, std::ptrdiff_t width) {
  auto const R = static_cast<std::ptrdiff_t>(st.size());
  for (std::ptrdiff_t src = 0; src < R; ++src)
    for (std::ptrdiff_t dst = 0; dst < R; ++dst) {
      std::vector<std::int64_t> const& fo = from_offsets(st[static_cast<std::size_t>(src)]);
      std::vector<std::int64_t> const& to_o = to_offsets(st[static_cast<std::size_t>(dst)]);
      std::int64_t const rows = fo[static_cast<std::size_t>(dst) + 1] - fo[static_cast<std::size_t>(dst)];
      REQUIRE(rows == to_o[static_cast<std::size_t>(src) + 1] - to_o[static_cast<std::size_t>(src)]);
      std::copy_n((st[static_cast<std::size_t>(src)].*from).data() + fo[static_cast<std::size_t>(dst)] * width, rows * width,
                  (st[static_cast<std::size_t>(dst)].*to).data() + to_o[static_cast<std::size_t>(src)] * width);
    }
}

template <class State>
std::vector<std::int64_t> const& send_offsets(State const& s) { return s.send.rank_offsets; }
template <class State>
std::vector<std::int64_t> const& recv_offsets(State const& s) { return s.recv.rank_offsets; }

/// R simulated ranks: shards, states, and the forward / backward driven through in-memory exchanges.
template <class T, class Backend>
struct SimulatedGroup {
  using Shard = moe::ExpertShard<T, Backend>;
  std::vector<Shard> shards;
  std::vector<typename Shard::State> st;
  std::vector<std::ptrdiff_t> first;
  ep_fixture::Problem<T> const& p;

  SimulatedGroup(ep_fixture::Problem<T> const& prob, moe::ExpertPlacement const& placement)
      : st(static_cast<std::size_t>(placement.n_ranks())), first(ep_fixture::token_split(prob.n_tokens, placement.n_ranks())), p(prob) {
    for (std::ptrdiff_t r = 0; r < placement.n_ranks(); ++r)
      shards.push_back(Shard::from_experts(p.experts, p.router, p.gating, placement, r));
  }
  std::ptrdiff_t n_ranks() const { return static_cast<std::ptrdiff_t>(shards.size()); }
  MatrixView<T const> rows_of(Matrix<T> const& m, std::ptrdiff_t r) const {
    return matrix_view(m.data() + first[static_cast<std::size_t>(r)] * m.extent(1),
                       first[static_cast<std::size_t>(r) + 1] - first[static_cast<std::size_t>(r)], m.extent(1));
  }
  MatrixView<T> rows_of(Matrix<T>& m, std::ptrdiff_t r) const {
    return matrix_view(m.data() + first[static_cast<std::size_t>(r)] * m.extent(1),
                       first[static_cast<std::size_t>(r) + 1] - first[static_cast<std::size_t>(r)], m.extent(1));
  }

  void forward(Matrix<T>& y) {
    std::ptrdiff_t const R = n_ranks(), L = shards[0].placement().max_local(), d = p.d_model;
    for (std::ptrdiff_t r = 0; r < R; ++r) shards[static_cast<std::size_t>(r)].dispatch(rows_of(p.x, r), st[static_cast<std::size_t>(r)]);
    // Count exchange (MPI_Alltoall, L counts a rank): block dst of src's send counts -> block src of dst's.
    for (std::ptrdiff_t dst = 0; dst < R; ++dst) {
      auto& rc = st[static_cast<std::size_t>(dst)].recv.expert_counts;
      rc.assign(static_cast<std::size_t>(R * L), -1);
      for (std::ptrdiff_t src = 0; src < R; ++src)
        std::copy_n(st[static_cast<std::size_t>(src)].send.expert_counts.data() + dst * L, L, rc.data() + src * L);
      shards[static_cast<std::size_t>(dst)].prepare_receive(st[static_cast<std::size_t>(dst)]);
    }
    using S = typename Shard::State;
    exchange(st, &S::send_x, &S::recv_x, send_offsets<S>, recv_offsets<S>, d);
    for (std::ptrdiff_t r = 0; r < R; ++r) shards[static_cast<std::size_t>(r)].run_experts(st[static_cast<std::size_t>(r)]);
    exchange(st, &S::out_back, &S::out_home, recv_offsets<S>, send_offsets<S>, d);
    for (std::ptrdiff_t r = 0; r < R; ++r) shards[static_cast<std::size_t>(r)].combine(st[static_cast<std::size_t>(r)], rows_of(y, r));
  }

  /// After forward: fills the global gradients (expert grads scattered from their ranks; router grads summed over
  /// ranks in rank order in double, then cast, as an all-reduce would).
  void backward(ep_fixture::Reference<T>& g) {
    std::ptrdiff_t const R = n_ranks(), d = p.d_model, m = p.d_expert;
    using S = typename Shard::State;
    for (std::ptrdiff_t r = 0; r < R; ++r) shards[static_cast<std::size_t>(r)].dispatch_backward(rows_of(p.dy, r), st[static_cast<std::size_t>(r)]);
    exchange(st, &S::send_dy, &S::recv_dy, send_offsets<S>, recv_offsets<S>, d + 1);
    for (std::ptrdiff_t r = 0; r < R; ++r) {
      Shard const& sh = shards[static_cast<std::size_t>(r)];
      std::ptrdiff_t const nl = sh.n_local();
      Tensor<T, 3> dg({nl, m, d}), du({nl, m, d}), dd({nl, d, m});
      sh.run_experts_backward(st[static_cast<std::size_t>(r)], dg.view(), du.view(), dd.view());
      for (std::ptrdiff_t i = 0; i < nl; ++i) {
        std::int32_t const e = sh.placement().expert_of(r, i);
        std::copy_n(dg.data() + i * m * d, m * d, g.d_gate.data() + e * m * d);
        std::copy_n(du.data() + i * m * d, m * d, g.d_up.data() + e * m * d);
        std::copy_n(dd.data() + i * m * d, m * d, g.d_down.data() + e * m * d);
      }
    }
    exchange(st, &S::back, &S::back_home, recv_offsets<S>, send_offsets<S>, d + 1);
    std::vector<double> rw(static_cast<std::size_t>(p.n_experts * d), 0.0), rb(static_cast<std::size_t>(p.n_experts), 0.0);
    for (std::ptrdiff_t r = 0; r < R; ++r) {
      auto& s = st[static_cast<std::size_t>(r)];
      shards[static_cast<std::size_t>(r)].combine_backward(rows_of(p.x, r), s, rows_of(g.dx, r), rows_of(g.dlogits, r));
      for (std::size_t i = 0; i < rw.size(); ++i) rw[i] += s.router_w[i];
      for (std::size_t i = 0; i < rb.size(); ++i) rb[i] += s.router_b[i];
    }
    auto& s0 = st[0];
    s0.router_w = rw;
    s0.router_b = rb;
    shards[0].write_router_grads(s0, g.d_router_w.view(), g.d_router_b.view());
  }
};

}  // namespace

TEST_CASE("ExpertPlacement: contiguous blocks, user maps, and clear errors for bad placements", "[expert_parallel]") {
  auto const c = moe::ExpertPlacement::contiguous(6, 4);  // blocks of 1, 2, 1, 2
  CHECK(c.n_ranks() == 4);
  CHECK(c.experts_of(0) == std::vector<std::int32_t>{0});
  CHECK(c.experts_of(1) == std::vector<std::int32_t>{1, 2});
  CHECK(c.experts_of(3) == std::vector<std::int32_t>{4, 5});
  CHECK(c.max_local() == 2);
  for (std::ptrdiff_t e = 0; e < 6; ++e) CHECK(c.expert_of(c.rank_of(e), c.local_index(e)) == e);

  auto const lists = moe::ExpertPlacement::from_rank_lists(4, {{3, 0}, {}, {2, 1}});
  CHECK(lists.experts_of(0) == std::vector<std::int32_t>{0, 3});
  CHECK(lists.n_local(1) == 0);
  CHECK(lists.local_index(2) == 1);

  auto const msg = [](auto&& f) {
    try {
      f();
    } catch (value_error const& e) {
      return std::string(e.what());
    }
    return std::string("no exception");
  };
  CHECK_THAT(msg([] { moe::ExpertPlacement::contiguous(4, 5); }), Catch::Contains("does not fit"));
  CHECK_THAT(msg([] { moe::ExpertPlacement::contiguous(4, 0); }), Catch::Contains("n_ranks must be"));
  CHECK_THAT(msg([] { moe::ExpertPlacement::from_map({0, 2, 1}, 2); }), Catch::Contains("expert 1 on rank 2"));
  CHECK_THAT(msg([] { moe::ExpertPlacement::from_rank_lists(3, {{0, 1}, {1, 2}}); }),
             Catch::Contains("expert 1 is on rank 0 and on rank 1"));
  CHECK_THAT(msg([] { moe::ExpertPlacement::from_rank_lists(3, {{0}, {2}}); }), Catch::Contains("expert 1 is on no rank"));
  CHECK_THAT(msg([] { moe::ExpertPlacement::from_rank_lists(3, {{0, 1, 2, 3}}); }), Catch::Contains("outside [0, n_experts = 3)"));
  CHECK_THAT(msg([&] { c.require_fits(2, 6, "test"); }), Catch::Contains("for 4 rank(s), the group has 2"));
  CHECK_THAT(msg([&] { c.require_fits(4, 8, "test"); }), Catch::Contains("places 6 expert(s), the layer has 8"));
}

TEST_CASE("build_send_layout orders rows by destination rank, then expert, then slot", "[expert_parallel]") {
  ep_fixture::Problem<> const p(8, 4, 7, 3, 29, 101);
  moe::MoeFfn<float, CpuScalar> layer(p.experts, p.router, p.gating);
  moe::RoutingRecord<float> record;
  Matrix<float> y({p.n_tokens, p.d_model});
  Workspace ws(layer.workspace_bytes(p.n_tokens));
  layer.forward(p.x.cview(), y.view(), ws, &record);
  for (auto const& entry : ep_fixture::placements(p.n_experts, 3)) {
    moe::ExpertPlacement const& placement = entry.second;  // a named reference: clang 14 lambdas cannot capture bindings
    INFO(entry.first);
    moe::SendLayout layout;
    moe::build_send_layout(record.ids.cview(), placement, layout);
    REQUIRE(layout.n_rows() == p.n_tokens * p.top_k);
    auto key = [&](std::int32_t s) {
      std::int32_t const e = record.ids[s];
      return std::make_tuple(placement.rank_of(e), placement.local_index(e), s);
    };
    std::vector<std::int64_t> per_rank(3, 0), per_key(static_cast<std::size_t>(3 * placement.max_local()), 0);
    for (std::int64_t q = 0; q < layout.n_rows(); ++q) {
      std::int32_t const s = layout.slots[static_cast<std::size_t>(q)];
      CHECK(layout.row_of_slot[static_cast<std::size_t>(s)] == q);
      if (q > 0) CHECK(key(layout.slots[static_cast<std::size_t>(q) - 1]) < key(s));
      ++per_rank[static_cast<std::size_t>(std::get<0>(key(s)))];
      ++per_key[static_cast<std::size_t>(std::get<0>(key(s)) * placement.max_local() + std::get<1>(key(s)))];
      CHECK(q >= layout.rank_offsets[static_cast<std::size_t>(std::get<0>(key(s)))]);
      CHECK(q < layout.rank_offsets[static_cast<std::size_t>(std::get<0>(key(s))) + 1]);
    }
    for (std::ptrdiff_t r = 0; r < 3; ++r) CHECK(layout.rank_count(r) == per_rank[static_cast<std::size_t>(r)]);
    CHECK(layout.expert_counts == per_key);
  }
  SECTION("contiguous blocks: the send buffer is the single-process grouped order, whatever the rank count") {
    for (std::ptrdiff_t R = 1; R <= p.n_experts; ++R) {
      moe::SendLayout layout;
      moe::build_send_layout(record.ids.cview(), moe::ExpertPlacement::contiguous(p.n_experts, R), layout);
      std::vector<std::int32_t> const grouped(record.slots.data(), record.slots.data() + record.slots.size());
      CHECK(layout.slots == grouped);
    }
  }
  SECTION("a routing id outside the layer is refused") {
    Matrix<std::int32_t> bad({1, 1});
    bad[0] = 7;
    moe::SendLayout layout;
    CHECK_THROWS_AS(moe::build_send_layout(bad.cview(), moe::ExpertPlacement::contiguous(7, 2), layout), value_error);
  }
}

TEMPLATE_TEST_CASE("Simulated ranks: forward and backward are the single-process oracle's bits", "[expert_parallel]",
                   float, double) {
  // In double the router gradient's float-level tolerance below is far looser than needed; everything else is bits.
  for (auto mode : {moe::CombineMode::softmax_topk_renorm, moe::CombineMode::softmax_topk, moe::CombineMode::sigmoid_topk}) {
    // top_k = 3: the order in which a token's dx shares are added shows in double.
    ep_fixture::Problem<TestType> const p(12, 6, 6, 3, 23, 7 + static_cast<std::uint64_t>(mode), mode);
    ep_fixture::Reference<TestType> const ref(p);
    for (std::ptrdiff_t R = 1; R <= 4; ++R)
      for (auto const& [name, placement] : ep_fixture::placements(p.n_experts, R)) {
        INFO("mode " << static_cast<int>(mode) << ", " << R << " rank(s), " << name);
        SimulatedGroup<TestType, CpuScalar> group(p, placement);
        Matrix<TestType> y({p.n_tokens, p.d_model});
        group.forward(y);
        CHECK(bit_mismatches(y.data(), ref.y.data(), y.size()) == 0);

        ep_fixture::Reference<TestType> got(p);  // its gradients are overwritten by the simulated backward
        std::fill(got.dx.data(), got.dx.data() + got.dx.size(), TestType(-1));
        group.backward(got);
        CHECK(bit_mismatches(got.dx.data(), ref.dx.data(), ref.dx.size()) == 0);
        CHECK(bit_mismatches(got.dlogits.data(), ref.dlogits.data(), ref.dlogits.size()) == 0);
        CHECK(bit_mismatches(got.d_gate.data(), ref.d_gate.data(), ref.d_gate.size()) == 0);
        CHECK(bit_mismatches(got.d_up.data(), ref.d_up.data(), ref.d_up.size()) == 0);
        CHECK(bit_mismatches(got.d_down.data(), ref.d_down.data(), ref.d_down.size()) == 0);
        // The router gradient is a sum over all tokens: per-rank partial sums added in rank order round differently
        // from one sequential sum (in double; float results agree to ~1 ulp). One rank: the same bits.
        if (R == 1) {
          CHECK(bit_mismatches(got.d_router_w.data(), ref.d_router_w.data(), ref.d_router_w.size()) == 0);
          CHECK(bit_mismatches(got.d_router_b.data(), ref.d_router_b.data(), ref.d_router_b.size()) == 0);
        }
        CHECK(ref::rel_l2(got.d_router_w.data(), ref.d_router_w.data(), static_cast<std::size_t>(ref.d_router_w.size())) < 1e-6);
        CHECK(ref::rel_l2(got.d_router_b.data(), ref.d_router_b.data(), static_cast<std::size_t>(ref.d_router_b.size())) < 1e-6);
      }
  }
}

TEST_CASE("Simulated ranks: the oracle backward itself matches central finite differences", "[expert_parallel]") {
  // Guards the reference the bitwise checks compare with: the per-slot dx order (kernel::slot_backward) must still
  // be the gradient. L = sum(y * dy); dL/dx_t,c by central differences of the single-process forward in double.
  ep_fixture::Problem<> const p(6, 4, 4, 2, 5, 31);
  ep_fixture::Reference<> const ref(p);
  Tensor<double, 3> g3({p.n_experts, p.d_expert, p.d_model}), u3({p.n_experts, p.d_expert, p.d_model}),
      d3({p.n_experts, p.d_model, p.d_expert});
  for (std::ptrdiff_t i = 0; i < g3.size(); ++i) {
    g3[i] = p.experts.gate_tensor()[i];
    u3[i] = p.experts.up_tensor()[i];
    d3[i] = p.experts.down_tensor()[i];
  }
  Matrix<double> rw({p.n_experts, p.d_model});
  Vector<double> rb({p.n_experts});
  for (std::ptrdiff_t e = 0; e < p.n_experts; ++e) {
    rb[e] = p.router.bias()(e);
    for (std::ptrdiff_t c = 0; c < p.d_model; ++c) rw(e, c) = p.router.weight()(e, c);
  }
  MoeParamsView<double> const params{g3.cview(), u3.cview(), d3.cview(), rw.cview(), rb.cview()};
  auto loss = [&](Matrix<double> const& x) {
    Matrix<double> y({p.n_tokens, p.d_model});
    moe::RoutingRecord<double> record;
    Workspace ws(train::moe_forward_workspace_bytes(params, p.top_k, p.n_tokens));
    train::moe_forward(params, p.gating, x.cview(), y.view(), record, ws);
    double l = 0;
    for (std::ptrdiff_t i = 0; i < y.size(); ++i) l += y[i] * static_cast<double>(p.dy[i]);
    return l;
  };
  Matrix<double> x({p.n_tokens, p.d_model});
  for (std::ptrdiff_t i = 0; i < x.size(); ++i) x[i] = p.x[i];
  double const h = 1e-6;
  for (std::ptrdiff_t i = 0; i < x.size(); ++i) {
    double const keep = x[i];
    x[i] = keep + h;
    double const lp = loss(x);
    x[i] = keep - h;
    double const lm = loss(x);
    x[i] = keep;
    CHECK(static_cast<double>(ref.dx[i]) == Approx((lp - lm) / (2 * h)).margin(1e-4).epsilon(1e-4));
  }
}

TEST_CASE("Simulated ranks on CpuSimd agree with the single-process CpuSimd layer to rounding", "[expert_parallel]") {
  ep_fixture::Problem<> const p(32, 16, 8, 2, 40, 55);
  moe::MoeFfn<float, DefaultCpu> layer(p.experts, p.router, p.gating);
  Matrix<float> want({p.n_tokens, p.d_model});
  layer.forward(p.x.cview(), want.view());
  for (std::ptrdiff_t R : {1, 2, 4})
    for (auto const& [name, placement] : ep_fixture::placements(p.n_experts, R)) {
      INFO(R << " rank(s), " << name);
      SimulatedGroup<float, DefaultCpu> group(p, placement);
      Matrix<float> y({p.n_tokens, p.d_model});
      group.forward(y);
      CHECK(ref::rel_l2(y.data(), want.data(), static_cast<std::size_t>(y.size())) < 1e-6);
    }
}

TEST_CASE("ExpertShard refuses shards and counts that do not fit", "[expert_parallel]") {
  ep_fixture::Problem<> const p(8, 4, 4, 2, 6, 3);
  auto const placement = moe::ExpertPlacement::contiguous(4, 2);
  CHECK_THROWS_AS(moe::ExpertShard<float>::from_experts(p.experts, p.router, p.gating, placement, 2), value_error);
  CHECK_THROWS_AS(moe::ExpertShard<float>::from_experts(p.experts, p.router, p.gating, moe::ExpertPlacement::contiguous(5, 2), 0),
                  value_error);
  auto const shard = moe::ExpertShard<float>::from_experts(p.experts, p.router, p.gating, placement, 1);
  moe::ExpertShard<float>::State st;
  shard.dispatch(p.x.cview(), st);
  st.recv.expert_counts = {1, 2, 3};  // not n_ranks * max_local = 4 entries
  CHECK_THROWS_AS(shard.prepare_receive(st), value_error);
  st.recv.expert_counts = {1, -2, 0, 0};
  CHECK_THROWS_AS(shard.prepare_receive(st), value_error);
  Matrix<float> wrong({6, 7});
  CHECK_THROWS_AS(shard.dispatch(wrong.cview(), st), shape_error);
}
