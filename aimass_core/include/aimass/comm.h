// A communicator over MPI: one per aimass.dist.init(). It duplicates the
// communicator it is given, so aimass traffic never matches the user's own
// messages, and splits off the ranks that share this node's memory.
#pragma once
#include <mpi.h>

#include <atomic>
#include <cstdint>

namespace aimass {

class Communicator {
 public:
  // `comm` is borrowed (e.g. from mpi4py); MPI must already be initialised.
  explicit Communicator(MPI_Comm comm);
  ~Communicator();
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  int local_rank() const { return local_rank_; }
  int local_size() const { return local_size_; }
  int cross_rank() const { return cross_rank_; }
  int cross_size() const { return cross_size_; }
  MPI_Comm comm() const { return comm_; }
  MPI_Comm local_comm() const { return local_comm_; }
  MPI_Comm cross_comm() const { return cross_comm_; }
  // Frees the MPI communicators; safe to call twice. Called by the destructor
  // only while MPI is still initialised.
  void free();
  // Forgets the MPI communicators without freeing them: after a peer died, requests may
  // still be posted on them and tearing them down could block.
  void abandon() { comm_ = local_comm_ = cross_comm_ = MPI_COMM_NULL; }

 private:
  MPI_Comm comm_ = MPI_COMM_NULL;
  MPI_Comm local_comm_ = MPI_COMM_NULL;   // ranks on this node
  MPI_Comm cross_comm_ = MPI_COMM_NULL;   // ranks with the same local_rank, one per node
  int rank_ = 0, size_ = 1, local_rank_ = 0, local_size_ = 1, cross_rank_ = 0, cross_size_ = 1;
};

// Converts the integer handle mpi4py exposes (Comm.handle) into an MPI_Comm,
// whatever the MPI's handle type (a pointer for Open MPI, an int for MPICH).
MPI_Comm comm_from_handle(uintptr_t handle);
// Throws DistributedError with the MPI error string when rc != MPI_SUCCESS.
void check_mpi(int rc, const char* what);
// After a peer died or stalled, MPI_Finalize can block forever (Open MPI waits for every
// process of the job). Once this was called, MPI_Finalize is given `grace_s` seconds and then
// the process exits with `exit_code` (the last value passed to set_exit_code_on_hang).
void note_peer_failure(double grace_s = 2.0);
bool peer_failure_noted();
void set_exit_code_on_hang(int exit_code);

// Waits for a non-blocking MPI request with a deadline: polls MPI_Test, yields the CPU
// while spinning (the machine may be oversubscribed), sleeps after `spin_s`, and throws
// DistributedError after `timeout_s` (a peer that died or stopped answering). The
// request stays posted then: its buffers must outlive the process's use of MPI.
// `heartbeat` (optional) receives steady_clock nanoseconds while waiting.
void wait_mpi(MPI_Request* req, double spin_s, double timeout_s, const char* what,
              std::atomic<int64_t>* heartbeat = nullptr);

}  // namespace aimass
