// The data phase: ready collectives in negotiated order, allreduces fused up to the
// threshold (through the shared-memory path or a fusion buffer and MPI), results unpacked.
#include "aimass/comm_kernels.h"
#include "comm/engine_impl.h"

namespace aimass {

namespace {
// Integer average: the sum divided by the world size, truncated toward zero.
template <typename T>
void divide_ints(void* data, int64_t n, int size) {
  T* o = static_cast<T*>(data);
  for (int64_t i = 0; i < n; ++i) o[i] = static_cast<T>(o[i] / size);
}
}  // namespace

// -------------------------------------------------------------- execution
// The data phase of the ready collectives. They leave `pending` first, so when it
// fails every one of them still open is failed here (the caller is blocked on it).
void CollectiveEngine::Impl::execute(const std::vector<std::string>& ready, size_t threshold) {
  if (ready.empty()) return;
  std::vector<Pending> work;
  finished_ok.clear();
  try {
    execute_work(ready, threshold, work);
    flush_finished();
  } catch (const std::exception& e) {
    flush_finished();  // batches that completed before the failure completed
    const std::string msg = e.what();
    for (auto& p : work) {
      if (!p.handle || p.handle->poll()) continue;  // finished before the failure
      if (posted_on_failure) {
        std::lock_guard<std::mutex> lk(p.handle->mu_);
        p.handle->buffers_in_use_ = true;
      }
      finish(p, CollectiveHandle::ErrorKind::Distributed, msg);
    }
    throw;
  }
}

void CollectiveEngine::Impl::execute_work(const std::vector<std::string>& ready, size_t threshold, std::vector<Pending>& work) {
  work.reserve(ready.size());
  for (auto& name : ready) {
    auto it = pending.find(name);
    AIMASS_CHECK(it != pending.end(), DistributedError, "aimass.dist: '", name,
                 "' is ready but not pending here (internal error)");
    work.push_back(std::move(it->second));
    pending.erase(it);
  }
  // Allreduces are grouped by (dtype, wire, op class) in first-seen order and
  // fused up to the threshold; everything else runs on its own, in order.
  std::vector<std::vector<size_t>> groups;
  std::vector<std::tuple<DType, DType, int>> keys;
  for (size_t i = 0; i < work.size(); ++i) {
    const CollectiveRequest& r = work[i].req;
    if (r.kind != CollectiveKind::Allreduce) {
      run_single(work[i]);
      continue;
    }
    const int opc = r.op == ReduceOp::Min ? 1 : r.op == ReduceOp::Max ? 2 : r.op == ReduceOp::Product ? 3 : 0;
    auto key = std::make_tuple(r.dtype, r.wire, opc);
    auto k = std::find(keys.begin(), keys.end(), key);
    if (k == keys.end()) {
      keys.push_back(key);
      groups.emplace_back();
      k = keys.end() - 1;
    }
    groups[k - keys.begin()].push_back(i);
  }
  for (auto& g : groups) {
    std::vector<Pending*> batch;
    size_t bytes = 0;
    for (size_t i : g) {
      Pending& p = work[i];
      const size_t b = static_cast<size_t>(numel_of(p.req.shape)) * dtype_size(p.req.wire);
      if (!batch.empty() && bytes + b > threshold) {
        allreduce_batch(batch);
        batch.clear();
        bytes = 0;
      }
      batch.push_back(&p);
      bytes += b;
    }
    if (!batch.empty()) allreduce_batch(batch);
  }
}

void CollectiveEngine::Impl::done_ok(Pending& p) {
  if (finish_at_end) finished_ok.push_back(&p);
  else finish(p, CollectiveHandle::ErrorKind::None, "");
}

void CollectiveEngine::Impl::flush_finished() {
  for (Pending* p : finished_ok) finish(*p, CollectiveHandle::ErrorKind::None, "");
  finished_ok.clear();
}

void CollectiveEngine::Impl::allreduce_batch(const std::vector<Pending*>& batch) {
  const DType wire = batch[0]->req.wire, dtype = batch[0]->req.dtype;
  const ReduceOp op = batch[0]->req.op;
  const size_t es = dtype_size(wire);
  {
    std::lock_guard<std::mutex> lk(mu);
    ++st.fused_buffers;
    st.fused_tensors += batch.size();
  }
  if (batch.size() == 1 && wire == dtype && !use_shm(numel_of(batch[0]->req.shape), wire)) {
    // no packing: reduce in the output itself
    Pending& p = *batch[0];
    const int64_t n = numel_of(p.req.shape);
    if (p.req.output != p.req.input && n > 0)
      comm::copy_bytes(p.req.output, p.req.input, static_cast<size_t>(n) * es);
    if (n > 0) allreduce_inplace(p.req.output, n, wire, op);
    unpack(p, p.req.output);
    done_ok(p);
    return;
  }
  int64_t total = 0;
  for (Pending* p : batch) total += numel_of(p->req.shape);
  if (wire == dtype && use_shm(total, wire)) {
    // stage straight from the tensors and write straight into them: no fusion buffer,
    // and the average is taken on the cache-resident reduced slices
    std::vector<comm::ShmSegment> segs;
    segs.reserve(batch.size());
    for (Pending* p : batch) {
      segs.push_back({static_cast<const char*>(p->req.input), static_cast<char*>(p->req.output),
                      numel_of(p->req.shape), p->req.op == ReduceOp::Average});
    }
    shm_allreduce_segments(std::move(segs), total, wire, op);
    for (Pending* p : batch) done_ok(*p);
    return;
  }
  char* buf = fusion_bytes(static_cast<size_t>(total) * es);
  int64_t off = 0;
  for (Pending* p : batch) {
    const int64_t n = numel_of(p->req.shape);
    if (wire != dtype) {
      comm::f32_to_half(wire == DType::F16 ? comm::Half::F16 : comm::Half::BF16,
                        static_cast<const float*>(p->req.input),
                        reinterpret_cast<uint16_t*>(buf + off * es), static_cast<size_t>(n));
    } else if (n > 0) {
      comm::copy_bytes(buf + off * es, p->req.input, static_cast<size_t>(n) * es);
    }
    off += n;
  }
  if (total > 0) allreduce_inplace(buf, total, wire, op);
  off = 0;
  for (Pending* p : batch) {
    unpack(*p, buf + off * es);
    off += numel_of(p->req.shape);
    done_ok(*p);
  }
}

// Writes op-finished values of `wire`-typed `src` into p's output (conversion / average).
void CollectiveEngine::Impl::unpack(Pending& p, const void* src) {
  const CollectiveRequest& r = p.req;
  const int64_t n = numel_of(r.shape);
  const bool avg = r.op == ReduceOp::Average;
  if (r.wire != r.dtype) {  // compressed float32
    comm::half_to_f32(r.wire == DType::F16 ? comm::Half::F16 : comm::Half::BF16, static_cast<const uint16_t*>(src),
                      static_cast<float*>(r.output), static_cast<size_t>(n));
    if (avg) {
      float* o = static_cast<float*>(r.output);
      const float s = 1.0f / static_cast<float>(size);
      for (int64_t i = 0; i < n; ++i) o[i] *= s;
    }
    return;
  }
  if (src != r.output) comm::copy_bytes(r.output, src, static_cast<size_t>(n) * dtype_size(r.dtype));
  if (!avg) return;
  switch (r.dtype) {
    case DType::F32: {
      float* o = static_cast<float*>(r.output);
      const float s = 1.0f / static_cast<float>(size);
      for (int64_t i = 0; i < n; ++i) o[i] *= s;
      break;
    }
    case DType::F64: {
      double* o = static_cast<double*>(r.output);
      for (int64_t i = 0; i < n; ++i) o[i] /= size;
      break;
    }
    case DType::I32: {
      int32_t* o = static_cast<int32_t*>(r.output);
      for (int64_t i = 0; i < n; ++i) o[i] /= size;
      break;
    }
    case DType::I64: {
      int64_t* o = static_cast<int64_t*>(r.output);
      for (int64_t i = 0; i < n; ++i) o[i] /= size;
      break;
    }
    case DType::I16: divide_ints<int16_t>(r.output, n, size); break;
    case DType::I8: divide_ints<int8_t>(r.output, n, size); break;
    case DType::U8: divide_ints<uint8_t>(r.output, n, size); break;
    case DType::F16:
    case DType::BF16:
      comm::scale_half(r.dtype == DType::F16 ? comm::Half::F16 : comm::Half::BF16, static_cast<uint16_t*>(r.output),
                       static_cast<size_t>(n), 1.0f / static_cast<float>(size));
      break;
    default: break;
  }
}

}  // namespace aimass
