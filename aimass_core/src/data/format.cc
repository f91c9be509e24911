// The record format (docs/format.md): schema checks, the shard writer and the
// memory-mapped shard reader.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "aimass/data.h"

namespace aimass {
namespace data {

namespace {
constexpr char kMagic[8] = {'A', 'I', 'M', 'A', 'S', 'S', 'R', 'C'};
constexpr char kFooterMagic[8] = {'A', 'I', 'M', 'R', 'E', 'C', 'F', 'T'};
constexpr uint32_t kVersion = 1;
constexpr size_t kHeaderBytes = 16;
constexpr size_t kTailBytes = 32;  // n, offsets_pos, crc, reserved, magic
constexpr size_t kFrameBytes = 16;  // u64 len + u32 len crc + u32 payload crc

inline uint64_t ld64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;  // the format is little-endian; so is every host we build for
}
inline uint32_t ld32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

std::string errno_str() { return std::strerror(errno); }

// Buffered file writer that fsyncs and renames into place on commit.
class AtomicFile {
 public:
  AtomicFile(const std::string& final_path) : final_(final_path) {
    tmp_ = final_path + ".tmp-" + std::to_string(::getpid());
    f_ = std::fopen(tmp_.c_str(), "wb");
    AIMASS_CHECK(f_ != nullptr, IOError, "cannot create ", tmp_, ": ", errno_str());
    std::setvbuf(f_, nullptr, _IOFBF, 1 << 20);
  }
  ~AtomicFile() {
    if (f_) {
      std::fclose(f_);
      std::remove(tmp_.c_str());
    }
  }
  void write(const void* p, size_t n) {
    if (n == 0) return;
    AIMASS_CHECK(std::fwrite(p, 1, n, f_) == n, IOError, "write to ", tmp_, " failed: ", errno_str());
    pos_ += n;
  }
  uint64_t pos() const { return pos_; }
  void commit() {
    AIMASS_CHECK(std::fflush(f_) == 0 && ::fsync(fileno(f_)) == 0, IOError, "flush/fsync of ", tmp_,
                 " failed: ", errno_str());
    std::fclose(f_);
    f_ = nullptr;
    AIMASS_CHECK(std::rename(tmp_.c_str(), final_.c_str()) == 0, IOError, "rename ", tmp_, " -> ", final_,
                 " failed: ", errno_str());
  }

 private:
  std::string final_, tmp_;
  FILE* f_ = nullptr;
  uint64_t pos_ = 0;
};

void fsync_dir(const std::string& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}
}  // namespace

// ---------------------------------------------------------------- schema
int64_t Field::row_elems() const {
  int64_t e = 1;
  for (size_t i = variable() ? 1 : 0; i < shape.size(); ++i) e *= shape[i];
  return e;
}
int64_t Field::fixed_bytes() const { return row_elems() * static_cast<int64_t>(dtype_size(dtype)); }

int Schema::find(const std::string& name) const {
  for (size_t i = 0; i < fields.size(); ++i)
    if (fields[i].name == name) return static_cast<int>(i);
  return -1;
}
bool Schema::all_fixed() const {
  for (const auto& f : fields)
    if (f.variable()) return false;
  return true;
}
int64_t Schema::fixed_record_bytes() const {
  int64_t b = 0;
  for (const auto& f : fields) b += f.fixed_bytes();
  return b;
}
void Schema::validate() const {
  AIMASS_CHECK(!fields.empty(), ValueError, "schema: a dataset needs at least one field");
  for (size_t i = 0; i < fields.size(); ++i) {
    const Field& f = fields[i];
    AIMASS_CHECK(!f.name.empty(), ValueError, "schema: field ", i, " has an empty name");
    AIMASS_CHECK(find(f.name) == static_cast<int>(i), ValueError, "schema: field name '", f.name,
                 "' appears twice");
    for (size_t d = 0; d < f.shape.size(); ++d)
      AIMASS_CHECK(f.shape[d] >= 0 || (d == 0 && f.shape[d] == -1), ValueError, "schema: field '", f.name,
                   "' has dimension ", d, " = ", f.shape[d], "; only the first dimension may be variable (-1)");
  }
}

// ---------------------------------------------------------------- writer
std::vector<ShardInfo> write_shards(const std::string& dir, const Schema& schema,
                                    const std::vector<Column>& columns, int64_t n, int64_t shard_bytes,
                                    int first_shard) {
  schema.validate();
  AIMASS_CHECK(columns.size() == schema.fields.size(), ValueError, "write: got ", columns.size(),
               " columns for a schema of ", schema.fields.size(), " fields");
  AIMASS_CHECK(n >= 0, ValueError, "write: record count must be >= 0, got ", n);
  AIMASS_CHECK(shard_bytes > 0, ValueError, "write: shard_bytes must be > 0, got ", shard_bytes);
  const size_t nf = schema.fields.size();
  std::vector<const uint8_t*> cur(nf);
  std::vector<int64_t> row_bytes(nf);
  for (size_t f = 0; f < nf; ++f) {
    cur[f] = static_cast<const uint8_t*>(columns[f].data);
    row_bytes[f] = schema.fields[f].fixed_bytes();
    AIMASS_CHECK(!schema.fields[f].variable() || columns[f].dim0 != nullptr, ValueError, "write: field '",
                 schema.fields[f].name, "' is variable but no first dimensions were given");
  }
  std::vector<ShardInfo> out;
  std::unique_ptr<AtomicFile> file;
  std::vector<uint64_t> offsets;
  std::string name;
  std::vector<uint8_t> payload;

  auto finish = [&]() {
    uint64_t pos = file->pos();
    uint64_t cnt = offsets.size();
    uint32_t crc = crc32c(offsets.data(), offsets.size() * 8);
    crc = crc32c(&cnt, 8, crc);
    crc = crc32c(&pos, 8, crc);
    uint32_t masked = mask_crc(crc), reserved = 0;
    file->write(offsets.data(), offsets.size() * 8);
    file->write(&cnt, 8);
    file->write(&pos, 8);
    file->write(&masked, 4);
    file->write(&reserved, 4);
    file->write(kFooterMagic, 8);
    uint64_t total = file->pos();
    file->commit();
    out.push_back({name, cnt, total});
    file.reset();
    offsets.clear();
  };

  for (int64_t i = 0; i < n; ++i) {
    payload.clear();
    for (size_t f = 0; f < nf; ++f) {
      int64_t bytes = row_bytes[f];
      if (schema.fields[f].variable()) {
        int64_t d0 = columns[f].dim0[i];
        AIMASS_CHECK(d0 >= 0, ValueError, "write: field '", schema.fields[f].name, "' record ", i,
                     " has negative first dimension ", d0);
        const uint8_t* p = reinterpret_cast<const uint8_t*>(&d0);
        payload.insert(payload.end(), p, p + 8);
        bytes *= d0;
      }
      payload.insert(payload.end(), cur[f], cur[f] + bytes);
      cur[f] += bytes;
    }
    uint64_t len = payload.size();
    if (file && !offsets.empty() && file->pos() + kFrameBytes + len + kTailBytes + 8 * (offsets.size() + 1) >
                                        static_cast<uint64_t>(shard_bytes))
      finish();
    if (!file) {
      char buf[32];
      std::snprintf(buf, sizeof buf, "part-%05d.rec", first_shard + static_cast<int>(out.size()));
      name = buf;
      file = std::make_unique<AtomicFile>(dir + "/" + name);
      uint32_t ver = kVersion;
      uint32_t hcrc = crc32c(kMagic, 8);
      hcrc = mask_crc(crc32c(&ver, 4, hcrc));
      file->write(kMagic, 8);
      file->write(&ver, 4);
      file->write(&hcrc, 4);
    }
    offsets.push_back(file->pos());
    uint32_t lcrc = mask_crc(crc32c(&len, 8));
    uint32_t pcrc = mask_crc(crc32c(payload.data(), len));
    file->write(&len, 8);
    file->write(&lcrc, 4);
    file->write(payload.data(), len);
    file->write(&pcrc, 4);
  }
  if (file) finish();
  fsync_dir(dir);
  return out;
}

// ---------------------------------------------------------------- reader
Shard::Shard(const std::string& path, const std::string& display_name) : name_(display_name) {
  int fd = ::open(path.c_str(), O_RDONLY);
  AIMASS_CHECK(fd >= 0, IOError, "cannot open shard ", path, ": ", errno_str());
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    throw IOError(detail::concat("cannot stat shard ", path, ": ", errno_str()));
  }
  file_size_ = static_cast<size_t>(st.st_size);
  if (file_size_ > 0) {
    void* m = ::mmap(nullptr, file_size_, PROT_READ, MAP_SHARED, fd, 0);
    ::close(fd);
    AIMASS_CHECK(m != MAP_FAILED, IOError, "cannot map shard ", path, ": ", errno_str());
    base_ = static_cast<const uint8_t*>(m);
  } else {
    ::close(fd);
  }
  auto fail = [&](const std::string& why) {
    if (base_) ::munmap(const_cast<uint8_t*>(base_), file_size_);
    base_ = nullptr;
    throw CorruptDataError(detail::concat("shard ", name_, ": ", why,
                                          "; the file is damaged: rewrite the dataset or restore the shard"));
  };
  if (file_size_ < kHeaderBytes || std::memcmp(base_, kMagic, 8) != 0)
    fail(detail::concat("not an aimass record shard (bad header, file is ", file_size_, " bytes)"));
  if (ld32(base_ + 12) != mask_crc(crc32c(base_, 12))) fail("header checksum mismatch");
  if (ld32(base_ + 8) != kVersion) fail(detail::concat("unsupported format version ", ld32(base_ + 8)));

  bool tail_ok = file_size_ >= kHeaderBytes + kTailBytes &&
                 std::memcmp(base_ + file_size_ - 8, kFooterMagic, 8) == 0;
  if (tail_ok) {
    const uint8_t* t = base_ + file_size_ - kTailBytes;
    n_ = ld64(t);
    uint64_t opos = ld64(t + 8);
    tail_ok = opos >= kHeaderBytes && n_ <= (file_size_ - kTailBytes - opos) / 8 &&
              opos + 8 * n_ + kTailBytes == file_size_;
    if (tail_ok) {
      uint32_t crc = crc32c(base_ + opos, 8 * n_ + 16);
      if (ld32(t + 16) != mask_crc(crc)) fail("footer checksum mismatch (record offsets are damaged)");
      offsets_ = base_ + opos;
    }
  }
  if (!tail_ok) {
    // Truncated or overwritten end: walk the framing to say which record broke.
    uint64_t pos = kHeaderBytes, k = 0;
    while (pos + 12 <= file_size_) {
      uint64_t len = ld64(base_ + pos);
      if (ld32(base_ + pos + 8) != mask_crc(crc32c(base_ + pos, 8))) break;
      if (len > file_size_ || pos + kFrameBytes + len > file_size_) break;
      pos += kFrameBytes + len;
      ++k;
    }
    fail(detail::concat("truncated: the footer is missing; records 0..", k == 0 ? 0 : k - 1,
                        k == 0 ? " (none)" : "", " are framed, record ", k, " is incomplete at byte ", pos,
                        " of ", file_size_));
  }
}

Shard::~Shard() {
  if (base_) ::munmap(const_cast<uint8_t*>(base_), file_size_);
}

void Shard::corrupt(uint64_t i, const std::string& why) const {
  throw CorruptDataError(detail::concat("shard ", name_, " record ", i, ": ", why,
                                        "; the file is damaged: rewrite the dataset or restore the shard"));
}

const uint8_t* Shard::frame(uint64_t i) const {
  uint64_t off = ld64(offsets_ + 8 * i);
  const uint64_t limit = file_size_ - kTailBytes - 8 * n_;
  if (off < kHeaderBytes || off + kFrameBytes > limit) corrupt(i, "offset out of range");
  return base_ + off;
}

const uint8_t* Shard::open_frame(uint64_t i, const uint8_t* p, uint64_t* len, uint32_t* masked_crc,
                                 bool verify_len) const {
  const uint64_t off = static_cast<uint64_t>(p - base_);
  const uint64_t limit = file_size_ - kTailBytes - 8 * n_;
  uint64_t n = ld64(p);
  if (verify_len && ld32(p + 8) != mask_crc(crc32c(p, 8))) corrupt(i, "length checksum mismatch");
  if (n > limit - off - kFrameBytes) corrupt(i, detail::concat("length ", n, " runs past the end of the data"));
  *len = n;
  *masked_crc = ld32(p + 12 + n);
  return p + 12;
}

const uint8_t* Shard::record(uint64_t i, uint64_t* len, bool verify) const {
  uint32_t stored;
  const uint8_t* p = locate(i, len, &stored, verify);
  if (verify && stored != mask_crc(crc32c(p, *len))) corrupt(i, "payload checksum mismatch");
  return p;
}

void Shard::prefetch(uint64_t i) const {
  if (i >= n_) return;
  // Shuffled reads jump between pages, so the hardware prefetcher cannot see the
  // next record coming; ask for its lines while the current one is checksummed.
  const uint64_t limit = file_size_ - kTailBytes - 8 * n_;
  uint64_t off = ld64(offsets_ + 8 * i);
  uint64_t end = i + 1 < n_ ? ld64(offsets_ + 8 * (i + 1)) : limit;
  if (off >= limit || end > limit || end <= off) return;
  end = std::min<uint64_t>(end, off + (64u << 10));
  for (uint64_t a = off & ~uint64_t(63); a < end; a += 64) __builtin_prefetch(base_ + a);
}

void Reader::prefetch(int64_t index) const {
  if (index < 0 || index >= total_) return;
  size_t s = shard_of(index);
  shards_[s]->prefetch(static_cast<uint64_t>(index - starts_[s]));
}

Reader::Reader(Schema schema, const std::vector<std::string>& paths, const std::vector<std::string>& names)
    : schema_(std::move(schema)) {
  schema_.validate();
  AIMASS_CHECK(paths.size() == names.size(), ValueError, "Reader: paths and names differ in length");
  starts_.push_back(0);
  for (size_t s = 0; s < paths.size(); ++s) {
    shards_.push_back(std::make_unique<Shard>(paths[s], names[s]));
    total_ += static_cast<int64_t>(shards_.back()->size());
    starts_.push_back(total_);
  }
}

size_t Reader::shard_of(int64_t index) const {
  // upper_bound over shard starts
  size_t lo = 0, hi = shards_.size();
  while (hi - lo > 1) {
    size_t mid = (lo + hi) / 2;
    if (starts_[mid] <= index) lo = mid; else hi = mid;
  }
  return lo;
}

const uint8_t* Reader::record(int64_t index, uint64_t* len, bool verify, int64_t* shard_out) const {
  AIMASS_CHECK(index >= 0 && index < total_, ValueError, "record index ", index, " is out of range [0, ", total_,
               ")");
  size_t s = shard_of(index);
  if (shard_out) *shard_out = static_cast<int64_t>(s);
  return shards_[s]->record(static_cast<uint64_t>(index - starts_[s]), len, verify);
}

const uint8_t* Reader::locate(int64_t index, uint64_t* len, uint32_t* masked_crc, bool verify_len,
                              int64_t* shard_out) const {
  AIMASS_CHECK(index >= 0 && index < total_, ValueError, "record index ", index, " is out of range [0, ", total_,
               ")");
  size_t s = shard_of(index);
  if (shard_out) *shard_out = static_cast<int64_t>(s);
  return shards_[s]->locate(static_cast<uint64_t>(index - starts_[s]), len, masked_crc, verify_len);
}

void Reader::payload_mismatch(int64_t index) const {
  size_t s = shard_of(index);
  shards_[s]->corrupt(static_cast<uint64_t>(index - starts_[s]), "payload checksum mismatch");
}

void Reader::decode(const uint8_t* payload, uint64_t len, int64_t index, const uint8_t** field_ptr,
                    int64_t* dim0) const {
  uint64_t pos = 0;
  for (size_t f = 0; f < schema_.fields.size(); ++f) {
    const Field& fd = schema_.fields[f];
    uint64_t bytes = static_cast<uint64_t>(fd.fixed_bytes());
    int64_t d0 = fd.shape.empty() ? 1 : fd.shape[0];
    if (fd.variable()) {
      AIMASS_CHECK(pos + 8 <= len, CorruptDataError, "record ", index, ": payload too short for field '",
                   fd.name, "' (schema does not match the data)");
      d0 = static_cast<int64_t>(ld64(payload + pos));
      pos += 8;
      AIMASS_CHECK(d0 >= 0 && (bytes == 0 || static_cast<uint64_t>(d0) <= (len - pos) / bytes), CorruptDataError,
                   "record ", index, ": field '", fd.name, "' first dimension ", d0, " exceeds the payload");
      bytes *= static_cast<uint64_t>(d0);
    }
    AIMASS_CHECK(pos + bytes <= len, CorruptDataError, "record ", index, ": payload of ", len,
                 " bytes is too short for field '", fd.name, "' (schema does not match the data)");
    field_ptr[f] = payload + pos;
    dim0[f] = d0;
    pos += bytes;
  }
  AIMASS_CHECK(pos == len, CorruptDataError, "record ", index, ": payload has ", len - pos,
               " bytes beyond the schema's fields (schema does not match the data)");
}

int64_t Reader::verify_all() const {
  std::vector<const uint8_t*> ptr(schema_.fields.size());
  std::vector<int64_t> d0(schema_.fields.size());
  for (int64_t i = 0; i < total_; ++i) {
    uint64_t len;
    const uint8_t* p = record(i, &len, true);
    decode(p, len, i, ptr.data(), d0.data());
  }
  return total_;
}

}  // namespace data
}  // namespace aimass
