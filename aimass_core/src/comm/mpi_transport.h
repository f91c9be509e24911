// The MPI transport of the collective engine: datatypes, the user-defined ops that reduce
// 16-bit floats in fp32, and the chunk limit of MPI's int counts.
#pragma once
#include <mpi.h>

#include <cstdint>

#include "aimass/collectives.h"
#include "aimass/dtype.h"

namespace aimass {
namespace comm {

MPI_Datatype mpi_type(DType t);
void create_half_ops(MPI_Op (&ops)[2][4]);  // [f16, bf16][sum, min, max, product]
void free_half_ops(MPI_Op (&ops)[2][4]);

constexpr int64_t kMaxChunk = int64_t(1) << 30;  // MPI counts are int

}  // namespace comm
}  // namespace aimass
