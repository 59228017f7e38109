/*
 * test_cuda.cu: the CUDA kernels against the CPU kernels (same dtype) and a
 * float64 reference (the CPU kernels on float64 copies of the inputs), on
 * random problems, without torch: loss values and gradients for fixed, log
 * and in-batch centroids, every reduction and dtype, K != C, T = 1, strided
 * inputs, B = 0, all rows ignored, NaN/inf and large logits, -inf logits
 * (masked classes), tiny and huge temperatures; class sums and the EMA
 * update; bad labels and centroid rows; bitwise repeatability. Every
 * comparison is NaN-aware: a NaN on one side only fails it. The last line is
 * a digest of every kernel output, for comparing runs.
 *
 *   make -C tests/c cuda        build with nvcc; run where a GPU is present
 *   make -C tests/c cucpu       build for the cucpu runtime and run on the CPU
 *
 * Built with -DMCMI_TEST_POISON, the program overwrites every CUDA result
 * with NaN after copying it back, as a kernel that writes NaN would: the
 * checks must then fail (make -C tests/c cucpu-poison).
 */
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/mcmi_cuda.h"
#include "mcmi.h"
#include "mcmi_dtype.h"
#include "test_util.h"

#define CUDA_OK(call)                                                          \
  do {                                                                         \
    cudaError_t e_ = (call);                                                   \
    if (e_ != cudaSuccess) {                                                   \
      fprintf(stderr, "CUDA error %s at %s:%d\n", cudaGetErrorString(e_),      \
              __FILE__, __LINE__);                                             \
      exit(2);                                                                 \
    }                                                                          \
  } while (0)

/* FNV-1a over every byte copied back from the device. */
static uint64_t digest = 1469598103934665603ull;

static void *to_device(const void *host, size_t bytes) {
  void *d = NULL;
  CUDA_OK(cudaMalloc(&d, bytes > 0 ? bytes : 1));
  if (bytes > 0) {
    CUDA_OK(cudaMemcpy(d, host, bytes, cudaMemcpyHostToDevice));
  }
  return d;
}

static void to_host(void *host, const void *dev, size_t bytes, int floats) {
  CUDA_OK(cudaDeviceSynchronize());
  CUDA_OK(cudaMemcpy(host, dev, bytes, cudaMemcpyDeviceToHost));
  for (size_t i = 0; i < bytes; ++i) {
    digest = (digest ^ ((const unsigned char *)host)[i]) * 1099511628211ull;
  }
#ifdef MCMI_TEST_POISON
  if (floats) {
    memset(host, 0xFF, bytes);
  }
#else
  (void)floats;
#endif
}

static const size_t esize[] = {4, 8, 2, 2};

static double load_any(mcmi_dtype t, const void *x, int64_t i) {
  switch (t) {
  case MCMI_FLOAT32:
    return ((const float *)x)[i];
  case MCMI_FLOAT64:
    return ((const double *)x)[i];
  case MCMI_BFLOAT16:
    return mcmi_bf16_load(((const uint16_t *)x)[i]);
  default:
    return mcmi_f16_load(((const uint16_t *)x)[i]);
  }
}

/* max |a - b| / max(1e-2, max |b|), or +inf when a NaN, or an infinity, is
 * on one side only or at different places. */
static double max_rel(const double *a, const double *b, int64_t n) {
  double scale = 1e-2, err = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    if (isnan(a[i]) != isnan(b[i]) ||
        ((isinf(a[i]) || isinf(b[i])) && a[i] != b[i])) {
      return INFINITY;
    }
    if (isfinite(b[i]) && fabs(b[i]) > scale) {
      scale = fabs(b[i]);
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    if (isfinite(a[i]) && fabs(a[i] - b[i]) > err) {
      err = fabs(a[i] - b[i]);
    }
  }
  return err / scale;
}

static void *cpu_ws(size_t bytes) {
  return aligned_alloc(64, (bytes + 127) / 64 * 64);
}

enum {
  PLAIN = 0,
  ALL_IGNORED = 1,
  NONFINITE = 2,
  OFFSET = 3,
  NEG_INF = 4,
  CLOSE = 5 /* logits 1e-4 apart: a softmax spread out at T = 1e-4 */
};

typedef struct {
  int64_t rows, cols, classes;
  int mode; /* 0 fixed, 1 log, 2 in-batch centroids */
  int reduction;
  double temperature;
  mcmi_dtype dtype;
  int64_t pad; /* extra row stride of logits (and target stride 2) */
  int special;
} loss_case;

/* The CPU kernels' loss and gradient as doubles; returns the status. */
static mcmi_status cpu_loss(const mcmi_problem *p, double *loss, int64_t nloss,
                            double *grad, int64_t *bad) {
  const size_t es = esize[p->dtype];
  void *l = calloc((size_t)nloss + 1, es);
  void *g = calloc((size_t)(p->rows * p->cols) + 1, es);
  void *ws = cpu_ws(mcmi_cpu_loss_workspace(p, 2, 1));
  const mcmi_status st = mcmi_cpu_loss(p, l, 1, g, p->cols, ws, 2, bad);
  for (int64_t i = 0; i < nloss; ++i) {
    loss[i] = load_any(p->dtype, l, i);
  }
  for (int64_t i = 0; i < p->rows * p->cols; ++i) {
    grad[i] = load_any(p->dtype, g, i);
  }
  free(l), free(g), free(ws);
  return st;
}

/* The CUDA loss and gradient of p (host pointers: copied to the device) as
 * doubles, twice, checking that both runs agree bitwise. */
static void cuda_loss(const mcmi_problem *p, int64_t centroid_bytes,
                      double *loss, int64_t nloss, double *grad) {
  const size_t es = esize[p->dtype];
  const int64_t rows = p->rows, n = rows * p->cols;
  mcmi_problem d = *p;
  d.logits = to_device(p->logits, (size_t)(rows * p->logits_stride) * es);
  d.target = (const int64_t *)to_device(
      p->target, sizeof(int64_t) * (size_t)(rows * p->target_stride));
  d.centroids =
      p->centroids ? to_device(p->centroids, (size_t)centroid_bytes) : NULL;
  void *dloss = NULL, *dgrad = NULL, *dws = NULL;
  CUDA_OK(cudaMalloc(&dloss, (size_t)(nloss + 1) * es));
  CUDA_OK(cudaMalloc(&dgrad, (size_t)(n + 1) * es));
  CUDA_OK(cudaMalloc(&dws, mcmi_cuda_loss_workspace(&d)));
  void *hl[2], *hg[2];
  for (int run = 0; run < 2; ++run) {
    CHECK(mcmi_cuda_loss(&d, dloss, 1, dgrad, p->cols, dws, NULL) == MCMI_OK,
          "cuda loss");
    hl[run] = calloc((size_t)nloss + 1, es);
    hg[run] = calloc((size_t)n + 1, es);
    to_host(hl[run], dloss, (size_t)nloss * es, 1);
    to_host(hg[run], dgrad, (size_t)n * es, 1);
  }
  CHECK(memcmp(hl[0], hl[1], (size_t)nloss * es) == 0 &&
            memcmp(hg[0], hg[1], (size_t)n * es) == 0,
        "loss %lldx%lld: two runs differ", (long long)rows, (long long)p->cols);
  for (int64_t i = 0; i < nloss; ++i) {
    loss[i] = load_any(p->dtype, hl[0], i);
  }
  for (int64_t i = 0; i < n; ++i) {
    grad[i] = load_any(p->dtype, hg[0], i);
  }
  cudaFree((void *)d.logits), cudaFree((void *)d.target);
  cudaFree((void *)d.centroids), cudaFree(dloss), cudaFree(dgrad);
  cudaFree(dws);
  free(hl[0]), free(hl[1]), free(hg[0]), free(hg[1]);
}

static void check_loss(loss_case c) {
  const int64_t rows = c.rows, cols = c.cols, k = c.classes;
  const int64_t zs = cols + c.pad, ys = c.pad ? 2 : 1;
  const mcmi_dtype t = c.dtype;
  const int wide = t == MCMI_FLOAT64;
  void *z = calloc((size_t)(rows * zs) + 1, esize[t]);
  double *z64 = (double *)calloc((size_t)(rows * zs) + 1, sizeof(double));
  double *q64 = (double *)malloc(sizeof(double) * (size_t)(k * cols));
  double *lq64 = (double *)malloc(sizeof(double) * (size_t)(k * cols));
  float *q32 = (float *)malloc(sizeof(float) * (size_t)(k * cols));
  float *lq32 = (float *)malloc(sizeof(float) * (size_t)(k * cols));
  int64_t *y = (int64_t *)calloc((size_t)(rows * ys) + 1, sizeof(int64_t));
  const double offset = c.special == OFFSET ? 300.0 : 0.0;
  const double spread = c.special == CLOSE ? 1e-4 : 2.5;
  for (int64_t i = 0; i < rows * zs; ++i) {
    store_any(t, z, i, offset + spread * normal());
    z64[i] = load_any(t, z, i); /* the same values, exactly */
  }
  if (c.special == NONFINITE) {
    const double bad[] = {NAN, -INFINITY, INFINITY, NAN};
    for (int64_t i = 0; i < rows && i < 4; ++i) {
      const int64_t j = (i * 7) % cols;
      store_any(t, z, i * zs + j, bad[i]);
      z64[i * zs + j] = bad[i];
    }
    if (rows > 4) { /* a row with every entry non-finite */
      for (int64_t j = 0; j < cols; ++j) {
        store_any(t, z, 4 * zs + j, NAN);
        z64[4 * zs + j] = NAN;
      }
    }
  }
  if (c.special == NEG_INF) {
    /* Masked classes: -inf over most of row 0 (whole blocks of a thread, a
     * warp, a split chunk), at random in the others but row 1, which has
     * no finite logit (NaN). */
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t j = 0; j < cols; ++j) {
        if ((i == 0 && j < cols - 3) || i == 1 || uniform() < 0.3) {
          store_any(t, z, i * zs + j, -INFINITY);
          z64[i * zs + j] = -INFINITY;
        }
      }
    }
  }
  for (int64_t r = 0; r < k; ++r) {
    double s = 0.0;
    for (int64_t j = 0; j < cols; ++j) {
      s += (q64[r * cols + j] = exp(normal()));
    }
    for (int64_t j = 0; j < cols; ++j) {
      q32[r * cols + j] = (float)(q64[r * cols + j] / s);
      q64[r * cols + j] = q32[r * cols + j];
      lq32[r * cols + j] = logf(fmaxf(q32[r * cols + j], 1e-12f));
      lq64[r * cols + j] = lq32[r * cols + j];
    }
  }
  for (int64_t i = 0; i < rows; ++i) {
    y[i * ys] = c.special == ALL_IGNORED || uniform() < 0.1
                    ? -100
                    : (int64_t)(uniform() * (double)k);
  }
  if (c.special == NONFINITE && rows > 4) {
    y[4 * ys] = 0; /* the all-NaN row counts */
  }
  if (c.special == NEG_INF && rows > 1) {
    y[ys] = 0; /* the row with no finite logit counts */
  }
  mcmi_problem p;
  memset(&p, 0, sizeof p);
  p.rows = rows, p.cols = cols, p.classes = k, p.dtype = t;
  p.logits = z, p.logits_stride = zs, p.target = y, p.target_stride = ys;
  p.log_centroids = c.mode == 1;
  p.centroids = c.mode == 2   ? NULL
                : c.mode == 1 ? (wide ? (const void *)lq64 : lq32)
                              : (wide ? (const void *)q64 : q32);
  p.centroids_stride = cols;
  p.temperature = c.temperature;
  p.ce_weight = 1.0, p.cmi_weight = -0.4, p.floor = 1e-12;
  p.ignore_index = -100;
  p.reduction = (mcmi_reduction)c.reduction;

  const int64_t nloss = c.reduction == MCMI_REDUCTION_NONE ? rows : 1;
  const int64_t n = rows * cols;
  double *cl = (double *)calloc((size_t)nloss + 1, sizeof(double));
  double *cg = (double *)calloc((size_t)n + 1, sizeof(double));
  double *gl = (double *)calloc((size_t)nloss + 1, sizeof(double));
  double *gg = (double *)calloc((size_t)n + 1, sizeof(double));
  int64_t bad = -1;
  CHECK(cpu_loss(&p, cl, nloss, cg, &bad) == MCMI_OK, "cpu loss");
  cuda_loss(&p, k * cols * (wide ? 8 : 4), gl, nloss, gg);
  const double tol = t == MCMI_FLOAT64   ? 1e-12
                     : t == MCMI_FLOAT32 ? 2e-6
                                         : 1e-2;
  const double el = max_rel(gl, cl, nloss), eg = max_rel(gg, cg, n);
  CHECK(el <= tol && eg <= tol,
        "loss %lldx%lld K %lld mode %d red %d T %g dtype %d pad %lld special "
        "%d: value %g grad %g vs the CPU",
        (long long)rows, (long long)cols, (long long)k, c.mode, c.reduction,
        c.temperature, (int)t, (long long)c.pad, c.special, el, eg);
  if (t == MCMI_FLOAT32) { /* against the float64 reference */
    mcmi_problem w = p;
    w.dtype = MCMI_FLOAT64;
    w.logits = z64;
    w.centroids = c.mode == 2 ? NULL : c.mode == 1 ? lq64 : q64;
    CHECK(cpu_loss(&w, cl, nloss, cg, &bad) == MCMI_OK, "cpu float64 loss");
    const double rl = max_rel(gl, cl, nloss), rg = max_rel(gg, cg, n);
    CHECK(rl <= 3e-6 && rg <= 3e-6,
          "loss %lldx%lld mode %d red %d special %d: value %g grad %g vs "
          "float64",
          (long long)rows, (long long)cols, c.mode, c.reduction, c.special, rl,
          rg);
  }
  if (c.special == NONFINITE && rows > 4) {
    CHECK(isnan(gg[4 * cols]) && isnan(gg[5 * cols - 1]),
          "a row of NaN logits must give a NaN gradient row");
  }
  /* In-batch means, the CMI term alone, with the row of no finite logit
   * (NEG_INF: row 1) or of NaN logits only (NONFINITE: row 4) alone in its
   * class: its KL pass is skipped, and its value must still be NaN, as on
   * the CPU. */
  const int64_t lone = c.special == NEG_INF ? 1 : 4;
  if ((c.special == NEG_INF || c.special == NONFINITE) && c.mode == 2 &&
      rows > lone) {
    for (int64_t i = 0; i < rows; ++i) {
      y[i * ys] = i != lone && y[i * ys] == 0 ? -100 : y[i * ys];
    }
    p.ce_weight = 0.0;
    CHECK(cpu_loss(&p, cl, nloss, cg, &bad) == MCMI_OK, "cpu loss (CMI)");
    cuda_loss(&p, 0, gl, nloss, gg);
    const double cel = max_rel(gl, cl, nloss), ceg = max_rel(gg, cg, n);
    CHECK(cel <= tol && ceg <= tol && isnan(gl[nloss == 1 ? 0 : lone]),
          "CMI alone, special %d, %lldx%lld dtype %d red %d: value %g grad %g "
          "vs the CPU (row %lld, alone in its class, must be NaN)",
          c.special, (long long)rows, (long long)cols, (int)t, c.reduction, cel,
          ceg, (long long)lone);
  }
  free(z), free(z64), free(q64), free(lq64), free(q32), free(lq32), free(y);
  free(cl), free(cg), free(gl), free(gg);
}

/*
 * Small KLs: rows close to their centroids at T = 10. The CMI term alone,
 * row by row, float32 on the GPU against the float64 reference: within
 * 1e-5 relative (absolute floor 1e-9, plus cols x 1e-12 for in-batch means,
 * which are renormalized after the floor), for given and in-batch
 * centroids, on a warp, a block and split rows.
 */
static void check_small_kl(int64_t rows, int64_t cols, int batch) {
  const int64_t k = 4;
  float *z = (float *)malloc(sizeof(float) * (size_t)(rows * cols) + 4);
  double *z64 = (double *)malloc(sizeof(double) * (size_t)(rows * cols) + 8);
  double *base = (double *)malloc(sizeof(double) * (size_t)(k * cols));
  float *q32 = (float *)malloc(sizeof(float) * (size_t)(k * cols));
  double *q64 = (double *)malloc(sizeof(double) * (size_t)(k * cols));
  int64_t *y = (int64_t *)malloc(sizeof(int64_t) * (size_t)rows + 8);
  const double t = 10.0;
  for (int64_t c = 0; c < k; ++c) {
    double s = 0.0;
    for (int64_t j = 0; j < cols; ++j) {
      base[c * cols + j] = 2.0 * normal();
      s += exp(base[c * cols + j] / t);
    }
    for (int64_t j = 0; j < cols; ++j) {
      q32[c * cols + j] = (float)(exp(base[c * cols + j] / t) / s);
      q64[c * cols + j] = q32[c * cols + j];
    }
  }
  for (int64_t i = 0; i < rows; ++i) {
    y[i] = i % k;
    for (int64_t j = 0; j < cols; ++j) {
      z[i * cols + j] = (float)(base[y[i] * cols + j] + 0.01 * normal());
      z64[i * cols + j] = z[i * cols + j];
    }
  }
  mcmi_problem p;
  memset(&p, 0, sizeof p);
  p.rows = rows, p.cols = cols, p.classes = k, p.dtype = MCMI_FLOAT32;
  p.logits = z, p.logits_stride = cols, p.target = y, p.target_stride = 1;
  p.centroids = batch ? NULL : q32, p.centroids_stride = cols;
  p.temperature = t, p.ce_weight = 0.0, p.cmi_weight = 1.0, p.floor = 1e-12;
  p.ignore_index = -100, p.reduction = MCMI_REDUCTION_NONE;
  double *gl = (double *)calloc((size_t)rows + 1, sizeof(double));
  double *cl = (double *)calloc((size_t)rows + 1, sizeof(double));
  double *gg = (double *)calloc((size_t)(rows * cols) + 1, sizeof(double));
  double *cg = (double *)calloc((size_t)(rows * cols) + 1, sizeof(double));
  cuda_loss(&p, k * cols * 4, gl, rows, gg);
  mcmi_problem w = p;
  w.dtype = MCMI_FLOAT64, w.logits = z64, w.centroids = batch ? NULL : q64;
  int64_t bad = -1;
  CHECK(cpu_loss(&w, cl, rows, cg, &bad) == MCMI_OK, "cpu float64 loss");
  double worst = 0.0, smallest = INFINITY;
  for (int64_t i = 0; i < rows; ++i) {
    const double floor = 1e-9 + (batch ? (double)cols * 1e-12 : 0.0);
    const double err = fabs(gl[i] - cl[i]) / (1e-5 * fabs(cl[i]) + floor);
    worst = isnan(err) ? INFINITY : fmax(worst, err);
    smallest = fmin(smallest, cl[i]);
  }
  CHECK(worst <= 1.0 && smallest < 1e-3,
        "small KL %lldx%lld batch %d: error %g of the allowed (smallest KL "
        "%g)",
        (long long)rows, (long long)cols, batch, worst, smallest);
  free(z), free(z64), free(base), free(q32), free(q64), free(y);
  free(gl), free(cl), free(gg), free(cg);
}

static float *random_logits(int64_t n, double scale) {
  float *z = (float *)malloc(sizeof(float) * (size_t)(n + 1));
  for (int64_t i = 0; i < n; ++i) {
    z[i] = (float)(scale * normal());
  }
  return z;
}

/* Class sums and the EMA update, float32 or float64 logits. */
static void check_class_sums_and_ema(int64_t rows, int64_t cols, int64_t k,
                                     int wide, int log_probs) {
  const int64_t n = rows * cols;
  const size_t es = wide ? 8 : 4;
  float *z32 = random_logits(n, 2.0);
  double *z64 = (double *)malloc(sizeof(double) * (size_t)(n + 1));
  for (int64_t i = 0; i < n; ++i) {
    z64[i] = z32[i];
  }
  int64_t *y = (int64_t *)malloc(sizeof(int64_t) * (size_t)(rows + 1));
  for (int64_t i = 0; i < rows; ++i) {
    y[i] = uniform() < 0.1 ? -100 : (int64_t)(uniform() * (double)k);
  }
  mcmi_problem p;
  memset(&p, 0, sizeof p);
  p.rows = rows, p.cols = cols, p.classes = k;
  p.dtype = wide ? MCMI_FLOAT64 : MCMI_FLOAT32;
  p.logits = wide ? (const void *)z64 : z32;
  p.logits_stride = cols, p.target = y, p.target_stride = 1;
  p.temperature = 1.5, p.ignore_index = -100, p.floor = 1e-12;
  void *sums = malloc(es * (size_t)(k * cols));
  void *gsums = malloc(es * (size_t)(k * cols));
  int64_t *counts = (int64_t *)malloc(sizeof(int64_t) * (size_t)k);
  int64_t *gcounts = (int64_t *)malloc(sizeof(int64_t) * (size_t)k);
  void *ws = cpu_ws(mcmi_cpu_class_sums_workspace(&p));
  int64_t bad = -1;
  CHECK(mcmi_cpu_class_sums(&p, log_probs, sums, cols, counts, ws, 2, &bad) ==
            MCMI_OK,
        "cpu sums");
  free(ws);
  mcmi_problem d = p;
  d.logits = to_device(p.logits, es * (size_t)n);
  d.target = (const int64_t *)to_device(y, sizeof(int64_t) * (size_t)rows);
  void *dsums, *dcounts, *dws;
  CUDA_OK(cudaMalloc(&dsums, es * (size_t)(k * cols)));
  CUDA_OK(cudaMalloc(&dcounts, sizeof(int64_t) * (size_t)k));
  CUDA_OK(cudaMalloc(&dws, mcmi_cuda_class_sums_workspace(&d)));
  CHECK(mcmi_cuda_class_sums(&d, log_probs, dsums, cols, (int64_t *)dcounts,
                             dws, NULL) == MCMI_OK,
        "cuda sums");
  to_host(gsums, dsums, es * (size_t)(k * cols), 1);
  to_host(gcounts, dcounts, sizeof(int64_t) * (size_t)k, 0);
  CHECK(memcmp(counts, gcounts, sizeof(int64_t) * (size_t)k) == 0,
        "class counts differ");
  double *a = (double *)malloc(sizeof(double) * (size_t)(k * cols));
  double *b = (double *)malloc(sizeof(double) * (size_t)(k * cols));
  const mcmi_dtype acc = wide ? MCMI_FLOAT64 : MCMI_FLOAT32;
  for (int64_t i = 0; i < k * cols; ++i) {
    a[i] = load_any(acc, gsums, i);
    b[i] = load_any(acc, sums, i);
  }
  const double tol = wide ? 1e-12 : 2e-6;
  CHECK(max_rel(a, b, k * cols) <= tol, "class sums %lldx%lld K %lld: %g",
        (long long)rows, (long long)cols, (long long)k,
        max_rel(a, b, k * cols));

  /* EMA from the same start on both sides. */
  void *q = malloc(es * (size_t)(k * cols)),
       *gq = malloc(es * (size_t)(k * cols));
  uint8_t *seen = (uint8_t *)calloc((size_t)k, 1),
          *gseen = (uint8_t *)calloc((size_t)k, 1);
  for (int64_t i = 0; i < k * cols; ++i) {
    store_any(acc, q, i, 1.0 / (double)cols);
  }
  for (int64_t c = 0; c < k; c += 2) {
    seen[c] = 1;
  }
  void *dq = to_device(q, es * (size_t)(k * cols));
  void *dseen = to_device(seen, (size_t)k);
  void *ews = cpu_ws(mcmi_cpu_ema_workspace(&p, 2));
  CHECK(mcmi_cpu_ema_update(&p, 0.25, q, cols, seen, ews, 2, &bad) == MCMI_OK,
        "cpu ema");
  free(ews);
  CHECK(mcmi_cuda_ema_update(&d, 0.25, dq, cols, (uint8_t *)dseen, dws, NULL) ==
            MCMI_OK,
        "cuda ema");
  to_host(gq, dq, es * (size_t)(k * cols), 1);
  to_host(gseen, dseen, (size_t)k, 0);
  for (int64_t i = 0; i < k * cols; ++i) {
    a[i] = load_any(acc, gq, i);
    b[i] = load_any(acc, q, i);
  }
  CHECK(max_rel(a, b, k * cols) <= tol, "ema differs by %g",
        max_rel(a, b, k * cols));
  CHECK(memcmp(seen, gseen, (size_t)k) == 0, "seen flags differ");

  cudaFree((void *)d.logits), cudaFree((void *)d.target), cudaFree(dsums);
  cudaFree(dcounts), cudaFree(dws), cudaFree(dq), cudaFree(dseen);
  free(z32), free(z64), free(y), free(sums), free(gsums), free(counts);
  free(gcounts), free(q), free(gq), free(seen), free(gseen), free(a), free(b);
}

/* Bad input: a label out of range and a centroid row that does not sum to 1.
 * The CPU kernels return an error naming the row (label) or class; the CUDA
 * loss gives NaN for exactly the rows concerned (CUDA class sums and the
 * EMA update stop instead: run_bad_label). */
static void check_bad_input(void) {
  const int64_t rows = 6, cols = 5, k = 5;
  float *z = random_logits(rows * cols, 1.0);
  int64_t y[6] = {0, 1, 7, 2, -100, 3};
  float q[25];
  for (int i = 0; i < 25; ++i) {
    q[i] = 0.2f;
  }
  mcmi_problem p;
  memset(&p, 0, sizeof p);
  p.rows = rows, p.cols = cols, p.classes = k, p.dtype = MCMI_FLOAT32;
  p.logits = z, p.logits_stride = cols, p.target = y, p.target_stride = 1;
  p.centroids = q, p.centroids_stride = cols, p.temperature = 1.0;
  p.ce_weight = 1.0, p.cmi_weight = -0.3, p.floor = 1e-12;
  p.ignore_index = -100, p.reduction = MCMI_REDUCTION_NONE;
  double cl[6], cg[30], gl[6], gg[30];
  int64_t bad = -1;
  CHECK(cpu_loss(&p, cl, rows, cg, &bad) == MCMI_ERROR_TARGET && bad == 2,
        "cpu: label out of range at row 2");
  cuda_loss(&p, (int64_t)sizeof q, gl, rows, gg);
  for (int64_t i = 0; i < rows; ++i) {
    CHECK(isnan(gl[i]) == (i == 2) && isnan(gg[i * cols]) == (i == 2),
          "cuda: only row 2 (bad label) is NaN; row %lld: %g", (long long)i,
          gl[i]);
  }
  y[2] = 4;
  q[1 * cols + 3] = 0.3f; /* class 1: rows sum to 1.1 */
  CHECK(cpu_loss(&p, cl, rows, cg, &bad) == MCMI_ERROR_CENTROIDS && bad == 1,
        "cpu: centroid row 1");
  cuda_loss(&p, (int64_t)sizeof q, gl, rows, gg);
  for (int64_t i = 0; i < rows; ++i) {
    CHECK(isnan(gl[i]) == (i == 1) && isnan(gg[i * cols + 2]) == (i == 1),
          "cuda: only row 1 (centroid row 1) is NaN; row %lld: %g",
          (long long)i, gl[i]);
  }

  y[2] = -3;
  void *ws = cpu_ws(mcmi_cpu_class_sums_workspace(&p));
  float sums[25];
  int64_t counts[5];
  CHECK(mcmi_cpu_class_sums(&p, 0, sums, cols, counts, ws, 2, &bad) ==
                MCMI_ERROR_TARGET &&
            bad == 2,
        "cpu class sums: label out of range at row 2");
  free(ws);
  uint8_t seen[5] = {0, 1, 0, 1, 0};
  ws = cpu_ws(mcmi_cpu_ema_workspace(&p, 2));
  CHECK(mcmi_cpu_ema_update(&p, 0.5, q, cols, seen, ws, 2, &bad) ==
                MCMI_ERROR_TARGET &&
            bad == 2,
        "cpu ema: label out of range at row 2");
  free(ws);
  free(z);
}

/*
 * `test_cuda bad-label sums|ema`: CUDA class sums or the EMA update with
 * the label -3 at row 2. The kernel must stop with a device-side assertion
 * naming the row and the label (the Makefile runs this and expects the
 * program to fail with that message): it returns only if it did not.
 */
static int run_bad_label(const char *what) {
  setvbuf(stdout, NULL, _IONBF, 0); /* the kernel's message before the stop */
  const int64_t rows = 6, cols = 5, k = 5;
  float *z = random_logits(rows * cols, 1.0);
  int64_t y[6] = {0, 1, -3, 2, -100, 3};
  float q[25];
  uint8_t seen[5] = {0, 1, 0, 1, 0};
  for (int i = 0; i < 25; ++i) {
    q[i] = 0.2f;
  }
  mcmi_problem d;
  memset(&d, 0, sizeof d);
  d.rows = rows, d.cols = cols, d.classes = k, d.dtype = MCMI_FLOAT32;
  d.logits = to_device(z, sizeof(float) * (size_t)(rows * cols));
  d.logits_stride = cols, d.target_stride = 1, d.temperature = 1.0;
  d.target = (const int64_t *)to_device(y, sizeof y);
  d.floor = 1e-12, d.ignore_index = -100;
  void *dsums, *dcounts, *dws, *dq = to_device(q, sizeof q),
                               *dseen = to_device(seen, sizeof seen);
  CUDA_OK(cudaMalloc(&dsums, sizeof(float) * (size_t)(k * cols)));
  CUDA_OK(cudaMalloc(&dcounts, sizeof(int64_t) * (size_t)k));
  CUDA_OK(cudaMalloc(&dws, mcmi_cuda_class_sums_workspace(&d)));
  const mcmi_status st =
      strcmp(what, "ema") == 0
          ? mcmi_cuda_ema_update(&d, 0.5, dq, cols, (uint8_t *)dseen, dws, NULL)
          : mcmi_cuda_class_sums(&d, 0, dsums, cols, (int64_t *)dcounts, dws,
                                 NULL);
  CUDA_OK(cudaDeviceSynchronize());
  printf("%s with a bad label returned %d: it must stop\n", what, (int)st);
  return 0;
}

/* Row scaling (the backward's upstream gradient), every dtype, with rows
 * that start off a 16-byte boundary (the scalar head and tail around the
 * vectors) and a scalar scale (stride 0): exactly the host's products. */
static void check_scale_rows(void) {
  const mcmi_dtype dtypes[] = {MCMI_FLOAT32, MCMI_FLOAT64, MCMI_BFLOAT16,
                               MCMI_FLOAT16};
  const int64_t shapes[][3] = {{5, 37, 41}, {3, 1000, 1003}, {1, 7, 7}};
  for (int t = 0; t < 4; ++t) {
    for (int sh = 0; sh < 3; ++sh) {
      for (int64_t scale_stride = 0; scale_stride < 2; ++scale_stride) {
        const mcmi_dtype d = dtypes[t];
        const int64_t rows = shapes[sh][0], cols = shapes[sh][1],
                      stride = shapes[sh][2], n = rows * stride + 1;
        const size_t es = esize[d];
        void *x = malloc(es * (size_t)n), *want = malloc(es * (size_t)n),
             *got = malloc(es * (size_t)n), *sc = malloc(es * (size_t)rows);
        for (int64_t i = 0; i < n; ++i) {
          store_any(d, x, i, normal());
        }
        for (int64_t i = 0; i < rows; ++i) {
          store_any(d, sc, i, 1.0 + normal());
        }
        memcpy(want, x, es * (size_t)n);
        /* Start one element in: off the boundary for every dtype. */
        for (int64_t i = 0; i < rows; ++i) {
          const double k = load_any(d, sc, i * scale_stride);
          for (int64_t j = 0; j < cols; ++j) {
            const int64_t at = 1 + i * stride + j;
            store_any(d, want, at,
                      d == MCMI_FLOAT64
                          ? load_any(d, x, at) * k
                          : (double)((float)load_any(d, x, at) * (float)k));
          }
        }
        void *dx = to_device(x, es * (size_t)n);
        void *dsc = to_device(sc, es * (size_t)rows);
        CHECK(mcmi_cuda_scale_rows(d, (char *)dx + es, rows, cols, stride, dsc,
                                   scale_stride, NULL) == MCMI_OK,
              "scale_rows status");
        to_host(got, dx, es * (size_t)n, 1);
        CHECK(memcmp(got, want, es * (size_t)n) == 0,
              "scale_rows dtype %d %lldx%lld stride %lld: not the host's "
              "products",
              (int)d, (long long)rows, (long long)cols, (long long)stride);
        cudaFree(dx), cudaFree(dsc);
        free(x), free(want), free(got), free(sc);
      }
    }
  }
}

/* In-batch centroids take min(B, K) x C means, not K x C. */
static void check_workspace(void) {
  mcmi_problem p;
  memset(&p, 0, sizeof p);
  p.rows = 4, p.cols = 40000, p.classes = 40000, p.dtype = MCMI_FLOAT32;
  p.temperature = 1.0, p.floor = 1e-12;
  const int64_t any = 0;
  p.logits = &any, p.target = &any; /* only sizes are read */
  const size_t bytes = mcmi_cuda_loss_workspace(&p);
  CHECK(bytes > 4 * 40000 * sizeof(float) &&
            bytes < 4 * 40000 * sizeof(float) + (1u << 20),
        "in-batch loss workspace of %zu bytes for B = 4, K = C = 40000", bytes);
  /* A byte count that overflows gives no workspace, and the call is
   * refused before any launch. */
  p.classes = (int64_t)1 << 61;
  int dummy = 0;
  CHECK(mcmi_cuda_loss_workspace(&p) == 0 &&
            mcmi_cuda_class_sums_workspace(&p) == 0 &&
            mcmi_cuda_loss(&p, &dummy, 1, NULL, 0, &dummy, NULL) ==
                MCMI_ERROR_ARGUMENT,
        "K = 2^61: workspace %zu bytes", mcmi_cuda_loss_workspace(&p));
}

int main(int argc, char **argv) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    fprintf(stderr, "no CUDA device: this program needs a GPU to run\n");
    return 77;
  }
  if (argc == 3 && strcmp(argv[1], "bad-label") == 0) {
    return run_bad_label(argv[2]);
  }
  /* rows, cols, classes: K == C, K < C, long rows (a block per row), and a
   * few long rows (split over several blocks each). */
  const int64_t shapes[][3] = {{1, 1, 1},        {7, 10, 10},   {64, 100, 37},
                               {33, 1000, 1000}, {9, 3000, 40}, {3, 40000, 8},
                               {2, 20000, 16}};
  const mcmi_dtype dtypes[] = {MCMI_FLOAT32, MCMI_FLOAT64, MCMI_BFLOAT16,
                               MCMI_FLOAT16};
  for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; ++s) {
    for (int mode = 0; mode < 3; ++mode) {
      for (int red = 0; red < 3; ++red) {
        loss_case c = {shapes[s][0], shapes[s][1],      shapes[s][2], mode,
                       red,          s % 2 ? 2.0 : 1.0, MCMI_FLOAT32, 0,
                       PLAIN};
        check_loss(c);
      }
    }
    for (int t = 1; t < 4; ++t) {
      loss_case c = {shapes[s][0],
                     shapes[s][1],
                     shapes[s][2],
                     (int)s % 3,
                     MCMI_REDUCTION_MEAN,
                     1.5,
                     dtypes[t],
                     0,
                     PLAIN};
      check_loss(c);
    }
  }
  for (int mode = 0; mode < 3; ++mode) {
    for (int special = 0; special < 4; ++special) {
      /* C <= 32 (a lane per column) and split rows; strided. */
      loss_case small = {9,   10,           10, mode,   MCMI_REDUCTION_NONE,
                         1.0, MCMI_FLOAT32, 3,  special};
      loss_case big = {6,   2000,         50, mode,   MCMI_REDUCTION_MEAN,
                       2.0, MCMI_FLOAT32, 5,  special};
      check_loss(small);
      check_loss(big);
    }
    loss_case empty = {0,   10,           10, mode, MCMI_REDUCTION_MEAN,
                       1.0, MCMI_FLOAT32, 0,  PLAIN};
    check_loss(empty);
    empty.reduction = MCMI_REDUCTION_NONE;
    check_loss(empty);
  }
  /* -inf logits (classes of probability 0), tiny and huge temperatures
   * (1/T beyond float32's range either way), on a warp, a block and split
   * rows, per row, in float32 and float64. */
  const double temps[] = {1.0, 2.5, 1e-39, 1e300};
  for (int mode = 0; mode < 3; ++mode) {
    for (int ti = 0; ti < 4; ++ti) {
      for (int special = 0; special < 5; special += 4) {
        const int64_t shapes_t[][3] = {
            {9, 10, 10}, {6, 2000, 50}, {3, 40000, 8}};
        for (int sh = 0; sh < 3; ++sh) {
          loss_case c = {shapes_t[sh][0],
                         shapes_t[sh][1],
                         shapes_t[sh][2],
                         mode,
                         MCMI_REDUCTION_NONE,
                         temps[ti],
                         sh == 1 ? MCMI_FLOAT64 : MCMI_FLOAT32,
                         sh == 0 ? 3 : 0,
                         special};
          check_loss(c);
        }
      }
    }
  }
  /* In-batch means at a small T, where the gradient magnifies their
   * rounding by 1/T: summed in double, as on the CPU. */
  for (int red = 0; red < 3; ++red) {
    loss_case c = {33, 100, 10, 2, red, 1e-4, MCMI_FLOAT32, 0, CLOSE};
    check_loss(c);
  }
  /* Split rows with in-batch means over classes of several rows (most
   * split cases above have rows alone in their class, which skip the KL):
   * the split KL sums and gradient against the CPU. */
  for (int red = 0; red < 3; ++red) {
    loss_case c = {8, 9000, 3, 2, red, 1.0, MCMI_FLOAT32, 0, PLAIN};
    check_loss(c);
  }
  for (int batch = 0; batch < 2; ++batch) {
    check_small_kl(16, 100, batch);  /* a warp per row */
    check_small_kl(16, 3000, batch); /* a block per row */
    check_small_kl(8, 20000, batch); /* split rows, two a class */
  }
  /* In-batch means of 1024 similar rows a class: summed in double, as on
   * the CPU (float32 sums of this many rows miss the small KLs). */
  check_small_kl(4096, 100, 1);
  check_class_sums_and_ema(200, 37, 11, 0, 0);
  check_class_sums_and_ema(600, 20, 1, 0, 1); /* one class, 3 row chunks */
  check_class_sums_and_ema(64, 2000, 100, 0, 0);
  check_class_sums_and_ema(300, 50, 7, 1, 1);
  /* More classes present than slot blocks: blocks loop over slots. */
  check_class_sums_and_ema(2500, 3, 1500, 0, 0);
  check_bad_input();
  check_scale_rows();
  check_workspace();
  printf("%d passed, %d failed\n", checks - failures, failures);
  printf("digest %016llx\n", (unsigned long long)digest);
  return failures ? 1 : 0;
}
