// The native loader: persistent worker threads fill batch buffers from a pool,
// the consumer takes them strictly in order. Workers never touch Python.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "aimass/cpu_features.h"
#include "aimass/checked.h"
#include "aimass/data.h"
#include "aimass/half.h"

namespace aimass {
namespace data {

namespace {
inline uint64_t splitmix64(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
inline uint64_t bounded(uint64_t& s, uint64_t n) {  // in [0, n)
  return static_cast<uint64_t>((static_cast<unsigned __int128>(splitmix64(s)) * n) >> 64);
}
inline uint64_t mix(uint64_t a, uint64_t b) {
  uint64_t s = a ^ (b * 0xd6e8feb86659fd93ull);
  return splitmix64(s);
}

inline float load_as_float(const uint8_t* p, DType t) {
  switch (t) {
    case DType::U8: return static_cast<float>(*p);
    case DType::I8: return static_cast<float>(*reinterpret_cast<const int8_t*>(p));
    case DType::Bool: return *p ? 1.f : 0.f;
    case DType::I16: { int16_t v; std::memcpy(&v, p, 2); return static_cast<float>(v); }
    case DType::I32: { int32_t v; std::memcpy(&v, p, 4); return static_cast<float>(v); }
    case DType::I64: { int64_t v; std::memcpy(&v, p, 8); return static_cast<float>(v); }
    case DType::F32: { float v; std::memcpy(&v, p, 4); return v; }
    case DType::F64: { double v; std::memcpy(&v, p, 8); return static_cast<float>(v); }
    case DType::F16: { uint16_t v; std::memcpy(&v, p, 2); return f16_to_f32(v); }
    case DType::BF16: { uint16_t v; std::memcpy(&v, p, 2); return bf16_to_f32(v); }
  }
  return 0.f;
}
inline void store_float(uint8_t* p, DType t, float v) {
  if (t == DType::F32) {
    std::memcpy(p, &v, 4);
  } else if (t == DType::F16) {
    uint16_t h = f32_to_f16(v);
    std::memcpy(p, &h, 2);
  } else {  // BF16
    uint16_t h = f32_to_bf16(v);
    std::memcpy(p, &h, 2);
  }
}
bool is_float_out(DType t) { return t == DType::F32 || t == DType::F16 || t == DType::BF16; }

// Pixels per chunk of the u8 -> f32 affine kernel: its per-element scale/shift pattern
// (FieldPlan::pat_a/pat_b) repeats every C elements, so it is kAffinePixels * C long.
constexpr int64_t kAffinePixels = 64;

// The scalar reference of affine_u8_f32_avx2 (affine_avx2.cc): the same operations.
void affine_u8_f32_scalar(const uint8_t* src, const float* a, const float* b, float* o, int64_t n) {
  for (int64_t k = 0; k < n; ++k) o[k] = static_cast<float>(src[k]) * a[k] + b[k];
}
}  // namespace

void affine_u8_f32_avx2(const uint8_t* src, const float* a, const float* b, float* o, int64_t n);

namespace {
// o[k] = src[k] * a[k % C] + b[k % C] for n elements starting at a pixel boundary, in
// chunks of the expanded pattern.
void affine_u8_f32(const uint8_t* src, const float* pa, const float* pb, int64_t chunk, float* o, int64_t n) {
  const bool avx2 = simd_level() >= SimdLevel::AVX2;
  for (int64_t k = 0; k < n; k += chunk) {
    const int64_t m = std::min(chunk, n - k);
    if (avx2) affine_u8_f32_avx2(src + k, pa, pb, o + k, m); else affine_u8_f32_scalar(src + k, pa, pb, o + k, m);
  }
}
}  // namespace

std::vector<int64_t> epoch_permutation(uint64_t seed, uint64_t epoch, int64_t n, bool shuffle) {
  std::vector<int64_t> p(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) p[i] = i;
  if (!shuffle) return p;
  uint64_t s = mix(seed, epoch + 0x5851f42d4c957f2dull);
  for (int64_t i = n - 1; i > 0; --i) std::swap(p[i], p[bounded(s, static_cast<uint64_t>(i) + 1)]);
  return p;
}

// ---------------------------------------------------------------- pool
class BufferPool : public std::enable_shared_from_this<BufferPool> {
 public:
  BufferPool(std::vector<size_t> sizes, HostAllocator alloc) : sizes_(std::move(sizes)), alloc_(alloc) {}
  std::shared_ptr<BatchBuffer> acquire() {
    BatchBuffer* b = nullptr;
    {
      std::lock_guard<std::mutex> g(mu_);
      if (!free_.empty()) {
        b = free_.back();
        free_.pop_back();
      }
    }
    if (!b) b = create();
    auto self = shared_from_this();
    return std::shared_ptr<BatchBuffer>(b, [self](BatchBuffer* x) { self->release(x); });
  }
  int64_t allocated() const { return allocated_.load(); }
  ~BufferPool() {
    for (auto* b : free_) destroy(b);
  }

 private:
  static constexpr size_t kAlign = 4096;  // whole pages: no false sharing, aligned vector stores
  BatchBuffer* create() {
    auto* b = new BatchBuffer();
    try {
      for (size_t s : sizes_) {
        size_t bytes = (std::max<size_t>(s, 1) + kAlign - 1) / kAlign * kAlign;
        void* p = alloc_.alloc ? alloc_.alloc(bytes) : std::aligned_alloc(kAlign, bytes);
        AIMASS_CHECK(p != nullptr, Error, "Loader: could not allocate a ", bytes, "-byte batch buffer",
                     alloc_.alloc ? " of pinned (page-locked) host memory; lower prefetch/batch_size or pass "
                                    "pin_memory=False"
                                  : "");
        b->fields.push_back({static_cast<uint8_t*>(p), s});
      }
    } catch (...) {
      destroy(b);
      throw;
    }
    allocated_.fetch_add(1);
    return b;
  }
  void destroy(BatchBuffer* b) {
    for (auto& f : b->fields) {
      if (alloc_.free) alloc_.free(f.ptr); else std::free(f.ptr);
    }
    delete b;
  }
  void release(BatchBuffer* b) {
    {
      std::lock_guard<std::mutex> g(mu_);
      if (free_.size() < 64) {
        free_.push_back(b);
        return;
      }
    }
    destroy(b);
  }
  std::vector<size_t> sizes_;
  HostAllocator alloc_;
  std::mutex mu_;
  std::vector<BatchBuffer*> free_;
  std::atomic<int64_t> allocated_{0};
};

// ---------------------------------------------------------------- plan
struct Loader::FieldPlan {
  int src = 0;                 // schema field
  DType src_dtype = DType::U8;
  int64_t src_bytes = 0;
  // geometry (HWC images): output H/W and the random crop/flip
  int64_t H = 0, W = 0, C = 1, out_h = 0, out_w = 0, pad = 0;
  bool crop = false;
  double flip_p = 0.0;
  bool elementwise = false;    // a * x + b per channel
  std::vector<float> a, b;
  bool onehot = false;
  int64_t classes = 0;
  UserTransformFn user = nullptr;
  DType out_dtype = DType::U8;
  int64_t out_bytes = 0;       // per sample
  uint64_t transform_id = 0;
  bool plain = false;          // no transform: the stored bytes are the output
  std::vector<float> pat_a, pat_b;  // a, b repeated over kAffinePixels pixels (u8 -> f32 kernel)
};

void Loader::build_plan() {
  const Schema& sc = reader_->schema();
  for (const auto& t : transforms_) {
    int f = sc.find(t.field);
    AIMASS_CHECK(f >= 0, ValueError, "transform on unknown field '", t.field, "'; the dataset's fields are ",
                 [&] { std::string s; for (auto& x : sc.fields) s += (s.empty() ? "" : ", ") + x.name; return s; }());
  }
  for (size_t f = 0; f < sc.fields.size(); ++f) {
    const Field& fd = sc.fields[f];
    AIMASS_CHECK(!fd.variable(), ValueError, "Loader: field '", fd.name,
                 "' has a variable first dimension; batches need fixed-shape fields (read such records with "
                 "Dataset[i] instead)");
    auto pl = std::make_shared<FieldPlan>();
    pl->src = static_cast<int>(f);
    pl->src_dtype = fd.dtype;
    pl->src_bytes = fd.fixed_bytes();
    std::vector<int64_t> shape = fd.shape;
    DType cur = fd.dtype;
    bool geometric_done = false;
    // random draws are keyed by the field name, so adding a Cast/Normalize keeps the crops
    uint64_t h = 1469598103934665603ull;
    for (char ch : fd.name) h = (h ^ static_cast<uint8_t>(ch)) * 1099511628211ull;
    pl->transform_id = h;
    for (const auto& t : transforms_) {
      if (t.field != fd.name) continue;
      switch (t.kind) {
        case TransformKind::RandomCrop:
        case TransformKind::RandomFlip: {
          AIMASS_CHECK(!geometric_done && !pl->elementwise && !pl->onehot, ValueError, "field '", fd.name,
                       "': RandomCrop/RandomHorizontalFlip must come before Cast/Normalize/OneHot, once each");
          AIMASS_CHECK(shape.size() == 2 || shape.size() == 3, ValueError, "field '", fd.name,
                       "': crop/flip need an HWC or HW image field, got ", shape.size(), " dimensions");
          if (pl->out_h == 0) {  // the first geometric op sees the stored image
            pl->H = shape[0];
            pl->W = shape[1];
            pl->C = shape.size() == 3 ? shape[2] : 1;
            pl->out_h = pl->H;
            pl->out_w = pl->W;
          }
          if (t.kind == TransformKind::RandomCrop) {
            AIMASS_CHECK(!pl->crop, ValueError, "field '", fd.name, "': RandomCrop given twice");
            AIMASS_CHECK(t.padding >= 0 && t.padding <= (int64_t(1) << 30), ValueError, "RandomCrop: padding must be "
                         "in [0, 2^30], got ", t.padding);
            AIMASS_CHECK(t.crop_h > 0 && t.crop_w > 0 && t.crop_h <= pl->H + 2 * t.padding &&
                             t.crop_w <= pl->W + 2 * t.padding,
                         ValueError, "RandomCrop(", t.crop_h, "x", t.crop_w, ", padding=", t.padding,
                         ") does not fit field '", fd.name, "' of ", pl->H, "x", pl->W);
            pl->crop = true;
            pl->out_h = t.crop_h;
            pl->out_w = t.crop_w;
            pl->pad = t.padding;
            shape[0] = t.crop_h;
            shape[1] = t.crop_w;
          } else {
            AIMASS_CHECK(t.p >= 0 && t.p <= 1, ValueError, "RandomHorizontalFlip: p must be in [0, 1], got ", t.p);
            pl->flip_p = t.p;
          }
          break;
        }
        case TransformKind::Cast: {
          AIMASS_CHECK(!pl->elementwise && !pl->onehot, ValueError, "field '", fd.name,
                       "': Cast must come first among Cast/Normalize and only once");
          AIMASS_CHECK(is_float_out(t.out_dtype), TypeError, "Cast: dtype must be float32, float16 or bfloat16");
          geometric_done = true;
          int64_t C = shape.empty() ? 1 : (shape.size() >= 3 ? shape.back() : 1);
          pl->C = C;
          pl->elementwise = true;
          pl->a.assign(C, static_cast<float>(t.scale));
          pl->b.assign(C, 0.f);
          cur = t.out_dtype;
          break;
        }
        case TransformKind::Normalize: {
          geometric_done = true;
          int64_t C = shape.size() >= 3 ? shape.back() : 1;
          AIMASS_CHECK(is_float_out(cur) || pl->elementwise, TypeError, "Normalize on field '", fd.name,
                       "' of dtype ", dtype_name(cur), ": add a Cast to float32/float16 before it");
          AIMASS_CHECK(t.mean.size() == t.std.size() && (t.mean.size() == static_cast<size_t>(C) || t.mean.size() == 1),
                       ValueError, "Normalize on field '", fd.name, "': mean/std need 1 or ", C,
                       " values (one per channel, the last dimension), got ", t.mean.size(), "/", t.std.size());
          for (float s : t.std) AIMASS_CHECK(s != 0.f && std::isfinite(s), ValueError, "Normalize: std must be finite and non-zero");
          if (!pl->elementwise) {
            pl->elementwise = true;
            pl->a.assign(C, 1.f);
            pl->b.assign(C, 0.f);
          }
          pl->C = C;
          for (int64_t c = 0; c < C; ++c) {
            float m = t.mean.size() == 1 ? t.mean[0] : t.mean[c];
            float s = t.std.size() == 1 ? t.std[0] : t.std[c];
            pl->a[c] = pl->a[c] / s;
            pl->b[c] = (pl->b[c] - m) / s;
          }
          break;
        }
        case TransformKind::UserFn: {
          AIMASS_CHECK(t.fn != nullptr, ValueError, "CFunc on field '", fd.name, "': null function pointer");
          AIMASS_CHECK(!pl->user && !pl->onehot && !pl->elementwise && !pl->crop && pl->flip_p == 0, ValueError,
                       "CFunc on field '", fd.name, "' must be its only transform");
          for (int64_t d : t.out_shape)
            AIMASS_CHECK(d >= 0, ValueError, "CFunc on field '", fd.name, "': output shape has ", d);
          pl->user = t.fn;
          shape = t.out_shape;
          cur = t.out_dtype;
          break;
        }
        case TransformKind::OneHot: {
          AIMASS_CHECK(!pl->onehot && !pl->elementwise && !pl->crop && pl->flip_p == 0, ValueError,
                       "OneHot on field '", fd.name, "' must be its only transform");
          AIMASS_CHECK(fd.row_elems() == 1 && fd.dtype != DType::F32 && fd.dtype != DType::F64 &&
                           fd.dtype != DType::F16 && fd.dtype != DType::BF16,
                       TypeError, "OneHot needs an integer label field with one value per record; '", fd.name,
                       "' is ", dtype_name(fd.dtype));
          AIMASS_CHECK(t.num_classes > 0, ValueError, "OneHot: num_classes must be > 0, got ", t.num_classes);
          AIMASS_CHECK(is_float_out(t.out_dtype) || t.out_dtype == DType::U8 || t.out_dtype == DType::I64,
                       TypeError, "OneHot: dtype must be float32, float16, bfloat16, uint8 or int64");
          pl->onehot = true;
          pl->classes = t.num_classes;
          shape = {t.num_classes};
          cur = t.out_dtype;
          break;
        }
      }
    }
    if (pl->elementwise && !is_float_out(cur)) cur = DType::F32;
    pl->out_dtype = cur;
    pl->plain = !pl->user && !pl->onehot && !pl->elementwise && !pl->crop && pl->flip_p == 0;
    if (pl->elementwise) {
      for (int64_t k = 0; k < kAffinePixels * pl->C; ++k) {
        pl->pat_a.push_back(pl->a[static_cast<size_t>(k % pl->C)]);
        pl->pat_b.push_back(pl->b[static_cast<size_t>(k % pl->C)]);
      }
    }
    FieldOut fo{fd.name, cur, shape};
    const std::string what = detail::concat("Loader: field '", fd.name, "' output shape");
    pl->out_bytes = checked::narrow<int64_t>(
        checked::mul(checked::product(shape, what), dtype_size(cur), what + " bytes"), what + " bytes");
    outputs_.push_back(fo);
    plans_.push_back(pl);
  }
}

// ---------------------------------------------------------------- loader
Loader::Loader(std::shared_ptr<const Reader> reader, std::vector<int64_t> indices, LoaderOptions opt,
               std::vector<Transform> transforms)
    : reader_(std::move(reader)), indices_(std::move(indices)), opt_(opt), transforms_(std::move(transforms)) {
  AIMASS_CHECK(reader_ != nullptr, ValueError, "Loader: no dataset");
  if (indices_.empty()) {
    all_records_ = true;  // fill() skips the identity lookup
    indices_.resize(static_cast<size_t>(reader_->size()));
    for (int64_t i = 0; i < reader_->size(); ++i) indices_[i] = i;
  }
  for (int64_t i : indices_)
    AIMASS_CHECK(i >= 0 && i < reader_->size(), ValueError, "Loader: index ", i, " is out of range [0, ",
                 reader_->size(), ")");
  AIMASS_CHECK(!indices_.empty(), ValueError, "Loader: the dataset is empty");
  AIMASS_CHECK(opt_.batch_size > 0, ValueError, "Loader: batch_size must be > 0, got ", opt_.batch_size);
  AIMASS_CHECK(opt_.world_size >= 1, ValueError, "Loader: world_size must be >= 1, got ", opt_.world_size);
  AIMASS_CHECK(opt_.rank >= 0 && opt_.rank < opt_.world_size, ValueError, "Loader: rank must be in [0, ",
               opt_.world_size, "), got ", opt_.rank);
  AIMASS_CHECK(opt_.num_threads >= 1 && opt_.num_threads <= 256, ValueError,
               "Loader: num_threads must be in [1, 256], got ", opt_.num_threads);
  AIMASS_CHECK(opt_.prefetch >= 1 && opt_.prefetch <= 1024, ValueError, "Loader: prefetch must be in [1, 1024], got ",
               opt_.prefetch);
  AIMASS_CHECK(!opt_.drop_last || samples_per_rank() >= opt_.batch_size, ValueError, "Loader: drop_last with ",
               num_samples(), " samples over ", opt_.world_size, " ranks leaves no full batch of ", opt_.batch_size);
  AIMASS_CHECK(opt_.verify >= 0 && opt_.verify <= 2, ValueError, "Loader: verify must be 0, 1 or 2");
  if (opt_.verify == 2) {
    verified_.reset(new std::atomic<uint8_t>[static_cast<size_t>(reader_->size())]);
    for (int64_t i = 0; i < reader_->size(); ++i) verified_[i].store(0, std::memory_order_relaxed);
  }
  build_plan();
  frame_bytes_ = static_cast<size_t>(reader_->schema().fixed_record_bytes()) + 16;  // + length, CRCs
  // Whether the fused copies' prefetching of later records covers them: transformed
  // fields are not copied by the CRC loop, so one larger than a line makes fill()
  // prefetch whole frames. (A one-line transformed field is left to the frame's first
  // and last lines; in the middle of a frame it misses the cache: a cost, never an error.)
  copy_covers_record_ = true;
  for (auto& pl : plans_)
    if (!pl->plain && pl->src_bytes > 64) copy_covers_record_ = false;
  // A batch never holds more rows than a rank's share of the samples: a batch_size
  // beyond it (even 2^63 - 1) gives one batch of every sample, as torch's DataLoader does.
  const int64_t rows = std::min(opt_.batch_size, samples_per_rank());
  std::vector<size_t> sizes;
  for (auto& p : plans_) {
    const std::string what = detail::concat("Loader: a batch of ", rows, " samples of field '",
                                            reader_->schema().fields[static_cast<size_t>(p->src)].name, "'");
    const int64_t bytes = checked::mul(p->out_bytes, rows, what + " (bytes)");
    AIMASS_CHECK(bytes <= (int64_t(1) << 46), ValueError, what, " needs ", bytes,
                 " bytes (over 64 TiB); lower batch_size");
    sizes.push_back(static_cast<size_t>(bytes));
  }
  AIMASS_CHECK((opt_.allocator.alloc == nullptr) == (opt_.allocator.free == nullptr), ValueError,
               "Loader: a host allocator needs both its alloc and free functions");
  pool_ = std::make_shared<BufferPool>(sizes, opt_.allocator);
  window_ = static_cast<int64_t>(opt_.prefetch) * opt_.num_threads;  // both bounded above: <= 2^18
  slots_.resize(static_cast<size_t>(window_));
  for (int t = 0; t < opt_.num_threads; ++t) threads_.emplace_back([this] { worker(); });
}

Loader::~Loader() { stop(); }

int64_t Loader::buffers_allocated() const { return pool_->allocated(); }

void Loader::stop() {
  {
    std::lock_guard<std::mutex> g(mu_);
    if (stopping_) return;
    stopping_ = true;
    running_ = false;
  }
  cv_work_.notify_all();
  cv_ready_.notify_all();
  for (auto& t : threads_) t.join();
  threads_.clear();
}

int64_t Loader::samples_per_rank() const {
  int64_t n = num_samples(), w = opt_.world_size;
  return opt_.drop_last ? n / w : (n + w - 1) / w;
}
int64_t Loader::batches_per_epoch() const {
  int64_t s = samples_per_rank(), b = opt_.batch_size;
  return s / b + (!opt_.drop_last && s % b != 0 ? 1 : 0);  // no s + b - 1: b may be near 2^63
}

void Loader::start(uint64_t epoch, int64_t start_batch) {
  int64_t nb = batches_per_epoch();
  AIMASS_CHECK(start_batch >= 0 && start_batch <= nb, ValueError, "Loader: start batch ", start_batch,
               " is outside the epoch's ", nb, " batches");
  auto perm = std::make_shared<const std::vector<int64_t>>(
      epoch_permutation(opt_.seed, epoch, num_samples(), opt_.shuffle));
  {
    std::lock_guard<std::mutex> g(mu_);
    AIMASS_CHECK(!stopping_, ClosedError, "Loader is closed");
    ++generation_;
    perm_ = perm;
    epoch_ = epoch;
    nbatches_ = nb;
    consumed_ = claimed_ = start_batch;
    for (auto& s : slots_) s = Slot();
    running_ = true;
  }
  cv_work_.notify_all();
}

std::shared_ptr<BatchBuffer> Loader::next() {
  std::unique_lock<std::mutex> lk(mu_);
  AIMASS_CHECK(!stopping_, ClosedError, "Loader is closed");
  if (!running_) return nullptr;
  if (consumed_ >= nbatches_) {
    running_ = false;
    return nullptr;
  }
  Slot& s = slots_[static_cast<size_t>(consumed_ % window_)];
  int64_t want = consumed_;
  if (!(s.ready && s.batch == want)) {
    ++consumers_waiting_;
    cv_ready_.wait(lk, [&] { return stopping_ || (s.ready && s.batch == want); });
    --consumers_waiting_;
  }
  AIMASS_CHECK(!stopping_, ClosedError, "Loader was closed while waiting for a batch");
  auto buf = std::move(s.buf);
  auto err = s.error;
  s = Slot();
  ++consumed_;
  // One slot came free: one idle worker can claim it (waking them all, or waking one
  // when none sleeps, costs a context switch per batch on a small machine).
  const bool wake = idle_workers_ > 0;
  lk.unlock();
  if (wake) cv_work_.notify_one();
  if (err) {
    std::lock_guard<std::mutex> g(mu_);
    running_ = false;  // the epoch cannot continue past a damaged record
    ++generation_;
  }
  if (err) std::rethrow_exception(err);
  return buf;
}

void Loader::worker() {
  for (;;) {
    int64_t b;
    uint64_t gen, epoch;
    std::shared_ptr<const std::vector<int64_t>> perm;
    {
      std::unique_lock<std::mutex> lk(mu_);
      auto can_claim = [&] {
        return stopping_ || (running_ && claimed_ < nbatches_ && claimed_ < consumed_ + window_);
      };
      if (!can_claim()) {
        ++idle_workers_;
        cv_work_.wait(lk, can_claim);
        --idle_workers_;
      }
      if (stopping_) return;
      b = claimed_++;
      gen = generation_;
      perm = perm_;
      epoch = epoch_;
    }
    std::shared_ptr<BatchBuffer> buf;
    std::exception_ptr err;
    try {
      buf = pool_->acquire();
      fill(*perm, epoch, b, *buf);
    } catch (...) {
      err = std::current_exception();
    }
    bool wake;
    {
      std::lock_guard<std::mutex> g(mu_);
      if (gen != generation_ || stopping_) continue;
      Slot& s = slots_[static_cast<size_t>(b % window_)];
      s.batch = b;
      s.ready = true;
      s.buf = std::move(buf);
      s.error = err;
      // the consumer waits for batch consumed_ only: a later one finishing first need not wake it
      wake = consumers_waiting_ > 0 && b == consumed_;
    }
    if (wake) cv_ready_.notify_all();
  }
}

// Records ahead of the one being read whose lines are requested early.
constexpr int64_t kPrefetchAhead = 4;

namespace {
inline void prefetch_bytes(const uint8_t* p, size_t n) {
  n = std::min<size_t>(n, 64u << 10);
  const uintptr_t end = reinterpret_cast<uintptr_t>(p) + n;
  for (uintptr_t a = reinterpret_cast<uintptr_t>(p) & ~uintptr_t(63); a < end; a += 64)
    __builtin_prefetch(reinterpret_cast<const void*>(a));
}
// memcpy that requests the n bytes at pf (if any) a few lines per 256-byte step, like
// crc32c_copy does on the checked path.
inline void copy_prefetching(uint8_t* dst, const uint8_t* src, size_t n, const uint8_t* pf) {
  size_t i = 0;
  if (pf) {
    for (; i + 256 <= n; i += 256) {
      prefetch_bytes(pf + i, 256);
      std::memcpy(dst + i, src + i, 256);
    }
    prefetch_bytes(pf + i, n - i);
  }
  std::memcpy(dst + i, src + i, n - i);
}
}  // namespace

void Loader::fill(const std::vector<int64_t>& perm, uint64_t epoch, int64_t b, BatchBuffer& buf) {
  const int64_t n = num_samples(), W = opt_.world_size, B = opt_.batch_size;
  const int64_t per_rank = samples_per_rank();
  const int64_t first = b * B;
  const int64_t rows = std::min(B, per_rank - first);
  buf.rows = rows;
  const Schema& sc = reader_->schema();
  std::vector<const uint8_t*> fp(sc.fields.size());
  std::vector<int64_t> d0(sc.fields.size());
  // Shuffled reads miss the cache at every step: the record id (indices_), its offset
  // (the shard's table), then its bytes. Doing each step for the whole batch before
  // the next makes the loads of one step independent, so their misses overlap instead
  // of queueing behind each other; the records themselves are then prefetched ahead.
  struct Row {
    int64_t rec;
    int64_t shard;
    uint64_t local;
    const uint8_t* frame;
  };
  std::vector<Row> rv(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    // rank-strided slice of the (wrapped) global permutation
    const int64_t q = perm[static_cast<size_t>((opt_.rank + W * (first + r)) % n)];
    rv[r].rec = all_records_ ? q : indices_[static_cast<size_t>(q)];
  }
  for (auto& row : rv) {
    reader_->split_index(row.rec, &row.shard, &row.local);
    row.frame = reader_->shard(row.shard).frame(row.local);
  }
  for (int64_t r = 0; r < std::min(rows, kPrefetchAhead); ++r) prefetch_bytes(rv[r].frame, frame_bytes_);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t rec = rv[r].rec;
    const int64_t shard = rv[r].shard;
    uint64_t len;
    uint32_t stored_crc = 0;
    bool check = opt_.verify == 1 || (opt_.verify == 2 && !verified_[rec].load(std::memory_order_relaxed));
    // The record kPrefetchAhead rows on: when this one is checked (every field goes through
    // a CRC loop) or all its fields are copied (copy_prefetching), those loops request the
    // same fields of the later record a few lines per step (49 prefetches issued back to
    // back stall on the miss queue); else all its lines are requested here.
    const uint8_t* ahead = r + kPrefetchAhead < rows ? rv[r + kPrefetchAhead].frame : nullptr;
    const bool spread = ahead && (check || copy_covers_record_);
    if (ahead) {
      if (spread) {
        __builtin_prefetch(ahead);                     // its length (and first fields)
        __builtin_prefetch(ahead + frame_bytes_ - 1);  // its last field and payload CRC
      } else {
        prefetch_bytes(ahead, frame_bytes_);
      }
    }
    const uint8_t* payload =
        reader_->shard(shard).open_frame(rv[r].local, rv[r].frame, &len, &stored_crc, check);
    try {
      reader_->decode(payload, len, rec, fp.data(), d0.data());
    } catch (const CorruptDataError& e) {
      // a damaged payload is reported as such, not as a schema mismatch
      if (check && mask_crc(crc32c(payload, len)) != stored_crc) reader_->payload_mismatch(rec);
      throw CorruptDataError(detail::concat("shard ", reader_->shard(shard).name(), ": ", e.what()));
    }
    if (check) {
      // One pass over the record: the fields lie back to back in schema order (a Loader's
      // fields are all fixed-size), so the payload CRC is chained field by field, and a
      // field without transforms is copied into the batch by the same loop that checks it.
      // Transforms run only after the whole record checked out.
      uint32_t crc = 0;
      for (size_t f = 0; f < plans_.size(); ++f) {
        const FieldPlan& pl = *plans_[f];
        const size_t nb = static_cast<size_t>(pl.src_bytes);
        const uint8_t* src = fp[static_cast<size_t>(pl.src)];
        const uint8_t* later = spread ? ahead + (src - rv[r].frame) : nullptr;  // same field, later record
        if (pl.plain)
          crc = crc32c_copy(buf.fields[f].data() + r * pl.out_bytes, src, nb, crc, later);
        else
          crc = crc32c(src, nb, crc, later);
      }
      if (mask_crc(crc) != stored_crc) reader_->payload_mismatch(rec);
      if (opt_.verify == 2) verified_[rec].store(1, std::memory_order_relaxed);
    }
    for (size_t f = 0; f < plans_.size(); ++f) {
      const FieldPlan& pl = *plans_[f];
      uint8_t* out = buf.fields[f].data() + r * pl.out_bytes;
      const uint8_t* src = fp[static_cast<size_t>(pl.src)];
      if (pl.user) {
        uint64_t us = mix(mix(opt_.seed ^ pl.transform_id, epoch), static_cast<uint64_t>(rec));
        int32_t rc = pl.user(src, pl.src_bytes, out, pl.out_bytes, rec, us);
        AIMASS_CHECK(rc == 0, ValueError, "CFunc on field '", sc.fields[pl.src].name, "' returned ", rc,
                     " for record ", rec);
        continue;
      }
      if (pl.onehot) {
        int64_t v = static_cast<int64_t>(load_as_float(src, pl.src_dtype));
        if (pl.src_dtype == DType::I64) std::memcpy(&v, src, 8);
        AIMASS_CHECK(v >= 0 && v < pl.classes, ValueError, "OneHot on field '", sc.fields[pl.src].name,
                     "': record ", rec, " has label ", v, " outside [0, ", pl.classes, ")");
        std::memset(out, 0, static_cast<size_t>(pl.out_bytes));
        size_t es = dtype_size(pl.out_dtype);
        uint8_t* o = out + v * es;
        if (is_float_out(pl.out_dtype)) store_float(o, pl.out_dtype, 1.f);
        else if (pl.out_dtype == DType::U8) *o = 1;
        else { int64_t one = 1; std::memcpy(o, &one, 8); }
        continue;
      }
      const bool geo = pl.crop || pl.flip_p > 0;
      if (pl.plain) {
        if (!check)  // else copied while checked
          copy_prefetching(out, src, static_cast<size_t>(pl.out_bytes), spread ? ahead + (src - rv[r].frame) : nullptr);
        continue;
      }
      const size_t ies = dtype_size(pl.src_dtype), oes = dtype_size(pl.out_dtype);
      const int64_t C = pl.C;
      if (!geo) {
        const int64_t elems = pl.out_bytes / static_cast<int64_t>(oes);
        if (pl.src_dtype == DType::U8 && pl.out_dtype == DType::F32) {
          affine_u8_f32(src, pl.pat_a.data(), pl.pat_b.data(), kAffinePixels * C, reinterpret_cast<float*>(out),
                        elems);
        } else {
          for (int64_t k = 0; k < elems; ++k) {
            int64_t c = k % C;
            store_float(out + k * oes, pl.out_dtype, load_as_float(src + k * ies, pl.src_dtype) * pl.a[c] + pl.b[c]);
          }
        }
        continue;
      }
      // per-sample randomness: a pure function of (seed, epoch, record, transform)
      uint64_t s = mix(mix(opt_.seed ^ pl.transform_id, epoch),
                       static_cast<uint64_t>(rec));
      int64_t top = pl.pad, left = pl.pad;  // no crop: identity window
      if (pl.crop) {
        top = static_cast<int64_t>(bounded(s, static_cast<uint64_t>(pl.H + 2 * pl.pad - pl.out_h + 1)));
        left = static_cast<int64_t>(bounded(s, static_cast<uint64_t>(pl.W + 2 * pl.pad - pl.out_w + 1)));
      }
      bool flip = false;
      if (pl.flip_p > 0) flip = (splitmix64(s) >> 11) * (1.0 / 9007199254740992.0) < pl.flip_p;
      // Row by row: the in-image span [x0, x1) of each output row is found once, the
      // zero-padding outside it is filled without per-pixel bounds checks.
      const bool fast = pl.elementwise && pl.src_dtype == DType::U8 && pl.out_dtype == DType::F32;
      const size_t px_out = static_cast<size_t>(C) * (pl.elementwise ? oes : ies);
      const int64_t shift = left - pl.pad;  // sx = x + shift (no flip) or out_w-1-x + shift (flip)
      int64_t x0, x1;
      if (!flip) {
        x0 = std::max<int64_t>(0, -shift);
        x1 = std::min<int64_t>(pl.out_w, pl.W - shift);
      } else {
        x0 = std::max<int64_t>(0, pl.out_w - pl.W + shift);
        x1 = std::min<int64_t>(pl.out_w, pl.out_w + shift);
      }
      if (x1 < x0) x1 = x0;
      auto fill_pad = [&](uint8_t* o, int64_t npx) {
        if (!pl.elementwise) {
          std::memset(o, 0, static_cast<size_t>(npx) * px_out);
        } else {
          for (int64_t k = 0; k < npx; ++k)
            for (int64_t c = 0; c < C; ++c) store_float(o + (k * C + c) * oes, pl.out_dtype, pl.b[c]);
        }
      };
      for (int64_t y = 0; y < pl.out_h; ++y) {
        const int64_t sy = y + top - pl.pad;
        uint8_t* orow = out + y * pl.out_w * static_cast<int64_t>(px_out);
        if (sy < 0 || sy >= pl.H || x1 == x0) {
          fill_pad(orow, pl.out_w);
          continue;
        }
        fill_pad(orow, x0);
        fill_pad(orow + x1 * static_cast<int64_t>(px_out), pl.out_w - x1);
        const uint8_t* srow = src + sy * pl.W * C * static_cast<int64_t>(ies);
        const int64_t sx0 = flip ? pl.out_w - 1 - x0 + shift : x0 + shift;
        if (fast) {
          float* o = reinterpret_cast<float*>(orow) + x0 * C;
          const uint8_t* sp = srow + sx0 * C;
          const int64_t chunk = kAffinePixels * C;
          if (!flip) {
            affine_u8_f32(sp, pl.pat_a.data(), pl.pat_b.data(), chunk, o, (x1 - x0) * C);
          } else if (C > 64) {  // wider pixels than the gather buffer takes: one at a time
            for (int64_t x = x0; x < x1; ++x)
              affine_u8_f32(sp - (x - x0) * C, pl.pat_a.data(), pl.pat_b.data(), chunk, o + (x - x0) * C, C);
          } else {
            // mirrored pixels gathered into order first, then the same kernel
            uint8_t tmp[kAffinePixels * 64];
            const int64_t per = kAffinePixels;
            for (int64_t x = x0; x < x1; x += per) {
              const int64_t m = std::min(per, x1 - x);
              const uint8_t* px = sp - (x - x0) * C;
              if (C == 3) {
                for (int64_t j = 0; j < m; ++j, px -= 3) {
                  tmp[3 * j] = px[0];
                  tmp[3 * j + 1] = px[1];
                  tmp[3 * j + 2] = px[2];
                }
              } else {
                for (int64_t j = 0; j < m; ++j, px -= C) std::memcpy(tmp + j * C, px, static_cast<size_t>(C));
              }
              affine_u8_f32(tmp, pl.pat_a.data(), pl.pat_b.data(), chunk, o + (x - x0) * C, m * C);
            }
          }
        } else if (!pl.elementwise) {
          if (!flip) {
            std::memcpy(orow + x0 * px_out, srow + sx0 * px_out, static_cast<size_t>(x1 - x0) * px_out);
          } else {
            uint8_t* o = orow + x0 * px_out;
            const uint8_t* sp = srow + sx0 * px_out;
            for (int64_t x = x0; x < x1; ++x, o += px_out, sp -= px_out)
              for (size_t k = 0; k < px_out; ++k) o[k] = sp[k];
          }
        } else {
          for (int64_t x = x0; x < x1; ++x) {
            const int64_t sx = flip ? sx0 - (x - x0) : sx0 + (x - x0);
            const uint8_t* sp = srow + sx * C * static_cast<int64_t>(ies);
            uint8_t* o = orow + x * static_cast<int64_t>(px_out);
            for (int64_t c = 0; c < C; ++c)
              store_float(o + c * oes, pl.out_dtype, load_as_float(sp + c * ies, pl.src_dtype) * pl.a[c] + pl.b[c]);
          }
        }
      }
    }
  }
}

}  // namespace data
}  // namespace aimass
