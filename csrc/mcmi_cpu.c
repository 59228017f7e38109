/*
 * mcmi_cpu.c: CPU kernels of the MCMI loss (C11, OpenMP).
 *
 * Rows are split across threads; every per-row and per-class reduction runs
 * in a fixed order inside one thread, so results are bitwise identical for
 * any thread count.
 */
#include "mcmi.h"

#include <float.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "mcmi_check.h"
#include "mcmi_dtype.h"
#include "mcmi_math.h"

/*
 * The kernels are compiled once per instruction set of mcmi_isa (mcmi.h):
 * on x86-64 with GCC for AVX-512 (x86-64-v4), AVX2 + FMA (x86-64-v3) and
 * the x86-64 baseline, elsewhere (or with MCMI_PORTABLE) for the baseline
 * alone. Every build computes bitwise the same results: no contraction into
 * FMA (the build passes -ffp-contract=off; the baseline has no FMA), exp
 * and log of mcmi_math.h (never libm's, which glibc picks by CPU), and
 * every reduction over MCMI_LANES fixed lanes added in one fixed order
 * (MCMI_LANE_LOOP), whatever width the instruction set gives a vector.
 */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) &&         \
    !defined(MCMI_PORTABLE)
#define MCMI_X86_LEVELS 1
#else
#define MCMI_X86_LEVELS 0
#endif
/* Lanes of every reduction: lane l takes the elements l, l + MCMI_LANES,
 * l + 2 MCMI_LANES, ... of its loop. */
#define MCMI_LANES 16
/* Elements per block of a row reduction (see mcmi_cpu_kernels.inc). */
#define MCMI_BLOCK 512

/*
 * Runs the statements of the variadic argument for j = 0 .. n - 1, with l =
 * j % MCMI_LANES the lane of element j: each group of MCMI_LANES elements
 * is one SIMD loop, whose iterations touch their own lane only (so the
 * vector width cannot change a result), then the rest of the elements.
 */
#define MCMI_LANE_LOOP(n, ...)                                                 \
  do {                                                                         \
    const int64_t lane_n_ = (n);                                               \
    int64_t lane_j0_ = 0;                                                      \
    for (; lane_j0_ + MCMI_LANES <= lane_n_; lane_j0_ += MCMI_LANES) {         \
      _Pragma("omp simd") for (int l = 0; l < MCMI_LANES; ++l) {               \
        const int64_t j = lane_j0_ + l;                                        \
        __VA_ARGS__                                                            \
      }                                                                        \
    }                                                                          \
    _Pragma("omp simd") for (int l = 0; l < (int)(lane_n_ - lane_j0_); ++l) {  \
      const int64_t j = lane_j0_ + l;                                          \
      __VA_ARGS__                                                              \
    }                                                                          \
  } while (0)

/* Helpers of row loops are inlined into every instruction set's kernels,
 * so each gets that instruction set. */
#define MCMI_INLINE static inline __attribute__((always_inline))

/* Per-block statistics of one row of the loss (mcmi_cpu_kernels.inc): the
 * block's maximum logit, its sums of e^{(z - max) / T} and (for a CE term
 * at T = 1) of e^{z - max}, and the factors that rescale those sums to the
 * row maximum. */
typedef struct {
  double max, sum, sum_ce, scale, scale_ce;
} mcmi_block_stat;

/* Byte offsets of the workspace regions of mcmi_cpu_loss. */
typedef struct {
  size_t row_val;    /* double[rows] */
  size_t row_qsum;   /* double[rows] */
  size_t scratch;    /* per thread: block stats, then ACC_T[cols] (with a
                        gradient ACC_T[3][cols]) at offset `terms`; with
                        in-batch centroids at least double[cols] (the sum of
                        a class mean) and ACC_T[cols] after it */
  size_t per_thread; /* bytes of one thread's scratch */
  size_t terms;
  size_t class_map;  /* int64[classes], in-batch centroids only */
  size_t slot;       /* int64[rows], in-batch centroids only */
  size_t order;      /* int64[rows], in-batch centroids only */
  size_t slot_count; /* int64[min(rows, classes) + 1], in-batch only */
  size_t batch_q;    /* ACC_T[min(rows, classes)][cols], in-batch only */
  size_t total;
} loss_layout;

static size_t align64(size_t n) { return (n + 63u) & ~(size_t)63u; }

/* *out = align64(count * size), or 0 when that exceeds MCMI_MAX_BYTES. */
static int bytes_of(size_t count, size_t size, size_t *out) {
  size_t n;
  if (__builtin_mul_overflow(count, size, &n) || n > MCMI_MAX_BYTES) {
    return 0;
  }
  *out = align64(n);
  return 1;
}

/* A bump allocator over byte offsets that records any overflow. */
typedef struct {
  size_t at;
  int ok;
} layout_cursor;

static size_t take(layout_cursor *c, size_t count, size_t size) {
  const size_t start = c->at;
  size_t bytes;
  if (!bytes_of(count, size, &bytes) ||
      __builtin_add_overflow(c->at, bytes, &c->at) || c->at > MCMI_MAX_BYTES) {
    c->ok = 0;
    c->at = 0;
    return 0;
  }
  return start;
}

/* Fewer threads for small problems (one per 4096 elements): forking costs
 * more than it saves below that. */
static int effective_threads(int num_threads, int64_t rows, int64_t cols) {
  const int64_t per_thread = 4096;
  int64_t elements;
  if (__builtin_mul_overflow(rows, cols, &elements)) {
    elements = INT64_MAX - per_thread;
  }
  int64_t useful = (elements + per_thread - 1) / per_thread;
  if (useful < 1) {
    useful = 1;
  }
  if (num_threads < 1) {
    num_threads = 1;
  }
  return useful < num_threads ? (int)useful : num_threads;
}

/* Threads of class sums and the EMA update: as many as rows or classes
 * can use. */
static int class_threads(const mcmi_problem *p, int num_threads) {
  const int64_t extent = p->rows > p->classes ? p->rows : p->classes;
  return effective_threads(num_threads, extent, p->cols);
}

/*
 * The layout of mcmi_cpu_loss's workspace, or of mcmi_cpu_ema_update's (an
 * in-batch problem with `ema` set: the means go straight into the
 * centroids, so there is no batch_q); 0 when a size overflows.
 */
static int make_loss_layout(const mcmi_problem *p, int nt, int with_grad,
                            int ema, loss_layout *l) {
  const size_t rows = (size_t)p->rows, cols = (size_t)p->cols;
  const size_t acc = mcmi_acc_size(p->dtype);
  const size_t nslots = (size_t)(p->rows < p->classes ? p->rows : p->classes);
  const size_t nblocks = cols / MCMI_BLOCK + 1;
  const int batch = p->centroids == NULL;
  size_t per_col = (with_grad ? 3u : 1u) * acc;
  if (batch && per_col < sizeof(double) + acc) {
    per_col = sizeof(double) + acc;
  }
  layout_cursor c = {0, 1};
  size_t terms_bytes = 0;
  l->row_val = take(&c, rows, sizeof(double));
  l->row_qsum = take(&c, rows, sizeof(double));
  if (!bytes_of(nblocks, sizeof(mcmi_block_stat), &l->terms) ||
      !bytes_of(cols, per_col, &terms_bytes) ||
      __builtin_add_overflow(l->terms, terms_bytes, &l->per_thread)) {
    return 0;
  }
  l->scratch = take(&c, (size_t)nt, l->per_thread);
  l->class_map = l->slot = l->order = l->slot_count = l->batch_q = c.at;
  if (batch) {
    size_t means;
    if (__builtin_mul_overflow(nslots, cols, &means)) {
      return 0;
    }
    l->class_map = take(&c, (size_t)p->classes, sizeof(int64_t));
    l->slot = take(&c, rows, sizeof(int64_t));
    l->order = take(&c, rows, sizeof(int64_t));
    l->slot_count = take(&c, nslots + 1u, sizeof(int64_t));
    l->batch_q = ema ? c.at : take(&c, means, acc);
  }
  l->total = c.at;
  return c.ok;
}

/*
 * Gives each class present among the valid rows a compact slot, in order of
 * first appearance; slot[i] = -1 for ignored rows. Returns the slot count.
 */
static int64_t assign_slots(const mcmi_problem *p, int64_t *map, int64_t *slot,
                            int64_t *count) {
  int64_t nslots = 0;
  for (int64_t c = 0; c < p->classes; ++c) {
    map[c] = -1;
  }
  for (int64_t i = 0; i < p->rows; ++i) {
    const int64_t y = p->target[i * p->target_stride];
    if (y == p->ignore_index || y < 0 || y >= p->classes) {
      slot[i] = -1;
      continue;
    }
    if (map[y] < 0) {
      map[y] = nslots;
      count[nslots] = 0;
      ++nslots;
    }
    slot[i] = map[y];
    ++count[map[y]];
  }
  return nslots;
}

/*
 * Groups the valid rows of an in-batch problem by class: slots (assign_slots)
 * in class_map and slot, and the rows of slot c, in row order, at
 * order[start[c]..start[c + 1]) with start at slot_count. Returns the slot
 * count.
 */
static int64_t group_rows(const mcmi_problem *p, const loss_layout *lay,
                          char *ws) {
  int64_t *start = (int64_t *)(ws + lay->slot_count);
  int64_t *slots = (int64_t *)(ws + lay->slot);
  int64_t *order = (int64_t *)(ws + lay->order);
  const int64_t nslots =
      assign_slots(p, (int64_t *)(ws + lay->class_map), slots, start);
  /* Counts to start offsets, then the rows of each slot in row order. */
  int64_t at = 0;
  for (int64_t c = 0; c < nslots; ++c) {
    const int64_t n = start[c];
    start[c] = at;
    at += n;
  }
  start[nslots] = at;
  for (int64_t i = 0; i < p->rows; ++i) {
    if (slots[i] >= 0) {
      order[start[slots[i]]++] = i;
    }
  }
  for (int64_t c = nslots; c > 0; --c) {
    start[c] = start[c - 1];
  }
  start[0] = 0;
  return nslots;
}

/* True when slot c of a grouping (group_rows) holds a single row. */
static inline int single_row_slot(const int64_t *start, int64_t c) {
  return start[c + 1] - start[c] == 1;
}

/* The kernels of one logits type; the entry points below pick a row of
 * the current instruction set's table once, after checking the dtype. */
typedef struct {
  mcmi_status (*loss)(const mcmi_problem *p, const loss_layout *lay,
                      int64_t valid, void *loss, int64_t loss_stride,
                      void *grad, int64_t grad_stride, char *ws, int nt,
                      int64_t *bad_index);
  void (*class_accumulate)(const mcmi_problem *p, const int64_t *slot,
                           int64_t nslots, void *sums, int64_t sums_stride,
                           double *row_m, double *row_ls, int log_probs,
                           int nt);
  void (*ema_update)(const mcmi_problem *p, const loss_layout *lay,
                     double momentum, void *centroids, int64_t centroids_stride,
                     uint8_t *seen, char *ws, int nt);
  void (*scale_rows)(void *x, int64_t rows, int64_t cols, int64_t stride,
                     const void *scale, int64_t scale_stride, int nt);
} cpu_kernels;

/* The kernels of every logits type for each instruction set: the table
 * kernels_<ISA>[MCMI_DTYPE_COUNT] (mcmi_cpu_isa.inc). */
#if MCMI_X86_LEVELS
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#define ISA avx512
#include "mcmi_cpu_isa.inc"
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
#define ISA avx2
#include "mcmi_cpu_isa.inc"
#pragma GCC pop_options
#endif

#define ISA baseline
#include "mcmi_cpu_isa.inc"

static const cpu_kernels *const kernels_by_isa[MCMI_ISA_COUNT] = {
    [MCMI_ISA_BASELINE] = kernels_baseline,
#if MCMI_X86_LEVELS
    [MCMI_ISA_AVX2] = kernels_avx2,
    [MCMI_ISA_AVX512] = kernels_avx512,
#endif
};

static const char *const isa_names[MCMI_ISA_COUNT] = {
    [MCMI_ISA_BASELINE] = "baseline",
    [MCMI_ISA_AVX2] = "avx2",
    [MCMI_ISA_AVX512] = "avx512",
};

const char *mcmi_cpu_isa_name(mcmi_isa isa) {
  return (unsigned)isa < MCMI_ISA_COUNT ? isa_names[isa] : NULL;
}

int mcmi_cpu_isa_supported(mcmi_isa isa) {
  if ((unsigned)isa >= MCMI_ISA_COUNT || kernels_by_isa[isa] == NULL) {
    return 0;
  }
#if MCMI_X86_LEVELS
  __builtin_cpu_init();
  if (isa == MCMI_ISA_AVX512) {
    return __builtin_cpu_supports("x86-64-v4");
  }
  if (isa == MCMI_ISA_AVX2) {
    return __builtin_cpu_supports("x86-64-v3");
  }
#endif
  return 1;
}

/* The instruction set in use; -1 until the first call picks one. */
static _Atomic int current_isa = -1;

mcmi_isa mcmi_cpu_get_isa(void) {
  int isa = current_isa;
  if (isa < 0) {
    isa = MCMI_ISA_COUNT - 1;
    while (isa > 0 && !mcmi_cpu_isa_supported((mcmi_isa)isa)) {
      --isa;
    }
    current_isa = isa;
  }
  return (mcmi_isa)isa;
}

mcmi_status mcmi_cpu_set_isa(mcmi_isa isa) {
  if (!mcmi_cpu_isa_supported(isa)) {
    return MCMI_ERROR_ARGUMENT;
  }
  current_isa = (int)isa;
  return MCMI_OK;
}

/* The kernels of one dtype (checked by the caller) in the current
 * instruction set. */
static const cpu_kernels *kernels_of(mcmi_dtype dtype) {
  return &kernels_by_isa[mcmi_cpu_get_isa()][dtype];
}

size_t mcmi_cpu_loss_workspace(const mcmi_problem *p, int num_threads,
                               int with_grad) {
  loss_layout lay;
  if (!mcmi_problem_ok(p) ||
      !make_loss_layout(p, effective_threads(num_threads, p->rows, p->cols),
                        with_grad, 0, &lay)) {
    return 0;
  }
  return lay.total;
}

mcmi_status mcmi_cpu_loss(const mcmi_problem *p, void *loss,
                          int64_t loss_stride, void *grad, int64_t grad_stride,
                          void *workspace, int num_threads,
                          int64_t *bad_index) {
  if (!mcmi_loss_problem_ok(p)) {
    return MCMI_ERROR_ARGUMENT;
  }
  const size_t elem = mcmi_logit_size(p->dtype);
  const int per_row = p->reduction == MCMI_REDUCTION_NONE;
  /* Per-row losses of an empty batch are an empty (possibly NULL) array. */
  if ((loss == NULL && !(per_row && p->rows == 0)) ||
      !mcmi_extent_ok(per_row ? p->rows : 1, loss_stride, 1, elem, 1) ||
      (grad != NULL &&
       !mcmi_extent_ok(p->rows, grad_stride, p->cols, elem, 1))) {
    return MCMI_ERROR_ARGUMENT;
  }
  int64_t valid = 0, bad = -1;
  mcmi_status st =
      mcmi_check_targets(p->target, p->target_stride, p->rows, p->classes,
                         p->ignore_index, &valid, &bad);
  if (st != MCMI_OK) {
    if (bad_index) {
      *bad_index = bad;
    }
    return st;
  }
  const int nt = effective_threads(num_threads, p->rows, p->cols);
  loss_layout lay;
  if (!make_loss_layout(p, nt, grad != NULL, 0, &lay) ||
      (lay.total > 0 && workspace == NULL)) {
    return MCMI_ERROR_ARGUMENT;
  }
  char *ws = (char *)workspace;
  st = kernels_of(p->dtype)->loss(p, &lay, valid, loss, loss_stride, grad,
                                  grad_stride, ws, nt, &bad);
  if (st != MCMI_OK && bad_index) {
    *bad_index = bad;
  }
  return st;
}

/* The class-sums workspace: slot int64[rows], then row_m and row_ls
 * double[rows] each; 0 when a size overflows. */
static int class_sums_layout(const mcmi_problem *p, size_t *slot_bytes,
                             size_t *stat_bytes, size_t *total) {
  if (!bytes_of((size_t)p->rows, sizeof(int64_t), slot_bytes) ||
      !bytes_of((size_t)p->rows, sizeof(double), stat_bytes) ||
      *slot_bytes > MCMI_MAX_BYTES / 3 || *stat_bytes > MCMI_MAX_BYTES / 3) {
    return 0;
  }
  *total = *slot_bytes + 2u * *stat_bytes;
  return 1;
}

size_t mcmi_cpu_class_sums_workspace(const mcmi_problem *p) {
  size_t slot_bytes, stat_bytes, total;
  if (!mcmi_problem_ok(p) ||
      !class_sums_layout(p, &slot_bytes, &stat_bytes, &total)) {
    return 0;
  }
  return total;
}

mcmi_status mcmi_cpu_class_sums(const mcmi_problem *p, int log_probs,
                                void *sums, int64_t sums_stride,
                                int64_t *counts, void *workspace,
                                int num_threads, int64_t *bad_index) {
  size_t slot_bytes, stat_bytes, total;
  if (!mcmi_problem_ok(p) || sums == NULL || counts == NULL ||
      (p->rows > 0 && workspace == NULL) ||
      !mcmi_extent_ok(p->classes, sums_stride, p->cols, mcmi_acc_size(p->dtype),
                      1) ||
      !class_sums_layout(p, &slot_bytes, &stat_bytes, &total)) {
    return MCMI_ERROR_ARGUMENT;
  }
  mcmi_status st =
      mcmi_check_targets(p->target, p->target_stride, p->rows, p->classes,
                         p->ignore_index, NULL, bad_index);
  if (st != MCMI_OK) {
    return st;
  }
  char *ws = (char *)workspace;
  int64_t *slot = (int64_t *)ws;
  double *row_m = (double *)(ws + slot_bytes);
  double *row_ls = (double *)(ws + slot_bytes + stat_bytes);
  for (int64_t c = 0; c < p->classes; ++c) {
    counts[c] = 0;
  }
  for (int64_t i = 0; i < p->rows; ++i) {
    const int64_t y = p->target[i * p->target_stride];
    slot[i] = y == p->ignore_index ? -1 : y;
    if (slot[i] >= 0) {
      ++counts[y];
    }
  }
  const int nt = class_threads(p, num_threads);
  kernels_of(p->dtype)->class_accumulate(p, slot, p->classes, sums, sums_stride,
                                         row_m, row_ls, log_probs, nt);
  return MCMI_OK;
}

/* The EMA update works on the layout of an in-batch loss without gradient. */
static mcmi_problem batch_problem(const mcmi_problem *p) {
  mcmi_problem b = *p;
  b.centroids = NULL;
  b.log_centroids = 0;
  b.ce_weight = 0.0;
  return b;
}

size_t mcmi_cpu_ema_workspace(const mcmi_problem *p, int num_threads) {
  loss_layout lay;
  if (!mcmi_problem_ok(p)) {
    return 0;
  }
  const mcmi_problem b = batch_problem(p);
  return make_loss_layout(&b, class_threads(p, num_threads), 0, 1, &lay)
             ? lay.total
             : 0;
}

mcmi_status mcmi_cpu_ema_update(const mcmi_problem *p, double momentum,
                                void *centroids, int64_t centroids_stride,
                                uint8_t *seen, void *workspace, int num_threads,
                                int64_t *bad_index) {
  if (!mcmi_problem_ok(p) || centroids == NULL || seen == NULL ||
      workspace == NULL || !mcmi_momentum_ok(momentum) ||
      !mcmi_extent_ok(p->classes, centroids_stride, p->cols,
                      mcmi_acc_size(p->dtype), 1)) {
    return MCMI_ERROR_ARGUMENT;
  }
  const mcmi_status st =
      mcmi_check_targets(p->target, p->target_stride, p->rows, p->classes,
                         p->ignore_index, NULL, bad_index);
  if (st != MCMI_OK) {
    return st;
  }
  const mcmi_problem b = batch_problem(p);
  const int nt = class_threads(p, num_threads);
  loss_layout lay;
  if (!make_loss_layout(&b, nt, 0, 1, &lay)) {
    return MCMI_ERROR_ARGUMENT;
  }
  char *ws = (char *)workspace;
  kernels_of(p->dtype)->ema_update(&b, &lay, momentum, centroids,
                                   centroids_stride, seen, ws, nt);
  return MCMI_OK;
}

mcmi_status mcmi_cpu_scale_rows(mcmi_dtype dtype, void *x, int64_t rows,
                                int64_t cols, int64_t stride, const void *scale,
                                int64_t scale_stride, int num_threads) {
  if (!mcmi_scale_rows_ok(dtype, x, rows, cols, stride, scale, scale_stride)) {
    return MCMI_ERROR_ARGUMENT;
  }
  const int nt = effective_threads(num_threads, rows, cols);
  kernels_of(dtype)->scale_rows(x, rows, cols, stride, scale, scale_stride, nt);
  return MCMI_OK;
}
