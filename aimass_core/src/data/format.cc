// The record format (docs/format.md): schema checks, the shard writer and the
// memory-mapped shard reader.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "aimass/checked.h"
#include "aimass/data.h"
#include "runtime/json.h"

namespace aimass {
namespace data {

namespace {
constexpr char kMagic[8] = {'A', 'I', 'M', 'A', 'S', 'S', 'R', 'C'};
constexpr char kFooterMagic[8] = {'A', 'I', 'M', 'R', 'E', 'C', 'F', 'T'};
constexpr size_t kHeaderBytesV1 = 16;  // magic, version, crc
constexpr size_t kHeaderBytesV2 = 32;  // magic, version, crc, fingerprint, reserved, crc
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

std::string to_hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

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
// Largest byte count of one field's row (or of a whole fixed record): anything
// bigger cannot be a record of a shard on any real disk, and keeping sizes below
// 2^62 leaves every sum and product the reader and loader form with them room.
constexpr int64_t kMaxRecordBytes = int64_t(1) << 62;

int64_t Field::row_elems() const {
  int64_t e = 1;
  for (size_t i = variable() ? 1 : 0; i < shape.size(); ++i)
    e = checked::mul<ValueError>(e, shape[i], detail::concat("schema: field '", name, "' shape"));
  return e;
}
int64_t Field::fixed_bytes() const {
  return checked::mul<ValueError>(row_elems(), static_cast<int64_t>(dtype_size(dtype)),
                                  detail::concat("schema: field '", name, "' bytes per record"));
}

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
  for (const auto& f : fields) b = checked::add<ValueError>(b, f.fixed_bytes(), "schema: bytes per record");
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
    AIMASS_CHECK(f.shape.size() <= 32, ValueError, "schema: field '", f.name, "' has ", f.shape.size(),
                 " dimensions; at most 32 are supported");
    AIMASS_CHECK(f.fixed_bytes() <= kMaxRecordBytes, ValueError, "schema: field '", f.name, "' needs ",
                 f.fixed_bytes(), " bytes per record (or per row of its variable dimension); at most 2^62");
  }
  AIMASS_CHECK(fixed_record_bytes() <= kMaxRecordBytes, ValueError, "schema: a record needs ",
               fixed_record_bytes(), " bytes; at most 2^62");
}

uint64_t schema_fingerprint(const Schema& schema) {
  uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a 64
  auto eat = [&h](const void* p, size_t n) {
    const uint8_t* b = static_cast<const uint8_t*>(p);
    for (size_t i = 0; i < n; ++i) {
      h ^= b[i];
      h *= 0x100000001b3ull;
    }
  };
  for (const Field& f : schema.fields) {
    eat(f.name.data(), f.name.size() + 1);  // with its terminating 0
    const char* dt = dtype_name(f.dtype);
    eat(dt, std::strlen(dt) + 1);
    uint32_t nd = static_cast<uint32_t>(f.shape.size());
    eat(&nd, 4);
    for (int64_t d : f.shape) eat(&d, 8);
  }
  return h;
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
  const uint64_t fingerprint = schema_fingerprint(schema);
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
        bytes = checked::mul<ValueError>(bytes, d0, detail::concat("write: field '", schema.fields[f].name,
                                                                    "' record ", i, " bytes"));
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
      uint8_t head[kHeaderBytesV2] = {};
      uint32_t ver = kShardVersion, reserved = 0;
      std::memcpy(head, kMagic, 8);
      std::memcpy(head + 8, &ver, 4);
      uint32_t hcrc = mask_crc(crc32c(head, 12));
      std::memcpy(head + 12, &hcrc, 4);
      std::memcpy(head + 16, &fingerprint, 8);
      std::memcpy(head + 24, &reserved, 4);
      uint32_t fcrc = mask_crc(crc32c(head, 28));
      std::memcpy(head + 28, &fcrc, 4);
      file->write(head, sizeof head);
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
// Every number below comes from the file: each sum and product is checked (or
// bounded by a comparison done first) so that no value wraps around 2^64.
Shard::Shard(const std::string& path, const std::string& display_name) : name_(display_name) {
  // O_NONBLOCK: a FIFO in a shard's place must fail below (not a regular file), not block
  int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  AIMASS_CHECK(fd >= 0, IOError, "cannot open shard ", path, ": ", errno_str());
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    throw IOError(detail::concat("cannot stat shard ", path, ": ", errno_str()));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw CorruptDataError(detail::concat("shard ", name_, ": ", path, " is not a regular file"));
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
  if (file_size_ < kHeaderBytesV1 || std::memcmp(base_, kMagic, 8) != 0)
    fail(detail::concat("not an aimass record shard (bad header, file is ", file_size_, " bytes)"));
  if (ld32(base_ + 12) != mask_crc(crc32c(base_, 12))) fail("header checksum mismatch");
  version_ = ld32(base_ + 8);
  if (version_ == 1) {
    header_bytes_ = kHeaderBytesV1;
  } else if (version_ == 2) {
    header_bytes_ = kHeaderBytesV2;
    if (file_size_ < kHeaderBytesV2) fail(detail::concat("truncated header (file is ", file_size_, " bytes)"));
    if (ld32(base_ + 28) != mask_crc(crc32c(base_, 28))) fail("header checksum mismatch (schema fingerprint)");
    if (ld32(base_ + 24) != 0) fail("reserved header bytes 24..27 are not zero");
    fingerprint_ = ld64(base_ + 16);
  } else {
    fail(detail::concat("unsupported format version ", version_, " (this aimass reads versions 1..",
                        kShardVersion, ")"));
  }
  check_footer();
  check_offsets();
}

void Shard::fail(const std::string& why) {
  if (base_) ::munmap(const_cast<uint8_t*>(base_), file_size_);
  base_ = nullptr;
  throw CorruptDataError(detail::concat("shard ", name_, ": ", why,
                                        "; the file is damaged: rewrite the dataset or restore the shard"));
}

// The footer is damaged or missing: walk the frames from the header to tell a
// truncated shard (the records stop early) from a full-size one whose footer
// fields were overwritten, and say which.
void Shard::footer_damaged(const std::string& why) {
  uint64_t pos = header_bytes_, k = 0;
  const uint64_t size = file_size_;
  while (size - pos >= 12) {
    uint64_t len = ld64(base_ + pos);
    if (ld32(base_ + pos + 8) != mask_crc(crc32c(base_ + pos, 8))) break;
    if (size - pos < kFrameBytes || len > size - pos - kFrameBytes) break;
    pos += kFrameBytes + len;
    ++k;
  }
  // Full size: k framed records followed by exactly a k-entry offset table and the tail.
  const bool full = size - pos >= kTailBytes && size - pos - kTailBytes == 8 * k;
  if (full) {
    const uint8_t* t = base_ + size - kTailBytes;
    std::string what;
    if (std::memcmp(t + 24, kFooterMagic, 8) != 0) what = "the footer magic (the last 8 bytes) is damaged";
    else if (ld64(t) != k && ld64(t + 8) != pos)
      what = detail::concat("the footer's record count and offset-table position are damaged (they say ",
                            ld64(t), " records at byte ", ld64(t + 8), "; the file holds ", k,
                            " framed records and the table at byte ", pos, ")");
    else if (ld64(t) != k)
      what = detail::concat("the footer's record count is damaged (it says ", ld64(t), "; the file holds ", k,
                            " framed records)");
    else if (ld64(t + 8) != pos)
      what = detail::concat("the footer's offset-table position is damaged (it says byte ", ld64(t + 8),
                            "; the table starts at byte ", pos, ")");
    else
      what = why;
    fail(what);
  }
  fail(detail::concat("truncated: ", why, "; records 0..", k == 0 ? 0 : k - 1, k == 0 ? " (none)" : "",
                      " are framed, record ", k, " is incomplete at byte ", pos, " of ", size));
}

void Shard::check_footer() {
  const uint64_t size = file_size_;
  if (size < header_bytes_ + kTailBytes || std::memcmp(base_ + size - 8, kFooterMagic, 8) != 0)
    footer_damaged("the footer is missing");
  const uint8_t* t = base_ + size - kTailBytes;
  const uint64_t n = ld64(t), opos = ld64(t + 8);
  // The table [opos, opos + 8n) must sit between the data and the tail, exactly.
  const uint64_t table_end = size - kTailBytes;
  if (opos < header_bytes_ || opos > table_end || n > (table_end - opos) / 8 || opos + 8 * n != table_end)
    footer_damaged(detail::concat("the footer says ", n, " records with their offset table at byte ", opos,
                                  ", which does not fit a file of ", size, " bytes"));
  if (ld32(t + 16) != mask_crc(crc32c(base_ + opos, 8 * n + 16)))
    fail("footer checksum mismatch (record offsets are damaged)");
  if (ld32(t + 20) != 0) fail("reserved footer bytes are not zero");
  n_ = n;
  table_pos_ = opos;
  offsets_ = base_ + opos;
}

// Records lie back to back from the header to the table: offsets start right
// after the header and increase by at least a frame each; read() then checks that
// each length fills exactly the space up to the next offset.
void Shard::check_offsets() {
  uint64_t prev = 0;
  for (uint64_t i = 0; i < n_; ++i) {
    const uint64_t off = ld64(offsets_ + 8 * i);
    if (i == 0 && off != header_bytes_)
      fail(detail::concat("offset table: record 0 starts at byte ", off, ", not right after the header (byte ",
                          header_bytes_, ")"));
    if (i > 0 && (off <= prev || off - prev < kFrameBytes))
      fail(detail::concat("offset table: record ", i, " starts at byte ", off, ", record ", i - 1, " at byte ",
                          prev, "; offsets must increase by at least a ", kFrameBytes, "-byte frame"));
    if (!checked::range_fits(off, kFrameBytes, table_pos_))
      fail(detail::concat("offset table: record ", i, " starts at byte ", off,
                          ", outside the data region [", header_bytes_, ", ", table_pos_, ")"));
    prev = off;
  }
  if (n_ == 0 && table_pos_ != header_bytes_)
    fail(detail::concat("the footer says 0 records but ", table_pos_ - header_bytes_, " data bytes follow the header"));
}

Shard::~Shard() {
  if (base_) ::munmap(const_cast<uint8_t*>(base_), file_size_);
}

void Shard::corrupt(uint64_t i, const std::string& why) const {
  throw CorruptDataError(detail::concat("shard ", name_, " record ", i, ": ", why,
                                        "; the file is damaged: rewrite the dataset or restore the shard"));
}

const uint8_t* Shard::frame(uint64_t i) const {
  if (i >= n_) corrupt(i, detail::concat("no such record (the shard holds ", n_, ")"));
  uint64_t off = ld64(offsets_ + 8 * i);
  if (off < header_bytes_ || !checked::range_fits(off, kFrameBytes, table_pos_)) corrupt(i, "offset out of range");
  return base_ + off;
}

const uint8_t* Shard::open_frame(uint64_t i, const uint8_t* p, uint64_t* len, uint32_t* masked_crc,
                                 bool verify_len) const {
  const uint64_t off = static_cast<uint64_t>(p - base_);
  // The frame ends where the next one starts (the table, after the last record).
  const uint64_t next = i + 1 < n_ ? ld64(offsets_ + 8 * (i + 1)) : table_pos_;
  if (next > table_pos_ || next < off || next - off < kFrameBytes) corrupt(i, "offset out of range");
  uint64_t n = ld64(p);
  if (verify_len && ld32(p + 8) != mask_crc(crc32c(p, 8))) corrupt(i, "length checksum mismatch");
  if (n != next - off - kFrameBytes)
    corrupt(i, detail::concat("length ", n, " does not fill its frame (", next - off - kFrameBytes,
                              " payload bytes up to the next record)"));
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
  const uint64_t limit = table_pos_;
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

Reader::Reader(Schema schema, const std::vector<std::string>& paths, const std::vector<std::string>& names,
               bool require_fingerprint)
    : schema_(std::move(schema)) {
  schema_.validate();
  AIMASS_CHECK(paths.size() == names.size(), ValueError, "Reader: paths and names differ in length");
  const uint64_t fp = schema_fingerprint(schema_);
  starts_.push_back(0);
  for (size_t s = 0; s < paths.size(); ++s) {
    shards_.push_back(std::make_unique<Shard>(paths[s], names[s]));
    const Shard& sh = *shards_.back();
    if (sh.version() >= 2 && sh.fingerprint() != fp)
      throw CorruptDataError(detail::concat(
          "shard ", names[s], ": the schema does not match the one the shard was written with (schema "
          "fingerprint ", to_hex(sh.fingerprint()), " in the shard, ", to_hex(fp),
          " from the schema given): index.json's fields were reordered, renamed or retyped, or the shard "
          "belongs to another dataset; restore index.json or rewrite the dataset"));
    if (require_fingerprint && sh.version() < 2)
      throw CorruptDataError(detail::concat("shard ", names[s], " is format version ", sh.version(),
                                            " but the dataset's index is version 2; the shard was replaced by an "
                                            "older one: rewrite the dataset"));
    total_ = checked::add<CorruptDataError>(total_, checked::narrow<int64_t, CorruptDataError>(
                                                         sh.size(), "shard record count"),
                                            "records over all shards");
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
