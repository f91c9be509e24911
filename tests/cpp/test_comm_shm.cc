// The shared-memory allreduce protocol with threads as local ranks (one process,
// no MPI): results against a plain reference at chunk edges, fused segments, the
// staging ring wrapping around, a peer that never shows up, and the futex waits (a sleeping rank
// woken by its peer's counter or abort) against the yield loop.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "aimass/error.h"
#include "comm/shm_allreduce.h"
#include "rank_threads.h"
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

// Runs `calls` allreduces of the given sizes on L threads; each call fuses `parts` segments, laid out
// at `line_offset` bytes into a line of the staging layout (shm_line_pads; -1: packed).
void run_ranks(int L, const std::vector<int64_t>& sizes, ReduceOp op, int parts, int line_offset = -1) {
  Segment seg(L);
  std::vector<std::vector<std::vector<float>>> data(L);  // [rank][call]
  for (int r = 0; r < L; ++r)
    for (int64_t n : sizes) {
      std::vector<float> v(static_cast<size_t>(n));
      for (size_t i = 0; i < v.size(); ++i) v[i] = value(r, i);
      data[r].push_back(v);
    }
  std::vector<std::string> errors(L);
  run_rank_threads(L, errors, [&](int r) {
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
      aimass::comm::shm_line_pads(segs, sizeof(float), line_offset);
      shm.run(segs, n, DType::F32, op == ReduceOp::Average ? ReduceOp::Sum : op, L, nullptr);
    }
  });
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

// Fused segments with holes in the staging layout (ShmSegment::pad): many uneven segments, so that
// holes fall on chunk, slice and ring-slot edges; exact against the reference like the packed runs.
TEST(CommShm, FusedSegmentsAtALineOffset) {
  for (int off : {0, 16, 48, 60}) {
    run_ranks(2, kEdgeSizes, ReduceOp::Sum, 7, off);
    run_ranks(2, kEdgeSizes, ReduceOp::Average, 5, off);
    run_ranks(3, kEdgeSizes, ReduceOp::Max, 6, off);
  }
  run_ranks(4, kEdgeSizes, ReduceOp::Sum, 9, 16);
  run_ranks(2, kEdgeSizes, ReduceOp::Sum, 7, 6);  // not a multiple of the element size: packed
}

TEST(CommShm, LinePadsPutEverySegmentAtTheOffset) {
  std::vector<ShmSegment> segs;
  for (int64_t n : {1, 15, 16, 17, 100, 0, 4099}) segs.push_back({nullptr, nullptr, n});
  for (size_t es : {size_t(1), size_t(2), size_t(4), size_t(8)}) {
    for (int off : {0, 8, 16, 56}) {
      aimass::comm::shm_line_pads(segs, es, off);
      int64_t at = 0;
      for (const ShmSegment& g : segs) {
        EXPECT_GE(g.pad, 0);
        EXPECT_LT(g.pad, static_cast<int64_t>(64 / es));  // less than a line
        at += g.pad;
        EXPECT_EQ(static_cast<size_t>(at) * es % 64, static_cast<size_t>(off)) << "es " << es << " offset " << off;
        at += g.count;
      }
    }
  }
  for (int off : {-1, 3, 64}) {  // not a usable offset for 4-byte elements: packed
    aimass::comm::shm_line_pads(segs, 4, off);
    for (const ShmSegment& g : segs) EXPECT_EQ(g.pad, 0) << off;
  }
}

// Staged runs with a lead (ShmAllreduce::run's last argument): every rank's buffers start `lead`
// elements past a 64-byte line, so the chunks are cut on the buffers' lines. Odd sizes around the
// shortened first chunk and the ring wrap, fused segments, in place and out of place, average; a
// lead of a whole chunk or more, or negative, cuts from element 0. Exact against the plain reference.
void run_ranks_with_lead(int L, int64_t lead, ReduceOp op, int parts, bool inplace) {
  const int64_t C = static_cast<int64_t>(kChunk / sizeof(float));
  const int64_t l = lead > 0 && lead < C ? lead : 0;
  const std::vector<int64_t> sizes = {1, 3, C - l - 1, C - l, C - l + 1, 2 * C + 7, 5 * C - l + 3, 9 * C + 11};
  Segment seg(L);
  std::vector<std::string> errors(L);
  // [rank]: one 64-byte aligned block per size, the data `lead` floats in (or at 4 for a clamped lead)
  const int64_t at = lead > 0 && lead < C ? lead : 4;
  std::vector<std::vector<float*>> in(L), out(L);
  std::vector<std::vector<void*>> blocks;
  for (int r = 0; r < L; ++r)
    for (int64_t n : sizes) {
      const size_t bytes = (static_cast<size_t>(n + at) * sizeof(float) + 63) / 64 * 64;
      float* a = static_cast<float*>(std::aligned_alloc(64, bytes));
      float* b = static_cast<float*>(std::aligned_alloc(64, bytes));
      blocks.push_back({a, b});
      for (int64_t i = 0; i < n; ++i) a[at + i] = value(r, static_cast<size_t>(i));
      in[r].push_back(a + at);
      out[r].push_back(inplace ? a + at : b + at);
    }
  run_rank_threads(L, errors, [&](int r) {
    ShmAllreduce shm(r, L, seg.mem, kChunk, 10.0);
    for (size_t c = 0; c < sizes.size(); ++c) {
      const int64_t n = sizes[c];
      std::vector<ShmSegment> segs;
      int64_t done = 0;
      for (int p = 0; p < parts; ++p) {
        const int64_t len = p + 1 == parts ? n - done : std::min<int64_t>(n - done, n / (parts + 1) + 5 * p);
        segs.push_back({reinterpret_cast<const char*>(in[r][c] + done), reinterpret_cast<char*>(out[r][c] + done),
                        len, op == ReduceOp::Average});
        done += len;
      }
      shm.run(segs, n, DType::F32, op == ReduceOp::Average ? ReduceOp::Sum : op, L, nullptr, lead);
    }
  });
  for (int r = 0; r < L; ++r) ASSERT_EQ(errors[r], "") << "rank " << r;
  for (size_t c = 0; c < sizes.size(); ++c) {
    for (int64_t i = 0; i < sizes[c]; ++i) {
      float want = value(0, static_cast<size_t>(i));
      for (int r = 1; r < L; ++r) {
        const float v = value(r, static_cast<size_t>(i));
        want = op == ReduceOp::Min ? std::min(want, v) : op == ReduceOp::Max ? std::max(want, v) : want + v;
      }
      if (op == ReduceOp::Average) want *= 1.0f / static_cast<float>(L);
      for (int r = 0; r < L; ++r)
        ASSERT_EQ(out[r][c][i], want) << "L " << L << " lead " << lead << " rank " << r << " element " << i << " of "
                                      << sizes[c];
    }
  }
  for (auto& b : blocks) {
    std::free(b[0]);
    std::free(b[1]);
  }
}

TEST(CommShm, StagedRunWithALeadCutsOnTheBuffersLines) {
  for (int64_t lead : {1, 4, 15}) {
    run_ranks_with_lead(2, lead, ReduceOp::Sum, 1, true);
    run_ranks_with_lead(2, lead, ReduceOp::Average, 1, false);
    run_ranks_with_lead(3, lead, ReduceOp::Max, 3, false);
    run_ranks_with_lead(4, lead, ReduceOp::Sum, 2, true);
  }
  run_ranks_with_lead(2, static_cast<int64_t>(kChunk / sizeof(float)), ReduceOp::Sum, 1, true);  // clamped to 0
  run_ranks_with_lead(3, -3, ReduceOp::Min, 1, false);
}

// fp64 through the staged run (the reduce pass writes the result slot and the output at once, the average
// divided in the same pass): exact against the plain loops (sum in rank order, `s < d ? s : d`, divided by
// the rank count), at chunk edges, with and without a lead, in place and out of place, 2 and 3 ranks.
void run_f64_ranks(int L, int64_t lead, ReduceOp op, bool inplace) {
  const int64_t C = static_cast<int64_t>(kChunk / sizeof(double));
  const std::vector<int64_t> sizes = {1, 5, C - lead - 1, C - lead, C + 1, 3 * C + 7, 9 * C - lead + 3};
  auto val = [](int r, int64_t i) { return static_cast<double>((i * 7 + r * 13) % 41 - 20) / 3.0 + 1e-9 * r; };
  Segment seg(L);
  std::vector<std::string> errors(L);
  const int64_t at = lead > 0 ? lead : 3;  // a lead of 0 with buffers 24 bytes into a line: cut from 0
  std::vector<std::vector<std::vector<double>>> in(L), out(L);
  auto line = [](std::vector<double>& v) {
    return reinterpret_cast<double*>((reinterpret_cast<uintptr_t>(v.data()) + 63) / 64 * 64);
  };
  for (int r = 0; r < L; ++r)
    for (int64_t n : sizes) {
      in[r].emplace_back(static_cast<size_t>(n + at + 8));
      out[r].emplace_back(static_cast<size_t>(n + at + 8));
      double* a = line(in[r].back()) + at;
      for (int64_t i = 0; i < n; ++i) a[i] = val(r, i);
    }
  run_rank_threads(L, errors, [&](int r) {
    ShmAllreduce shm(r, L, seg.mem, kChunk, 10.0);
    for (size_t c = 0; c < sizes.size(); ++c) {
      double* a = line(in[r][c]) + at;
      double* b = inplace ? a : line(out[r][c]) + at;
      std::vector<ShmSegment> segs{{reinterpret_cast<const char*>(a), reinterpret_cast<char*>(b), sizes[c],
                                    op == ReduceOp::Average}};
      shm.run(segs, sizes[c], DType::F64, op == ReduceOp::Average ? ReduceOp::Sum : op, L, nullptr, lead);
    }
  });
  for (int r = 0; r < L; ++r) ASSERT_EQ(errors[r], "") << "rank " << r;
  for (size_t c = 0; c < sizes.size(); ++c) {
    for (int64_t i = 0; i < sizes[c]; ++i) {
      double want = val(0, i);
      for (int r = 1; r < L; ++r) {
        const double v = val(r, i);
        want = op == ReduceOp::Min ? (v < want ? v : want) : op == ReduceOp::Max ? (v > want ? v : want) : want + v;
      }
      if (op == ReduceOp::Average) want /= L;
      for (int r = 0; r < L; ++r) {
        const double got = (inplace ? line(in[r][c]) : line(out[r][c]))[at + i];
        ASSERT_EQ(std::memcmp(&got, &want, 8), 0) << "L " << L << " lead " << lead << " rank " << r << " element "
                                                  << i << " of " << sizes[c] << ": " << got << " vs " << want;
      }
    }
  }
}

TEST(CommShm, StagedF64MatchesThePlainLoops) {
  for (int64_t lead : {0, 1, 5}) {
    run_f64_ranks(2, lead, ReduceOp::Sum, true);
    run_f64_ranks(2, lead, ReduceOp::Average, false);
    run_f64_ranks(3, lead, ReduceOp::Average, true);
    run_f64_ranks(3, lead, ReduceOp::Min, false);
    run_f64_ranks(2, lead, ReduceOp::Max, true);
  }
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

// Sets environment variables for the life of the object (the wait policy is read when a
// ShmAllreduce is constructed).
struct ScopedEnv {
  std::vector<std::string> names;
  ScopedEnv(std::initializer_list<std::pair<const char*, const char*>> kv) {
    for (auto& p : kv) {
      names.emplace_back(p.first);
      if (p.second) ::setenv(p.first, p.second, 1);
      else ::unsetenv(p.first);
    }
  }
  ~ScopedEnv() {
    for (auto& n : names) ::unsetenv(n.c_str());
  }
};

// Every rank's outputs (as bits) of `calls` allreduces of random fp32 data at the given sizes on L
// threads, staged (single_copy false) or single-copy (push mode, claimed pieces).
std::vector<std::vector<uint32_t>> bits_of_runs(int L, const std::vector<int64_t>& sizes, ReduceOp op,
                                                bool single_copy) {
  Segment seg(L);
  std::vector<std::vector<uint32_t>> out(L);
  std::vector<std::string> errors(L);
  run_rank_threads(L, errors, [&](int r) {
    ShmAllreduce shm(r, L, seg.mem, kChunk, 10.0);
    if (single_copy) shm.allow_cma_for_tests();
    shm.use_cma(single_copy);
    uint64_t state = 0x9e3779b97f4a7c15ull * static_cast<uint64_t>(r + 1);
    for (int64_t n : sizes) {
      std::vector<float> v(static_cast<size_t>(n));
      for (float& x : v) {  // seeded, rank-dependent, not exactly summable: the order shows in the bits
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        x = static_cast<float>(static_cast<int64_t>(state >> 40) - (1 << 23)) * 1e-3f;
      }
      shm.run({{reinterpret_cast<const char*>(v.data()), reinterpret_cast<char*>(v.data()), n, false}}, n,
              DType::F32, op, L, nullptr);
      const size_t at = out[r].size();
      out[r].resize(at + v.size());
      std::memcpy(out[r].data() + at, v.data(), v.size() * sizeof(float));
    }
  });
  for (int r = 0; r < L; ++r) EXPECT_EQ(errors[r], "") << "rank " << r;
  return out;
}

// The futex waits (sleeping right after the spin: every wait that is not answered at once goes to
// the kernel) give the bits of the yield loop, staged and single-copy, at 2, 3 and 4 ranks and odd
// sizes, and every rank holds the same bits.
TEST(CommShm, FutexWaitsGiveTheYieldLoopsBits) {
  const std::vector<int64_t> sizes = {1, 17, 1023, 4097, 3 * 4096 + 5, 40000 + 3};
  for (int L : {2, 3, 4}) {
    for (bool single_copy : {false, true}) {
      std::vector<std::vector<uint32_t>> futex, yield;
      {
        ScopedEnv env({{"AIMASS_SHM_WAIT", nullptr}, {"AIMASS_SHM_YIELD_US", "0"}});
        futex = bits_of_runs(L, sizes, ReduceOp::Sum, single_copy);
      }
      {
        ScopedEnv env({{"AIMASS_SHM_WAIT", "yield"}, {"AIMASS_SHM_YIELD_US", nullptr}});
        yield = bits_of_runs(L, sizes, ReduceOp::Sum, single_copy);
      }
      ASSERT_EQ(futex.size(), static_cast<size_t>(L));
      for (int r = 0; r < L; ++r) {
        EXPECT_EQ(futex[r], yield[r]) << L << " ranks, rank " << r << (single_copy ? " single-copy" : " staged");
        EXPECT_EQ(futex[r], futex[0]) << L << " ranks: rank " << r << " disagrees with rank 0";
      }
    }
  }
}

// A rank asleep on a peer's counter (futex) fails with that peer when it gives up, long before its
// own deadline: the aborting rank wakes it. Single-copy pull mode, 2 ranks: rank 1 posts an input
// address that rank 0's slice cannot be read from (rank 1 itself reads only its own slice), so rank
// 0's process_vm_readv fails and it aborts, while rank 1 (timeout 60 s) waits for rank 0's reduced slice.
TEST(CommShm, SleepingRankFailsWithAPeerThatGivesUp) {
  ScopedEnv env({{"AIMASS_SHM_WAIT", nullptr}, {"AIMASS_SHM_YIELD_US", "0"}});
  Segment seg(2);
  constexpr int64_t n = 8192;  // rank 0's slice: [0, 4096), rank 1's: [4096, 8192)
  std::vector<std::string> errors(2);
  std::vector<double> took(2);
  std::vector<std::thread> threads;
  // (outlive both threads: a peer may read them after their own rank failed)
  std::vector<std::vector<float>> ins(2, std::vector<float>(n, 1.0f)), outs(2, std::vector<float>(n, 0.0f));
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&, r] {
      std::vector<float>& in = ins[r];
      std::vector<float>& out = outs[r];
      std::vector<ShmSegment> segs;
      // two segments on both ranks (the peers' address tables are read with the own segment layout)
      const char* first =
          r == 0 ? reinterpret_cast<const char*>(in.data()) : reinterpret_cast<const char*>(uintptr_t{64});
      segs.push_back({first, reinterpret_cast<char*>(out.data()), n / 2, false});
      segs.push_back({reinterpret_cast<const char*>(in.data() + n / 2), reinterpret_cast<char*>(out.data() + n / 2),
                      n / 2, false});
      const auto t0 = std::chrono::steady_clock::now();
      try {
        ShmAllreduce shm(r, 2, seg.mem, kChunk, 60.0);
        shm.allow_cma_for_tests(/*push=*/false);
        shm.use_cma(true);
        shm.run(segs, n, DType::F32, ReduceOp::Sum, 2, nullptr);
      } catch (const aimass::DistributedError& e) {
        errors[r] = e.what();
      }
      took[r] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_NE(errors[0].find("reading local rank 1's memory failed"), std::string::npos) << errors[0];
  EXPECT_NE(errors[1].find("local rank 0 gave up"), std::string::npos) << errors[1];
  EXPECT_LT(took[1], 30.0) << "rank 1 waited for its own deadline instead of failing with its peer";
}

TEST(CommShm, BadYieldEnvironmentRaisesValueError) {
  ScopedEnv env({{"AIMASS_SHM_YIELD_US", "soon"}});
  Segment seg(2);
  EXPECT_THROW(ShmAllreduce(0, 2, seg.mem, kChunk, 1.0), aimass::ValueError);
}

}  // namespace
