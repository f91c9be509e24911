// The cross-node step of the hierarchical allreduce (ShmAllreduce::run's cross_reduce, and the
// caller-thread path's, hier_fast.cc, through cross_pair_allreduce): after the
// node's shared-memory reduce-scatter, each local rank allreduces its slice with the ranks of the
// same local rank on the other nodes (the cross communicator), all local ranks in parallel, as
// NCCL's and Horovod's hierarchical allreduce do.
//
// Two nodes (the common case, and the 2 x 2 simulated set-up of the benchmark): one point-to-point
// exchange of the slice with the peer (MPI_Isend / MPI_Irecv, which Open MPI's shared-memory and
// network transports move without the staging and the progress-by-MPI_Test rounds of a
// non-blocking MPI_Iallreduce), then one SIMD reduce here. Both ranks reduce the same two
// operands in the same order (lower cross rank first), so they hold the same bits. Measured on the
// loaded 2-core VM (4 ranks as 2 x 2, 1 MiB allreduce: 512 KiB slices): the cross step took
// 380-770 us through MPI_Iallreduce. More nodes: MPI_Iallreduce (MPI picks its algorithm).
// Every wait honours the engine's deadline.
#include "aimass/comm_kernels.h"
#include "comm/engine_impl.h"

namespace aimass {

namespace {
constexpr int kCrossTag = 0x41c5;  // the only point-to-point traffic on the cross communicator
constexpr int64_t kMaxMsgBytes = int64_t(1) << 30;
constexpr int64_t kHalvingMinBytes = int64_t(1) << 20;  // slice bytes from which the two-step exchange wins
}  // namespace

void CollectiveEngine::Impl::cross_allreduce(void* data, int64_t n, DType wire, ReduceOp op) {
  if (n <= 0) return;
  const size_t es = dtype_size(wire);
  MPI_Comm cc = comm->cross_comm();
  if (comm->cross_size() != 2) {
    for (int64_t off = 0; off < n; off += kMaxChunk) {  // MPI counts are int
      MPI_Request req;
      check_mpi(MPI_Iallreduce(MPI_IN_PLACE, static_cast<char*>(data) + off * es,
                               static_cast<int>(std::min(kMaxChunk, n - off)), mpi_type(wire), mpi_op(wire, op), cc,
                               &req),
                "MPI_Iallreduce(cross-node)");
      wait_req(&req, 1.0, "cross-node allreduce");
    }
    return;
  }
  comm::cross_pair_allreduce(cc, kCrossTag, comm->cross_rank(), cross_buf, data, n, wire, op,
                             [&](MPI_Request* req, const char* what) { wait_req(req, 1.0, what); });
}

namespace comm {

void cross_pair_allreduce(MPI_Comm cc, int tag, int me, std::vector<char>& buf, void* data, int64_t n, DType wire,
                          ReduceOp op, const std::function<void(MPI_Request*, const char*)>& wait) {
  if (n <= 0) return;
  const size_t es = dtype_size(wire);
  const int peer = 1 - me;
  const bool exact_commutative = op == ReduceOp::Sum || op == ReduceOp::Product || op == ReduceOp::Average;
  const ReduceOp rop = op == ReduceOp::Average ? ReduceOp::Sum : op;
  char* mine = static_cast<char*>(data);
  // Exchanges: receive `rn` bytes from the peer into `rbuf` while sending `sn` bytes of `sbuf`.
  auto exchange = [&](char* rbuf, int64_t rn, const char* sbuf, int64_t sn) {
    for (int64_t off = 0; off < std::max(rn, sn); off += kMaxMsgBytes) {
      MPI_Request reqs[2] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL};
      if (off < rn)
        check_mpi(MPI_Irecv(rbuf + off, static_cast<int>(std::min(kMaxMsgBytes, rn - off)), MPI_BYTE, peer, tag, cc,
                            &reqs[0]),
                  "MPI_Irecv(cross-node)");
      if (off < sn)
        check_mpi(MPI_Isend(sbuf + off, static_cast<int>(std::min(kMaxMsgBytes, sn - off)), MPI_BYTE, peer, tag, cc,
                            &reqs[1]),
                  "MPI_Isend(cross-node)");
      if (reqs[0] != MPI_REQUEST_NULL) wait(&reqs[0], "cross-node allreduce (receive)");
      if (reqs[1] != MPI_REQUEST_NULL) wait(&reqs[1], "cross-node allreduce (send)");
    }
  };
  // [b, e) of the slice := cross rank 0's values op cross rank 1's (the same operand order on both
  // ranks; IEEE sums and products do not depend on the order of two operands, min / max of +-0 do)
  auto reduce_part = [&](int64_t b, int64_t e, char* theirs) {
    const size_t cnt = static_cast<size_t>(e - b);
    char* own = mine + b * static_cast<int64_t>(es);
    if (me == 0 || exact_commutative) {
      const char* srcs[2] = {own, theirs};
      reduce_into(wire, rop, srcs, 2, own, cnt, false, 1);
    } else {
      const char* srcs[2] = {theirs, own};
      reduce_into(wire, rop, srcs, 2, theirs, cnt, false, 1);
      comm::copy_bytes(own, theirs, cnt * es);
    }
  };
  const int64_t bytes = n * static_cast<int64_t>(es);
  // (the caller's buffer: after a timeout a receive stays posted into it, so it must outlive the call)
  if (buf.size() < static_cast<size_t>(bytes)) buf.resize(static_cast<size_t>(bytes));
  if (bytes < kHalvingMinBytes || n < 2) {
    // small slices: one exchange of the whole slice, both ranks reduce all of it (one round trip)
    exchange(buf.data(), bytes, mine, bytes);
    reduce_part(0, n, buf.data());
    return;
  }
  // large slices: reduce-scatter then allgather between the two ranks (each reduces half the
  // slice; half the memory traffic, one more round trip)
  const int64_t h = n / 2;
  const int64_t b = me == 0 ? 0 : h, e = me == 0 ? h : n;            // the half this rank reduces
  const int64_t pb = me == 0 ? h : 0, pe = me == 0 ? n : h;          // the peer's half
  const int64_t esz = static_cast<int64_t>(es);
  exchange(buf.data(), (e - b) * esz, mine + pb * esz, (pe - pb) * esz);
  reduce_part(b, e, buf.data());
  exchange(mine + pb * esz, (pe - pb) * esz, mine + b * esz, (e - b) * esz);
}

}  // namespace comm
}  // namespace aimass
