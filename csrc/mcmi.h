/*
 * mcmi.h: the C interface of the MCMI kernels.
 *
 * The kernels know nothing of torch: they take pointers, sizes, row strides
 * (in elements; columns are always contiguous) and a thread count. Every
 * entry point returns an mcmi_status; on anything but MCMI_OK the outputs are
 * unspecified. Callers validate shapes first; the kernels still never index
 * memory with a label outside [0, classes).
 *
 * Notation (see docs/math.md): logits z [rows, cols], labels y [rows],
 * centroids Q [classes, cols], temperature T,
 *   P_i   = softmax(z_i / T),
 *   KL_i  = sum_j P_ij (log P_ij - log max(Q_{y_i j}, floor)),
 *   CE_i  = logsumexp(z_i) - z_{i y_i}                      (temperature 1),
 *   row_i = ce_weight * CE_i + cmi_weight * KL_i            (valid rows),
 * reduced over the valid rows (label != ignore_index) by sum, mean or none.
 */
#ifndef MCMI_H
#define MCMI_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Element type of the logits (and of the loss and gradient outputs). */
typedef enum {
  MCMI_FLOAT32 = 0,
  MCMI_FLOAT64 = 1,
  MCMI_BFLOAT16 = 2,
  MCMI_FLOAT16 = 3
} mcmi_dtype;

/* The number of dtypes: they are 0 .. MCMI_DTYPE_COUNT - 1. */
#define MCMI_DTYPE_COUNT 4

typedef enum {
  MCMI_REDUCTION_NONE = 0,
  MCMI_REDUCTION_MEAN = 1,
  MCMI_REDUCTION_SUM = 2
} mcmi_reduction;

typedef enum {
  MCMI_OK = 0,
  /* A label is neither in [0, classes) nor ignore_index; *bad_index is
   * its row. */
  MCMI_ERROR_TARGET = 1,
  /* A centroid row used by a sample does not sum to 1 within
   * MCMI_CENTROID_SUM_TOLERANCE (a NaN sum included); *bad_index is the
   * class. Reported for given centroids only. */
  MCMI_ERROR_CENTROIDS = 2,
  /* A null pointer, a bad size (K > C with a CE term included) or an
   * unknown enum value. */
  MCMI_ERROR_ARGUMENT = 3,
  /* A CUDA kernel launch failed (CUDA kernels only). */
  MCMI_ERROR_LAUNCH = 4
} mcmi_status;

/* Tolerance on |sum_j Q_cj - 1| for user-given centroid rows. */
#define MCMI_CENTROID_SUM_TOLERANCE 1e-3

/*
 * One loss problem. Centroids, when given, are float64 for float64 logits
 * and float32 otherwise; centroids == NULL selects in-batch centroids
 * (the mean softmax of the valid rows of each class present).
 */
typedef struct {
  int64_t rows;    /* B >= 0 */
  int64_t cols;    /* C >= 1 */
  int64_t classes; /* K >= 1; K <= C when ce_weight != 0 */
  mcmi_dtype dtype;
  const void *logits;
  int64_t logits_stride;
  const int64_t *target;
  int64_t target_stride;
  const void *centroids;
  int64_t centroids_stride;
  /* Non-zero: centroids hold log max(Q, floor) (precomputed by the caller),
   * used as they are; their rows are then not checked. */
  int log_centroids;
  double temperature; /* > 0 */
  double ce_weight;
  double cmi_weight;
  double floor; /* log Q is taken of max(Q, floor) */
  int64_t ignore_index;
  mcmi_reduction reduction;
} mcmi_problem;

/*
 * Checks every label: each must be ignore_index or in [0, classes).
 * Writes the number of valid rows to *valid (may be NULL). On
 * MCMI_ERROR_TARGET, *bad_index is the first offending row.
 */
mcmi_status mcmi_check_targets(const int64_t *target, int64_t stride,
                               int64_t rows, int64_t classes,
                               int64_t ignore_index, int64_t *valid,
                               int64_t *bad_index);

/* Bytes of scratch memory mcmi_cpu_loss needs for this problem. */
size_t mcmi_cpu_loss_workspace(const mcmi_problem *p, int num_threads,
                               int with_grad);

/*
 * Loss (and optionally its gradient with respect to the logits).
 *   loss: for MEAN and SUM one element, for NONE `rows` elements spaced
 *         loss_stride apart (0 for ignored rows); in the logits' dtype.
 *   grad: NULL, or [rows, cols] with row stride grad_stride in the logits'
 *         dtype: d(reduced loss)/dz, or for NONE d(row_i)/dz_i.
 *   workspace: at least mcmi_cpu_loss_workspace(p, num_threads, grad != NULL)
 *         bytes, aligned to 64.
 * Results are bitwise identical for every num_threads >= 1.
 */
mcmi_status mcmi_cpu_loss(const mcmi_problem *p, void *loss,
                          int64_t loss_stride, void *grad, int64_t grad_stride,
                          void *workspace, int num_threads, int64_t *bad_index);

/* Bytes of scratch memory mcmi_cpu_class_sums needs. */
size_t mcmi_cpu_class_sums_workspace(const mcmi_problem *p);

/*
 * Per-class sums of softmax(z_i / T) rows (or of log_softmax rows when
 * log_probs is non-zero) over the valid rows, and per-class counts.
 *   sums:   [classes, cols], row stride sums_stride; float64 for float64
 *           logits, float32 otherwise. Fully overwritten.
 *   counts: [classes]. Fully overwritten.
 * Only rows, cols, classes, dtype, logits, target, temperature and
 * ignore_index of p are read. Bitwise identical for every num_threads.
 */
mcmi_status mcmi_cpu_class_sums(const mcmi_problem *p, int log_probs,
                                void *sums, int64_t sums_stride,
                                int64_t *counts, void *workspace,
                                int num_threads, int64_t *bad_index);

/* Bytes of scratch memory mcmi_cpu_ema_update needs with this many
 * threads (per thread cols doubles and cols floats, or doubles for float64
 * logits, plus O(rows + classes)). */
size_t mcmi_cpu_ema_workspace(const mcmi_problem *p, int num_threads);

/*
 * In place, for every class c present among the valid rows, with b_c the
 * mean of softmax(z_i / T) over its rows:
 *   centroids[c] = seen[c] ? centroids[c] + momentum (b_c - centroids[c])
 *                          : b_c,          seen[c] = 1.
 * Rows of absent classes are left as they are: O(rows * cols + classes).
 * centroids: [classes, cols], row stride centroids_stride, float64 for
 * float64 logits and float32 otherwise; seen: [classes] bytes (0 or 1).
 * Only rows, cols, classes, dtype, logits, target, temperature and
 * ignore_index of p are read. Bitwise identical for every num_threads; the
 * workspace is sized by mcmi_cpu_ema_workspace for the same num_threads.
 */
mcmi_status mcmi_cpu_ema_update(const mcmi_problem *p, double momentum,
                                void *centroids, int64_t centroids_stride,
                                uint8_t *seen, void *workspace, int num_threads,
                                int64_t *bad_index);

/*
 * The instruction sets the CPU kernels are built for: on x86-64 (built with
 * GCC) all three, elsewhere the baseline alone. Every one computes bitwise
 * the same results; they differ in speed only.
 */
typedef enum {
  MCMI_ISA_BASELINE = 0, /* x86-64 (SSE2), or the target's baseline */
  MCMI_ISA_AVX2 = 1,     /* x86-64-v3: AVX2, FMA */
  MCMI_ISA_AVX512 = 2    /* x86-64-v4: AVX-512 F, BW, CD, DQ, VL */
} mcmi_isa;

/* The number of instruction sets: they are 0 .. MCMI_ISA_COUNT - 1. */
#define MCMI_ISA_COUNT 3

/* "baseline", "avx2" or "avx512"; NULL for a value outside mcmi_isa. */
const char *mcmi_cpu_isa_name(mcmi_isa isa);

/* Non-zero when the kernels are built for isa and this CPU runs it. */
int mcmi_cpu_isa_supported(mcmi_isa isa);

/* The instruction set the CPU kernels run: the one last set by
 * mcmi_cpu_set_isa, else the best this CPU supports. */
mcmi_isa mcmi_cpu_get_isa(void);

/*
 * Runs the CPU kernels with isa from now on; MCMI_ERROR_ARGUMENT (and no
 * change) when isa is unknown, not built, or not run by this CPU. Not to be
 * called while a kernel runs in another thread.
 */
mcmi_status mcmi_cpu_set_isa(mcmi_isa isa);

/*
 * In place: x[i, :] *= scale[i * scale_stride] for every row, with
 * scale_stride 0 for one scale for all rows. x and scale share `dtype`;
 * the product is formed in float32 (float64 for MCMI_FLOAT64).
 */
mcmi_status mcmi_cpu_scale_rows(mcmi_dtype dtype, void *x, int64_t rows,
                                int64_t cols, int64_t stride, const void *scale,
                                int64_t scale_stride, int num_threads);

#ifdef __cplusplus
}
#endif

#endif /* MCMI_H */
