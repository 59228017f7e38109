/*
 * mcmi_cuda.cu: CUDA kernels of the MCMI loss, class sums, EMA update and
 * row scaling, with extern "C" launchers (see mcmi_cuda.h).
 *
 * A group of threads handles one row: a warp for rows of up to 1024
 * columns, the whole block (256 threads) for longer rows. Each thread keeps
 * online-softmax partials (running maximum m, sum of e^{u-m}, sum of
 * e^{u-m} (u - log q)) over its strided columns; the group combines them in
 * a fixed order (butterfly shuffles, then warps in index order), so results
 * are deterministic. The gradient is written in a second pass over the row,
 * which mostly hits L2. Class sums use integer counts and a per-class row
 * order (rank of each row within its class), then one thread per (class,
 * column) sums its rows in row order: no floating-point atomics.
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "mcmi_cuda.h"

namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;

template <typename T> struct AccOf {
  using type = float;
};
template <> struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float load(float x) { return x; }
__device__ __forceinline__ double load(double x) { return x; }
__device__ __forceinline__ float load(__half x) { return __half2float(x); }
__device__ __forceinline__ float load(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T> __device__ __forceinline__ T store(float x);
template <> __device__ __forceinline__ float store<float>(float x) { return x; }
template <> __device__ __forceinline__ __half store<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 store<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <typename T> __device__ __forceinline__ T store(double x);
template <> __device__ __forceinline__ double store<double>(double x) {
  return x;
}

__device__ __forceinline__ float dexp(float x) { return expf(x); }
__device__ __forceinline__ double dexp(double x) { return exp(x); }
__device__ __forceinline__ float dlog(float x) { return logf(x); }
__device__ __forceinline__ double dlog(double x) { return log(x); }

/* Online-softmax partial: s = sum e^{u - m}, a = sum e^{u - m} w. */
template <typename A> struct Partial {
  A m, s, a;
};

template <typename A> __device__ __forceinline__ Partial<A> empty_partial() {
  return Partial<A>{-(A)INFINITY, (A)0, (A)0};
}

template <typename A>
__device__ __forceinline__ void push(Partial<A> &p, A u, A w) {
  if (u > p.m) {
    const A r = dexp(p.m - u);
    p.s *= r;
    p.a *= r;
    p.m = u;
  }
  const A e = dexp(u - p.m);
  p.s += e;
  p.a += e * w;
}

/* Symmetric in its arguments (IEEE addition commutes), so both lanes of a
 * butterfly step compute the same value. */
template <typename A>
__device__ __forceinline__ Partial<A> combine(Partial<A> x, Partial<A> y) {
  if (y.m == -(A)INFINITY) {
    return x;
  }
  if (x.m == -(A)INFINITY) {
    return y;
  }
  const A m = x.m > y.m ? x.m : y.m;
  const A rx = dexp(x.m - m), ry = dexp(y.m - m);
  return Partial<A>{m, x.s * rx + y.s * ry, x.a * rx + y.a * ry};
}

/* Combines the partials of a group of GROUP threads; every thread of the
 * group gets the same result. GROUP > 32 spans the block (all threads must
 * call). */
template <typename A, int GROUP>
__device__ Partial<A> group_reduce(Partial<A> p, Partial<A> *shared) {
  constexpr int lanes = GROUP < kWarp ? GROUP : kWarp;
  for (int off = lanes / 2; off > 0; off /= 2) {
    Partial<A> o;
    o.m = __shfl_xor_sync(0xffffffffu, p.m, off);
    o.s = __shfl_xor_sync(0xffffffffu, p.s, off);
    o.a = __shfl_xor_sync(0xffffffffu, p.a, off);
    p = combine(p, o);
  }
  if (GROUP <= kWarp) {
    return p;
  }
  if (threadIdx.x % kWarp == 0) {
    shared[threadIdx.x / kWarp] = p;
  }
  __syncthreads();
  Partial<A> r = shared[0];
  for (int w = 1; w < GROUP / kWarp; ++w) {
    r = combine(r, shared[w]);
  }
  __syncthreads();
  return r;
}

/* log max(q, floor), or q itself when the centroids are logs already. */
template <typename A>
__device__ __forceinline__ A log_centroid(const A *q, int64_t j, int is_log,
                                          A floor) {
  const A v = q[j];
  return is_log ? v : dlog(v > floor ? v : floor);
}

/* One row per group: loss value (row_val, and rows_out for 'none') and,
 * when grad != NULL, the gradient row. q_batch: in-batch class means
 * [classes][cols], or NULL for the problem's centroids. */
template <typename T, int GROUP>
__global__ void __launch_bounds__(kThreads)
    loss_rows(const mcmi_problem p, const typename AccOf<T>::type *q_batch,
              const int64_t *valid, double *row_val, T *rows_out,
              int64_t rows_stride, T *grad, int64_t grad_stride) {
  using A = typename AccOf<T>::type;
  __shared__ Partial<A> shared[kThreads / kWarp];
  const int64_t row =
      (int64_t)blockIdx.x * (kThreads / GROUP) + threadIdx.x / GROUP;
  const int lane = threadIdx.x % GROUP;
  if (row >= p.rows) {
    return; /* uniform over the group (GROUP == block: over the block) */
  }
  const T *z = (const T *)p.logits + row * p.logits_stride;
  T *g = grad ? grad + row * grad_stride : nullptr;
  const int64_t y = p.target[row * p.target_stride];
  if (y == p.ignore_index) {
    if (lane == 0) {
      row_val[row] = 0.0;
      if (rows_out) {
        rows_out[row * rows_stride] = store<T>((A)0);
      }
    }
    for (int64_t j = lane; g && j < p.cols; j += GROUP) {
      g[j] = store<T>((A)0);
    }
    return;
  }
  const bool bad = y < 0 || y >= p.classes;
  const A *q = bad       ? nullptr
               : q_batch ? q_batch + y * p.cols
                         : (const A *)p.centroids + y * p.centroids_stride;
  const int is_log = q_batch ? 0 : p.log_centroids;
  const A inv_t = (A)(1.0 / p.temperature), qfloor = (A)p.floor;
  const bool want_ce = p.ce_weight != 0.0;
  const bool separate = want_ce && p.temperature != 1.0;

  Partial<A> main = empty_partial<A>(), at_one = empty_partial<A>();
  for (int64_t j = lane; j < p.cols; j += GROUP) {
    const A zj = load(z[j]);
    const A u = zj * inv_t;
    const A lq = q ? log_centroid(q, j, is_log, qfloor) : (A)NAN;
    push(main, u, u - lq);
    if (separate) {
      push(at_one, zj, (A)0);
    }
  }
  main = group_reduce<A, GROUP>(main, shared);
  if (separate) {
    at_one = group_reduce<A, GROUP>(at_one, shared);
  }
  const A lse = main.m + dlog(main.s);
  const A kl = main.a / main.s - lse;
  const A lse1 = separate ? at_one.m + dlog(at_one.s) : lse;
  const A ce = want_ce && !bad ? lse1 - load(z[y]) : (A)0;
  const double value =
      bad ? (double)NAN : p.ce_weight * (double)ce + p.cmi_weight * (double)kl;
  if (lane == 0) {
    row_val[row] = value;
    if (rows_out) {
      rows_out[row * rows_stride] = store<T>((A)value);
    }
  }
  if (!g) {
    return;
  }
  const int64_t n = *valid;
  const double norm =
      (p.reduction == MCMI_REDUCTION_MEAN && n > 0) ? (double)n : 1.0;
  const A kc = (A)(p.cmi_weight / (p.temperature * norm));
  const A kce = (A)(p.ce_weight / norm);
  const A shift = lse + kl;
  for (int64_t j = lane; j < p.cols; j += GROUP) {
    const A zj = load(z[j]);
    const A u = zj * inv_t;
    const A lq = q ? log_centroid(q, j, is_log, qfloor) : (A)NAN;
    const A pj = dexp(u - lse);
    const A p1 = separate ? dexp(zj - lse1) : pj;
    A v = kc * pj * ((u - lq) - shift) + kce * p1;
    if (j == y) {
      v -= kce;
    }
    g[j] = store<T>(bad ? (A)NAN : v);
  }
}

/* Sum over the threads of a one-block launch, in a fixed tree order; the
 * result is returned to every thread. */
template <typename V> __device__ V block_sum(V v, V *part) {
  part[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s /= 2) {
    if (threadIdx.x < s) {
      part[threadIdx.x] += part[threadIdx.x + s];
    }
    __syncthreads();
  }
  return part[0];
}

/* Number of rows whose label is not ignore_index (one block). */
__global__ void count_valid(const mcmi_problem p, int64_t *valid) {
  __shared__ long long part[kThreads];
  long long c = 0;
  for (int64_t i = threadIdx.x; i < p.rows; i += kThreads) {
    c += p.target[i * p.target_stride] != p.ignore_index;
  }
  c = block_sum(c, part);
  if (threadIdx.x == 0) {
    *valid = c;
  }
}

/* The mean or sum of the row values, in a fixed order (one block). */
template <typename T>
__global__ void reduce_rows(const double *row_val, int64_t rows,
                            const int64_t *valid, int reduction, T *out) {
  using A = typename AccOf<T>::type;
  __shared__ double part[kThreads];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < rows; i += kThreads) {
    acc += row_val[i];
  }
  acc = block_sum(acc, part);
  if (threadIdx.x == 0) {
    const int64_t n = *valid;
    const double norm =
        (reduction == MCMI_REDUCTION_MEAN && n > 0) ? (double)n : 1.0;
    *out = store<T>((A)(acc / norm));
  }
}

/* Per valid row: the maximum of z / T and log sum e^{z/T - max}. */
template <typename T, int GROUP>
__global__ void __launch_bounds__(kThreads)
    row_stats(const mcmi_problem p, double *row_m, double *row_ls) {
  using A = typename AccOf<T>::type;
  __shared__ Partial<A> shared[kThreads / kWarp];
  const int64_t row =
      (int64_t)blockIdx.x * (kThreads / GROUP) + threadIdx.x / GROUP;
  if (row >= p.rows) {
    return;
  }
  const T *z = (const T *)p.logits + row * p.logits_stride;
  const A inv_t = (A)(1.0 / p.temperature);
  Partial<A> part = empty_partial<A>();
  for (int64_t j = threadIdx.x % GROUP; j < p.cols; j += GROUP) {
    push(part, load(z[j]) * inv_t, (A)0);
  }
  part = group_reduce<A, GROUP>(part, shared);
  if (threadIdx.x % GROUP == 0) {
    row_m[row] = (double)part.m;
    row_ls[row] = (double)dlog(part.s);
  }
}

__device__ __forceinline__ bool in_class_range(int64_t y,
                                               const mcmi_problem &p) {
  return y != p.ignore_index && y >= 0 && y < p.classes;
}

/* counts[y] += 1 for every valid row (integer atomics: order-free). */
__global__ void count_classes(const mcmi_problem p, int64_t *counts) {
  const int64_t i = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (i < p.rows) {
    const int64_t y = p.target[i * p.target_stride];
    if (in_class_range(y, p)) {
      atomicAdd((unsigned long long *)&counts[y], 1ull);
    }
  }
}

/* offsets = exclusive prefix sum of counts (one thread: K is small). */
__global__ void class_offsets(const int64_t *counts, int64_t classes,
                              int64_t *offsets) {
  int64_t at = 0;
  for (int64_t c = 0; c < classes; ++c) {
    offsets[c] = at;
    at += counts[c];
  }
}

/* order[offsets[y_i] + rank_i] = i, rank_i = #{j < i : y_j = y_i}: the rows
 * of each class in row order. */
__global__ void order_rows(const mcmi_problem p, const int64_t *offsets,
                           int64_t *order) {
  const int64_t i = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (i >= p.rows) {
    return;
  }
  const int64_t y = p.target[i * p.target_stride];
  if (!in_class_range(y, p)) {
    return;
  }
  int64_t rank = 0;
  for (int64_t j = 0; j < i; ++j) {
    rank += p.target[j * p.target_stride] == y;
  }
  order[offsets[y] + rank] = i;
}

/* out[c][j] = sum over the rows of class c, in row order, of softmax(z/T)_j
 * (log_softmax with log_probs), divided by the count when `mean`. */
template <typename T>
__global__ void
class_sum_cols(const mcmi_problem p, const double *row_m, const double *row_ls,
               const int64_t *counts, const int64_t *offsets,
               const int64_t *order, int log_probs, int mean,
               typename AccOf<T>::type *out, int64_t out_stride) {
  using A = typename AccOf<T>::type;
  const int64_t c = blockIdx.x; /* x: up to 2^31 - 1 classes */
  const int64_t j = (int64_t)blockIdx.y * kThreads + threadIdx.x;
  if (j >= p.cols) {
    return;
  }
  const A inv_t = (A)(1.0 / p.temperature);
  const int64_t n = counts[c];
  A acc = (A)0;
  for (int64_t k = 0; k < n; ++k) {
    const int64_t i = order[offsets[c] + k];
    const T *z = (const T *)p.logits + i * p.logits_stride;
    const A v = load(z[j]) * inv_t - (A)row_m[i] - (A)row_ls[i];
    acc += log_probs ? v : dexp(v);
  }
  out[c * out_stride + j] = mean && n > 0 ? acc / (A)n : acc;
}

/* EMA step for the classes present; `seen` is read here, set afterwards. */
template <typename A>
__global__ void ema_apply(const A *means, const int64_t *counts, int64_t cols,
                          A momentum, const uint8_t *seen, A *q,
                          int64_t q_stride) {
  const int64_t c = blockIdx.x; /* x: up to 2^31 - 1 classes */
  const int64_t j = (int64_t)blockIdx.y * kThreads + threadIdx.x;
  if (j >= cols || counts[c] == 0) {
    return;
  }
  const A b = means[c * cols + j];
  A *row = q + c * q_stride;
  row[j] = seen[c] ? row[j] + momentum * (b - row[j]) : b;
}

__global__ void ema_mark_seen(const int64_t *counts, int64_t classes,
                              uint8_t *seen) {
  const int64_t c = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (c < classes && counts[c] > 0) {
    seen[c] = 1;
  }
}

template <typename T>
__global__ void scale_rows_kernel(T *x, int64_t rows, int64_t cols,
                                  int64_t stride, const T *scale,
                                  int64_t scale_stride) {
  const int64_t total = rows * cols;
  for (int64_t k = (int64_t)blockIdx.x * kThreads + threadIdx.x; k < total;
       k += (int64_t)gridDim.x * kThreads) {
    const int64_t i = k / cols, j = k % cols;
    T *v = x + i * stride + j;
    *v = store<T>(load(*v) * load(scale[i * scale_stride]));
  }
}

/* ------------------------------------------------------------- host side */

size_t align_up(size_t n) { return (n + 255u) & ~(size_t)255u; }

size_t acc_bytes(mcmi_dtype d) {
  return d == MCMI_FLOAT64 ? sizeof(double) : sizeof(float);
}

/* Device workspace: valid count, per-row values and stats, class counts,
 * offsets and row order, and (in-batch or EMA) class means [K][C]. */
struct Layout {
  size_t valid, row_val, row_m, row_ls, counts, offsets, order, means, total;
};

Layout make_layout(const mcmi_problem *p, bool means) {
  const size_t rows = (size_t)p->rows, k = (size_t)p->classes;
  Layout l;
  size_t at = 0;
  l.valid = at;
  at = align_up(at + sizeof(int64_t));
  l.row_val = at;
  at = align_up(at + rows * sizeof(double));
  l.row_m = at;
  at = align_up(at + rows * sizeof(double));
  l.row_ls = at;
  at = align_up(at + rows * sizeof(double));
  l.counts = at;
  at = align_up(at + k * sizeof(int64_t));
  l.offsets = at;
  at = align_up(at + k * sizeof(int64_t));
  l.order = at;
  at = align_up(at + rows * sizeof(int64_t));
  l.means = at;
  if (means) {
    at = align_up(at + k * (size_t)p->cols * acc_bytes(p->dtype));
  }
  l.total = at;
  return l;
}

bool problem_ok(const mcmi_problem *p) {
  if (p == nullptr || p->rows < 0 || p->cols < 1 || p->classes < 1 ||
      !(p->temperature > 0.0) || p->dtype < MCMI_FLOAT32 ||
      p->dtype > MCMI_FLOAT16) {
    return false;
  }
  if (p->ce_weight != 0.0 && p->classes > p->cols) {
    return false;
  }
  if (p->log_centroids && p->centroids == nullptr) {
    return false;
  }
  return p->rows == 0 || (p->logits != nullptr && p->target != nullptr);
}

unsigned blocks_for(int64_t n) {
  return (unsigned)((n + kThreads - 1) / kThreads);
}

/* Row stats, counts, offsets and order of the valid rows, then class sums
 * (or means) into out. */
template <typename T, int GROUP>
void class_sums_into(const mcmi_problem &p, const Layout &l, char *ws,
                     int log_probs, int mean, typename AccOf<T>::type *out,
                     int64_t out_stride, int64_t *counts, cudaStream_t s) {
  double *row_m = (double *)(ws + l.row_m), *row_ls = (double *)(ws + l.row_ls);
  int64_t *offsets = (int64_t *)(ws + l.offsets),
          *order = (int64_t *)(ws + l.order);
  cudaMemsetAsync(counts, 0, (size_t)p.classes * sizeof(int64_t), s);
  if (p.rows > 0) {
    const unsigned row_blocks =
        (unsigned)((p.rows + kThreads / GROUP - 1) / (kThreads / GROUP));
    row_stats<T, GROUP><<<row_blocks, kThreads, 0, s>>>(p, row_m, row_ls);
    count_classes<<<blocks_for(p.rows), kThreads, 0, s>>>(p, counts);
  }
  class_offsets<<<1, 1, 0, s>>>(counts, p.classes, offsets);
  if (p.rows > 0) {
    order_rows<<<blocks_for(p.rows), kThreads, 0, s>>>(p, offsets, order);
  }
  const dim3 grid((unsigned)p.classes, blocks_for(p.cols));
  class_sum_cols<T><<<grid, kThreads, 0, s>>>(p, row_m, row_ls, counts, offsets,
                                              order, log_probs, mean, out,
                                              out_stride);
}

template <typename T, int GROUP>
void loss_launch(const mcmi_problem &p, void *loss, int64_t loss_stride,
                 void *grad, int64_t grad_stride, char *ws, cudaStream_t s) {
  using A = typename AccOf<T>::type;
  const bool batch = p.centroids == nullptr;
  const Layout l = make_layout(&p, batch);
  int64_t *valid = (int64_t *)(ws + l.valid);
  double *row_val = (double *)(ws + l.row_val);
  A *means = batch ? (A *)(ws + l.means) : nullptr;
  count_valid<<<1, kThreads, 0, s>>>(p, valid);
  if (batch) {
    class_sums_into<T, GROUP>(p, l, ws, 0, 1, means, p.cols,
                              (int64_t *)(ws + l.counts), s);
  }
  const bool per_row = p.reduction == MCMI_REDUCTION_NONE;
  if (p.rows > 0) {
    const unsigned blocks =
        (unsigned)((p.rows + kThreads / GROUP - 1) / (kThreads / GROUP));
    loss_rows<T, GROUP><<<blocks, kThreads, 0, s>>>(
        p, means, valid, row_val, per_row ? (T *)loss : nullptr, loss_stride,
        (T *)grad, grad_stride);
  }
  if (!per_row) {
    reduce_rows<T><<<1, kThreads, 0, s>>>(row_val, p.rows, valid,
                                          (int)p.reduction, (T *)loss);
  }
}

template <typename T>
void loss_dispatch(const mcmi_problem &p, void *loss, int64_t loss_stride,
                   void *grad, int64_t grad_stride, char *ws, cudaStream_t s) {
  if (p.cols <= 1024) {
    loss_launch<T, kWarp>(p, loss, loss_stride, grad, grad_stride, ws, s);
  } else {
    loss_launch<T, kThreads>(p, loss, loss_stride, grad, grad_stride, ws, s);
  }
}

template <typename T>
void sums_dispatch(const mcmi_problem &p, const Layout &l, char *ws,
                   int log_probs, int mean, typename AccOf<T>::type *out,
                   int64_t out_stride, int64_t *counts, cudaStream_t s) {
  if (p.cols <= 1024) {
    class_sums_into<T, kWarp>(p, l, ws, log_probs, mean, out, out_stride,
                              counts, s);
  } else {
    class_sums_into<T, kThreads>(p, l, ws, log_probs, mean, out, out_stride,
                                 counts, s);
  }
}

} // namespace

extern "C" {

size_t mcmi_cuda_loss_workspace(const mcmi_problem *p) {
  return problem_ok(p) ? make_layout(p, p->centroids == nullptr).total : 0;
}

size_t mcmi_cuda_class_sums_workspace(const mcmi_problem *p) {
  return problem_ok(p) ? make_layout(p, true).total : 0;
}

mcmi_status mcmi_cuda_loss(const mcmi_problem *p, void *loss,
                           int64_t loss_stride, void *grad, int64_t grad_stride,
                           void *workspace, void *stream) {
  if (!problem_ok(p) || p->reduction < MCMI_REDUCTION_NONE ||
      p->reduction > MCMI_REDUCTION_SUM || workspace == nullptr ||
      (loss == nullptr &&
       !(p->reduction == MCMI_REDUCTION_NONE && p->rows == 0))) {
    return MCMI_ERROR_ARGUMENT;
  }
  cudaStream_t s = (cudaStream_t)stream;
  char *ws = (char *)workspace;
  switch (p->dtype) {
  case MCMI_FLOAT32:
    loss_dispatch<float>(*p, loss, loss_stride, grad, grad_stride, ws, s);
    break;
  case MCMI_FLOAT64:
    loss_dispatch<double>(*p, loss, loss_stride, grad, grad_stride, ws, s);
    break;
  case MCMI_BFLOAT16:
    loss_dispatch<__nv_bfloat16>(*p, loss, loss_stride, grad, grad_stride, ws,
                                 s);
    break;
  case MCMI_FLOAT16:
    loss_dispatch<__half>(*p, loss, loss_stride, grad, grad_stride, ws, s);
    break;
  }
  return MCMI_OK;
}

mcmi_status mcmi_cuda_class_sums(const mcmi_problem *p, int log_probs,
                                 void *sums, int64_t sums_stride,
                                 int64_t *counts, void *workspace,
                                 void *stream) {
  if (!problem_ok(p) || sums == nullptr || counts == nullptr ||
      workspace == nullptr) {
    return MCMI_ERROR_ARGUMENT;
  }
  const Layout l = make_layout(p, true);
  cudaStream_t s = (cudaStream_t)stream;
  char *ws = (char *)workspace;
  switch (p->dtype) {
  case MCMI_FLOAT32:
    sums_dispatch<float>(*p, l, ws, log_probs, 0, (float *)sums, sums_stride,
                         counts, s);
    break;
  case MCMI_FLOAT64:
    sums_dispatch<double>(*p, l, ws, log_probs, 0, (double *)sums, sums_stride,
                          counts, s);
    break;
  case MCMI_BFLOAT16:
    sums_dispatch<__nv_bfloat16>(*p, l, ws, log_probs, 0, (float *)sums,
                                 sums_stride, counts, s);
    break;
  case MCMI_FLOAT16:
    sums_dispatch<__half>(*p, l, ws, log_probs, 0, (float *)sums, sums_stride,
                          counts, s);
    break;
  }
  return MCMI_OK;
}

mcmi_status mcmi_cuda_ema_update(const mcmi_problem *p, double momentum,
                                 void *centroids, int64_t centroids_stride,
                                 uint8_t *seen, void *workspace, void *stream) {
  if (!problem_ok(p) || centroids == nullptr || seen == nullptr ||
      workspace == nullptr || !(momentum > 0.0 && momentum <= 1.0)) {
    return MCMI_ERROR_ARGUMENT;
  }
  const Layout l = make_layout(p, true);
  cudaStream_t s = (cudaStream_t)stream;
  char *ws = (char *)workspace;
  int64_t *counts = (int64_t *)(ws + l.counts);
  const dim3 grid((unsigned)p->classes, blocks_for(p->cols));
  if (p->dtype == MCMI_FLOAT64) {
    double *means = (double *)(ws + l.means);
    sums_dispatch<double>(*p, l, ws, 0, 1, means, p->cols, counts, s);
    ema_apply<double>
        <<<grid, kThreads, 0, s>>>(means, counts, p->cols, momentum, seen,
                                   (double *)centroids, centroids_stride);
  } else {
    float *means = (float *)(ws + l.means);
    if (p->dtype == MCMI_FLOAT32) {
      sums_dispatch<float>(*p, l, ws, 0, 1, means, p->cols, counts, s);
    } else if (p->dtype == MCMI_BFLOAT16) {
      sums_dispatch<__nv_bfloat16>(*p, l, ws, 0, 1, means, p->cols, counts, s);
    } else {
      sums_dispatch<__half>(*p, l, ws, 0, 1, means, p->cols, counts, s);
    }
    ema_apply<float>
        <<<grid, kThreads, 0, s>>>(means, counts, p->cols, (float)momentum,
                                   seen, (float *)centroids, centroids_stride);
  }
  ema_mark_seen<<<blocks_for(p->classes), kThreads, 0, s>>>(counts, p->classes,
                                                            seen);
  return MCMI_OK;
}

mcmi_status mcmi_cuda_scale_rows(mcmi_dtype dtype, void *x, int64_t rows,
                                 int64_t cols, int64_t stride,
                                 const void *scale, int64_t scale_stride,
                                 void *stream) {
  if (rows < 0 || cols < 0 || (rows > 0 && cols > 0 && (!x || !scale))) {
    return MCMI_ERROR_ARGUMENT;
  }
  if (rows == 0 || cols == 0) {
    return MCMI_OK;
  }
  cudaStream_t s = (cudaStream_t)stream;
  const int64_t total = rows * cols;
  const unsigned blocks =
      (unsigned)(total / kThreads + 1 < 65535 ? total / kThreads + 1 : 65535);
  switch (dtype) {
  case MCMI_FLOAT32:
    scale_rows_kernel<float><<<blocks, kThreads, 0, s>>>(
        (float *)x, rows, cols, stride, (const float *)scale, scale_stride);
    return MCMI_OK;
  case MCMI_FLOAT64:
    scale_rows_kernel<double><<<blocks, kThreads, 0, s>>>(
        (double *)x, rows, cols, stride, (const double *)scale, scale_stride);
    return MCMI_OK;
  case MCMI_BFLOAT16:
    scale_rows_kernel<__nv_bfloat16><<<blocks, kThreads, 0, s>>>(
        (__nv_bfloat16 *)x, rows, cols, stride, (const __nv_bfloat16 *)scale,
        scale_stride);
    return MCMI_OK;
  case MCMI_FLOAT16:
    scale_rows_kernel<__half><<<blocks, kThreads, 0, s>>>(
        (__half *)x, rows, cols, stride, (const __half *)scale, scale_stride);
    return MCMI_OK;
  }
  return MCMI_ERROR_ARGUMENT;
}

} // extern "C"
