// Wire messages of the collective engine (see message.h).
#include "comm/message.h"

#include <sstream>

namespace aimass {
namespace comm {

int64_t numel_of(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string shape_str(const std::vector<int64_t>& shape, bool free_dim0) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) os << ", ";
    if (i == 0 && free_dim0) os << "*";
    else os << shape[i];
  }
  os << "]";
  return os.str();
}

std::string signature(const CollectiveRequest& r) {
  std::ostringstream os;
  os << collective_kind_name(r.kind) << "(";
  if (r.kind == CollectiveKind::Barrier) {
    os << ")";
    return os.str();
  }
  os << "dtype=" << dtype_name(r.dtype) << ", shape=" << shape_str(r.shape, r.kind == CollectiveKind::Allgather);
  if (r.kind == CollectiveKind::Allreduce || r.kind == CollectiveKind::ReduceScatter)
    os << ", op=" << reduce_op_name(r.op);
  if (r.wire != r.dtype) os << ", compression=" << dtype_name(r.wire);
  if (r.kind == CollectiveKind::Broadcast) os << ", root=" << r.root;
  os << ")";
  return os.str();
}

}  // namespace comm
}  // namespace aimass
