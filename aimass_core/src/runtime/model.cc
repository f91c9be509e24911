// .aimass loading: mmap the safetensors file, parse its header and the graph in
// its metadata, and validate every reference before anything runs.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <limits>
#include <set>

#include "aimass/checked.h"
#include "aimass/error.h"
#include "aimass/half.h"
#include "aimass/runtime.h"
#include "runtime/json.h"

namespace aimass::runtime {

const char* value_type_name(ValueType t) { return t == ValueType::Int64 ? "int64" : "float32"; }

// Both products were checked to fit (times the item size) when the file was loaded.
int64_t TensorSpec::row_numel() const {
  int64_t n = 1;
  for (size_t i = 1; i < shape.size(); ++i) n *= shape[i];
  return n;
}

int64_t StoredTensor::numel() const {
  int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

namespace {

std::string shape_text(const std::vector<int64_t>& s) {
  std::string o = "[";
  for (size_t i = 0; i < s.size(); ++i) o += (i ? ", " : "") + std::to_string(s[i]);
  return o + "]";
}

int64_t dtype_size(const std::string& dt) {
  if (dt == "F32" || dt == "I32" || dt == "U32") return 4;
  if (dt == "F16" || dt == "BF16" || dt == "I16" || dt == "U16") return 2;
  if (dt == "I8" || dt == "U8" || dt == "BOOL") return 1;
  if (dt == "F64" || dt == "I64" || dt == "U64") return 8;
  return 0;
}

// A JSON list of integers. Each number must be an exact integer in the int64 range
// (a fraction, NaN, +-inf or a value >= 2^63 is CorruptDataError, never a UB cast).
std::vector<int64_t> int_list(const json::Value& v, const std::string& what) {
  AIMASS_CHECK(v.is_array(), CorruptDataError, what, " must be a list of integers");
  AIMASS_CHECK(v.arr.size() <= kMaxRank, CorruptDataError, what, " has ", v.arr.size(),
               " entries; at most ", kMaxRank, " are supported");
  std::vector<int64_t> out;
  for (size_t i = 0; i < v.arr.size(); ++i) {
    const auto& e = v.arr[i];
    AIMASS_CHECK(e.is_number(), CorruptDataError, what, " must be a list of integers");
    out.push_back(checked::to_int64<CorruptDataError>(e.num, detail::concat(what, " entry ", i)));
  }
  return out;
}

// A shape from the file: every dim in [0, kMaxDim] (or > 0 with `positive`), and the
// element count times `item_bytes` fits in int64. Returns the element count.
int64_t checked_numel(const std::vector<int64_t>& shape, int64_t item_bytes, const std::string& what,
                      bool skip_first = false) {
  for (size_t i = skip_first ? 1 : 0; i < shape.size(); ++i)
    AIMASS_CHECK(shape[i] >= 0 && shape[i] <= kMaxDim, CorruptDataError, what, ": dim ", i, " is ", shape[i],
                 "; dims must be in [0, ", kMaxDim, "]");
  std::vector<int64_t> dims(shape.begin() + (skip_first && !shape.empty() ? 1 : 0), shape.end());
  const size_t n = checked::product<CorruptDataError>(dims, what);
  const size_t bytes = checked::mul<CorruptDataError>(n, static_cast<size_t>(item_bytes),
                                                      what + " (element count x item size)");
  AIMASS_CHECK(bytes <= static_cast<size_t>(std::numeric_limits<int64_t>::max()), CorruptDataError, what,
               ": ", bytes, " bytes do not fit in int64");
  return static_cast<int64_t>(n);
}

const std::string& get_string(const json::Value& obj, const char* key, const std::string& where) {
  const json::Value* v = obj.find(key);
  AIMASS_CHECK(v && v->is_string(), ValueError, where, ": missing string field '", key, "'");
  return v->str;
}

std::vector<TensorSpec> parse_specs(const json::Value* v, const char* which) {
  AIMASS_CHECK(v && v->is_array() && !v->arr.empty(), ValueError, "model signature: '", which,
               "' must be a non-empty list");
  std::vector<TensorSpec> out;
  std::set<std::string> seen;
  for (const auto& e : v->arr) {
    AIMASS_CHECK(e.is_object(), ValueError, "model signature: entries of '", which, "' must be objects");
    TensorSpec s;
    s.name = get_string(e, "name", std::string("signature ") + which);
    AIMASS_CHECK(seen.insert(s.name).second, ValueError, "model signature: duplicate ", which, " name '", s.name,
                 "'");
    const std::string& dt = get_string(e, "dtype", "signature " + s.name);
    if (dt == "float32") s.dtype = ValueType::Float32;
    else if (dt == "int64") s.dtype = ValueType::Int64;
    else throw ValueError(detail::concat("model signature: ", s.name, " has dtype '", dt,
                                         "'; format 1 supports float32 and int64"));
    const json::Value* sh = e.find("shape");
    AIMASS_CHECK(sh, ValueError, "model signature: ", s.name, " has no shape");
    s.shape = int_list(*sh, "signature shape of " + s.name);
    AIMASS_CHECK(!s.shape.empty() && s.shape[0] == -1, ValueError, "model signature: ", s.name,
                 " must have the batch dimension -1 first");
    for (size_t i = 1; i < s.shape.size(); ++i)
      AIMASS_CHECK(s.shape[i] > 0 || s.shape[i] == -1, ValueError, "model signature: ", s.name, " dimension ", i,
                   " is ", s.shape[i], "; dims are positive, or -1 for the batch (first) and the dynamic "
                   "sequence length");
    {  // dynamic dims (-1) count as 1 here; the executor checks each sequence length's plan
      std::vector<int64_t> fixed(s.shape);
      for (size_t i = 1; i < fixed.size(); ++i) fixed[i] = fixed[i] == -1 ? 1 : fixed[i];
      checked_numel(fixed, s.dtype == ValueType::Int64 ? 8 : 4, "model signature: " + s.name, true);
    }
    out.push_back(std::move(s));
  }
  return out;
}

}  // namespace

struct ModelLoader {
  static void parse(Model& m) {
    const char* base = static_cast<const char*>(m.map_);
    const size_t len = m.map_len_;
    AIMASS_CHECK(len >= 8, CorruptDataError, m.path_, ": truncated (", len,
                 " bytes; a safetensors file starts with an 8-byte header length)");
    uint64_t hlen = 0;
    std::memcpy(&hlen, base, 8);  // little-endian on every platform we build for
    AIMASS_CHECK(hlen <= len - 8, CorruptDataError, m.path_, ": header length ", hlen, " exceeds the file (",
                 len, " bytes): the file is truncated or not a safetensors file");
    json::Value hdr = json::parse(base + 8, hlen, (m.path_ + " header").c_str());
    AIMASS_CHECK(hdr.is_object(), CorruptDataError, m.path_, ": the safetensors header is not a JSON object");
    const char* data = base + 8 + hlen;
    const uint64_t data_len = len - 8 - hlen;
    const json::Value* meta = nullptr;
    for (const auto& kv : hdr.obj) {
      if (kv.first == "__metadata__") {
        meta = &kv.second;
        continue;
      }
      const json::Value& t = kv.second;
      const std::string& name = kv.first;
      AIMASS_CHECK(t.is_object(), CorruptDataError, m.path_, ": tensor '", name, "' entry is not an object");
      const json::Value* dt = t.find("dtype");
      const json::Value* sh = t.find("shape");
      const json::Value* off = t.find("data_offsets");
      AIMASS_CHECK(dt && dt->is_string() && sh && off, CorruptDataError, m.path_, ": tensor '", name,
                   "' lacks dtype/shape/data_offsets");
      StoredTensor st;
      const std::string tw = m.path_ + ": tensor '" + name + "'";
      st.dtype = dt->str;
      st.shape = int_list(*sh, tw + " shape");
      auto offs = int_list(*off, tw + " data_offsets");
      int64_t es = dtype_size(st.dtype);
      AIMASS_CHECK(es > 0, CorruptDataError, tw, " has unknown dtype ", st.dtype);
      AIMASS_CHECK(offs.size() == 2 && offs[0] >= 0 && offs[1] >= offs[0], CorruptDataError, tw,
                   " has bad data_offsets (need [begin, end] with 0 <= begin <= end)");
      AIMASS_CHECK(checked::range_fits(static_cast<uint64_t>(offs[0]), static_cast<uint64_t>(offs[1] - offs[0]),
                                       data_len),
                   CorruptDataError, tw, " ends at byte ", offs[1], " of a data section of ", data_len,
                   " bytes: the file is truncated");
      // shape x item size, overflow-checked: a product that wraps around 2^64 to the stored
      // byte count (e.g. [2**62, 4] F32 with 0 bytes) is rejected here, not used later.
      const int64_t numel = checked_numel(st.shape, es, tw + " shape " + shape_text(st.shape));
      st.nbytes = offs[1] - offs[0];
      AIMASS_CHECK(st.nbytes == numel * es, CorruptDataError, tw, " holds ", st.nbytes,
                   " bytes but its shape ", shape_text(st.shape), " and dtype ", st.dtype, " need ", numel * es);
      const char* ptr = data + offs[0];
      if (st.dtype == "F16" || st.dtype == "BF16") {
        // Kernels run in fp32: widen once at load (exact).
        std::vector<float> f(st.numel());
        for (int64_t i = 0; i < st.numel(); ++i) {
          uint16_t b;
          std::memcpy(&b, ptr + 2 * i, 2);
          f[i] = st.dtype == "F16" ? f16_to_f32(b) : bf16_to_f32(b);
        }
        m.owned_.push_back(std::move(f));
        st.data = m.owned_.back().data();
        st.dtype = "F32";
        st.nbytes = st.numel() * 4;
      } else if (reinterpret_cast<uintptr_t>(ptr) % es != 0) {
        std::vector<float> f((st.nbytes + 3) / 4);
        if (st.nbytes > 0) std::memcpy(f.data(), ptr, st.nbytes);
        m.owned_.push_back(std::move(f));
        st.data = m.owned_.back().data();
      } else {
        st.data = ptr;
      }
      m.tensors_.emplace(name, std::move(st));
    }
    AIMASS_CHECK(meta && meta->is_object(), ValueError, m.path_,
                 ": no __metadata__ in the safetensors header; not an .aimass model (write it with "
                 "aimass.runtime.export)");
    for (const auto& kv : meta->obj) {
      AIMASS_CHECK(kv.second.is_string(), CorruptDataError, m.path_, ": metadata value of '", kv.first,
                   "' is not a string");
      m.metadata_[kv.first] = kv.second.str;
    }
    auto get_meta = [&](const char* key) -> const std::string& {
      auto it = m.metadata_.find(key);
      AIMASS_CHECK(it != m.metadata_.end(), ValueError, m.path_, ": metadata lacks '", key,
                   "'; not an .aimass model (write it with aimass.runtime.export)");
      return it->second;
    };
    const std::string& ver = get_meta("aimass.format_version");
    char* stop = nullptr;
    long v = std::strtol(ver.c_str(), &stop, 10);
    AIMASS_CHECK(stop && *stop == 0 && !ver.empty() && v >= 1, CorruptDataError, m.path_,
                 ": bad format version '", ver, "'");
    AIMASS_CHECK(v <= kFormatVersion, ValueError, m.path_, " has .aimass format version ", v,
                 " but this aimass reads versions up to ", kFormatVersion, "; upgrade aimass to load it");
    m.format_version_ = static_cast<int>(v);

    const std::string& sig_s = get_meta("aimass.signature");
    json::Value sig = json::parse(sig_s.data(), sig_s.size(), (m.path_ + " signature").c_str());
    AIMASS_CHECK(sig.is_object(), ValueError, m.path_, ": signature must be a JSON object");
    m.inputs_ = parse_specs(sig.find("inputs"), "inputs");
    m.outputs_ = parse_specs(sig.find("outputs"), "outputs");

    const std::string& graph_s = get_meta("aimass.graph");
    json::Value g = json::parse(graph_s.data(), graph_s.size(), (m.path_ + " graph").c_str());
    const json::Value* nodes = g.find("nodes");
    AIMASS_CHECK(nodes && nodes->is_array(), ValueError, m.path_, ": graph must be an object with a 'nodes' list");
    std::set<std::string> values;
    for (const auto& in : m.inputs_) values.insert(in.name);
    for (const auto& nv : nodes->arr) {
      AIMASS_CHECK(nv.is_object(), ValueError, m.path_, ": graph nodes must be objects");
      Node n;
      n.op = get_string(nv, "op", "graph node");
      n.name = get_string(nv, "name", "graph node (op " + n.op + ")");
      const std::string where = "node '" + n.name + "' (op " + n.op + ")";
      auto str_list = [&](const char* key) {
        std::vector<std::string> out;
        const json::Value* l = nv.find(key);
        AIMASS_CHECK(l && l->is_array(), ValueError, m.path_, ": ", where, " lacks the list '", key, "'");
        for (const auto& e : l->arr) {
          AIMASS_CHECK(e.is_string(), ValueError, m.path_, ": ", where, ": '", key, "' must hold strings");
          out.push_back(e.str);
        }
        return out;
      };
      n.inputs = str_list("inputs");
      n.outputs = str_list("outputs");
      AIMASS_CHECK(n.outputs.size() == 1, ValueError, m.path_, ": ", where, " must have exactly one output");
      for (const auto& in : n.inputs)
        AIMASS_CHECK(values.count(in), ValueError, m.path_, ": ", where, " reads value '", in,
                     "' that no graph input or earlier node produces");
      if (const json::Value* ps = nv.find("params")) {
        AIMASS_CHECK(ps->is_object(), ValueError, m.path_, ": ", where, ": params must be an object");
        for (const auto& kv : ps->obj) {
          AIMASS_CHECK(kv.second.is_string(), ValueError, m.path_, ": ", where, ": param '", kv.first,
                       "' must name a tensor");
          AIMASS_CHECK(m.tensors_.count(kv.second.str), ValueError, m.path_, ": ", where,
                       " references tensor '", kv.second.str, "' (", kv.first,
                       ") which is not in the file");
          n.params[kv.first] = kv.second.str;
        }
      }
      if (const json::Value* as = nv.find("attrs")) {
        AIMASS_CHECK(as->is_object(), ValueError, m.path_, ": ", where, ": attrs must be an object");
        for (const auto& kv : as->obj) {
          const auto& a = kv.second;
          if (a.is_string()) {
            n.str_attrs[kv.first] = a.str;
          } else if (a.is_number()) {
            n.attrs[kv.first] = {a.num};
          } else if (a.kind == json::Value::Bool) {
            n.attrs[kv.first] = {a.b ? 1.0 : 0.0};
          } else if (a.is_array()) {
            std::vector<double> l;
            for (const auto& e : a.arr) {
              AIMASS_CHECK(e.is_number(), ValueError, m.path_, ": ", where, ": attr '", kv.first,
                           "' must be a number list");
              l.push_back(e.num);
            }
            n.attrs[kv.first] = std::move(l);
          } else if (a.kind != json::Value::Null) {
            throw ValueError(detail::concat(m.path_, ": ", where, ": attr '", kv.first, "' has an unsupported type"));
          }
        }
      }
      AIMASS_CHECK(!values.count(n.outputs[0]), ValueError, m.path_, ": ", where, " redefines value '",
                   n.outputs[0], "'");
      values.insert(n.outputs[0]);
      m.nodes_.push_back(std::move(n));
    }
    for (const auto& o : m.outputs_)
      AIMASS_CHECK(values.count(o.name), ValueError, m.path_, ": signature output '", o.name,
                   "' is produced by no node");
  }
};

std::shared_ptr<Model> Model::load(const std::string& path) {
  std::shared_ptr<Model> m(new Model());
  m->path_ = path;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  AIMASS_CHECK(fd >= 0, IOError, "cannot open model file '", path, "': ", std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    int e = errno;
    ::close(fd);
    throw IOError(detail::concat("cannot stat model file '", path, "': ", std::strerror(e)));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw IOError(detail::concat("model path '", path, "' is not a regular file"));
  }
  m->map_len_ = static_cast<size_t>(st.st_size);
  if (m->map_len_ > 0) {
    void* p = ::mmap(nullptr, m->map_len_, PROT_READ, MAP_PRIVATE, fd, 0);
    int e = errno;
    ::close(fd);
    AIMASS_CHECK(p != MAP_FAILED, IOError, "cannot memory-map model file '", path, "': ", std::strerror(e));
    m->map_ = p;
  } else {
    ::close(fd);
  }
  ModelLoader::parse(*m);
  return m;
}

Model::~Model() {
  if (map_) ::munmap(map_, map_len_);
}

const StoredTensor& Model::tensor(const std::string& name) const {
  auto it = tensors_.find(name);
  AIMASS_CHECK(it != tensors_.end(), ValueError, path_, ": tensor '", name, "' is not in the file");
  return it->second;
}

}  // namespace aimass::runtime
