// Broadcast, allgather (with its row exchange) and reduce_scatter through the shared-memory
// segment with threads as local ranks, interleaved with allreduces so that every collective
// reuses the staging ring the previous one left (sequence numbers shared); chunk edges, odd
// sizes, empty blocks, a per-call chunk smaller than the slot; and the algorithm table parser.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "aimass/error.h"
#include "comm/algorithms.h"
#include "comm/shm_allreduce.h"
#include "rank_order_reference.h"
#include "rank_threads.h"
#include "shm_test_segment.h"

namespace {

using aimass::DType;
using aimass::ReduceOp;
using aimass::comm::AlgoKind;
using aimass::comm::AlgoTable;
using aimass::comm::ShmAllreduce;
using aimass::comm::ShmSegment;

constexpr size_t kChunk = 8192;

struct Segment : ShmTestSegment {
  explicit Segment(int L) : ShmTestSegment(L, kChunk) {}
};

// Runs body(shm, rank) on L threads: staged, then in single-copy mode (process_vm_readv on this
// process) pulling the reduced slices and pushing them (process_vm_writev); fails the test with the
// first rank's error.
enum class Mode { Staged, CmaPull, CmaPush, CmaPushFixed };
void on_ranks_mode(int L, Mode mode, const std::function<void(ShmAllreduce&, int)>& body);
void on_ranks(int L, const std::function<void(ShmAllreduce&, int)>& body) {
  if (!std::getenv("ONLY_CMA")) on_ranks_mode(L, Mode::Staged, body);
  if (!std::getenv("ONLY_STAGED")) {
    on_ranks_mode(L, Mode::CmaPull, body);
    on_ranks_mode(L, Mode::CmaPush, body);
    on_ranks_mode(L, Mode::CmaPushFixed, body);
  }
}
const char* mode_name(Mode m) {
  return m == Mode::Staged    ? " (staged)"
         : m == Mode::CmaPull ? " (single copy, pull)"
         : m == Mode::CmaPush ? " (single copy, push, claimed pieces)"
                              : " (single copy, push, fixed slices)";
}
void on_ranks_mode(int L, Mode mode, const std::function<void(ShmAllreduce&, int)>& body) {
  Segment seg(L);
  std::vector<std::string> errors(L);
  run_rank_threads(L, errors, [&](int r) {
    ShmAllreduce shm(r, L, seg.mem, kChunk, 20.0);
    if (mode != Mode::Staged) {
      shm.allow_cma_for_tests(mode != Mode::CmaPull, mode == Mode::CmaPush);
      shm.use_cma(true);
    }
    body(shm, r);
  });
  for (int r = 0; r < L; ++r) ASSERT_EQ(errors[r], "") << "rank " << r << mode_name(mode);
}

int32_t val(int rank, int64_t i, int salt) { return static_cast<int32_t>((i * 31 + rank * 17 + salt) % 97) - 48; }

const std::vector<int64_t> kBytes = {0, 1, 63, 64, 65, 4095, 8191, 8192, 8193, 3 * 8192 + 7, 9 * 8192 + 129};

TEST(CommShmCollectives, BroadcastFromEveryRootAtChunkEdges) {
  for (int L : {2, 3, 4}) {
    on_ranks(L, [&](ShmAllreduce& shm, int r) {
      int salt = 0;
      for (int64_t bytes : kBytes) {
        for (int root = 0; root < L; ++root, ++salt) {
          std::vector<uint8_t> buf(static_cast<size_t>(bytes));
          for (int64_t i = 0; i < bytes; ++i) buf[i] = static_cast<uint8_t>(r == root ? val(root, i, salt) : 0xEE);
          if (salt % 3 == 1) shm.set_chunk(4096);  // a chunk smaller than the slot
          shm.broadcast(buf.data(), bytes, root);
          shm.set_chunk(0);
          ASSERT_EQ(buf.size(), static_cast<size_t>(bytes));
          for (int64_t i = 0; i < bytes; ++i)
            ASSERT_EQ(buf[i], static_cast<uint8_t>(val(root, i, salt))) << "L " << L << " root " << root << " i " << i;
        }
      }
    });
  }
}

TEST(CommShmCollectives, AllgatherUnevenRowsInterleavedWithAllreduce) {
  for (int L : {2, 3, 4}) {
    on_ranks(L, [&](ShmAllreduce& shm, int r) {
      const int64_t row = 12;  // bytes per row: not a divisor of the chunk
      for (int64_t base : {int64_t(0), int64_t(1), int64_t(700), int64_t(2100)}) {
        const int salt = static_cast<int>(base);
        const int64_t mine = r == 1 ? 0 : base + r * 3;  // rank 1 contributes nothing
        std::vector<uint8_t> in(static_cast<size_t>(mine * row));
        for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<uint8_t>(val(r, static_cast<int64_t>(i), salt));
        std::vector<int64_t> rows = shm.exchange(mine, in.data());
        ASSERT_EQ(static_cast<int>(rows.size()), L);
        int64_t total = 0;
        for (int j = 0; j < L; ++j) {
          ASSERT_EQ(rows[j], j == 1 ? 0 : base + j * 3);
          total += rows[j];
        }
        std::vector<uint8_t> out(static_cast<size_t>(total * row), 0xCD);
        shm.allgather(in.data(), rows, row, reinterpret_cast<char*>(out.data()));
        int64_t at = 0;
        for (int j = 0; j < L; ++j)
          for (int64_t i = 0; i < rows[j] * row; ++i, ++at)
            ASSERT_EQ(out[at], static_cast<uint8_t>(val(j, i, salt))) << "L " << L << " from " << j << " i " << i;
        // an allreduce right after reuses the ring the allgather left
        std::vector<float> v(5000, static_cast<float>(r + 1));
        shm.run({{reinterpret_cast<const char*>(v.data()), reinterpret_cast<char*>(v.data()), 5000, false}}, 5000,
                DType::F32, ReduceOp::Sum, L, nullptr);
        ASSERT_EQ(v[4999], static_cast<float>(L * (L + 1) / 2));
      }
    });
  }
}

template <typename T>
void check_reduce_scatter(int L, DType dtype, ReduceOp op, bool average) {
  on_ranks(L, [&](ShmAllreduce& shm, int r) {
    for (int64_t per : {int64_t(0), int64_t(1), int64_t(15), int64_t(16), int64_t(17), int64_t(1000),
                        int64_t(2049), int64_t(5000)}) {
      std::vector<int64_t> counts(L);
      int64_t total = 0;
      for (int j = 0; j < L; ++j) total += counts[j] = per + (j < 1 ? 1 : 0) * (per % 3);  // uneven blocks
      std::vector<T> in(static_cast<size_t>(total));
      for (int64_t i = 0; i < total; ++i) in[i] = static_cast<T>(val(r, i, static_cast<int>(per)) % 11);
      int64_t start = 0;
      for (int j = 0; j < r; ++j) start += counts[j];
      std::vector<T> out(static_cast<size_t>(counts[r]) + 1);
      shm.reduce_scatter(in.data(), counts, reinterpret_cast<char*>(out.data()), dtype, op, average, L);
      for (int64_t i = 0; i < counts[r]; ++i) {
        double want = val(0, start + i, static_cast<int>(per)) % 11;
        for (int j = 1; j < L; ++j) {
          const double v = val(j, start + i, static_cast<int>(per)) % 11;
          want = op == ReduceOp::Min ? std::min(want, v) : op == ReduceOp::Max ? std::max(want, v) : want + v;
        }
        if (average) want = std::is_integral<T>::value ? static_cast<double>(static_cast<int64_t>(want / L)) : want / L;
        ASSERT_NEAR(static_cast<double>(out[i]), want, 1e-5) << "L " << L << " per " << per << " i " << i;
      }
    }
  });
}

TEST(CommShmCollectives, ReduceScatterDtypesOpsAndUnevenBlocks) {
  for (int L : {2, 3, 4}) {
    check_reduce_scatter<float>(L, DType::F32, ReduceOp::Sum, false);
    check_reduce_scatter<float>(L, DType::F32, ReduceOp::Sum, true);
    check_reduce_scatter<float>(L, DType::F32, ReduceOp::Max, false);
    check_reduce_scatter<double>(L, DType::F64, ReduceOp::Min, false);
    check_reduce_scatter<int32_t>(L, DType::I32, ReduceOp::Sum, true);
    check_reduce_scatter<int64_t>(L, DType::I64, ReduceOp::Max, false);
  }
}

TEST(CommShmCollectives, PeerThatNeverComesFailsEveryCollective) {
  Segment seg(2);
  ShmAllreduce shm(0, 2, seg.mem, kChunk, 0.2);
  std::vector<uint8_t> buf(100000, 1);
  EXPECT_THROW(shm.broadcast(buf.data(), 100000, 1), aimass::DistributedError);
  Segment seg2(2);
  ShmAllreduce shm2(0, 2, seg2.mem, kChunk, 0.2);
  EXPECT_THROW(shm2.exchange(5), aimass::DistributedError);
  Segment seg3(2);
  ShmAllreduce shm3(1, 2, seg3.mem, kChunk, 0.2);
  std::vector<float> out(60000);
  EXPECT_THROW(shm3.reduce_scatter(buf.data(), {10000, 10000}, reinterpret_cast<char*>(out.data()), DType::F32,
                                   ReduceOp::Sum, false, 2),
               aimass::DistributedError);
}

// A single-copy allreduce whose peer never comes times out either way; only in push mode may a late
// peer still write this rank's output afterwards, which the engine then keeps alive.
TEST(CommShmCollectives, PushModeFailureSaysThePeersMayWriteTheOutput) {
  for (bool push : {true, false}) {
    Segment seg(2);
    ShmAllreduce shm(0, 2, seg.mem, kChunk, 0.2);
    shm.allow_cma_for_tests(push);
    shm.use_cma(true);
    std::vector<float> v(5000, 1.0f);
    EXPECT_THROW(shm.run({{reinterpret_cast<const char*>(v.data()), reinterpret_cast<char*>(v.data()), 5000, false}},
                         5000, DType::F32, ReduceOp::Sum, 2, nullptr),
                 aimass::DistributedError);
    EXPECT_EQ(shm.peers_write_outputs(), push);
  }
}

// Broadcasts of many pieces from every root between allreduces: the claimed-piece broadcast shares
// local rank 0's claim counter with the allreduce (as a receiver), so the counters' bases must stay
// in step across collectives of both kinds.
TEST(CommShmCollectives, ManyPieceBroadcastsBetweenAllreduces) {
  for (int L : {2, 3, 4}) {
    on_ranks(L, [&](ShmAllreduce& shm, int r) {
      int salt = 0;
      for (int64_t bytes : {int64_t(40 * 8192 + 13), int64_t(8192), int64_t(3 * 8192 + 4096 + 1)}) {
        for (int root = L - 1; root >= 0; --root, ++salt) {
          std::vector<uint8_t> buf(static_cast<size_t>(bytes));
          for (int64_t i = 0; i < bytes; ++i) buf[i] = static_cast<uint8_t>(r == root ? val(root, i, salt) : 0xEE);
          shm.broadcast(buf.data(), bytes, root);
          for (int64_t i = 0; i < bytes; ++i)
            ASSERT_EQ(buf[i], static_cast<uint8_t>(val(root, i, salt))) << "L " << L << " root " << root << " i " << i;
          std::vector<float> v(30001, static_cast<float>(r + 1));
          shm.run({{reinterpret_cast<const char*>(v.data()), reinterpret_cast<char*>(v.data()), 30001, false}},
                  30001, DType::F32, ReduceOp::Sum, L, nullptr);
          ASSERT_EQ(v[0], static_cast<float>(L * (L + 1) / 2));
          ASSERT_EQ(v[30000], static_cast<float>(L * (L + 1) / 2));
        }
      }
    });
  }
}

// Two ranks staged: each rank writes its reduced slice back into the peer's staging slot, over the copy
// it read (the peer gathers it from its own slot). Integers (whose reduce overwrites its output with the
// first source before it reads the others: the aliased output goes through a small buffer) and floats,
// many chunks (the ring wraps), with broadcasts from both roots in between that stage into the same
// slots: every value exact.
TEST(CommShmCollectives, TwoRankStagedResultsInThePeersSlotAcrossCollectives) {
  on_ranks_mode(2, Mode::Staged, [&](ShmAllreduce& shm, int r) {
    const int64_t n = 9 * 2048 + 37;
    for (int round = 0; round < 3; ++round) {
      std::vector<int32_t> a(static_cast<size_t>(n)), b(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) a[i] = val(r, i, round);
      shm.run({{reinterpret_cast<const char*>(a.data()), reinterpret_cast<char*>(b.data()), n, false}}, n,
              DType::I32, ReduceOp::Sum, 2, nullptr);
      for (int64_t i = 0; i < n; ++i)
        ASSERT_EQ(b[i], val(0, i, round) + val(1, i, round)) << "int32 i " << i << " round " << round;
      std::vector<int8_t> c(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) c[i] = static_cast<int8_t>(val(r, i, round + 7) % 11);
      shm.run({{reinterpret_cast<const char*>(c.data()), reinterpret_cast<char*>(c.data()), n, false}}, n,
              DType::I8, ReduceOp::Product, 2, nullptr);
      for (int64_t i = 0; i < n; ++i)
        ASSERT_EQ(c[i], static_cast<int8_t>((val(0, i, round + 7) % 11) * (val(1, i, round + 7) % 11)))
            << "int8 i " << i;
      for (int root : {1, 0}) {
        std::vector<uint8_t> buf(static_cast<size_t>(5 * 8192 + 3));
        for (size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<uint8_t>(r == root ? val(root, i, 3) : 0xEE);
        shm.broadcast(buf.data(), static_cast<int64_t>(buf.size()), root);
        for (size_t i = 0; i < buf.size(); ++i) ASSERT_EQ(buf[i], static_cast<uint8_t>(val(root, i, 3)));
      }
      std::vector<float> v(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) v[i] = static_cast<float>(val(r, i, round));
      shm.run({{reinterpret_cast<const char*>(v.data()), reinterpret_cast<char*>(v.data()), n, true}}, n,
              DType::F32, ReduceOp::Sum, 2, nullptr);
      for (int64_t i = 0; i < n; ++i)
        ASSERT_EQ(v[i], static_cast<float>(val(0, i, round) + val(1, i, round)) / 2.0f) << "f32 i " << i;
    }
  });
}

// A receiver of a claimed-piece broadcast whose root never comes times out, and says that the root
// may still write its buffer (the engine then keeps it alive); the root alone times out too.
TEST(CommShmCollectives, BroadcastWithoutItsRootTimesOutAndSaysTheRootMayWrite) {
  for (bool steal : {true, false}) {
    for (int me : {0, 1}) {
      Segment seg(2);
      ShmAllreduce shm(me, 2, seg.mem, kChunk, 0.2);
      shm.allow_cma_for_tests(true, steal);
      shm.use_cma(true);
      std::vector<uint8_t> buf(100000, 1);
      EXPECT_THROW(shm.broadcast(buf.data(), 100000, 1), aimass::DistributedError);
      EXPECT_EQ(shm.peers_write_outputs(), steal && me == 0) << "steal " << steal << " rank " << me;
    }
  }
}

TEST(CommShmCollectives, AllreduceFusedInPlaceAndOutOfPlaceBothModes) {
  for (int L : {2, 3, 4}) {
    on_ranks(L, [&](ShmAllreduce& shm, int r) {
      for (int64_t n : {int64_t(1), int64_t(17), int64_t(4096), int64_t(70001)}) {
        for (ReduceOp op : {ReduceOp::Sum, ReduceOp::Min, ReduceOp::Max}) {
          std::vector<double> a(static_cast<size_t>(n)), outb(static_cast<size_t>(n / 2 + 1), -1);
          for (int64_t i = 0; i < n; ++i) a[i] = val(r, i, static_cast<int>(n));
          // two segments: the first in place, the second out of place (half of it)
          const int64_t n1 = n / 2, n2 = n - n1;
          std::vector<double> in2(a.begin() + n1, a.end());
          std::vector<ShmSegment> segs = {
              {reinterpret_cast<const char*>(a.data()), reinterpret_cast<char*>(a.data()), n1, false},
              {reinterpret_cast<const char*>(in2.data()), reinterpret_cast<char*>(outb.data()), n2, true}};
          shm.run(segs, n, DType::F64, op, L, nullptr);
          for (int64_t i = 0; i < n; ++i) {
            double want = val(0, i, static_cast<int>(n));
            for (int j = 1; j < L; ++j) {
              const double v = val(j, i, static_cast<int>(n));
              want = op == ReduceOp::Min ? std::min(want, v) : op == ReduceOp::Max ? std::max(want, v) : want + v;
            }
            const double got = i < n1 ? a[i] : outb[i - n1];
            if (i >= n1) want /= L;
            ASSERT_DOUBLE_EQ(got, want) << "L " << L << " n " << n << " i " << i;
          }
        }
      }
    });
  }
}

// Every dtype and op of the single-copy allreduce, odd counts over many pieces, fused segments
// (in place and out of place) and a repeated run (the claim counter carries over): every rank
// holds the same bits, those of the kernel reducing the inputs in rank order, whichever rank
// reduced a piece (floats with non-associative values: the order shows in the bits); fixed slices
// and the pull mode give every rank the same bits.
template <typename T>
void check_every_rank_same_bits(int L, DType dtype, ReduceOp op, bool average, Mode mode) {
  const std::vector<int64_t> counts = {1, 63, 2049, 9 * 2048 + 37, 5};
  std::vector<std::vector<std::vector<T>>> got(L);  // [rank][call]
  auto input = [&](int r, size_t c, int64_t i) {
    const int v = val(r, i, static_cast<int>(c));
    if constexpr (std::is_floating_point_v<T>) return static_cast<T>(v) * static_cast<T>(0.1);
    else if constexpr (std::is_same_v<T, uint16_t>)  // 16-bit float bits: 1 +- small
      return static_cast<T>((dtype == DType::F16 ? 0x3c00 : 0x3f80) + (v & 0x3f));
    else if (dtype == DType::Bool) return static_cast<T>(v % 3 == 0);
    else return static_cast<T>(v);
  };
  on_ranks_mode(L, mode, [&](ShmAllreduce& shm, int r) {
    for (size_t c = 0; c < counts.size(); ++c) {
      const int64_t n = counts[c], n1 = n / 3;
      std::vector<T> a(static_cast<size_t>(n)), out2(static_cast<size_t>(n - n1));
      for (int64_t i = 0; i < n; ++i) a[i] = input(r, c, i);
      std::vector<T> in2(a.begin() + n1, a.end());
      shm.run({{reinterpret_cast<const char*>(a.data()), reinterpret_cast<char*>(a.data()), n1, average},
               {reinterpret_cast<const char*>(in2.data()), reinterpret_cast<char*>(out2.data()), n - n1, average}},
              n, dtype, op, L, nullptr);
      std::copy(out2.begin(), out2.end(), a.begin() + n1);
      got[r].push_back(a);
    }
  });
  for (size_t c = 0; c < counts.size(); ++c) {
    const int64_t n = counts[c];
    const std::vector<T> want =
        rank_order_reference<T>(L, dtype, op, average, n, [&](int r, int64_t i) { return input(r, c, i); });
    // fixed slices reduce the own input first (rank j's slice: in_j + the others): the same bits on
    // every rank, but the rank-order bits only with claimed pieces
    const T* ref = mode == Mode::CmaPush ? want.data() : got[0][c].data();
    for (int r = 0; r < L; ++r)
      ASSERT_EQ(std::memcmp(got[r][c].data(), ref, static_cast<size_t>(n) * sizeof(T)), 0)
          << "L " << L << " rank " << r << " n " << n << mode_name(mode);
  }
}

TEST(CommShmCollectives, SingleCopyAllreduceEveryDtypeAndOpSameBitsOnEveryRank) {
  for (int L : {2, 3, 4}) {
    for (Mode mode : {Mode::CmaPush, Mode::CmaPushFixed, Mode::CmaPull}) {
      for (ReduceOp op : {ReduceOp::Sum, ReduceOp::Min, ReduceOp::Max, ReduceOp::Product}) {
        check_every_rank_same_bits<float>(L, DType::F32, op, false, mode);
        check_every_rank_same_bits<double>(L, DType::F64, op, false, mode);
        check_every_rank_same_bits<uint16_t>(L, DType::F16, op, false, mode);
        check_every_rank_same_bits<uint16_t>(L, DType::BF16, op, false, mode);
        check_every_rank_same_bits<int8_t>(L, DType::I8, op, false, mode);
        check_every_rank_same_bits<uint8_t>(L, DType::U8, op, false, mode);
        check_every_rank_same_bits<int16_t>(L, DType::I16, op, false, mode);
        check_every_rank_same_bits<int32_t>(L, DType::I32, op, false, mode);
        check_every_rank_same_bits<int64_t>(L, DType::I64, op, false, mode);
        check_every_rank_same_bits<uint8_t>(L, DType::Bool, op, false, mode);
      }
      check_every_rank_same_bits<float>(L, DType::F32, ReduceOp::Sum, true, mode);
      check_every_rank_same_bits<uint16_t>(L, DType::BF16, ReduceOp::Sum, true, mode);
      check_every_rank_same_bits<int32_t>(L, DType::I32, ReduceOp::Sum, true, mode);
    }
  }
}

TEST(CommAlgoTable, ParsePickAndCanonicalText) {
  AlgoTable t = AlgoTable::parse("allreduce=0:mpi, 64k:shm@256k ,8m:cma@1m;broadcast=0:mpi,16k:shm");
  EXPECT_FALSE(t.pick(AlgoKind::Allreduce, 100).shm);
  EXPECT_TRUE(t.pick(AlgoKind::Allreduce, 64 << 10).shm);
  EXPECT_EQ(t.pick(AlgoKind::Allreduce, 64 << 10).chunk, 256u << 10);
  EXPECT_EQ(t.pick(AlgoKind::Allreduce, 100 << 20).chunk, 1u << 20);
  EXPECT_TRUE(t.pick(AlgoKind::Allreduce, 100 << 20).cma);
  EXPECT_FALSE(t.pick(AlgoKind::Allreduce, 64 << 10).cma);
  EXPECT_FALSE(t.pick(AlgoKind::Broadcast, 16383).shm);
  EXPECT_TRUE(t.pick(AlgoKind::Broadcast, 16384).shm);
  EXPECT_NE(t.str().find("allreduce=0:mpi,64k:shm@256k,8m:cma@1m;broadcast=0:mpi,16k:shm"), std::string::npos)
      << t.str();
  EXPECT_EQ(AlgoTable::parse(t.str()).str(), t.str());  // the canonical text round-trips
  EXPECT_EQ(AlgoTable::parse("").str(), AlgoTable::defaults().str());
  for (const char* bad : {"allreduce", "bogus=0:shm", "allreduce=0:nccl", "allreduce=1k:shm", "allreduce=0:mpi@4k",
                          "allreduce=0:shm,0:mpi", "allreduce=x:shm", "allreduce=0:shm@1t", "allreduce=-1:shm"}) {
    EXPECT_THROW(AlgoTable::parse(bad), aimass::ValueError) << bad;
  }
}

}  // namespace
