// NCCL backend for device tensors. Host code only (no kernels): it lives in the
// CUDA library because it needs the CUDA runtime for streams and events.
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <chrono>
#include <cstring>
#include <mutex>
#include <thread>

#include "aimass/dtype.h"
#include "aimass/error.h"
#include "aimass/nccl.h"

#ifdef AIMASS_HAVE_NCCL_HEADERS
#include <nccl.h>
#endif

namespace aimass::nccl {

#ifdef AIMASS_HAVE_NCCL_HEADERS
namespace {

// The NCCL entry points aimass uses, resolved from the dlopen'ed library.
struct Api {
  ncclResult_t (*GetVersion)(int*);
  ncclResult_t (*GetUniqueId)(ncclUniqueId*);
  ncclResult_t (*CommInitRank)(ncclComm_t*, int, ncclUniqueId, int);
  ncclResult_t (*CommDestroy)(ncclComm_t);
  ncclResult_t (*CommAbort)(ncclComm_t);
  ncclResult_t (*CommGetAsyncError)(ncclComm_t, ncclResult_t*);
  const char* (*GetErrorString)(ncclResult_t);
  const char* (*GetLastError)(ncclComm_t);
  ncclResult_t (*AllReduce)(const void*, void*, size_t, ncclDataType_t, ncclRedOp_t, ncclComm_t, cudaStream_t);
  ncclResult_t (*Broadcast)(const void*, void*, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t);
  ncclResult_t (*AllGather)(const void*, void*, size_t, ncclDataType_t, ncclComm_t, cudaStream_t);
  ncclResult_t (*ReduceScatter)(const void*, void*, size_t, ncclDataType_t, ncclRedOp_t, ncclComm_t, cudaStream_t);
  ncclResult_t (*Reduce)(const void*, void*, size_t, ncclDataType_t, ncclRedOp_t, int, ncclComm_t, cudaStream_t);
  ncclResult_t (*GroupStart)();
  ncclResult_t (*GroupEnd)();
};

std::mutex g_mu;
void* g_lib = nullptr;
Api g_api{};

template <typename F>
void resolve(F& fn, const char* name, bool required = true) {
  fn = reinterpret_cast<F>(dlsym(g_lib, name));
  if (!fn && required) throw Error(std::string("NCCL library lacks ") + name + ": it is too old; install nvidia-nccl-cu13");
}

const Api& api() {
  if (!g_lib) throw Error("NCCL is not loaded: aimass.dist loads it from the nvidia-nccl-cu13 wheel "
                          "(python -m pip install nvidia-nccl-cu13) or from AIMASS_NCCL_LIBRARY");
  return g_api;
}

void check(ncclResult_t rc, const char* what, ncclComm_t comm = nullptr) {
  if (rc == ncclSuccess || rc == ncclInProgress) return;
  std::string msg = std::string("NCCL ") + what + " failed: " + api().GetErrorString(rc);
  if (comm && api().GetLastError) {
    const char* detail = api().GetLastError(comm);
    if (detail && *detail) msg += std::string(" (") + detail + ")";
  }
  throw DistributedError(msg);
}

void check_cuda(cudaError_t rc, const char* what) {
  if (rc != cudaSuccess) {
    cudaGetLastError();
    throw Error(std::string(what) + ": " + cudaGetErrorString(rc));
  }
}

ncclDataType_t to_nccl(const std::string& name) {
  switch (parse_dtype(name)) {
    case DType::F32: return ncclFloat32;
    case DType::F16: return ncclFloat16;
    case DType::BF16: return ncclBfloat16;
    case DType::F64: return ncclFloat64;
    case DType::I32: return ncclInt32;
    case DType::I64: return ncclInt64;
    case DType::I8: return ncclInt8;
    case DType::U8: return ncclUint8;
    default: break;
  }
  throw TypeError("NCCL collectives take float16, bfloat16, float32, float64, int8, uint8, int32 or int64, got " +
                  name);
}

ncclRedOp_t to_nccl_op(const std::string& op) {
  if (op == "sum") return ncclSum;
  if (op == "average") return ncclAvg;
  if (op == "min") return ncclMin;
  if (op == "max") return ncclMax;
  if (op == "product") return ncclProd;
  throw ValueError("op must be one of sum, average, min, max, product, got " + op);
}

cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// Ends an NCCL group even when a call inside it throws.
struct Group {
  Group() { check(api().GroupStart(), "ncclGroupStart"); }
  ~Group() noexcept(false) {
    ncclResult_t rc = api().GroupEnd();
    if (!std::uncaught_exceptions()) check(rc, "ncclGroupEnd");
  }
};

}  // namespace

bool compiled() { return true; }

void load(const std::string& library) {
  std::lock_guard<std::mutex> lk(g_mu);
  if (g_lib) return;
  void* h = dlopen(library.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    const char* e = dlerror();
    throw Error("cannot open the NCCL library '" + library + "': " + (e ? e : "unknown error") +
                "; install it with python -m pip install nvidia-nccl-cu13 or set AIMASS_NCCL_LIBRARY");
  }
  g_lib = h;
  try {
    resolve(g_api.GetVersion, "ncclGetVersion");
    resolve(g_api.GetUniqueId, "ncclGetUniqueId");
    resolve(g_api.CommInitRank, "ncclCommInitRank");
    resolve(g_api.CommDestroy, "ncclCommDestroy");
    resolve(g_api.CommAbort, "ncclCommAbort");
    resolve(g_api.CommGetAsyncError, "ncclCommGetAsyncError");
    resolve(g_api.GetErrorString, "ncclGetErrorString");
    resolve(g_api.GetLastError, "ncclGetLastError", /*required=*/false);
    resolve(g_api.AllReduce, "ncclAllReduce");
    resolve(g_api.Broadcast, "ncclBroadcast");
    resolve(g_api.AllGather, "ncclAllGather");
    resolve(g_api.ReduceScatter, "ncclReduceScatter");
    resolve(g_api.Reduce, "ncclReduce");
    resolve(g_api.GroupStart, "ncclGroupStart");
    resolve(g_api.GroupEnd, "ncclGroupEnd");
  } catch (...) {
    dlclose(h);
    g_lib = nullptr;
    throw;
  }
}

bool loaded() {
  std::lock_guard<std::mutex> lk(g_mu);
  return g_lib != nullptr;
}

int version() {
  int v = 0;
  check(api().GetVersion(&v), "ncclGetVersion");
  return v;
}

std::vector<uint8_t> unique_id() {
  ncclUniqueId id;
  check(api().GetUniqueId(&id), "ncclGetUniqueId");
  return std::vector<uint8_t>(reinterpret_cast<uint8_t*>(&id), reinterpret_cast<uint8_t*>(&id) + sizeof(id));
}

Comm::Comm(const std::vector<uint8_t>& id, int nranks, int rank, int device)
    : nranks_(nranks), rank_(rank), device_(device) {
  AIMASS_CHECK(id.size() == sizeof(ncclUniqueId), ValueError, "NCCL unique id must be ", sizeof(ncclUniqueId),
               " bytes, got ", id.size());
  AIMASS_CHECK(nranks > 0 && rank >= 0 && rank < nranks, ValueError, "NCCL rank ", rank, " is outside [0, ",
               nranks, ")");
  int ndev = 0;
  check_cuda(cudaGetDeviceCount(&ndev), "cudaGetDeviceCount");
  AIMASS_CHECK(device >= 0 && device < ndev, ValueError, "CUDA device ", device, " does not exist (", ndev,
               " visible)");
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  ncclUniqueId uid;
  std::memcpy(&uid, id.data(), sizeof(uid));
  ncclComm_t c = nullptr;
  check(api().CommInitRank(&c, nranks, uid, rank), "ncclCommInitRank");
  comm_ = c;
}

Comm::~Comm() {
  if (!comm_) return;
  // Destroy waits for outstanding work; abort is for the error paths (abort()).
  api().CommDestroy(static_cast<ncclComm_t>(comm_));
  comm_ = nullptr;
}

void Comm::check_open(const char* what) const {
  if (!comm_) throw ClosedError(std::string("NCCL ") + what + ": the communicator was aborted or closed");
}

void Comm::check_async(const char* what) {
  ncclResult_t async = ncclSuccess;
  check(api().CommGetAsyncError(static_cast<ncclComm_t>(comm_), &async), "ncclCommGetAsyncError");
  if (async != ncclSuccess && async != ncclInProgress) {
    std::string msg = std::string("NCCL ") + what + ": asynchronous error: " + api().GetErrorString(async) +
                      " (a peer rank may have failed); the communicator was aborted";
    abort();
    throw DistributedError(msg);
  }
}

void Comm::allreduce(const void* send, void* recv, size_t count, const std::string& dtype, const std::string& op,
                     uintptr_t stream) {
  check_open("allreduce");
  auto c = static_cast<ncclComm_t>(comm_);
  check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  check(api().AllReduce(send, recv, count, to_nccl(dtype), to_nccl_op(op), c, as_stream(stream)), "ncclAllReduce", c);
}

void Comm::broadcast(const void* send, void* recv, size_t count, const std::string& dtype, int root,
                     uintptr_t stream) {
  check_open("broadcast");
  AIMASS_CHECK(root >= 0 && root < nranks_, ValueError, "broadcast root ", root, " is outside [0, ", nranks_, ")");
  auto c = static_cast<ncclComm_t>(comm_);
  check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  check(api().Broadcast(send, recv, count, to_nccl(dtype), root, c, as_stream(stream)), "ncclBroadcast", c);
}

void Comm::allgather(const void* send, void* recv, const std::vector<size_t>& counts, const std::string& dtype,
                     uintptr_t stream) {
  check_open("allgather");
  AIMASS_CHECK(counts.size() == static_cast<size_t>(nranks_), ValueError, "allgather needs one count per rank (",
               nranks_, "), got ", counts.size());
  auto c = static_cast<ncclComm_t>(comm_);
  ncclDataType_t t = to_nccl(dtype);
  check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  bool equal = true;
  for (size_t n : counts) equal = equal && n == counts[0];
  if (equal) {
    check(api().AllGather(send, recv, counts[0], t, c, as_stream(stream)), "ncclAllGather", c);
    return;
  }
  // Uneven first dimensions: every rank broadcasts its block into its place in recv.
  const size_t elem = dtype_size(parse_dtype(dtype));
  Group g;
  size_t off = 0;
  for (int r = 0; r < nranks_; ++r) {
    char* dst = static_cast<char*>(recv) + off * elem;
    if (counts[r] > 0)
      check(api().Broadcast(r == rank_ ? send : dst, dst, counts[r], t, r, c, as_stream(stream)), "ncclBroadcast", c);
    off += counts[r];
  }
}

void Comm::reduce_scatter(const void* send, void* recv, const std::vector<size_t>& counts, const std::string& dtype,
                          const std::string& op, uintptr_t stream) {
  check_open("reduce_scatter");
  AIMASS_CHECK(counts.size() == static_cast<size_t>(nranks_), ValueError,
               "reduce_scatter needs one count per rank (", nranks_, "), got ", counts.size());
  auto c = static_cast<ncclComm_t>(comm_);
  ncclDataType_t t = to_nccl(dtype);
  ncclRedOp_t o = to_nccl_op(op);
  check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  bool equal = true;
  for (size_t n : counts) equal = equal && n == counts[0];
  if (equal) {
    check(api().ReduceScatter(send, recv, counts[0], t, o, c, as_stream(stream)), "ncclReduceScatter", c);
    return;
  }
  const size_t elem = dtype_size(parse_dtype(dtype));
  Group g;
  size_t off = 0;
  for (int r = 0; r < nranks_; ++r) {
    const char* src = static_cast<const char*>(send) + off * elem;
    if (counts[r] > 0)
      check(api().Reduce(src, r == rank_ ? recv : nullptr, counts[r], t, o, r, c, as_stream(stream)), "ncclReduce", c);
    off += counts[r];
  }
}

bool Comm::query(uintptr_t stream) {
  check_open("query");
  check_async("query");
  cudaError_t rc = cudaStreamQuery(as_stream(stream));
  if (rc == cudaErrorNotReady) {
    cudaGetLastError();
    return false;
  }
  check_cuda(rc, "cudaStreamQuery");
  return true;
}

void Comm::wait(uintptr_t stream, double timeout_s) {
  check_open("wait");
  check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  // An event marks "everything enqueued so far", so later work on the stream does not extend the wait.
  cudaEvent_t ev;
  check_cuda(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), "cudaEventCreate");
  struct EventGuard { cudaEvent_t e; ~EventGuard() { cudaEventDestroy(e); } } guard{ev};
  check_cuda(cudaEventRecord(ev, as_stream(stream)), "cudaEventRecord");
  auto start = std::chrono::steady_clock::now();
  for (int spins = 0;; ++spins) {
    cudaError_t rc = cudaEventQuery(ev);
    if (rc == cudaSuccess) break;
    if (rc != cudaErrorNotReady) check_cuda(rc, "waiting for an NCCL collective");
    cudaGetLastError();
    check_async("wait");
    double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (timeout_s > 0 && waited > timeout_s) {
      abort();
      throw DistributedError(detail::concat("NCCL collective did not finish within ", timeout_s,
                                            " s on rank ", rank_, " (a peer rank may not have submitted it, "
                                            "or died); the communicator was aborted"));
    }
    if (spins < 1000) std::this_thread::yield();
    else std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
  check_async("wait");
}

void Comm::abort() {
  if (!comm_) return;
  api().CommAbort(static_cast<ncclComm_t>(comm_));
  comm_ = nullptr;
}

#else  // built without nccl.h: every entry point says how to get it

namespace {
[[noreturn]] void missing() {
  throw Error("aimass._cuda was built without NCCL headers: install nvidia-nccl-cu13 "
              "(python -m pip install nvidia-nccl-cu13) and rebuild aimass");
}
}  // namespace

bool compiled() { return false; }
void load(const std::string&) { missing(); }
bool loaded() { return false; }
int version() { missing(); }
std::vector<uint8_t> unique_id() { missing(); }
Comm::Comm(const std::vector<uint8_t>&, int, int, int) { missing(); }
Comm::~Comm() = default;
void Comm::allreduce(const void*, void*, size_t, const std::string&, const std::string&, uintptr_t) { missing(); }
void Comm::broadcast(const void*, void*, size_t, const std::string&, int, uintptr_t) { missing(); }
void Comm::allgather(const void*, void*, const std::vector<size_t>&, const std::string&, uintptr_t) { missing(); }
void Comm::reduce_scatter(const void*, void*, const std::vector<size_t>&, const std::string&, const std::string&,
                          uintptr_t) { missing(); }
void Comm::wait(uintptr_t, double) { missing(); }
bool Comm::query(uintptr_t) { missing(); }
void Comm::abort() {}
void Comm::check_open(const char*) const {}
void Comm::check_async(const char*) {}

#endif

}  // namespace aimass::nccl
