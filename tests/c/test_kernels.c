/*
 * test_kernels.c: the C kernels against an independent double-precision
 * reference, without torch. Built and run under AddressSanitizer and
 * UndefinedBehaviorSanitizer by `make -C tests/c` (see its Makefile).
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mcmi.h"
#include "mcmi_check.h"
#include "mcmi_dtype.h"
#include "test_util.h"

typedef struct {
  int64_t rows, cols, classes;
  double *z;  /* [rows][cols] */
  int64_t *y; /* [rows] */
  double *q;  /* [classes][cols], rows sum to 1 */
} case_t;

static case_t make_case(int64_t rows, int64_t cols, int64_t classes,
                        double scale) {
  case_t c = {rows, cols, classes, NULL, NULL, NULL};
  c.z = malloc(sizeof(double) * (size_t)(rows * cols + 1));
  c.y = malloc(sizeof(int64_t) * (size_t)(rows + 1));
  c.q = malloc(sizeof(double) * (size_t)(classes * cols));
  for (int64_t i = 0; i < rows * cols; ++i) {
    c.z[i] = scale * normal();
  }
  for (int64_t i = 0; i < rows; ++i) {
    c.y[i] = (int64_t)(uniform() * (double)classes);
    if (uniform() < 0.1) {
      c.y[i] = -100;
    }
  }
  for (int64_t k = 0; k < classes; ++k) {
    double s = 0.0;
    for (int64_t j = 0; j < cols; ++j) {
      c.q[k * cols + j] = exp(normal());
      s += c.q[k * cols + j];
    }
    for (int64_t j = 0; j < cols; ++j) {
      c.q[k * cols + j] /= s;
    }
  }
  return c;
}

static void free_case(case_t *c) {
  free(c->z);
  free(c->y);
  free(c->q);
}

/* Reference: the loss of the SPEC, written directly from the definitions. */
static double ref_loss(const case_t *c, int batch, double t, double wce,
                       double wcmi, int reduction, double *rows_out) {
  const int64_t n = c->rows, m = c->cols, k = c->classes;
  double *p = malloc(sizeof(double) * (size_t)(n * m + 1));
  double *qb = calloc((size_t)(k * m + 1), sizeof(double));
  int64_t *cnt = calloc((size_t)k + 1, sizeof(int64_t));
  int64_t valid = 0;
  for (int64_t i = 0; i < n; ++i) {
    double mx = -INFINITY, s = 0.0;
    for (int64_t j = 0; j < m; ++j) {
      mx = fmax(mx, c->z[i * m + j] / t);
    }
    for (int64_t j = 0; j < m; ++j) {
      s += exp(c->z[i * m + j] / t - mx);
    }
    for (int64_t j = 0; j < m; ++j) {
      p[i * m + j] = exp(c->z[i * m + j] / t - mx) / s;
    }
    if (c->y[i] >= 0) {
      ++valid;
      ++cnt[c->y[i]];
      for (int64_t j = 0; j < m; ++j) {
        qb[c->y[i] * m + j] += p[i * m + j];
      }
    }
  }
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    double row = 0.0;
    if (c->y[i] >= 0) {
      const int64_t y = c->y[i];
      double kl = 0.0, mx = -INFINITY, s = 0.0;
      for (int64_t j = 0; j < m; ++j) {
        double q = batch ? qb[y * m + j] / (double)cnt[y] : c->q[y * m + j];
        /* 0 log 0 = 0: a class of probability 0 (a -inf logit) adds
         * nothing; NaN still does. */
        if (p[i * m + j] != 0.0) {
          kl += p[i * m + j] * (log(p[i * m + j]) - log(fmax(q, 1e-12)));
        }
        mx = fmax(mx, c->z[i * m + j]);
      }
      for (int64_t j = 0; j < m; ++j) {
        s += exp(c->z[i * m + j] - mx);
      }
      row = wcmi * kl +
            (wce != 0.0 ? wce * (mx + log(s) - c->z[i * m + y]) : 0.0);
    }
    if (rows_out) {
      rows_out[i] = row;
    }
    total += row;
  }
  free(p);
  free(qb);
  free(cnt);
  if (reduction == MCMI_REDUCTION_MEAN) {
    return valid ? total / (double)valid : 0.0;
  }
  return total;
}

static mcmi_problem problem_f64(const case_t *c, int batch, double t,
                                double wce, double wcmi, int reduction) {
  mcmi_problem p;
  memset(&p, 0, sizeof p);
  p.rows = c->rows;
  p.cols = c->cols;
  p.classes = c->classes;
  p.dtype = MCMI_FLOAT64;
  p.logits = c->z;
  p.logits_stride = c->cols;
  p.target = c->y;
  p.target_stride = 1;
  p.centroids = batch ? NULL : c->q;
  p.centroids_stride = c->cols;
  p.temperature = t;
  p.ce_weight = wce;
  p.cmi_weight = wcmi;
  p.floor = 1e-12;
  p.ignore_index = -100;
  p.reduction = (mcmi_reduction)reduction;
  return p;
}

static mcmi_status run_loss(const mcmi_problem *p, void *loss, void *grad,
                            int threads, int64_t *bad) {
  size_t bytes = mcmi_cpu_loss_workspace(p, threads, grad != NULL);
  void *ws = aligned_alloc(64, (bytes + 63) / 64 * 64 + 64);
  mcmi_status st = mcmi_cpu_loss(p, loss, 1, grad, p->cols, ws, threads, bad);
  free(ws);
  return st;
}

static double rel_err(double a, double b) {
  return fabs(a - b) / fmax(fabs(b), 1e-8);
}

/* float64 values and gradients against the reference (central differences
 * of the reference give the gradient). */
static void test_f64(void) {
  const int64_t shapes[][3] = {{1, 1, 1},   {5, 3, 3}, {17, 10, 4},
                               {9, 33, 33}, {0, 4, 4}, {40, 7, 12}};
  for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; ++s) {
    for (int batch = 0; batch < 2; ++batch) {
      for (int red = 0; red < 3; ++red) {
        const double t = (s % 2) ? 2.0 : 1.0;
        int64_t classes = batch ? shapes[s][1] : shapes[s][2];
        /* CE needs labels < C; shapes with K > C test the CMI term alone. */
        const double wce = (red == 1 && classes <= shapes[s][1]) ? 1.0 : 0.0;
        const double wcmi = -0.7;
        case_t c = make_case(shapes[s][0], shapes[s][1], classes, 2.0);
        mcmi_problem p = problem_f64(&c, batch, t, wce, wcmi, red);
        const int64_t n = c.rows, m = c.cols;
        double *loss = calloc((size_t)n + 1, sizeof(double));
        double *grad = calloc((size_t)(n * m) + 1, sizeof(double));
        double *rows = calloc((size_t)n + 1, sizeof(double));
        int64_t bad = -1;
        mcmi_status st = run_loss(&p, loss, grad, 2, &bad);
        CHECK(st == MCMI_OK, "status %d", (int)st);
        const double want = ref_loss(&c, batch, t, wce, wcmi, red, rows);
        if (red == MCMI_REDUCTION_NONE) {
          for (int64_t i = 0; i < n; ++i) {
            CHECK(rel_err(loss[i], rows[i]) < 1e-10 ||
                      fabs(loss[i] - rows[i]) < 1e-12,
                  "row %lld: %g vs %g", (long long)i, loss[i], rows[i]);
          }
        } else {
          CHECK(rel_err(loss[0], want) < 1e-10 || fabs(loss[0] - want) < 1e-12,
                "loss %g vs %g (shape %zu batch %d red %d)", loss[0], want, s,
                batch, red);
        }
        /* d(sum of outputs)/dz by central differences of the reference. */
        for (int64_t e = 0; e < n * m; e += 1 + (n * m) / 23) {
          const double h = 1e-6, z0 = c.z[e];
          c.z[e] = z0 + h;
          double up = ref_loss(&c, batch, t, wce, wcmi, red, NULL);
          c.z[e] = z0 - h;
          double dn = ref_loss(&c, batch, t, wce, wcmi, red, NULL);
          c.z[e] = z0;
          const double fd = (up - dn) / (2 * h);
          /* For NONE the kernel's rows are d(row_i)/dz_i; the in-batch path
           * through other rows is handled by the Python layer. */
          if (red != MCMI_REDUCTION_NONE || !batch) {
            CHECK(fabs(grad[e] - fd) < 1e-6,
                  "grad[%lld] %g vs %g (shape %zu batch %d red %d)",
                  (long long)e, grad[e], fd, s, batch, red);
          }
        }
        free(loss);
        free(grad);
        free(rows);
        free_case(&c);
      }
    }
  }
}

/* float32 against the float64 reference, and thread-count independence. */
static void test_f32_and_threads(void) {
  case_t c = make_case(301, 257, 257, 3.0);
  const int64_t n = c.rows, m = c.cols;
  float *z = malloc(sizeof(float) * (size_t)(n * m));
  float *q = malloc(sizeof(float) * (size_t)(m * m));
  for (int64_t i = 0; i < n * m; ++i) {
    z[i] = (float)c.z[i];
    c.z[i] = z[i];
  }
  for (int64_t i = 0; i < m * m; ++i) {
    q[i] = (float)c.q[i];
    c.q[i] = q[i];
  }
  for (int batch = 0; batch < 2; ++batch) {
    mcmi_problem p = problem_f64(&c, batch, 1.5, 1.0, -0.5, 1);
    p.dtype = MCMI_FLOAT32;
    p.logits = z;
    p.centroids = batch ? NULL : q;
    float loss1 = 0, loss2 = 0;
    float *g1 = malloc(sizeof(float) * (size_t)(n * m));
    float *g2 = malloc(sizeof(float) * (size_t)(n * m));
    int64_t bad;
    CHECK(run_loss(&p, &loss1, g1, 1, &bad) == MCMI_OK, "f32 1 thread");
    CHECK(run_loss(&p, &loss2, g2, 2, &bad) == MCMI_OK, "f32 2 threads");
    CHECK(memcmp(&loss1, &loss2, sizeof loss1) == 0 &&
              memcmp(g1, g2, sizeof(float) * (size_t)(n * m)) == 0,
          "results differ between 1 and 2 threads (batch %d)", batch);
    double want = ref_loss(&c, batch, 1.5, 1.0, -0.5, 1, NULL);
    CHECK(rel_err(loss1, want) < 1e-5, "f32 loss %g vs %g", (double)loss1,
          want);
    free(g1);
    free(g2);
  }
  free(z);
  free(q);
  free_case(&c);
}

/* Centroids given as logs give the result of the probabilities they came
 * from, float32 and float64, with and without a gradient. */
static void test_log_centroids(void) {
  case_t c = make_case(37, 300, 300, 2.0);
  const int64_t n = c.rows, m = c.cols;
  double *lq = malloc(sizeof(double) * (size_t)(m * m));
  float *z32 = malloc(sizeof(float) * (size_t)(n * m));
  float *q32 = malloc(sizeof(float) * (size_t)(m * m));
  float *lq32 = malloc(sizeof(float) * (size_t)(m * m));
  /* An exact zero (below the floor) in row 0, which still sums to 1. */
  double row0 = 0.0;
  c.q[5] = 0.0;
  for (int64_t j = 0; j < m; ++j) {
    row0 += c.q[j];
  }
  for (int64_t j = 0; j < m; ++j) {
    c.q[j] /= row0;
  }
  for (int64_t i = 0; i < m * m; ++i) {
    lq[i] = log(fmax(c.q[i], 1e-12));
    q32[i] = (float)c.q[i];
    lq32[i] = (float)log(fmax((double)q32[i], 1e-12));
  }
  for (int64_t i = 0; i < n * m; ++i) {
    z32[i] = (float)c.z[i];
  }
  for (int with_grad = 0; with_grad < 2; ++with_grad) {
    mcmi_problem p = problem_f64(&c, 0, 1.7, 1.0, -0.4, 1);
    double l_prob = 0, l_log = 0;
    double *g1 = calloc((size_t)(n * m), sizeof(double));
    double *g2 = calloc((size_t)(n * m), sizeof(double));
    int64_t bad;
    CHECK(run_loss(&p, &l_prob, with_grad ? g1 : NULL, 2, &bad) == MCMI_OK,
          "probability centroids");
    p.centroids = lq;
    p.log_centroids = 1;
    CHECK(run_loss(&p, &l_log, with_grad ? g2 : NULL, 2, &bad) == MCMI_OK,
          "log centroids");
    CHECK(rel_err(l_log, l_prob) < 1e-12, "log path %g vs %g", l_log, l_prob);
    double worst = 0.0;
    for (int64_t i = 0; i < n * m; ++i) {
      worst = fmax(worst, fabs(g1[i] - g2[i]));
    }
    CHECK(worst < 1e-12, "log-path gradient off by %g", worst);
    p.dtype = MCMI_FLOAT32;
    p.logits = z32;
    p.centroids = lq32;
    float f_log = 0;
    CHECK(run_loss(&p, &f_log, NULL, 1, &bad) == MCMI_OK, "f32 log path");
    CHECK(rel_err(f_log, l_prob) < 1e-5, "f32 log path %g vs %g", (double)f_log,
          l_prob);
    free(g1);
    free(g2);
  }
  mcmi_problem p = problem_f64(&c, 1, 1.0, 0.0, 1.0, 1);
  p.log_centroids = 1;
  double loss;
  int64_t bad;
  CHECK(run_loss(&p, &loss, NULL, 1, &bad) == MCMI_ERROR_ARGUMENT,
        "log_centroids without centroids accepted");
  free(lq);
  free(z32);
  free(q32);
  free(lq32);
  free_case(&c);
}

static void test_errors(void) {
  case_t c = make_case(6, 4, 3, 1.0);
  double loss[8], grad[32];
  int64_t bad = -1;
  mcmi_problem p = problem_f64(&c, 0, 1.0, 0.0, 1.0, 1);

  c.y[4] = 3; /* == classes */
  CHECK(run_loss(&p, loss, grad, 1, &bad) == MCMI_ERROR_TARGET && bad == 4,
        "label == classes not reported (bad=%lld)", (long long)bad);
  c.y[4] = -7;
  CHECK(run_loss(&p, loss, grad, 1, &bad) == MCMI_ERROR_TARGET && bad == 4,
        "negative label not reported");
  c.y[4] = INT64_MAX;
  CHECK(run_loss(&p, loss, NULL, 2, &bad) == MCMI_ERROR_TARGET,
        "huge label not reported");
  c.y[4] = 1;
  for (int64_t i = 0; i < c.rows; ++i) {
    c.y[i] = 1;
  }
  c.q[1 * 4 + 2] += 0.5; /* class 1 sums to 1.5 */
  CHECK(run_loss(&p, loss, grad, 1, &bad) == MCMI_ERROR_CENTROIDS && bad == 1,
        "bad centroid row not reported");
  c.q[1 * 4 + 2] = NAN;
  CHECK(run_loss(&p, loss, grad, 1, &bad) == MCMI_ERROR_CENTROIDS,
        "NaN centroid row not reported");

  mcmi_problem q = p;
  q.temperature = 0.0;
  CHECK(mcmi_cpu_loss(&q, loss, 1, NULL, 4, grad, 1, &bad) ==
            MCMI_ERROR_ARGUMENT,
        "T = 0 accepted");
  q = p;
  q.logits = NULL;
  CHECK(mcmi_cpu_loss(&q, loss, 1, NULL, 4, grad, 1, &bad) ==
            MCMI_ERROR_ARGUMENT,
        "NULL logits accepted");
  q = p;
  q.ce_weight = 1.0;
  q.classes = 5; /* > cols: z[i, y] could be read out of bounds */
  CHECK(mcmi_cpu_loss(&q, loss, 1, NULL, 4, grad, 1, &bad) ==
            MCMI_ERROR_ARGUMENT,
        "CE with K > C accepted");
  q = p;
  q.reduction = (mcmi_reduction)7;
  CHECK(mcmi_cpu_loss(&q, loss, 1, NULL, 4, grad, 1, &bad) ==
            MCMI_ERROR_ARGUMENT,
        "unknown reduction accepted");
  free_case(&c);
}

static void test_nan_logits(void) {
  case_t c = make_case(3, 5, 5, 1.0);
  c.y[0] = c.y[1] = c.y[2] = 2;
  c.z[1 * 5 + 3] = NAN;
  mcmi_problem p = problem_f64(&c, 0, 1.0, 1.0, -0.3, 0);
  double loss[3], grad[15];
  int64_t bad;
  CHECK(run_loss(&p, loss, grad, 1, &bad) == MCMI_OK, "NaN logits: status");
  CHECK(isnan(loss[1]) && !isnan(loss[0]) && !isnan(loss[2]),
        "NaN must stay in its row");
  free_case(&c);
}

static void test_class_sums(void) {
  case_t c = make_case(50, 9, 4, 2.0);
  mcmi_problem p = problem_f64(&c, 1, 0.5, 0.0, 0.0, 1);
  double sums[36], sums2[36];
  int64_t counts[4], counts2[4], bad;
  for (int log_probs = 0; log_probs < 2; ++log_probs) {
    void *ws =
        aligned_alloc(64, (mcmi_cpu_class_sums_workspace(&p) + 127) / 64 * 64);
    CHECK(mcmi_cpu_class_sums(&p, log_probs, sums, 9, counts, ws, 1, &bad) ==
              MCMI_OK,
          "class sums status");
    CHECK(mcmi_cpu_class_sums(&p, log_probs, sums2, 9, counts2, ws, 3, &bad) ==
              MCMI_OK,
          "class sums status (3 threads)");
    CHECK(memcmp(sums, sums2, sizeof sums) == 0, "class sums thread-dependent");
    free(ws);
    for (int64_t k = 0; k < 4; ++k) {
      int64_t cnt = 0;
      for (int64_t j = 0; j < 9; ++j) {
        double want = 0.0;
        for (int64_t i = 0; i < 50; ++i) {
          if (c.y[i] != k) {
            continue;
          }
          double mx = -INFINITY, s = 0.0;
          for (int64_t l = 0; l < 9; ++l) {
            mx = fmax(mx, c.z[i * 9 + l] / 0.5);
          }
          for (int64_t l = 0; l < 9; ++l) {
            s += exp(c.z[i * 9 + l] / 0.5 - mx);
          }
          const double lp = c.z[i * 9 + j] / 0.5 - mx - log(s);
          want += log_probs ? lp : exp(lp);
          cnt += j == 0;
        }
        CHECK(fabs(sums[k * 9 + j] - want) < 1e-10, "sum[%lld][%lld]",
              (long long)k, (long long)j);
      }
      CHECK(counts[k] == cnt, "count[%lld] %lld vs %lld", (long long)k,
            (long long)counts[k], (long long)cnt);
    }
  }
  free_case(&c);
}

/* EMA update: first sighting sets the row, later ones blend, absent classes
 * stay; against the float64 definition, in float64 and float32, with rows
 * of one block and of several (whole blocks of -inf included), and the same
 * for 1 and 3 threads. Then its argument and label errors. */
static void test_ema_update(void) {
  enum { K = 6 };
  const int64_t widths[] = {11, 1300};
  const double temps[] = {2.0, 0.5};
  for (int wi = 0; wi < 2; ++wi) {
    for (int ti = 0; ti < 2; ++ti) {
      for (int f32 = 0; f32 < 2; ++f32) {
        const int64_t cols = widths[wi];
        const double t = temps[ti];
        case_t c = make_case(40, cols, K, 1.5);
        for (int64_t i = 0; i < c.rows; ++i) {
          c.y[i] = c.y[i] == 5 ? 4 : c.y[i]; /* class 5 never appears */
          for (int64_t j = 0; j < cols; ++j) {
            /* Rows 0 and 7: -inf over columns 0..1023 (two whole blocks of
             * the wide rows), with a finite logit left. */
            if ((i == 0 || i == 7) && j < 1024 && j < cols - 1) {
              c.z[i * cols + j] = -INFINITY;
            }
          }
        }
        float *z32 = malloc(sizeof(float) * (size_t)(c.rows * cols));
        for (int64_t e = 0; e < c.rows * cols; ++e) {
          z32[e] = (float)c.z[e];
          c.z[e] = z32[e];
        }
        mcmi_problem p = problem_f64(&c, 1, t, 0.0, 0.0, 1);
        if (f32) {
          p.dtype = MCMI_FLOAT32;
          p.logits = z32;
        }
        const size_t n_q = (size_t)(K * cols);
        double *q = malloc(sizeof(double) * n_q);
        double *q3 = malloc(sizeof(double) * n_q);
        double *want = malloc(sizeof(double) * n_q);
        double *b = malloc(sizeof(double) * (size_t)cols);
        float *q32 = malloc(sizeof(float) * n_q);
        float *q32_3 = malloc(sizeof(float) * n_q);
        uint8_t seen[K] = {1, 0, 1, 0, 1, 1}, seen3[K], want_seen[K];
        for (size_t e = 0; e < n_q; ++e) {
          q32[e] = (float)((1.0 + 0.01 * (double)(e % 7)) / (double)cols);
          q[e] = want[e] = q32[e];
        }
        for (int64_t k = 0; k < K; ++k) {
          int64_t n = 0;
          memset(b, 0, sizeof(double) * (size_t)cols);
          for (int64_t i = 0; i < c.rows; ++i) {
            if (c.y[i] != k) {
              continue;
            }
            const double *z = c.z + i * cols;
            double mx = -INFINITY, s = 0.0;
            for (int64_t j = 0; j < cols; ++j) {
              mx = fmax(mx, z[j] / t);
            }
            for (int64_t j = 0; j < cols; ++j) {
              s += exp(z[j] / t - mx);
            }
            for (int64_t j = 0; j < cols; ++j) {
              b[j] += exp(z[j] / t - mx) / s;
            }
            ++n;
          }
          want_seen[k] = seen[k] || n > 0;
          for (int64_t j = 0; n > 0 && j < cols; ++j) {
            double *w = &want[k * cols + j];
            const double mean = b[j] / (double)n;
            *w = seen[k] ? *w + 0.3 * (mean - *w) : mean;
          }
        }
        memcpy(q3, q, sizeof(double) * n_q);
        memcpy(q32_3, q32, sizeof(float) * n_q);
        memcpy(seen3, seen, sizeof seen);
        void *ws =
            aligned_alloc(64, (mcmi_cpu_ema_workspace(&p, 3) + 127) / 64 * 64);
        void *q1 = f32 ? (void *)q32 : (void *)q;
        void *qt = f32 ? (void *)q32_3 : (void *)q3;
        int64_t bad;
        CHECK(mcmi_cpu_ema_update(&p, 0.3, q1, cols, seen, ws, 1, &bad) ==
                  MCMI_OK,
              "ema status");
        CHECK(mcmi_cpu_ema_update(&p, 0.3, qt, cols, seen3, ws, 3, &bad) ==
                  MCMI_OK,
              "ema status (3 threads)");
        CHECK(memcmp(q1, qt, (f32 ? sizeof(float) : sizeof(double)) * n_q) == 0,
              "ema depends on the thread count");
        /* float32: the exponent's argument (up to ~30 here) is rounded to
         * float, which exp turns into a relative error of ~30 ulp. */
        const double tol = f32 ? 1e-5 : 1e-12;
        double worst = 0.0;
        for (size_t e = 0; e < n_q; ++e) {
          const double got = f32 ? (double)q32[e] : q[e];
          worst = fmax(worst, fabs(got - want[e]) / (want[e] + 1e-300));
        }
        CHECK(worst < tol, "ema (cols %lld, T %g, f32 %d) off by %g",
              (long long)cols, t, f32, worst);
        CHECK(memcmp(seen, want_seen, sizeof seen) == 0 &&
                  memcmp(seen3, want_seen, sizeof seen) == 0,
              "seen flags");
        free(ws), free(q), free(q3), free(want), free(b), free(q32),
            free(q32_3), free(z32);
        free_case(&c);
      }
    }
  }
  case_t c = make_case(40, 11, K, 1.5);
  mcmi_problem p = problem_f64(&c, 1, 2.0, 0.0, 0.0, 1);
  double q[K * 11];
  uint8_t seen[K] = {0};
  void *ws = aligned_alloc(64, (mcmi_cpu_ema_workspace(&p, 1) + 127) / 64 * 64);
  int64_t bad;
  CHECK(mcmi_cpu_ema_update(&p, 0.0, q, 11, seen, ws, 1, &bad) ==
            MCMI_ERROR_ARGUMENT,
        "momentum 0 accepted");
  c.y[3] = 6;
  CHECK(mcmi_cpu_ema_update(&p, 0.3, q, 11, seen, ws, 1, &bad) ==
                MCMI_ERROR_TARGET &&
            bad == 3,
        "bad label not reported");
  free(ws);
  free_case(&c);
}

static void test_half_formats(void) {
  int bad16 = 0, badbf = 0;
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = mcmi_f16_load((uint16_t)h);
    const int is_nan = ((h & 0x7C00u) == 0x7C00u) && (h & 0x03FFu);
    if (is_nan ? !isnan(f) : mcmi_f16_store(f) != h) {
      ++bad16;
    }
    const float g = mcmi_bf16_load((uint16_t)h);
    if (isnan(g) ? !isnan(mcmi_bf16_load(mcmi_bf16_store(g)))
                 : mcmi_bf16_store(g) != h) {
      ++badbf;
    }
  }
  CHECK(bad16 == 0, "%d float16 values do not round-trip", bad16);
  CHECK(badbf == 0, "%d bfloat16 values do not round-trip", badbf);
  /* Rounding to nearest even, overflow to infinity, underflow to zero. */
  CHECK(mcmi_f16_store(1.0f + 0x1.0p-11f) == 0x3C00u, "f16 ties to even");
  CHECK(mcmi_f16_store(1.0f + 0x1.8p-11f) == 0x3C01u, "f16 rounds up");
  CHECK(mcmi_f16_store(70000.0f) == 0x7C00u, "f16 overflow");
  CHECK(mcmi_f16_store(1e-9f) == 0x0000u, "f16 underflow");
  CHECK(mcmi_bf16_store(1.0f + 0x1.0p-8f) == 0x3F80u, "bf16 ties to even");
}

/* Sizes whose byte counts overflow are refused before any memory is
 * touched: the workspace query reports 0 and the kernels
 * MCMI_ERROR_ARGUMENT (absurd num_classes with in-batch centroids, row
 * strides that wrap, overlapping output rows). */
static void test_size_overflow(void) {
  case_t c = make_case(4, 3, 3, 1.0);
  double loss[4], grad[12], sums[12], q[9];
  int64_t counts[3], bad = -1;
  uint8_t seen[3] = {0, 0, 0};
  _Alignas(64) unsigned char ws[4096];
  mcmi_problem p = problem_f64(&c, 1, 1.0, 0.0, 1.0, 1);
  const int64_t huge[] = {(int64_t)1 << 61, (int64_t)1 << 62, INT64_MAX};
  for (size_t k = 0; k < sizeof huge / sizeof huge[0]; ++k) {
    mcmi_problem h = p;
    h.classes = huge[k];
    CHECK(mcmi_cpu_loss_workspace(&h, 2, 1) == 0,
          "workspace for classes %lld not refused", (long long)huge[k]);
    CHECK(mcmi_cpu_loss(&h, loss, 1, grad, 3, ws, 2, &bad) ==
              MCMI_ERROR_ARGUMENT,
          "loss with classes %lld not refused", (long long)huge[k]);
    CHECK(mcmi_cpu_ema_workspace(&h, 1) == 0, "ema workspace not refused");
    CHECK(mcmi_cpu_ema_update(&h, 0.5, q, 3, seen, ws, 1, &bad) ==
              MCMI_ERROR_ARGUMENT,
          "ema update with classes %lld not refused", (long long)huge[k]);
    CHECK(mcmi_cpu_class_sums(&h, 0, sums, 3, counts, ws, 1, &bad) ==
              MCMI_ERROR_ARGUMENT,
          "class sums with classes %lld not refused", (long long)huge[k]);
  }
  /* Huge columns, rows or strides: the extent of a buffer overflows. */
  mcmi_problem h = p;
  h.cols = INT64_MAX / 2;
  CHECK(mcmi_cpu_loss_workspace(&h, 1, 1) == 0, "huge cols: workspace");
  CHECK(mcmi_cpu_loss(&h, loss, 1, NULL, 0, ws, 1, &bad) == MCMI_ERROR_ARGUMENT,
        "huge cols accepted");
  h = p;
  h.logits_stride = INT64_MAX / 2;
  CHECK(mcmi_cpu_loss(&h, loss, 1, NULL, 0, ws, 1, &bad) == MCMI_ERROR_ARGUMENT,
        "wrapping logits stride accepted");
  h = p;
  h.target_stride = INT64_MAX / 3;
  CHECK(mcmi_cpu_loss(&h, loss, 1, NULL, 0, ws, 1, &bad) == MCMI_ERROR_ARGUMENT,
        "wrapping target stride accepted");
  CHECK(mcmi_check_targets(c.y, INT64_MAX / 3, 4, 3, -100, NULL, &bad) ==
            MCMI_ERROR_ARGUMENT,
        "mcmi_check_targets: wrapping stride accepted");
  h = p;
  h.logits_stride = -3;
  CHECK(mcmi_cpu_loss(&h, loss, 1, NULL, 0, ws, 1, &bad) == MCMI_ERROR_ARGUMENT,
        "negative stride accepted");
  h = problem_f64(&c, 0, 1.0, 0.0, 1.0, 1);
  h.centroids_stride = INT64_MAX / 2;
  CHECK(mcmi_cpu_loss(&h, loss, 1, NULL, 0, ws, 1, &bad) == MCMI_ERROR_ARGUMENT,
        "wrapping centroids stride accepted");
  /* Outputs: overlapping gradient rows, per-row losses with a wrapping
   * stride, overlapping sums, EMA rows and scaled rows. */
  CHECK(mcmi_cpu_loss(&p, loss, 1, grad, 2, ws, 1, &bad) == MCMI_ERROR_ARGUMENT,
        "overlapping gradient rows accepted");
  h = p;
  h.reduction = MCMI_REDUCTION_NONE;
  CHECK(mcmi_cpu_loss(&h, loss, INT64_MAX / 2, NULL, 0, ws, 1, &bad) ==
            MCMI_ERROR_ARGUMENT,
        "wrapping loss stride accepted");
  CHECK(mcmi_cpu_class_sums(&p, 0, sums, 0, counts, ws, 1, &bad) ==
            MCMI_ERROR_ARGUMENT,
        "stride-0 sums accepted");
  CHECK(mcmi_cpu_ema_update(&p, 0.5, q, 1, seen, ws, 1, &bad) ==
            MCMI_ERROR_ARGUMENT,
        "overlapping EMA rows accepted");
  CHECK(mcmi_cpu_scale_rows(MCMI_FLOAT64, grad, 4, 3, 0, loss, 1, 1) ==
            MCMI_ERROR_ARGUMENT,
        "stride-0 scaled rows accepted");
  CHECK(mcmi_cpu_scale_rows(MCMI_FLOAT64, grad, INT64_MAX / 2, 3, 3, loss, 1,
                            1) == MCMI_ERROR_ARGUMENT,
        "wrapping scaled rows accepted");
  CHECK(mcmi_cpu_scale_rows((mcmi_dtype)9, grad, 4, 3, 3, loss, 1, 1) ==
            MCMI_ERROR_ARGUMENT,
        "unknown dtype accepted");
  free_case(&c);
}

/* float32 KL against float64 where it is small (high T, near-uniform or
 * in-batch centroids of similar rows): relative error <= 1e-5. */
static void test_small_kl_f32(void) {
  const double temps[] = {1.0, 4.0, 10.0};
  const double spreads[] = {0.05, 0.3, 2.0};
  double worst = 0.0;
  for (int trial = 0; trial < 36; ++trial) {
    const int64_t n = 6 + trial % 5, m = 3 + (int64_t)(uniform() * 1500);
    const double t = temps[trial % 3], spread = spreads[(trial / 3) % 3];
    const int batch = (trial / 9) % 2;
    const int as_logs = !batch && trial % 4 == 3;
    case_t c = make_case(n, m, 2, 1.0);
    float *z = malloc(sizeof(float) * (size_t)(n * m));
    float *q = malloc(sizeof(float) * (size_t)(2 * m));
    double *base = malloc(sizeof(double) * (size_t)m);
    for (int64_t j = 0; j < m; ++j) {
      base[j] = 2.0 * normal();
    }
    for (int64_t i = 0; i < n * m; ++i) {
      z[i] = (float)(base[i % m] + spread * normal());
      c.z[i] = z[i];
    }
    for (int64_t i = 0; i < n; ++i) {
      c.y[i] = i % 2;
    }
    /* Near-uniform centroids, exactly as float32 holds them. */
    for (int64_t k = 0; k < 2; ++k) {
      double s = 0.0;
      for (int64_t j = 0; j < m; ++j) {
        c.q[k * m + j] = exp(spread * 0.1 * normal());
        s += c.q[k * m + j];
      }
      for (int64_t j = 0; j < m; ++j) {
        q[k * m + j] = (float)(c.q[k * m + j] / s);
        c.q[k * m + j] = q[k * m + j];
        if (as_logs) {
          q[k * m + j] = logf(q[k * m + j]);
        }
      }
    }
    double *want = malloc(sizeof(double) * (size_t)n);
    float *got = malloc(sizeof(float) * (size_t)n);
    ref_loss(&c, batch, t, 0.0, 1.0, MCMI_REDUCTION_NONE, want);
    mcmi_problem p = problem_f64(&c, batch, t, 0.0, 1.0, MCMI_REDUCTION_NONE);
    p.dtype = MCMI_FLOAT32;
    p.logits = z;
    p.centroids = batch ? NULL : q;
    p.log_centroids = as_logs;
    int64_t bad;
    CHECK(run_loss(&p, got, NULL, 2, &bad) == MCMI_OK, "small KL status");
    for (int64_t i = 0; i < n; ++i) {
      /* Rows of in-batch classes with one member have KL 0 exactly. */
      const double err = fabs((double)got[i] - want[i]);
      const double rel = err / fmax(fabs(want[i]), 1e-300);
      const double limit = as_logs ? 1e-4 : 1e-5;
      CHECK(rel <= limit || err < 1e-12,
            "small KL row %lld: %.9g vs %.9g (rel %.3g, T %g, spread %g, "
            "batch %d, logs %d)",
            (long long)i, (double)got[i], want[i], rel, t, spread, batch,
            as_logs);
      if (!as_logs && err >= 1e-12) {
        worst = fmax(worst, rel);
      }
    }
    free(want);
    free(got);
    free(base);
    free(z);
    free(q);
    free_case(&c);
  }
  printf("small-KL float32: worst relative error %.3g\n", worst);
}

/* In-batch centroids: a NaN or +inf row makes its classmates' KL NaN (its
 * class mean is NaN), other classes stay finite; a -inf logit leaves every
 * row finite. */
static void test_nonfinite_propagation(void) {
  const double bad_values[] = {NAN, INFINITY, -INFINITY};
  for (int v = 0; v < 3; ++v) {
    for (int batch = 0; batch < 2; ++batch) {
      for (int f32 = 0; f32 < 2; ++f32) {
        case_t c = make_case(6, 5, 2, 1.0);
        for (int64_t i = 0; i < 6; ++i) {
          c.y[i] = i < 3 ? 0 : 1;
        }
        c.z[1 * 5 + 2] = bad_values[v];
        float z32[30], q32[10], loss32[6];
        for (int64_t i = 0; i < 30; ++i) {
          z32[i] = (float)c.z[i];
        }
        for (int64_t i = 0; i < 10; ++i) {
          q32[i] = (float)c.q[i];
        }
        double loss[6];
        mcmi_problem p = problem_f64(&c, batch, 2.0, 0.0, 1.0, 0);
        if (f32) {
          p.dtype = MCMI_FLOAT32;
          p.logits = z32;
          p.centroids = batch ? NULL : q32;
        }
        int64_t bad;
        CHECK(run_loss(&p, f32 ? (void *)loss32 : (void *)loss, NULL, 1,
                       &bad) == MCMI_OK,
              "non-finite logits: status");
        for (int64_t i = 0; i < 6; ++i) {
          const double l = f32 ? (double)loss32[i] : loss[i];
          /* A NaN or +inf logit makes its row NaN and poisons its class
           * mean; a -inf one is a class of probability 0: all finite. */
          const int poisoned = v != 2 && (i == 1 || (batch && i < 3));
          CHECK(poisoned ? isnan(l) : isfinite(l),
                "row %lld: %g (value %g, batch %d, f32 %d)", (long long)i, l,
                bad_values[v], batch, f32);
        }
        free_case(&c);
      }
    }
  }
  /* A NaN entry of a given centroid row is not "below the floor". */
  case_t c = make_case(4, 5, 2, 1.0);
  c.y[0] = c.y[1] = c.y[2] = c.y[3] = 1;
  c.q[5 + 1] = NAN;
  mcmi_problem p = problem_f64(&c, 0, 1.0, 0.0, 1.0, 1);
  double loss;
  int64_t bad;
  CHECK(run_loss(&p, &loss, NULL, 1, &bad) == MCMI_ERROR_CENTROIDS && bad == 1,
        "NaN centroid entry not reported");
  free_case(&c);
}

/* Extreme temperatures: T = 1e-39 (1/T beyond float32) and below float64's
 * normal range give the one-hot limit, finite, in float32 and float64; a
 * huge T gives the uniform limit. */
static void test_extreme_temperatures(void) {
  case_t c = make_case(5, 7, 3, 1.5);
  for (int64_t i = 0; i < 5; ++i) {
    c.y[i] = i % 3;
  }
  float z32[35], q32[21];
  for (int64_t i = 0; i < 35; ++i) {
    z32[i] = (float)c.z[i];
    c.z[i] = z32[i];
  }
  for (int64_t i = 0; i < 21; ++i) {
    q32[i] = (float)c.q[i];
    c.q[i] = q32[i];
  }
  const double temps[] = {1e-39, 1e-300, 5e-324, 1e30, 1e300};
  for (size_t k = 0; k < sizeof temps / sizeof temps[0]; ++k) {
    const double t = temps[k];
    double want[5];
    for (int64_t i = 0; i < 5; ++i) {
      /* The limit: KL = -log Q at the argmax (T -> 0), or
       * -log C - mean_j log Q_j (T -> inf). */
      const double *qr = c.q + c.y[i] * 7;
      int64_t arg = 0;
      double lq = 0.0;
      for (int64_t j = 0; j < 7; ++j) {
        arg = c.z[i * 7 + j] > c.z[i * 7 + arg] ? j : arg;
        lq += log(qr[j]);
      }
      want[i] = t < 1.0 ? -log(qr[arg]) : -log(7.0) - lq / 7.0;
    }
    for (int f32 = 0; f32 < 2; ++f32) {
      mcmi_problem p = problem_f64(&c, 0, t, 0.0, 1.0, 0);
      double loss[5], grad[35];
      float loss32[5], grad32[35];
      if (f32) {
        p.dtype = MCMI_FLOAT32;
        p.logits = z32;
        p.centroids = q32;
      }
      int64_t bad;
      CHECK(run_loss(&p, f32 ? (void *)loss32 : (void *)loss,
                     f32 ? (void *)grad32 : (void *)grad, 2, &bad) == MCMI_OK,
            "T %g status", t);
      for (int64_t i = 0; i < 5; ++i) {
        const double l = f32 ? (double)loss32[i] : loss[i];
        CHECK(isfinite(l) && fabs(l - want[i]) <= 1e-5 * fabs(want[i]) + 1e-6,
              "T %g row %lld (f32 %d): %.9g vs %.9g", t, (long long)i, f32, l,
              want[i]);
      }
      for (int64_t i = 0; i < 35; ++i) {
        const double g = f32 ? (double)grad32[i] : grad[i];
        CHECK(isfinite(g), "T %g: gradient[%lld] = %g (f32 %d)", t,
              (long long)i, g, f32);
      }
      /* Class sums at the same temperature: one-hot or uniform rows. */
      double sums[21];
      float sums32[21];
      int64_t counts[3];
      _Alignas(64) unsigned char ws[1024];
      p = problem_f64(&c, 1, t, 0.0, 0.0, 1);
      if (f32) {
        p.dtype = MCMI_FLOAT32;
        p.logits = z32;
      }
      CHECK(mcmi_cpu_class_sums(&p, 0, f32 ? (void *)sums32 : (void *)sums, 7,
                                counts, ws, 1, &bad) == MCMI_OK,
            "class sums status");
      double total = 0.0;
      int finite = 1;
      for (int64_t j = 0; j < 21; ++j) {
        const double v = f32 ? (double)sums32[j] : sums[j];
        total += v;
        finite &= isfinite(v);
      }
      CHECK(finite && fabs(total - 5.0) < 1e-5,
            "T %g: class sums total %g (f32 %d)", t, total, f32);
    }
  }
  free_case(&c);
}

/*
 * -inf logits are classes of probability 0: against the reference (0 log 0
 * = 0) in float64 and float32, fixed and in-batch centroids, T = 1 and 2.5,
 * with a block of -inf longer than a kernel block; their gradient is exactly
 * 0 and the rest matches central differences; a row with no finite logit
 * is NaN. At a huge T (1/T below float32's range) values stay finite; class
 * sums give the -inf classes exactly 0 and stay finite.
 */
static void test_neg_inf_logits(void) {
  const int64_t rows = 12, cols = 700, classes = 3;
  for (int batch = 0; batch < 2; ++batch) {
    for (int f32 = 0; f32 < 2; ++f32) {
      for (int ti = 0; ti < 3; ++ti) {
        const double t = ti == 0 ? 1.0 : ti == 1 ? 2.5 : 1e300;
        case_t c = make_case(rows, cols, classes, 2.0);
        for (int64_t i = 0; i < rows; ++i) {
          c.y[i] = i % 4 == 3 ? -100 : i % classes;
          for (int64_t j = 0; j < cols; ++j) {
            /* Row 0: -inf over columns 0..599 (whole kernel blocks). */
            if ((i == 0 && j < 600) || (i > 0 && uniform() < 0.3)) {
              c.z[i * cols + j] = -INFINITY;
            }
          }
          c.z[i * cols + cols - 1] = 1.0; /* one finite logit at least */
        }
        for (int64_t j = 0; j < cols; ++j) {
          c.z[5 * cols + j] = -INFINITY; /* row 5: no finite logit */
        }
        float *z32 = malloc(sizeof(float) * (size_t)(rows * cols));
        float *q32 = malloc(sizeof(float) * (size_t)(classes * cols));
        for (int64_t i = 0; i < rows * cols; ++i) {
          z32[i] = (float)c.z[i];
          c.z[i] = z32[i];
        }
        for (int64_t i = 0; i < classes * cols; ++i) {
          q32[i] = (float)c.q[i];
          c.q[i] = q32[i];
        }
        mcmi_problem p = problem_f64(&c, batch, t, 0.0, 1.0, 0);
        if (f32) {
          p.dtype = MCMI_FLOAT32;
          p.logits = z32;
          p.centroids = batch ? NULL : q32;
        }
        double loss[12], want[12];
        double *grad = malloc(sizeof(double) * (size_t)(rows * cols));
        float loss32[12];
        float *grad32 = malloc(sizeof(float) * (size_t)(rows * cols));
        int64_t bad;
        CHECK(run_loss(&p, f32 ? (void *)loss32 : (void *)loss,
                       f32 ? (void *)grad32 : (void *)grad, 2, &bad) == MCMI_OK,
              "-inf logits: status");
        ref_loss(&c, batch, t, 0.0, 1.0, 0, want);
        for (int64_t i = 0; i < rows; ++i) {
          const double l = f32 ? (double)loss32[i] : loss[i];
          /* Row 5 is NaN, and with in-batch centroids its class (2) too
           * (the reference's fmax drops the NaN of that class mean). */
          const int nan_row = i == 5 || (batch && c.y[i] == c.y[5]);
          if (nan_row) {
            CHECK(isnan(l), "-inf row %lld: %g (want NaN)", (long long)i, l);
            continue;
          }
          const double tol = t > 1e10 ? 1e-5 : f32 ? 2e-5 : 1e-10;
          CHECK(isfinite(l) && fabs(l - want[i]) <= tol * fabs(want[i]) + 1e-9,
                "-inf row %lld (batch %d f32 %d T %g): %.12g vs %.12g",
                (long long)i, batch, f32, t, l, want[i]);
          for (int64_t j = 0; j < cols; ++j) {
            const double g =
                f32 ? (double)grad32[i * cols + j] : grad[i * cols + j];
            CHECK(c.z[i * cols + j] == -INFINITY ? g == 0.0 : isfinite(g),
                  "-inf row %lld col %lld: gradient %g", (long long)i,
                  (long long)j, g);
          }
        }
        if (!f32 && !batch && ti == 1) {
          for (int64_t e = 7; e < rows * cols; e += 97) {
            if (c.z[e] == -INFINITY || e / cols == 5) {
              continue;
            }
            const double h = 1e-6, z0 = c.z[e];
            double up[12], dn[12];
            c.z[e] = z0 + h;
            ref_loss(&c, batch, t, 0.0, 1.0, 0, up);
            c.z[e] = z0 - h;
            ref_loss(&c, batch, t, 0.0, 1.0, 0, dn);
            c.z[e] = z0;
            const double fd = (up[e / cols] - dn[e / cols]) / (2 * h);
            CHECK(fabs(grad[e] - fd) < 1e-6, "-inf: grad[%lld] %g vs %g",
                  (long long)e, grad[e], fd);
          }
        }
        /* Class sums of the same rows: -inf classes get exactly 0. */
        double *sums = malloc(sizeof(double) * (size_t)(classes * cols));
        float *sums32 = malloc(sizeof(float) * (size_t)(classes * cols));
        int64_t counts[3];
        c.y[5] = -100; /* leave the NaN row out */
        mcmi_problem cs = p;
        cs.centroids = NULL;
        void *ws = aligned_alloc(64, mcmi_cpu_class_sums_workspace(&cs) + 64);
        CHECK(mcmi_cpu_class_sums(&cs, 0, f32 ? (void *)sums32 : (void *)sums,
                                  cols, counts, ws, 2, &bad) == MCMI_OK,
              "-inf class sums: status");
        free(ws);
        for (int64_t k = 0; k < classes; ++k) {
          double total = 0.0;
          for (int64_t j = 0; j < cols; ++j) {
            total += f32 ? (double)sums32[k * cols + j] : sums[k * cols + j];
          }
          CHECK(fabs(total - (double)counts[k]) <
                    1e-5 * (double)(1 + counts[k]),
                "-inf class sums: class %lld total %g, count %lld",
                (long long)k, total, (long long)counts[k]);
        }
        CHECK((f32 ? (double)sums32[0] : sums[0]) == 0.0 || counts[0] > 1,
              "-inf class sums: column 0");
        free(sums), free(sums32), free(z32), free(q32), free(grad),
            free(grad32);
        free_case(&c);
      }
    }
  }
}

/* In-batch centroids, classes with a single row: the centroid of such a row
 * is its own softmax, so its KL is 0 (up to the floor) and its gradient is
 * that of the CE term alone; rows of classes with several rows keep their
 * KL; a NaN logit still makes its row NaN. */
static void test_single_row_classes(void) {
  const int64_t rows = 40, cols = 600, classes = 60;
  for (int f32 = 0; f32 < 2; ++f32) {
    for (int ti = 0; ti < 2; ++ti) {
      for (int wi = 0; wi < 2; ++wi) {
        const double t = ti ? 2.5 : 1.0, wce = wi ? 1.0 : 0.0;
        case_t c = make_case(rows, cols, classes, 2.0);
        for (int64_t i = 0; i < rows; ++i) {
          /* Rows 0..29 alone in their class, 30..37 in pairs, 38, 39
           * ignored. */
          c.y[i] = i < 30 ? i : i < 38 ? 30 + (i - 30) / 2 : -100;
        }
        float *z32 = malloc(sizeof(float) * (size_t)(rows * cols));
        for (int64_t i = 0; i < rows * cols; ++i) {
          z32[i] = (float)c.z[i];
          c.z[i] = z32[i];
        }
        double want[40], loss[40];
        float loss32[40];
        double *grad = malloc(sizeof(double) * (size_t)(rows * cols));
        float *grad32 = malloc(sizeof(float) * (size_t)(rows * cols));
        ref_loss(&c, 1, t, wce, 1.0, MCMI_REDUCTION_NONE, want);
        mcmi_problem p = problem_f64(&c, 1, t, wce, 1.0, MCMI_REDUCTION_NONE);
        if (f32) {
          p.dtype = MCMI_FLOAT32;
          p.logits = z32;
        }
        int64_t bad;
        CHECK(run_loss(&p, f32 ? (void *)loss32 : (void *)loss,
                       f32 ? (void *)grad32 : (void *)grad, 2, &bad) == MCMI_OK,
              "single-row classes: status");
        const double tol = f32 ? 2e-5 : 1e-10;
        for (int64_t i = 0; i < rows; ++i) {
          const double l = f32 ? (double)loss32[i] : loss[i];
          CHECK(fabs(l - want[i]) <= tol * fabs(want[i]) + cols * 1e-12,
                "single-row classes row %lld (f32 %d T %g ce %g): %.12g vs "
                "%.12g",
                (long long)i, f32, t, wce, l, want[i]);
          if (i >= 30) {
            continue;
          }
          /* The gradient of the CE term alone: softmax(z) - onehot(y). */
          double mx = -INFINITY, sum = 0.0, worst = 0.0;
          const double *zi = c.z + i * cols;
          for (int64_t j = 0; j < cols; ++j) {
            mx = fmax(mx, zi[j]);
          }
          for (int64_t j = 0; j < cols; ++j) {
            sum += exp(zi[j] - mx);
          }
          for (int64_t j = 0; j < cols; ++j) {
            const double g =
                f32 ? (double)grad32[i * cols + j] : grad[i * cols + j];
            const double ce = exp(zi[j] - mx) / sum - (j == c.y[i] ? 1.0 : 0.0);
            worst = fmax(worst, fabs(g - wce * ce));
          }
          CHECK(worst <= (f32 ? 1e-6 : 1e-14),
                "single-row class row %lld: gradient off the CE's by %g",
                (long long)i, worst);
          if (wce == 0.0) {
            CHECK(l == 0.0 && worst == 0.0,
                  "single-row class row %lld: KL %g, gradient %g (want 0)",
                  (long long)i, l, worst);
          }
        }
        /* A NaN logit in a row alone in its class. */
        c.z[3 * cols + 7] = NAN;
        z32[3 * cols + 7] = NAN;
        CHECK(run_loss(&p, f32 ? (void *)loss32 : (void *)loss,
                       f32 ? (void *)grad32 : (void *)grad, 2, &bad) == MCMI_OK,
              "single-row classes, NaN: status");
        const double l3 = f32 ? (double)loss32[3] : loss[3];
        const double g3 = f32 ? (double)grad32[3 * cols] : grad[3 * cols];
        CHECK(isnan(l3) && isnan(g3),
              "single-row class with a NaN logit: loss %g, gradient %g", l3,
              g3);
        free(z32);
        free(grad);
        free(grad32);
        free_case(&c);
      }
    }
  }
}

/*
 * Every instruction set of the CPU kernels gives bitwise the same results:
 * each op (loss and gradient with given, log and in-batch centroids; class
 * sums of probabilities and log-probabilities; the EMA update; scale_rows)
 * runs under every instruction set this CPU supports, and all their output
 * buffers (the gaps of strided outputs included) must match byte for byte.
 */

/* The outputs of one run, one after another, each with its name. */
typedef struct {
  unsigned char *bytes;
  size_t size, cap;
  const char *names[64];
  size_t ends[64];
  int count;
} isa_outputs;

static void outputs_add(isa_outputs *o, const char *name, const void *p,
                        size_t n) {
  if (o->size + n > o->cap) {
    o->cap = 2 * (o->size + n);
    o->bytes = realloc(o->bytes, o->cap);
  }
  memcpy(o->bytes + o->size, p, n);
  o->size += n;
  if (o->count < 64) {
    o->names[o->count] = name;
    o->ends[o->count++] = o->size;
  }
}

/* A buffer of n elements of `size` bytes, filled with a byte pattern (so
 * that an element a kernel should not write stays recognizable). */
static void *pattern(size_t n, size_t size) {
  void *p = malloc(n * size + 1);
  memset(p, 0x5A, n * size + 1);
  return p;
}

typedef struct {
  mcmi_dtype dtype;
  int64_t rows, cols, classes;
  double t;
  int special; /* -inf, NaN and whole -inf rows among the logits */
} isa_case;

/* Runs every op on case k (inputs from the fixed seed) and collects its
 * outputs. */
static void run_all_ops(const isa_case *k, isa_outputs *o) {
  rng_state = 0x2545F4914F6CDD1Dull ^ (uint64_t)(k->rows * 7919 + k->cols);
  const int64_t rows = k->rows, cols = k->cols, classes = k->classes;
  const mcmi_dtype dt = k->dtype;
  const size_t es = mcmi_logit_size(dt), qs = mcmi_acc_size(dt);
  const int64_t zs = cols + 3, ys = 2, gs = cols + 1, ls = 2, cs = cols + 2;
  const int threads = 3;
  void *z = pattern((size_t)(rows * zs + 1), es);
  int64_t *y = malloc(sizeof(int64_t) * (size_t)(rows * ys + 1));
  void *q = pattern((size_t)(classes * cs + 1), qs);
  void *lq = pattern((size_t)(classes * cs + 1), qs);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      store_any(dt, z, i * zs + j, 3.0 * normal());
    }
    y[i * ys] = uniform() < 0.15 ? -100 : (int64_t)(uniform() * classes);
    y[i * ys + 1] = 12345; /* between labels: never read */
  }
  if (k->special && rows >= 4) {
    /* A -inf entry, a NaN entry, a row of -inf only, a +inf entry. */
    store_any(dt, z, 0 * zs + cols / 2, -INFINITY);
    store_any(dt, z, 1 * zs + cols - 1, NAN);
    for (int64_t j = 0; j < cols; ++j) {
      store_any(dt, z, 2 * zs + j, -INFINITY);
    }
    store_any(dt, z, 3 * zs, INFINITY);
  }
  for (int64_t c = 0; c < classes; ++c) {
    double sum = 0.0, *row = malloc(sizeof(double) * (size_t)cols);
    for (int64_t j = 0; j < cols; ++j) {
      row[j] = exp(2.0 * normal());
      sum += row[j];
    }
    for (int64_t j = 0; j < cols; ++j) {
      const double v = row[j] / sum;
      const double lv = log(fmax(v, 1e-12));
      if (dt == MCMI_FLOAT64) {
        ((double *)q)[c * cs + j] = v;
        ((double *)lq)[c * cs + j] = lv;
      } else {
        ((float *)q)[c * cs + j] = (float)v;
        ((float *)lq)[c * cs + j] = (float)lv;
      }
    }
    free(row);
  }
  mcmi_problem p;
  memset(&p, 0, sizeof p);
  p.rows = rows;
  p.cols = cols;
  p.classes = classes;
  p.dtype = dt;
  p.logits = z;
  p.logits_stride = zs;
  p.target = y;
  p.target_stride = ys;
  p.centroids_stride = cs;
  p.temperature = k->t;
  p.cmi_weight = 0.7;
  p.floor = 1e-12;
  p.ignore_index = -100;
  int64_t bad = -1;
  static const char *const loss_names[3][2] = {
      {"loss (fixed)", "gradient (fixed)"},
      {"loss (log centroids)", "gradient (log centroids)"},
      {"loss (in-batch)", "gradient (in-batch)"}};
  for (int mode = 0; mode < 3; ++mode) {
    for (int red = 0; red < 3; ++red) {
      p.centroids = mode == 2 ? NULL : mode == 1 ? lq : q;
      p.log_centroids = mode == 1;
      p.ce_weight = red == 1 ? 0.0 : 1.0;
      p.reduction = (mcmi_reduction)red;
      void *loss = pattern((size_t)(rows * ls + 1), es);
      void *grad = pattern((size_t)(rows * gs + 1), es);
      void *ws = aligned_alloc(
          64, (mcmi_cpu_loss_workspace(&p, threads, 1) + 127) / 64 * 64);
      CHECK(mcmi_cpu_loss(&p, loss, ls, grad, gs, ws, threads, &bad) == MCMI_OK,
            "%s status", loss_names[mode][0]);
      outputs_add(o, loss_names[mode][0], loss, (size_t)(rows * ls + 1) * es);
      outputs_add(o, loss_names[mode][1], grad, (size_t)(rows * gs + 1) * es);
      free(ws);
      free(loss);
      free(grad);
    }
  }
  const int64_t ss = cols + 1;
  void *ws =
      aligned_alloc(64, (mcmi_cpu_class_sums_workspace(&p) + 127) / 64 * 64);
  for (int log_probs = 0; log_probs < 2; ++log_probs) {
    void *sums = pattern((size_t)(classes * ss), qs);
    int64_t *counts = malloc(sizeof(int64_t) * (size_t)classes);
    CHECK(mcmi_cpu_class_sums(&p, log_probs, sums, ss, counts, ws, threads,
                              &bad) == MCMI_OK,
          "class sums status");
    outputs_add(o, log_probs ? "class sums (log)" : "class sums", sums,
                (size_t)(classes * ss) * qs);
    outputs_add(o, "class counts", counts, sizeof(int64_t) * (size_t)classes);
    free(sums);
    free(counts);
  }
  free(ws);
  /* The EMA update twice: first sightings, then blends. */
  void *cent = malloc((size_t)(classes * cs + 1) * qs);
  memcpy(cent, q, (size_t)(classes * cs + 1) * qs);
  uint8_t *seen = calloc((size_t)classes, 1);
  ws = aligned_alloc(64, (mcmi_cpu_ema_workspace(&p, threads) + 127) / 64 * 64);
  for (int round = 0; round < 2; ++round) {
    CHECK(mcmi_cpu_ema_update(&p, 0.3, cent, cs, seen, ws, threads, &bad) ==
              MCMI_OK,
          "EMA update status");
  }
  outputs_add(o, "EMA centroids", cent, (size_t)(classes * cs + 1) * qs);
  outputs_add(o, "EMA seen", seen, (size_t)classes);
  free(ws);
  free(seen);
  free(cent);
  /* scale_rows in place on a copy of the logits, one scale per row. */
  void *x = malloc((size_t)(rows * zs + 1) * es);
  memcpy(x, z, (size_t)(rows * zs + 1) * es);
  void *scale = pattern((size_t)rows + 1, es);
  for (int64_t i = 0; i < rows; ++i) {
    store_any(dt, scale, i, 0.1 + uniform());
  }
  CHECK(mcmi_cpu_scale_rows(dt, x, rows, cols, zs, scale, 1, threads) ==
            MCMI_OK,
        "scale_rows status");
  outputs_add(o, "scale_rows", x, (size_t)(rows * zs + 1) * es);
  free(x);
  free(scale);
  free(z);
  free(y);
  free(q);
  free(lq);
}

static void test_isa_bitwise(void) {
  /* The choice itself: unknown or unsupported sets are refused and change
   * nothing. */
  const mcmi_isa best = mcmi_cpu_get_isa();
  CHECK(mcmi_cpu_isa_supported(best), "the default %s is not supported",
        mcmi_cpu_isa_name(best));
  CHECK(mcmi_cpu_isa_supported(MCMI_ISA_BASELINE), "no baseline build");
  CHECK(mcmi_cpu_set_isa((mcmi_isa)MCMI_ISA_COUNT) == MCMI_ERROR_ARGUMENT &&
            mcmi_cpu_get_isa() == best,
        "an unknown instruction set is not refused");
  CHECK(mcmi_cpu_isa_name((mcmi_isa)-1) == NULL &&
            mcmi_cpu_isa_name((mcmi_isa)MCMI_ISA_COUNT) == NULL,
        "an unknown instruction set has a name");
  mcmi_isa isas[MCMI_ISA_COUNT];
  int n = 0;
  for (int i = MCMI_ISA_COUNT - 1; i >= 0; --i) {
    if (mcmi_cpu_isa_supported((mcmi_isa)i)) {
      isas[n++] = (mcmi_isa)i;
      CHECK(i <= (int)best, "%s runs, but the default is %s",
            mcmi_cpu_isa_name((mcmi_isa)i), mcmi_cpu_isa_name(best));
    } else {
      CHECK(mcmi_cpu_set_isa((mcmi_isa)i) == MCMI_ERROR_ARGUMENT &&
                mcmi_cpu_get_isa() == best,
            "%s is not supported, yet set", mcmi_cpu_isa_name((mcmi_isa)i));
      printf("instruction sets: %s not run by this CPU, not compared\n",
             mcmi_cpu_isa_name((mcmi_isa)i));
    }
  }
  printf("instruction sets compared bitwise:");
  for (int i = 0; i < n; ++i) {
    printf(" %s", mcmi_cpu_isa_name(isas[i]));
  }
  printf(n < 2 ? " (only one: nothing to compare)\n" : "\n");

  /* Shapes: tiny, C below a vector, odd C (a multiple of no lane count),
   * C over several blocks with and without a tail; threads share rows. */
  const int64_t shapes[][3] = {{1, 1, 1},    {5, 3, 2},     {6, 7, 5},
                               {9, 37, 6},   {17, 100, 10}, {13, 1031, 7},
                               {24, 1536, 5}};
  const double temps[] = {1.0, 2.5, 0.37};
  int cases = 0, differ = 0;
  for (int dt = 0; dt < MCMI_DTYPE_COUNT; ++dt) {
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; ++s) {
      for (int ti = 0; ti < 3; ++ti) {
        for (int special = 0; special < 2; ++special) {
          const isa_case k = {(mcmi_dtype)dt, shapes[s][0], shapes[s][1],
                              shapes[s][2],   temps[ti],    special};
          isa_outputs first = {0};
          for (int i = 0; i < n; ++i) {
            CHECK(mcmi_cpu_set_isa(isas[i]) == MCMI_OK &&
                      mcmi_cpu_get_isa() == isas[i],
                  "%s not set", mcmi_cpu_isa_name(isas[i]));
            isa_outputs o = {0};
            run_all_ops(&k, i == 0 ? &first : &o);
            if (i == 0) {
              continue;
            }
            size_t at = 0;
            while (at < o.size && o.bytes[at] == first.bytes[at]) {
              ++at;
            }
            int op = 0;
            while (op < o.count - 1 && o.ends[op] <= at) {
              ++op;
            }
            differ += at < o.size;
            CHECK(o.size == first.size && at == o.size,
                  "%s: %s differs from %s, dtype %d, %lld x %lld, T = %g%s "
                  "(byte %zu)",
                  o.names[op], mcmi_cpu_isa_name(isas[i]),
                  mcmi_cpu_isa_name(isas[0]), dt, (long long)k.rows,
                  (long long)k.cols, k.t, special ? ", -inf/NaN logits" : "",
                  at);
            free(o.bytes);
          }
          free(first.bytes);
          ++cases;
        }
      }
    }
  }
  printf("instruction sets: %d cases, %d differ\n", cases, differ);
  CHECK(mcmi_cpu_set_isa(best) == MCMI_OK, "default not restored");
}

int main(void) {
  test_f64();
  test_f32_and_threads();
  test_log_centroids();
  test_errors();
  test_nan_logits();
  test_class_sums();
  test_ema_update();
  test_half_formats();
  test_size_overflow();
  test_small_kl_f32();
  test_nonfinite_propagation();
  test_extreme_temperatures();
  test_neg_inf_logits();
  test_single_row_classes();
  test_isa_bitwise();
  printf("%d passed, %d failed\n", checks - failures, failures);
  return failures ? 1 : 0;
}
