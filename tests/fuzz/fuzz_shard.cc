// Fuzz target: the record shard reader (aimass::data::Shard/Reader, format.cc).
//
// Input: byte 0 picks one of the schemas below (bit 7: the index is version 2, so
// version-1 shards are refused), the rest is a shard file. The reader must either
// throw an aimass error or hand out payloads that an independent parse of the same
// bytes agrees with: every record inside the data region, the records back to back,
// every decoded field inside its payload. Anything else traps.
//
// The custom mutator knows the format: it rebuilds valid shards (CRCs, footer,
// fingerprint) from mutated payloads, then damages one structural field (a length,
// an offset, the count, the table position, a reserved word, the version, the
// fingerprint) to a boundary value and reseals the CRC that covers it, since
// random bytes never get past the CRCs.
#include <cstring>
#include <string>
#include <vector>

#include "aimass/data.h"
#include "fuzz_util.h"

namespace ad = aimass::data;
using aimass::DType;

namespace {

constexpr size_t kTail = 32;

const std::vector<ad::Schema>& schemas() {
  static const std::vector<ad::Schema> s = [] {
    std::vector<ad::Schema> v(4);
    v[0].fields = {{"x", DType::U8, {4, 4, 3}}, {"y", DType::I64, {}}};
    v[1].fields = {{"seq", DType::I32, {-1, 3}}, {"label", DType::U8, {}}};
    v[2].fields = {{"a", DType::F32, {2}}, {"b", DType::F32, {2}}};
    v[3].fields = {{"e", DType::U8, {0}}, {"tok", DType::I16, {-1}}, {"f", DType::Bool, {1}}};
    return v;
  }();
  return s;
}

uint64_t ld64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}
void st64(uint8_t* p, uint64_t v) { std::memcpy(p, &v, 8); }
void st32(uint8_t* p, uint32_t v) { std::memcpy(p, &v, 4); }
uint32_t mcrc(const void* p, size_t n) { return ad::mask_crc(ad::crc32c(p, n)); }

// ---------------------------------------------------------------- shard model
struct Model {
  uint32_t version = 2;
  uint64_t fingerprint = 0;
  std::vector<std::vector<uint8_t>> payloads;
};

std::vector<uint8_t> serialize(const Model& m) {
  std::vector<uint8_t> out;
  const char magic[8] = {'A', 'I', 'M', 'A', 'S', 'S', 'R', 'C'};
  out.insert(out.end(), magic, magic + 8);
  out.resize(m.version == 1 ? 16 : 32);
  st32(out.data() + 8, m.version);
  st32(out.data() + 12, mcrc(out.data(), 12));
  if (m.version != 1) {
    st64(out.data() + 16, m.fingerprint);
    st32(out.data() + 24, 0);
    st32(out.data() + 28, mcrc(out.data(), 28));
  }
  std::vector<uint64_t> offsets;
  for (const auto& p : m.payloads) {
    offsets.push_back(out.size());
    size_t at = out.size();
    out.resize(at + 16 + p.size());
    st64(out.data() + at, p.size());
    st32(out.data() + at + 8, mcrc(out.data() + at, 8));
    if (!p.empty()) std::memcpy(out.data() + at + 12, p.data(), p.size());
    st32(out.data() + at + 12 + p.size(), mcrc(p.data(), p.size()));
  }
  size_t table = out.size();
  out.resize(table + 8 * offsets.size() + kTail);
  for (size_t i = 0; i < offsets.size(); ++i) st64(out.data() + table + 8 * i, offsets[i]);
  uint8_t* t = out.data() + out.size() - kTail;
  st64(t, offsets.size());
  st64(t + 8, table);
  st32(t + 16, mcrc(out.data() + table, 8 * offsets.size() + 16));
  st32(t + 20, 0);
  std::memcpy(t + 24, "AIMRECFT", 8);
  return out;
}

// Lenient parse: header version/fingerprint, then payloads by walking the frames.
Model parse(const uint8_t* d, size_t n) {
  Model m;
  if (n >= 16 && ld64(d) == ld64(reinterpret_cast<const uint8_t*>("AIMASSRC"))) {
    uint32_t v;
    std::memcpy(&v, d + 8, 4);
    m.version = v == 1 ? 1 : 2;
    if (m.version == 2 && n >= 32) m.fingerprint = ld64(d + 16);
  }
  size_t pos = m.version == 1 ? 16 : 32;
  while (pos + 16 <= n && m.payloads.size() < 64) {
    uint64_t len = ld64(d + pos);
    if (len > n - pos - 16) break;
    m.payloads.emplace_back(d + pos + 12, d + pos + 12 + len);
    pos += 16 + len;
  }
  return m;
}

// A payload that decodes under schema `s` (random contents, random variable dims).
std::vector<uint8_t> valid_payload(const ad::Schema& s, aimass_fuzz::Rng& r) {
  std::vector<uint8_t> p;
  for (const auto& f : s.fields) {
    uint64_t rows = 1;
    if (f.variable()) {
      rows = r.below(6);
      uint8_t b[8];
      st64(b, rows);
      p.insert(p.end(), b, b + 8);
    }
    uint64_t bytes = static_cast<uint64_t>(f.fixed_bytes()) * rows;
    for (uint64_t i = 0; i < bytes; ++i) p.push_back(static_cast<uint8_t>(r.next()));
  }
  return p;
}

// Damage one structural field of a serialized shard and reseal the CRC covering it.
void damage(std::vector<uint8_t>& b, aimass_fuzz::Rng& r) {
  const size_t n = b.size();
  uint8_t* t = b.data() + n - kTail;
  const uint64_t count = ld64(t), table = ld64(t + 8);
  const bool table_ok = table <= n - kTail && count <= (n - kTail - table) / 8;
  auto reseal_footer = [&] {
    uint64_t c = ld64(t), tb = ld64(t + 8);
    // what a naive reader would cover: clamp to the file so the CRC is computable
    uint64_t len = 16;
    if (tb <= n - kTail && c <= (n - kTail - tb) / 8) len = 8 * c + 16;
    else tb = n - kTail;
    st32(t + 16, mcrc(b.data() + tb, len));
  };
  switch (r.below(9)) {
    case 0:  // an offset entry
      if (table_ok && count) {
        uint64_t i = r.below(count);
        uint64_t near = ld64(b.data() + table + 8 * r.below(count));
        st64(b.data() + table + 8 * i, aimass_fuzz::boundary_value(r, near));
        reseal_footer();
      }
      break;
    case 1:  // swap or duplicate two offsets
      if (table_ok && count >= 2) {
        uint64_t i = r.below(count), j = r.below(count);
        uint64_t a = ld64(b.data() + table + 8 * i), c = ld64(b.data() + table + 8 * j);
        st64(b.data() + table + 8 * i, c);
        if (r.below(2)) st64(b.data() + table + 8 * j, a);
        reseal_footer();
      }
      break;
    case 2:  // the record count
      st64(t, aimass_fuzz::boundary_value(r, count));
      if (r.below(2)) reseal_footer();
      break;
    case 3:  // the table position
      st64(t + 8, aimass_fuzz::boundary_value(r, table));
      if (r.below(2)) reseal_footer();
      break;
    case 4:  // both, wrapping 8n + table around 2^64 onto the file size
      if (r.below(2)) {
        uint64_t tb = n - kTail + 8 * (1 + r.below(4));
        st64(t + 8, tb);
        st64(t, (0 - (tb - (n - kTail))) / 8);
      } else {
        st64(t, aimass_fuzz::boundary_value(r, count));
        st64(t + 8, aimass_fuzz::boundary_value(r, table));
      }
      reseal_footer();
      break;
    case 5:  // a record length (with its length CRC resealed)
      if (table_ok && count) {
        uint64_t off = ld64(b.data() + table + 8 * r.below(count));
        if (off + 16 <= n) {
          st64(b.data() + off, aimass_fuzz::boundary_value(r, ld64(b.data() + off)));
          st32(b.data() + off + 8, mcrc(b.data() + off, 8));
        }
      }
      break;
    case 6:  // reserved footer word
      st32(t + 20, static_cast<uint32_t>(r.next() | 1));
      break;
    case 7:  // header: version or fingerprint, CRCs resealed
      if (n >= 32) {
        if (r.below(2)) st32(b.data() + 8, static_cast<uint32_t>(r.below(4)));
        else st64(b.data() + 16, r.next());
        if (r.below(3)) st32(b.data() + 24, static_cast<uint32_t>(r.next()));
        st32(b.data() + 12, mcrc(b.data(), 12));
        st32(b.data() + 28, mcrc(b.data(), 28));
      }
      break;
    default:  // a variable dim inside a payload, payload CRC resealed
      if (table_ok && count) {
        uint64_t off = ld64(b.data() + table + 8 * r.below(count));
        if (off + 16 <= n) {
          uint64_t len = ld64(b.data() + off);
          if (len >= 8 && len <= n - off - 16) {
            st64(b.data() + off + 12, aimass_fuzz::boundary_value(r, ld64(b.data() + off + 12)));
            st32(b.data() + off + 12 + len, mcrc(b.data() + off + 12, len));
          }
        }
      }
      break;
  }
}

}  // namespace

extern "C" size_t LLVMFuzzerMutate(uint8_t* data, size_t size, size_t max_size);

extern "C" size_t LLVMFuzzerCustomMutator(uint8_t* data, size_t size, size_t max_size, unsigned seed) {
  aimass_fuzz::Rng r(seed);
  if (size < 1 || r.below(10) == 0) return LLVMFuzzerMutate(data, size, max_size);  // plain bytes too
  uint8_t sel = data[0];
  if (r.below(8) == 0) sel = static_cast<uint8_t>(r.next());
  const ad::Schema& s = schemas()[sel % schemas().size()];
  Model m = parse(data + 1, size - 1);
  switch (r.below(5)) {
    case 0:  // add a valid record
      m.payloads.insert(m.payloads.begin() + r.below(m.payloads.size() + 1), valid_payload(s, r));
      break;
    case 1:  // drop one
      if (!m.payloads.empty()) m.payloads.erase(m.payloads.begin() + r.below(m.payloads.size()));
      break;
    case 2:  // mutate one payload's bytes
      if (!m.payloads.empty()) {
        auto& p = m.payloads[r.below(m.payloads.size())];
        p.resize(p.size() + 16);
        p.resize(LLVMFuzzerMutate(p.data(), p.size() - 16, p.size()));
      }
      break;
    case 3:  // a whole valid shard
      m.payloads.clear();
      for (uint64_t k = r.below(6); k > 0; --k) m.payloads.push_back(valid_payload(s, r));
      break;
    default:
      break;
  }
  m.version = r.below(6) == 0 ? 1 : 2;
  if (r.below(16) != 0) m.fingerprint = ad::schema_fingerprint(s);
  std::vector<uint8_t> b = serialize(m);
  if (r.below(3) != 0) damage(b, r);
  if (r.below(12) == 0 && b.size() > 1) b.resize(r.below(b.size()));  // truncation
  if (b.size() + 1 > max_size) return LLVMFuzzerMutate(data, size, max_size);
  data[0] = sel;
  std::memcpy(data + 1, b.data(), b.size());
  return b.size() + 1;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const ad::Schema& schema = schemas()[data[0] % schemas().size()];
  const bool require_v2 = data[0] & 0x80;
  const uint8_t* file = data + 1;
  const size_t fsize = size - 1;
  aimass_fuzz::MemFile mf(file, fsize);
  try {
    ad::Reader reader(schema, {mf.path()}, {"fuzz.rec"}, require_v2);
    // Accepted: an independent parse of the footer must agree with the reader.
    const uint64_t n = static_cast<uint64_t>(reader.size());
    FUZZ_CHECK(fsize >= 16 + kTail);
    const uint8_t* t = file + fsize - kTail;
    FUZZ_CHECK(ld64(t) == n);
    const uint64_t table = ld64(t + 8);
    FUZZ_CHECK(table <= fsize - kTail && n <= (fsize - kTail - table) / 8 && table + 8 * n == fsize - kTail);
    const uint32_t version = reader.shard(0).version();
    FUZZ_CHECK(!require_v2 || version == 2);
    FUZZ_CHECK(version == 1 || reader.shard(0).fingerprint() == ad::schema_fingerprint(schema));
    uint64_t expect = version == 1 ? 16 : 32;
    std::vector<const uint8_t*> fp(schema.fields.size());
    std::vector<int64_t> d0(schema.fields.size());
    for (uint64_t i = 0; i < n && i < 512; ++i) {
      const uint64_t off = ld64(file + table + 8 * i);
      FUZZ_CHECK(off == expect || i > 0);
      FUZZ_CHECK(off >= expect && off <= table && table - off >= 16);
      const uint64_t next = i + 1 < n ? ld64(file + table + 8 * (i + 1)) : table;
      FUZZ_CHECK(next > off && next <= table);
      reader.prefetch(static_cast<int64_t>(i));
      try {
        uint64_t len = 0;
        const uint8_t* p = reader.record(static_cast<int64_t>(i), &len, true);
        // the payload is exactly the bytes between this frame's header and the next frame
        FUZZ_CHECK(len == next - off - 16);
        FUZZ_CHECK(std::memcmp(p, file + off + 12, len) == 0);
        uint32_t stored = 0;
        uint64_t len2 = 0;
        const uint8_t* p2 = reader.locate(static_cast<int64_t>(i), &len2, &stored, true, nullptr);
        FUZZ_CHECK(p2 == p && len2 == len);
        reader.decode(p, len, static_cast<int64_t>(i), fp.data(), d0.data());
        uint64_t used = 0;
        for (size_t f = 0; f < schema.fields.size(); ++f) {
          const auto& fd = schema.fields[f];
          const uint64_t bytes = static_cast<uint64_t>(fd.fixed_bytes()) *
                                 static_cast<uint64_t>(fd.variable() ? d0[f] : 1);
          FUZZ_CHECK(fp[f] >= p && fp[f] + bytes <= p + len);
          used += bytes + (fd.variable() ? 8 : 0);
        }
        FUZZ_CHECK(used == len);
      } catch (const aimass::CorruptDataError&) {
      }
      expect = next;
    }
    if (n <= 512) {
      try {
        FUZZ_CHECK(reader.verify_all() == static_cast<int64_t>(n));
      } catch (const aimass::CorruptDataError&) {
      }
    }
  } catch (const aimass::Error&) {
  }
  return 0;
}
