// The per-size algorithm table of the collective engine (internal to the comm area).
//
// Text form (AIMASS_COMM_ALGOS, the tuning profile's `comm_algos`, `aimass bench --tune`):
//     allreduce=0:shm@256k,8m:shm@1m;broadcast=0:mpi,16k:shm;allgather=0:shm;reduce_scatter=0:shm
// Per collective, rows `min_bytes:algorithm` sorted by min_bytes; a message of b bytes takes the
// row with the largest min_bytes <= b. Algorithms: `mpi` (Open MPI's collective), `shm` (staged
// through the node's shared-memory segment, pipelined in chunks) or `cma` (single copy: each rank
// reads its peers' buffers with process_vm_readv, reducing in L2-sized chunks; `shm` where the
// kernel does not allow it), with an optional chunk size `@bytes` (clamped to the segment's
// slot, AIMASS_SHM_CHUNK_BYTES). Sizes take k/m/g suffixes (powers of 1024). Collectives not
// named keep their default rows. Allgather's size is the whole gathered result.
// The shared-memory algorithms apply on one node (allreduce also across nodes: hierarchical).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace aimass {
namespace comm {

enum class AlgoKind : int { Allreduce = 0, Broadcast = 1, Allgather = 2, ReduceScatter = 3 };
constexpr int kAlgoKinds = 4;

struct AlgoChoice {
  bool shm = false;    // shared memory (staged or single-copy) instead of MPI
  bool cma = false;    // single-copy: peers read each other's buffers (process_vm_readv)
  uint64_t chunk = 0;  // chunk bytes (0: the segment's slot size)
};

class AlgoTable {
 public:
  struct Row {
    uint64_t min_bytes = 0;
    AlgoChoice choice;
  };
  // The built-in table (measured on the development machine; see docs/comm.md).
  static AlgoTable defaults();
  // Parses the text form over the defaults; ValueError naming the bad part.
  static AlgoTable parse(const std::string& text);
  AlgoChoice pick(AlgoKind kind, uint64_t bytes) const;
  // Canonical text (every collective, sorted rows): equal tables give equal strings.
  std::string str() const;
  // Largest shm chunk any row asks for (0 if none).
  uint64_t max_chunk() const;
  // Measured on the 2-core development VM, 2 ranks (loaded: see docs/comm.md); `aimass bench --tune`
  // writes a table measured on the machine at hand (the tuning profile's comm_algos).
  static constexpr const char* kDefaultText =
      "allreduce=0:shm,64k:cma;broadcast=0:mpi,1m:cma;allgather=0:shm,1m:cma;reduce_scatter=0:shm";

 private:
  static AlgoTable parse_over(AlgoTable base, const std::string& text);
  std::vector<Row> rows_[kAlgoKinds];
};

const char* algo_kind_name(AlgoKind k);
uint64_t fnv1a64(const std::string& s);

}  // namespace comm
}  // namespace aimass
