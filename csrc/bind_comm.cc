// Bindings for the comm area: the communicator and the collective engine (aimass.dist).
// Arrays arrive as numpy views (python/aimass/_array.py did the torch/DLPack
// conversion, zero-copy); the Python layer keeps them alive until the handle
// completes. Waiting releases the GIL.
#include "aimass/collectives.h"
#include "aimass/comm.h"
#include "aimass/comm_kernels.h"
#include "aimass/dtype.h"
#include "aimass/shared_host.h"
#include "common.h"

#include <optional>

#include <structmember.h>

namespace aimass_bind {

namespace {

aimass::CollectiveKind parse_kind(const std::string& k) {
  if (k == "allreduce") return aimass::CollectiveKind::Allreduce;
  if (k == "broadcast") return aimass::CollectiveKind::Broadcast;
  if (k == "allgather") return aimass::CollectiveKind::Allgather;
  if (k == "reduce_scatter") return aimass::CollectiveKind::ReduceScatter;
  if (k == "barrier") return aimass::CollectiveKind::Barrier;
  throw aimass::ValueError("unknown collective '" + k + "'");
}

void check_array(const py::array& a, aimass::DType dt, const char* what) {
  require_contiguous(a, what);
  AIMASS_CHECK(static_cast<size_t>(a.itemsize()) == aimass::dtype_size(dt), TypeError, what, " has item size ",
               a.itemsize(), " but dtype ", aimass::dtype_name(dt), " needs ", aimass::dtype_size(dt));
}

// The engine dtype of a numpy array, from its kind and item size (no string round trip).
// bf16_bits: the array holds bfloat16 bits as uint16 (numpy_dtype's inverse for BF16)
std::optional<aimass::DType> fast_dtype(const py::array& a, bool bf16_bits = false) {
  const py::dtype d = a.dtype();
  if (d.byteorder() == '>') return std::nullopt;  // (big-endian data: the full path converts it)
  const char k = d.kind();
  const auto n = d.itemsize();
  if (bf16_bits) return k == 'u' && n == 2 ? std::optional<aimass::DType>(aimass::DType::BF16) : std::nullopt;
  if (k == 'f') return n == 4 ? aimass::DType::F32 : n == 8 ? aimass::DType::F64 : n == 2 ? aimass::DType::F16
                                                                                            : std::optional<aimass::DType>();
  if (k == 'i') {
    switch (n) {
      case 1: return aimass::DType::I8;
      case 2: return aimass::DType::I16;
      case 4: return aimass::DType::I32;
      case 8: return aimass::DType::I64;
    }
  }
  if (k == 'u' && n == 1) return aimass::DType::U8;
  if (k == 'b' && n == 1) return aimass::DType::Bool;
  return std::nullopt;
}

py::dtype numpy_dtype(aimass::DType dt) {
  // bfloat16 travels as uint16 bits; the Python layer re-labels it
  return py::dtype(dt == aimass::DType::BF16 ? std::string("uint16") : std::string(aimass::dtype_name(dt)));
}

// A view of the engine-owned allgather / reduce_scatter result; the array keeps the handle alive.
py::array result_array(std::shared_ptr<aimass::CollectiveHandle> h) {
  std::vector<py::ssize_t> shape(h->result_shape().begin(), h->result_shape().end());
  auto* keep = new std::shared_ptr<aimass::CollectiveHandle>(h);
  py::capsule cap(keep, [](void* p) { delete static_cast<std::shared_ptr<aimass::CollectiveHandle>*>(p); });
  return py::array(numpy_dtype(h->dtype()), shape, h->result_data(), cap);
}

// Submits a blocking collective and waits with the GIL released (blocking: the engine may run it
// in this thread first). Returns True, or the allgather / reduce_scatter result.
py::object submit_and_wait(aimass::CollectiveEngine& e, int kind, const py::array& input, const py::object& output,
                           std::string name, aimass::ReduceOp op, int root, aimass::DType dt, bool blocking) {
  aimass::CollectiveRequest r;
  r.kind = static_cast<aimass::CollectiveKind>(kind);
  r.name = std::move(name);
  r.dtype = r.wire = dt;
  r.op = op;
  r.root = root;
  r.blocking = blocking;
  r.shape = shape_of(input);
  r.input = input.data();
  if (!output.is_none()) r.output = const_cast<void*>(static_cast<const py::array&>(output).data());
  std::shared_ptr<aimass::CollectiveHandle> h;
  bool failed = false;
  {
    py::gil_scoped_release rel;
    try {
      h = e.submit(std::move(r));
      h->wait();
    } catch (...) {
      failed = true;
      if (!h || !h->buffers_in_use()) throw;
    }
  }
  if (failed) {  // cut off mid-transfer: MPI may still write these arrays until the process exits
    input.inc_ref();
    output.inc_ref();
    py::gil_scoped_release rel;
    h->wait();  // rethrows the request's error
  }
  if (kind >= 2) return result_array(h);
  return py::bool_(true);
}

// ------------------------------------------------------------------ the lean lane
// _comm_lean(kind, tensor, out, name, op, root_rank, root): the blocking allreduce / broadcast /
// allgather / reduce_scatter of a C-contiguous numpy array on the global process set, as one
// METH_FASTCALL call (no pybind11 argument conversion, no handle, no allocation but the result
// array): CollectiveEngine::run_fast in this thread with the GIL released, else (an aborted
// attempt: its peers went to their engines) the engine, submitted and waited for here. Returns
// the result (`tensor` itself when out is tensor), or None when the call does not qualify (no
// engine, a timeline recording, not a numpy array, an unsupported dtype or layout, a name, op or
// root that is not plain): the caller then takes the full path, which reports what is wrong.
// kind: 0 allreduce, 1 broadcast, 2 allgather, 3 reduce_scatter. An 8th argument, True, says a uint16
// array holds bfloat16 bits (numpy has no bfloat16: a torch bfloat16 tensor's view).
std::weak_ptr<aimass::CollectiveEngine>* lean_engine() {  // the GIL guards it; never destroyed
  static auto* e = new std::weak_ptr<aimass::CollectiveEngine>();
  return e;
}
bool g_lean_paused = false;

bool lean_op(PyObject* o, aimass::ReduceOp def, aimass::ReduceOp* out) {
  if (o == Py_None) {
    *out = def;
    return true;
  }
  if (!PyUnicode_Check(o)) return false;  // (ReduceOp is a str enum: its text is the value)
  Py_ssize_t n = 0;
  const char* p = PyUnicode_AsUTF8AndSize(o, &n);
  if (!p) {
    PyErr_Clear();
    return false;
  }
  return aimass::try_parse_reduce_op(std::string_view(p, static_cast<size_t>(n)), out);
}

// A blocking collective's result (allreduce, broadcast, allgather, reduce_scatter) in a recycled
// result block (CollectiveHandle::result_block_get: huge pages from 4 MiB) once it is 1 MiB or more:
// a fresh array past glibc's mmap threshold (32 MiB) is faulted in page by page on every call, while
// mpi4py's Allgather writes into the caller's array. The block goes back to the pool when the array
// (and every view of it) is freed. Measured (2 ranks, loaded VM, median of 24, same run): a 64 MiB
// gather through the caller's thread 23 ms into pooled blocks against 47 ms into fresh arrays,
// mpi4py 32 ms.
// shared: an allgather result the peers write into (CollectiveEngine::ll_maps_peers): a shared block, from
// 32 KiB (a block of a shared slab below 1 MiB); an ordinary array when none is to be had.
py::array pooled_array(const py::dtype& dt, const std::vector<py::ssize_t>& shape, bool shared = false) {
  size_t n = static_cast<size_t>(dt.itemsize());
  for (py::ssize_t d : shape) n *= static_cast<size_t>(d);
  if (shared) {
    if (void* p = aimass::CollectiveHandle::shared_result_block_get(n)) {
      py::capsule cap(p, [](void* v) { aimass::CollectiveHandle::shared_result_block_put(v); });
      return py::array(dt, shape, static_cast<char*>(p), cap);
    }
  }
  if (n < (size_t(1) << 20)) return py::array(dt, shape);
  struct Block {
    void* p;
    size_t n;
  };
  auto* b = new Block{aimass::CollectiveHandle::result_block_get(n), n};
  py::capsule cap(b, [](void* v) {
    auto* blk = static_cast<Block*>(v);
    aimass::CollectiveHandle::result_block_put(blk->p, blk->n);
    delete blk;
  });
  return py::array(dt, shape, static_cast<char*>(b->p), cap);
}

// The name, op and root of a lean call (args[3..6]); false: not plain (the full path takes the call).
bool lean_args(PyObject* const* args, long kind, int size, aimass::FastCollective* c) {
  if (!PyUnicode_Check(args[3])) return false;
  Py_ssize_t name_len = 0;
  const char* name = PyUnicode_AsUTF8AndSize(args[3], &name_len);
  if (!name) {
    PyErr_Clear();
    return false;
  }
  c->name = std::string_view(name, static_cast<size_t>(name_len));
  c->kind = static_cast<aimass::CollectiveKind>(kind);
  c->op = aimass::ReduceOp::Sum;
  c->root = 0;
  if (kind == 0 || kind == 3) return lean_op(args[4], aimass::ReduceOp::Average, &c->op);
  if (kind == 1) {
    PyObject* r = args[6] == Py_None ? args[5] : (args[5] == Py_None ? args[6] : nullptr);
    if (!r || !PyLong_CheckExact(r)) return false;
    int overflow = 0;
    const long v = PyLong_AsLongAndOverflow(r, &overflow);
    if (overflow || v < 0 || v >= size) return false;
    c->root = static_cast<int>(v);
  }
  return true;
}

// ---- CPU torch tensors: registered by the Python layer once torch is in use (_comm_lean_torch), so that no
// torch import happens here. The tensor's pointer, shape and dtype are read through its attributes (~0.4 us)
// instead of building its numpy view (t.numpy(): 0.7 us, and 1.2 us with the checks around it in Python);
// in place the tensor comes back, else the result array as a tensor (_torch_result).
struct LeanTorch {
  PyObject* tensor_type = nullptr;  // torch.Tensor (exact type: subclasses such as Parameter take the full path)
  PyObject* dtypes = nullptr;       // {torch dtype: aimass DType as int}
  PyObject* result = nullptr;       // _torch_result(array, bfloat16) -> tensor
  PyObject *s_requires_grad, *s_is_cpu, *s_is_contiguous, *s_is_neg, *s_dtype, *s_data_ptr, *s_shape;
};
LeanTorch* lean_torch() {  // the GIL guards it; never destroyed
  static auto* t = [] {
    auto* v = new LeanTorch();
    v->s_requires_grad = PyUnicode_InternFromString("requires_grad");
    v->s_is_cpu = PyUnicode_InternFromString("is_cpu");
    v->s_is_contiguous = PyUnicode_InternFromString("is_contiguous");
    v->s_is_neg = PyUnicode_InternFromString("is_neg");
    v->s_dtype = PyUnicode_InternFromString("dtype");
    v->s_data_ptr = PyUnicode_InternFromString("data_ptr");
    v->s_shape = PyUnicode_InternFromString("shape");
    return v;
  }();
  return t;
}

// attribute `s` of o is True (a new reference dropped here); errors cleared: false
bool attr_true(PyObject* o, PyObject* s, bool call) {
  PyObject* v = call ? PyObject_CallMethodNoArgs(o, s) : PyObject_GetAttr(o, s);
  if (!v) {
    PyErr_Clear();
    return false;
  }
  const bool yes = v == Py_True;
  Py_DECREF(v);
  return yes;
}

// A plain CPU torch tensor's pointer, shape and dtype for the lane (false: it does not qualify, the Python
// layer then takes it).
struct TorchInput {
  void* data = nullptr;
  int ndim = 0;
  int64_t shape[32];
  aimass::DType dt = aimass::DType::F32;
};
bool torch_input(PyObject* t, TorchInput* ti) {
  LeanTorch& lt = *lean_torch();
  // (a negative view's memory holds the values negated: its numpy() refuses, and so does the lane)
  if (attr_true(t, lt.s_requires_grad, false) || !attr_true(t, lt.s_is_cpu, false) ||
      !attr_true(t, lt.s_is_contiguous, true) || attr_true(t, lt.s_is_neg, true))
    return false;
  py::object dto = py::reinterpret_steal<py::object>(PyObject_GetAttr(t, lt.s_dtype));
  PyObject* code = dto ? PyDict_GetItemWithError(lt.dtypes, dto.ptr()) : nullptr;  // (borrowed)
  py::object ptro = py::reinterpret_steal<py::object>(PyObject_CallMethodNoArgs(t, lt.s_data_ptr));
  py::object shp = py::reinterpret_steal<py::object>(PyObject_GetAttr(t, lt.s_shape));
  if (!code || !ptro || !shp || !PyTuple_Check(shp.ptr()) || PyTuple_GET_SIZE(shp.ptr()) > 32) {
    PyErr_Clear();
    return false;
  }
  ti->dt = static_cast<aimass::DType>(PyLong_AsLong(code));
  ti->data = PyLong_AsVoidPtr(ptro.ptr());
  ti->ndim = static_cast<int>(PyTuple_GET_SIZE(shp.ptr()));
  for (int i = 0; i < ti->ndim; ++i) ti->shape[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(shp.ptr(), i));
  if (PyErr_Occurred()) {
    PyErr_Clear();
    return false;
  }
  // (numpy's view of a misaligned tensor is not aligned: the numpy lane declines it too)
  return reinterpret_cast<uintptr_t>(ti->data) % aimass::dtype_size(ti->dt) == 0;
}

// A result array as a torch tensor that owns its memory (the registered _torch_result: torch.from_numpy,
// bfloat16 bits re-labelled).
py::object torch_result(py::object arr, aimass::DType dt) {
  return py::reinterpret_borrow<py::object>(lean_torch()->result)(arr, dt == aimass::DType::BF16);
}

PyObject* lean_call(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  try {
    if (nargs != 7 && nargs != 8) {
      PyErr_SetString(PyExc_TypeError,
                      "_comm_lean(kind, tensor, out, name, op, root_rank, root[, bfloat16]) takes 7 or 8 arguments");
      return nullptr;
    }
    std::shared_ptr<aimass::CollectiveEngine> eng = lean_engine()->lock();
    if (!eng || g_lean_paused) Py_RETURN_NONE;
    const long kind = PyLong_AsLong(args[0]);
    if (kind == -1 && PyErr_Occurred()) return nullptr;
    if (kind < 0 || kind > 3) Py_RETURN_NONE;
    PyObject* t = args[1];
    const bool inplace = args[2] == t;
    if (args[2] != Py_None && !inplace) Py_RETURN_NONE;
    const auto& api = py::detail::npy_api::get();
    const int size = eng->communicator().size();
    aimass::FastCollective c;
    py::array a;  // the input as a numpy array (a torch tensor's view only where the engine needs one)
    py::dtype rdt;  // the result's numpy dtype
    TorchInput ti;
    const bool torch = Py_TYPE(t) != api.PyArray_Type_;
    if (torch) {
      if (reinterpret_cast<PyObject*>(Py_TYPE(t)) != lean_torch()->tensor_type || (inplace && kind > 1) ||
          !torch_input(t, &ti))
        Py_RETURN_NONE;
      if (kind == 2 && ti.ndim == 0) ti.shape[ti.ndim++] = 1;  // one row per rank
      c.dtype = ti.dt;
      c.ndim = ti.ndim;
      c.shape = ti.shape;
      c.input = ti.data;
      rdt = numpy_dtype(ti.dt);
    } else {
      const auto* pa = py::detail::array_proxy(t);
      constexpr int kLayout = py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_ | py::detail::npy_api::NPY_ARRAY_ALIGNED_;
      if ((pa->flags & kLayout) != kLayout || (inplace && !(pa->flags & py::detail::npy_api::NPY_ARRAY_WRITEABLE_)))
        Py_RETURN_NONE;
      a = py::reinterpret_borrow<py::array>(t);
      if (kind == 2 && pa->nd == 0) a = a.reshape(std::vector<py::ssize_t>{1});  // one row per rank
      const auto dt = fast_dtype(a, nargs == 8 && args[7] == Py_True);
      if (!dt) Py_RETURN_NONE;
      c.dtype = *dt;
      const auto* pv = py::detail::array_proxy(a.ptr());  // (a 0-d allgather: the reshaped view)
      c.ndim = pv->nd;
      c.shape = reinterpret_cast<const int64_t*>(pv->dimensions);
      static_assert(sizeof(*pv->dimensions) == sizeof(int64_t), "numpy dimensions are 64-bit here");
      c.input = pa->data;
      rdt = a.dtype();
    }
    if (!lean_args(args, kind, size, &c)) Py_RETURN_NONE;
    if (kind == 3 && c.ndim == 0) Py_RETURN_NONE;
    size_t in_bytes = aimass::dtype_size(c.dtype);
    for (int i = 0; i < c.ndim; ++i) in_bytes *= static_cast<size_t>(c.shape[i]);
    // the result array: allreduce / broadcast as large as the input; allgather as if every rank
    // had as many rows (else run_fast asks for other memory: `spill`); reduce_scatter this rank's block
    py::object out;
    std::vector<py::ssize_t> shape;
    if (inplace) {
      out = py::reinterpret_borrow<py::object>(t);
      c.output = const_cast<void*>(c.input);
      c.capacity = in_bytes;
    } else {
      shape.assign(c.shape, c.shape + c.ndim);
      if (kind == 2) shape[0] *= size;
      if (kind == 3) shape[0] = shape[0] / size + (eng->communicator().rank() < shape[0] % size ? 1 : 0);
      // (every kind: a fresh 64 MiB result faulted in 64 MiB of pages a call; an allgather's in shared memory
      // where the peers map it and the parts go by address, 16 KiB and more: they write their rows into it
      // with plain stores; smaller parts are copied through the channel's slots into ordinary memory)
      out = pooled_array(rdt, shape, kind == 2 && eng->ll_maps_peers() && in_bytes >= (16 << 10));
      c.output = py::detail::array_proxy(out.ptr())->data;
      c.capacity = static_cast<size_t>(static_cast<const py::array&>(out).nbytes());
    }
    std::vector<uint8_t> spill;
    c.alloc = [](void* ctx, size_t bytes) -> void* {
      auto* v = static_cast<std::vector<uint8_t>*>(ctx);
      v->resize(bytes + 1);
      return v->data();
    };
    c.alloc_ctx = &spill;
    bool done = false;
    try {
      py::gil_scoped_release rel;
      done = eng->run_fast(c);
    } catch (...) {  // (the GIL is held again here)
      // cut off mid single-copy allreduce: a late peer may still write the result until the
      // process exits
      if (c.peers_may_write) out.inc_ref();
      throw;
    }
    py::object result = out;
    if (!done) {  // every rank of an aborted attempt submits to its engine: negotiation decides
      if (torch) {  // (a numpy view onto the tensor, which keeps it alive)
        std::vector<py::ssize_t> sv(c.shape, c.shape + c.ndim);
        a = py::array(rdt, sv, c.input, py::reinterpret_borrow<py::object>(t));
      }
      py::object o = kind <= 1 ? (inplace ? py::object(a) : out) : py::none();
      py::object got = submit_and_wait(*eng, static_cast<int>(kind), a, o, std::string(c.name), c.op, c.root, c.dtype,
                                       false);
      if (kind > 1) result = got;
    } else if (!spill.empty()) {  // an allgather of differing row counts
      shape[0] = c.result_rows;
      py::array r(rdt, shape);
      std::memcpy(r.mutable_data(), spill.data(), static_cast<size_t>(r.nbytes()));
      result = r;
    }
    if (torch && !inplace) result = torch_result(result, c.dtype);
    return result.release().ptr();
  } catch (py::error_already_set& e) {
    e.restore();
    return nullptr;
  } catch (...) {
    py::detail::try_translate_exceptions();
    return nullptr;
  }
}

PyMethodDef lean_def = {"_comm_lean", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(&lean_call)),
                        METH_FASTCALL,
                        "_comm_lean(kind, tensor, out, name, op, root_rank, root[, bfloat16]): the lean lane of the blocking "
                        "numpy collectives (None: not handled, take the full path)"};

// ------------------------------------------------------------------ lean entries
// A module-level collective (aimass.dist.allreduce / allreduce_ / broadcast / broadcast_) as a vectorcall
// object: a call with plain arguments (the tensor, name=, op= or root_rank= / root=; every other
// parameter absent or at its default) goes to
// lean_call with no Python frame in between (the wrapper's frame and keyword binding cost about as
// much as the C call itself; an 8-byte allreduce is ~1 us in all); anything else, or a call the lane
// does not take, is passed unchanged to the Python function, which stays the reference (its
// signature and docstring are copied onto the object by functools.update_wrapper).
enum ParamRole : uint8_t { kTensor, kName, kOp, kRootRank, kRoot, kMustBeNone, kMustBeOne, kMustBeSet, kOther };

struct LeanEntry {
  PyObject_HEAD
  vectorcallfunc vectorcall;
  PyObject* dict;      // __dict__ (functools.update_wrapper writes __doc__, __wrapped__, ...)
  PyObject* fallback;  // the Python function
  PyObject* names;     // tuple of every parameter name, positional ones first (interned)
  PyObject* global_set;  // process_set's default
  int kind;
  bool inplace;
  Py_ssize_t npos;     // positional parameters
  std::vector<uint8_t>* roles;  // per name
};

ParamRole role_of(const char* n) {
  const std::string_view v(n);
  if (v == "tensor") return kTensor;
  if (v == "name") return kName;
  if (v == "op") return kOp;
  if (v == "root_rank") return kRootRank;
  if (v == "root") return kRoot;
  if (v == "average" || v == "compression" || v == "timeout") return kMustBeNone;
  if (v == "prescale_factor" || v == "postscale_factor") return kMustBeOne;
  if (v == "process_set") return kMustBeSet;
  return kOther;
}

PyObject* lean_entry_call(PyObject* self_, PyObject* const* args, size_t nargsf, PyObject* kwnames) {
  auto* self = reinterpret_cast<LeanEntry*>(self_);
  const Py_ssize_t n = PyVectorcall_NARGS(nargsf);
  PyObject *tensor = nullptr, *name = Py_None, *op = Py_None, *root_rank = Py_None, *root = Py_None;
  bool plain = n >= 1 && n <= self->npos;
  auto take = [&](uint8_t role, PyObject* v) {
    switch (role) {
      case kTensor: tensor = v; break;
      case kName: name = v; break;
      case kOp: op = v; break;
      case kRootRank: root_rank = v; break;
      case kRoot: root = v; break;
      case kMustBeNone: plain = plain && v == Py_None; break;
      case kMustBeOne: plain = plain && PyFloat_CheckExact(v) && PyFloat_AS_DOUBLE(v) == 1.0; break;
      case kMustBeSet: plain = plain && v == self->global_set; break;
      default: plain = false;
    }
  };
  for (Py_ssize_t i = 0; plain && i < n; ++i) take((*self->roles)[static_cast<size_t>(i)], args[i]);
  const Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
  for (Py_ssize_t k = 0; plain && k < nkw; ++k) {
    PyObject* key = PyTuple_GET_ITEM(kwnames, k);
    const Py_ssize_t total = PyTuple_GET_SIZE(self->names);
    Py_ssize_t at = -1;
    for (Py_ssize_t i = 0; i < total && at < 0; ++i)  // keyword names are interned: identity first
      if (PyTuple_GET_ITEM(self->names, i) == key) at = i;
    for (Py_ssize_t i = 0; i < total && at < 0; ++i) {
      const int eq = PyUnicode_Compare(PyTuple_GET_ITEM(self->names, i), key);
      if (eq == 0) at = i;
      if (eq == -1 && PyErr_Occurred()) PyErr_Clear();
    }
    // unknown, or also given by position: the Python function raises the usual TypeError
    if (at < 0 || at < n) plain = false;
    else take((*self->roles)[static_cast<size_t>(at)], args[n + k]);
  }
  if (plain && tensor != nullptr) {
    PyObject* argv[7] = {nullptr, tensor, self->inplace ? tensor : Py_None, name, op, root_rank, root};
    PyObject* kind = PyLong_FromLong(self->kind);
    if (!kind) return nullptr;
    argv[0] = kind;
    PyObject* got = lean_call(nullptr, argv, 7);
    Py_DECREF(kind);
    if (got != Py_None) return got;  // the result (allreduce_: the tensor itself), or an error
    Py_DECREF(got);
  }
  return PyObject_Vectorcall(self->fallback, args, nargsf, kwnames);
}

void lean_entry_dealloc(PyObject* self_) {
  auto* self = reinterpret_cast<LeanEntry*>(self_);
  PyObject_GC_UnTrack(self_);
  Py_CLEAR(self->dict);
  Py_CLEAR(self->fallback);
  Py_CLEAR(self->names);
  Py_CLEAR(self->global_set);
  delete self->roles;
  PyTypeObject* tp = Py_TYPE(self_);
  tp->tp_free(self_);
  Py_DECREF(tp);
}

int lean_entry_traverse(PyObject* self_, visitproc visit, void* arg) {
  auto* self = reinterpret_cast<LeanEntry*>(self_);
  Py_VISIT(self->dict);
  Py_VISIT(self->fallback);
  Py_VISIT(self->names);
  Py_VISIT(self->global_set);
  Py_VISIT(Py_TYPE(self_));
  return 0;
}

int lean_entry_clear(PyObject* self_) {
  auto* self = reinterpret_cast<LeanEntry*>(self_);
  Py_CLEAR(self->dict);
  Py_CLEAR(self->fallback);
  Py_CLEAR(self->names);
  Py_CLEAR(self->global_set);
  return 0;
}

// Pickled by reference, as a Python function is: __name__ (copied from the function) is looked up in
// __module__ on load, which holds this object.
PyObject* lean_entry_reduce(PyObject* self, PyObject*) { return PyObject_GetAttrString(self, "__name__"); }

PyTypeObject* lean_entry_type() {
  static PyTypeObject* t = [] {
    static PyMethodDef methods[] = {{"__reduce__", &lean_entry_reduce, METH_NOARGS, nullptr},
                                    {nullptr, nullptr, 0, nullptr}};
    static PyMemberDef members[] = {
        {"__vectorcalloffset__", T_PYSSIZET, offsetof(LeanEntry, vectorcall), READONLY, nullptr},
        {"__dictoffset__", T_PYSSIZET, offsetof(LeanEntry, dict), READONLY, nullptr},
        {nullptr, 0, 0, 0, nullptr}};
    static PyGetSetDef getset[] = {{"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, nullptr, nullptr},
                                   {nullptr, nullptr, nullptr, nullptr, nullptr}};
    static PyType_Slot slots[] = {{Py_tp_getset, getset},{Py_tp_dealloc, reinterpret_cast<void*>(&lean_entry_dealloc)},
                                  {Py_tp_traverse, reinterpret_cast<void*>(&lean_entry_traverse)},
                                  {Py_tp_clear, reinterpret_cast<void*>(&lean_entry_clear)},
                                  {Py_tp_call, reinterpret_cast<void*>(&PyVectorcall_Call)},
                                  {Py_tp_members, members},
                                  {Py_tp_methods, methods},
                                  {0, nullptr}};
    static PyType_Spec spec = {"aimass._C.LeanCollective", sizeof(LeanEntry), 0,
                               Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL, slots};
    return reinterpret_cast<PyTypeObject*>(PyType_FromSpec(&spec));
  }();
  if (!t) throw py::error_already_set();
  return t;
}

py::object make_lean_entry(int kind, bool inplace, py::function fallback, py::tuple positional, py::tuple keyword_only,
                           py::object global_set) {
  AIMASS_CHECK(kind == 0 || kind == 1, ValueError,
               "_comm_lean_entry: only allreduce (kind 0) and broadcast (kind 1) have an entry");
  PyTypeObject* tp = lean_entry_type();
  auto* self = PyObject_GC_New(LeanEntry, tp);
  if (!self) throw py::error_already_set();
  Py_INCREF(tp);  // (instances of heap types own a reference to their type)
  self->vectorcall = &lean_entry_call;
  self->dict = nullptr;
  self->fallback = fallback.inc_ref().ptr();
  self->global_set = global_set.inc_ref().ptr();
  self->kind = kind;
  self->inplace = inplace;
  self->npos = static_cast<Py_ssize_t>(positional.size());
  self->roles = new std::vector<uint8_t>();
  py::list all;
  for (auto seq : {positional, keyword_only}) {
    for (auto nm : seq) {
      PyObject* s = py::str(nm).release().ptr();
      PyUnicode_InternInPlace(&s);
      self->roles->push_back(role_of(PyUnicode_AsUTF8(s)));
      all.append(py::reinterpret_steal<py::object>(s));
    }
  }
  self->names = py::tuple(all).release().ptr();
  PyObject_GC_Track(reinterpret_cast<PyObject*>(self));
  return py::reinterpret_steal<py::object>(reinterpret_cast<PyObject*>(self));
}

}  // namespace

void bind_comm(py::module_& m) {
  py::class_<aimass::Communicator, std::shared_ptr<aimass::Communicator>>(m, "Communicator")
      .def(py::init([](uintptr_t handle) {
             return std::make_shared<aimass::Communicator>(aimass::comm_from_handle(handle));
           }),
           py::arg("mpi_handle"), nogil())
      .def_property_readonly("rank", &aimass::Communicator::rank)
      .def_property_readonly("size", &aimass::Communicator::size)
      .def_property_readonly("local_rank", &aimass::Communicator::local_rank)
      .def_property_readonly("local_size", &aimass::Communicator::local_size)
      .def_property_readonly("cross_rank", &aimass::Communicator::cross_rank)
      .def_property_readonly("cross_size", &aimass::Communicator::cross_size)
      .def("free", &aimass::Communicator::free, nogil())
      .def("abandon", &aimass::Communicator::abandon);

  py::class_<aimass::CollectiveHandle, std::shared_ptr<aimass::CollectiveHandle>>(m, "CollectiveHandle")
      .def("poll", &aimass::CollectiveHandle::poll)
      .def("wait", &aimass::CollectiveHandle::wait, nogil())
      .def_property_readonly("buffers_in_use", &aimass::CollectiveHandle::buffers_in_use)
      .def("result", &result_array);

  py::class_<aimass::CollectiveEngine, std::shared_ptr<aimass::CollectiveEngine>>(m, "CollectiveEngine")
      .def(py::init([](std::shared_ptr<aimass::Communicator> comm, py::object fusion_threshold, py::object cycle_time_ms,
                       py::object timeout) {
             auto o = aimass::EngineOptions::from_env();
             if (!fusion_threshold.is_none()) {
               auto v = fusion_threshold.cast<long long>();
               AIMASS_CHECK(v >= 0, ValueError, "fusion_threshold must be >= 0 bytes, got ", v);
               o.fusion_threshold = static_cast<size_t>(v);
             }
             if (!cycle_time_ms.is_none()) o.cycle_time_s = cycle_time_ms.cast<double>() / 1000.0;
             if (!timeout.is_none()) o.timeout_s = timeout.cast<double>();
             py::gil_scoped_release rel;
             return std::make_shared<aimass::CollectiveEngine>(std::move(comm), o);
           }),
           py::arg("comm"), py::arg("fusion_threshold") = py::none(), py::arg("cycle_time_ms") = py::none(),
           py::arg("timeout") = py::none())
      .def(
          "submit",
          [](aimass::CollectiveEngine& e, const std::string& kind, py::object input, py::object output,
             const std::string& name, const std::string& dtype, const std::string& op, const std::string& wire,
             int root, double timeout, bool blocking) {
            aimass::CollectiveRequest r;
            r.kind = parse_kind(kind);
            r.name = name;
            r.dtype = aimass::parse_dtype(dtype);
            r.wire = wire.empty() ? r.dtype : aimass::parse_dtype(wire);
            r.op = aimass::parse_reduce_op(op);
            r.root = root;
            r.timeout_s = timeout;
            r.blocking = blocking;
            if (!input.is_none()) {
              py::array a = input.cast<py::array>();
              check_array(a, r.dtype, "input");
              r.shape = shape_of(a);
              r.input = a.data();
            }
            if (!output.is_none()) {
              py::array b = output.cast<py::array>();
              check_array(b, r.dtype, "output");
              AIMASS_CHECK(b.writeable(), ValueError, "output must be writeable");
              AIMASS_CHECK(shape_of(b) == r.shape, ValueError, "output shape must equal the input shape");
              r.output = b.mutable_data();
            }
            py::gil_scoped_release rel;
            return e.submit(std::move(r));
          },
          py::arg("kind"), py::arg("input"), py::arg("output"), py::arg("name"), py::arg("dtype"),
          py::arg("op") = "sum", py::arg("wire") = "", py::arg("root") = 0, py::arg("timeout") = 0.0,
          py::arg("blocking") = false)
      .def("shutdown", &aimass::CollectiveEngine::shutdown, nogil())
      .def_property_readonly("broken", &aimass::CollectiveEngine::broken)
      .def_property(
          "fusion_threshold", [](const aimass::CollectiveEngine& e) { return e.options().fusion_threshold; },
          [](aimass::CollectiveEngine& e, long long v) {
            AIMASS_CHECK(v >= 0, ValueError, "fusion_threshold must be >= 0 bytes, got ", v);
            e.set_fusion_threshold(static_cast<size_t>(v));
          })
      .def_property(
          "cycle_time_ms", [](const aimass::CollectiveEngine& e) { return e.options().cycle_time_s * 1000.0; },
          [](aimass::CollectiveEngine& e, double ms) { e.set_cycle_time(ms / 1000.0); })
      .def_property(
          "shm_min_bytes", [](const aimass::CollectiveEngine& e) { return e.options().shm_min_bytes; },
          [](aimass::CollectiveEngine& e, unsigned long long v) { e.set_shm_min_bytes(static_cast<size_t>(v)); })
      .def_property_readonly("shm_available", &aimass::CollectiveEngine::shm_available)
      .def_property_readonly("shared_buffers", &aimass::CollectiveEngine::shm_maps_peers)
      .def_property_readonly("shared_gathers", &aimass::CollectiveEngine::ll_maps_peers)
      .def_property_readonly("algorithms", &aimass::CollectiveEngine::algorithms)
      .def_property(
          "ll_max_bytes", [](const aimass::CollectiveEngine& e) { return e.options().ll_max_bytes; },
          [](aimass::CollectiveEngine& e, unsigned long long v) { e.set_ll_max_bytes(static_cast<size_t>(v)); })
      .def_property_readonly("ll_slot_bytes", &aimass::CollectiveEngine::ll_slot_bytes)
      .def_property_readonly("timeout", [](const aimass::CollectiveEngine& e) { return e.options().timeout_s; })
      .def("stats", [](const aimass::CollectiveEngine& e) {
        auto s = e.stats();
        py::dict d;
        d["cycles"] = s.cycles;
        d["full_rounds"] = s.full_rounds;
        d["cache_hits"] = s.cache_hits;
        d["fused_buffers"] = s.fused_buffers;
        d["fused_tensors"] = s.fused_tensors;
        d["errors"] = s.errors;
        d["shm_allreduces"] = s.shm_allreduces;
        d["shm_voted"] = s.shm_voted;
        d["shm_voted_staged"] = s.shm_voted_staged;
        d["shm_staged_lined"] = s.shm_staged_lined;
        d["shm_mapped"] = s.shm_mapped;
        d["ll_collectives"] = s.ll_collectives;
        d["ll_fallbacks"] = s.ll_fallbacks;
        d["hier_collectives"] = s.hier_collectives;
        d["hier_fallbacks"] = s.hier_fallbacks;
        d["hier_staged"] = s.hier_staged;
        d["ll_mapped"] = s.ll_mapped;
        d["ll_staged"] = s.ll_staged;
        d["ll_step_offs"] = s.ll_step_offs;
        d["ll_gather_pushed"] = s.ll_gather_pushed;
        d["ll_gather_mapped"] = s.ll_gather_mapped;
        return d;
      });

  m.add_object("_comm_lean", py::reinterpret_steal<py::object>(PyCFunction_NewEx(&lean_def, nullptr, nullptr)));
  m.def(
      "_comm_lean_engine",
      [](const py::object& e) {
        *lean_engine() = e.is_none() ? std::weak_ptr<aimass::CollectiveEngine>()
                                     : std::weak_ptr<aimass::CollectiveEngine>(
                                           e.cast<std::shared_ptr<aimass::CollectiveEngine>>());
      },
      py::arg("engine"));
  m.def("_comm_lean_entry", &make_lean_entry, py::arg("kind"), py::arg("inplace"), py::arg("fallback"),
        py::arg("positional"), py::arg("keyword_only"), py::arg("global_set"));
  m.def("_comm_lean_pause", [](bool paused) { g_lean_paused = paused; }, py::arg("paused"));
  m.def(
      "_comm_lean_torch",
      [](py::object tensor_type, py::dict dtypes, py::function result) {
        LeanTorch& lt = *lean_torch();
        py::dict codes;  // torch dtype -> DType code
        for (auto kv : dtypes) codes[kv.first] = static_cast<int>(aimass::parse_dtype(py::str(kv.second)));
        Py_XDECREF(lt.dtypes);
        lt.dtypes = codes.release().ptr();
        Py_XDECREF(lt.result);
        lt.result = result.release().ptr();
        Py_XDECREF(lt.tensor_type);
        lt.tensor_type = tensor_type.release().ptr();
      },
      py::arg("tensor_type"), py::arg("dtypes"), py::arg("result"),
      "Registers torch.Tensor, {torch dtype: name} and result(array, bfloat16) -> tensor with the lean lane: the "
      "blocking collectives of a CPU tensor then run without its numpy view");
  // An empty array for an out-of-place result on the general path (torch tensors): the lean lane's
  // recycled blocks from 1 MiB (a fresh 64 MiB result array costs 64 MiB of page faults per call).
  m.def(
      "_comm_result_array",
      [](const py::dtype& dt, const std::vector<py::ssize_t>& shape) { return pooled_array(dt, shape); },
      py::arg("dtype"), py::arg("shape"));
  // Host memory the local peers can map (a sealed memfd): gradient buckets that the shared-memory allreduce
  // reduces with loads and stores in every rank's bucket (engine.shared_buffers says whether it does).
  py::class_<aimass::SharedHostBuffer>(m, "SharedHostBuffer", py::buffer_protocol())
      .def(py::init([](int64_t nbytes) {
             if (nbytes <= 0)
               throw py::value_error("SharedHostBuffer: nbytes must be positive, got " + std::to_string(nbytes));
             return std::make_unique<aimass::SharedHostBuffer>(static_cast<size_t>(nbytes));
           }),
           py::arg("nbytes"))
      .def("__len__", &aimass::SharedHostBuffer::size)
      .def_buffer([](aimass::SharedHostBuffer& b) {
        return py::buffer_info(b.data(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(b.size())}, {py::ssize_t{1}});
      });
  // Whether [addr, addr + nbytes) lies in one of this process's shared host buffers (aimass.dist.is_shared).
  m.def(
      "_comm_in_shared_buffer",
      [](uintptr_t addr, size_t nbytes) {
        return aimass::in_shared_host_buffer(reinterpret_cast<const void*>(addr), nbytes);
      },
      py::arg("addr"), py::arg("nbytes"));
  m.def("_comm_peer_failed", &aimass::peer_failure_noted);
  m.def("_comm_set_exit_code_on_hang", &aimass::set_exit_code_on_hang, py::arg("code"));
  // Keeps `obj` alive for the rest of the process, through interpreter teardown: the arrays of
  // a collective cut off while posted to MPI (MPI may write them until the process exits).
  m.def("_comm_park", [](py::object obj) { obj.inc_ref(); }, py::arg("obj"));

  // Kernels exposed for tests and benchmarks.
  m.def(
      "_comm_half_to_f32",
      [](py::array_t<uint16_t, py::array::c_style> a, const std::string& kind) {
        auto out = empty<float>(shape_of(a));
        const auto k = kind == "bfloat16" ? aimass::comm::Half::BF16 : aimass::comm::Half::F16;
        const uint16_t* src = a.data();
        float* dst = out.mutable_data();
        size_t n = static_cast<size_t>(a.size());
        {
          py::gil_scoped_release rel;
          aimass::comm::half_to_f32(k, src, dst, n);
        }
        return out;
      },
      py::arg("bits"), py::arg("kind"));
  m.def(
      "_comm_f32_to_half",
      [](py::array_t<float, py::array::c_style> a, const std::string& kind) {
        auto out = empty<uint16_t>(shape_of(a));
        const auto k = kind == "bfloat16" ? aimass::comm::Half::BF16 : aimass::comm::Half::F16;
        const float* src = a.data();
        uint16_t* dst = out.mutable_data();
        size_t n = static_cast<size_t>(a.size());
        {
          py::gil_scoped_release rel;
          aimass::comm::f32_to_half(k, src, dst, n);
        }
        return out;
      },
      py::arg("values"), py::arg("kind"));
}

}  // namespace aimass_bind
