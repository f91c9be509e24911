// The shared-memory allreduce protocol with threads as local ranks (one process,
// no MPI): results against a plain reference at chunk edges, fused segments, the
// staging ring wrapping around, and a peer that never shows up.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "aimass/error.h"
#include "comm/shm_allreduce.h"
#include "shm_test_segment.h"

namespace {

using aimass::DType;
using aimass::ReduceOp;
using aimass::comm::ShmAllreduce;
using aimass::comm::ShmSegment;

constexpr size_t kChunk = 4096;

struct Segment : ShmTestSegment {
  explicit Segment(int L) : ShmTestSegment(L, kChunk) {}
};

float value(int rank, size_t i) { return static_cast<float>((static_cast<int>(i * 7 + rank * 13) % 41) - 20); }

// Runs `calls` allreduces of the given sizes on L threads; each call fuses `parts` segments.
void run_ranks(int L, const std::vector<int64_t>& sizes, ReduceOp op, int parts) {
  Segment seg(L);
  std::vector<std::vector<std::vector<float>>> data(L);  // [rank][call]
  for (int r = 0; r < L; ++r)
    for (int64_t n : sizes) {
      std::vector<float> v(static_cast<size_t>(n));
      for (size_t i = 0; i < v.size(); ++i) v[i] = value(r, i);
      data[r].push_back(v);
    }
  std::vector<std::string> errors(L);
  std::vector<std::thread> threads;
  for (int r = 0; r < L; ++r) {
    threads.emplace_back([&, r] {
      try {
        ShmAllreduce shm(r, L, seg.mem, kChunk, 10.0);
        for (size_t c = 0; c < sizes.size(); ++c) {
          std::vector<float>& v = data[r][c];
          std::vector<ShmSegment> segs;  // split the array into `parts` uneven pieces (in place)
          const int64_t n = sizes[c];
          int64_t at = 0;
          for (int p = 0; p < parts; ++p) {
            const int64_t len = p + 1 == parts ? n - at : std::min<int64_t>(n - at, (n / (parts + 1)) + 3 * p);
            segs.push_back({reinterpret_cast<const char*>(v.data() + at), reinterpret_cast<char*>(v.data() + at),
                            len, op == ReduceOp::Average});
            at += len;
          }
          shm.run(segs, n, DType::F32, op == ReduceOp::Average ? ReduceOp::Sum : op, L, nullptr);
        }
      } catch (const std::exception& e) {
        errors[r] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < L; ++r) ASSERT_EQ(errors[r], "") << "rank " << r;
  for (size_t c = 0; c < sizes.size(); ++c) {
    for (size_t i = 0; i < static_cast<size_t>(sizes[c]); ++i) {
      float want = value(0, i);
      for (int r = 1; r < L; ++r) {
        const float v = value(r, i);
        want = op == ReduceOp::Min ? std::min(want, v) : op == ReduceOp::Max ? std::max(want, v) : want + v;
      }
      if (op == ReduceOp::Average) want *= 1.0f / static_cast<float>(L);
      for (int r = 0; r < L; ++r)
        ASSERT_EQ(data[r][c][i], want) << "rank " << r << " call " << c << " element " << i << " of " << sizes[c];
    }
  }
}

const std::vector<int64_t> kEdgeSizes = {0, 1, 15, 16, 17, 1023, 1024, 1025, 2 * 1024 + 19, 11 * 1024 + 5, 3};

TEST(CommShm, TwoRanksChunkEdgesAndRingWrap) {
  for (ReduceOp op : {ReduceOp::Sum, ReduceOp::Min, ReduceOp::Max, ReduceOp::Average}) run_ranks(2, kEdgeSizes, op, 1);
}

TEST(CommShm, ThreeAndFourRanksFusedSegments) {
  run_ranks(3, kEdgeSizes, ReduceOp::Sum, 4);
  run_ranks(4, kEdgeSizes, ReduceOp::Average, 3);
}

TEST(CommShm, PeerThatNeverComesRaisesAfterTheTimeout) {
  Segment seg(2);
  ShmAllreduce shm(0, 2, seg.mem, kChunk, 0.3);
  std::vector<float> v(10000, 1.0f);
  const auto t0 = std::chrono::steady_clock::now();
  try {
    shm.run({{reinterpret_cast<const char*>(v.data()), reinterpret_cast<char*>(v.data()), 10000, false}}, 10000,
            DType::F32, ReduceOp::Sum, 2, nullptr);
    FAIL() << "expected DistributedError";
  } catch (const aimass::DistributedError& e) {
    EXPECT_NE(std::string(e.what()).find("did not advance within"), std::string::npos) << e.what();
  }
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 5.0);
  // the late peer sees that rank 0 gave up instead of waiting out its own timeout
  ShmAllreduce late(1, 2, seg.mem, kChunk, 30.0);
  const auto t1 = std::chrono::steady_clock::now();
  EXPECT_THROW(late.run({{reinterpret_cast<const char*>(v.data()), reinterpret_cast<char*>(v.data()), 10000, false}},
                        10000, DType::F32, ReduceOp::Sum, 2, nullptr),
               aimass::DistributedError);
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count(), 5.0);
}

}  // namespace
