// CUDA implementations of the s2h channel ops (schemas and checks: channel_ops.cpp).
//
// Kernels work on the physical 4-D view [O, A, I, B] described in channel_ops.h.
//  * Gathers are pure copies, so they move bytes, not typed values: one kernel per copy unit.
//    - "row" path (B > 1): each output row of B elements is copied as units of 16 bytes when
//      the row width and both base pointers are 16-byte aligned (e.g. fp16 rows of a multiple
//      of 8 elements), else of the widest size (8 / 4 / 2 / 1 bytes) that divides them.
//    - "column" path (B == 1: channels-last activations, (..., C) tensors, linear weights):
//      each thread reads VEC gathered elements of one source row and writes them with one
//      16-byte store (VEC = 16 / element size) when the output row width is a multiple of
//      VEC; else one element per thread.
//    A group of G threads (a power of two up to the block size) shares one output row, so the
//    integer divisions that locate a row are paid once per row, not once per element.
//  * Scatters are output-oriented and deterministic: every output element is written by
//    exactly one thread, which sums the gradient entries mapped to it in increasing index
//    position (accumulating in float / double), found through a stable inverse of the index
//    (at::sort + one lower_bound kernel). No atomics, no separate zero fill.
//  * Everything runs on the current stream; the only host sync is the index range check when
//    an index tensor is seen for the first time (policy in channel_ops.cpp). Kernels never
//    read or write out of bounds even when the range check is off: out-of-range entries give
//    zeros (gathers) or are dropped (scatters). No device asserts.
#include "channel_ops.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace s2h {

int cuda_runtime_build_version() { return CUDART_VERSION; }

namespace {

constexpr int kThreads = 256;

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

struct alignas(16) Bytes16 {
  uint64_t lo, hi;
};

// Threads per output row: the smallest power of two covering the row's units, at most a block.
int group_size(int64_t units_per_row) {
  int g = 1;
  while (g < units_per_row && g < kThreads) g *= 2;
  return g;
}

// Streaming multiprocessors of the current device (queried once per device).
int sm_count() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices] = {};
  const int dev = c10::cuda::current_device();
  if (dev < 0 || dev >= kMaxDevices) return 132;
  int n = cache[dev].load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    cache[dev].store(n, std::memory_order_relaxed);
  }
  return n;
}

// Enough blocks to fill the device a few times over; the kernels grid-stride beyond that.
int grid_size(int64_t rows, int group) {
  const int64_t rows_per_block = kThreads / group;
  const int64_t needed = (rows + rows_per_block - 1) / rows_per_block;
  const int64_t cap = static_cast<int64_t>(sm_count()) * 16;
  return static_cast<int>(std::max<int64_t>(1, std::min(needed, cap)));
}

bool aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

bool may_sync() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None;
}

// ------------------------------------------------------------------------------------------
// Gather kernels
// ------------------------------------------------------------------------------------------

// out[r = (k1, a, k2), :] = in[(row(k1), a, col[k2]), :]; rows of Bu units.
template <typename unit_t, typename idx_t>
__global__ void gather_rows_kernel(const unit_t* __restrict__ in, unit_t* __restrict__ out,
                                   const idx_t* __restrict__ row, const idx_t* __restrict__ col,
                                   int64_t O, int64_t A, int64_t I, int64_t Ko, int64_t Ki,
                                   int64_t Bu, int G) {
  const int64_t nrows = Ko * A * Ki;
  const int lane = threadIdx.x % G;
  const int64_t groups_per_block = blockDim.x / G;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * groups_per_block;
  for (int64_t r = blockIdx.x * groups_per_block + threadIdx.x / G; r < nrows; r += stride) {
    const int64_t k2 = r % Ki;
    const int64_t t = r / Ki;
    const int64_t a = t % A;
    const int64_t k1 = t / A;
    const int64_t i1 = row ? static_cast<int64_t>(row[k1]) : k1;
    const int64_t i2 = static_cast<int64_t>(col[k2]);
    unit_t* dst = out + r * Bu;
    if (i1 >= 0 && i1 < O && i2 >= 0 && i2 < I) {
      const unit_t* src = in + ((i1 * A + a) * I + i2) * Bu;
      for (int64_t b = lane; b < Bu; b += G) dst[b] = src[b];
    } else {
      for (int64_t b = lane; b < Bu; b += G) dst[b] = unit_t{};
    }
  }
}

// B == 1: out[r = (k1, a), k2] = in[(row(k1), a), col[k2]]; VEC outputs per thread, one store.
template <typename elem_t, int VEC, typename idx_t>
__global__ void gather_cols_kernel(const elem_t* __restrict__ in, elem_t* __restrict__ out,
                                   const idx_t* __restrict__ row, const idx_t* __restrict__ col,
                                   int64_t O, int64_t A, int64_t I, int64_t Ko, int64_t Ki,
                                   int G) {
  using V = Vec<elem_t, VEC>;
  const int64_t nrows = Ko * A;
  const int64_t units = Ki / VEC;  // the host guarantees Ki % VEC == 0
  const int lane = threadIdx.x % G;
  const int64_t groups_per_block = blockDim.x / G;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * groups_per_block;
  for (int64_t r = blockIdx.x * groups_per_block + threadIdx.x / G; r < nrows; r += stride) {
    const int64_t a = r % A;
    const int64_t k1 = r / A;
    const int64_t i1 = row ? static_cast<int64_t>(row[k1]) : k1;
    const bool row_ok = i1 >= 0 && i1 < O;
    const elem_t* src = in + (row_ok ? (i1 * A + a) * I : 0);
    V* dst = reinterpret_cast<V*>(out + r * Ki);
    for (int64_t u = lane; u < units; u += G) {
      V v;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const int64_t i2 = static_cast<int64_t>(col[u * VEC + e]);
        v.v[e] = (row_ok && i2 >= 0 && i2 < I) ? src[i2] : elem_t{};
      }
      dst[u] = v;
    }
  }
}

template <typename idx_t>
void launch_gather(const GatherPlan& p, const idx_t* row, const idx_t* col) {
  const View4& v = p.in;
  const int64_t es = static_cast<int64_t>(p.src.element_size());
  const void* in = p.src.const_data_ptr();
  void* out = p.out.data_ptr();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  if (v.B == 1) {
    const int64_t nrows = p.Ko * v.A;
    const bool vec = es <= 16 && 16 % es == 0 && (p.Ki * es) % 16 == 0 && aligned(out, 16);
    auto go = [&](auto elem_tag, auto vec_tag) {
      using elem_t = decltype(elem_tag);
      constexpr int VEC = decltype(vec_tag)::value;
      const int G = group_size(p.Ki / VEC);
      gather_cols_kernel<elem_t, VEC, idx_t><<<grid_size(nrows, G), kThreads, 0, stream>>>(
          static_cast<const elem_t*>(in), static_cast<elem_t*>(out), row, col, v.O, v.A, v.I,
          p.Ko, p.Ki, G);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    using one = std::integral_constant<int, 1>;
    switch (es) {
      case 1:
        return vec ? go(uint8_t{}, std::integral_constant<int, 16>{}) : go(uint8_t{}, one{});
      case 2:
        return vec ? go(uint16_t{}, std::integral_constant<int, 8>{}) : go(uint16_t{}, one{});
      case 4:
        return vec ? go(uint32_t{}, std::integral_constant<int, 4>{}) : go(uint32_t{}, one{});
      case 8:
        return vec ? go(uint64_t{}, std::integral_constant<int, 2>{}) : go(uint64_t{}, one{});
      case 16:
        if (aligned(in, 16) && aligned(out, 16)) return go(Bytes16{}, one{});
        break;
      default:
        break;
    }
    // Unusual element sizes (or misaligned 16-byte elements): fall through to byte rows.
  }

  // Row path: the widest unit dividing the row width and both base pointers.
  const int64_t row_bytes = v.B * es;
  int64_t unit = 16;
  while (unit > 1 && (row_bytes % unit != 0 || !aligned(in, unit) || !aligned(out, unit))) {
    unit /= 2;
  }
  const int64_t Bu = row_bytes / unit;
  const int64_t nrows = p.Ko * v.A * p.Ki;
  const int G = group_size(Bu);
  const int grid = grid_size(nrows, G);
  auto go = [&](auto unit_tag) {
    using unit_t = decltype(unit_tag);
    gather_rows_kernel<unit_t, idx_t><<<grid, kThreads, 0, stream>>>(
        static_cast<const unit_t*>(in), static_cast<unit_t*>(out), row, col, v.O, v.A, v.I,
        p.Ko, p.Ki, Bu, G);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  switch (unit) {
    case 16: return go(uint4{});
    case 8: return go(uint2{});
    case 4: return go(uint32_t{});
    case 2: return go(uint16_t{});
    default: return go(uint8_t{});
  }
}

void gather_cuda(const GatherPlan& p, const at::Tensor& row_index, const at::Tensor& col_index) {
  if (p.out.numel() == 0) return;
  at::Tensor col = col_index.contiguous();
  at::Tensor row = row_index.defined() ? row_index.contiguous() : at::Tensor();
  if (row.defined() && row.scalar_type() != col.scalar_type()) {
    row = row.to(at::kLong);
    col = col.to(at::kLong);
  }
  AT_DISPATCH_INDEX_TYPES(col.scalar_type(), "s2h_gather_cuda", [&] {
    launch_gather<index_t>(p, row.defined() ? row.const_data_ptr<index_t>() : nullptr,
                           col.const_data_ptr<index_t>());
  });
}

// ------------------------------------------------------------------------------------------
// Scatter kernels
// ------------------------------------------------------------------------------------------

// offsets[j] = number of sorted entries < j, for j in [0, size]: bucket j of the stable
// inverse is perm[offsets[j] .. offsets[j + 1]). Entries outside [0, size) fall in no bucket.
__global__ void lower_bound_kernel(const int64_t* __restrict__ sorted, int64_t n,
                                   int64_t* __restrict__ offsets, int64_t size) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j <= size;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t lo = 0, hi = n;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (sorted[mid] < j) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    offsets[j] = lo;
  }
}

struct Inverse {
  at::Tensor offsets;  // int64 [size + 1]
  at::Tensor perm;     // int64 [numel]
};

Inverse cuda_inverse_index(const at::Tensor& index, int64_t size) {
  const at::Tensor idx = index.to(at::kLong).contiguous();
  auto sorted_perm = at::sort(idx, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  Inverse inv;
  const at::Tensor sorted = std::get<0>(sorted_perm).contiguous();
  inv.perm = std::get<1>(sorted_perm).contiguous();
  inv.offsets = at::empty({size + 1}, idx.options());
  const int64_t n = size + 1;
  const int grid = static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 1024));
  lower_bound_kernel<<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      sorted.const_data_ptr<int64_t>(), idx.numel(), inv.offsets.data_ptr<int64_t>(), size);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return inv;
}

// Sum of the gradient entries that land on one output element (a, j2 fixed by the caller's
// pointers), in increasing (k1, k2). `count` >= 2.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t sum_entries(const scalar_t* __restrict__ g,
                                             const int64_t* __restrict__ row_perm, int64_t r0,
                                             int64_t r1, const int64_t* __restrict__ col_perm,
                                             int64_t c0, int64_t c1, int64_t a, int64_t A,
                                             int64_t Ki, int64_t B, int64_t b) {
  acc_t acc = acc_t(0);
  for (int64_t rp = r0; rp < r1; ++rp) {
    const int64_t k1 = row_perm ? row_perm[rp] : rp;
    for (int64_t cp = c0; cp < c1; ++cp) {
      acc += static_cast<acc_t>(g[((k1 * A + a) * Ki + col_perm[cp]) * B + b]);
    }
  }
  return acc;
}

// B > 1: output rows r = (j1, a, j2) of B elements, VEC elements per unit.
template <typename scalar_t, int VEC>
__global__ void scatter_rows_kernel(const scalar_t* __restrict__ g, scalar_t* __restrict__ out,
                                    const int64_t* __restrict__ row_off,
                                    const int64_t* __restrict__ row_perm,
                                    const int64_t* __restrict__ col_off,
                                    const int64_t* __restrict__ col_perm, int64_t O, int64_t A,
                                    int64_t I, int64_t Ki, int64_t B, int G) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  const int64_t nrows = O * A * I;
  const int64_t units = B / VEC;
  const int lane = threadIdx.x % G;
  const int64_t groups_per_block = blockDim.x / G;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * groups_per_block;
  for (int64_t r = blockIdx.x * groups_per_block + threadIdx.x / G; r < nrows; r += stride) {
    const int64_t j2 = r % I;
    const int64_t t = r / I;
    const int64_t a = t % A;
    const int64_t j1 = t / A;
    const int64_t r0 = row_off ? row_off[j1] : j1;
    const int64_t r1 = row_off ? row_off[j1 + 1] : j1 + 1;
    const int64_t c0 = col_off[j2], c1 = col_off[j2 + 1];
    const int64_t count = (r1 - r0) * (c1 - c0);
    V* dst = reinterpret_cast<V*>(out + r * B);
    if (count == 0) {
      V z;
#pragma unroll
      for (int e = 0; e < VEC; ++e) z.v[e] = scalar_t(0);
      for (int64_t u = lane; u < units; u += G) dst[u] = z;
    } else if (count == 1) {
      const int64_t k1 = row_perm ? row_perm[r0] : r0;
      const V* src = reinterpret_cast<const V*>(g + ((k1 * A + a) * Ki + col_perm[c0]) * B);
      for (int64_t u = lane; u < units; u += G) dst[u] = src[u];
    } else {
      for (int64_t u = lane; u < units; u += G) {
        V o;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          o.v[e] = static_cast<scalar_t>(sum_entries<scalar_t, acc_t>(
              g, row_perm, r0, r1, col_perm, c0, c1, a, A, Ki, B, u * VEC + e));
        }
        dst[u] = o;
      }
    }
  }
}

// B == 1: output rows r = (j1, a) of I elements, VEC consecutive j2 per unit (one store).
template <typename scalar_t, int VEC>
__global__ void scatter_cols_kernel(const scalar_t* __restrict__ g, scalar_t* __restrict__ out,
                                    const int64_t* __restrict__ row_off,
                                    const int64_t* __restrict__ row_perm,
                                    const int64_t* __restrict__ col_off,
                                    const int64_t* __restrict__ col_perm, int64_t O, int64_t A,
                                    int64_t I, int64_t Ki, int G) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  const int64_t nrows = O * A;
  const int64_t units = I / VEC;  // the host guarantees I % VEC == 0
  const int lane = threadIdx.x % G;
  const int64_t groups_per_block = blockDim.x / G;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * groups_per_block;
  for (int64_t r = blockIdx.x * groups_per_block + threadIdx.x / G; r < nrows; r += stride) {
    const int64_t a = r % A;
    const int64_t j1 = r / A;
    const int64_t r0 = row_off ? row_off[j1] : j1;
    const int64_t r1 = row_off ? row_off[j1 + 1] : j1 + 1;
    V* dst = reinterpret_cast<V*>(out + r * I);
    for (int64_t u = lane; u < units; u += G) {
      V o;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const int64_t j2 = u * VEC + e;
        const int64_t c0 = col_off[j2], c1 = col_off[j2 + 1];
        const int64_t count = (r1 - r0) * (c1 - c0);
        if (count == 0) {
          o.v[e] = scalar_t(0);
        } else if (count == 1) {
          const int64_t k1 = row_perm ? row_perm[r0] : r0;
          o.v[e] = g[(k1 * A + a) * Ki + col_perm[c0]];
        } else {
          o.v[e] = static_cast<scalar_t>(sum_entries<scalar_t, acc_t>(
              g, row_perm, r0, r1, col_perm, c0, c1, a, A, Ki, 1, 0));
        }
      }
      dst[u] = o;
    }
  }
}

void scatter_cuda(const ScatterPlan& p, const at::Tensor& row_index, const at::Tensor& col_index) {
  if (p.out.numel() == 0) return;
  const View4& v = p.out_view;
  const Inverse col = cuda_inverse_index(col_index, v.I);
  Inverse row;
  if (row_index.defined()) row = cuda_inverse_index(row_index, v.O);
  const int64_t* row_off = row_index.defined() ? row.offsets.const_data_ptr<int64_t>() : nullptr;
  const int64_t* row_perm = row_index.defined() ? row.perm.const_data_ptr<int64_t>() : nullptr;
  const int64_t* col_off = col.offsets.const_data_ptr<int64_t>();
  const int64_t* col_perm = col.perm.const_data_ptr<int64_t>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.src.scalar_type(),
                                  "s2h_scatter_cuda", [&] {
    constexpr int VEC = 16 / static_cast<int>(sizeof(scalar_t));
    const scalar_t* g = p.src.const_data_ptr<scalar_t>();
    scalar_t* out = p.out.data_ptr<scalar_t>();
    if (v.B == 1) {
      const int64_t nrows = v.O * v.A;
      if (v.I % VEC == 0 && aligned(out, 16)) {
        const int G = group_size(v.I / VEC);
        scatter_cols_kernel<scalar_t, VEC><<<grid_size(nrows, G), kThreads, 0, stream>>>(
            g, out, row_off, row_perm, col_off, col_perm, v.O, v.A, v.I, p.Ki, G);
      } else {
        const int G = group_size(v.I);
        scatter_cols_kernel<scalar_t, 1><<<grid_size(nrows, G), kThreads, 0, stream>>>(
            g, out, row_off, row_perm, col_off, col_perm, v.O, v.A, v.I, p.Ki, G);
      }
    } else {
      const int64_t nrows = v.O * v.A * v.I;
      if (v.B % VEC == 0 && aligned(out, 16) && aligned(g, 16)) {
        const int G = group_size(v.B / VEC);
        scatter_rows_kernel<scalar_t, VEC><<<grid_size(nrows, G), kThreads, 0, stream>>>(
            g, out, row_off, row_perm, col_off, col_perm, v.O, v.A, v.I, p.Ki, v.B, G);
      } else {
        const int G = group_size(v.B);
        scatter_rows_kernel<scalar_t, 1><<<grid_size(nrows, G), kThreads, 0, stream>>>(
            g, out, row_off, row_perm, col_off, col_perm, v.O, v.A, v.I, p.Ki, v.B, G);
      }
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ------------------------------------------------------------------------------------------
// Ops
// ------------------------------------------------------------------------------------------

at::Tensor gather_channels_cuda(const at::Tensor& x, const at::Tensor& index, int64_t dim) {
  dim = check_gather_channels(x, index, dim);
  const c10::cuda::CUDAGuard guard(x.device());
  check_index_ranges("s2h.gather_channels", {{"index", index, dim, x.size(dim)}}, may_sync());
  GatherPlan p = plan_gather_channels(x, dim, index.numel());
  gather_cuda(p, at::Tensor(), index);
  return p.out;
}

at::Tensor gather_weight_cuda(const at::Tensor& w, const at::Tensor& out_index,
                              const at::Tensor& in_index) {
  check_gather_weight(w, out_index, in_index);
  const c10::cuda::CUDAGuard guard(w.device());
  check_index_ranges("s2h.gather_weight",
                     {{"out_index", out_index, 0, w.size(0)}, {"in_index", in_index, 1, w.size(1)}},
                     may_sync());
  GatherPlan p = plan_gather_weight(w, out_index.numel(), in_index.numel());
  gather_cuda(p, out_index, in_index);
  return p.out;
}

at::Tensor scatter_channels_cuda(const at::Tensor& grad, const at::Tensor& index, int64_t dim,
                                 c10::SymInt size_sym) {
  const int64_t size = size_sym.expect_int();
  dim = check_scatter_channels(grad, index, dim, size);
  const c10::cuda::CUDAGuard guard(grad.device());
  check_index_ranges("s2h.scatter_channels", {{"index", index, dim, size}}, may_sync());
  ScatterPlan p = plan_scatter_channels(grad, dim, size);
  scatter_cuda(p, at::Tensor(), index);
  return p.out;
}

at::Tensor scatter_weight_cuda(const at::Tensor& grad, const at::Tensor& out_index,
                               const at::Tensor& in_index, c10::SymIntArrayRef full_shape_sym) {
  const auto full_shape = C10_AS_INTARRAYREF_SLOW(full_shape_sym);
  check_scatter_weight(grad, out_index, in_index, full_shape);
  const c10::cuda::CUDAGuard guard(grad.device());
  check_index_ranges("s2h.scatter_weight",
                     {{"out_index", out_index, 0, full_shape[0]},
                      {"in_index", in_index, 1, full_shape[1]}},
                     may_sync());
  ScatterPlan p = plan_scatter_weight(grad, full_shape);
  scatter_cuda(p, out_index, in_index);
  return p.out;
}

}  // namespace
}  // namespace s2h

TORCH_LIBRARY_IMPL(s2h, CUDA, m) {
  m.impl("gather_channels", &s2h::gather_channels_cuda);
  m.impl("gather_weight", &s2h::gather_weight_cuda);
  m.impl("scatter_channels", &s2h::scatter_channels_cuda);
  m.impl("scatter_weight", &s2h::scatter_weight_cuda);
}
