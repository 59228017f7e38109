/*
 * test_cuda.cu: the CUDA kernels against the CPU kernels on random problems,
 * without torch: loss values and gradients (fixed, log and in-batch
 * centroids, every reduction, float32 and bfloat16), class sums and the EMA
 * update, plus bitwise repeatability. Exits 77 (skipped) without a GPU.
 *
 *   make -C tests/c cuda        build (nvcc), and run where a GPU is present
 */
#include <cuda_bf16.h>
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

static void *to_device(const void *host, size_t bytes) {
  void *d = NULL;
  CUDA_OK(cudaMalloc(&d, bytes > 0 ? bytes : 1));
  if (bytes > 0) {
    CUDA_OK(cudaMemcpy(d, host, bytes, cudaMemcpyHostToDevice));
  }
  return d;
}

static void to_host(void *host, const void *dev, size_t bytes) {
  CUDA_OK(cudaDeviceSynchronize());
  CUDA_OK(cudaMemcpy(host, dev, bytes, cudaMemcpyDeviceToHost));
}

static double max_rel(const double *a, const double *b, int64_t n) {
  double scale = 1e-2, err = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    scale = fmax(scale, fabs(b[i]));
  }
  for (int64_t i = 0; i < n; ++i) {
    err = fmax(err, fabs(a[i] - b[i]));
  }
  return err / scale;
}

/* One loss problem in float32 (or bfloat16 logits): CPU vs CUDA. */
static void check_loss(int64_t rows, int64_t cols, int mode, int reduction,
                       double temperature, int bf16) {
  const int64_t k = cols, n = rows * cols;
  float *z = (float *)malloc(sizeof(float) * (size_t)(n + 1));
  uint16_t *zb = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(n + 1));
  float *q = (float *)malloc(sizeof(float) * (size_t)(k * cols));
  float *lq = (float *)malloc(sizeof(float) * (size_t)(k * cols));
  int64_t *y = (int64_t *)malloc(sizeof(int64_t) * (size_t)(rows + 1));
  for (int64_t i = 0; i < n; ++i) {
    z[i] = (float)(2.5 * normal());
    zb[i] = mcmi_bf16_store(z[i]);
  }
  for (int64_t c = 0; c < k; ++c) {
    double s = 0.0;
    for (int64_t j = 0; j < cols; ++j) {
      s += (q[c * cols + j] = (float)exp(normal()));
    }
    for (int64_t j = 0; j < cols; ++j) {
      q[c * cols + j] = (float)(q[c * cols + j] / s);
      lq[c * cols + j] = logf(fmaxf(q[c * cols + j], 1e-12f));
    }
  }
  for (int64_t i = 0; i < rows; ++i) {
    y[i] = uniform() < 0.1 ? -100 : (int64_t)(uniform() * (double)k);
  }
  mcmi_problem p;
  memset(&p, 0, sizeof p);
  p.rows = rows;
  p.cols = cols;
  p.classes = k;
  p.dtype = bf16 ? MCMI_BFLOAT16 : MCMI_FLOAT32;
  p.logits = bf16 ? (const void *)zb : (const void *)z;
  p.logits_stride = cols;
  p.target = y;
  p.target_stride = 1;
  p.centroids = mode == 0   ? (const void *)q
                : mode == 1 ? (const void *)lq
                            : NULL;
  p.log_centroids = mode == 1;
  p.centroids_stride = cols;
  p.temperature = temperature;
  p.ce_weight = 1.0;
  p.cmi_weight = -0.4;
  p.floor = 1e-12;
  p.ignore_index = -100;
  p.reduction = (mcmi_reduction)reduction;

  const int64_t nloss = reduction == MCMI_REDUCTION_NONE ? rows : 1;
  const size_t esz = bf16 ? 2 : 4;
  void *cpu_loss = calloc((size_t)(nloss + 1), esz);
  void *cpu_grad = calloc((size_t)(n + 1), esz);
  size_t wsb = mcmi_cpu_loss_workspace(&p, 2, 1);
  void *ws = aligned_alloc(64, (wsb + 127) / 64 * 64);
  int64_t bad;
  CHECK(mcmi_cpu_loss(&p, cpu_loss, 1, cpu_grad, cols, ws, 2, &bad) == MCMI_OK,
        "cpu loss");
  free(ws);

  mcmi_problem d = p;
  d.logits = to_device(p.logits, (size_t)n * esz);
  d.target = (const int64_t *)to_device(y, sizeof(int64_t) * (size_t)rows);
  d.centroids = p.centroids
                    ? to_device(p.centroids, sizeof(float) * (size_t)(k * cols))
                    : NULL;
  void *dloss = NULL, *dgrad = NULL, *dws = NULL;
  CUDA_OK(cudaMalloc(&dloss, (size_t)(nloss + 1) * esz));
  CUDA_OK(cudaMalloc(&dgrad, (size_t)(n + 1) * esz));
  CUDA_OK(cudaMalloc(&dws, mcmi_cuda_loss_workspace(&d) + 1));
  CHECK(mcmi_cuda_loss(&d, dloss, 1, dgrad, cols, dws, NULL) == MCMI_OK,
        "cuda loss");
  void *gpu_loss = calloc((size_t)(nloss + 1), esz),
       *gpu_grad = calloc((size_t)(n + 1), esz);
  to_host(gpu_loss, dloss, (size_t)nloss * esz);
  to_host(gpu_grad, dgrad, (size_t)n * esz);

  double *a = (double *)malloc(sizeof(double) * (size_t)(n + 1));
  double *b = (double *)malloc(sizeof(double) * (size_t)(n + 1));
  for (int64_t i = 0; i < nloss; ++i) {
    a[i] = bf16 ? mcmi_bf16_load(((uint16_t *)gpu_loss)[i])
                : ((float *)gpu_loss)[i];
    b[i] = bf16 ? mcmi_bf16_load(((uint16_t *)cpu_loss)[i])
                : ((float *)cpu_loss)[i];
  }
  const double tol = bf16 ? 1e-2 : 1e-5;
  CHECK(max_rel(a, b, nloss) <= tol, "loss %lldx%lld mode %d red %d: %g",
        (long long)rows, (long long)cols, mode, reduction,
        max_rel(a, b, nloss));
  for (int64_t i = 0; i < n; ++i) {
    a[i] = bf16 ? mcmi_bf16_load(((uint16_t *)gpu_grad)[i])
                : ((float *)gpu_grad)[i];
    b[i] = bf16 ? mcmi_bf16_load(((uint16_t *)cpu_grad)[i])
                : ((float *)cpu_grad)[i];
  }
  CHECK(max_rel(a, b, n) <= tol, "grad %lldx%lld mode %d red %d: %g",
        (long long)rows, (long long)cols, mode, reduction, max_rel(a, b, n));

  /* Bitwise repeatable. */
  void *again = calloc((size_t)(n + 1), esz);
  CHECK(mcmi_cuda_loss(&d, dloss, 1, dgrad, cols, dws, NULL) == MCMI_OK,
        "again");
  to_host(again, dgrad, (size_t)n * esz);
  CHECK(memcmp(again, gpu_grad, (size_t)n * esz) == 0, "not repeatable");

  cudaFree((void *)d.logits);
  cudaFree((void *)d.target);
  cudaFree((void *)d.centroids);
  cudaFree(dloss);
  cudaFree(dgrad);
  cudaFree(dws);
  free(z), free(zb), free(q), free(lq), free(y), free(cpu_loss), free(cpu_grad);
  free(gpu_loss), free(gpu_grad), free(a), free(b), free(again);
}

static void check_class_sums_and_ema(int64_t rows, int64_t cols, int64_t k) {
  const int64_t n = rows * cols;
  float *z = (float *)malloc(sizeof(float) * (size_t)n);
  int64_t *y = (int64_t *)malloc(sizeof(int64_t) * (size_t)rows);
  for (int64_t i = 0; i < n; ++i) {
    z[i] = (float)(2.0 * normal());
  }
  for (int64_t i = 0; i < rows; ++i) {
    y[i] = uniform() < 0.1 ? -100 : (int64_t)(uniform() * (double)k);
  }
  mcmi_problem p;
  memset(&p, 0, sizeof p);
  p.rows = rows, p.cols = cols, p.classes = k, p.dtype = MCMI_FLOAT32;
  p.logits = z, p.logits_stride = cols, p.target = y, p.target_stride = 1;
  p.temperature = 1.5, p.ignore_index = -100, p.floor = 1e-12;
  float *sums = (float *)malloc(sizeof(float) * (size_t)(k * cols));
  float *gsums = (float *)malloc(sizeof(float) * (size_t)(k * cols));
  int64_t *counts = (int64_t *)malloc(sizeof(int64_t) * (size_t)k);
  int64_t *gcounts = (int64_t *)malloc(sizeof(int64_t) * (size_t)k);
  void *ws =
      aligned_alloc(64, (mcmi_cpu_class_sums_workspace(&p) + 127) / 64 * 64);
  int64_t bad;
  CHECK(mcmi_cpu_class_sums(&p, 0, sums, cols, counts, ws, 2, &bad) == MCMI_OK,
        "cpu sums");
  free(ws);
  mcmi_problem d = p;
  d.logits = to_device(z, sizeof(float) * (size_t)n);
  d.target = (const int64_t *)to_device(y, sizeof(int64_t) * (size_t)rows);
  void *dsums, *dcounts, *dws;
  CUDA_OK(cudaMalloc(&dsums, sizeof(float) * (size_t)(k * cols)));
  CUDA_OK(cudaMalloc(&dcounts, sizeof(int64_t) * (size_t)k));
  CUDA_OK(cudaMalloc(&dws, mcmi_cuda_class_sums_workspace(&d) + 1));
  CHECK(mcmi_cuda_class_sums(&d, 0, dsums, cols, (int64_t *)dcounts, dws,
                             NULL) == MCMI_OK,
        "cuda sums");
  to_host(gsums, dsums, sizeof(float) * (size_t)(k * cols));
  to_host(gcounts, dcounts, sizeof(int64_t) * (size_t)k);
  CHECK(memcmp(counts, gcounts, sizeof(int64_t) * (size_t)k) == 0,
        "class counts differ");
  double err = 0.0;
  for (int64_t i = 0; i < k * cols; ++i) {
    err = fmax(err, fabs((double)sums[i] - (double)gsums[i]));
  }
  CHECK(err < 1e-4, "class sums differ by %g", err);

  /* EMA from the same start on both sides. */
  float *q = (float *)malloc(sizeof(float) * (size_t)(k * cols));
  float *gq = (float *)malloc(sizeof(float) * (size_t)(k * cols));
  uint8_t *seen = (uint8_t *)calloc((size_t)k, 1),
          *gseen = (uint8_t *)calloc((size_t)k, 1);
  for (int64_t i = 0; i < k * cols; ++i) {
    q[i] = 1.0f / (float)cols;
  }
  for (int64_t c = 0; c < k; c += 2) {
    seen[c] = 1;
  }
  void *dq = to_device(q, sizeof(float) * (size_t)(k * cols));
  void *dseen = to_device(seen, (size_t)k);
  void *ews = aligned_alloc(64, (mcmi_cpu_ema_workspace(&p) + 127) / 64 * 64);
  CHECK(mcmi_cpu_ema_update(&p, 0.25, q, cols, seen, ews, 2, &bad) == MCMI_OK,
        "cpu ema");
  free(ews);
  CHECK(mcmi_cuda_ema_update(&d, 0.25, dq, cols, (uint8_t *)dseen, dws, NULL) ==
            MCMI_OK,
        "cuda ema");
  to_host(gq, dq, sizeof(float) * (size_t)(k * cols));
  to_host(gseen, dseen, (size_t)k);
  err = 0.0;
  for (int64_t i = 0; i < k * cols; ++i) {
    err = fmax(err, fabs((double)q[i] - (double)gq[i]));
  }
  CHECK(err < 1e-5, "ema differs by %g", err);
  CHECK(memcmp(seen, gseen, (size_t)k) == 0, "seen flags differ");

  cudaFree((void *)d.logits), cudaFree((void *)d.target), cudaFree(dsums);
  cudaFree(dcounts), cudaFree(dws), cudaFree(dq), cudaFree(dseen);
  free(z), free(y), free(sums), free(gsums), free(counts), free(gcounts);
  free(q), free(gq), free(seen), free(gseen);
}

int main(void) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    fprintf(stderr, "no CUDA device: this program needs a GPU to run\n");
    return 77;
  }
  const int64_t shapes[][2] = {{1, 1},     {7, 10},   {64, 100},
                               {33, 1000}, {9, 3000}, {4, 40000}};
  for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; ++s) {
    for (int mode = 0; mode < 3; ++mode) {
      for (int red = 0; red < 3; ++red) {
        check_loss(shapes[s][0], shapes[s][1], mode, red, s % 2 ? 2.0 : 1.0, 0);
      }
    }
    check_loss(shapes[s][0], shapes[s][1], 0, MCMI_REDUCTION_MEAN, 1.0, 1);
  }
  check_class_sums_and_ema(200, 37, 11);
  check_class_sums_and_ema(64, 2000, 100);
  printf("%d passed, %d failed\n", checks - failures, failures);
  return failures ? 1 : 0;
}
