// Wire messages of the collective engine: what ranks compare (signatures) and the
// byte (de)serialisation of the coordinator's gather/broadcast messages.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "aimass/collectives.h"
#include "aimass/error.h"

namespace aimass {
namespace comm {

int64_t numel_of(const std::vector<int64_t>& shape);
std::string shape_str(const std::vector<int64_t>& shape, bool free_dim0);
// What must agree across ranks, as readable text (compared as a whole).
std::string signature(const CollectiveRequest& r);

// ---- byte (de)serialisation for the coordinator messages
struct Writer {
  std::vector<char> buf;
  void u32(uint32_t v) { raw(&v, 4); }
  void f64(double v) { raw(&v, 8); }
  void str(const std::string& s) {
    u32(static_cast<uint32_t>(s.size()));
    raw(s.data(), s.size());
  }
  void raw(const void* p, size_t n) {
    const char* c = static_cast<const char*>(p);
    buf.insert(buf.end(), c, c + n);
  }
};
struct Reader {
  const char* p;
  const char* end;
  void need(size_t n) {
    AIMASS_CHECK(static_cast<size_t>(end - p) >= n, DistributedError, "aimass.dist: truncated coordinator message");
  }
  uint32_t u32() {
    uint32_t v;
    need(4);
    std::memcpy(&v, p, 4);
    p += 4;
    return v;
  }
  double f64() {
    double v;
    need(8);
    std::memcpy(&v, p, 8);
    p += 8;
    return v;
  }
  std::string str() {
    uint32_t n = u32();
    need(n);
    std::string s(p, n);
    p += n;
    return s;
  }
};

}  // namespace comm
}  // namespace aimass
