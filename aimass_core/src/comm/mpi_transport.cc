// The MPI transport of the collective engine: datatypes, fp16/bf16 ops, and the engine's
// MPI data phase (allreduce of a buffer, broadcast, allgather, reduce_scatter).
#include "comm/mpi_transport.h"

#include "aimass/comm_kernels.h"
#include "aimass/error.h"
#include "comm/engine_impl.h"

namespace aimass {
namespace comm {

MPI_Datatype mpi_type(DType t) {
  switch (t) {
    case DType::F32: return MPI_FLOAT;
    case DType::F64: return MPI_DOUBLE;
    case DType::I32: return MPI_INT32_T;
    case DType::I64: return MPI_INT64_T;
    case DType::I16: return MPI_INT16_T;
    case DType::I8: return MPI_INT8_T;
    case DType::U8: return MPI_UINT8_T;
    case DType::Bool: return MPI_C_BOOL;
    case DType::F16:
    case DType::BF16: return MPI_UINT16_T;
  }
  throw TypeError(std::string("aimass.dist: unsupported dtype ") + dtype_name(t));
}

// ---- user-defined MPI ops for 16-bit floats (reduced in fp32, rounded once)
template <comm::Half K, comm::ElemOp O>
void half_op(void* in, void* inout, int* len, MPI_Datatype*) {
  comm::reduce_half(K, O, static_cast<const uint16_t*>(in), static_cast<uint16_t*>(inout), static_cast<size_t>(*len));
}

void create_half_ops(MPI_Op (&ops)[2][4]) {
  check_mpi(MPI_Op_create(&half_op<Half::F16, ElemOp::Sum>, 1, &ops[0][0]), "MPI_Op_create");
  check_mpi(MPI_Op_create(&half_op<Half::F16, ElemOp::Min>, 1, &ops[0][1]), "MPI_Op_create");
  check_mpi(MPI_Op_create(&half_op<Half::F16, ElemOp::Max>, 1, &ops[0][2]), "MPI_Op_create");
  check_mpi(MPI_Op_create(&half_op<Half::BF16, ElemOp::Sum>, 1, &ops[1][0]), "MPI_Op_create");
  check_mpi(MPI_Op_create(&half_op<Half::BF16, ElemOp::Min>, 1, &ops[1][1]), "MPI_Op_create");
  check_mpi(MPI_Op_create(&half_op<Half::BF16, ElemOp::Max>, 1, &ops[1][2]), "MPI_Op_create");
  check_mpi(MPI_Op_create(&half_op<Half::F16, ElemOp::Prod>, 1, &ops[0][3]), "MPI_Op_create");
  check_mpi(MPI_Op_create(&half_op<Half::BF16, ElemOp::Prod>, 1, &ops[1][3]), "MPI_Op_create");
}

void free_half_ops(MPI_Op (&ops)[2][4]) {
  for (auto& row : ops)
    for (auto& op : row)
      if (op != MPI_OP_NULL) MPI_Op_free(&op);
}

}  // namespace comm

MPI_Op CollectiveEngine::Impl::mpi_op(DType wire, ReduceOp op) {
  const int o = op == ReduceOp::Min ? 1 : op == ReduceOp::Max ? 2 : op == ReduceOp::Product ? 3 : 0;
  if (wire == DType::F16) return half_ops[0][o];
  if (wire == DType::BF16) return half_ops[1][o];
  if (wire == DType::Bool) return o == 1 || o == 3 ? MPI_LAND : MPI_LOR;
  static const MPI_Op native[4] = {MPI_SUM, MPI_MIN, MPI_MAX, MPI_PROD};
  return native[o];
}

void CollectiveEngine::Impl::allreduce_inplace(void* data, int64_t count, DType wire, ReduceOp op) {
  if (use_shm(count, wire)) return shm_allreduce(data, count, wire, op);
  const MPI_Datatype t = mpi_type(wire);
  const MPI_Op o = mpi_op(wire, op);
  const size_t es = dtype_size(wire);
  for (int64_t off = 0; off < count; off += kMaxChunk) {
    const int n = static_cast<int>(std::min(kMaxChunk, count - off));
    MPI_Request req;
    check_mpi(MPI_Iallreduce(MPI_IN_PLACE, static_cast<char*>(data) + off * es, n, t, o, mpi, &req),
              "MPI_Iallreduce");
    wait_req(&req, 1.0, "allreduce");
  }
}

void CollectiveEngine::Impl::run_single(Pending& p) {
  CollectiveRequest& r = p.req;
  const size_t es = dtype_size(r.dtype);
  MPI_Request req;
  switch (r.kind) {
    case CollectiveKind::Barrier: break;  // negotiation itself synchronised every rank
    case CollectiveKind::Broadcast: {
      const int64_t bytes = numel_of(r.shape) * static_cast<int64_t>(es);
      if (rank == r.root && r.output != r.input && bytes > 0)
        comm::copy_bytes(r.output, r.input, static_cast<size_t>(bytes));
      if (shm_for(comm::AlgoKind::Broadcast, static_cast<uint64_t>(bytes))) {
        try {
          shm->broadcast(r.output, bytes, r.root);  // one node: local ranks are the ranks
        } catch (...) {
          // a root that is only late may still push its pieces into this output: park it
          if (shm->peers_write_outputs()) posted_on_failure = true;
          throw;
        }
        break;
      }
      for (int64_t off = 0; off < bytes; off += kMaxChunk) {
        const int n = static_cast<int>(std::min(kMaxChunk, bytes - off));
        check_mpi(MPI_Ibcast(static_cast<char*>(r.output) + off, n, MPI_BYTE, r.root, mpi, &req), "MPI_Ibcast");
        wait_req(&req, 1.0, "broadcast");
      }
      break;
    }
    case CollectiveKind::Allgather: {
      int64_t row = static_cast<int64_t>(es);
      for (size_t d = 1; d < r.shape.size(); ++d) row *= r.shape[d];
      int64_t& mine = ag_mine;  // members: a timed-out request may still use them
      mine = r.shape.empty() ? 1 : r.shape[0];
      std::vector<int64_t>& rows = ag_rows;
      const bool one_node = shm_ok && comm->cross_size() == 1;
      if (one_node) {  // the row counts through shared memory: no MPI round
        shm_prepare(algos.pick(comm::AlgoKind::Allgather, 0));
        rows = shm->exchange(mine, r.input);
      } else {
        rows.assign(size, 0);
        check_mpi(MPI_Iallgather(&mine, 1, MPI_INT64_T, rows.data(), 1, MPI_INT64_T, mpi, &req), "MPI_Iallgather");
        wait_req(&req, 1.0, "allgather");
      }
      int64_t total_rows = 0;
      for (int64_t v : rows) total_rows += v;
      if (total_rows * row >= INT_MAX) {  // every rank sees the same totals: all fail alike
        finish(p, CollectiveHandle::ErrorKind::Value,
               detail::concat("allgather '", r.name, "': the gathered result (", total_rows * row,
                              " bytes) exceeds 2 GiB; gather in pieces"));
        return;
      }
      std::vector<int>& counts = ag_counts;
      std::vector<int>& displs = ag_displs;
      counts.assign(size, 0);
      displs.assign(size, 0);
      int64_t acc = 0;
      for (int i = 0; i < size; ++i) {
        counts[i] = static_cast<int>(rows[i] * row);
        displs[i] = static_cast<int>(acc);
        acc += rows[i] * row;
      }
      p.handle->result_.resize(static_cast<size_t>(acc));
      p.handle->result_shape_ = r.shape.empty() ? std::vector<int64_t>{total_rows} : r.shape;
      p.handle->result_shape_[0] = total_rows;
      if (one_node && shm_for(comm::AlgoKind::Allgather, static_cast<uint64_t>(acc))) {
        shm->allgather(r.input, rows, row, reinterpret_cast<char*>(p.handle->result_.data()));
        break;
      }
      check_mpi(MPI_Iallgatherv(r.input, counts[rank], MPI_BYTE, p.handle->result_.data(), counts.data(),
                                displs.data(), MPI_BYTE, mpi, &req),
                "MPI_Iallgatherv");
      wait_req(&req, 1.0, "allgather");
      break;
    }
    case CollectiveKind::ReduceScatter: {
      const int64_t n0 = r.shape[0];
      int64_t row = 1;
      for (size_t d = 1; d < r.shape.size(); ++d) row *= r.shape[d];
      std::vector<int>& counts = ag_counts;
      counts.assign(size, 0);
      for (int i = 0; i < size; ++i) counts[i] = static_cast<int>((n0 / size + (i < n0 % size ? 1 : 0)) * row);
      p.handle->result_shape_ = r.shape;
      p.handle->result_shape_[0] = counts[rank] / std::max<int64_t>(row, 1);
      if (row == 0) p.handle->result_shape_[0] = n0 / size + (rank < n0 % size ? 1 : 0);
      p.handle->result_.resize(static_cast<size_t>(counts[rank]) * es + 1);
      if (shm_for(comm::AlgoKind::ReduceScatter, static_cast<uint64_t>(n0 * row) * es)) {
        std::vector<int64_t> elems(counts.begin(), counts.end());
        shm->reduce_scatter(r.input, elems, reinterpret_cast<char*>(p.handle->result_.data()), r.dtype, r.op,
                            r.op == ReduceOp::Average, size);
        break;
      }
      check_mpi(MPI_Ireduce_scatter(r.input, p.handle->result_.data(), counts.data(), mpi_type(r.dtype),
                                    mpi_op(r.dtype, r.op), mpi, &req),
                "MPI_Ireduce_scatter");
      wait_req(&req, 1.0, "reduce_scatter");
      CollectiveRequest view = r;
      view.shape = {counts[rank]};
      view.output = p.handle->result_.data();
      Pending tmp{view, "", nullptr, p.submitted, false};
      unpack(tmp, p.handle->result_.data());
      break;
    }
    case CollectiveKind::Allreduce: break;  // handled by allreduce_batch
  }
  finish(p, CollectiveHandle::ErrorKind::None, "");
}

}  // namespace aimass
