// Fuzz target: index.json as the engine reads it (aimass::data::parse_index and
// open_dataset, index.cc). Input: the text of an index.json. Accepted indexes must
// be internally consistent (the shard counts add up, the schema's sizes are
// computable without overflow) and are then opened against a directory that holds
// one real 3-record shard, part-00000.rec, so the count/bytes/fingerprint checks
// run too. Anything but an aimass error on bad input traps.
//
// The custom mutator rewrites one JSON number to a boundary value (2^53 + 1, 2^63,
// 1e308, -1, 0.5, ...), one string to a hostile one (../x, /etc/passwd, an unknown
// dtype), or swaps two schema fields, then falls back to libFuzzer's own mutations;
// fuzz_index.dict holds the keys and tokens.
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "aimass/data.h"
#include "fuzz_util.h"

namespace ad = aimass::data;

namespace {

std::string g_dir;

// A dataset directory with one shard of 3 records of {x: uint8[4], y: int64[]}.
void make_dataset_dir() {
  char tmpl[] = "/tmp/aimass_fuzz_index_XXXXXX";
  const char* d = ::mkdtemp(tmpl);
  if (!d) std::abort();
  g_dir = d;
  ad::Schema s;
  s.fields = {{"x", aimass::DType::U8, {4}}, {"y", aimass::DType::I64, {}}};
  std::vector<uint8_t> x(12, 7);
  std::vector<int64_t> y{0, 1, 2};
  ad::write_shards(g_dir, s, {{x.data(), nullptr}, {y.data(), nullptr}}, 3, 1 << 20);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  make_dataset_dir();
  return 0;
}

extern "C" size_t LLVMFuzzerMutate(uint8_t* data, size_t size, size_t max_size);

extern "C" size_t LLVMFuzzerCustomMutator(uint8_t* data, size_t size, size_t max_size, unsigned seed) {
  aimass_fuzz::Rng r(seed);
  std::string s(reinterpret_cast<const char*>(data), size);
  static const char* kNumbers[] = {"9007199254740993", "9223372036854775807", "9223372036854775808",
                                   "18446744073709551616", "1e308", "-1e308", "-1", "0", "0.5", "-0",
                                   "4294967296", "2147483648", "1e-400", "3", "-2", "1152921504606846976"};
  static const char* kStrings[] = {"\"../part-00000.rec\"", "\"/etc/passwd\"", "\".hidden\"", "\"\"",
                                   "\"complex64\"", "\"part-00000.rec\"", "\"x\"", "\"y\"", "\"uint8\"",
                                   "\"int64\"", "\"aimass-records\"", "\"a/b\""};
  switch (r.below(4)) {
    case 0: {  // a number
      std::vector<size_t> starts;
      for (size_t i = 0; i < s.size(); ++i)
        if ((s[i] == '-' || (s[i] >= '0' && s[i] <= '9')) && (i == 0 || std::strchr(" :[,", s[i - 1])))
          starts.push_back(i);
      if (starts.empty()) break;
      size_t a = starts[r.below(starts.size())], b = a + 1;
      while (b < s.size() && std::strchr("0123456789.eE+-", s[b])) ++b;
      s.replace(a, b - a, kNumbers[r.below(sizeof kNumbers / sizeof *kNumbers)]);
      break;
    }
    case 1: {  // a string value
      std::vector<size_t> starts;
      for (size_t i = 1; i < s.size(); ++i)
        if (s[i] == '"' && (s[i - 1] == ':' || s[i - 1] == ' ') && i >= 2 && s[i - 2] == ':') starts.push_back(i);
      for (size_t i = 1; i < s.size(); ++i)
        if (s[i] == '"' && s[i - 1] == ':') starts.push_back(i);
      if (starts.empty()) break;
      size_t a = starts[r.below(starts.size())];
      size_t b = s.find('"', a + 1);
      if (b == std::string::npos) break;
      s.replace(a, b + 1 - a, kStrings[r.below(sizeof kStrings / sizeof *kStrings)]);
      break;
    }
    case 2: {  // swap the first two schema objects
      size_t a = s.find("{\"name\"");
      size_t ae = a == std::string::npos ? a : s.find('}', a);
      size_t b = ae == std::string::npos ? ae : s.find("{\"name\"", ae);
      size_t be = b == std::string::npos ? b : s.find('}', b);
      if (be == std::string::npos) break;
      std::string A = s.substr(a, ae + 1 - a), B = s.substr(b, be + 1 - b);
      s = s.substr(0, a) + B + s.substr(ae + 1, b - ae - 1) + A + s.substr(be + 1);
      break;
    }
    default:
      return LLVMFuzzerMutate(data, size, max_size);
  }
  if (s.size() > max_size) return LLVMFuzzerMutate(data, size, max_size);
  std::memcpy(data, s.data(), s.size());
  return s.size();
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (g_dir.empty()) make_dataset_dir();  // replay builds call LLVMFuzzerInitialize too; be safe
  const char* text = reinterpret_cast<const char*>(data);
  ad::Index idx;
  try {
    idx = ad::parse_index(text, size, "index.json");
  } catch (const aimass::Error&) {
    return 0;
  }
  // accepted: consistent and computable
  uint64_t total = 0;
  for (const auto& s : idx.shards) {
    FUZZ_CHECK(!s.file.empty() && s.file.find('/') == std::string::npos && s.file[0] != '.');
    FUZZ_CHECK(!__builtin_add_overflow(total, s.records, &total));
  }
  FUZZ_CHECK(total == static_cast<uint64_t>(idx.num_records));
  FUZZ_CHECK(idx.version == 1 || idx.version == 2);
  FUZZ_CHECK(idx.schema.fixed_record_bytes() >= 0);
  for (const auto& f : idx.schema.fields) FUZZ_CHECK(f.fixed_bytes() >= 0 && f.row_elems() >= 0);
  (void)ad::schema_fingerprint(idx.schema);
  try {
    auto reader = ad::open_dataset(g_dir, idx, "index.json");
    FUZZ_CHECK(reader->size() == idx.num_records);
    std::vector<const uint8_t*> fp(idx.schema.fields.size());
    std::vector<int64_t> d0(idx.schema.fields.size());
    for (int64_t i = 0; i < reader->size(); ++i) {
      uint64_t len;
      const uint8_t* p = reader->record(i, &len, true);
      try {
        reader->decode(p, len, i, fp.data(), d0.data());
      } catch (const aimass::CorruptDataError&) {
      }
    }
  } catch (const aimass::Error&) {
  }
  return 0;
}
