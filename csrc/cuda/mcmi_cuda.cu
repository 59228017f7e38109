/*
 * mcmi_cuda.cu: CUDA kernels of the MCMI loss, class sums, EMA update and
 * row scaling, with extern "C" launchers (see mcmi_cuda.h).
 *
 * A group of threads handles one row: a warp for rows of up to 1024
 * columns, the whole block (256 threads) for longer rows, and several
 * blocks for a few long rows (the split-row path). Each thread keeps
 * online-softmax partials over its strided columns, relative to its running
 * maximum (see Partial); the group combines them in a fixed order
 * (butterfly shuffles, then warps in index order), so results are bitwise
 * repeatable. A second pass forms the KL as sum_j Q'_j g(x_j) - (sum Q' - 1)
 * with x_j = log(P_j / Q'_j) (docs/math.md, "A KL without cancellation"),
 * and the gradient is written in a third; both mostly hit L2. Class sums:
 * integer counts, compact slots for the classes present, the rows of each slot
 * in row order (one block, O(rows + classes) work), then a block per (slot, 32
 * columns) whose warps sum interleaved rows and add their partials in warp
 * order: no floating-point atomics.
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>

#include <type_traits>

#include "../mcmi_check.h"
#include "../mcmi_math.h"
#include "mcmi_cuda.h"

/* The label check of class sums and the EMA update is a device-side
 * assertion, in every build. */
#undef NDEBUG
#include <assert.h>
#include <stdio.h>

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
__device__ __forceinline__ float kl_g(float x) { return mcmi_kl_g_f32(x); }
__device__ __forceinline__ double kl_g(double x) { return mcmi_kl_g_f64(x); }
/* The smallest normal number of A. */
__device__ __forceinline__ float tiny_of(float) { return 1.17549435e-38f; }
__device__ __forceinline__ double tiny_of(double) {
  return 2.2250738585072014e-308;
}

/* 1/T as two factors finite in A (mcmi_inv_temperature, as on the CPU): a
 * difference d of logits becomes (d * k) * k2, so a tiny T (1/T beyond A's
 * range) gives the one-hot limit and a huge T keeps -inf logits at -inf. */
template <typename A> struct Scale {
  A k, k2;
};

/* Formed on the host, once per call, and passed to the kernels: its double
 * divisions would cost a call (and spills) in every thread. */
template <typename A> Scale<A> scale_of(double t);
template <> Scale<float> scale_of<float>(double t) {
  double k2;
  const double k = mcmi_inv_temperature(t, 3.4028234663852886e38,
                                        1.401298464324817e-45, &k2);
  return Scale<float>{(float)k, (float)k2};
}
template <> Scale<double> scale_of<double>(double t) {
  double k2;
  const double k = mcmi_inv_temperature(t, 1.7976931348623157e308,
                                        4.9406564584124654e-324, &k2);
  return Scale<double>{k, k2};
}

/* The scale of the CE term's softmax (T = 1). */
template <typename A> __device__ __forceinline__ Scale<A> unit_scale() {
  return Scale<A>{(A)1, (A)1};
}

template <typename A> __device__ __forceinline__ A scaled(A d, Scale<A> sc) {
  return (d * sc.k) * sc.k2;
}

/* Online-softmax partial over some columns of a row, relative to its
 * running maximum m of z (logit units): s = sum e^{(z_j - m) / T}. s == 0
 * only when no column had a number above -inf; a NaN or +inf logit makes s
 * NaN (as on the CPU), and NaN survives every combine. A -inf logit is a
 * class of probability 0: it adds nothing. */
template <typename A> struct Partial {
  A m, s;
};

template <typename A> __device__ __forceinline__ Partial<A> empty_partial() {
  return Partial<A>{-(A)INFINITY, (A)0};
}

/* Adds column value z (scale k: 1/T). */
template <typename A>
__device__ __forceinline__ void push(Partial<A> &p, A z, Scale<A> k) {
  if (z == -(A)INFINITY) {
    return;
  }
  if (z > p.m) {
    if (p.s != (A)0) {
      p.s *= dexp(scaled(p.m - z, k));
    }
    p.m = z;
  }
  p.s += dexp(scaled(z - p.m, k));
}

/* x then y, both relative to the larger maximum. Callers pass the partials
 * in a fixed order, so every thread that combines the same two partials
 * gets the same bits (contracted multiply-adds included). */
template <typename A>
__device__ __forceinline__ Partial<A> combine(Partial<A> x, Partial<A> y,
                                              Scale<A> k) {
  if (y.s == (A)0) {
    return x;
  }
  if (x.s == (A)0) {
    return y;
  }
  const A m = x.m > y.m ? x.m : y.m;
  return Partial<A>{m, x.s * dexp(scaled(x.m - m, k)) +
                           y.s * dexp(scaled(y.m - m, k))};
}

/* Combines the partials of a group of GROUP threads; every thread of the
 * group gets the same result (each butterfly step puts the lower lane's
 * partial first). GROUP > 32 spans the block (all threads must call). */
template <typename A, int GROUP>
__device__ Partial<A> group_reduce(Partial<A> p, Scale<A> k,
                                   Partial<A> *shared) {
  constexpr int lanes = GROUP < kWarp ? GROUP : kWarp;
  const int lane = (int)(threadIdx.x % kWarp);
  for (int off = lanes / 2; off > 0; off /= 2) {
    Partial<A> o;
    o.m = __shfl_xor_sync(0xffffffffu, p.m, off);
    o.s = __shfl_xor_sync(0xffffffffu, p.s, off);
    p = (lane & off) ? combine(o, p, k) : combine(p, o, k);
  }
  if (GROUP <= kWarp) {
    return p;
  }
  if (lane == 0) {
    shared[threadIdx.x / kWarp] = p;
  }
  __syncthreads();
  Partial<A> r = shared[0];
  for (int w = 1; w < GROUP / kWarp; ++w) {
    r = combine(r, shared[w], k);
  }
  __syncthreads();
  return r;
}

/* Sums of the KL pass over some columns of a row: g = sum_j Q'_j g(x_j)
 * and q = sum_j Q'_j, in double (the KL subtracts sum Q' - 1, which must be
 * exact to far below the KL itself). */
template <typename A> struct KLPart {
  A g;
  double q;
};

/* Adds the KL sums of a group of GROUP threads, as group_reduce; addition
 * commutes, so every thread of the group gets the same bits. */
template <typename A, int GROUP>
__device__ KLPart<A> group_sum(KLPart<A> v, KLPart<A> *shared) {
  constexpr int lanes = GROUP < kWarp ? GROUP : kWarp;
  for (int off = lanes / 2; off > 0; off /= 2) {
    v.g += __shfl_xor_sync(0xffffffffu, v.g, off);
    v.q += __shfl_xor_sync(0xffffffffu, v.q, off);
  }
  if (GROUP <= kWarp) {
    return v;
  }
  if (threadIdx.x % kWarp == 0) {
    shared[threadIdx.x / kWarp] = v;
  }
  __syncthreads();
  KLPart<A> r = shared[0];
  for (int w = 1; w < GROUP / kWarp; ++w) {
    r.g += shared[w].g;
    r.q += shared[w].q;
  }
  __syncthreads();
  return r;
}

/* The centroid entry the KL uses, Q'_j = max(Q_j, floor) (from log Q_j
 * when the centroids are logs); a NaN entry stays NaN. */
template <typename A>
__device__ __forceinline__ A centroid_entry(A v, int is_log, A floor) {
  const A q = is_log ? dexp(v) : v;
  return q < floor ? floor : q;
}

/* x_j = log(P_j / Q'_j), from the ratio (P below the smallest normal
 * ratio gives a finite x). */
template <typename A> __device__ __forceinline__ A log_ratio(A pj, A qj) {
  const A ratio = pj / qj;
  return dlog(ratio < tiny_of(ratio) ? tiny_of(ratio) : ratio);
}

/* Q'_j g(x_j): the series of g for |x| < 1/2, else the direct form
 * (x - 1) P + Q' (as the CPU kernels). */
template <typename A> __device__ __forceinline__ A kl_term(A pj, A qj, A x) {
  return x < (A)0.5 && x > (A)-0.5 ? qj * kl_g(x) : (x - (A)1) * pj + qj;
}

/* The centroid row of a valid row with label y: in-batch means by slot, the
 * given centroids, or NULL for a label out of range. */
template <typename A>
__device__ __forceinline__ const A *
row_centroids(const mcmi_problem &p, const A *q_batch, const int64_t *slot_of,
              int64_t y) {
  if (y < 0 || y >= p.classes) {
    return nullptr;
  }
  return q_batch ? q_batch + slot_of[y] * p.cols
                 : (const A *)p.centroids + y * p.centroids_stride;
}

/* True for a valid row alone in its class among in-batch means (counts:
 * the rows of each class, or NULL for given centroids): its centroid is its
 * own softmax, so its KL and the KL's gradient are 0 and the KL pass is
 * skipped, as in the CPU kernels. */
__device__ __forceinline__ bool
alone_in_class(const mcmi_problem &p, const int64_t *counts, int64_t y) {
  return counts && y >= 0 && y < p.classes && counts[y] == 1;
}

/* The KL sums of a row alone in its class: KL 0, but NaN, as on the CPU,
 * for a row whose softmax sum s is NaN (a NaN or +inf logit) or 0 (no
 * finite logit). */
template <typename A> __device__ __forceinline__ KLPart<A> alone_part(A s) {
  return KLPart<A>{s > (A)0 ? (A)0 : (A)NAN, 1.0};
}

/* What the loss of one row reads besides its logits and centroids. */
template <typename A> struct RowSetup {
  Scale<A> sc; /* 1/T */
  A qfloor;
  int is_log;    /* centroids hold logs */
  bool check_q;  /* given centroids: check that the row sums to 1 */
  bool separate; /* CE needs its own softmax (T != 1) */
  bool batch;    /* in-batch means: the KL is taken against Q' / sum Q' */
};

template <typename A>
__device__ __forceinline__ RowSetup<A> row_setup(const mcmi_problem &p,
                                                 bool batch, Scale<A> sc) {
  const int is_log = batch ? 0 : p.log_centroids;
  return RowSetup<A>{sc,
                     (A)p.floor,
                     is_log,
                     !batch && !is_log,
                     p.ce_weight != 0.0 && p.temperature != 1.0,
                     batch};
}

/* 16 bytes of T, for vector loads and stores. */
template <typename T> struct alignas(16) Vec {
  T v[16 / sizeof(T)];
};

__device__ __forceinline__ bool aligned16(const void *x) {
  return ((uintptr_t)x & 15u) == 0;
}

/* Columns [begin, end) of a row of T as a scalar head up to the first
 * 16-byte boundary of z, `vectors` whole 16-byte vectors from `first`, and a
 * scalar tail (scale_rows_kernel). */
struct Span {
  int64_t first, vectors;
};

template <typename T>
__device__ __forceinline__ Span vector_span(const T *z, int64_t begin,
                                            int64_t end) {
  constexpr int V = 16 / sizeof(T);
  const int64_t head =
      (int64_t)(((16u - ((uintptr_t)(z + begin) & 15u)) & 15u) / sizeof(T));
  const int64_t first = begin + (head < end - begin ? head : end - begin);
  return Span{first, (end - first) / V};
}

/* Calls f(z_j, j) for the columns [begin, end) of row z shared among
 * `group` threads of which this is `lane`: in 16-byte vectors when z + begin
 * is 16-byte aligned (then a scalar tail), else one column at a time (a
 * scalar head and vector loads of the centroid row made ptxas spill in
 * loss_rows: docs/performance.md). */
template <typename T, typename F>
__device__ __forceinline__ void each_column(const T *z, int64_t begin,
                                            int64_t end, int lane, int group,
                                            F &&f) {
  constexpr int V = 16 / sizeof(T);
  int64_t tail = begin;
  if (aligned16(z + begin)) {
    const int64_t nv = (end - begin) / V;
    const Vec<T> *zv = (const Vec<T> *)(z + begin);
    for (int64_t k = lane; k < nv; k += group) {
      const Vec<T> w = zv[k];
      for (int e = 0; e < V; ++e) {
        f(load(w.v[e]), begin + k * V + e);
      }
    }
    tail = begin + nv * V;
  }
  for (int64_t j = tail + lane; j < end; j += group) {
    f(load(z[j]), j);
  }
}

/* Pushes columns [begin, end) of row z into the partials (at_one: the
 * softmax at T = 1 of the CE term, when separate), shared as in
 * each_column. */
template <typename T, typename A>
__device__ void accumulate_row(const T *z, const RowSetup<A> &su, int64_t begin,
                               int64_t end, int lane, int group,
                               Partial<A> &main, Partial<A> &at_one) {
  each_column(z, begin, end, lane, group, [&](A zj, int64_t) {
    push(main, zj, su.sc);
    if (su.separate) {
      push(at_one, zj, unit_scale<A>());
    }
  });
}

/* The KL pass over columns [begin, end) of row z, given the row's maximum
 * m and inv_s = 1 / sum: P_j = e^{(z_j - m) / T} inv_s. */
template <typename T, typename A>
__device__ KLPart<A> kl_columns(const T *z, const A *q, const RowSetup<A> &su,
                                A m, A inv_s, int64_t begin, int64_t end,
                                int lane, int group) {
  KLPart<A> sum{(A)0, 0.0};
  each_column(z, begin, end, lane, group, [&](A zj, int64_t j) {
    const A qj = q ? centroid_entry(q[j], su.is_log, su.qfloor) : (A)NAN;
    const A pj = dexp(scaled(zj - m, su.sc)) * inv_s;
    sum.g += kl_term(pj, qj, log_ratio(pj, qj));
    sum.q += (double)qj;
  });
  return sum;
}

/* A valid row's value and what its gradient needs, from its combined
 * partials and KL sums. A label out of range, or a given centroid row
 * that does not sum to 1, makes the row NaN. */
template <typename A> struct RowResult {
  A m, s, inv_s, kl, ls1;
  int nan_row;
  double value;
};

template <typename T, typename A>
__device__ RowResult<A>
row_result(const mcmi_problem &p, const T *z, int64_t y, const RowSetup<A> &su,
           const Partial<A> &main, const Partial<A> &at_one,
           const KLPart<A> &part) {
  const bool bad = y < 0 || y >= p.classes;
  const A ls1 = dlog(su.separate ? at_one.s : main.s);
  const double qs = part.q;
  /* In-batch means sum to 1 in exact arithmetic: their KL is taken against
   * Q' / sum Q' (adding log sum Q'), which removes the rounding of their
   * sum; given centroids are used as they are. */
  const double kl =
      (double)part.g - (qs - 1.0) + (su.batch ? log1p(qs - 1.0) : 0.0);
  const bool q_off =
      su.check_q && !(fabs(qs - 1.0) <= MCMI_CENTROID_SUM_TOLERANCE);
  const bool want_ce = p.ce_weight != 0.0;
  const A ce = want_ce && !bad ? (main.m - load(z[y])) + ls1 : (A)0;
  const bool nan_row = bad || q_off;
  const double value =
      nan_row ? (double)NAN : p.ce_weight * (double)ce + p.cmi_weight * kl;
  return RowResult<A>{main.m, main.s,          (A)1 / main.s, (A)kl,
                      ls1,    nan_row ? 1 : 0, value};
}

/* Writes columns [begin, end) of a valid row's gradient,
 * d(loss)/dz_j = kc P_j (x_j - KL) + kce (P1_j - [j == y]),
 * shared as in each_column (vectors when z and g are both aligned). With
 * s == 1 the softmax is one-hot to working precision: the true KL gradient
 * of the row is below the rounding error of x - KL at the maximum. A row
 * alone in its class (alone_in_class) has kc = 0: no KL gradient. */
template <typename T, typename A>
__device__ void write_grad(const mcmi_problem &p, const T *z, const A *q,
                           int64_t y, const RowSetup<A> &su,
                           const RowResult<A> &r, bool alone,
                           const int64_t *valid, T *g, int64_t begin,
                           int64_t end, int lane, int group) {
  constexpr int V = 16 / sizeof(T);
  const int64_t n = *valid;
  const double norm =
      (p.reduction == MCMI_REDUCTION_MEAN && n > 0) ? (double)n : 1.0;
  const A kc =
      r.s == (A)1 || alone ? (A)0 : (A)(p.cmi_weight / (p.temperature * norm));
  const A kce = (A)(p.ce_weight / norm);
  const auto grad_of = [&](A zj, int64_t j) {
    const A qj = q ? centroid_entry(q[j], su.is_log, su.qfloor) : (A)NAN;
    const A pj = dexp(scaled(zj - r.m, su.sc)) * r.inv_s;
    const A p1 = su.separate ? dexp((zj - r.m) - r.ls1) : pj;
    A v = kc * pj * (log_ratio(pj, qj) - r.kl) + kce * p1;
    if (j == y) {
      v -= kce;
    }
    return store<T>(r.nan_row ? (A)NAN : v);
  };
  int64_t tail = begin;
  if (aligned16(z + begin) && aligned16(g + begin)) {
    const int64_t nv = (end - begin) / V;
    const Vec<T> *zv = (const Vec<T> *)(z + begin);
    Vec<T> *gv = (Vec<T> *)(g + begin);
    for (int64_t k = lane; k < nv; k += group) {
      const Vec<T> w = zv[k];
      Vec<T> o;
      for (int e = 0; e < V; ++e) {
        o.v[e] = grad_of(load(w.v[e]), begin + k * V + e);
      }
      gv[k] = o;
    }
    tail = begin + nv * V;
  }
  for (int64_t j = tail + lane; j < end; j += group) {
    g[j] = grad_of(load(z[j]), j);
  }
}

/* Value (and, for 'none', rows_out) and zero gradient of an ignored row,
 * by the threads lane = 0, 1, ... < step of its group. */
template <typename T>
__device__ void ignored_row(int64_t row, double *row_val, T *rows_out,
                            int64_t rows_stride, T *g, int64_t begin,
                            int64_t end, int64_t step, bool first) {
  using A = typename AccOf<T>::type;
  if (first) {
    row_val[row] = 0.0;
    if (rows_out) {
      rows_out[row * rows_stride] = store<T>((A)0);
    }
  }
  for (int64_t j = begin; g && j < end; j += step) {
    g[j] = store<T>((A)0);
  }
}

/* One row per group: loss value (row_val, and rows_out for 'none') and,
 * when grad != NULL, the gradient row. q_batch: in-batch class means
 * [slot][cols] with slot_of[class], or NULL for the problem's centroids. */
template <typename T, int GROUP>
__global__ void __launch_bounds__(kThreads)
    loss_rows(const mcmi_problem p, const Scale<typename AccOf<T>::type> sc,
              const typename AccOf<T>::type *q_batch, const int64_t *slot_of,
              const int64_t *counts, const int64_t *valid, double *row_val,
              T *rows_out, int64_t rows_stride, T *grad, int64_t grad_stride) {
  using A = typename AccOf<T>::type;
  __shared__ Partial<A> shared[kThreads / kWarp];
  __shared__ KLPart<A> kl_shared[kThreads / kWarp];
  const int64_t row =
      (int64_t)blockIdx.x * (kThreads / GROUP) + threadIdx.x / GROUP;
  const int lane = (int)(threadIdx.x % GROUP);
  if (row >= p.rows) {
    return; /* uniform over the group (GROUP == block: over the block) */
  }
  const T *z = (const T *)p.logits + row * p.logits_stride;
  T *g = grad ? grad + row * grad_stride : nullptr;
  const int64_t y = p.target[row * p.target_stride];
  if (y == p.ignore_index) {
    ignored_row(row, row_val, rows_out, rows_stride, g, lane, p.cols, GROUP,
                lane == 0);
    return;
  }
  const A *q = row_centroids(p, q_batch, slot_of, y);
  const RowSetup<A> su = row_setup<A>(p, q_batch != nullptr, sc);
  Partial<A> main = empty_partial<A>(), at_one = empty_partial<A>();
  accumulate_row(z, su, 0, p.cols, lane, GROUP, main, at_one);
  main = group_reduce<A, GROUP>(main, su.sc, shared);
  if (su.separate) {
    at_one = group_reduce<A, GROUP>(at_one, unit_scale<A>(), shared);
  }
  /* A row alone in its class takes no columns into its KL pass. */
  const bool alone = alone_in_class(p, counts, y);
  KLPart<A> part =
      group_sum<A, GROUP>(kl_columns(z, q, su, main.m, (A)1 / main.s, 0,
                                     alone ? 0 : p.cols, lane, GROUP),
                          kl_shared);
  if (alone) {
    part = alone_part(main.s);
  }
  const RowResult<A> r = row_result(p, z, y, su, main, at_one, part);
  if (lane == 0) {
    row_val[row] = r.value;
    if (rows_out) {
      rows_out[row * rows_stride] = store<T>((A)r.value);
    }
  }
  if (g) {
    write_grad(p, z, q, y, su, r, alone, valid, g, 0, p.cols, lane, GROUP);
  }
}

/* The split-row path, for a few long rows: `splits` blocks share a row,
 * each taking a contiguous chunk of `chunk` columns. */
struct Split {
  int64_t splits, chunk;
};

/* What block (s, row) of a split-row launch works on: its row, the row's
 * label, and columns [begin, end). */
struct SplitChunk {
  int64_t row, y, begin, end;
};

__device__ __forceinline__ SplitChunk split_chunk(const mcmi_problem &p,
                                                  Split sp) {
  const int64_t row = blockIdx.y, begin = (int64_t)blockIdx.x * sp.chunk;
  return SplitChunk{row, p.target[row * p.target_stride], begin,
                    begin + sp.chunk < p.cols ? begin + sp.chunk : p.cols};
}

/* Pass 1: block (s, row) reduces its chunk to partials parts[row][s][0..1]
 * (main, at_one). */
template <typename T>
__global__ void __launch_bounds__(kThreads)
    split_partials(const mcmi_problem p,
                   const Scale<typename AccOf<T>::type> sc, bool batch,
                   Split sp, Partial<typename AccOf<T>::type> *parts) {
  using A = typename AccOf<T>::type;
  __shared__ Partial<A> shared[kThreads / kWarp];
  const SplitChunk c = split_chunk(p, sp);
  if (c.y == p.ignore_index) {
    return; /* uniform over the block */
  }
  const T *z = (const T *)p.logits + c.row * p.logits_stride;
  const RowSetup<A> su = row_setup<A>(p, batch, sc);
  Partial<A> main = empty_partial<A>(), at_one = empty_partial<A>();
  accumulate_row(z, su, c.begin, c.end, (int)threadIdx.x, kThreads, main,
                 at_one);
  main = group_reduce<A, kThreads>(main, su.sc, shared);
  if (su.separate) {
    at_one = group_reduce<A, kThreads>(at_one, unit_scale<A>(), shared);
  }
  if (threadIdx.x == 0) {
    parts[(c.row * sp.splits + blockIdx.x) * 2] = main;
    parts[(c.row * sp.splits + blockIdx.x) * 2 + 1] = at_one;
  }
}

/* Pass 2, a thread per row: combines the row's partials in chunk order,
 * into parts[row][0][0..1]. */
template <typename T>
__global__ void split_softmax(const mcmi_problem p,
                              const Scale<typename AccOf<T>::type> sc, Split sp,
                              Partial<typename AccOf<T>::type> *parts) {
  using A = typename AccOf<T>::type;
  const int64_t row = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (row >= p.rows || p.target[row * p.target_stride] == p.ignore_index) {
    return;
  }
  Partial<A> *mine = parts + row * sp.splits * 2;
  for (int64_t s = 1; s < sp.splits; ++s) {
    mine[0] = combine(mine[0], mine[2 * s], sc);
    mine[1] = combine(mine[1], mine[2 * s + 1], unit_scale<A>());
  }
}

/* Pass 3: block (s, row) forms the KL sums of its chunk, kl_parts[row][s]. */
template <typename T>
__global__ void __launch_bounds__(kThreads)
    split_kl(const mcmi_problem p, const Scale<typename AccOf<T>::type> sc,
             const typename AccOf<T>::type *q_batch, const int64_t *slot_of,
             const int64_t *counts, Split sp,
             const Partial<typename AccOf<T>::type> *parts,
             KLPart<typename AccOf<T>::type> *kl_parts) {
  using A = typename AccOf<T>::type;
  __shared__ KLPart<A> kl_shared[kThreads / kWarp];
  const SplitChunk c = split_chunk(p, sp);
  if (c.y == p.ignore_index || alone_in_class(p, counts, c.y)) {
    return; /* uniform over the block; split_results needs no KL sums */
  }
  const T *z = (const T *)p.logits + c.row * p.logits_stride;
  const A *q = row_centroids(p, q_batch, slot_of, c.y);
  const RowSetup<A> su = row_setup<A>(p, q_batch != nullptr, sc);
  const Partial<A> main = parts[c.row * sp.splits * 2];
  const KLPart<A> part = group_sum<A, kThreads>(
      kl_columns(z, q, su, main.m, (A)1 / main.s, c.begin, c.end,
                 (int)threadIdx.x, kThreads),
      kl_shared);
  if (threadIdx.x == 0) {
    kl_parts[c.row * sp.splits + blockIdx.x] = part;
  }
}

/* Pass 4, a thread per row: adds the row's KL sums in chunk order into its
 * value (row_val, rows_out) and results[row]. */
template <typename T>
__global__ void
split_results(const mcmi_problem p, const Scale<typename AccOf<T>::type> sc,
              const int64_t *counts, Split sp,
              const Partial<typename AccOf<T>::type> *parts,
              const KLPart<typename AccOf<T>::type> *kl_parts,
              RowResult<typename AccOf<T>::type> *results, double *row_val,
              T *rows_out, int64_t rows_stride) {
  using A = typename AccOf<T>::type;
  const int64_t row = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (row >= p.rows) {
    return;
  }
  const int64_t y = p.target[row * p.target_stride];
  if (y == p.ignore_index) {
    ignored_row<T>(row, row_val, rows_out, rows_stride, nullptr, 0, 0, 1, true);
    return;
  }
  const RowSetup<A> su = row_setup<A>(p, counts != nullptr, sc);
  const Partial<A> *combined = parts + row * sp.splits * 2;
  const bool alone = alone_in_class(p, counts, y);
  const KLPart<A> *mine = kl_parts + row * sp.splits;
  KLPart<A> part = alone ? alone_part(combined[0].s) : mine[0];
  for (int64_t s = 1; !alone && s < sp.splits; ++s) {
    part.g += mine[s].g;
    part.q += mine[s].q;
  }
  const T *z = (const T *)p.logits + row * p.logits_stride;
  const RowResult<A> r =
      row_result(p, z, y, su, combined[0], combined[1], part);
  results[row] = r;
  row_val[row] = r.value;
  if (rows_out) {
    rows_out[row * rows_stride] = store<T>((A)r.value);
  }
}

/* Pass 5: block (s, row) writes its chunk of the gradient. */
template <typename T>
__global__ void __launch_bounds__(kThreads)
    split_grad(const mcmi_problem p, const Scale<typename AccOf<T>::type> sc,
               const typename AccOf<T>::type *q_batch, const int64_t *slot_of,
               const int64_t *counts, Split sp,
               const RowResult<typename AccOf<T>::type> *results,
               const int64_t *valid, T *grad, int64_t grad_stride) {
  using A = typename AccOf<T>::type;
  const SplitChunk c = split_chunk(p, sp);
  const T *z = (const T *)p.logits + c.row * p.logits_stride;
  T *g = grad + c.row * grad_stride;
  if (c.y == p.ignore_index) {
    ignored_row<T>(c.row, nullptr, nullptr, 0, g, c.begin + threadIdx.x, c.end,
                   kThreads, false);
    return;
  }
  const A *q = row_centroids(p, q_batch, slot_of, c.y);
  const RowSetup<A> su = row_setup<A>(p, q_batch != nullptr, sc);
  write_grad(p, z, q, c.y, su, results[c.row], alone_in_class(p, counts, c.y),
             valid, g, c.begin, c.end, (int)threadIdx.x, kThreads);
}

/* Sum over the threads of a one-block launch, in a fixed tree order; the
 * result is returned to every thread. */
template <typename V> __device__ V block_sum(V v, V *part) {
  part[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s /= 2) {
    if ((int)threadIdx.x < s) {
      part[threadIdx.x] += part[threadIdx.x + s];
    }
    __syncthreads();
  }
  const V r = part[0];
  __syncthreads();
  return r;
}

/* Exclusive prefix sum over the threads of a one-block launch
 * (Hillis-Steele); *total receives the sum of all. */
template <typename V>
__device__ V block_exclusive_scan(V v, V *part, V *total) {
  part[threadIdx.x] = v;
  __syncthreads();
  for (int d = 1; d < kThreads; d *= 2) {
    const V add = (int)threadIdx.x >= d ? part[threadIdx.x - d] : (V)0;
    __syncthreads();
    part[threadIdx.x] += add;
    __syncthreads();
  }
  const V inclusive = part[threadIdx.x];
  *total = part[kThreads - 1];
  __syncthreads();
  return inclusive - v;
}

__device__ __forceinline__ bool in_class_range(int64_t y,
                                               const mcmi_problem &p) {
  return y != p.ignore_index && y >= 0 && y < p.classes;
}

/* One block: the number of rows whose label is not ignore_index. With
 * stop_on_bad (class sums, the EMA update), a label out of range stops the
 * kernel with a device-side assertion, as torch's own label checks do: the
 * first such row and its label are printed, and the error reaches the host
 * at its next synchronizing call, with no sync here. (The loss instead
 * makes such a row NaN.) */
__global__ void scan_targets(const mcmi_problem p, int64_t *valid,
                             bool stop_on_bad) {
  __shared__ long long part[kThreads];
  long long c = 0, first_bad = LLONG_MAX;
  for (int64_t i = threadIdx.x; i < p.rows; i += kThreads) {
    const int64_t y = p.target[i * p.target_stride];
    c += y != p.ignore_index;
    if (y != p.ignore_index && !in_class_range(y, p) && i < first_bad) {
      first_bad = i;
    }
  }
  c = block_sum(c, part);
  part[threadIdx.x] = first_bad;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s /= 2) {
    if ((int)threadIdx.x < s && part[threadIdx.x + s] < part[threadIdx.x]) {
      part[threadIdx.x] = part[threadIdx.x + s];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    *valid = c;
    const long long bad = part[0];
    if (stop_on_bad && bad != LLONG_MAX) {
      printf("mcmi: target[%lld] = %lld is out of range: labels must be in "
             "[0, %lld) or equal ignore_index (%lld)\n",
             bad, (long long)p.target[bad * p.target_stride],
             (long long)p.classes, (long long)p.ignore_index);
      assert(!"mcmi: a label is out of range");
    }
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

/* Per row with a label in range: the maximum m of z and, of the row's sum
 * s = sum e^{(z - m)/T}, log s (log_probs: the row's log-softmax at T is
 * (z - m)/T - log s) or 1/s (its softmax is e^{(z - m)/T} / s). */
template <typename T, int GROUP>
__global__ void __launch_bounds__(kThreads)
    row_stats(const mcmi_problem p, const Scale<typename AccOf<T>::type> sc,
              int log_probs, double *row_m, double *row_norm) {
  using A = typename AccOf<T>::type;
  __shared__ Partial<A> shared[kThreads / kWarp];
  const int64_t row =
      (int64_t)blockIdx.x * (kThreads / GROUP) + threadIdx.x / GROUP;
  if (row >= p.rows || !in_class_range(p.target[row * p.target_stride], p)) {
    return; /* uniform over the group */
  }
  const T *z = (const T *)p.logits + row * p.logits_stride;
  Partial<A> part = empty_partial<A>();
  for (int64_t j = threadIdx.x % GROUP; j < p.cols; j += GROUP) {
    push(part, load(z[j]), sc);
  }
  part = group_reduce<A, GROUP>(part, sc, shared);
  if (threadIdx.x % GROUP == 0) {
    row_m[row] = (double)part.m;
    row_norm[row] = log_probs ? (double)dlog(part.s) : 1.0 / (double)part.s;
  }
}

/* counts[y] += 1 for every row with a label in range (integer atomics:
 * order-free). */
__global__ void count_classes(const mcmi_problem p, int64_t *counts) {
  const int64_t i = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (i < p.rows) {
    const int64_t y = p.target[i * p.target_stride];
    if (in_class_range(y, p)) {
      atomicAdd((unsigned long long *)&counts[y], 1ull);
    }
  }
}

/* Compact slots for the classes present. */
struct Slots {
  int64_t *slot_of;    /* [classes]: slot of each class present */
  int64_t *slot_class; /* [max slots]: class of each slot */
  int64_t *count;      /* [max slots]: rows of each slot */
  int64_t *offset;     /* [max slots]: first position in `order` */
  int64_t *used;       /* number of slots */
};

/*
 * Slots numbered in class order, by three kernels that span the device:
 * class_block_totals counts the classes present and their rows in each
 * block of kThreads classes; scan_block_totals (one block) turns the counts
 * into each block's first slot and first position, and the number of slots;
 * assign_slots numbers the classes present within each block from there.
 * `totals` holds [blocks] first slots, then [blocks] first positions.
 */
__global__ void class_block_totals(const int64_t *counts, int64_t classes,
                                   int64_t *totals) {
  __shared__ long long part[kThreads];
  const int64_t c = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  const long long n = c < classes ? counts[c] : 0;
  const long long present = block_sum(n > 0 ? 1ll : 0ll, part);
  const long long rows = block_sum(n, part);
  if (threadIdx.x == 0) {
    totals[blockIdx.x] = present;
    totals[gridDim.x + blockIdx.x] = rows;
  }
}

__global__ void scan_block_totals(int64_t blocks, int64_t *totals,
                                  int64_t *used) {
  __shared__ long long part[kThreads];
  long long slot_carry = 0, row_carry = 0, total = 0;
  for (int64_t b0 = 0; b0 < blocks; b0 += kThreads) {
    const int64_t b = b0 + threadIdx.x;
    const long long present = b < blocks ? totals[b] : 0;
    const long long rows = b < blocks ? totals[blocks + b] : 0;
    const long long slot = block_exclusive_scan(present, part, &total);
    const long long first_slot = slot_carry + slot;
    slot_carry += total;
    const long long at = block_exclusive_scan(rows, part, &total);
    if (b < blocks) {
      totals[b] = first_slot;
      totals[blocks + b] = row_carry + at;
    }
    row_carry += total;
  }
  if (threadIdx.x == 0) {
    *used = slot_carry;
  }
}

__global__ void assign_slots(const int64_t *counts, int64_t classes,
                             const int64_t *totals, Slots sl) {
  __shared__ long long part[kThreads];
  const int64_t c = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  const long long n = c < classes ? counts[c] : 0;
  long long total;
  const long long slot = totals[blockIdx.x] +
                         block_exclusive_scan(n > 0 ? 1ll : 0ll, part, &total);
  const long long at =
      totals[gridDim.x + blockIdx.x] + block_exclusive_scan(n, part, &total);
  if (n > 0) {
    sl.slot_of[c] = slot;
    sl.slot_class[slot] = c;
    sl.count[slot] = n;
    sl.offset[slot] = at;
  }
}

/*
 * order[offset[s] + r] = the r-th row (in row order) of slot s, by three
 * kernels that span the device, without atomics. Rows are taken in chunks
 * of kThreads, a block each. chunk_rows sorts its chunk's (slot, lane) keys
 * (bitonic), ranks each row within its slot's run in the chunk and counts
 * each run into the (chunk, slot) table; chunk_offsets turns every slot's
 * counts into positions, chunk by chunk (a thread per slot); place_rows puts
 * each row at its chunk's position for its slot plus its rank.
 */
struct RunTable {
  int64_t *at; /* [chunks][max slots]: run counts, then positions */
  int64_t slots;
};

__global__ void chunk_rows(const mcmi_problem p, const int64_t *slot_of,
                           int32_t *rank, RunTable tab) {
  __shared__ long long key[kThreads];
  __shared__ int head[kThreads];
  const int t = (int)threadIdx.x;
  const long long none = LLONG_MAX;
  const int64_t base = (int64_t)blockIdx.x * kThreads, i = base + t;
  const int64_t y = i < p.rows ? p.target[i * p.target_stride] : -1;
  key[t] = i < p.rows && in_class_range(y, p)
               ? (long long)slot_of[y] * kThreads + t
               : none;
  __syncthreads();
  for (int k = 2; k <= kThreads; k *= 2) {
    for (int j = k / 2; j > 0; j /= 2) {
      const int o = t ^ j;
      if (o > t) {
        const bool up = (t & k) == 0;
        const long long a = key[t], b = key[o];
        if ((a > b) == up) {
          key[t] = b;
          key[o] = a;
        }
      }
      __syncthreads();
    }
  }
  const long long mine = key[t];
  const long long s = mine / kThreads;
  head[t] = t == 0 || key[t - 1] / kThreads != s ? t : 0;
  __syncthreads();
  for (int d = 1; d < kThreads; d *= 2) {
    const int h = t >= d && head[t - d] > head[t] ? head[t - d] : head[t];
    __syncthreads();
    head[t] = h;
    __syncthreads();
  }
  const int r = t - head[t];
  const bool last = t == kThreads - 1 || key[t + 1] / kThreads != s;
  if (mine != none) {
    rank[base + mine % kThreads] = r;
    if (last) {
      tab.at[(int64_t)blockIdx.x * tab.slots + s] = r + 1;
    }
  }
}

__global__ void chunk_offsets(Slots sl, RunTable tab, int64_t chunks) {
  const int64_t s = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (s >= tab.slots || s >= *sl.used) {
    return;
  }
  int64_t at = sl.offset[s];
  for (int64_t c = 0; c < chunks; ++c) {
    int64_t *cell = tab.at + c * tab.slots + s;
    const int64_t n = *cell;
    *cell = at;
    at += n;
  }
}

/* A launch of one block per chunk. */
__global__ void place_rows(const mcmi_problem p, const int64_t *slot_of,
                           const int32_t *rank, RunTable tab, int64_t *order) {
  const int64_t i = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (i >= p.rows) {
    return;
  }
  const int64_t y = p.target[i * p.target_stride];
  if (in_class_range(y, p)) {
    order[tab.at[(int64_t)blockIdx.x * tab.slots + slot_of[y]] + rank[i]] = i;
  }
}

/* Columns per block of slot_sums: a warp's width, so loads coalesce. */
constexpr int kSumCols = kWarp;
constexpr unsigned kMaxGridY = 65535;

/* out[row(s)][j] = sum over the rows of slot s of softmax(z/T)_j (log_softmax
 * with log_probs), divided by the count when `mean`; row(s) is the slot's
 * class when by_class, else s. A block takes (slot, 32 columns): warp w sums
 * the slot's rows w, w + 8, ... in order, then warp 0 adds the 8 partials in
 * warp order; all in double, as on the CPU (the KL against a mean of similar
 * rows needs it exact to well below float32's rounding of a many-term sum).
 * Column tiles beyond grid.y are taken in a strided loop. */
template <typename T>
__global__ void __launch_bounds__(kThreads)
    slot_sums(const mcmi_problem p, const Scale<typename AccOf<T>::type> sc,
              const double *row_m, const double *row_norm, Slots sl,
              const int64_t *order, int log_probs, int mean, int by_class,
              typename AccOf<T>::type *out, int64_t out_stride) {
  using A = typename AccOf<T>::type;
  constexpr int warps = kThreads / kWarp;
  __shared__ double part[warps][kSumCols];
  const int lane = (int)(threadIdx.x % kWarp), w = (int)(threadIdx.x / kWarp);
  /* Slots beyond the grid are taken in a strided loop (uniform over the
   * block, as are the tiles). */
  for (int64_t s = blockIdx.x; s < *sl.used; s += gridDim.x) {
    const int64_t n = sl.count[s];
    const int64_t *rows = order + sl.offset[s];
    A *o = out + (by_class ? sl.slot_class[s] : s) * out_stride;
    const int64_t tiles = (p.cols + kSumCols - 1) / kSumCols;
    for (int64_t tile = blockIdx.y; tile < tiles; tile += gridDim.y) {
      const int64_t j = tile * kSumCols + lane;
      double acc = 0.0;
      for (int64_t k = w; k < n && j < p.cols; k += warps) {
        const int64_t i = rows[k];
        const T *z = (const T *)p.logits + i * p.logits_stride;
        const A u = scaled(load(z[j]) - (A)row_m[i], sc);
        acc += log_probs ? (double)(u - (A)row_norm[i])
                         : (double)dexp(u) * row_norm[i];
      }
      part[w][lane] = acc;
      __syncthreads();
      if (w == 0 && j < p.cols) {
        double sum = part[0][lane];
        for (int k = 1; k < warps; ++k) {
          sum += part[k][lane];
        }
        o[j] = (A)(mean ? sum * (1.0 / (double)n) : sum);
      }
      __syncthreads();
    }
  }
}

/* Zero rows of `out` for classes with no rows (class_sums output); a
 * row_grid launch (rows on y, columns on x, no division per element). */
template <typename A>
__global__ void zero_absent(const int64_t *counts, int64_t classes,
                            int64_t cols, A *out, int64_t out_stride) {
  for (int64_t c = blockIdx.y; c < classes; c += gridDim.y) {
    if (counts[c] != 0) {
      continue;
    }
    for (int64_t j = (int64_t)blockIdx.x * kThreads + threadIdx.x; j < cols;
         j += (int64_t)gridDim.x * kThreads) {
      out[c * out_stride + j] = (A)0;
    }
  }
}

/* EMA step for the classes present (slots in a strided loop);
 * `seen` is read here and set by ema_mark_seen afterwards. */
template <typename A>
__global__ void ema_apply(const A *means, Slots sl, int64_t cols, A momentum,
                          const uint8_t *seen, A *q, int64_t q_stride) {
  for (int64_t s = blockIdx.x; s < *sl.used; s += gridDim.x) {
    const int64_t c = sl.slot_class[s];
    const A *b = means + s * cols;
    A *row = q + c * q_stride;
    for (int64_t j = (int64_t)blockIdx.y * kThreads + threadIdx.x; j < cols;
         j += (int64_t)gridDim.y * kThreads) {
      row[j] = seen[c] ? row[j] + momentum * (b[j] - row[j]) : b[j];
    }
  }
}

__global__ void ema_mark_seen(Slots sl, int64_t max_slots, uint8_t *seen) {
  const int64_t s = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (s < max_slots && s < *sl.used) {
    seen[sl.slot_class[s]] = 1;
  }
}

/* x[i][j] *= scale[i]; a row_grid launch, in 16-byte vectors between a
 * scalar head and tail (vector_span). */
template <typename T>
__global__ void scale_rows_kernel(T *x, int64_t rows, int64_t cols,
                                  int64_t stride, const T *scale,
                                  int64_t scale_stride) {
  constexpr int V = 16 / sizeof(T);
  const int64_t lane = (int64_t)blockIdx.x * kThreads + threadIdx.x,
                group = (int64_t)gridDim.x * kThreads;
  for (int64_t i = blockIdx.y; i < rows; i += gridDim.y) {
    const auto k = load(scale[i * scale_stride]);
    T *r = x + i * stride;
    const Span sp = vector_span(r, 0, cols);
    for (int64_t j = lane; j < sp.first; j += group) {
      r[j] = store<T>(load(r[j]) * k);
    }
    Vec<T> *rv = (Vec<T> *)(r + sp.first);
    for (int64_t v = lane; v < sp.vectors; v += group) {
      Vec<T> w = rv[v];
      for (int e = 0; e < V; ++e) {
        w.v[e] = store<T>(load(w.v[e]) * k);
      }
      rv[v] = w;
    }
    for (int64_t j = sp.first + sp.vectors * V + lane; j < cols; j += group) {
      r[j] = store<T>(load(r[j]) * k);
    }
  }
}

/* ------------------------------------------------------------- host side */

size_t align_up(size_t n) { return (n + 255u) & ~(size_t)255u; }

/* Slots for at most min(rows, classes) classes present. */
int64_t max_slots(const mcmi_problem *p) {
  return p->rows < p->classes ? p->rows : p->classes;
}

/* Device workspace: valid count, per-row values and stats, class counts,
 * slot tables, row order, (in-batch or EMA) the means of the classes
 * present, [min(rows, classes)][cols], and the split-row partials and
 * results. */
struct Layout {
  size_t valid, row_val, row_m, row_norm, counts, slot_of, slot_class,
      slot_count, slot_offset, used, class_totals, order, rank, runs, means,
      parts, kl_parts, results, total;
};

/* The split-row path serves fewer than kSplitMaxRows rows of at least
 * kSplitMinCols columns: up to about kSplitBlocks blocks in all, chunks of
 * at least kSplitMinChunk columns (a multiple of the warp size). */
constexpr int64_t kSplitMaxRows = 256, kSplitMinCols = 8192,
                  kSplitBlocks = 1024, kSplitMinChunk = 4096;

Split split_plan(const mcmi_problem *p) {
  const Split none{1, p->cols};
  if (p->rows == 0 || p->rows >= kSplitMaxRows || p->cols < kSplitMinCols) {
    return none;
  }
  int64_t splits = (p->cols + kSplitMinChunk - 1) / kSplitMinChunk;
  const int64_t fill = (kSplitBlocks + p->rows - 1) / p->rows;
  splits = splits < fill ? splits : fill;
  if (splits < 2) {
    return none;
  }
  int64_t chunk = (p->cols + splits - 1) / splits;
  chunk = (chunk + kWarp - 1) / kWarp * kWarp;
  return Split{(p->cols + chunk - 1) / chunk, chunk};
}

/* a * b, or SIZE_MAX when it overflows. */
size_t mul_or_max(size_t a, size_t b) {
  size_t r;
  return __builtin_mul_overflow(a, b, &r) ? SIZE_MAX : r;
}

/* The workspace layout of a problem; total is 0 when a byte count
 * overflows (the entry points then refuse the problem). */
Layout make_layout(const mcmi_problem *p, bool means) {
  const size_t rows = (size_t)p->rows, k = (size_t)p->classes,
               slots = (size_t)max_slots(p),
               chunks = (rows + kThreads - 1) / kThreads;
  Layout l;
  size_t at = 0;
  bool ok = true;
  const auto take = [&at, &ok](size_t n, size_t size) {
    const size_t here = at, bytes = mul_or_max(n, size);
    size_t end;
    if (__builtin_add_overflow(at, bytes, &end) ||
        end > (size_t)PTRDIFF_MAX - 255u) {
      ok = false;
      return here;
    }
    at = align_up(end);
    return here;
  };
  l.valid = take(1, sizeof(int64_t));
  l.used = take(1, sizeof(int64_t));
  l.row_val = take(rows, sizeof(double));
  l.row_m = take(rows, sizeof(double));
  l.row_norm = take(rows, sizeof(double));
  l.counts = take(k, sizeof(int64_t));
  l.slot_of = take(k, sizeof(int64_t));
  l.slot_class = take(slots, sizeof(int64_t));
  l.slot_count = take(slots, sizeof(int64_t));
  l.slot_offset = take(slots, sizeof(int64_t));
  l.class_totals =
      take(mul_or_max((k + kThreads - 1) / kThreads, 2), sizeof(int64_t));
  l.order = take(rows, sizeof(int64_t));
  l.rank = take(rows, sizeof(int32_t));
  l.runs = take(mul_or_max(chunks, slots), sizeof(int64_t));
  l.means = take(means ? mul_or_max(slots, (size_t)p->cols) : 0,
                 mcmi_acc_size(p->dtype));
  const Split sp = split_plan(p);
  const size_t split_rows = sp.splits > 1 ? rows : 0;
  const size_t split_parts = mul_or_max(split_rows, (size_t)sp.splits);
  l.parts = take(mul_or_max(split_parts, 2), sizeof(Partial<double>));
  l.kl_parts = take(split_parts, sizeof(KLPart<double>));
  l.results = take(split_rows, sizeof(RowResult<double>));
  l.total = ok ? at : 0;
  return l;
}

Slots slots_in(const Layout &l, char *ws) {
  return Slots{(int64_t *)(ws + l.slot_of), (int64_t *)(ws + l.slot_class),
               (int64_t *)(ws + l.slot_count), (int64_t *)(ws + l.slot_offset),
               (int64_t *)(ws + l.used)};
}

unsigned blocks_for(int64_t n) {
  return (unsigned)((n + kThreads - 1) / kThreads);
}

unsigned grid_y_for(int64_t tiles) {
  return (unsigned)(tiles < (int64_t)kMaxGridY ? tiles : kMaxGridY);
}

/* Blocks for work over the slots of the classes present, whose number is
 * known only on the device: at most kSlotBlocks, each taking slots in a
 * strided loop (not one block per possible slot, min(rows, classes)). */
constexpr int64_t kSlotBlocks = 1024;
unsigned slot_blocks(const mcmi_problem &p) {
  const int64_t n = max_slots(&p);
  return (unsigned)(n < kSlotBlocks ? (n > 0 ? n : 1) : kSlotBlocks);
}

/* A grid for `rows` rows of `cols` columns: rows on y, column tiles of
 * kThreads on x, both in strided loops beyond the grid's bounds. */
dim3 row_grid(int64_t rows, int64_t cols) {
  const int64_t tiles = (cols + kThreads - 1) / kThreads;
  return dim3((unsigned)(tiles < 1024 ? (tiles > 0 ? tiles : 1) : 1024),
              grid_y_for(rows > 0 ? rows : 1));
}

/* Whether an entry point may launch: not on top of an error that earlier
 * work on this thread left pending (it is left for its owner to read). */
bool no_pending_error() { return cudaPeekAtLastError() == cudaSuccess; }

/* MCMI_ERROR_LAUNCH when a launch or memset of this call failed (the
 * entry points launch only with no error pending); clears the error. */
mcmi_status launch_status() {
  return cudaGetLastError() == cudaSuccess ? MCMI_OK : MCMI_ERROR_LAUNCH;
}

/* The one place a dtype becomes a C++ type: calls f(T()) with T the
 * element type of logits of that dtype (accumulation type AccOf<T>). */
template <typename F> void with_logits_type(mcmi_dtype dtype, F &&f) {
  switch (dtype) {
  case MCMI_FLOAT32:
    f(float());
    break;
  case MCMI_FLOAT64:
    f(double());
    break;
  case MCMI_BFLOAT16:
    f(__nv_bfloat16());
    break;
  case MCMI_FLOAT16:
    f(__half());
    break;
  }
}

/* Row stats, counts, slots and row order of the rows with labels in range,
 * then the sums (or means) of the classes present into out: by class
 * (out_stride apart) or by slot (cols apart). Needs p.rows > 0. */
template <typename T, int GROUP>
void slot_sums_into(const mcmi_problem &p, const Layout &l, char *ws,
                    int log_probs, int mean, int by_class,
                    typename AccOf<T>::type *out, int64_t out_stride,
                    int64_t *counts, cudaStream_t s) {
  double *row_m = (double *)(ws + l.row_m),
         *row_norm = (double *)(ws + l.row_norm);
  const Slots sl = slots_in(l, ws);
  const auto sc = scale_of<typename AccOf<T>::type>(p.temperature);
  const unsigned row_blocks =
      (unsigned)((p.rows + kThreads / GROUP - 1) / (kThreads / GROUP));
  row_stats<T, GROUP>
      <<<row_blocks, kThreads, 0, s>>>(p, sc, log_probs, row_m, row_norm);
  count_classes<<<blocks_for(p.rows), kThreads, 0, s>>>(p, counts);
  const unsigned class_blocks = blocks_for(p.classes);
  int64_t *totals = (int64_t *)(ws + l.class_totals);
  class_block_totals<<<class_blocks, kThreads, 0, s>>>(counts, p.classes,
                                                       totals);
  scan_block_totals<<<1, kThreads, 0, s>>>(class_blocks, totals, sl.used);
  assign_slots<<<class_blocks, kThreads, 0, s>>>(counts, p.classes, totals, sl);
  const int64_t chunks = (p.rows + kThreads - 1) / kThreads;
  const RunTable tab{(int64_t *)(ws + l.runs), max_slots(&p)};
  int32_t *rank = (int32_t *)(ws + l.rank);
  if (cudaMemsetAsync(tab.at, 0, (size_t)(chunks * tab.slots) * sizeof(int64_t),
                      s) != cudaSuccess) {
    return; /* launch_status reports it */
  }
  chunk_rows<<<(unsigned)chunks, kThreads, 0, s>>>(p, sl.slot_of, rank, tab);
  chunk_offsets<<<blocks_for(tab.slots), kThreads, 0, s>>>(sl, tab, chunks);
  place_rows<<<(unsigned)chunks, kThreads, 0, s>>>(p, sl.slot_of, rank, tab,
                                                   (int64_t *)(ws + l.order));
  const dim3 grid(slot_blocks(p),
                  grid_y_for((p.cols + kSumCols - 1) / kSumCols));
  slot_sums<T><<<grid, kThreads, 0, s>>>(
      p, sc, row_m, row_norm, sl, (const int64_t *)(ws + l.order), log_probs,
      mean, by_class, out, out_stride);
}

template <typename T, int GROUP>
void loss_launch(const mcmi_problem &p, void *loss, int64_t loss_stride,
                 void *grad, int64_t grad_stride, char *ws, cudaStream_t s) {
  using A = typename AccOf<T>::type;
  const bool batch = p.centroids == nullptr;
  const Layout l = make_layout(&p, batch);
  const Scale<A> sc = scale_of<A>(p.temperature);
  int64_t *valid = (int64_t *)(ws + l.valid);
  double *row_val = (double *)(ws + l.row_val);
  A *means = batch ? (A *)(ws + l.means) : nullptr;
  int64_t *counts = (int64_t *)(ws + l.counts);
  /* The class counts tell the kernels which rows are alone in their class
   * (in-batch means only). */
  const int64_t *alone_counts = batch ? counts : nullptr;
  scan_targets<<<1, kThreads, 0, s>>>(p, valid, false);
  const bool per_row = p.reduction == MCMI_REDUCTION_NONE;
  T *rows_out = per_row ? (T *)loss : nullptr;
  const int64_t *slot_of = (const int64_t *)(ws + l.slot_of);
  const Split sp = split_plan(&p);
  if (p.rows > 0) {
    if (batch) {
      if (cudaMemsetAsync(counts, 0, (size_t)p.classes * sizeof(int64_t), s) !=
          cudaSuccess) {
        return; /* launch_status reports it */
      }
      slot_sums_into<T, GROUP>(p, l, ws, 0, 1, 0, means, p.cols, counts, s);
    }
    if (sp.splits > 1) {
      Partial<A> *parts = (Partial<A> *)(ws + l.parts);
      KLPart<A> *kl_parts = (KLPart<A> *)(ws + l.kl_parts);
      RowResult<A> *results = (RowResult<A> *)(ws + l.results);
      const dim3 grid((unsigned)sp.splits, (unsigned)p.rows);
      split_partials<T><<<grid, kThreads, 0, s>>>(p, sc, batch, sp, parts);
      split_softmax<T>
          <<<blocks_for(p.rows), kThreads, 0, s>>>(p, sc, sp, parts);
      split_kl<T><<<grid, kThreads, 0, s>>>(p, sc, means, slot_of, alone_counts,
                                            sp, parts, kl_parts);
      split_results<T><<<blocks_for(p.rows), kThreads, 0, s>>>(
          p, sc, alone_counts, sp, parts, kl_parts, results, row_val, rows_out,
          loss_stride);
      if (grad) {
        split_grad<T><<<grid, kThreads, 0, s>>>(p, sc, means, slot_of,
                                                alone_counts, sp, results,
                                                valid, (T *)grad, grad_stride);
      }
    } else {
      const unsigned blocks =
          (unsigned)((p.rows + kThreads / GROUP - 1) / (kThreads / GROUP));
      loss_rows<T, GROUP><<<blocks, kThreads, 0, s>>>(
          p, sc, means, slot_of, alone_counts, valid, row_val, rows_out,
          loss_stride, (T *)grad, grad_stride);
    }
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
                   int log_probs, int mean, int by_class,
                   typename AccOf<T>::type *out, int64_t out_stride,
                   int64_t *counts, cudaStream_t s) {
  if (p.cols <= 1024) {
    slot_sums_into<T, kWarp>(p, l, ws, log_probs, mean, by_class, out,
                             out_stride, counts, s);
  } else {
    slot_sums_into<T, kThreads>(p, l, ws, log_probs, mean, by_class, out,
                                out_stride, counts, s);
  }
}

/* Class sums (by class) or means (by slot) in A = AccOf<T> of the logits
 * type T. */
template <typename A>
void sums_any(const mcmi_problem &p, const Layout &l, char *ws, int log_probs,
              int mean, int by_class, A *out, int64_t out_stride,
              int64_t *counts, cudaStream_t s) {
  with_logits_type(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same<typename AccOf<T>::type, A>::value) {
      sums_dispatch<T>(p, l, ws, log_probs, mean, by_class, out, out_stride,
                       counts, s);
    }
  });
}

template <typename A>
void class_sums_launch(const mcmi_problem &p, int log_probs, A *sums,
                       int64_t sums_stride, int64_t *counts, char *ws,
                       cudaStream_t s) {
  const Layout l = make_layout(&p, false);
  scan_targets<<<1, kThreads, 0, s>>>(p, (int64_t *)(ws + l.valid), true);
  if (cudaMemsetAsync(counts, 0, (size_t)p.classes * sizeof(int64_t), s) !=
      cudaSuccess) {
    return; /* launch_status reports it */
  }
  if (p.rows > 0) {
    sums_any<A>(p, l, ws, log_probs, 0, 1, sums, sums_stride, counts, s);
  }
  zero_absent<A><<<row_grid(p.classes, p.cols), kThreads, 0, s>>>(
      counts, p.classes, p.cols, sums, sums_stride);
}

template <typename A>
void ema_launch(const mcmi_problem &p, A momentum, A *centroids,
                int64_t centroids_stride, uint8_t *seen, char *ws,
                cudaStream_t s) {
  const Layout l = make_layout(&p, true);
  scan_targets<<<1, kThreads, 0, s>>>(p, (int64_t *)(ws + l.valid), true);
  if (p.rows == 0) {
    return;
  }
  int64_t *counts = (int64_t *)(ws + l.counts);
  A *means = (A *)(ws + l.means);
  if (cudaMemsetAsync(counts, 0, (size_t)p.classes * sizeof(int64_t), s) !=
      cudaSuccess) {
    return; /* launch_status reports it */
  }
  sums_any<A>(p, l, ws, 0, 1, 0, means, p.cols, counts, s);
  const Slots sl = slots_in(l, ws);
  const int64_t slots = max_slots(&p);
  const dim3 grid(slot_blocks(p),
                  grid_y_for((p.cols + kThreads - 1) / kThreads));
  ema_apply<A><<<grid, kThreads, 0, s>>>(means, sl, p.cols, momentum, seen,
                                         centroids, centroids_stride);
  ema_mark_seen<<<blocks_for(slots), kThreads, 0, s>>>(sl, slots, seen);
}

} // namespace

extern "C" {

size_t mcmi_cuda_loss_workspace(const mcmi_problem *p) {
  return mcmi_problem_ok(p) ? make_layout(p, p->centroids == nullptr).total : 0;
}

size_t mcmi_cuda_class_sums_workspace(const mcmi_problem *p) {
  return mcmi_problem_ok(p) ? make_layout(p, true).total : 0;
}

mcmi_status mcmi_cuda_loss(const mcmi_problem *p, void *loss,
                           int64_t loss_stride, void *grad, int64_t grad_stride,
                           void *workspace, void *stream) {
  if (!mcmi_loss_problem_ok(p) || workspace == nullptr ||
      make_layout(p, p->centroids == nullptr).total == 0 ||
      (loss == nullptr &&
       !(p->reduction == MCMI_REDUCTION_NONE && p->rows == 0))) {
    return MCMI_ERROR_ARGUMENT;
  }
  if (!no_pending_error()) {
    return MCMI_ERROR_LAUNCH;
  }
  cudaStream_t s = (cudaStream_t)stream;
  char *ws = (char *)workspace;
  with_logits_type(p->dtype, [&](auto tag) {
    loss_dispatch<decltype(tag)>(*p, loss, loss_stride, grad, grad_stride, ws,
                                 s);
  });
  return launch_status();
}

mcmi_status mcmi_cuda_class_sums(const mcmi_problem *p, int log_probs,
                                 void *sums, int64_t sums_stride,
                                 int64_t *counts, void *workspace,
                                 void *stream) {
  if (!mcmi_problem_ok(p) || sums == nullptr || counts == nullptr ||
      workspace == nullptr || make_layout(p, false).total == 0) {
    return MCMI_ERROR_ARGUMENT;
  }
  if (!no_pending_error()) {
    return MCMI_ERROR_LAUNCH;
  }
  cudaStream_t s = (cudaStream_t)stream;
  char *ws = (char *)workspace;
  with_logits_type(p->dtype, [&](auto tag) {
    using A = typename AccOf<decltype(tag)>::type;
    class_sums_launch<A>(*p, log_probs, (A *)sums, sums_stride, counts, ws, s);
  });
  return launch_status();
}

mcmi_status mcmi_cuda_ema_update(const mcmi_problem *p, double momentum,
                                 void *centroids, int64_t centroids_stride,
                                 uint8_t *seen, void *workspace, void *stream) {
  if (!mcmi_problem_ok(p) || centroids == nullptr || seen == nullptr ||
      workspace == nullptr || !mcmi_momentum_ok(momentum) ||
      make_layout(p, true).total == 0) {
    return MCMI_ERROR_ARGUMENT;
  }
  if (!no_pending_error()) {
    return MCMI_ERROR_LAUNCH;
  }
  cudaStream_t s = (cudaStream_t)stream;
  char *ws = (char *)workspace;
  with_logits_type(p->dtype, [&](auto tag) {
    using A = typename AccOf<decltype(tag)>::type;
    ema_launch<A>(*p, (A)momentum, (A *)centroids, centroids_stride, seen, ws,
                  s);
  });
  return launch_status();
}

mcmi_status mcmi_cuda_scale_rows(mcmi_dtype dtype, void *x, int64_t rows,
                                 int64_t cols, int64_t stride,
                                 const void *scale, int64_t scale_stride,
                                 void *stream) {
  if (!mcmi_scale_rows_ok(dtype, x, rows, cols, stride, scale, scale_stride)) {
    return MCMI_ERROR_ARGUMENT;
  }
  if (rows == 0 || cols == 0) {
    return MCMI_OK;
  }
  if (!no_pending_error()) {
    return MCMI_ERROR_LAUNCH;
  }
  cudaStream_t s = (cudaStream_t)stream;
  with_logits_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    scale_rows_kernel<T><<<row_grid(rows, cols), kThreads, 0, s>>>(
        (T *)x, rows, cols, stride, (const T *)scale, scale_stride);
  });
  return launch_status();
}

} // extern "C"
