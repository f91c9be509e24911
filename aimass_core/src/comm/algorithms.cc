// The per-size algorithm table (see algorithms.h).
#include "comm/algorithms.h"

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <sstream>

#include "aimass/error.h"

namespace aimass {
namespace comm {

namespace {
const char* const kNames[kAlgoKinds] = {"allreduce", "broadcast", "allgather", "reduce_scatter"};

std::string trim(const std::string& s) {
  size_t a = 0, b = s.size();
  while (a < b && std::isspace(static_cast<unsigned char>(s[a]))) ++a;
  while (b > a && std::isspace(static_cast<unsigned char>(s[b - 1]))) --b;
  return s.substr(a, b - a);
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::string cur;
  for (char c : s) {
    if (c == sep) {
      out.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  out.push_back(cur);
  return out;
}

uint64_t parse_bytes(const std::string& text, const std::string& where) {
  const std::string t = trim(text);
  char* end = nullptr;
  const unsigned long long v = t.empty() || t[0] == '-' ? 0 : std::strtoull(t.c_str(), &end, 10);
  AIMASS_CHECK(!t.empty() && t[0] != '-' && end != t.c_str(), ValueError, "AIMASS_COMM_ALGOS: '", text, "' in '",
               where, "' is not a byte count (digits with an optional k, m or g suffix)");
  std::string suffix(end);
  uint64_t mul = 1;
  if (suffix == "k" || suffix == "K") mul = 1ull << 10;
  else if (suffix == "m" || suffix == "M") mul = 1ull << 20;
  else if (suffix == "g" || suffix == "G") mul = 1ull << 30;
  else AIMASS_CHECK(suffix.empty(), ValueError, "AIMASS_COMM_ALGOS: '", text, "' in '", where,
                    "' has an unknown suffix (use k, m or g)");
  AIMASS_CHECK(v <= (1ull << 50), ValueError, "AIMASS_COMM_ALGOS: '", text, "' in '", where, "' is too large");
  return v * mul;
}

std::string bytes_str(uint64_t b) {
  std::ostringstream os;
  if (b != 0 && b % (1ull << 30) == 0) os << (b >> 30) << "g";
  else if (b != 0 && b % (1ull << 20) == 0) os << (b >> 20) << "m";
  else if (b != 0 && b % (1ull << 10) == 0) os << (b >> 10) << "k";
  else os << b;
  return os.str();
}
}  // namespace

const char* algo_kind_name(AlgoKind k) { return kNames[static_cast<int>(k)]; }

uint64_t fnv1a64(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

AlgoTable AlgoTable::defaults() {
  // measured with `aimass bench --tune` on the 2-core development VM (2 ranks, see docs/comm.md)
  return parse_over(AlgoTable{}, kDefaultText);
}

AlgoTable AlgoTable::parse(const std::string& text) { return parse_over(defaults(), text); }

AlgoTable AlgoTable::parse_over(AlgoTable t, const std::string& text) {
  for (const std::string& part0 : split(text, ';')) {
    const std::string part = trim(part0);
    if (part.empty()) continue;
    const size_t eq = part.find('=');
    AIMASS_CHECK(eq != std::string::npos, ValueError, "AIMASS_COMM_ALGOS: '", part,
                 "' needs the form collective=min_bytes:algorithm,... (collective: allreduce, broadcast, allgather "
                 "or reduce_scatter)");
    const std::string kind = trim(part.substr(0, eq));
    int k = -1;
    for (int i = 0; i < kAlgoKinds; ++i)
      if (kind == kNames[i]) k = i;
    AIMASS_CHECK(k >= 0, ValueError, "AIMASS_COMM_ALGOS: unknown collective '", kind,
                 "' (allreduce, broadcast, allgather or reduce_scatter)");
    std::vector<Row> rows;
    for (const std::string& cell0 : split(part.substr(eq + 1), ',')) {
      const std::string cell = trim(cell0);
      const size_t colon = cell.find(':');
      AIMASS_CHECK(colon != std::string::npos, ValueError, "AIMASS_COMM_ALGOS: '", cell, "' in '", part,
                   "' needs the form min_bytes:algorithm (mpi or shm[@chunk])");
      Row r;
      r.min_bytes = parse_bytes(cell.substr(0, colon), part);
      std::string algo = trim(cell.substr(colon + 1));
      const size_t at = algo.find('@');
      if (at != std::string::npos) {
        r.choice.chunk = parse_bytes(algo.substr(at + 1), part);
        algo = trim(algo.substr(0, at));
        AIMASS_CHECK((algo == "shm" || algo == "cma") && r.choice.chunk >= 4096 && r.choice.chunk <= (1ull << 30), ValueError,
                     "AIMASS_COMM_ALGOS: '", cell, "': a chunk size (@bytes, 4k..1g) applies to shm and cma only");
      }
      AIMASS_CHECK(algo == "mpi" || algo == "shm" || algo == "cma", ValueError, "AIMASS_COMM_ALGOS: unknown algorithm '",
                   algo, "' in '", part, "' (mpi, shm or cma)");
      r.choice.shm = algo != "mpi";
      r.choice.cma = algo == "cma";
      for (const Row& o : rows)
        AIMASS_CHECK(o.min_bytes != r.min_bytes, ValueError, "AIMASS_COMM_ALGOS: two rows for ", r.min_bytes,
                     " bytes in '", part, "'");
      rows.push_back(r);
    }
    std::sort(rows.begin(), rows.end(), [](const Row& a, const Row& b) { return a.min_bytes < b.min_bytes; });
    AIMASS_CHECK(!rows.empty() && rows[0].min_bytes == 0, ValueError, "AIMASS_COMM_ALGOS: '", part,
                 "' must have a row for 0 bytes (every size needs an algorithm)");
    t.rows_[k] = std::move(rows);
  }
  return t;
}

AlgoChoice AlgoTable::pick(AlgoKind kind, uint64_t bytes) const {
  const std::vector<Row>& rows = rows_[static_cast<int>(kind)];
  AlgoChoice c;
  for (const Row& r : rows) {
    if (r.min_bytes > bytes) break;
    c = r.choice;
  }
  return c;
}

std::string AlgoTable::str() const {
  std::ostringstream os;
  for (int k = 0; k < kAlgoKinds; ++k) {
    if (k) os << ";";
    os << kNames[k] << "=";
    for (size_t i = 0; i < rows_[k].size(); ++i) {
      const Row& r = rows_[k][i];
      os << (i ? "," : "") << bytes_str(r.min_bytes) << ":" << (r.choice.cma ? "cma" : r.choice.shm ? "shm" : "mpi");
      if (r.choice.chunk) os << "@" << bytes_str(r.choice.chunk);
    }
  }
  return os.str();
}

uint64_t AlgoTable::max_chunk() const {
  uint64_t m = 0;
  for (const auto& rows : rows_)
    for (const Row& r : rows) m = std::max(m, r.choice.chunk);
  return m;
}

}  // namespace comm
}  // namespace aimass
