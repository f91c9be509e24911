// Element types shared by every area, with their names as the Python side spells them.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace aimass {

enum class DType : int { F32 = 0, F64, F16, BF16, I8, U8, I16, I32, I64, Bool };

size_t dtype_size(DType t);
// "float32", "float64", "float16", "bfloat16", "int8", "uint8", "int16", "int32", "int64", "bool"
const char* dtype_name(DType t);
// Accepts the names above (and numpy's short forms like "f4"); throws TypeError otherwise.
DType parse_dtype(const std::string& name);

}  // namespace aimass
