// The low-latency channel's agreement protocol with threads as ranks (one process, no MPI):
// payloads arrive intact, every collective ends alike on every rank (complete everywhere or
// fallen back everywhere) even when ranks disagree, and missing or busy peers make the
// others fall back instead of waiting.
#include <gtest/gtest.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "aimass/error.h"
#include "aimass/shared_host.h"
#include "comm/ll_shm.h"
#include "comm/shm_allreduce.h"
#include "rank_order_reference.h"
#include "rank_threads.h"

namespace {

using aimass::comm::LLChannel;
using Result = LLChannel::Result;

constexpr size_t kSlot = 256;

struct Segment {  // page-aligned, zero-filled memory shared by L thread "ranks", slots of `slot` bytes
  explicit Segment(int L, size_t slot = kSlot) : bytes(LLChannel::segment_bytes(L, slot)) {
    mem = static_cast<char*>(std::aligned_alloc(4096, (bytes + 4095) / 4096 * 4096));
    std::memset(mem, 0, bytes);
  }
  ~Segment() { std::free(mem); }
  size_t bytes;
  char* mem;
};

int64_t payload_value(int rank, int op, int i) { return static_cast<int64_t>(op) * 1000003 + rank * 1009 + i; }

// L ranks run `ops` exchanges; rank (op % L) posts a different hash for ops where disagree(op).
// A rank that falls back marks itself busy and waits until every rank fell back on that op,
// as the engine's negotiation would (a rank that completed instead would leave it waiting).
// Returns outcome[rank][op]; checks the payloads of completed exchanges.
// pause(r, op), when given, runs on rank r before its op-th exchange (late arrivals, preemption); window:
// the exchanges' fallback window in seconds; the hook runs on the last rank between each post and arrival.
using Pause = std::function<void(int, int)>;
std::vector<std::vector<Result>> run(int L, int ops, bool (*disagree)(int), std::vector<std::string>& errors,
                                     const Pause& pause = nullptr, double window = 10.0,
                                     const std::function<void()>& last_rank_arrival_hook = nullptr) {
  Segment seg(L);
  std::vector<std::vector<Result>> outcome(L, std::vector<Result>(ops, Result::Fallback));
  errors.assign(L, "");
  std::vector<std::atomic<int>> fell(static_cast<size_t>(ops));
  for (auto& f : fell) f.store(0);
  run_rank_threads(L, errors, [&](int r) {
    LLChannel ch(r, L, seg.mem, kSlot);
    if (r == L - 1 && last_rank_arrival_hook) ch.set_arrival_hook_for_tests(last_rank_arrival_hook);
    for (int op = 0; op < ops; ++op) {
      const int n = 1 + (op * 7 + r) % 16;  // rows differ by rank (an allgather)
      std::vector<int64_t> mine(static_cast<size_t>(n));
      for (int i = 0; i < n; ++i) mine[static_cast<size_t>(i)] = payload_value(r, op, i);
      const uint64_t hash = disagree(op) && op % L == r ? 0xbad0000u + op : static_cast<uint64_t>(op);
      if (pause) pause(r, op);
      outcome[r][op] = ch.exchange(hash, mine.data(), mine.size() * 8, n, window);
      if (outcome[r][op] != Result::Complete) {  // "the engine": every rank runs op there
        ch.set_busy(1);  // as the engine does while a request is in flight
        fell[static_cast<size_t>(op)].fetch_add(1);
        const auto limit = std::chrono::steady_clock::now() + std::chrono::seconds(20);
        while (fell[static_cast<size_t>(op)].load() < L) {
          if (std::chrono::steady_clock::now() > limit) {
            errors[r] = "op " + std::to_string(op) + ": not every rank fell back";
            return;
          }
          std::this_thread::yield();
        }
        ch.set_busy(0);
        continue;
      }
      for (int j = 0; j < L; ++j) {
        const int nj = 1 + (op * 7 + j) % 16;
        if (ch.rows(j) != nj || ch.bytes(j) != static_cast<size_t>(nj) * 8) {
          errors[r] = "op " + std::to_string(op) + ": rank " + std::to_string(j) + " has the wrong size";
          return;
        }
        for (int i = 0; i < nj; ++i) {
          int64_t v;
          std::memcpy(&v, ch.payload(j) + i * 8, 8);
          if (v != payload_value(j, op, i)) {
            errors[r] = "op " + std::to_string(op) + ": rank " + std::to_string(j) + " payload differs";
            return;
          }
        }
      }
      ch.done();
    }
  });
  return outcome;
}

bool never(int) { return false; }
bool often(int op) { return (op * 2654435761u) % 7 == 0; }

TEST(CommLL, EveryExchangeCompletesWithIntactPayloads) {
  for (int L : {2, 3, 4}) {
    std::vector<std::string> errors;
    auto out = run(L, 1000, never, errors);
    for (int r = 0; r < L; ++r) {
      EXPECT_EQ(errors[r], "") << "L=" << L << " rank " << r;
      for (int op = 0; op < 1000; ++op) ASSERT_EQ(out[r][op], Result::Complete) << "L=" << L << " op " << op;
    }
  }
}

TEST(CommLL, DisagreementEndsAlikeOnEveryRank) {
  for (int L : {2, 3, 4}) {
    std::vector<std::string> errors;
    auto out = run(L, 1000, often, errors);
    int complete = 0;
    for (int r = 0; r < L; ++r) EXPECT_EQ(errors[r], "") << "L=" << L << " rank " << r;
    for (int op = 0; op < 1000; ++op) {
      for (int r = 1; r < L; ++r) ASSERT_EQ(out[r][op], out[0][op]) << "L=" << L << " op " << op;
      if (often(op)) EXPECT_EQ(out[0][op], Result::Fallback) << "L=" << L << " op " << op;
      complete += out[0][op] == Result::Complete;
    }
    EXPECT_GT(complete, 0) << "L=" << L;
  }
}

// Two ranks complete an attempt from the peer's posted slot and post their next one before they look at
// the step word; three and more keep the step word alone. Late arrivals past a short window (aborted
// attempts), preemption between a post and its arrival, and disagreements: every op still ends alike on
// every rank with intact payloads (seeded, so a failure repeats). The last rank's stops between a post and
// its arrival make the peer complete from the post and wait in its next exchange for that arrival, or give
// up on it after the window and take its own next post back.
TEST(CommLL, LateAndPreemptedRanksEndEveryAttemptAlike) {
  for (int L : {2, 3}) {
    std::vector<std::mt19937> rng;
    for (int r = 0; r < L; ++r) rng.emplace_back(1234u + static_cast<unsigned>(r));
    auto pause = [&](int r, int) {
      const unsigned x = rng[static_cast<size_t>(r)]() % 1000;
      if (x < 15) {
        std::this_thread::sleep_for(std::chrono::microseconds(2500 + 20 * x));  // past the 2 ms window
      } else if (x < 150) {
        std::this_thread::yield();
      } else if (x < 250) {
        const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(x % 40);
        while (std::chrono::steady_clock::now() < until) {
        }
      }
    };
    // the last rank stops now and then between its post and its arrival, shorter and longer than the window
    std::mt19937 hook_rng(99);
    auto hook = [&] {
      const unsigned x = hook_rng() % 100;
      if (x < 3) std::this_thread::sleep_for(std::chrono::microseconds(x < 2 ? 400 : 3000));
    };
    std::vector<std::string> errors;
    auto out = run(L, 3000, often, errors, pause, 0.002, hook);
    int complete = 0, fallback = 0;
    for (int r = 0; r < L; ++r) EXPECT_EQ(errors[r], "") << "L=" << L << " rank " << r;
    for (int op = 0; op < 3000; ++op) {
      for (int r = 1; r < L; ++r) ASSERT_EQ(out[r][op], out[0][op]) << "L=" << L << " op " << op;
      if (often(op)) EXPECT_EQ(out[0][op], Result::Fallback) << "L=" << L << " op " << op;
      complete += out[0][op] == Result::Complete;
      fallback += out[0][op] == Result::Fallback && !often(op);
    }
    EXPECT_GT(complete, 1500) << "L=" << L;
    EXPECT_GT(fallback, 0) << "L=" << L << ": no late arrival made an attempt fall back";
  }
}

TEST(CommLL, MissingPeerFallsBackAfterTheWindow) {
  Segment seg(2);
  LLChannel a(0, 2, seg.mem, kSlot), b(1, 2, seg.mem, kSlot);
  int64_t v = 7;
  auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(a.exchange(1, &v, 8, 1, 0.05), Result::Fallback);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_GE(s, 0.04);
  EXPECT_LT(s, 2.0);
  // the late rank finds the attempt aborted, starts its own and falls back too
  EXPECT_EQ(b.exchange(1, &v, 8, 1, 0.05), Result::Fallback);
  // then both meet again
  std::thread t([&] { EXPECT_EQ(b.exchange(2, &v, 8, 1, 10.0), Result::Complete); b.done(); });
  EXPECT_EQ(a.exchange(2, &v, 8, 1, 10.0), Result::Complete);
  a.done();
  t.join();
}

TEST(CommLL, BusyPeerMakesTheOthersFallBackWithinTheGrace) {
  Segment seg(2);
  LLChannel a(0, 2, seg.mem, kSlot), b(1, 2, seg.mem, kSlot);
  b.set_busy(1);  // rank 1 runs something through its engine and does not come
  int64_t v = 7;
  auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(a.exchange(1, &v, 8, 1, 30.0), Result::Fallback);
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 5.0);
  EXPECT_THROW(a.exchange(1, &v, kSlot + 1, 1, 1.0), aimass::ValueError);
}

// Single copy (broadcast/allgather of 16 KiB or more): peers read the posted buffer itself, and
// its owner may change it only after wait_readers(), which waits for every reader.
TEST(CommLL, ByAddressPayloadsAreReadFromTheWritersBuffer) {
  constexpr int L = 3;
  constexpr size_t kBig = LLChannel::kCmaMin + 4 * 1000 + 12;  // not a multiple of anything round
  Segment seg(L, kBig);
  std::vector<std::vector<unsigned char>> got(L, std::vector<unsigned char>(L * kBig));
  std::vector<std::thread> threads;
  for (int r = 0; r < L; ++r) {
    threads.emplace_back([&, r] {
      LLChannel ch(r, L, seg.mem, kBig);
      ch.allow_cma_for_tests();
      for (int round = 0; round < 20; ++round) {
        std::vector<unsigned char> mine(kBig);
        for (size_t i = 0; i < kBig; ++i) mine[i] = static_cast<unsigned char>(i * 7 + r * 31 + round);
        ASSERT_EQ(ch.exchange(42 + round, mine.data(), kBig, 1, 30.0, /*by_address=*/true), Result::Complete);
        for (int j = 0; j < L; ++j) {
          EXPECT_EQ(ch.payload(j), nullptr);  // nothing in the slots
          EXPECT_EQ(ch.bytes(j), kBig);
          ch.read(j, 0, got[r].data() + j * kBig, kBig);
        }
        ch.done();
        ASSERT_TRUE(ch.wait_readers(30.0));
        std::fill(mine.begin(), mine.end(), 0xee);  // safe now: every peer has its copy
        for (int j = 0; j < L; ++j)
          for (size_t i = 0; i < kBig; i += 997)
            ASSERT_EQ(got[r][j * kBig + i], static_cast<unsigned char>(i * 7 + j * 31 + round)) << r << " " << j;
      }
    });
  }
  for (auto& t : threads) t.join();
  // small payloads stay in the slots even when asked by address
  {
    std::memset(seg.mem, 0, seg.bytes);
    LLChannel a(0, 2, seg.mem, kBig), b(1, 2, seg.mem, kBig);
    a.allow_cma_for_tests();
    b.allow_cma_for_tests();
    int64_t v = 5, w = 6;
    std::thread t([&] { EXPECT_EQ(b.exchange(1, &w, 8, 1, 10.0, true), Result::Complete); });
    EXPECT_EQ(a.exchange(1, &v, 8, 1, 10.0, true), Result::Complete);
    t.join();
    ASSERT_NE(a.payload(1), nullptr);
    int64_t x = 0;
    a.read(1, 0, &x, 8);
    EXPECT_EQ(x, 6);
    a.done();
    b.done();
    EXPECT_TRUE(a.wait_readers(0.01));
  }
}

TEST(CommLL, WaitReadersGivesUpOnAReaderThatNeverFinishes) {
  constexpr size_t kBig = LLChannel::kCmaMin;
  Segment seg(2, kBig);
  {
    LLChannel a(0, 2, seg.mem, kBig), b(1, 2, seg.mem, kBig);
    a.allow_cma_for_tests();
    b.allow_cma_for_tests();
    std::vector<char> pa(kBig, 1), pb(kBig, 2);
    std::thread t([&] { EXPECT_EQ(b.exchange(9, pb.data(), kBig, 1, 10.0, true), Result::Complete); });
    EXPECT_EQ(a.exchange(9, pa.data(), kBig, 1, 10.0, true), Result::Complete);
    t.join();
    a.done();  // b "stopped" before done(): a must not return as if its buffer were free
    auto t0 = std::chrono::steady_clock::now();
    EXPECT_FALSE(a.wait_readers(0.05));
    EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 5.0);
    b.done();
    EXPECT_TRUE(a.wait_readers(1.0));
    EXPECT_TRUE(b.wait_readers(1.0));
  }
}

// ---- single-copy allreduce (ll_push.cc)
using aimass::DType;
using aimass::ReduceOp;

template <typename T>
T push_input(DType dtype, int r, int call, int64_t i) {
  const int v = static_cast<int>((i * 31 + r * 17 + call * 7) % 97) - 48;
  if constexpr (std::is_floating_point_v<T>) return static_cast<T>(v) * static_cast<T>(0.1);
  else if constexpr (std::is_same_v<T, uint16_t>)  // 16-bit float bits: 1 +- small
    return static_cast<T>((dtype == DType::F16 ? 0x3c00 : 0x3f80) + (v & 0x3f));
  else if (dtype == DType::Bool) return static_cast<T>(v % 3 == 0);
  else return static_cast<T>(v);
}

// L thread ranks run single-copy allreduces of odd sizes (less than a piece, a piece and one more
// element, several pieces and a tail), in place and out of place alternately, with a slot
// exchange in between (the claim counter's bases must stay in step across both); every rank must
// hold the rank-order reduction's exact bits.
// staged: the staged allreduce (LLChannel::stage_allreduce) instead of the push, after the same exchange.
// Every rank's result of call c (got[rank][c], counts[c] elements of push_input) equals the rank-order
// reference reduce_into, bit for bit; what names the variant in a failure.
template <typename T>
void expect_reference_bits(int L, DType dtype, ReduceOp op, bool average, const std::vector<int64_t>& counts,
                           const std::vector<std::vector<std::vector<T>>>& got, const std::string& what) {
  for (size_t c = 0; c < counts.size(); ++c) {
    const int64_t n = counts[c];
    const std::vector<T> want = rank_order_reference<T>(
        L, dtype, op, average, n, [&](int r, int64_t i) { return push_input<T>(dtype, r, static_cast<int>(c), i); });
    for (int r = 0; r < L; ++r)
      ASSERT_EQ(std::memcmp(got[r][c].data(), want.data(), static_cast<size_t>(n) * sizeof(T)), 0)
          << "L " << L << " rank " << r << " n " << n << " dtype " << aimass::dtype_name(dtype) << " " << what;
  }
}

// mapped: every rank's buffers in a shared host buffer, which the peers map and reduce in with loads and
// stores (LLChannel::set_maps_peers); the same bits as through the kernel
template <typename T>
void push_same_bits(int L, DType dtype, ReduceOp op, bool average, bool full_pieces = false, bool staged = false,
                    bool mapped = false) {
  // (pieces shrink below 4 per rank: these sizes cut 16, 32 and 96 KiB pieces at 2 ranks)
  const int64_t step = static_cast<int64_t>(LLChannel::kPushPiece / sizeof(T));
  std::vector<int64_t> counts = {static_cast<int64_t>(LLChannel::kCmaMin / sizeof(T)) + 5, step + 1, 3 * step + 37};
  if (full_pieces) counts.push_back(4 * L * step + 3 * step / 2 + 11);  // whole kPushPiece pieces and a tail
  Segment seg(L);
  std::vector<std::vector<std::vector<T>>> got(L);  // [rank][call]
  std::vector<std::string> errors(L);
  run_rank_threads(L, errors, [&](int r) {
    LLChannel ch(r, L, seg.mem, kSlot);
    ch.allow_cma_for_tests();
    ch.set_maps_peers(mapped);
    for (size_t c = 0; c < counts.size(); ++c) {
      const int64_t n = counts[c];
      std::vector<T> priv(2 * static_cast<size_t>(n) + 16, T(0x5a));
      std::unique_ptr<aimass::SharedHostBuffer> sb;
      T* buf = priv.data();
      if (mapped) {
        sb = std::make_unique<aimass::SharedHostBuffer>(priv.size() * sizeof(T));
        buf = static_cast<T*>(sb->data());
        std::copy(priv.begin(), priv.end(), buf);
      }
      T* in = buf + 1;  // (not on a line)
      T* out = in + n + 5;
      for (int64_t i = 0; i < n; ++i) in[i] = push_input<T>(dtype, r, static_cast<int>(c), i);
      const bool inplace = (c + static_cast<size_t>(L)) % 2 == 0;
      T* o = inplace ? in : out;
      if (ch.exchange(100 + c, in, static_cast<size_t>(n) * sizeof(T), 0, 30.0, true, o) != Result::Complete)
        throw std::runtime_error("exchange fell back");
      if (staged) ch.stage_allreduce(dtype, op, average, in, o, n, 30.0);
      else ch.push_allreduce(dtype, op, average, in, o, n);
      if (!staged && ch.last_push_mapped() != mapped) throw std::runtime_error("the push did not map as expected");
      ch.done();
      if (!ch.wait_readers(30.0)) throw std::runtime_error("a peer never finished");
      got[r].push_back(std::vector<T>(o, o + n));
      int64_t small = r;  // a slot exchange between two single-copy allreduces
      if (ch.exchange(7, &small, 8, 1, 30.0) != Result::Complete) throw std::runtime_error("slot fell back");
      ch.done();
    }
  });
  for (int r = 0; r < L; ++r) ASSERT_EQ(errors[r], "") << "rank " << r;
  expect_reference_bits<T>(L, dtype, op, average, counts, got, staged ? "staged" : "push");
}

TEST(CommLL, PushAllreduceEveryDtypeAndOpSameBitsOnEveryRank) {
  for (int L : {2, 3, 4}) {
    for (ReduceOp op : {ReduceOp::Sum, ReduceOp::Min, ReduceOp::Max, ReduceOp::Product}) {
      push_same_bits<float>(L, DType::F32, op, false);
      push_same_bits<double>(L, DType::F64, op, false);
      push_same_bits<uint16_t>(L, DType::F16, op, false);
      push_same_bits<uint16_t>(L, DType::BF16, op, false);
      push_same_bits<int8_t>(L, DType::I8, op, false);
      push_same_bits<uint8_t>(L, DType::U8, op, false);
      push_same_bits<int16_t>(L, DType::I16, op, false);
      push_same_bits<int32_t>(L, DType::I32, op, false);
      push_same_bits<int64_t>(L, DType::I64, op, false);
      push_same_bits<uint8_t>(L, DType::Bool, op, false);
    }
    push_same_bits<float>(L, DType::F32, ReduceOp::Sum, true, true);
    push_same_bits<double>(L, DType::F64, ReduceOp::Max, false, true);
    push_same_bits<double>(L, DType::F64, ReduceOp::Sum, true);
    push_same_bits<uint16_t>(L, DType::BF16, ReduceOp::Sum, true);
    push_same_bits<int32_t>(L, DType::I32, ReduceOp::Sum, true);
  }
}

// The staged allreduce at 2-4 thread ranks: every dtype and op, odd sizes (less than a chunk, a
// chunk's worth of pieces and one more element, many chunks around the staging rings and a tail), in
// place and out of place, between slot exchanges: the rank-order reduction's exact bits on every rank.
TEST(CommLL, PushAllreduceInMappedSharedBuffersSameBits) {
  for (int L : {2, 3, 4}) {
    for (ReduceOp op : {ReduceOp::Sum, ReduceOp::Min, ReduceOp::Max, ReduceOp::Product}) {
      push_same_bits<float>(L, DType::F32, op, false, false, false, true);
      push_same_bits<double>(L, DType::F64, op, false, false, false, true);
      push_same_bits<uint16_t>(L, DType::F16, op, false, false, false, true);
      push_same_bits<uint16_t>(L, DType::BF16, op, false, false, false, true);
      push_same_bits<int32_t>(L, DType::I32, op, false, false, false, true);
    }
    push_same_bits<float>(L, DType::F32, ReduceOp::Sum, true, true, false, true);
    push_same_bits<double>(L, DType::F64, ReduceOp::Sum, true, true, false, true);
    push_same_bits<uint16_t>(L, DType::BF16, ReduceOp::Sum, true, true, false, true);
    push_same_bits<uint16_t>(L, DType::F16, ReduceOp::Sum, true, true, false, true);
  }
}

TEST(CommLL, StagedAllreduceEveryDtypeAndOpSameBitsOnEveryRank) {
  for (int L : {2, 3, 4}) {
    for (ReduceOp op : {ReduceOp::Sum, ReduceOp::Min, ReduceOp::Max, ReduceOp::Product}) {
      push_same_bits<float>(L, DType::F32, op, false, false, true);
      push_same_bits<double>(L, DType::F64, op, false, false, true);
      push_same_bits<uint16_t>(L, DType::F16, op, false, false, true);
      push_same_bits<uint16_t>(L, DType::BF16, op, false, false, true);
      push_same_bits<int8_t>(L, DType::I8, op, false, false, true);
      push_same_bits<uint8_t>(L, DType::U8, op, false, false, true);
      push_same_bits<int16_t>(L, DType::I16, op, false, false, true);
      push_same_bits<int32_t>(L, DType::I32, op, false, false, true);
      push_same_bits<int64_t>(L, DType::I64, op, false, false, true);
      push_same_bits<uint8_t>(L, DType::Bool, op, false, false, true);
    }
    push_same_bits<float>(L, DType::F32, ReduceOp::Sum, true, true, true);
    push_same_bits<double>(L, DType::F64, ReduceOp::Max, false, true, true);
    push_same_bits<double>(L, DType::F64, ReduceOp::Sum, true, false, true);
    push_same_bits<uint16_t>(L, DType::F16, ReduceOp::Sum, true, true, true);
    push_same_bits<uint16_t>(L, DType::BF16, ReduceOp::Sum, true, false, true);
    push_same_bits<int32_t>(L, DType::I32, ReduceOp::Sum, true, false, true);
  }
}

// The staged allreduce where every rank's buffers start `offs[r]` bytes past a 64-byte line, each rank
// posting stage_vote(bytes, out) as the engine does: equal offsets (numpy's 16 bytes; the chunks are cut on
// the buffers' lines) and unequal ones (cut from element 0); odd sizes around the shortened first chunk and
// the ring wrap, in place and out of place: the rank-order reduction's exact bits on every rank.
template <typename T>
void staged_offsets_same_bits(DType dtype, ReduceOp op, bool average, const std::vector<size_t>& offs) {
  const int L = static_cast<int>(offs.size());
  const int64_t C = static_cast<int64_t>((512u << 10) / sizeof(T));  // the staging chunk up to 4 ranks
  const int64_t lead = static_cast<int64_t>(offs[0] / sizeof(T));
  const std::vector<int64_t> counts = {static_cast<int64_t>(LLChannel::kCmaMin / sizeof(T)) + 5, C - lead - 1,
                                       C - lead + 1, 4 * C + 3};
  Segment seg(L);
  std::vector<std::vector<std::vector<T>>> got(L);
  std::vector<std::string> errors(L);
  run_rank_threads(L, errors, [&](int r) {
    LLChannel ch(r, L, seg.mem, kSlot);
    ch.allow_cma_for_tests();
    for (size_t c = 0; c < counts.size(); ++c) {
      const int64_t n = counts[c];
      const size_t room = (static_cast<size_t>(n) * sizeof(T) + offs[r] + 63) / 64 * 64;
      std::unique_ptr<char, decltype(&std::free)> a(static_cast<char*>(std::aligned_alloc(64, room)), &std::free),
          b(static_cast<char*>(std::aligned_alloc(64, room)), &std::free);
      T* in = reinterpret_cast<T*>(a.get() + offs[r]);
      for (int64_t i = 0; i < n; ++i) in[i] = push_input<T>(dtype, r, static_cast<int>(c), i);
      T* o = c % 2 == 0 ? in : reinterpret_cast<T*>(b.get() + offs[r]);
      const size_t nb = static_cast<size_t>(n) * sizeof(T);
      if (ch.exchange(300 + c, in, nb, ch.stage_vote(nb, o), 30.0, true, o) != Result::Complete)
        throw std::runtime_error("exchange fell back");
      ch.stage_allreduce(dtype, op, average, in, o, n, 30.0);
      ch.done();
      if (!ch.wait_readers(30.0)) throw std::runtime_error("a peer never finished");
      got[r].push_back(std::vector<T>(o, o + n));
      int64_t small = r;
      if (ch.exchange(7, &small, 8, 1, 30.0) != Result::Complete) throw std::runtime_error("slot fell back");
      ch.done();
    }
  });
  for (int r = 0; r < L; ++r) ASSERT_EQ(errors[r], "") << "rank " << r;
  std::string offsets = "offsets";
  for (size_t o : offs) offsets += " " + std::to_string(o);
  expect_reference_bits<T>(L, dtype, op, average, counts, got, offsets);
}

TEST(CommLL, StagedAllreduceOnBuffersPastALineSameBitsOnEveryRank) {
  staged_offsets_same_bits<float>(DType::F32, ReduceOp::Sum, false, {16, 16});
  staged_offsets_same_bits<float>(DType::F32, ReduceOp::Sum, true, {48, 48, 48});
  staged_offsets_same_bits<float>(DType::F32, ReduceOp::Max, false, {16, 32});  // unequal: no lead
  staged_offsets_same_bits<double>(DType::F64, ReduceOp::Min, false, {8, 8, 8, 8});
  staged_offsets_same_bits<uint16_t>(DType::F16, ReduceOp::Sum, true, {16, 16});
  staged_offsets_same_bits<uint16_t>(DType::BF16, ReduceOp::Sum, false, {2, 2, 2});
  staged_offsets_same_bits<int8_t>(DType::I8, ReduceOp::Sum, false, {17, 17});
  staged_offsets_same_bits<int32_t>(DType::I32, ReduceOp::Product, false, {16, 16, 16, 16});
}

// The staged-or-push choice of large allreduces (AIMASS_LL_STAGED unset): each way's first run in a size
// class is cold (the staged run faults in the staging area, the push its scratch) and the first two are
// not timed, so the first calls of a class run staged x3, push x3, whatever the timings say; only then do
// the timings choose. Every rank takes the same way (the votes of one attempt) and gets the rank-order bits.
TEST(CommLL, LargeAllreduceTimesEachWayOnlyAfterItsColdRun) {
  const int L = 2;
  const int64_t n = static_cast<int64_t>(3 * LLChannel::kPushPiece) + 5;
  Segment seg(L);
  const int calls = 8;
  std::vector<std::vector<int>> ways(L);
  std::vector<std::vector<std::vector<float>>> got(L);
  std::vector<std::string> errors(L);
  run_rank_threads(L, errors, [&](int r) {
    LLChannel ch(r, L, seg.mem, kSlot);
    ch.allow_cma_for_tests();
    std::vector<float> x(static_cast<size_t>(n));
    for (int c = 0; c < calls; ++c) {
      for (int64_t i = 0; i < n; ++i) x[static_cast<size_t>(i)] = push_input<float>(DType::F32, r, c, i);
      const size_t nb = static_cast<size_t>(n) * 4;
      if (ch.exchange(900 + c, x.data(), nb, ch.stage_vote(nb, x.data()), 30.0, true, x.data()) !=
          Result::Complete)
        throw std::runtime_error("exchange fell back");
      ways[r].push_back(ch.agree_staged() ? 1 : 0);
      ch.large_allreduce(DType::F32, ReduceOp::Sum, false, x.data(), x.data(), n, 30.0);
      ch.done();
      if (!ch.wait_readers(30.0)) throw std::runtime_error("a peer never finished");
      got[r].push_back(x);
    }
  });
  for (int r = 0; r < L; ++r) ASSERT_EQ(errors[r], "") << "rank " << r;
  EXPECT_EQ(ways[0], ways[1]);
  ASSERT_EQ(ways[0].size(), static_cast<size_t>(calls));
  EXPECT_EQ(std::vector<int>(ways[0].begin(), ways[0].begin() + 6), (std::vector<int>{1, 1, 1, 0, 0, 0}))
      << "staged x3, push x3 before the timings choose";
  expect_reference_bits<float>(L, DType::F32, ReduceOp::Sum, false, std::vector<int64_t>(calls, n), got,
                               "large allreduce");
}

// A peer that arrived but never stages (stopped): the other rank's staged allreduce raises
// DistributedError at the deadline instead of hanging.
TEST(CommLL, StagedAllreduceWithAStoppedPeerRaisesAtTheDeadline) {
  const int64_t n = static_cast<int64_t>(3 * LLChannel::kPushPiece / 4) + 3;
  Segment seg(2);
  {
    LLChannel a(0, 2, seg.mem, kSlot), b(1, 2, seg.mem, kSlot);
    a.allow_cma_for_tests();  // (the exchange posts the buffers by address, as the engine's does)
    b.allow_cma_for_tests();
    std::vector<float> xa(static_cast<size_t>(n), 1.0f), xb(static_cast<size_t>(n), 2.0f);
    std::thread t([&] {
      EXPECT_EQ(b.exchange(5, xb.data(), xb.size() * 4, 0, 10.0, true, xb.data()), Result::Complete);
    });
    const Result got = a.exchange(5, xa.data(), xa.size() * 4, 0, 10.0, true, xa.data());
    t.join();
    ASSERT_EQ(got, Result::Complete);
    const auto t0 = std::chrono::steady_clock::now();
    EXPECT_THROW(a.stage_allreduce(DType::F32, ReduceOp::Sum, false, xa.data(), xa.data(), n, 0.2),
                 aimass::DistributedError);  // b never stages
    const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    EXPECT_GE(took, 0.2);  // it waited for the deadline (a behaviour bound, not a speed goal)
    EXPECT_EQ(xb[0], 2.0f);  // nobody wrote b's buffer
    a.done();
    b.done();
  }
}

// A peer that arrived but never runs its claims (stopped): the other rank claims every piece
// itself, and its wait for the peer gives up at the deadline instead of hanging.
TEST(CommLL, PushAllreduceWithAStoppedPeerEndsAtTheDeadline) {
  const int64_t n = static_cast<int64_t>(2 * LLChannel::kPushPiece / 4) + 3;
  Segment seg(2);
  {
    LLChannel a(0, 2, seg.mem, kSlot), b(1, 2, seg.mem, kSlot);
    a.allow_cma_for_tests();
    b.allow_cma_for_tests();
    std::vector<float> xa(static_cast<size_t>(n), 1.0f), xb(static_cast<size_t>(n), 2.0f);
    std::thread t([&] {
      EXPECT_EQ(b.exchange(5, xb.data(), xb.size() * 4, 0, 10.0, true, xb.data()), Result::Complete);
    });
    ASSERT_EQ(a.exchange(5, xa.data(), xa.size() * 4, 0, 10.0, true, xa.data()), Result::Complete);
    t.join();
    a.push_allreduce(DType::F32, ReduceOp::Sum, false, xa.data(), xa.data(), n);  // b never claims
    a.done();
    EXPECT_FALSE(a.wait_readers(0.05));
    for (int64_t i = 0; i < n; i += 1001) {
      ASSERT_EQ(xa[i], 3.0f);
      ASSERT_EQ(xb[i], 3.0f);  // a pushed every piece into b's output
    }
    b.push_allreduce(DType::F32, ReduceOp::Sum, false, xb.data(), xb.data(), n);  // only its failed claim
    b.done();
    EXPECT_TRUE(a.wait_readers(1.0));
    EXPECT_TRUE(b.wait_readers(1.0));
    EXPECT_EQ(xb[n - 1], 3.0f);
  }
}

namespace {
// The first CPU this thread may use and its whole mask; false when it may use only one.
bool two_cpus(cpu_set_t* mask, int* first) {
  if (sched_getaffinity(0, sizeof(*mask), mask) != 0 || CPU_COUNT(mask) < 2) return false;
  for (int c = 0; c < CPU_SETSIZE; ++c)
    if (CPU_ISSET(c, mask)) {
      *first = c;
      return true;
    }
  return false;
}
// Puts the calling thread on `cpu` (a moment's affinity of that CPU alone), then gives it `mask` back.
void move_to(int cpu, const cpu_set_t& mask) {
  cpu_set_t one;
  CPU_ZERO(&one);
  CPU_SET(cpu, &one);
  sched_setaffinity(0, sizeof(one), &one);
  sched_setaffinity(0, sizeof(mask), &mask);
}
}  // namespace

// LLChannel::step_off: the thread runs elsewhere while its mask excludes the CPU, and gets its whole
// mask back; nothing to do for a thread that may use that CPU alone, or that runs on another.
TEST(CommLL, StepOffLeavesTheCpuAndRestoresTheMask) {
  cpu_set_t orig;
  int c0 = -1;
  if (!two_cpus(&orig, &c0)) GTEST_SKIP() << "needs two usable CPUs";
  int got = -1;
  for (int t = 0; t < 100 && got < 0; ++t) {  // (the balancer may move us between move_to and the look)
    move_to(c0, orig);
    got = LLChannel::step_off(c0);
  }
  ASSERT_GE(got, 0);
  EXPECT_NE(got, c0);
  EXPECT_TRUE(CPU_ISSET(got, &orig));
  cpu_set_t now;
  ASSERT_EQ(sched_getaffinity(0, sizeof(now), &now), 0);
  EXPECT_TRUE(CPU_EQUAL(&now, &orig));
  cpu_set_t one;
  CPU_ZERO(&one);
  CPU_SET(c0, &one);
  ASSERT_EQ(sched_setaffinity(0, sizeof(one), &one), 0);
  EXPECT_EQ(LLChannel::step_off(c0), -1);  // its only CPU: stays
  ASSERT_EQ(sched_setaffinity(0, sizeof(orig), &orig), 0);
  EXPECT_EQ(LLChannel::step_off(-1), -1);
  EXPECT_GE(LLChannel::runnable_threads(), 1);  // this thread runs
}

// Two ranks on one CPU (rank 1 held there by its mask, rank 0 put there before each call and free to
// move; rank 1 arrives late, so rank 0 waits): rank 0 steps off in its wait, the allreduces (push and
// staged, as the vote picks) keep the rank-order bits, rank 0 ends with its whole mask, and rank 1,
// which may use no other CPU, never steps.
TEST(CommLL, RanksOnOneCpuStepApartWithTheSameBits) {
  cpu_set_t orig;
  int c0 = -1;
  if (!two_cpus(&orig, &c0)) GTEST_SKIP() << "needs two usable CPUs";
  const int L = 2, calls = 6;
  const int64_t n = static_cast<int64_t>(3 * LLChannel::kPushPiece) + 5;
  Segment seg(L);
  std::vector<std::vector<std::vector<float>>> got(L);
  std::vector<uint64_t> steps(L, 0);
  std::vector<int> mask_back(L, 0);
  std::vector<std::string> errors(L);
  run_rank_threads(L, errors, [&](int r) {
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(c0, &one);
    if (r == 1) sched_setaffinity(0, sizeof(one), &one);
    else move_to(c0, orig);
    LLChannel ch(r, L, seg.mem, kSlot);
    ch.allow_cma_for_tests();
    ch.set_step_off(true, /*idle_only=*/false);  // (the test machine may be busy)
    std::vector<float> x(static_cast<size_t>(n));
    for (int c = 0; c < calls; ++c) {
      for (int64_t i = 0; i < n; ++i) x[static_cast<size_t>(i)] = push_input<float>(DType::F32, r, c, i);
      const size_t nb = static_cast<size_t>(n) * 4;
      if (r == 1) std::this_thread::sleep_for(std::chrono::milliseconds(5));
      else move_to(c0, orig);
      if (ch.exchange(900 + c, x.data(), nb, ch.stage_vote(nb, x.data()), 30.0, true, x.data()) !=
          Result::Complete)
        throw std::runtime_error("exchange fell back");
      ch.agree_staged();
      ch.large_allreduce(DType::F32, ReduceOp::Sum, false, x.data(), x.data(), n, 30.0);
      ch.done();
      if (!ch.wait_readers(30.0)) throw std::runtime_error("a peer never finished");
      got[r].push_back(x);
    }
    steps[r] = ch.step_offs();
    cpu_set_t now;
    sched_getaffinity(0, sizeof(now), &now);
    mask_back[r] = CPU_EQUAL(&now, r == 1 ? &one : &orig) ? 1 : 0;
    sched_setaffinity(0, sizeof(orig), &orig);
  });
  for (int r = 0; r < L; ++r) ASSERT_EQ(errors[r], "") << "rank " << r;
  EXPECT_GE(steps[0], 1u) << "rank 0 waited on its peer's CPU " << calls << " times";
  EXPECT_EQ(steps[1], 0u);
  EXPECT_EQ(mask_back, (std::vector<int>{1, 1}));
  expect_reference_bits<float>(L, DType::F32, ReduceOp::Sum, false, std::vector<int64_t>(calls, n), got,
                               "ranks on one CPU");
}

}  // namespace

// ---- eager broadcast (ll_eager.cc)
namespace {
void fill_sig(LLChannel::EagerSig& s, const void* ctx) {
  const int64_t shape[1] = {*static_cast<const int64_t*>(ctx)};
  s.set(aimass::DType::I64, 0, "eager.test", shape, 1);
}
}  // namespace

// Rotating roots, far more broadcasts than the ring holds, receivers that lag: every payload
// arrives intact and in order, and the roots never wait for more than the ring's room.
TEST(LLEager, StreamOfBroadcastsFromRotatingRoots) {
  constexpr int L = 3, kOps = 200;
  Segment seg(L);
  std::vector<std::string> errors(L);
  auto rank = [&](int r) {
    LLChannel ch(r, L, seg.mem, kSlot);
    for (int op = 0; op < kOps; ++op) {
      const int root = op % L;
      int64_t n = 1 + op % 20;
      std::vector<int64_t> buf(static_cast<size_t>(n), -1);
      if (r == root)
        for (int64_t i = 0; i < n; ++i) buf[static_cast<size_t>(i)] = payload_value(root, op, static_cast<int>(i));
      if (r == 2 && op % 17 == 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));  // a lagging rank
      ch.settle(10.0, LLChannel::ring_lag());
      const uint64_t hash = 0x1000u + static_cast<uint64_t>(op);
      const size_t bytes = static_cast<size_t>(n) * 8;
      const auto got = r == root ? ch.eager_root(hash, buf.data(), bytes, true, fill_sig, &n)
                                 : ch.eager_receive(hash, root, buf.data(), bytes, fill_sig, &n, 10.0);
      if (got != LLChannel::Eager::Done) throw std::runtime_error("op " + std::to_string(op) + " not eager");
      for (int64_t i = 0; i < n; ++i)
        if (buf[static_cast<size_t>(i)] != payload_value(root, op, static_cast<int>(i)))
          throw std::runtime_error("op " + std::to_string(op) + ": wrong payload");
    }
    ch.settle(10.0);
  };
  run_rank_threads(L, errors, rank);
  for (int r = 0; r < L; ++r) EXPECT_EQ(errors[r], "") << "rank " << r;
}

// A receiver whose signature differs raises at once naming both sides; the root's broadcast went
// through and its next settle raises the same message, once; the stream goes on.
TEST(LLEager, MismatchRaisesOnTheReceiverAtOnceAndOnTheRootAtItsNextCollective) {
  Segment seg(2);
  LLChannel root(0, 2, seg.mem, kSlot), recv(1, 2, seg.mem, kSlot);
  int64_t n2 = 2, n3 = 3;
  int64_t data[3] = {7, 8, 9}, out[3] = {0, 0, 0};
  ASSERT_EQ(root.eager_root(42, data, 16, true, fill_sig, &n2), LLChannel::Eager::Done);
  try {
    recv.eager_receive(43, 0, out, 24, fill_sig, &n3, 1.0);
    FAIL() << "no mismatch raised";
  } catch (const aimass::DistributedError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("different arguments"), std::string::npos) << m;
    EXPECT_NE(m.find("int64[3]"), std::string::npos) << m;
    EXPECT_NE(m.find("int64[2]"), std::string::npos) << m;
  }
  EXPECT_THROW(root.settle(1.0), aimass::DistributedError);
  EXPECT_NO_THROW(root.settle(1.0));  // once
  EXPECT_NO_THROW(recv.settle(1.0));  // the receiver raised it already
  ASSERT_EQ(root.eager_root(44, data, 24, true, fill_sig, &n3), LLChannel::Eager::Done);
  ASSERT_EQ(recv.eager_receive(44, 0, out, 24, fill_sig, &n3, 1.0), LLChannel::Eager::Done);
  EXPECT_EQ(out[2], 9);
}

// A receiver whose root does not post within the fallback window claims the entry; the root then
// joins it on the normal path (same signature) or skips the claimed entry (another signature);
// a root that waits for a receiver that never comes raises within the deadline.
TEST(LLEager, ClaimsAlignTheStreamAndSettleHonoursTheDeadline) {
  Segment seg(2);
  LLChannel root(0, 2, seg.mem, kSlot), recv(1, 2, seg.mem, kSlot);
  int64_t n = 1, x = 5, y = 0;
  EXPECT_EQ(recv.eager_receive(7, 0, &y, 8, fill_sig, &n, 0.01), LLChannel::Eager::Normal);  // claims entry 1
  EXPECT_EQ(root.eager_root(7, &x, 8, true, fill_sig, &n), LLChannel::Eager::Normal);        // joins it
  EXPECT_EQ(recv.eager_receive(8, 0, &y, 8, fill_sig, &n, 0.01), LLChannel::Eager::Normal);  // claims entry 2
  EXPECT_EQ(root.eager_root(9, &x, 8, true, fill_sig, &n), LLChannel::Eager::Done);          // skips it, posts 3
  EXPECT_EQ(recv.eager_receive(9, 0, &y, 8, fill_sig, &n, 1.0), LLChannel::Eager::Done);
  EXPECT_EQ(y, 5);
  ASSERT_EQ(root.eager_root(10, &x, 8, true, fill_sig, &n), LLChannel::Eager::Done);  // nobody receives it
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_THROW(root.settle(0.2), aimass::DistributedError);
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 5.0);
}

// Single copy in the stream: roots post their buffers by address (any size), receivers read them, and
// from kHelpMin the root writes pieces into the receivers' outputs while they read the rest (odd sizes:
// a partial last piece). Rotating roots at 2-4 ranks; every receiver gets the root's bytes exactly, and
// the root changes its buffer only after every receiver acknowledged.
TEST(LLEager, ByAddressBroadcastsWithTheRootWritingPieces) {
  for (int L = 2; L <= 4; ++L) {
    Segment seg(L);
    std::vector<std::string> errors(L);
    const size_t sizes[] = {8, 4100, 65539, LLChannel::kHelpMin - 8, LLChannel::kHelpMin + 12345, (1u << 20) + 7};
    auto rank = [&](int r) {
      LLChannel ch(r, L, seg.mem, kSlot);
      ch.allow_cma_for_tests();
      int op = 0;
      for (size_t bytes : sizes) {
        for (int k = 0; k < 2 * L; ++k, ++op) {
          const int root = (op + k) % L;
          std::vector<uint8_t> buf(bytes, 0);
          auto value = [&](size_t i) { return static_cast<uint8_t>((i * 131 + static_cast<size_t>(op) * 7 + 3) & 0xff); };
          if (r == root)
            for (size_t i = 0; i < bytes; ++i) buf[i] = value(i);
          ch.settle(10.0, LLChannel::ring_lag());
          int64_t n = static_cast<int64_t>(bytes);
          const uint64_t hash = 0x5000u + static_cast<uint64_t>(op);
          LLChannel::Eager got;
          if (r == root) {
            got = ch.eager_root(hash, buf.data(), bytes, true, fill_sig, &n, /*by_address=*/true);
            ch.eager_serve(10.0);
            ch.settle(10.0, 0);  // every receiver read it: the buffer may change now
            std::fill(buf.begin(), buf.end(), uint8_t(0xee));
          } else {
            got = ch.eager_receive(hash, root, buf.data(), bytes, fill_sig, &n, 10.0);
            for (size_t i = 0; i < bytes; ++i)
              if (buf[i] != value(i))
                throw std::runtime_error("op " + std::to_string(op) + " (" + std::to_string(bytes) +
                                         " B): wrong byte at " + std::to_string(i));
          }
          if (got != LLChannel::Eager::Done) throw std::runtime_error("op " + std::to_string(op) + " not eager");
        }
      }
      ch.settle(10.0);
    };
    run_rank_threads(L, errors, rank);
    for (int r = 0; r < L; ++r) EXPECT_EQ(errors[r], "") << L << " ranks, rank " << r;
  }
}

// The caller-thread hierarchical allreduce's helpers (hier_fast.cc): after a by-address exchange that
// posted an output beside the input, a peer's output is read with read_output(); phase words posted
// with signal() are seen by wait_signal() once they reach the value waited for, and a word that never
// gets there raises DistributedError at the deadline instead of hanging.
// L thread ranks, each with its channel over one segment, allowed to read and write the others' memory
void run_cma_ranks(int L, const std::function<void(LLChannel&, int)>& body) {
  Segment seg(L, kSlot);
  std::vector<std::string> errors;
  run_rank_threads(L, errors, [&](int r) {
    LLChannel ch(r, L, seg.mem, kSlot);
    ch.allow_cma_for_tests();
    body(ch, r);
  });
  for (const auto& e : errors) EXPECT_EQ(e, "");
}

TEST(CommLL, PhaseWordsAndPeersOutputs) {
  constexpr int L = 3;
  constexpr size_t kBig = LLChannel::kCmaMin + 4 * 1000 + 12;
  run_cma_ranks(L, [&](LLChannel& ch, int r) {
    std::vector<unsigned char> in(kBig), out(kBig), got(kBig);
    for (int round = 0; round < 10; ++round) {
      for (size_t i = 0; i < kBig; ++i) in[i] = static_cast<unsigned char>(i * 5 + r + round);
      ASSERT_EQ(ch.exchange(7 + round, in.data(), kBig, 0, 30.0, true, out.data()), Result::Complete);
      const uint64_t base = (ch.attempt() + 1) * 8;
      for (size_t i = 0; i < kBig; ++i) out[i] = static_cast<unsigned char>(i * 3 + r * 17 + round);
      ch.signal(base + 3);  // my output is final
      for (int j = 0; j < L; ++j) {
        if (j == r) continue;
        EXPECT_GE(ch.wait_signal(j, base + 3, 30.0, "test"), base + 3);
        ch.read_output(j, 1000, got.data(), kBig - 1000);
        for (size_t i = 0; i < kBig - 1000; i += 331)
          ASSERT_EQ(got[i], static_cast<unsigned char>((i + 1000) * 3 + j * 17 + round)) << r << " " << j;
      }
      ch.done();
      ASSERT_TRUE(ch.wait_readers(30.0));
    }
    // a word below the one waited for: the wait gives up at its deadline
    const uint64_t never = (ch.attempt() + 100) * 8;
    EXPECT_THROW(ch.wait_signal((r + 1) % L, never, 0.05, "test"), aimass::DistributedError);
  });
}

// The hierarchical allreduce's staging buffers (LLChannel::set_stage): posted beside a by-address payload
// with an output, read by the peers in their mappings and through the kernel (the same bytes); none
// posted after set_stage(nullptr), and a stage that is not in a shared host buffer posts none either.
TEST(CommLL, StagingBuffersArePostedAndReadByPeers) {
  constexpr int L = 3;
  constexpr size_t kBig = LLChannel::kCmaMin + 4 * 1000 + 12;
  run_cma_ranks(L, [&](LLChannel& ch, int r) {
    aimass::SharedHostBuffer stage(kBig + 4096);
    std::vector<unsigned char> in(kBig), out(kBig), got(kBig), priv(kBig);
    for (int round = 0; round < 6; ++round) {
      auto* st = static_cast<unsigned char*>(stage.data());
      for (size_t i = 0; i < kBig; ++i) st[i] = static_cast<unsigned char>(i * 7 + r * 29 + round);
      // rounds 0-1: the shared stage; 2: none; 3: private memory (not a shared host buffer); 4-5: shared again
      ch.set_stage(round == 2 ? nullptr : round == 3 ? static_cast<void*>(priv.data()) : stage.data(), kBig);
      ASSERT_EQ(ch.exchange(40 + round, in.data(), kBig, 0, 30.0, true, out.data()), Result::Complete);
      const uint64_t base = (ch.attempt() + 1) * 8;
      ch.signal(base + 1);
      for (int j = 0; j < L; ++j) {
        if (j == r) continue;
        EXPECT_GE(ch.wait_signal(j, base + 1, 30.0, "test"), base + 1);
        if (round == 2 || round == 3) {
          EXPECT_EQ(ch.posted_stage(j).ino, 0u) << r << " " << j << " " << round;
          EXPECT_EQ(ch.map_stage(j, 0, 16), nullptr);
          continue;
        }
        ASSERT_NE(ch.posted_stage(j).ino, 0u) << r << " " << j << " " << round;
        const char* p = ch.map_stage(j, 1000, kBig - 1000);
        ASSERT_NE(p, nullptr);
        ch.read_stage(j, 1000, got.data(), kBig - 1000);
        EXPECT_EQ(std::memcmp(p, got.data(), kBig - 1000), 0);
        for (size_t i = 0; i < kBig - 1000; i += 331)
          ASSERT_EQ(got[i], static_cast<unsigned char>((i + 1000) * 7 + j * 29 + round)) << r << " " << j;
        EXPECT_EQ(ch.map_stage(j, 4096, kBig + 4096), nullptr);  // past the buffer's end: no mapping
      }
      ch.signal(base + 4);  // done reading the peers' stages (they change them next round)
      for (int j = 0; j < L; ++j)
        if (j != r) ch.wait_signal(j, base + 4, 30.0, "test");
      ch.done();
      ASSERT_TRUE(ch.wait_readers(30.0));
    }
  });
}
