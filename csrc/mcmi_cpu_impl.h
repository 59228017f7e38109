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
 * Row sums are formed in ACC_T block by block and added up in double (see
 * below). Functions that
 * touch a whole row carry MCMI_CLONES: one copy per x86-64 level, chosen
 * at load time.
 */

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(name, SFX)

/* Maximum of row z (NaN entries are skipped; they propagate later). */
MCMI_INLINE ACC_T FN(row_max)(const LOGIT_T *z, int64_t cols) {
  ACC_T m = -(ACC_T)INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < cols; ++j) {
    ACC_T v = LOAD(z[j]);
    m = v > m ? v : m;
  }
  return m;
}

/*
 * Sums over one block of at most MCMI_BLOCK elements are formed in ACC_T
 * (SIMD lanes, fixed order) and added to double totals block by block: the
 * rounding error of a block sum is that of a few dozen additions, while the
 * loop stays in single precision. Blocks start at fixed offsets from the row
 * start, so a result never depends on anything but the row.
 */
/* sum_j exp((z_j - m) * k) over a block; stores the terms when e != NULL. */
MCMI_INLINE ACC_T FN(exp_block)(const LOGIT_T *z, int64_t n, ACC_T m, ACC_T k,
                                ACC_T *e) {
  ACC_T s = 0;
  if (e) {
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < n; ++j) {
      e[j] = EXP((LOAD(z[j]) - m) * k);
      s += e[j];
    }
  } else {
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < n; ++j) {
      s += EXP((LOAD(z[j]) - m) * k);
    }
  }
  return s;
}

/*
 * The fused block of a loss row: with u_j = (z_j - m) / T,
 * w_j = u_j - log max(q_j, floor) (or u_j - q_j when q holds logs) and
 * e_j = exp(u_j), adds sum e_j, sum e_j w_j and sum q_j to sums[0..2];
 * stores e and w when e != NULL. The four loops differ only in what they
 * store and in whether they take the log.
 */
#define MCMI_KL_LOOP(LOGQ, KEEP)                                               \
  _Pragma("omp simd reduction(+ : s, a, qs)") for (int64_t j = 0; j < n;       \
                                                   ++j) {                      \
    const ACC_T u = (LOAD(z[j]) - m) * inv_t;                                  \
    const ACC_T qv = q[j];                                                     \
    const ACC_T ej = EXP(u);                                                   \
    const ACC_T wj = u - (LOGQ);                                               \
    KEEP;                                                                      \
    s += ej;                                                                   \
    a += ej * wj;                                                              \
    qs += qv;                                                                  \
  }

MCMI_INLINE void FN(kl_block)(const LOGIT_T *z, const ACC_T *q, int64_t n,
                              ACC_T m, ACC_T inv_t, ACC_T qfloor, int q_is_log,
                              ACC_T *e, ACC_T *w, double sums[3]) {
  ACC_T s = 0, a = 0, qs = 0;
  if (q_is_log && e) {
    MCMI_KL_LOOP(qv, (e[j] = ej, w[j] = wj))
  } else if (q_is_log) {
    MCMI_KL_LOOP(qv, (void)0)
  } else if (e) {
    MCMI_KL_LOOP(LOG(qv > qfloor ? qv : qfloor), (e[j] = ej, w[j] = wj))
  } else {
    MCMI_KL_LOOP(LOG(qv > qfloor ? qv : qfloor), (void)0)
  }
  sums[0] += (double)s;
  sums[1] += (double)a;
  sums[2] += (double)qs;
}
#undef MCMI_KL_LOOP

/*
 * One valid row of the loss: returns ce_weight * CE + cmi_weight * KL and,
 * when g != NULL, writes the row's gradient scaled by the given
 * coefficients. *qsum receives sum_j q_j.
 *
 * One pass over z and q, block by block (online softmax): each block is
 * reduced relative to its own maximum m_b while it sits in L1, and the
 * blocks are combined with the factors r_b = exp((m_b - M) / T), M the row
 * maximum. `stats` holds one mcmi_block_stat per block; `scratch`, when
 * g != NULL, 3 * cols ACC_T for the terms the gradient pass reuses.
 */
MCMI_CLONES static double FN(loss_row)(const mcmi_problem *p, const LOGIT_T *z,
                                       const ACC_T *q, int64_t y, LOGIT_T *g,
                                       mcmi_block_stat *stats, ACC_T *scratch,
                                       double ce_coef, double cmi_coef,
                                       double *qsum) {
  const int64_t cols = p->cols;
  const int64_t nb = (cols + MCMI_BLOCK - 1) / MCMI_BLOCK;
  const ACC_T inv_t = (ACC_T)(1.0 / p->temperature);
  const ACC_T qfloor = (ACC_T)p->floor;
  const int want_ce = p->ce_weight != 0.0;
  /* CE is at temperature 1: at T == 1 it shares the CMI softmax. */
  const int separate_ce = want_ce && p->temperature != 1.0;
  ACC_T *e_buf = scratch;
  ACC_T *w_buf = scratch ? scratch + cols : NULL;
  ACC_T *e1_buf = scratch ? scratch + 2 * cols : NULL;

  double big_m = -INFINITY, qs = 0.0;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t j0 = b * MCMI_BLOCK;
    const int64_t n = cols - j0 < MCMI_BLOCK ? cols - j0 : MCMI_BLOCK;
    /* Ask for the next block of z and q while this one computes. */
    const int64_t next_end =
        j0 + 2 * MCMI_BLOCK < cols ? j0 + 2 * MCMI_BLOCK : cols;
    for (int64_t j = j0 + MCMI_BLOCK; j < next_end;
         j += 64 / (int64_t)sizeof(LOGIT_T)) {
      __builtin_prefetch(z + j);
    }
    for (int64_t j = j0 + MCMI_BLOCK; j < next_end;
         j += 64 / (int64_t)sizeof(ACC_T)) {
      __builtin_prefetch(q + j);
    }
    const ACC_T mb = FN(row_max)(z + j0, n);
    double sums[3] = {0.0, 0.0, 0.0};
    FN(kl_block)(z + j0, q + j0, n, mb, inv_t, qfloor, p->log_centroids,
                 g ? e_buf + j0 : NULL, g ? w_buf + j0 : NULL, sums);
    stats[b].m = (double)mb;
    stats[b].s = sums[0];
    stats[b].a = sums[1];
    stats[b].s1 = separate_ce ? (double)FN(exp_block)(z + j0, n, mb, (ACC_T)1,
                                                      g ? e1_buf + j0 : NULL)
                              : sums[0];
    qs += sums[2];
    big_m = (double)mb > big_m ? (double)mb : big_m;
  }
  /* sum_j e^{(z_j - M)/T} (u_j - log q_j) of a block is r_b (a_b + s_b d_b)
   * with d_b = (m_b - M) / T. */
  double s = 0.0, a = 0.0, s1 = 0.0;
  for (int64_t b = 0; b < nb; ++b) {
    /* The block holding the maximum (the only one of short rows) has
     * r = 1 exactly: no call to exp. */
    const int at_max = stats[b].m == big_m;
    const double d = (stats[b].m - big_m) * (double)inv_t;
    stats[b].r = at_max ? 1.0 : exp(d);
    stats[b].r1 = !separate_ce ? stats[b].r
                  : at_max     ? 1.0
                               : exp(stats[b].m - big_m);
    s += stats[b].r * stats[b].s;
    a += stats[b].r * (stats[b].a + stats[b].s * d);
    s1 += stats[b].r1 * stats[b].s1;
  }
  *qsum = qs;
  const double ls = log(s);
  const double kl = a / s - ls;
  const double ce = want_ce ? big_m + log(s1) - (double)LOAD(z[y]) : 0.0;

  if (g) {
    const ACC_T *p1_buf = separate_ce ? e1_buf : e_buf;
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t j0 = b * MCMI_BLOCK;
      const int64_t n = cols - j0 < MCMI_BLOCK ? cols - j0 : MCMI_BLOCK;
      /* P_j = e_j r_b / s; log P_j - log q_j - KL = w_j - shift_b. */
      const ACC_T kp = (ACC_T)(cmi_coef * stats[b].r / s);
      const ACC_T k1 = (ACC_T)(ce_coef * stats[b].r1 / s1);
      const ACC_T shift =
          (ACC_T)(ls + kl - (stats[b].m - big_m) * (double)inv_t);
      const ACC_T *e = e_buf + j0, *w = w_buf + j0, *p1 = p1_buf + j0;
      LOGIT_T *gb = g + j0;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        gb[j] = STORE(kp * e[j] * (w[j] - shift) + k1 * p1[j]);
      }
      if (want_ce && y >= j0 && y < j0 + n) {
        const int64_t k = y - j0;
        gb[k] = STORE(kp * e[k] * (w[k] - shift) + k1 * p1[k] - (ACC_T)ce_coef);
      }
    }
  }
  return p->ce_weight * ce + p->cmi_weight * kl;
}

/* Row maximum and log-normalizer of row z at temperature T (class sums). */
MCMI_CLONES static void FN(row_stats)(const LOGIT_T *z, int64_t cols,
                                      ACC_T inv_t, double *m_out,
                                      double *ls_out) {
  /* One pass, block by block, with the online-softmax rescaling. */
  double big_m = -INFINITY, sum = 0.0;
  for (int64_t j0 = 0; j0 < cols; j0 += MCMI_BLOCK) {
    const int64_t n = cols - j0 < MCMI_BLOCK ? cols - j0 : MCMI_BLOCK;
    const ACC_T mb = FN(row_max)(z + j0, n);
    const double sb = (double)FN(exp_block)(z + j0, n, mb, inv_t, NULL);
    const double next = (double)mb > big_m ? (double)mb : big_m;
    sum = sum * exp((big_m - next) * (double)inv_t) +
          sb * exp(((double)mb - next) * (double)inv_t);
    big_m = next;
  }
  *m_out = big_m;
  *ls_out = log(sum);
}

/* o += softmax(z / T) (or log_softmax), given the row's stats. */
MCMI_CLONES static void FN(accumulate_row)(ACC_T *o, const LOGIT_T *z,
                                           int64_t cols, ACC_T inv_t, ACC_T m,
                                           ACC_T ls, int log_probs) {
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
      if (slot[i] >= 0) {
        FN(row_stats)(logits + i * p->logits_stride, cols, inv_t, &row_m[i],
                      &row_ls[i]);
      }
    }
#pragma omp for schedule(static)
    for (int64_t c = 0; c < nslots; ++c) {
      memset(out + c * out_stride, 0, (size_t)cols * sizeof(ACC_T));
    }
    /* An implicit barrier ends each `omp for`: stats and zeros are ready. */
    const int64_t t = omp_get_thread_num(), team = omp_get_num_threads();
    const int64_t lo = nslots * t / team, hi = nslots * (t + 1) / team;
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t c = slot[i];
      if (c >= lo && c < hi) {
        FN(accumulate_row)(out + c * out_stride, logits + i * p->logits_stride,
                           cols, inv_t, (ACC_T)row_m[i], (ACC_T)row_ls[i],
                           log_probs);
      }
    }
  }
}

/*
 * In-batch centroids on a batch-mode loss layout: gives each class present
 * a slot (class_map, slot, slot_count) and writes the mean softmax of its
 * rows to batch_q[slot].
 */
static void FN(batch_means)(const mcmi_problem *p, const loss_layout *lay,
                            char *ws, int nt) {
  const int64_t cols = p->cols;
  const int64_t *count = (const int64_t *)(ws + lay->slot_count);
  int64_t *slots = (int64_t *)(ws + lay->slot);
  ACC_T *means = (ACC_T *)(ws + lay->batch_q);
  const int64_t nslots = assign_slots(p, (int64_t *)(ws + lay->class_map),
                                      slots, (int64_t *)(ws + lay->slot_count));
  FN(class_accumulate)(p, slots, nslots, means, cols,
                       (double *)(ws + lay->row_val),
                       (double *)(ws + lay->row_qsum), 0, nt);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t c = 0; c < nslots; ++c) {
    const ACC_T inv_n = (ACC_T)(1.0 / (double)count[c]);
    ACC_T *row = means + c * cols;
    for (int64_t j = 0; j < cols; ++j) {
      row[j] *= inv_n;
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
    FN(batch_means)(p, lay, ws, nt);
    qbase = (const ACC_T *)(ws + lay->batch_q);
    qstride = cols;
    slot = (const int64_t *)(ws + lay->slot);
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
    char *mine =
        ws + lay->scratch + (size_t)omp_get_thread_num() * lay->per_thread;
    mcmi_block_stat *stats = (mcmi_block_stat *)mine;
    ACC_T *scratch = g ? (ACC_T *)(mine + lay->terms) : NULL;
    row_val[i] = FN(loss_row)(p, logits + i * p->logits_stride, q, y, g, stats,
                              scratch, ce_coef, cmi_coef, &row_qsum[i]);
  }

  double total = 0.0;
  for (int64_t i = 0; i < rows; ++i) {
    if (fixed && !p->log_centroids &&
        !(fabs(row_qsum[i] - 1.0) <= MCMI_CENTROID_SUM_TOLERANCE)) {
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

/* The EMA update of mcmi_cpu_ema_update, on a batch-mode loss layout. */
static void FN(ema_update)(const mcmi_problem *p, const loss_layout *lay,
                           double momentum, ACC_T *q, int64_t q_stride,
                           uint8_t *seen, char *ws, int nt) {
  const int64_t cols = p->cols;
  FN(batch_means)(p, lay, ws, nt);
  const int64_t *map = (const int64_t *)(ws + lay->class_map);
  const ACC_T *means = (const ACC_T *)(ws + lay->batch_q);
  const ACC_T mom = (ACC_T)momentum;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t c = 0; c < p->classes; ++c) {
    const int64_t slot = map[c];
    if (slot < 0) {
      continue;
    }
    const ACC_T *b = means + slot * cols;
    ACC_T *row = q + c * q_stride;
    if (seen[c]) {
      for (int64_t j = 0; j < cols; ++j) {
        row[j] += mom * (b[j] - row[j]);
      }
    } else {
      memcpy(row, b, (size_t)cols * sizeof(ACC_T));
    }
    seen[c] = 1;
  }
}

MCMI_CLONES static void FN(scale_row)(LOGIT_T *r, int64_t cols, ACC_T k) {
#pragma omp simd
  for (int64_t j = 0; j < cols; ++j) {
    r[j] = STORE(LOAD(r[j]) * k);
  }
}

static void FN(scale_rows)(LOGIT_T *x, int64_t rows, int64_t cols,
                           int64_t stride, const LOGIT_T *scale,
                           int64_t scale_stride, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t i = 0; i < rows; ++i) {
    FN(scale_row)(x + i * stride, cols, LOAD(scale[i * scale_stride]));
  }
}

#undef FN
#undef CAT
#undef CAT_
