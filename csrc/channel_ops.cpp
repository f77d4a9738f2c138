// Channel gather / scatter ops of s2h: schemas (TORCH_LIBRARY), argument checks, the CPU
// implementations and the small pybind11 module s2h._C (build information, range-check policy).
//
// Semantics (see also s2h/ops.py, which holds the fake implementations and the autograd):
//   gather_channels(x, index, dim)         == x.index_select(dim, index)
//   gather_weight(w, out_index, in_index)  == w[out_index][:, in_index]          (one pass)
//   scatter_channels(grad, index, dim, size): zeros of grad's shape with size at `dim`, plus
//       grad's slices added at `index` (the backward of gather_channels)
//   scatter_weight(grad, out_index, in_index, full_shape): zeros(full_shape) plus grad added at
//       [out_index][:, in_index] (the backward of gather_weight)
// Scatters are deterministic: every output element is written by exactly one thread, which
// sums the contributions of repeated indices in increasing index position, accumulating in
// float (double for float64) -- the same order and the same rounding on CPU and CUDA.
#include "channel_ops.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/extension.h>
#include <torch/library.h>
#if __has_include(<torch/version.h>)
#include <torch/version.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

#ifndef S2H_VERSION
#define S2H_VERSION "unknown"
#endif
#ifndef S2H_CUDA_ARCHS
#define S2H_CUDA_ARCHS ""
#endif

namespace s2h {

// ---------------------------------------------------------------------------------------------
// Names and layouts
// ---------------------------------------------------------------------------------------------

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(t);
  }
}

at::MemoryFormat kept_format(const at::Tensor& t, bool* needs_copy) {
  *needs_copy = false;
  if (t.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  if (t.dim() == 5 && t.is_contiguous(at::MemoryFormat::ChannelsLast3d)) {
    return at::MemoryFormat::ChannelsLast3d;
  }
  *needs_copy = true;  // any other layout: one contiguous copy, documented in the docstrings
  return at::MemoryFormat::Contiguous;
}

std::vector<int64_t> physical_order(int64_t ndim, at::MemoryFormat fmt) {
  std::vector<int64_t> order;
  if (fmt == at::MemoryFormat::ChannelsLast || fmt == at::MemoryFormat::ChannelsLast3d) {
    order.push_back(0);
    for (int64_t d = 2; d < ndim; ++d) order.push_back(d);
    order.push_back(1);
  } else {
    for (int64_t d = 0; d < ndim; ++d) order.push_back(d);
  }
  return order;
}

// ---------------------------------------------------------------------------------------------
// Argument checks. The text of every message is mirrored in s2h/ops.py (_check_* functions),
// which serve as the fake implementations and as the checks of the pure-PyTorch fallback.
// Exception types: TypeError (dtype), ValueError (shapes), IndexError (dim / index values),
// RuntimeError (devices) -- the types PyTorch itself uses for these cases.
// ---------------------------------------------------------------------------------------------

namespace {

void check_index_arg(const char* op, const char* tname, const at::Tensor& t, const char* name,
                     const at::Tensor& index) {
  TORCH_CHECK(index.device() == t.device(), s2h::msg(op, ": ", tname, " and ", name,
              " must be on the same device, got ", t.device().str(), " and ",
              index.device().str()));
  TORCH_CHECK_TYPE(index.scalar_type() == at::kInt || index.scalar_type() == at::kLong, s2h::msg(op, ": ",
                   name, " must be an int32 or int64 tensor, got ",
                   dtype_name(index.scalar_type())));
  TORCH_CHECK_VALUE(index.dim() == 1, s2h::msg(op, ": ", name, " must be 1-D, got a ", index.dim(),
                    "-D tensor"));
}

void check_float_grad(const char* op, const at::Tensor& grad) {
  const auto t = grad.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, s2h::msg(op, ": grad must be float64, float32, float16 or bfloat16, got ",
                   dtype_name(t)));
}

int64_t wrap_dim(const char* op, const char* tname, const at::Tensor& t, int64_t dim) {
  const int64_t n = t.dim();
  TORCH_CHECK_VALUE(n >= 1, s2h::msg(op, ": ", tname, " must have at least one dimension, got a 0-D tensor"));
  TORCH_CHECK_INDEX(dim >= -n && dim < n, s2h::msg(op, ": dim ", dim, " is out of range for a ", n,
                    "-D tensor (expected ", -n, " to ", n - 1, ")"));
  return dim < 0 ? dim + n : dim;
}

}  // namespace

int64_t check_gather_channels(const at::Tensor& x, const at::Tensor& index, int64_t dim) {
  const char* op = "s2h.gather_channels";
  dim = wrap_dim(op, "x", x, dim);
  check_index_arg(op, "x", x, "index", index);
  return dim;
}

int64_t check_scatter_channels(const at::Tensor& grad, const at::Tensor& index, int64_t dim,
                               int64_t size) {
  const char* op = "s2h.scatter_channels";
  dim = wrap_dim(op, "grad", grad, dim);
  check_index_arg(op, "grad", grad, "index", index);
  check_float_grad(op, grad);
  TORCH_CHECK_VALUE(size >= 0, s2h::msg(op, ": size must be >= 0, got ", size));
  TORCH_CHECK_VALUE(grad.size(dim) == index.numel(), s2h::msg(op, ": grad.size(", dim, ") is ",
                    grad.size(dim), " but index has ", index.numel(), " entries"));
  return dim;
}

void check_gather_weight(const at::Tensor& w, const at::Tensor& out_index,
                         const at::Tensor& in_index) {
  const char* op = "s2h.gather_weight";
  TORCH_CHECK_VALUE(w.dim() >= 2, s2h::msg(op, ": w must have at least 2 dims (out, in, ...), got a ",
                    w.dim(), "-D tensor"));
  check_index_arg(op, "w", w, "out_index", out_index);
  check_index_arg(op, "w", w, "in_index", in_index);
}

void check_scatter_weight(const at::Tensor& grad, const at::Tensor& out_index,
                          const at::Tensor& in_index, at::IntArrayRef full_shape) {
  const char* op = "s2h.scatter_weight";
  TORCH_CHECK_VALUE(grad.dim() >= 2, s2h::msg(op,
                    ": grad must have at least 2 dims (out, in, ...), got a ", grad.dim(),
                    "-D tensor"));
  check_index_arg(op, "grad", grad, "out_index", out_index);
  check_index_arg(op, "grad", grad, "in_index", in_index);
  check_float_grad(op, grad);
  TORCH_CHECK_VALUE(static_cast<int64_t>(full_shape.size()) == grad.dim(), s2h::msg(op, ": full_shape has ",
                    full_shape.size(), " entries but grad has ", grad.dim(), " dims"));
  TORCH_CHECK_VALUE(full_shape[0] >= 0 && full_shape[1] >= 0, s2h::msg(op,
                    ": full_shape must not be negative, got ", full_shape));
  for (int64_t d = 2; d < grad.dim(); ++d) {
    TORCH_CHECK_VALUE(full_shape[d] == grad.size(d), s2h::msg(op, ": full_shape[", d, "] is ",
                      full_shape[d], " but grad.size(", d, ") is ", grad.size(d)));
  }
  TORCH_CHECK_VALUE(grad.size(0) == out_index.numel(), s2h::msg(op, ": grad.size(0) is ", grad.size(0),
                    " but out_index has ", out_index.numel(), " entries"));
  TORCH_CHECK_VALUE(grad.size(1) == in_index.numel(), s2h::msg(op, ": grad.size(1) is ", grad.size(1),
                    " but in_index has ", in_index.numel(), " entries"));
}

void throw_if_out_of_range(const char* op, const char* name, int64_t dim, int64_t size,
                           int64_t min_value, int64_t max_value) {
  TORCH_CHECK_INDEX(min_value >= 0, s2h::msg(op, ": ", name, " contains a negative entry (", min_value,
                    "); entries must lie in [0, ", size, ") for dim ", dim));
  TORCH_CHECK_INDEX(max_value < size, s2h::msg(op, ": ", name, " entry ", max_value,
                    " is out of range; entries must lie in [0, ", size, ") for dim ", dim));
}

std::pair<int64_t, int64_t> cpu_index_min_max(const at::Tensor& index) {
  const at::Tensor idx = index.contiguous();
  const int64_t n = idx.numel();
  if (n == 0) return {0, -1};
  int64_t lo = 0, hi = 0;
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "s2h_index_min_max", [&] {
    const index_t* p = idx.const_data_ptr<index_t>();
    lo = hi = static_cast<int64_t>(p[0]);
    for (int64_t k = 1; k < n; ++k) {
      const int64_t v = static_cast<int64_t>(p[k]);
      lo = std::min(lo, v);
      hi = std::max(hi, v);
    }
  });
  return {lo, hi};
}

void cpu_inverse_index(const at::Tensor& index, int64_t size, std::vector<int64_t>* offsets,
                       std::vector<int64_t>* perm) {
  const at::Tensor idx = index.to(at::kLong).contiguous();
  const int64_t n = idx.numel();
  const int64_t* p = idx.const_data_ptr<int64_t>();
  offsets->assign(size + 1, 0);
  for (int64_t k = 0; k < n; ++k) {
    if (p[k] >= 0 && p[k] < size) (*offsets)[p[k] + 1] += 1;
  }
  for (int64_t j = 0; j < size; ++j) (*offsets)[j + 1] += (*offsets)[j];
  perm->assign((*offsets)[size], 0);
  std::vector<int64_t> cursor(offsets->begin(), offsets->end() - 1);
  for (int64_t k = 0; k < n; ++k) {  // increasing k: a stable counting sort
    if (p[k] >= 0 && p[k] < size) (*perm)[cursor[p[k]]++] = k;
  }
}

// ---------------------------------------------------------------------------------------------
// CUDA range-check policy.
//
// A clear error for a bad index needs the index's min / max on the host. On CPU that scan is
// free. On CUDA it is one tiny reduction plus a device-to-host copy, i.e. a host sync, which
// the common path must not pay on every call. What we chose (S2H_INDEX_CHECK, or
// s2h.ops.set_index_check):
//   * "cached" (default): the min / max of an index tensor is computed once (one reduction
//     and one sync for all index arguments of the call) and remembered for that tensor
//     object; later calls with the same index tensor, unmodified (same version counter, data
//     pointer and shape), pay nothing. The pruner builds a group's kept-index tensor once
//     per width change and reuses it in every layer, forward and backward, so the steady
//     state is sync-free while bad input still gets a clear host-side error.
//   * "always": the reduction + sync on every call (debugging).
//   * "off": no range check on CUDA. The kernels never read or write out of bounds anyway:
//     an out-of-range entry gives zeros in a gather and is dropped by a scatter -- wrong
//     values, but never a device assert or a memory fault.
// Inference tensors have no version counter and are therefore never cached ("cached"
// behaves as "always" for them). During CUDA graph capture no sync is possible: the check
// is skipped for indices not in the cache. Writes that bypass the version counter
// (tensor.data.copy_(...)) are not seen by the cache: use "always" when doing that.
// ---------------------------------------------------------------------------------------------

namespace {

int mode_from_env() {
  const char* env = std::getenv("S2H_INDEX_CHECK");
  if (env == nullptr) return static_cast<int>(IndexCheck::kCached);
  const std::string v(env);
  if (v == "off" || v == "0" || v == "none") return static_cast<int>(IndexCheck::kOff);
  if (v == "always" || v == "sync" || v == "2") return static_cast<int>(IndexCheck::kAlways);
  return static_cast<int>(IndexCheck::kCached);
}

std::atomic<int>& mode_slot() {
  static std::atomic<int> slot{mode_from_env()};
  return slot;
}

struct CacheEntry {
  // The weak reference keeps the TensorImpl object (not its storage) alive, so its address
  // cannot be reused by another tensor while the entry exists: the key stays unambiguous.
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> impl;
  uint32_t version;
  const void* data;
  int64_t numel;
  int64_t stride;
  int64_t min_value;
  int64_t max_value;
};

constexpr size_t kCacheCapacity = 4096;

std::mutex& cache_mutex() {
  static std::mutex m;
  return m;
}

std::unordered_map<const c10::TensorImpl*, CacheEntry>& cache_map() {
  static auto* map = new std::unordered_map<const c10::TensorImpl*, CacheEntry>();
  return *map;  // leaked on purpose: no destruction-order issues at interpreter exit
}

bool cacheable(const at::Tensor& index) {
  return !index.is_inference() && index.unsafeGetTensorImpl()->version_counter().enabled();
}

}  // namespace

IndexCheck index_check_mode() { return static_cast<IndexCheck>(mode_slot().load()); }

void set_index_check_mode(IndexCheck mode) { mode_slot().store(static_cast<int>(mode)); }

bool index_cache_lookup(const at::Tensor& index, int64_t* min_value, int64_t* max_value) {
  if (!cacheable(index)) return false;
  const c10::TensorImpl* key = index.unsafeGetTensorImpl();
  const uint32_t version = key->version_counter().current_version();
  std::lock_guard<std::mutex> lock(cache_mutex());
  auto& map = cache_map();
  auto it = map.find(key);
  if (it == map.end()) return false;
  const CacheEntry& e = it->second;
  if (e.version != version || e.data != index.const_data_ptr() || e.numel != index.numel() ||
      e.stride != index.stride(0)) {
    map.erase(it);
    return false;
  }
  *min_value = e.min_value;
  *max_value = e.max_value;
  return true;
}

void index_cache_insert(const at::Tensor& index, int64_t min_value, int64_t max_value) {
  if (!cacheable(index) || index_check_mode() != IndexCheck::kCached) return;
  const c10::TensorImpl* key = index.unsafeGetTensorImpl();
  CacheEntry e{c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(
                   index.getIntrusivePtr()),
               key->version_counter().current_version(),
               index.const_data_ptr(),
               index.numel(),
               index.stride(0),
               min_value,
               max_value};
  std::lock_guard<std::mutex> lock(cache_mutex());
  auto& map = cache_map();
  if (map.size() >= kCacheCapacity) {
    for (auto it = map.begin(); it != map.end();) {
      it = it->second.impl.expired() ? map.erase(it) : std::next(it);
    }
    if (map.size() >= kCacheCapacity) map.clear();
  }
  map.insert_or_assign(key, std::move(e));
}

void index_cache_clear() {
  std::lock_guard<std::mutex> lock(cache_mutex());
  cache_map().clear();
}

int64_t index_cache_size() {
  std::lock_guard<std::mutex> lock(cache_mutex());
  return static_cast<int64_t>(cache_map().size());
}

void check_index_ranges(const char* op, const std::vector<IndexArg>& args, bool may_sync) {
  const IndexCheck mode = index_check_mode();
  if (mode == IndexCheck::kOff) return;
  const size_t n = args.size();
  std::vector<int64_t> lo(n, 0), hi(n, -1);
  std::vector<bool> known(n, false);
  std::vector<at::Tensor> stats;
  std::vector<size_t> pending;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& idx = args[i].index;
    if (idx.numel() == 0) {
      known[i] = true;
    } else if (mode == IndexCheck::kCached && index_cache_lookup(idx, &lo[i], &hi[i])) {
      known[i] = true;
    } else if (may_sync) {
      auto mm = at::aminmax(idx);
      stats.push_back(std::get<0>(mm).to(at::kLong).reshape({1}));
      stats.push_back(std::get<1>(mm).to(at::kLong).reshape({1}));
      pending.push_back(i);
    }
  }
  if (!pending.empty()) {
    const at::Tensor host = at::cat(stats).cpu();  // the one sync of this call
    const int64_t* h = host.const_data_ptr<int64_t>();
    for (size_t q = 0; q < pending.size(); ++q) {
      const size_t i = pending[q];
      lo[i] = h[2 * q];
      hi[i] = h[2 * q + 1];
      known[i] = true;
    }
  }
  for (size_t i = 0; i < n; ++i) {  // messages in argument order, as on the Python side
    if (known[i] && args[i].index.numel() > 0) {
      throw_if_out_of_range(op, args[i].name, args[i].dim, args[i].size, lo[i], hi[i]);
    }
  }
  for (size_t q = 0; q < pending.size(); ++q) {
    const size_t i = pending[q];
    index_cache_insert(args[i].index, lo[i], hi[i]);
  }
}

// ---------------------------------------------------------------------------------------------
// CPU kernels
// ---------------------------------------------------------------------------------------------

namespace {

struct Bytes16 {
  uint64_t lo, hi;
};

// out[k1, a, k2, :] = in[row(k1), a, col[k2], :] on the [O, A, I, B] view of `in`,
// where the output is [Ko, A, Ki, B]; rows of B elements of `es` bytes.
void gather_rows_cpu(const char* in, char* out, const int64_t* row, const int64_t* col,
                     const View4& v, int64_t Ko, int64_t Ki, int64_t es) {
  const int64_t nrows = Ko * v.A * Ki;
  const int64_t row_bytes = v.B * es;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(row_bytes, 1));
  at::parallel_for(0, nrows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t k2 = r % Ki;
      const int64_t t = r / Ki;
      const int64_t a = t % v.A;
      const int64_t k1 = t / v.A;
      const int64_t i1 = row ? row[k1] : k1;
      std::memcpy(out + r * row_bytes, in + ((i1 * v.A + a) * v.I + col[k2]) * row_bytes,
                  row_bytes);
    }
  });
}

// B == 1: out[k1, a, k2] = in[row(k1), a, col[k2]], parallel over flat output elements.
template <typename elem_t>
void gather_cols_cpu(const elem_t* in, elem_t* out, const int64_t* row, const int64_t* col,
                     const View4& v, int64_t Ko, int64_t Ki) {
  const int64_t total = Ko * v.A * Ki;
  at::parallel_for(0, total, 32768, [&](int64_t begin, int64_t end) {
    int64_t r = begin / Ki;  // output row (k1, a)
    int64_t k2 = begin % Ki;
    auto src_of = [&](int64_t rr) {
      const int64_t a = rr % v.A;
      const int64_t k1 = rr / v.A;
      const int64_t i1 = row ? row[k1] : k1;
      return in + (i1 * v.A + a) * v.I;
    };
    const elem_t* src = src_of(r);
    for (int64_t t = begin; t < end; ++t) {
      out[t] = src[col[k2]];
      if (++k2 == Ki) {
        k2 = 0;
        ++r;
        if (t + 1 < end) src = src_of(r);
      }
    }
  });
}

void gather_cpu(const at::Tensor& src, at::Tensor& out, const View4& v, int64_t Ko, int64_t Ki,
                const at::Tensor& row_index, const at::Tensor& col_index) {
  if (out.numel() == 0) return;
  const at::Tensor col = col_index.to(at::kLong).contiguous();
  at::Tensor row;
  if (row_index.defined()) row = row_index.to(at::kLong).contiguous();
  const int64_t* rowp = row.defined() ? row.const_data_ptr<int64_t>() : nullptr;
  const int64_t* colp = col.const_data_ptr<int64_t>();
  const int64_t es = static_cast<int64_t>(src.element_size());
  const char* in = static_cast<const char*>(src.const_data_ptr());
  char* o = static_cast<char*>(out.data_ptr());
  if (v.B == 1) {
    switch (es) {
      case 1:
        return gather_cols_cpu(reinterpret_cast<const uint8_t*>(in), reinterpret_cast<uint8_t*>(o),
                               rowp, colp, v, Ko, Ki);
      case 2:
        return gather_cols_cpu(reinterpret_cast<const uint16_t*>(in),
                               reinterpret_cast<uint16_t*>(o), rowp, colp, v, Ko, Ki);
      case 4:
        return gather_cols_cpu(reinterpret_cast<const uint32_t*>(in),
                               reinterpret_cast<uint32_t*>(o), rowp, colp, v, Ko, Ki);
      case 8:
        return gather_cols_cpu(reinterpret_cast<const uint64_t*>(in),
                               reinterpret_cast<uint64_t*>(o), rowp, colp, v, Ko, Ki);
      case 16:
        return gather_cols_cpu(reinterpret_cast<const Bytes16*>(in),
                               reinterpret_cast<Bytes16*>(o), rowp, colp, v, Ko, Ki);
      default:
        break;
    }
  }
  gather_rows_cpu(in, o, rowp, colp, v, Ko, Ki, es);
}

// Output-oriented scatter: out[j1, a, j2, :] = sum over (k1, k2) with row(k1) == j1 and
// col[k2] == j2, in increasing (k1, k2), of grad[k1, a, k2, :]; zero where there is none.
// `v` is the output view [O, A, I, B]; grad is [Ko, A, Ki, B].
template <typename scalar_t>
void scatter_cpu_typed(const scalar_t* g, scalar_t* out, const View4& v, int64_t Ki,
                       const std::vector<int64_t>* row_off, const std::vector<int64_t>* row_perm,
                       const std::vector<int64_t>& col_off, const std::vector<int64_t>& col_perm) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nrows = v.O * v.A * v.I;
  const int64_t B = v.B;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(B, 1));
  at::parallel_for(0, nrows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t j2 = r % v.I;
      const int64_t t = r / v.I;
      const int64_t a = t % v.A;
      const int64_t j1 = t / v.A;
      int64_t r0 = j1, r1 = j1 + 1;  // positions in row_perm (or k1 itself without row index)
      if (row_off) {
        r0 = (*row_off)[j1];
        r1 = (*row_off)[j1 + 1];
      }
      const int64_t c0 = col_off[j2], c1 = col_off[j2 + 1];
      scalar_t* dst = out + r * B;
      const int64_t count = (r1 - r0) * (c1 - c0);
      auto grad_row = [&](int64_t rp, int64_t cp) {
        const int64_t k1 = row_off ? (*row_perm)[rp] : rp;
        return g + ((k1 * v.A + a) * Ki + col_perm[cp]) * B;
      };
      if (count == 0) {
        std::fill(dst, dst + B, scalar_t(0));
      } else if (count == 1) {
        std::memcpy(dst, grad_row(r0, c0), B * sizeof(scalar_t));
      } else {
        for (int64_t b = 0; b < B; ++b) {
          acc_t acc = acc_t(0);
          for (int64_t rp = r0; rp < r1; ++rp) {
            for (int64_t cp = c0; cp < c1; ++cp) acc += static_cast<acc_t>(grad_row(rp, cp)[b]);
          }
          dst[b] = static_cast<scalar_t>(acc);
        }
      }
    }
  });
}

void scatter_cpu(const at::Tensor& src, at::Tensor& out, const View4& v, int64_t Ki,
                 const at::Tensor& row_index, const at::Tensor& col_index) {
  if (out.numel() == 0) return;
  std::vector<int64_t> row_off, row_perm, col_off, col_perm;
  cpu_inverse_index(col_index, v.I, &col_off, &col_perm);
  if (row_index.defined()) cpu_inverse_index(row_index, v.O, &row_off, &row_perm);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "s2h_scatter_cpu",
                                  [&] {
                                    scatter_cpu_typed<scalar_t>(
                                        src.const_data_ptr<scalar_t>(),
                                        out.data_ptr<scalar_t>(), v, Ki,
                                        row_index.defined() ? &row_off : nullptr,
                                        row_index.defined() ? &row_perm : nullptr, col_off,
                                        col_perm);
                                  });
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Plans: layout decisions and output allocation, shared by the CPU and CUDA implementations.
// ---------------------------------------------------------------------------------------------

GatherPlan plan_gather_channels(const at::Tensor& x, int64_t dim, int64_t K) {
  bool copy = false;
  const at::MemoryFormat fmt = kept_format(x, &copy);
  GatherPlan p;
  p.src = copy ? x.contiguous() : x;
  const auto order = physical_order(x.dim(), fmt);
  const int64_t pos = std::find(order.begin(), order.end(), dim) - order.begin();
  for (int64_t q = 0; q < pos; ++q) p.in.O *= x.size(order[q]);
  for (int64_t q = pos + 1; q < x.dim(); ++q) p.in.B *= x.size(order[q]);
  p.in.A = 1;
  p.in.I = x.size(dim);
  p.Ko = p.in.O;
  p.Ki = K;
  auto sizes = x.sizes().vec();
  sizes[dim] = K;
  p.out = at::empty(sizes, x.options().memory_format(fmt));
  return p;
}

GatherPlan plan_gather_weight(const at::Tensor& w, int64_t Ko, int64_t Ki) {
  bool copy = false;
  const at::MemoryFormat fmt = kept_format(w, &copy);
  GatherPlan p;
  p.src = copy ? w.contiguous() : w;
  const auto order = physical_order(w.dim(), fmt);  // dim 0 always comes first
  const int64_t pos1 = std::find(order.begin(), order.end(), 1) - order.begin();
  p.in.O = w.size(0);
  for (int64_t q = 1; q < pos1; ++q) p.in.A *= w.size(order[q]);
  p.in.I = w.size(1);
  for (int64_t q = pos1 + 1; q < w.dim(); ++q) p.in.B *= w.size(order[q]);
  p.Ko = Ko;
  p.Ki = Ki;
  auto sizes = w.sizes().vec();
  sizes[0] = Ko;
  sizes[1] = Ki;
  p.out = at::empty(sizes, w.options().memory_format(fmt));
  return p;
}

ScatterPlan plan_scatter_channels(const at::Tensor& grad, int64_t dim, int64_t size) {
  bool copy = false;
  const at::MemoryFormat fmt = kept_format(grad, &copy);
  ScatterPlan p;
  p.src = copy ? grad.contiguous() : grad;
  const auto order = physical_order(grad.dim(), fmt);
  const int64_t pos = std::find(order.begin(), order.end(), dim) - order.begin();
  for (int64_t q = 0; q < pos; ++q) p.out_view.O *= grad.size(order[q]);
  for (int64_t q = pos + 1; q < grad.dim(); ++q) p.out_view.B *= grad.size(order[q]);
  p.out_view.A = 1;
  p.out_view.I = size;
  p.Ko = p.out_view.O;
  p.Ki = grad.size(dim);
  auto sizes = grad.sizes().vec();
  sizes[dim] = size;
  p.out = at::empty(sizes, grad.options().memory_format(fmt));
  return p;
}

ScatterPlan plan_scatter_weight(const at::Tensor& grad, at::IntArrayRef full_shape) {
  bool copy = false;
  const at::MemoryFormat fmt = kept_format(grad, &copy);
  ScatterPlan p;
  p.src = copy ? grad.contiguous() : grad;
  const auto order = physical_order(grad.dim(), fmt);
  const int64_t pos1 = std::find(order.begin(), order.end(), 1) - order.begin();
  p.out_view.O = full_shape[0];
  for (int64_t q = 1; q < pos1; ++q) p.out_view.A *= grad.size(order[q]);
  p.out_view.I = full_shape[1];
  for (int64_t q = pos1 + 1; q < grad.dim(); ++q) p.out_view.B *= grad.size(order[q]);
  p.Ko = grad.size(0);
  p.Ki = grad.size(1);
  p.out = at::empty(full_shape, grad.options().memory_format(fmt));
  return p;
}

// ---------------------------------------------------------------------------------------------
// CPU ops
// ---------------------------------------------------------------------------------------------

namespace {

void check_range_cpu(const char* op, const char* name, const at::Tensor& index, int64_t dim,
                     int64_t size) {
  if (index.numel() == 0) return;
  const auto mm = cpu_index_min_max(index);
  throw_if_out_of_range(op, name, dim, size, mm.first, mm.second);
}

at::Tensor gather_channels_cpu(const at::Tensor& x, const at::Tensor& index, int64_t dim) {
  dim = check_gather_channels(x, index, dim);
  check_range_cpu("s2h.gather_channels", "index", index, dim, x.size(dim));
  GatherPlan p = plan_gather_channels(x, dim, index.numel());
  gather_cpu(p.src, p.out, p.in, p.Ko, p.Ki, at::Tensor(), index);
  return p.out;
}

at::Tensor gather_weight_cpu(const at::Tensor& w, const at::Tensor& out_index,
                             const at::Tensor& in_index) {
  check_gather_weight(w, out_index, in_index);
  check_range_cpu("s2h.gather_weight", "out_index", out_index, 0, w.size(0));
  check_range_cpu("s2h.gather_weight", "in_index", in_index, 1, w.size(1));
  GatherPlan p = plan_gather_weight(w, out_index.numel(), in_index.numel());
  gather_cpu(p.src, p.out, p.in, p.Ko, p.Ki, out_index, in_index);
  return p.out;
}

at::Tensor scatter_channels_cpu(const at::Tensor& grad, const at::Tensor& index, int64_t dim,
                                c10::SymInt size_sym) {
  const int64_t size = size_sym.expect_int();
  dim = check_scatter_channels(grad, index, dim, size);
  check_range_cpu("s2h.scatter_channels", "index", index, dim, size);
  ScatterPlan p = plan_scatter_channels(grad, dim, size);
  scatter_cpu(p.src, p.out, p.out_view, p.Ki, at::Tensor(), index);
  return p.out;
}

at::Tensor scatter_weight_cpu(const at::Tensor& grad, const at::Tensor& out_index,
                              const at::Tensor& in_index, c10::SymIntArrayRef full_shape_sym) {
  const auto full_shape = C10_AS_INTARRAYREF_SLOW(full_shape_sym);
  check_scatter_weight(grad, out_index, in_index, full_shape);
  check_range_cpu("s2h.scatter_weight", "out_index", out_index, 0, full_shape[0]);
  check_range_cpu("s2h.scatter_weight", "in_index", in_index, 1, full_shape[1]);
  ScatterPlan p = plan_scatter_weight(grad, full_shape);
  scatter_cpu(p.src, p.out, p.out_view, p.Ki, out_index, in_index);
  return p.out;
}

// The backward of y = x * mask, mask (C,) along `dim` of x: grad_x = grad * mask (when
// need_grad_x) and grad_mask[c] = sum of grad * x over every other dim, in one pass over grad
// and x (a multiply and a multiply-and-reduce take three passes; issue 16 measured them as the
// largest cost of the CPU S2H step above its floor). grad and x are viewed as (outer, C,
// inner), contiguous; the per-channel sums accumulate in double for float32 (float64 stays
// float64, as the op math type gives). Without need_grad_x the first output is empty.
template <typename scalar_t>
void channel_mask_backward_kernel(const scalar_t* g, const scalar_t* x, const scalar_t* m,
                                  scalar_t* gx, scalar_t* gm, int64_t outer, int64_t C,
                                  int64_t inner) {
  using acc_t = double;
  if (inner == 1) {  // channels last: vectorise across channels, one block of them per task
    at::parallel_for(0, C, 256, [&](int64_t c0, int64_t c1) {
      std::vector<acc_t> acc(c1 - c0, 0);
      for (int64_t o = 0; o < outer; ++o) {
        const scalar_t* go = g + o * C;
        const scalar_t* xo = x + o * C;
        scalar_t* out = gx != nullptr ? gx + o * C : nullptr;
        for (int64_t c = c0; c < c1; ++c) {
          acc[c - c0] += static_cast<acc_t>(go[c]) * static_cast<acc_t>(xo[c]);
          if (out != nullptr) out[c] = go[c] * m[c];
        }
      }
      for (int64_t c = c0; c < c1; ++c) gm[c] = static_cast<scalar_t>(acc[c - c0]);
    });
    return;
  }
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const scalar_t mc = m[c];
      acc_t acc = 0;
      for (int64_t o = 0; o < outer; ++o) {
        const int64_t base = (o * C + c) * inner;
        const scalar_t* gp = g + base;
        const scalar_t* xp = x + base;
        scalar_t s = 0;  // one plane in the tensor's type, the planes in double
        if (gx != nullptr) {
          scalar_t* op = gx + base;
#pragma omp simd reduction(+ : s)
          for (int64_t i = 0; i < inner; ++i) {
            const scalar_t v = gp[i];
            op[i] = v * mc;
            s += v * xp[i];
          }
        } else {
#pragma omp simd reduction(+ : s)
          for (int64_t i = 0; i < inner; ++i) s += gp[i] * xp[i];
        }
        acc += static_cast<acc_t>(s);
      }
      gm[c] = static_cast<scalar_t>(acc);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> channel_mask_backward_cpu(const at::Tensor& grad,
                                                             const at::Tensor& x,
                                                             const at::Tensor& mask, int64_t dim,
                                                             bool need_grad_x) {
  TORCH_CHECK(grad.sizes() == x.sizes(), s2h::msg("s2h.channel_mask_backward: grad has shape ",
              grad.sizes(), ", x has ", x.sizes()));
  TORCH_CHECK(grad.scalar_type() == x.scalar_type() && mask.scalar_type() == x.scalar_type(),
              "s2h.channel_mask_backward: grad, x and mask must have one dtype");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, s2h::msg("s2h.channel_mask_backward: float32 or float64 only, got ",
              dtype_name(x.scalar_type())));
  TORCH_CHECK(x.dim() >= 1, "s2h.channel_mask_backward: x must have a dim");
  dim = c10::maybe_wrap_dim(dim, x.dim());
  const int64_t C = x.size(dim);
  TORCH_CHECK(mask.dim() == 1 && mask.size(0) == C, s2h::msg("s2h.channel_mask_backward: mask must be (",
              C, ",), got ", mask.sizes()));
  const at::Tensor g = grad.contiguous();
  const at::Tensor xc = x.contiguous();
  const at::Tensor mc = mask.contiguous();
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < dim; ++d) outer *= x.size(d);
  for (int64_t d = dim + 1; d < x.dim(); ++d) inner *= x.size(d);
  at::Tensor gx = need_grad_x ? at::empty_like(g) : at::empty({0}, x.options());
  at::Tensor gm = at::empty({C}, x.options());
  if (x.numel() == 0) return {gx, gm.zero_()};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "s2h_channel_mask_backward", [&] {
    channel_mask_backward_kernel<scalar_t>(
        g.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), mc.data_ptr<scalar_t>(),
        need_grad_x ? gx.data_ptr<scalar_t>() : nullptr, gm.data_ptr<scalar_t>(), outer, C,
        inner);
  });
  return {gx, gm};
}

}  // namespace

}  // namespace s2h

// ---------------------------------------------------------------------------------------------
// Registration
// ---------------------------------------------------------------------------------------------

TORCH_LIBRARY(s2h, m) {
  // Fake (meta) implementations and autograd live in s2h/ops.py.
  m.set_python_module("s2h.ops");
  m.def("gather_channels(Tensor x, Tensor index, int dim) -> Tensor");
  m.def("gather_weight(Tensor w, Tensor out_index, Tensor in_index) -> Tensor");
  m.def("scatter_channels(Tensor grad, Tensor index, int dim, SymInt size) -> Tensor");
  m.def(
      "scatter_weight(Tensor grad, Tensor out_index, Tensor in_index, SymInt[] full_shape) -> "
      "Tensor");
  m.def(
      "channel_mask_backward(Tensor grad, Tensor x, Tensor mask, int dim, bool need_grad_x) -> "
      "(Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(s2h, CPU, m) {
  m.impl("channel_mask_backward", &s2h::channel_mask_backward_cpu);
  m.impl("gather_channels", &s2h::gather_channels_cpu);
  m.impl("gather_weight", &s2h::gather_weight_cpu);
  m.impl("scatter_channels", &s2h::scatter_channels_cpu);
  m.impl("scatter_weight", &s2h::scatter_weight_cpu);
}

// ---------------------------------------------------------------------------------------------
// Python module s2h._C: what was built, and the CUDA range-check policy.
// ---------------------------------------------------------------------------------------------

namespace {

const char* mode_name(s2h::IndexCheck m) {
  switch (m) {
    case s2h::IndexCheck::kOff: return "off";
    case s2h::IndexCheck::kAlways: return "always";
    default: return "cached";
  }
}

pybind11::dict build_info() {
  pybind11::dict d;
  d["version"] = S2H_VERSION;
#ifdef S2H_WITH_CUDA
  d["with_cuda"] = true;
  const int rt = s2h::cuda_runtime_build_version();
  d["cuda_runtime"] = std::to_string(rt / 1000) + "." + std::to_string((rt % 1000) / 10);
#else
  d["with_cuda"] = false;
  d["cuda_runtime"] = pybind11::none();
#endif
  d["cuda_archs"] = std::string(S2H_CUDA_ARCHS);
#ifdef TORCH_VERSION_MAJOR
  d["torch"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) +
               "." + std::to_string(TORCH_VERSION_PATCH);
#else
  d["torch"] = pybind11::none();
#endif
#ifdef _OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  pybind11::list ops;
  for (const char* name : {"gather_channels", "gather_weight", "scatter_channels",
                           "scatter_weight"}) {
    ops.append(name);
  }
  d["ops"] = ops;
  d["index_check"] = mode_name(s2h::index_check_mode());
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "s2h channel gather / scatter ops (registered as torch.ops.s2h.*)";
  m.def("build_info", &build_info, "What this extension was built with (dict).");
  m.def(
      "set_index_check",
      [](const std::string& mode) {
        if (mode == "off") {
          s2h::set_index_check_mode(s2h::IndexCheck::kOff);
        } else if (mode == "cached") {
          s2h::set_index_check_mode(s2h::IndexCheck::kCached);
        } else if (mode == "always") {
          s2h::set_index_check_mode(s2h::IndexCheck::kAlways);
        } else {
          TORCH_CHECK_VALUE(false, s2h::msg("s2h.set_index_check: mode must be 'cached', 'always' or "
                                   "'off', got '", mode, "'"));
        }
        s2h::index_cache_clear();
      },
      "CUDA index range-check policy: 'cached' (default), 'always' or 'off'.");
  m.def("get_index_check", []() { return std::string(mode_name(s2h::index_check_mode())); });
  m.def("index_cache_size", &s2h::index_cache_size);
  m.def(
      "_check_index_range",
      [](const at::Tensor& index, int64_t size) {
        s2h::check_index_ranges("s2h._check_index_range", {{"index", index, 0, size}}, true);
      },
      "Test hook: the CUDA range-check path (policy + cache) applied to a tensor on any device.");
  m.def("index_cache_clear", &s2h::index_cache_clear);
}
