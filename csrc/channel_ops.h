// Channel gather / scatter ops of s2h (torch.ops.s2h.*): shared declarations.
//
// Every op works on a *physical* 4-D view [O, A, I, B] of a dense tensor:
//   * dim 0 (O) is optionally gathered through a row index (gather_weight's out_index),
//   * dim 2 (I) is always gathered through the column index,
//   * A and B are carried along unchanged; B is the contiguous run that is copied as a block.
// gather_channels(x, index, dim) is the special case O = product of the physical dims before
// `dim`, A = 1, I = x.size(dim), B = product of the physical dims after it, with no row index.
// A channels-last activation gathered along C therefore has B = 1 (a "column" gather), an NCHW
// activation has B = H*W (a "row" gather).
//
// Memory formats: a contiguous input stays contiguous, a channels-last (3d) input stays
// channels-last (3d); any other layout (transposed, sliced, expanded, ...) is first copied to a
// contiguous tensor. The Python fake implementations in s2h/ops.py apply the same rule.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

namespace s2h {

// Error messages are built by string concatenation, not by c10::str's std::ostringstream: on
// the H200 host (GCC 13 build, torch 2.11) formatting an integer through an ostream inside this
// extension crashed (segfault in std::ostream::_M_insert<long>, called from a TORCH_CHECK's
// message) instead of raising the check's error. A single std::string argument reaches
// TORCH_CHECK's message unformatted.
inline void msg_part(std::string& s, const char* v) { s += v; }
inline void msg_part(std::string& s, const std::string& v) { s += v; }
template <typename T, typename = std::enable_if_t<std::is_integral<T>::value>>
inline void msg_part(std::string& s, T v) { s += std::to_string(v); }
inline void msg_part(std::string& s, at::IntArrayRef v) {
  s += "[";
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(v[i]);
  }
  s += "]";
}
template <typename... Args>
std::string msg(const Args&... args) {
  std::string s;
  (msg_part(s, args), ...);
  return s;
}

// Layout of one tensor as the kernels see it.
struct View4 {
  int64_t O = 1;  // outer extent (gathered through the row index when there is one)
  int64_t A = 1;  // middle extent, carried along
  int64_t I = 1;  // gathered extent
  int64_t B = 1;  // inner contiguous run (elements)
};

// "torch.float32"-style name of a dtype, the same text Python's str(dtype) gives.
std::string dtype_name(at::ScalarType t);

// Memory format kept for the output, and whether the input must be made contiguous first.
at::MemoryFormat kept_format(const at::Tensor& t, bool* needs_copy);

// The physical order of the logical dims of a tensor of `ndim` dims in `fmt`.
std::vector<int64_t> physical_order(int64_t ndim, at::MemoryFormat fmt);

// ---- argument checks (host side, before any kernel; the same text as the Python side) ----
// Each returns the normalised dim where relevant.
int64_t check_gather_channels(const at::Tensor& x, const at::Tensor& index, int64_t dim);
int64_t check_scatter_channels(const at::Tensor& grad, const at::Tensor& index, int64_t dim,
                               int64_t size);
void check_gather_weight(const at::Tensor& w, const at::Tensor& out_index,
                         const at::Tensor& in_index);
void check_scatter_weight(const at::Tensor& grad, const at::Tensor& out_index,
                          const at::Tensor& in_index, at::IntArrayRef full_shape);

// Range check of an index's values against [0, size): throws IndexError with the op, argument
// name and dim in the message. `min_value`/`max_value` come from the caller (host scan on CPU,
// one reduction on CUDA).
void throw_if_out_of_range(const char* op, const char* name, int64_t dim, int64_t size,
                           int64_t min_value, int64_t max_value);

// Host-side scan of a CPU index (int32 / int64, any layout): min and max. Empty -> (0, -1).
std::pair<int64_t, int64_t> cpu_index_min_max(const at::Tensor& index);

// ---- CUDA range-check policy (see channel_ops.cpp for why) ----
enum class IndexCheck : int { kOff = 0, kCached = 1, kAlways = 2 };
IndexCheck index_check_mode();
void set_index_check_mode(IndexCheck mode);
// Cache of already validated index tensors: lookup returns true and fills min/max when `index`
// (same TensorImpl, same version, same data) was validated before.
bool index_cache_lookup(const at::Tensor& index, int64_t* min_value, int64_t* max_value);
void index_cache_insert(const at::Tensor& index, int64_t min_value, int64_t max_value);
void index_cache_clear();
int64_t index_cache_size();

// Stable inverse of an index on the host: for a target extent `size`, offsets (size + 1) and
// perm (numel) such that perm[offsets[j] .. offsets[j+1]) lists, in increasing order, the
// positions k with index[k] == j. Values outside [0, size) are left out.
void cpu_inverse_index(const at::Tensor& index, int64_t size, std::vector<int64_t>* offsets,
                       std::vector<int64_t>* perm);

// One index argument of an op, for the range check.
struct IndexArg {
  const char* name;
  at::Tensor index;
  int64_t dim;   // the dim of the indexed tensor it indexes (for the message)
  int64_t size;  // the extent of that dim: entries must lie in [0, size)
};

// Range check under the policy above, for indices on any device: cached entries are free, the
// others cost one reduction per index and a single device-to-host copy for all of them.
// `may_sync` = false (e.g. during CUDA graph capture) skips the indices not in the cache.
void check_index_ranges(const char* op, const std::vector<IndexArg>& args, bool may_sync);

// Layout decisions and output allocation shared by the CPU and CUDA implementations.
struct GatherPlan {
  at::Tensor src;  // the input, made contiguous when its layout is not kept
  at::Tensor out;  // allocated output, [Ko, A, Ki, B] physically
  View4 in;        // the input's view [O, A, I, B]
  int64_t Ko = 0;  // output extent of the row dim (== in.O when there is no row index)
  int64_t Ki = 0;  // output extent of the gathered dim
};
struct ScatterPlan {
  at::Tensor src;    // grad, made contiguous when its layout is not kept
  at::Tensor out;    // allocated output, [O, A, I, B] physically
  View4 out_view;    // the output's view
  int64_t Ko = 0;    // grad extent of the row dim
  int64_t Ki = 0;    // grad extent of the scattered dim
};
GatherPlan plan_gather_channels(const at::Tensor& x, int64_t dim, int64_t K);
GatherPlan plan_gather_weight(const at::Tensor& w, int64_t Ko, int64_t Ki);
ScatterPlan plan_scatter_channels(const at::Tensor& grad, int64_t dim, int64_t size);
ScatterPlan plan_scatter_weight(const at::Tensor& grad, at::IntArrayRef full_shape);

#ifdef S2H_WITH_CUDA
// Defined in channel_ops_cuda.cu.
int cuda_runtime_build_version();
#endif

}  // namespace s2h
