// "More ranks than CPUs on this machine": the one decision behind the shared-memory waits
// (ShmAllreduce::set_wait_policy: whether a waiter yields before it sleeps) and the eager broadcast
// bound (fast_path.cc: whether a root copies every broadcast the ring holds instead of waiting for
// its receivers) and the engine's timed staged/single-copy vote (engine.cc shm_init: off when
// oversubscribed). Internal to the comm area.
#pragma once
#include <cstdlib>
#include <initializer_list>
#include <thread>

namespace aimass {
namespace comm {

struct CpuShare {
  long cpus = 0;   // the machine's usable CPUs (0: unknown)
  long ranks = 0;  // the ranks running on this machine
  // Ranks outnumber CPUs: a rank that waits mostly waits for a peer to be scheduled.
  bool oversubscribed() const { return cpus > 0 && ranks > cpus; }
};

// cpus: the online CPUs (std::thread::hardware_concurrency), not this process's affinity mask:
// under `mpirun --bind-to core` each rank's mask holds one CPU although every rank has a core of
// its own. ranks: the launcher's count of this job's ranks on the machine (Open MPI
// OMPI_COMM_WORLD_LOCAL_SIZE, MPICH / Hydra MPI_LOCALNRANKS) where it is larger than node_ranks
// (simulated nodes, AIMASS_RANKS_PER_NODE, share one machine; so do the ranks outside a process
// set), else node_ranks (the communicator's node).
inline CpuShare cpu_share(long node_ranks) {
  CpuShare s;
  s.cpus = static_cast<long>(std::thread::hardware_concurrency());
  s.ranks = node_ranks;
  for (const char* name : {"OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"}) {
    if (const char* v = std::getenv(name)) {
      char* end = nullptr;
      const long k = std::strtol(v, &end, 10);
      if (end != v && *end == '\0' && k > s.ranks) s.ranks = k;  // (a garbled value: the node's count)
      break;
    }
  }
  return s;
}

}  // namespace comm
}  // namespace aimass
