#include "aimass/dtype.h"

#include "aimass/error.h"

namespace aimass {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32: case DType::I32: return 4;
    case DType::F64: case DType::I64: return 8;
    case DType::F16: case DType::BF16: case DType::I16: return 2;
    case DType::I8: case DType::U8: case DType::Bool: return 1;
  }
  return 0;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "float32";
    case DType::F64: return "float64";
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
    case DType::I8: return "int8";
    case DType::U8: return "uint8";
    case DType::I16: return "int16";
    case DType::I32: return "int32";
    case DType::I64: return "int64";
    case DType::Bool: return "bool";
  }
  return "?";
}

DType parse_dtype(const std::string& n) {
  if (n == "float32" || n == "f4" || n == "<f4" || n == "float") return DType::F32;
  if (n == "float64" || n == "f8" || n == "<f8" || n == "double") return DType::F64;
  if (n == "float16" || n == "f2" || n == "<f2" || n == "half") return DType::F16;
  if (n == "bfloat16" || n == "bf16") return DType::BF16;
  if (n == "int8" || n == "i1" || n == "|i1") return DType::I8;
  if (n == "uint8" || n == "u1" || n == "|u1") return DType::U8;
  if (n == "int16" || n == "i2" || n == "<i2") return DType::I16;
  if (n == "int32" || n == "i4" || n == "<i4") return DType::I32;
  if (n == "int64" || n == "i8" || n == "<i8") return DType::I64;
  if (n == "bool" || n == "b1" || n == "|b1") return DType::Bool;
  throw TypeError("dtype '" + n +
                  "' is not supported: use float32, float64, float16, bfloat16, int8, uint8, int16, int32, int64 or bool");
}

}  // namespace aimass
