// index.json as the engine reads it: parse_index checks every key the reader
// relies on (docs/format.md), open_dataset opens the shards it lists and checks
// them against it. Python reads the rest (metadata, splits) for itself.
#include <sys/stat.h>

#include <cerrno>
#include <cstring>

#include "aimass/checked.h"
#include "aimass/data.h"
#include "runtime/json.h"

namespace aimass {
namespace data {

namespace {
namespace json = runtime::json;

constexpr const char* kFormatName = "aimass-records";

struct Doc {
  const std::string& what;
  [[noreturn]] void damaged(const std::string& why) const {
    throw CorruptDataError(detail::concat(what, ": ", why, "; the dataset is damaged (restore index.json or "
                                          "rewrite the dataset)"));
  }
  const json::Value& need(const json::Value& obj, const char* key, const std::string& where) const {
    const json::Value* v = obj.find(key);
    if (!v) damaged(detail::concat(where, " lacks '", key, "'"));
    return *v;
  }
  // A JSON number that must be an exact integer in [lo, hi].
  int64_t integer(const json::Value& v, const std::string& where, int64_t lo, int64_t hi) const {
    if (!v.is_number()) damaged(detail::concat(where, " must be an integer"));
    int64_t r = 0;
    try {
      r = checked::to_int64<CorruptDataError>(v.num, where);
    } catch (const CorruptDataError& e) {
      damaged(e.what());
    }
    if (r < lo || r > hi) damaged(detail::concat(where, " is ", r, ", outside [", lo, ", ", hi, "]"));
    return r;
  }
  const std::string& string(const json::Value& v, const std::string& where) const {
    if (!v.is_string()) damaged(detail::concat(where, " must be a string"));
    return v.str;
  }
};

// JSON numbers are doubles: integers are exact up to 2^53.
constexpr int64_t kMaxExact = int64_t(1) << 53;

// A shard's file name must name a file inside the dataset directory.
bool safe_file_name(const std::string& f) {
  if (f.empty() || f.size() > 255 || f == "." || f == ".." || f[0] == '.') return false;
  for (char c : f)
    if (c == '/' || c == '\\' || c == '\0' || static_cast<unsigned char>(c) < 0x20) return false;
  return true;
}
}  // namespace

Index parse_index(const char* text, size_t len, const std::string& what) {
  Doc d{what};
  json::Value root;
  try {
    root = json::parse(text, len, what.c_str());
  } catch (const CorruptDataError& e) {
    throw CorruptDataError(detail::concat(e.what(), "; the dataset is damaged (restore index.json or rewrite "
                                          "the dataset)"));
  }
  if (!root.is_object()) d.damaged("the document is not a JSON object");
  const json::Value* fmt = root.find("format");
  AIMASS_CHECK(fmt && fmt->is_string() && fmt->str == kFormatName, ValueError, what,
               ": not an aimass dataset index (format=",
               fmt && fmt->is_string() ? "'" + fmt->str + "'" : std::string(fmt ? "not a string" : "missing"), ")");
  const json::Value* ver = root.find("version");
  AIMASS_CHECK(ver && ver->is_number() && (ver->num == 1 || ver->num == kShardVersion), ValueError, what,
               ": format version ", ver && ver->is_number() ? detail::concat(ver->num) : std::string("(missing)"),
               " is not supported (this aimass reads versions 1..", kShardVersion, ")");
  Index idx;
  idx.version = static_cast<int64_t>(ver->num);
  idx.num_records = d.integer(d.need(root, "num_records", "index.json"), "num_records", 0, kMaxExact);

  const json::Value& schema = d.need(root, "schema", "index.json");
  if (!schema.is_array()) d.damaged("'schema' must be a list of fields");
  for (size_t i = 0; i < schema.arr.size(); ++i) {
    const json::Value& f = schema.arr[i];
    const std::string where = detail::concat("schema[", i, "]");
    if (!f.is_object()) d.damaged(where + " must be an object {name, dtype, shape}");
    Field field;
    field.name = d.string(d.need(f, "name", where), where + ".name");
    field.dtype = parse_dtype(d.string(d.need(f, "dtype", where), where + ".dtype"));  // TypeError if unknown
    const json::Value& shape = d.need(f, "shape", where);
    if (!shape.is_array()) d.damaged(where + ".shape must be a list of integers");
    if (shape.arr.size() > 32) d.damaged(detail::concat(where, ".shape has ", shape.arr.size(), " dimensions"));
    for (size_t k = 0; k < shape.arr.size(); ++k)
      field.shape.push_back(d.integer(shape.arr[k], detail::concat(where, ".shape[", k, "]"), -kMaxExact, kMaxExact));
    idx.schema.fields.push_back(std::move(field));
  }
  idx.schema.validate();  // ValueError: names, dims, byte counts that overflow

  const json::Value& shards = d.need(root, "shards", "index.json");
  if (!shards.is_array()) d.damaged("'shards' must be a list");
  int64_t total = 0;
  for (size_t i = 0; i < shards.arr.size(); ++i) {
    const json::Value& s = shards.arr[i];
    const std::string where = detail::concat("shards[", i, "]");
    if (!s.is_object()) d.damaged(where + " must be an object {file, records, bytes, sha256}");
    IndexShard sh;
    sh.file = d.string(d.need(s, "file", where), where + ".file");
    if (!safe_file_name(sh.file))
      d.damaged(detail::concat(where, ".file '", sh.file, "' is not a plain file name inside the dataset directory"));
    for (const auto& prev : idx.shards)
      if (prev.file == sh.file) d.damaged(detail::concat(where, ".file '", sh.file, "' is listed twice"));
    int64_t records = d.integer(d.need(s, "records", where), where + ".records", 0, kMaxExact);
    sh.records = static_cast<uint64_t>(records);
    sh.bytes = static_cast<uint64_t>(d.integer(d.need(s, "bytes", where), where + ".bytes", 0, kMaxExact));
    total = checked::add<CorruptDataError>(total, records, "records over all shards");
    idx.shards.push_back(std::move(sh));
  }
  if (total != idx.num_records)
    d.damaged(detail::concat("num_records is ", idx.num_records, " but the shards list ", total, " records"));
  return idx;
}

std::shared_ptr<Reader> open_dataset(const std::string& dir, const Index& index, const std::string& what) {
  std::vector<std::string> paths, names;
  for (const auto& s : index.shards) {
    std::string path = dir + "/" + s.file;
    struct stat st;
    if (::stat(path.c_str(), &st) != 0 && errno == ENOENT)
      throw CorruptDataError(detail::concat("shard ", s.file, " listed in ", what,
                                            " is missing; the dataset is damaged"));
    paths.push_back(std::move(path));
    names.push_back(s.file);
  }
  auto reader = std::make_shared<Reader>(index.schema, paths, names, index.version >= 2);
  for (size_t i = 0; i < index.shards.size(); ++i) {
    const Shard& sh = reader->shard(static_cast<int64_t>(i));
    const IndexShard& is = index.shards[i];
    if (sh.size() != is.records)
      throw CorruptDataError(detail::concat("shard ", is.file, ": ", what, " says ", is.records,
                                            " records, the shard holds ", sh.size(), "; the dataset is damaged"));
    if (sh.file_size() != is.bytes)
      throw CorruptDataError(detail::concat("shard ", is.file, ": ", what, " says ", is.bytes,
                                            " bytes, the file has ", sh.file_size(), "; the dataset is damaged"));
  }
  return reader;
}

}  // namespace data
}  // namespace aimass
