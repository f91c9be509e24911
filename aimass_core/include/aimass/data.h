// Sharded record format (docs/format.md), its writer and reader, and the native
// multi-threaded Loader. No Python here: the bindings live in csrc/bind_data.cc.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "aimass/dtype.h"
#include "aimass/error.h"

namespace aimass {
namespace data {

// ---------------------------------------------------------------- CRC32C
// CRC32C (Castagnoli), as TFRecord uses it. crc32c() picks, by CPU and SIMD level:
// VPCLMULQDQ folding at the AVX-512 level when the CPU has it, else the SSE4.2 crc32
// instruction unless the level is capped to scalar, else the slicing-by-8 table.
// `crc` chains: crc32c(b, nb, crc32c(a, na)) == crc32c(a + b).
uint32_t crc32c(const void* data, size_t n, uint32_t crc = 0);
// crc32c() that also requests the n bytes at `prefetch` while it runs (see crc32c_copy).
uint32_t crc32c(const void* data, size_t n, uint32_t crc, const void* prefetch);
// crc32c(src, n, crc), also copying the n bytes to dst (non-overlapping) in the same pass.
// `prefetch` (optional): n bytes the caller reads next (the same field of a later
// record), requested from memory a few lines at a time while this copy runs.
uint32_t crc32c_copy(void* dst, const void* src, size_t n, uint32_t crc = 0, const void* prefetch = nullptr);
const char* crc32c_impl_name();  // what crc32c() uses now: "avx512", "sse42" or "scalar"
uint32_t crc32c_scalar(const void* data, size_t n, uint32_t crc = 0);
uint32_t crc32c_sse42(const void* data, size_t n, uint32_t crc = 0);   // needs SSE4.2
uint32_t crc32c_copy_sse42(void* dst, const void* src, size_t n, uint32_t crc = 0);
bool crc32c_avx512_supported();                                        // AVX-512 + VPCLMULQDQ
uint32_t crc32c_avx512(const void* data, size_t n, uint32_t crc = 0,  // needs crc32c_avx512_supported()
                       const void* prefetch = nullptr);
uint32_t crc32c_copy_avx512(void* dst, const void* src, size_t n, uint32_t crc = 0,
                            const void* prefetch = nullptr);
inline uint32_t mask_crc(uint32_t crc) { return ((crc >> 15) | (crc << 17)) + 0xa282ead8u; }
inline uint32_t unmask_crc(uint32_t m) {
  uint32_t r = m - 0xa282ead8u;
  return (r >> 17) | (r << 15);
}

// ---------------------------------------------------------------- schema
struct Field {
  std::string name;
  DType dtype = DType::U8;
  // shape[0] == -1 marks a variable first dimension (stored with its length).
  std::vector<int64_t> shape;
  bool variable() const { return !shape.empty() && shape[0] < 0; }
  // Elements per record (fixed fields) or per first-dim row (variable fields).
  int64_t row_elems() const;
  int64_t fixed_bytes() const;  // bytes of a fixed field in one record
};

struct Schema {
  std::vector<Field> fields;
  int find(const std::string& name) const;  // -1 when absent
  bool all_fixed() const;
  int64_t fixed_record_bytes() const;  // payload size when all fields are fixed
  // Throws ValueError on a bad schema, including one whose per-record byte counts
  // overflow (every size the methods above return is then known to fit in int64).
  void validate() const;
};

// 64-bit FNV-1a over the schema's fields in order (name, dtype, shape; docs/format.md).
// Version-2 shards store it in their header; the reader checks it against the
// schema it is given, so an index.json whose fields were reordered, renamed or
// retyped (even to fields of equal size) fails on open instead of reading garbage.
uint64_t schema_fingerprint(const Schema& schema);

// Shard format versions: kShardVersion is written; every version back to 1 is read.
constexpr uint32_t kShardVersion = 2;

// ---------------------------------------------------------------- writer
// One column per schema field. Fixed fields: `data` holds n records back to back.
// Variable fields: `data` holds the rows of every record back to back and
// `dim0[i]` is record i's first dimension.
struct Column {
  const void* data = nullptr;
  const int64_t* dim0 = nullptr;
};

struct ShardInfo {
  std::string file;  // name inside the dataset directory
  uint64_t records = 0;
  uint64_t bytes = 0;
};

// Writes records [0, n) into shards part-00000.rec ... of at most ~shard_bytes
// each (a shard always holds at least one record). Each shard is written under a
// temporary name, fsynced and renamed. Returns the shards in order.
std::vector<ShardInfo> write_shards(const std::string& dir, const Schema& schema,
                                    const std::vector<Column>& columns, int64_t n,
                                    int64_t shard_bytes, int first_shard = 0);

// ---------------------------------------------------------------- reader
class Shard {
 public:
  // Maps the file and checks the header and footer (CorruptDataError on damage,
  // naming the file and, for a truncated shard, the first incomplete record).
  Shard(const std::string& path, const std::string& display_name);
  ~Shard();
  Shard(const Shard&) = delete;
  Shard& operator=(const Shard&) = delete;

  uint64_t size() const { return n_; }
  uint32_t version() const { return version_; }
  // The schema fingerprint stored in a version-2 header (0 for version 1).
  uint64_t fingerprint() const { return fingerprint_; }
  uint64_t file_size() const { return file_size_; }
  // The payload of record i; checks framing and (if verify) both CRCs.
  const uint8_t* record(uint64_t i, uint64_t* len, bool verify) const;
  // The payload of record i with its framing checked (and, if verify_len, the length
  // CRC), and in *masked_crc the stored payload CRC, left to the caller to check (the
  // loader checks it while copying the payload).
  const uint8_t* locate(uint64_t i, uint64_t* len, uint32_t* masked_crc, bool verify_len) const {
    return open_frame(i, frame(i), len, masked_crc, verify_len);
  }
  // locate() in two steps, so a batch's offsets can be looked up (and its records
  // prefetched) before any record is read: the start of record i's frame (offset
  // checked), then its payload.
  const uint8_t* frame(uint64_t i) const;
  const uint8_t* open_frame(uint64_t i, const uint8_t* frame, uint64_t* len, uint32_t* masked_crc,
                            bool verify_len) const;
  // Throws CorruptDataError naming this shard, record i and `why`.
  [[noreturn]] void corrupt(uint64_t i, const std::string& why) const;
  // Hint the CPU to start loading record i (no checks, no faults on bad offsets).
  void prefetch(uint64_t i) const;
  const std::string& name() const { return name_; }

 private:
  std::string name_;
  const uint8_t* base_ = nullptr;
  size_t file_size_ = 0;
  const uint8_t* offsets_ = nullptr;  // n_ little-endian u64
  uint64_t n_ = 0;
  uint64_t header_bytes_ = 0;   // where the first record starts
  uint64_t table_pos_ = 0;      // where the offset table starts (the end of the data)
  uint32_t version_ = 0;
  uint64_t fingerprint_ = 0;
  [[noreturn]] void fail(const std::string& why);  // unmaps, throws CorruptDataError naming the file
  void check_footer();
  void check_offsets();
  [[noreturn]] void footer_damaged(const std::string& why);
};

class Reader {
 public:
  // shard_paths in dataset order; names are used in error messages. Every shard
  // must carry `schema`'s fingerprint (version-2 shards; version 1 has none), and
  // every shard must be version 2 when require_fingerprint (index.json version 2).
  Reader(Schema schema, const std::vector<std::string>& shard_paths,
         const std::vector<std::string>& shard_names, bool require_fingerprint = false);
  const Schema& schema() const { return schema_; }
  int64_t size() const { return total_; }
  int64_t num_shards() const { return static_cast<int64_t>(shards_.size()); }
  const Shard& shard(int64_t s) const { return *shards_[s]; }
  // Global index -> payload (verified when verify).
  const uint8_t* record(int64_t index, uint64_t* len, bool verify, int64_t* shard_out = nullptr) const;
  // Shard::locate by global index (the payload CRC is the caller's to check).
  const uint8_t* locate(int64_t index, uint64_t* len, uint32_t* masked_crc, bool verify_len,
                        int64_t* shard_out) const;
  // CorruptDataError "payload checksum mismatch" naming the shard and record of `index`.
  [[noreturn]] void payload_mismatch(int64_t index) const;
  // Record `index` as (shard, record within it); index must be in [0, size()).
  void split_index(int64_t index, int64_t* shard, uint64_t* local) const {
    size_t s = shard_of(index);
    *shard = static_cast<int64_t>(s);
    *local = static_cast<uint64_t>(index - starts_[s]);
  }
  void prefetch(int64_t index) const;
  // Splits a payload into per-field pointers and first dims; checks sizes.
  void decode(const uint8_t* payload, uint64_t len, int64_t index, const uint8_t** field_ptr,
              int64_t* dim0) const;
  // Checks every record of every shard; returns the number checked.
  int64_t verify_all() const;

 private:
  Schema schema_;
  std::vector<std::unique_ptr<Shard>> shards_;
  size_t shard_of(int64_t index) const;  // index must be in range
  std::vector<int64_t> starts_;  // global index of each shard's first record (+ total)
  int64_t total_ = 0;
};

// ---------------------------------------------------------------- index.json
// A dataset directory's index.json as the engine reads it (docs/format.md). Python
// keeps the rest of the document (metadata, splits) for itself.
struct IndexShard {
  std::string file;  // a plain file name inside the dataset directory
  uint64_t records = 0;
  uint64_t bytes = 0;
};
struct Index {
  int64_t version = 0;
  int64_t num_records = 0;
  Schema schema;
  std::vector<IndexShard> shards;
};
// Parses and checks index.json's text: format and version (ValueError), schema
// (ValueError/TypeError as Schema::validate and parse_dtype), everything else
// (JSON syntax, missing or mistyped keys, unsafe shard names, counts that do not add
// up to num_records, numbers that are not exact integers): CorruptDataError naming
// `what` (the index file's path).
Index parse_index(const char* text, size_t len, const std::string& what);
// Opens the dataset at `dir` as `index` describes it: every shard listed must exist
// and hold the records and bytes the index says, and carry the schema's fingerprint.
std::shared_ptr<Reader> open_dataset(const std::string& dir, const Index& index, const std::string& what);

// ---------------------------------------------------------------- transforms
// A fused per-field pipeline the loader workers run on each sample.
enum class TransformKind : int { Cast = 0, Normalize, RandomCrop, RandomFlip, OneHot, UserFn };
// A user transform (e.g. a numba @cfunc): called on worker threads without the GIL.
// in/in_bytes: the stored field of one record; out/out_bytes: its output slot;
// record: the dataset index; seed: a per-sample value from (seed, epoch, record).
// Returns 0 on success; anything else stops the epoch with a ValueError.
using UserTransformFn = int32_t (*)(const void* in, int64_t in_bytes, void* out, int64_t out_bytes,
                                    int64_t record, uint64_t seed);
struct Transform {
  TransformKind kind;
  std::string field;
  DType out_dtype = DType::F32;  // Cast / OneHot
  double scale = 1.0;            // Cast
  std::vector<float> mean, std;  // Normalize (per channel, last dim)
  int64_t crop_h = 0, crop_w = 0, padding = 0;  // RandomCrop (HWC images)
  double p = 0.5;                // RandomFlip probability
  int64_t num_classes = 0;       // OneHot
  UserTransformFn fn = nullptr;  // UserFn: output dtype out_dtype, per-sample shape out_shape
  std::vector<int64_t> out_shape;
};

// The global sample order of an epoch: a pure function of (seed, epoch, n).
std::vector<int64_t> epoch_permutation(uint64_t seed, uint64_t epoch, int64_t n, bool shuffle);

// ---------------------------------------------------------------- loader
// Where batch memory comes from. Null functions: page-aligned std::aligned_alloc.
// Pinned memory plugs in here (aimass._cuda hands over cudaHostAlloc/cudaFreeHost
// wrappers), so the CPU library never links CUDA. alloc returns nullptr on failure.
struct HostAllocator {
  void* (*alloc)(size_t bytes) = nullptr;
  void (*free)(void* p) = nullptr;
};

struct LoaderOptions {
  int64_t batch_size = 1;
  bool shuffle = true;
  uint64_t seed = 0;
  int rank = 0;
  int world_size = 1;
  bool drop_last = false;
  int num_threads = 2;
  int prefetch = 2;
  // Checksum checks: 0 never, 1 on every read, 2 the first time this loader reads each record
  // (datasets are immutable once written, so later epochs can skip the CRC pass).
  int verify = 1;
  HostAllocator allocator;
};

// One field's memory in a batch: page-aligned, owned by the loader's pool.
struct HostBuffer {
  uint8_t* ptr = nullptr;
  size_t bytes = 0;
  uint8_t* data() const { return ptr; }
  size_t size() const { return bytes; }
};

// An output batch: one buffer per field, recycled into the loader's pool when the
// last reference goes away (so memory stays flat across epochs).
struct BatchBuffer {
  std::vector<HostBuffer> fields;
  int64_t rows = 0;
};
class BufferPool;

struct FieldOut {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;  // per sample
};

class Loader {
 public:
  // `indices`: the dataset records this loader draws from (a split); empty = all.
  Loader(std::shared_ptr<const Reader> reader, std::vector<int64_t> indices, LoaderOptions opt,
         std::vector<Transform> transforms);
  ~Loader();
  Loader(const Loader&) = delete;
  Loader& operator=(const Loader&) = delete;

  int64_t num_samples() const { return static_cast<int64_t>(indices_.size()); }
  int64_t batches_per_epoch() const;
  int64_t samples_per_rank() const;
  const std::vector<FieldOut>& outputs() const { return outputs_; }
  // Starts producing epoch `epoch` from batch `start_batch` (stops any epoch in flight).
  void start(uint64_t epoch, int64_t start_batch);
  // The next batch in order, or nullptr at the end of the epoch. Blocks.
  std::shared_ptr<BatchBuffer> next();
  void stop();
  int64_t next_batch_index() const { return consumed_; }
  // Batch buffers the pool has allocated so far (reused ones are not counted again).
  int64_t buffers_allocated() const;

 private:
  void worker();
  void fill(const std::vector<int64_t>& perm, uint64_t epoch, int64_t b, BatchBuffer& buf);
  void build_plan();

  std::shared_ptr<const Reader> reader_;
  std::vector<int64_t> indices_;
  bool all_records_ = false;  // indices_ is 0..N-1
  size_t frame_bytes_ = 0;    // bytes of one record's frame (every Loader field is fixed-size)
  bool copy_covers_record_ = false;  // see the constructor
  LoaderOptions opt_;
  std::vector<Transform> transforms_;
  std::vector<FieldOut> outputs_;
  struct FieldPlan;
  std::vector<std::shared_ptr<FieldPlan>> plans_;
  std::shared_ptr<BufferPool> pool_;
  std::unique_ptr<std::atomic<uint8_t>[]> verified_;  // per dataset record, for verify == 2

  // epoch state
  std::shared_ptr<const std::vector<int64_t>> perm_;  // global order (positions in indices_)
  uint64_t epoch_ = 0;
  int64_t nbatches_ = 0;
  int64_t consumed_ = 0;   // next batch the consumer takes
  int64_t claimed_ = 0;    // next batch a worker claims
  int64_t window_ = 1;
  struct Slot {
    int64_t batch = -1;
    bool ready = false;
    std::shared_ptr<BatchBuffer> buf;
    std::exception_ptr error;
  };
  std::vector<Slot> slots_;
  std::mutex mu_;
  std::condition_variable cv_work_, cv_ready_;
  int idle_workers_ = 0;           // workers asleep on cv_work_
  int consumers_waiting_ = 0;      // next() calls asleep on cv_ready_
  bool stopping_ = false;
  bool running_ = false;
  uint64_t generation_ = 0;
  std::vector<std::thread> threads_;
};

}  // namespace data
}  // namespace aimass
