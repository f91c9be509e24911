// Inference runtime: the .aimass model file (safetensors + graph JSON in its
// metadata, see docs/model-format.md) and the executor that runs it.
//
// Model::load memory-maps the file and validates the header, the graph and every
// tensor reference up front, so a bad file fails at load with a clear error and
// never later during a request. Executor builds its plan once (topological
// order, per-sample shapes, one arena sized for a batch capacity) and reuses the
// arena for every run: no allocation per request in steady state.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace aimass::runtime {

constexpr int kFormatVersion = 1;

// Limits on shapes from a model file (rejected at load, CorruptDataError/ValueError):
// at most kMaxRank dims, each at most kMaxDim = 2^40, and the byte size of every tensor
// and value row must fit in int64. They keep every shape computation of the loader and
// the executor far from overflow while rejecting no model that fits in memory.
constexpr size_t kMaxRank = 16;
constexpr int64_t kMaxDim = int64_t{1} << 40;

enum class ValueType : int { Float32 = 0, Int64 = 1 };
const char* value_type_name(ValueType t);

// One graph input or output. shape[0] is -1: the batch dimension. A -1 after it is
// the dynamic sequence length (one symbol shared by every input and output).
struct TensorSpec {
  std::string name;
  ValueType dtype = ValueType::Float32;
  std::vector<int64_t> shape;
  // Elements per batch row (product of shape[1:]).
  int64_t row_numel() const;
  int64_t row_bytes() const { return row_numel() * (dtype == ValueType::Int64 ? 8 : 4); }
};

// A tensor stored in the file. `data` points into the memory-mapped file
// (zero copy) unless the file stored it unaligned or as fp16, then into an
// owned aligned copy.
struct StoredTensor {
  std::string dtype;  // safetensors name: F32, F16, I8, U8, I64, ...
  std::vector<int64_t> shape;
  const void* data = nullptr;
  int64_t nbytes = 0;
  int64_t numel() const;
};

struct Node {
  std::string op;
  std::string name;
  std::vector<std::string> inputs;          // values: graph inputs or earlier node outputs
  std::vector<std::string> outputs;         // exactly one per node in format 1
  std::map<std::string, std::string> params;  // role -> tensor name in the file ("weight", "bias")
  std::map<std::string, std::vector<double>> attrs;  // numeric attributes (lists)
  std::map<std::string, std::string> str_attrs;      // string attributes ("activation")
};

class Model {
 public:
  // Maps `path` and validates it. Throws IOError (cannot open), CorruptDataError
  // (truncated / malformed header / offsets out of the file), ValueError (newer
  // format version, graph referencing a missing tensor or unknown value, bad attrs).
  static std::shared_ptr<Model> load(const std::string& path);
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const std::vector<TensorSpec>& inputs() const { return inputs_; }
  const std::vector<TensorSpec>& outputs() const { return outputs_; }
  const std::vector<Node>& nodes() const { return nodes_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const StoredTensor& tensor(const std::string& name) const;  // ValueError when missing
  bool has_tensor(const std::string& name) const { return tensors_.count(name) != 0; }
  int format_version() const { return format_version_; }
  const std::string& path() const { return path_; }
  int64_t file_bytes() const { return static_cast<int64_t>(map_len_); }

 private:
  Model() = default;
  std::string path_;
  void* map_ = nullptr;
  size_t map_len_ = 0;
  int format_version_ = 0;
  std::map<std::string, std::string> metadata_;
  std::map<std::string, StoredTensor> tensors_;
  std::vector<std::vector<float>> owned_;  // converted / realigned copies
  std::vector<TensorSpec> inputs_, outputs_;
  std::vector<Node> nodes_;
  friend struct ModelLoader;
};

// Rows up to which fp32 Linear layers run the runtime's packed small-M kernel (weights
// packed once at plan build, runtime/packed_gemm.h) instead of BLAS sgemm. Default 4096
// (measured: faster than sgemm up to 256 rows in bench/bench_runtime.py, and on par at the
// 1024 rows of a BERT batch of 8 x 128 tokens, where its fused epilogues win besides);
// AIMASS_PACKED_MAX_ROWS sets the initial value. 0 turns it off: executors built then pack
// nothing. set_packed_max_rows returns the previous value.
int64_t packed_max_rows();
int64_t set_packed_max_rows(int64_t rows);

struct ExecutorOptions {
  int64_t max_batch_size = 32;  // arena capacity in rows; grows if a larger batch comes
  int64_t seq_len = 8;          // models with a dynamic sequence dim: the plan built (and checked) first
  // Cap on the bytes of any one buffer the plan allocates (the arena for a batch, the
  // conv scratch): a model from an untrusted source whose shapes ask for more fails with
  // ValueError at construction / reserve instead of exhausting memory. 0: no cap.
  int64_t max_memory_bytes = 0;
};

// True when a signature entry of `m` has a dynamic dim after the batch dimension.
bool has_dynamic_seq(const Model& m);

struct PlanImpl;

// Runs a model. Not thread-safe: one caller at a time (the batcher's scheduler
// thread, or guard it with a mutex). Kernels use aimass::parallel_for / sgemm.
class Executor {
 public:
  explicit Executor(std::shared_ptr<const Model> model, ExecutorOptions opts = {});
  ~Executor();
  Executor(const Executor&) = delete;
  Executor& operator=(const Executor&) = delete;

  const Model& model() const { return *model_; }
  int64_t capacity() const;
  // Makes the arena hold `rows` rows (allocates only when it grows).
  void reserve(int64_t rows);
  // Arena buffers of graph input / output i, valid for `capacity()` rows until the
  // next reserve() that grows. Row r of input i starts at input_buffer(i) + r*row_bytes.
  void* input_buffer(int i);
  const void* output_buffer(int i) const;
  // Runs the graph on the first `rows` rows of the input buffers.
  void execute(int64_t rows);
  // Convenience: copies inputs in, executes, copies outputs out (rows each).
  void run(int64_t rows, const void* const* inputs, void* const* outputs);
  // Bytes held by the arena.
  int64_t arena_bytes() const;
  // Number of planned steps after fusion (for tests / introspection).
  int64_t num_steps() const;

  // Models with a dynamic sequence dim: selects the plan for `seq` (built on first use,
  // weights shared between plans; the last few plans are kept). Buffers of the previous
  // length are invalid afterwards. Static models accept any value and ignore it.
  void set_seq_len(int64_t seq);
  int64_t seq_len() const { return seq_; }
  bool dynamic() const { return dynamic_; }
  // Bytes per row / per-row shape of input or output i under the current sequence length.
  int64_t input_row_bytes(int i) const;
  int64_t output_row_bytes(int i) const;
  std::vector<int64_t> output_row_shape(int i) const;

 private:
  struct Plans;
  std::shared_ptr<const Model> model_;
  std::unique_ptr<Plans> plans_;
  PlanImpl* plan_ = nullptr;  // the current plan
  bool dynamic_ = false;
  int64_t seq_ = 0;
  int64_t reserved_ = 0;
};

}  // namespace aimass::runtime
