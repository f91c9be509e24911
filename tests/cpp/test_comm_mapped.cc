// The single-copy allreduce on buffers in shared host buffers (aimass/shared_host.h), threads as local
// ranks: each rank's buffers live in its own memfd, which the peers map through /proc/self/fd (a second
// mapping of the same pages, as another process's would be) and reduce with loads and stores. Every dtype
// and op, odd counts over many pieces, fused segments in place and out of place: every rank holds the bits
// of the kernel reducing the inputs in rank order (those of the kernel-copy push), also when only some
// ranks' buffers are shared (those ranks that cannot map every peer copy through the kernel). And the
// peer mapping cache: ranges, a reused descriptor, eviction.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <thread>

#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "aimass/collectives.h"
#include "aimass/error.h"
#include "aimass/shared_host.h"
#include "comm/host_regions.h"
#include "comm/shm_allreduce.h"
#include "rank_order_reference.h"
#include "rank_threads.h"
#include "shm_test_segment.h"

namespace {

using aimass::DType;
using aimass::ReduceOp;
using aimass::SharedHostBuffer;
using aimass::comm::PeerRegions;
using aimass::comm::RegionRef;
using aimass::comm::ShmAllreduce;

constexpr size_t kChunk = 8192;  // 8 KiB pieces: the counts below span many

int val(int rank, int64_t i, int salt) { return static_cast<int>((i * 31 + rank * 17 + salt) % 97) - 48; }

// shared_ranks[r]: rank r's buffers in a shared host buffer (else a private vector)
// chunk: the segment's slot (the pieces are min(chunk, 256 KiB)); the default 8 KiB makes many small
// pieces, 512 KiB pieces of several of run_mapped's 32 KiB sub-blocks
template <typename T>
void check_mapped_same_bits(int L, DType dtype, ReduceOp op, bool average, const std::vector<bool>& shared_ranks,
                            size_t chunk = kChunk,
                            const std::vector<int64_t>& counts = {1, 63, 2049, 9 * 2048 + 37, 5}) {
  std::vector<std::vector<std::vector<T>>> got(L);  // [rank][call]
  std::vector<std::vector<bool>> mapped(L);
  auto input = [&](int r, size_t c, int64_t i) {
    const int v = val(r, i, static_cast<int>(c));
    if constexpr (std::is_floating_point_v<T>) return static_cast<T>(v) * static_cast<T>(0.1);
    else if constexpr (std::is_same_v<T, uint16_t>)  // 16-bit float bits: 1 +- small
      return static_cast<T>((dtype == DType::F16 ? 0x3c00 : 0x3f80) + (v & 0x3f));
    else return static_cast<T>(v);
  };
  ShmTestSegment seg(L, chunk);
  std::vector<std::string> errors(L);
  run_rank_threads(L, errors, [&](int r) {
    ShmAllreduce shm(r, L, seg.mem, chunk, 20.0);
    shm.allow_cma_for_tests(true, true, true);
    shm.use_cma(true);
    ASSERT_TRUE(shm.maps_peers());
    for (size_t c = 0; c < counts.size(); ++c) {
      const int64_t n = counts[c], n1 = n / 3;
      // a: n elements (the first n1 reduced in place), in2 / out2: the rest out of place; all in one buffer
      const size_t bytes = (3 * static_cast<size_t>(n) + 64) * sizeof(T);
      std::unique_ptr<SharedHostBuffer> sb;
      std::vector<T> priv;
      T* a;
      if (shared_ranks[r]) {
        sb = std::make_unique<SharedHostBuffer>(bytes);
        a = static_cast<T*>(sb->data()) + 3;  // not on a line: the kernels' heads
      } else {
        priv.resize(bytes / sizeof(T));
        a = priv.data() + 3;
      }
      T* in2 = a + n;
      T* out2 = in2 + (n - n1);
      for (int64_t i = 0; i < n; ++i) a[i] = input(r, c, i);
      std::memcpy(in2, a + n1, static_cast<size_t>(n - n1) * sizeof(T));
      shm.run({{reinterpret_cast<const char*>(a), reinterpret_cast<char*>(a), n1, average},
               {reinterpret_cast<const char*>(in2), reinterpret_cast<char*>(out2), n - n1, average}},
              n, dtype, op, L, nullptr);
      mapped[r].push_back(shm.last_run_mapped());
      std::vector<T> res(a, a + n1);
      res.insert(res.end(), out2, out2 + (n - n1));
      got[r].push_back(res);
    }
  });
  for (int r = 0; r < L; ++r) ASSERT_EQ(errors[r], "") << "rank " << r;
  for (size_t c = 0; c < counts.size(); ++c) {
    const int64_t n = counts[c];
    const std::vector<T> want =
        rank_order_reference<T>(L, dtype, op, average, n, [&](int r, int64_t i) { return input(r, c, i); });
    for (int r = 0; r < L; ++r) {
      ASSERT_EQ(std::memcmp(got[r][c].data(), want.data(), static_cast<size_t>(n) * sizeof(T)), 0)
          << "L " << L << " rank " << r << " n " << n << " op " << static_cast<int>(op);
      // a rank reduces in the mappings exactly when every peer's buffers are shared
      bool peers_shared = true;
      for (int j = 0; j < L; ++j) peers_shared = peers_shared && (j == r || shared_ranks[j]);
      EXPECT_EQ(mapped[r][c], peers_shared) << "L " << L << " rank " << r << " n " << n;
    }
  }
}

TEST(CommMapped, EveryDtypeAndOpSameBitsAsTheRankOrderKernel) {
  for (int L : {2, 3, 4}) {
    const std::vector<bool> all(L, true);
    for (ReduceOp op : {ReduceOp::Sum, ReduceOp::Min, ReduceOp::Max, ReduceOp::Product}) {
      check_mapped_same_bits<float>(L, DType::F32, op, false, all);
      check_mapped_same_bits<double>(L, DType::F64, op, false, all);
      check_mapped_same_bits<uint16_t>(L, DType::F16, op, false, all);
      check_mapped_same_bits<uint16_t>(L, DType::BF16, op, false, all);
      check_mapped_same_bits<int32_t>(L, DType::I32, op, false, all);
      check_mapped_same_bits<int8_t>(L, DType::I8, op, false, all);
    }
    check_mapped_same_bits<float>(L, DType::F32, ReduceOp::Sum, true, all);
    check_mapped_same_bits<double>(L, DType::F64, ReduceOp::Sum, true, all);
    check_mapped_same_bits<uint16_t>(L, DType::BF16, ReduceOp::Sum, true, all);
    check_mapped_same_bits<uint16_t>(L, DType::F16, ReduceOp::Sum, true, all);
    check_mapped_same_bits<int64_t>(L, DType::I64, ReduceOp::Sum, true, all);
  }
}

TEST(CommMapped, LargePiecesInSubBlocksSameBits) {
  // 256 KiB pieces of 32 KiB sub-blocks (each prefetching the next one's pages), odd tails, fused segments
  const std::vector<int64_t> counts = {300007, 65536 + 17, 3 * 65536};
  for (int L : {2, 3}) {
    const std::vector<bool> all(L, true);
    check_mapped_same_bits<float>(L, DType::F32, ReduceOp::Sum, false, all, 512u << 10, counts);
    check_mapped_same_bits<float>(L, DType::F32, ReduceOp::Sum, true, all, 512u << 10, counts);
    check_mapped_same_bits<double>(L, DType::F64, ReduceOp::Max, false, all, 512u << 10, counts);
    check_mapped_same_bits<uint16_t>(L, DType::BF16, ReduceOp::Sum, true, all, 512u << 10, counts);
  }
}

TEST(CommMapped, RanksWithPrivateBuffersMixWithMappedOnesSameBits) {
  // rank 0's buffers private: the others cannot map every peer and copy through the kernel, rank 0 maps
  // them all; and the reverse
  for (int L : {2, 3}) {
    std::vector<bool> first_private(L, true), first_shared(L, false);
    first_private[0] = false;
    first_shared[0] = true;
    for (const auto& s : {first_private, first_shared}) {
      check_mapped_same_bits<float>(L, DType::F32, ReduceOp::Sum, false, s);
      check_mapped_same_bits<uint16_t>(L, DType::BF16, ReduceOp::Sum, true, s);
    }
  }
}

TEST(CommMapped, SharedHostBufferIsZeroedSealedAndRegistered) {
  SharedHostBuffer b(10000);
  ASSERT_NE(b.data(), nullptr);
  EXPECT_EQ(b.size(), 10000u);
  const char* p = static_cast<const char*>(b.data());
  for (size_t i = 0; i < 10000; ++i) ASSERT_EQ(p[i], 0);
  RegionRef ref;
  ASSERT_TRUE(aimass::comm::find_shared_region(p + 100, 200, &ref));
  EXPECT_NE(ref.ino, 0u);
  EXPECT_EQ(ref.base, reinterpret_cast<uint64_t>(p));
  EXPECT_EQ(ref.bytes % 4096, 0u);
  EXPECT_GE(ref.bytes, 10000u);
  EXPECT_FALSE(aimass::comm::find_shared_region(p + ref.bytes - 8, 16, &ref));  // runs past the end
  EXPECT_EQ(ref.ino, 0u);
  int on_stack = 0;
  EXPECT_FALSE(aimass::comm::find_shared_region(&on_stack, sizeof(on_stack), &ref));
  EXPECT_NE(ftruncate(b.fd(), 100), 0);  // the size is sealed: no mapping can be cut short
  EXPECT_THROW(SharedHostBuffer(0), aimass::ValueError);
}

// aimass.dist.is_shared's look-up: true inside a live buffer only (not past it, not after it is freed).
TEST(CommMapped, InSharedHostBufferOnlyWhileTheBufferLives) {
  auto b = std::make_unique<SharedHostBuffer>(5000);
  const char* p = static_cast<const char*>(b->data());
  EXPECT_TRUE(aimass::in_shared_host_buffer(p, 5000));
  EXPECT_TRUE(aimass::in_shared_host_buffer(p + 4000, 1000));
  EXPECT_FALSE(aimass::in_shared_host_buffer(p + 4096, 8192));  // runs past the mapping
  int on_stack = 0;
  EXPECT_FALSE(aimass::in_shared_host_buffer(&on_stack, sizeof(on_stack)));
  b.reset();
  EXPECT_FALSE(aimass::in_shared_host_buffer(p, 1));  // unregistered with the buffer
}

// The lean lane's allgather results in shared memory (CollectiveHandle::shared_result_block_*): registered
// (the peers find them), recycled by size class (nearby sizes reuse one block, so the peers map nothing
// new), and private to a forked child (its writes stay its own, the parent's stay the parent's).
TEST(CommMapped, SharedResultBlocksAreRecycledBySizeClassAndPrivateAfterFork) {
  using aimass::CollectiveHandle;
  const size_t n = (size_t(3) << 20) + 5;
  void* a = CollectiveHandle::shared_result_block_get(n);
  ASSERT_NE(a, nullptr);
  EXPECT_TRUE(aimass::in_shared_host_buffer(a, n));
  void* b = CollectiveHandle::shared_result_block_get(n);  // a is live: another block
  ASSERT_NE(b, nullptr);
  EXPECT_NE(a, b);
  CollectiveHandle::shared_result_block_put(b);
  void* c = CollectiveHandle::shared_result_block_get(n + 4000);  // the same class (4 MiB / 16 steps)
  EXPECT_EQ(c, b);
  std::memset(c, 0x5a, n);
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {  // the child: sees the block as it was, writes it, reports
    const unsigned char* p = static_cast<const unsigned char*>(c);
    const char ok = (p[0] == 0x5a && p[n - 1] == 0x5a) ? '1' : '0';
    std::memset(c, 0x11, n);
    if (write(fds[1], &ok, 1) != 1) _exit(2);
    _exit(0);
  }
  close(fds[1]);
  char got = 0;
  ASSERT_EQ(read(fds[0], &got, 1), 1);
  close(fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  EXPECT_EQ(got, '1');
  const unsigned char* p = static_cast<const unsigned char*>(c);
  EXPECT_EQ(p[0], 0x5a);
  EXPECT_EQ(p[n - 1], 0x5a);  // the child's writes did not reach the parent
  EXPECT_TRUE(aimass::in_shared_host_buffer(c, n));  // and the parent's block is still shared
  CollectiveHandle::shared_result_block_put(c);
  CollectiveHandle::shared_result_block_put(a);
  CollectiveHandle::shared_result_block_put(reinterpret_cast<void*>(0x1000));  // not a block: ignored
}

// Results under 1 MiB (from 32 KiB): power-of-two blocks of shared 2 MiB slabs, one size per slab, so a
// peer maps a slab once; blocks never overlap, freed ones are handed out again, the slabs stop at 32 MiB
// (then nullptr: the caller takes private memory), and an empty slab serves whatever size comes next.
TEST(CommMapped, SmallSharedResultsAreSlabBlocksUpToACap) {
  using aimass::CollectiveHandle;
  EXPECT_EQ(CollectiveHandle::shared_result_block_get(32767), nullptr);  // below the single-copy parts
  std::vector<void*> live;
  for (int i = 0; i < 8; ++i) {  // 40000 bytes: 64 KiB blocks, 32 to a slab
    void* p = CollectiveHandle::shared_result_block_get(40000);
    ASSERT_NE(p, nullptr);
    EXPECT_TRUE(aimass::in_shared_host_buffer(p, 40000));
    std::memset(p, i + 1, 40000);
    live.push_back(p);
  }
  for (int i = 0; i < 8; ++i) {  // no block overlaps another
    const unsigned char* q = static_cast<const unsigned char*>(live[i]);
    EXPECT_EQ(q[0], i + 1);
    EXPECT_EQ(q[39999], i + 1);
    for (int j = 0; j < i; ++j) {
      const uintptr_t a = reinterpret_cast<uintptr_t>(live[i]), b = reinterpret_cast<uintptr_t>(live[j]);
      EXPECT_GE(a > b ? a - b : b - a, 65536u);
    }
  }
  RegionRef r0, r1;  // one slab: one region for the peers to map
  ASSERT_TRUE(aimass::comm::find_shared_region(live[0], 1, &r0));
  ASSERT_TRUE(aimass::comm::find_shared_region(live[7], 1, &r1));
  EXPECT_EQ(r0.ino, r1.ino);
  CollectiveHandle::shared_result_block_put(live[3]);
  EXPECT_EQ(CollectiveHandle::shared_result_block_get(65536), live[3]);  // the freed block again
  // up to the cap: 32 MiB of slabs; then private memory
  std::vector<void*> big;
  for (int i = 0; i < 80; ++i) {
    void* p = CollectiveHandle::shared_result_block_get(600000);  // 1 MiB blocks, 2 to a slab
    if (!p) break;
    big.push_back(p);
  }
  EXPECT_LT(big.size(), 64u);
  EXPECT_GE(big.size(), 2u);
  EXPECT_EQ(CollectiveHandle::shared_result_block_get(600000), nullptr);
  for (void* p : big) CollectiveHandle::shared_result_block_put(p);
  for (void* p : live) CollectiveHandle::shared_result_block_put(p);
  // everything freed: the empty slabs serve other sizes (no new slab: the cap still holds)
  std::vector<void*> small;
  for (int i = 0; i < 64 * 16 + 1; ++i) {
    void* p = CollectiveHandle::shared_result_block_get(32768);
    if (!p) break;
    small.push_back(p);
  }
  EXPECT_GE(small.size(), 64u * 14);  // the 32 KiB blocks of (nearly) every slab
  EXPECT_LE(small.size(), 64u * 16);
  EXPECT_EQ(CollectiveHandle::shared_result_block_get(40000), nullptr);
  for (void* p : small) CollectiveHandle::shared_result_block_put(p);
  EXPECT_NE(CollectiveHandle::shared_result_block_get(600000), nullptr);
}

TEST(CommMapped, PeerMappingsTranslateCheckTheFileAndEvict) {
  const pid_t me = getpid();
  SharedHostBuffer b(3 * 4096);
  RegionRef ref;
  ASSERT_TRUE(aimass::comm::find_shared_region(b.data(), 1, &ref));
  std::memcpy(static_cast<char*>(b.data()) + 5000, "peer", 4);
  PeerRegions maps;
  char* q = maps.translate(me, ref, ref.base + 5000, 4);
  ASSERT_NE(q, nullptr);
  EXPECT_NE(q, static_cast<char*>(b.data()) + 5000);  // a mapping of its own, the same pages
  EXPECT_EQ(std::memcmp(q, "peer", 4), 0);
  std::memcpy(q, "back", 4);
  EXPECT_EQ(std::memcmp(static_cast<char*>(b.data()) + 5000, "back", 4), 0);
  EXPECT_EQ(maps.translate(me, ref, ref.base + 5000, 4), q);  // cached
  EXPECT_EQ(maps.mappings(), 1u);
  EXPECT_EQ(maps.translate(me, ref, ref.base + ref.bytes - 2, 4), nullptr);  // past the end
  EXPECT_EQ(maps.translate(me, ref, ref.base - 1, 1), nullptr);
  RegionRef other = ref;  // the descriptor now names another file (a reused fd number): not mapped
  other.ino = ref.ino + 1000003;
  EXPECT_EQ(maps.translate(me, other, other.base, 1), nullptr);
  EXPECT_EQ(maps.translate(me, other, other.base, 1), nullptr);  // remembered, not retried
  RegionRef none;
  EXPECT_EQ(maps.translate(me, none, 0, 1), nullptr);
  // a mapping outlives its owner's buffer (the pages stay while mapped)
  auto gone = std::make_unique<SharedHostBuffer>(4096);
  RegionRef gref;
  ASSERT_TRUE(aimass::comm::find_shared_region(gone->data(), 1, &gref));
  static_cast<char*>(gone->data())[7] = 42;
  char* g = maps.translate(me, gref, gref.base, 8);
  ASSERT_NE(g, nullptr);
  gone.reset();
  EXPECT_EQ(g[7], 42);
  // eviction: more buffers than the cache keeps; the least recently used go, the cache stays bounded
  std::vector<std::unique_ptr<SharedHostBuffer>> many;
  for (size_t i = 0; i < PeerRegions::kMaxMappings + 5; ++i) {
    many.push_back(std::make_unique<SharedHostBuffer>(4096));
    RegionRef r;
    ASSERT_TRUE(aimass::comm::find_shared_region(many.back()->data(), 1, &r));
    static_cast<char*>(many.back()->data())[0] = static_cast<char>(i);
    char* m = maps.translate(me, r, r.base, 1);
    ASSERT_NE(m, nullptr);
    EXPECT_EQ(*m, static_cast<char>(i));
  }
  EXPECT_LE(maps.mappings(), PeerRegions::kMaxMappings);
  // mappings unused for kIdleRuns runs go (a freed peer buffer is not kept alive for ever); used ones stay
  RegionRef keep;
  ASSERT_TRUE(aimass::comm::find_shared_region(many.back()->data(), 1, &keep));
  for (uint64_t i = 0; i <= PeerRegions::kIdleRuns; ++i) {
    maps.next_run();
    ASSERT_NE(maps.translate(me, keep, keep.base, 1), nullptr);
  }
  maps.next_run();
  EXPECT_EQ(maps.mappings(), 1u);
  maps.clear();
  EXPECT_EQ(maps.mappings(), 0u);
}

// A peer process that dies in the middle of an allreduce on mapped buffers: after one allreduce together
// (this process then keeps the child's bucket mapped), the child posts its part of the next one and dies.
// This process reduces every piece, writing into the dead child's bucket through its mapping (the memory
// stays valid: no SIGBUS), and then fails with DistributedError saying the peer died, not at the deadline.
TEST(CommMapped, PeerProcessDyingMidAllreduceRaisesAndItsMappingStaysValid) {
  constexpr int64_t kCount = 300000;  // 1.2 MB: many pieces
  const size_t seg_bytes = (ShmAllreduce::segment_bytes(2, kChunk) + 4095) / 4096 * 4096;
  void* mem = mmap(nullptr, seg_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(mem, MAP_FAILED);
  auto old = signal(SIGCHLD, SIG_IGN);  // the dead child is reaped at once (as mpirun's daemon does)
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    {
      ShmAllreduce shm(1, 2, mem, kChunk, 60.0);
      shm.allow_cma_for_tests(true, true, true);
      shm.use_cma(true);
      SharedHostBuffer b(kCount * sizeof(float));
      float* x = static_cast<float*>(b.data());
      for (int64_t i = 0; i < kCount; ++i) x[i] = 2.0f;
      shm.run({{reinterpret_cast<const char*>(x), reinterpret_cast<char*>(x), kCount, false}}, kCount, DType::F32,
              ReduceOp::Sum, 2, nullptr);
      const bool ok = shm.last_run_mapped() && x[0] == 3.0f && x[kCount - 1] == 3.0f;
      if (!ok) _exit(3);
      std::thread t([&] {  // the next allreduce: posts, then the process goes away under it
        try {
          shm.run({{reinterpret_cast<const char*>(x), reinterpret_cast<char*>(x), kCount, false}}, kCount,
                  DType::F32, ReduceOp::Sum, 2, nullptr);
        } catch (...) {
        }
      });
      // once its address table is posted (its control line's first word, `staged`, reaches the second
      // collective: the segment starts with one 128-byte control line per local rank)
      const auto* staged = reinterpret_cast<const std::atomic<uint64_t>*>(static_cast<char*>(mem) + 128);
      for (int i = 0; i < 30000 && staged->load() < 2; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
      _exit(0);
    }
  }
  std::string error;
  bool first_ok = false, wrote_all = false;
  {
    ShmAllreduce shm(0, 2, mem, kChunk, 60.0);
    shm.allow_cma_for_tests(true, true, true);
    shm.use_cma(true);
    SharedHostBuffer b(kCount * sizeof(float));
    float* x = static_cast<float*>(b.data());
    for (int64_t i = 0; i < kCount; ++i) x[i] = 1.0f;
    shm.run({{reinterpret_cast<const char*>(x), reinterpret_cast<char*>(x), kCount, false}}, kCount, DType::F32,
            ReduceOp::Sum, 2, nullptr);
    first_ok = shm.last_run_mapped() && x[0] == 3.0f && x[kCount - 1] == 3.0f;
    for (int i = 0; i < 30000 && !(kill(child, 0) != 0 && errno == ESRCH); ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    for (int64_t i = 0; i < kCount; ++i) x[i] = 1.0f;
    try {
      shm.run({{reinterpret_cast<const char*>(x), reinterpret_cast<char*>(x), kCount, false}}, kCount, DType::F32,
              ReduceOp::Sum, 2, nullptr);
    } catch (const aimass::DistributedError& e) {
      error = e.what();
    }
    // the child posted 3.0f (its reduced bucket) as the next input: every piece went through this rank
    wrote_all = x[0] == 4.0f && x[kCount - 1] == 4.0f && shm.peers_write_outputs();
  }
  signal(SIGCHLD, old);
  munmap(mem, seg_bytes);
  EXPECT_TRUE(first_ok);
  EXPECT_NE(error.find("died"), std::string::npos) << error;
  EXPECT_TRUE(wrote_all);
}

}  // namespace
