#include <sched.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <type_traits>

#include "aimass/comm.h"
#include "aimass/error.h"

namespace aimass {

void check_mpi(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char msg[MPI_MAX_ERROR_STRING] = {0};
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  throw DistributedError(std::string(what) + " failed: " + std::string(msg, len));
}

namespace {
std::atomic<bool> g_peer_failed{false};
std::atomic<int> g_exit_code{1};
std::atomic<double> g_grace_s{2.0};
std::atomic<bool> g_finalize_hook{false};

// MPI_Finalize deletes MPI_COMM_SELF's attributes first: the hook that bounds it.
int on_finalize(MPI_Comm, int, void*, void*) {
  if (g_peer_failed.load()) {
    std::thread([] {
      std::this_thread::sleep_for(std::chrono::duration<double>(g_grace_s.load()));
      std::fflush(nullptr);
      std::fprintf(stderr, "aimass.dist: MPI_Finalize blocked after a peer rank failed; exiting without it\n");
      _exit(g_exit_code.load());
    }).detach();
  }
  return MPI_SUCCESS;
}
}  // namespace

void note_peer_failure(double grace_s) {
  g_grace_s = grace_s;
  g_peer_failed = true;
  bool expected = false;
  int inited = 0, finalized = 0;
  MPI_Initialized(&inited);
  MPI_Finalized(&finalized);
  if (!inited || finalized || !g_finalize_hook.compare_exchange_strong(expected, true)) return;
  int key = MPI_KEYVAL_INVALID;
  if (MPI_Comm_create_keyval(MPI_COMM_NULL_COPY_FN, &on_finalize, &key, nullptr) == MPI_SUCCESS)
    MPI_Comm_set_attr(MPI_COMM_SELF, key, nullptr);
}

bool peer_failure_noted() { return g_peer_failed.load(); }

void set_exit_code_on_hang(int exit_code) { g_exit_code = exit_code; }

void wait_mpi(MPI_Request* req, double spin_s, double timeout_s, const char* what,
              std::atomic<int64_t>* heartbeat) {
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  int flag = 0;
  for (uint64_t iter = 0;; ++iter) {
    check_mpi(MPI_Test(req, &flag, MPI_STATUS_IGNORE), what);
    if (flag) return;
    if ((iter & 63) == 0) {
      const auto now = Clock::now();
      if (heartbeat)
        heartbeat->store(std::chrono::duration_cast<std::chrono::nanoseconds>(now.time_since_epoch()).count(),
                         std::memory_order_relaxed);
      const double waited = std::chrono::duration<double>(now - start).count();
      if (waited > timeout_s) {
        throw DistributedError(detail::concat(
            "aimass.dist: ", what, " did not complete within ", timeout_s,
            " s: a peer rank has died or stopped calling aimass (raise the timeout - dist.init(timeout=) or "
            "AIMASS_COMM_TIMEOUT - if it is only slow)"));
      }
      if (waited > spin_s) {
        std::this_thread::sleep_for(std::chrono::microseconds(100));
        continue;
      }
    }
    sched_yield();
  }
}

namespace {
// Discarded `if constexpr` branches are only skipped inside templates.
template <typename C>
C handle_to(uintptr_t handle) {
  if constexpr (std::is_pointer_v<C>) {
    return reinterpret_cast<C>(handle);
  } else {
    return static_cast<C>(handle);
  }
}
}  // namespace

MPI_Comm comm_from_handle(uintptr_t handle) { return handle_to<MPI_Comm>(handle); }

Communicator::Communicator(MPI_Comm comm) {
  int inited = 0, finalized = 0;
  MPI_Initialized(&inited);
  MPI_Finalized(&finalized);
  AIMASS_CHECK(inited && !finalized, DistributedError,
               "MPI is not initialised (or already finalised): import mpi4py.MPI first, or call aimass.dist.init()");
  AIMASS_CHECK(comm != MPI_COMM_NULL, ValueError, "communicator is MPI_COMM_NULL");
  // Errors come back as codes so we can raise typed exceptions instead of aborting.
  check_mpi(MPI_Comm_dup(comm, &comm_), "MPI_Comm_dup");
  MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
  check_mpi(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
  check_mpi(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
  check_mpi(MPI_Comm_split_type(comm_, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &local_comm_),
            "MPI_Comm_split_type");
  MPI_Comm_set_errhandler(local_comm_, MPI_ERRORS_RETURN);
  // AIMASS_RANKS_PER_NODE=k splits each node into groups of k ranks that act as separate
  // nodes: it exercises the multi-node (hierarchical) path on one machine.
  if (const char* v = std::getenv("AIMASS_RANKS_PER_NODE")) {
    char* end = nullptr;
    const long k = std::strtol(v, &end, 10);
    if (end == v || k < 1) {
      free();
      throw ValueError(std::string("AIMASS_RANKS_PER_NODE must be an integer >= 1, got '") + v + "'");
    }
    int lr = 0;
    check_mpi(MPI_Comm_rank(local_comm_, &lr), "MPI_Comm_rank(local)");
    MPI_Comm group = MPI_COMM_NULL;
    check_mpi(MPI_Comm_split(local_comm_, static_cast<int>(lr / k), lr, &group), "MPI_Comm_split(node groups)");
    MPI_Comm_free(&local_comm_);
    local_comm_ = group;
    MPI_Comm_set_errhandler(local_comm_, MPI_ERRORS_RETURN);
  }
  check_mpi(MPI_Comm_rank(local_comm_, &local_rank_), "MPI_Comm_rank(local)");
  check_mpi(MPI_Comm_size(local_comm_, &local_size_), "MPI_Comm_size(local)");
  check_mpi(MPI_Comm_split(comm_, local_rank_, rank_, &cross_comm_), "MPI_Comm_split(cross)");
  MPI_Comm_set_errhandler(cross_comm_, MPI_ERRORS_RETURN);
  check_mpi(MPI_Comm_rank(cross_comm_, &cross_rank_), "MPI_Comm_rank(cross)");
  check_mpi(MPI_Comm_size(cross_comm_, &cross_size_), "MPI_Comm_size(cross)");
}

void Communicator::free() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) {  // MPI tore everything down already
    comm_ = local_comm_ = cross_comm_ = MPI_COMM_NULL;
    return;
  }
  for (MPI_Comm* c : {&cross_comm_, &local_comm_, &comm_}) {
    if (*c != MPI_COMM_NULL) MPI_Comm_free(c);
  }
}

Communicator::~Communicator() { free(); }

}  // namespace aimass
