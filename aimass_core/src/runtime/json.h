// Minimal strict JSON reader for the safetensors header and the graph
// (the runtime's only JSON need; no dependency for it). Errors throw
// CorruptDataError with the byte offset.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace aimass::runtime::json {

struct Value {
  enum Kind { Null, Bool, Number, String, Array, Object } kind = Null;
  bool b = false;
  double num = 0;
  std::string str;
  std::vector<Value> arr;
  std::vector<std::pair<std::string, Value>> obj;

  const Value* find(const std::string& key) const;
  bool is_object() const { return kind == Object; }
  bool is_array() const { return kind == Array; }
  bool is_string() const { return kind == String; }
  bool is_number() const { return kind == Number; }
};

// `what` names the document in error messages.
Value parse(const char* data, size_t len, const char* what);

}  // namespace aimass::runtime::json
