/*
 * mcmi_cpu_impl.h: the CPU kernels for one logits type.
 *
 * Included by mcmi_cpu.c once per type, with these macros defined:
 *   SFX        suffix of the generated function names
 *   LOGIT_T    storage type of logits, loss and gradient
 *   ACC_T      element arithmetic type (float, or double for float64)
 *   LOAD(x)    LOGIT_T -> ACC_T
 *   STORE(x)   ACC_T -> LOGIT_T
 *   EXP, LOG   exp and log in ACC_T
 * Per-row sums are accumulated in double whatever ACC_T is.
 */

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(name, SFX)

/* Maximum of row z (NaN entries are skipped; they propagate later). */
static inline ACC_T FN(row_max)(const LOGIT_T *z, int64_t cols) {
  ACC_T m = -(ACC_T)INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < cols; ++j) {
    ACC_T v = LOAD(z[j]);
    m = v > m ? v : m;
  }
  return m;
}

/* log sum_j exp((z_j - m) / T): the row's log-normalizer minus m / T. */
static inline double FN(row_log_norm)(const LOGIT_T *z, int64_t cols, ACC_T m,
                                      ACC_T inv_t) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < cols; ++j) {
    s += (double)EXP((LOAD(z[j]) - m) * inv_t);
  }
  return log(s);
}

/*
 * One valid row of the loss: returns ce_weight * CE + cmi_weight * KL and,
 * when g != NULL, writes the row's gradient scaled by the given
 * coefficients. `scratch` holds 3 * cols ACC_T when g != NULL.
 * *qsum receives sum_j q_j.
 */
static double FN(loss_row)(const mcmi_problem *p, const LOGIT_T *z,
                           const ACC_T *q, int64_t y, LOGIT_T *g,
                           ACC_T *scratch, double ce_coef, double cmi_coef,
                           double *qsum) {
  const int64_t cols = p->cols;
  const ACC_T inv_t = (ACC_T)(1.0 / p->temperature);
  const ACC_T qfloor = (ACC_T)p->floor;
  const int unit_t = p->temperature == 1.0;
  const int want_ce = p->ce_weight != 0.0;
  const int separate_ce = want_ce && !unit_t;
  const ACC_T m = FN(row_max)(z, cols);
  ACC_T *e_buf = scratch;
  ACC_T *w_buf = scratch ? scratch + cols : NULL;
  ACC_T *e1_buf = scratch ? scratch + 2 * cols : NULL;

  double s = 0.0, a = 0.0, qs = 0.0;
  if (g) {
#pragma omp simd reduction(+ : s, a, qs)
    for (int64_t j = 0; j < cols; ++j) {
      ACC_T u = (LOAD(z[j]) - m) * inv_t;
      ACC_T qv = q[j];
      ACC_T e = EXP(u);
      ACC_T w = u - LOG(qv > qfloor ? qv : qfloor);
      e_buf[j] = e;
      w_buf[j] = w;
      s += (double)e;
      a += (double)(e * w);
      qs += (double)qv;
    }
  } else {
#pragma omp simd reduction(+ : s, a, qs)
    for (int64_t j = 0; j < cols; ++j) {
      ACC_T u = (LOAD(z[j]) - m) * inv_t;
      ACC_T qv = q[j];
      ACC_T e = EXP(u);
      s += (double)e;
      a += (double)(e * (u - LOG(qv > qfloor ? qv : qfloor)));
      qs += (double)qv;
    }
  }
  *qsum = qs;
  const double ls = log(s);
  const double kl = a / s - ls;

  double s1 = s;
  if (separate_ce) {
    s1 = 0.0;
    if (g) {
#pragma omp simd reduction(+ : s1)
      for (int64_t j = 0; j < cols; ++j) {
        ACC_T e1 = EXP(LOAD(z[j]) - m);
        e1_buf[j] = e1;
        s1 += (double)e1;
      }
    } else {
#pragma omp simd reduction(+ : s1)
      for (int64_t j = 0; j < cols; ++j) {
        s1 += (double)EXP(LOAD(z[j]) - m);
      }
    }
  }
  /* With T != 1 the row max of z / T is m / T, of z it is m. */
  const double ce = want_ce ? (double)m + log(s1) - (double)LOAD(z[y]) : 0.0;

  if (g) {
    const ACC_T inv_s = (ACC_T)(1.0 / s);
    const ACC_T inv_s1 = (ACC_T)(1.0 / s1);
    const ACC_T shift = (ACC_T)(ls + kl);
    const ACC_T kc = (ACC_T)cmi_coef;
    const ACC_T kce = (ACC_T)ce_coef;
    const ACC_T *p1_buf = separate_ce ? e1_buf : e_buf;
    ACC_T gy = 0;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) {
      ACC_T pj = e_buf[j] * inv_s;
      ACC_T v = kc * pj * (w_buf[j] - shift) + kce * (p1_buf[j] * inv_s1);
      g[j] = STORE(v);
    }
    if (want_ce) {
      gy = kc * (e_buf[y] * inv_s) * (w_buf[y] - shift) +
           kce * (p1_buf[y] * inv_s1) - kce;
      g[y] = STORE(gy);
    }
  }
  return p->ce_weight * ce + p->cmi_weight * kl;
}

/*
 * Per-class sums of the softmax (or log-softmax) rows at temperature T,
 * over rows with slot[i] >= 0, into out[slot] (nslots rows, stride
 * out_stride). Each output row is summed in row order by one thread, so
 * the result does not depend on the thread count. row_m and row_ls are
 * scratch of `rows` doubles each.
 */
static void FN(class_accumulate)(const mcmi_problem *p, const int64_t *slot,
                                 int64_t nslots, ACC_T *out, int64_t out_stride,
                                 double *row_m, double *row_ls, int log_probs,
                                 int nt) {
  const int64_t rows = p->rows, cols = p->cols;
  const LOGIT_T *logits = (const LOGIT_T *)p->logits;
  const ACC_T inv_t = (ACC_T)(1.0 / p->temperature);

#pragma omp parallel num_threads(nt)
  {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows; ++i) {
      if (slot[i] < 0) {
        continue;
      }
      const LOGIT_T *z = logits + i * p->logits_stride;
      ACC_T m = FN(row_max)(z, cols);
      row_m[i] = (double)m;
      row_ls[i] = FN(row_log_norm)(z, cols, m, inv_t);
    }
#pragma omp for schedule(static)
    for (int64_t c = 0; c < nslots; ++c) {
      ACC_T *o = out + c * out_stride;
      for (int64_t j = 0; j < cols; ++j) {
        o[j] = 0;
      }
    }
    /* An implicit barrier ends each `omp for`: stats and zeros are ready. */
    const int64_t t = omp_get_thread_num(), team = omp_get_num_threads();
    const int64_t lo = nslots * t / team, hi = nslots * (t + 1) / team;
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t c = slot[i];
      if (c < lo || c >= hi) {
        continue;
      }
      const LOGIT_T *z = logits + i * p->logits_stride;
      const ACC_T m = (ACC_T)row_m[i];
      const ACC_T ls = (ACC_T)row_ls[i];
      ACC_T *o = out + c * out_stride;
      if (log_probs) {
#pragma omp simd
        for (int64_t j = 0; j < cols; ++j) {
          o[j] += (LOAD(z[j]) - m) * inv_t - ls;
        }
      } else {
#pragma omp simd
        for (int64_t j = 0; j < cols; ++j) {
          o[j] += EXP((LOAD(z[j]) - m) * inv_t - ls);
        }
      }
    }
  }
}

static mcmi_status FN(loss)(const mcmi_problem *p, const loss_layout *lay,
                            int64_t valid, void *loss_out, int64_t loss_stride,
                            LOGIT_T *grad, int64_t grad_stride, char *ws,
                            int nt, int64_t *bad_index) {
  const int64_t rows = p->rows, cols = p->cols;
  const LOGIT_T *logits = (const LOGIT_T *)p->logits;
  double *row_val = (double *)(ws + lay->row_val);
  double *row_qsum = (double *)(ws + lay->row_qsum);
  const ACC_T *qbase;
  int64_t qstride;
  const int64_t *slot = NULL;
  const int fixed = p->centroids != NULL;

  if (fixed) {
    qbase = (const ACC_T *)p->centroids;
    qstride = p->centroids_stride;
  } else {
    int64_t *map = (int64_t *)(ws + lay->class_map);
    int64_t *count = (int64_t *)(ws + lay->slot_count);
    int64_t *slots = (int64_t *)(ws + lay->slot);
    ACC_T *qc = (ACC_T *)(ws + lay->batch_q);
    const int64_t nslots = assign_slots(p, map, slots, count);
    FN(class_accumulate)(p, slots, nslots, qc, cols, row_val, row_qsum, 0, nt);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t c = 0; c < nslots; ++c) {
      const ACC_T inv_n = (ACC_T)(1.0 / (double)count[c]);
      ACC_T *qr = qc + c * cols;
      for (int64_t j = 0; j < cols; ++j) {
        qr[j] *= inv_n;
      }
    }
    qbase = qc;
    qstride = cols;
    slot = slots;
  }

  const double norm =
      (p->reduction == MCMI_REDUCTION_MEAN && valid > 0) ? (double)valid : 1.0;
  const double ce_coef = p->ce_weight / norm;
  const double cmi_coef = p->cmi_weight / (p->temperature * norm);

#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t y = p->target[i * p->target_stride];
    LOGIT_T *g = grad ? grad + i * grad_stride : NULL;
    if (y == p->ignore_index || y < 0 || y >= p->classes) {
      row_val[i] = 0.0;
      row_qsum[i] = 1.0;
      if (g) {
        memset(g, 0, (size_t)cols * sizeof(LOGIT_T));
      }
      continue;
    }
    const ACC_T *q = qbase + (fixed ? y : slot[i]) * qstride;
    ACC_T *scratch =
        g ? (ACC_T *)(ws + lay->scratch) + omp_get_thread_num() * 3 * cols
          : NULL;
    row_val[i] = FN(loss_row)(p, logits + i * p->logits_stride, q, y, g,
                              scratch, ce_coef, cmi_coef, &row_qsum[i]);
  }

  double total = 0.0;
  for (int64_t i = 0; i < rows; ++i) {
    if (fixed && !(fabs(row_qsum[i] - 1.0) <= MCMI_CENTROID_SUM_TOLERANCE)) {
      *bad_index = p->target[i * p->target_stride];
      return MCMI_ERROR_CENTROIDS;
    }
    total += row_val[i];
  }
  LOGIT_T *out = (LOGIT_T *)loss_out;
  if (p->reduction == MCMI_REDUCTION_NONE) {
    for (int64_t i = 0; i < rows; ++i) {
      out[i * loss_stride] = STORE((ACC_T)row_val[i]);
    }
  } else {
    out[0] = STORE((ACC_T)(total / norm));
  }
  return MCMI_OK;
}

static void FN(scale_rows)(LOGIT_T *x, int64_t rows, int64_t cols,
                           int64_t stride, const LOGIT_T *scale,
                           int64_t scale_stride, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t i = 0; i < rows; ++i) {
    const ACC_T k = LOAD(scale[i * scale_stride]);
    LOGIT_T *r = x + i * stride;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) {
      r[j] = STORE(LOAD(r[j]) * k);
    }
  }
}

#undef FN
#undef CAT
#undef CAT_
