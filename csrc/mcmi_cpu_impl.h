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
 *   KL_G       the series of g (mcmi_math.h) in ACC_T
 *   ACC_MAX    largest finite ACC_T; ACC_TINY its smallest normal number
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
 * 1/T as the product k * *k2 of two finite ACC_T factors, applied as
 * ((z - m) * k) * k2: *k2 is 1 (exact), or 2^64 when 1/T is beyond
 * ACC_T's range (a tiny T). Then z == m still gives 0 and every z < m gives
 * a product far below the range of exp, as 1/T itself would; k is clamped
 * to the largest finite ACC_T only where that holds for the smallest
 * nonzero difference too.
 */
static ACC_T FN(inv_temperature)(double t, ACC_T *k2) {
  const double big = 0x1.0p64, inv = 1.0 / t;
  if (inv <= ACC_MAX) {
    *k2 = (ACC_T)1;
    return (ACC_T)inv;
  }
  const double k = 1.0 / (t * big);
  *k2 = (ACC_T)big;
  return (ACC_T)(k < ACC_MAX ? k : ACC_MAX);
}

/*
 * Sums over one block of at most MCMI_BLOCK elements are formed in ACC_T
 * (SIMD lanes, fixed order) and added to double totals block by block: the
 * rounding error of a block sum is that of a few dozen additions, while the
 * loop stays in single precision. Blocks start at fixed offsets from the row
 * start, so a result never depends on anything but the row.
 */
/* sum_j exp((z_j - m) * k * k2) over a block; stores the terms when
 * e != NULL. */
MCMI_INLINE ACC_T FN(exp_block)(const LOGIT_T *z, int64_t n, ACC_T m, ACC_T k,
                                ACC_T k2, ACC_T *e) {
  ACC_T s = 0;
  if (e) {
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < n; ++j) {
      e[j] = EXP(((LOAD(z[j]) - m) * k) * k2);
      s += e[j];
    }
  } else {
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < n; ++j) {
      s += EXP(((LOAD(z[j]) - m) * k) * k2);
    }
  }
  return s;
}

/*
 * The first pass over a block of a loss row: stores e_j = exp(u_j),
 * u_j = (z_j - m) / T, and returns sum_j e_j. *bad is 0, or NaN when the
 * block holds a NaN or infinite logit (z * 0 is NaN exactly then): the KL of
 * such a row is NaN whatever the softmax makes of it.
 */
MCMI_INLINE ACC_T FN(softmax_block)(const LOGIT_T *z, int64_t n, ACC_T m,
                                    ACC_T k, ACC_T k2, ACC_T *e, ACC_T *bad) {
  ACC_T s = 0, nz = 0;
#pragma omp simd reduction(+ : s, nz)
  for (int64_t j = 0; j < n; ++j) {
    const ACC_T v = LOAD(z[j]);
    e[j] = EXP(((v - m) * k) * k2);
    s += e[j];
    nz += v * (ACC_T)0;
  }
  *bad = nz;
  return s;
}

/* max(q, floor), with NaN kept (a NaN entry is not below the floor). */
#define MCMI_FLOORED(qv, qfloor) ((qv) < (qfloor) ? (qfloor) : (qv))
/* The centroid entry Q'_j = max(Q_j, floor) that the KL uses; from log Q'
 * when the centroids are logs. */
#define MCMI_QJ(q_is_log)                                                      \
  ((q_is_log) ? MCMI_FLOORED(EXP(q[j]), qfloor) : MCMI_FLOORED(q[j], qfloor))

/*
 * Q'_j g(x_j), x_j = log(P_j / Q'_j) (*x receives x_j): the series of g
 * for |x| < 1/2, else the direct form (x - 1) P + Q' (no overflow for Q' at
 * the floor, cancellation at most 11-fold). P below the smallest normal
 * ratio gives a term within P |x| of Q', and x stays finite.
 */
MCMI_INLINE ACC_T FN(kl_term)(ACC_T pj, ACC_T qj, ACC_T *x) {
  const ACC_T ratio = pj / qj;
  const ACC_T xj = LOG(ratio < ACC_TINY ? ACC_TINY : ratio);
  *x = xj;
  const ACC_T small = qj * KL_G(xj);
  const ACC_T direct = (xj - (ACC_T)1) * pj + qj;
  return xj < (ACC_T)0.5 && xj > (ACC_T)-0.5 ? small : direct;
}

/*
 * The second pass over a block: with P_j = e_j kb, returns
 * sum_j Q'_j g(x_j) (formed in ACC_T) and adds sum_j Q'_j to *qsum in
 * double (the KL subtracts sum Q' - 1, which must be exact to far below
 * the KL itself); stores x_j when x != NULL.
 */
#define MCMI_KL_LOOP(IS_LOG, KEEP)                                             \
  _Pragma("omp simd reduction(+ : acc, qs)") for (int64_t j = 0; j < n; ++j) { \
    ACC_T xj;                                                                  \
    const ACC_T qj = MCMI_QJ(IS_LOG);                                          \
    qs += (double)qj;                                                          \
    acc += FN(kl_term)(e[j] * kb, qj, &xj);                                    \
    KEEP;                                                                      \
  }

MCMI_INLINE double FN(kl_block)(const ACC_T *q, int64_t n, const ACC_T *e,
                                ACC_T kb, ACC_T qfloor, int q_is_log, ACC_T *x,
                                double *qsum) {
  ACC_T acc = 0;
  double qs = 0.0;
  if (q_is_log && x) {
    MCMI_KL_LOOP(1, x[j] = xj)
  } else if (q_is_log) {
    MCMI_KL_LOOP(1, (void)xj)
  } else if (x) {
    MCMI_KL_LOOP(0, x[j] = xj)
  } else {
    MCMI_KL_LOOP(0, (void)xj)
  }
  *qsum += qs;
  return (double)acc;
}
#undef MCMI_KL_LOOP
#undef MCMI_QJ
#undef MCMI_FLOORED

/*
 * One valid row of the loss: returns ce_weight * CE + cmi_weight * KL and,
 * when g != NULL, writes the row's gradient scaled by the given
 * coefficients. *qsum receives sum_j max(q_j, floor).
 *
 * The first pass goes block by block (online softmax): each block is
 * reduced relative to its own maximum m_b while it sits in L1, and the
 * blocks are combined with the factors r_b = exp((m_b - M) / T), M the row
 * maximum. The second pass forms the KL as sum_j Q'_j g(x_j) - (sum Q' - 1)
 * from the stored exponentials (docs/math.md: no difference of nearly equal
 * terms), the third (with a gradient) writes P_j (x_j - KL) / (n T) and the
 * CE part. `stats` holds one mcmi_block_stat per block; `scratch` cols
 * ACC_T, or 3 * cols with g != NULL.
 */
MCMI_CLONES static double FN(loss_row)(const mcmi_problem *p, const LOGIT_T *z,
                                       const ACC_T *q, int64_t y, LOGIT_T *g,
                                       mcmi_block_stat *stats, ACC_T *scratch,
                                       double ce_coef, double cmi_coef,
                                       double *qsum) {
  const int64_t cols = p->cols;
  const int64_t nb = (cols + MCMI_BLOCK - 1) / MCMI_BLOCK;
  ACC_T k2;
  const ACC_T k = FN(inv_temperature)(p->temperature, &k2);
  const ACC_T qfloor = (ACC_T)p->floor;
  const int want_ce = p->ce_weight != 0.0;
  /* CE is at temperature 1: at T == 1 it shares the CMI softmax. */
  const int separate_ce = want_ce && p->temperature != 1.0;
  ACC_T *e_buf = scratch;
  ACC_T *x_buf = g ? scratch + cols : NULL;
  ACC_T *e1_buf = g ? scratch + 2 * cols : NULL;

  double big_m = -INFINITY, qs = 0.0, bad = 0.0;
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
    ACC_T block_bad;
    stats[b].m = (double)mb;
    stats[b].s =
        (double)FN(softmax_block)(z + j0, n, mb, k, k2, e_buf + j0, &block_bad);
    stats[b].s1 = separate_ce
                      ? (double)FN(exp_block)(z + j0, n, mb, (ACC_T)1, (ACC_T)1,
                                              g ? e1_buf + j0 : NULL)
                      : stats[b].s;
    bad += (double)block_bad;
    big_m = (double)mb > big_m ? (double)mb : big_m;
  }
  double s = 0.0, s1 = 0.0;
  for (int64_t b = 0; b < nb; ++b) {
    /* The block holding the maximum (the only one of short rows) has
     * r = 1 exactly: no call to exp. */
    const int at_max = stats[b].m == big_m;
    stats[b].r =
        at_max ? 1.0 : exp(((stats[b].m - big_m) * (double)k) * (double)k2);
    stats[b].r1 = !separate_ce ? stats[b].r
                  : at_max     ? 1.0
                               : exp(stats[b].m - big_m);
    s += stats[b].r * stats[b].s;
    s1 += stats[b].r1 * stats[b].s1;
  }
  double kl = 0.0;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t j0 = b * MCMI_BLOCK;
    const int64_t n = cols - j0 < MCMI_BLOCK ? cols - j0 : MCMI_BLOCK;
    kl += FN(kl_block)(q + j0, n, e_buf + j0, (ACC_T)(stats[b].r / s), qfloor,
                       p->log_centroids, g ? x_buf + j0 : NULL, &qs);
  }
  /* In-batch centroids sum to 1 in exact arithmetic: their KL is taken
   * against Q' / sum Q' (adding log sum Q'), which removes the rounding of
   * their sum. Given centroids are used as they are. */
  kl += bad - (qs - 1.0) + (p->centroids == NULL ? log1p(qs - 1.0) : 0.0);
  *qsum = qs;
  const double ce = want_ce ? big_m + log(s1) - (double)LOAD(z[y]) : 0.0;

  if (g) {
    const ACC_T *p1_buf = separate_ce ? e1_buf : e_buf;
    const ACC_T klv = (ACC_T)kl;
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t j0 = b * MCMI_BLOCK;
      const int64_t n = cols - j0 < MCMI_BLOCK ? cols - j0 : MCMI_BLOCK;
      /* P_j = e_j r_b / s. With s == 1 the softmax is one-hot to working
       * precision: the true KL gradient of the row is below the rounding
       * error of x - KL at the maximum, which a tiny T would magnify. */
      const ACC_T kp = s == 1.0 ? (ACC_T)0 : (ACC_T)(cmi_coef * stats[b].r / s);
      const ACC_T k1 = (ACC_T)(ce_coef * stats[b].r1 / s1);
      const ACC_T *e = e_buf + j0, *x = x_buf + j0, *p1 = p1_buf + j0;
      LOGIT_T *gb = g + j0;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        gb[j] = STORE(kp * e[j] * (x[j] - klv) + k1 * p1[j]);
      }
      if (want_ce && y >= j0 && y < j0 + n) {
        const int64_t i = y - j0;
        gb[i] = STORE(kp * e[i] * (x[i] - klv) + k1 * p1[i] - (ACC_T)ce_coef);
      }
    }
  }
  return p->ce_weight * ce + p->cmi_weight * kl;
}

/* Row maximum and log-normalizer of row z at temperature T (class sums);
 * 1/T = k * k2 (inv_temperature). */
MCMI_CLONES static void FN(row_stats)(const LOGIT_T *z, int64_t cols, ACC_T k,
                                      ACC_T k2, double *m_out, double *ls_out) {
  /* One pass, block by block, with the online-softmax rescaling. */
  double big_m = -INFINITY, sum = 0.0;
  for (int64_t j0 = 0; j0 < cols; j0 += MCMI_BLOCK) {
    const int64_t n = cols - j0 < MCMI_BLOCK ? cols - j0 : MCMI_BLOCK;
    const ACC_T mb = FN(row_max)(z + j0, n);
    const double sb = (double)FN(exp_block)(z + j0, n, mb, k, k2, NULL);
    const double next = (double)mb > big_m ? (double)mb : big_m;
    /* The first block has nothing to rescale ((-inf) * k is NaN for a
     * huge T, whose k is 0). */
    const double old =
        sum == 0.0 ? 0.0 : sum * exp(((big_m - next) * (double)k) * (double)k2);
    sum = old + sb * exp((((double)mb - next) * (double)k) * (double)k2);
    big_m = next;
  }
  *m_out = big_m;
  *ls_out = log(sum);
}

/* o += softmax(z / T) (or log_softmax), given the row's stats. The softmax
 * is exp(u_j) / sum, not exp(u_j - log sum): the rounding of an exponent
 * grows with its size, and log sum is large for wide rows. */
MCMI_CLONES static void FN(accumulate_row)(ACC_T *o, const LOGIT_T *z,
                                           int64_t cols, ACC_T k, ACC_T k2,
                                           ACC_T m, double ls, int log_probs) {
  if (log_probs) {
    const ACC_T lsv = (ACC_T)ls;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) {
      o[j] += ((LOAD(z[j]) - m) * k) * k2 - lsv;
    }
  } else {
    const ACC_T inv_s = (ACC_T)exp(-ls);
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) {
      o[j] += EXP(((LOAD(z[j]) - m) * k) * k2) * inv_s;
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
  ACC_T k2;
  const ACC_T k = FN(inv_temperature)(p->temperature, &k2);

#pragma omp parallel num_threads(nt)
  {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows; ++i) {
      if (slot[i] >= 0) {
        FN(row_stats)(logits + i * p->logits_stride, cols, k, k2, &row_m[i],
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
                           cols, k, k2, (ACC_T)row_m[i], row_ls[i], log_probs);
      }
    }
  }
}

/* o += softmax(z / T) in double, given the row's stats (in-batch means). */
MCMI_CLONES static void FN(accumulate_wide)(double *o, const LOGIT_T *z,
                                            int64_t cols, ACC_T k, ACC_T k2,
                                            ACC_T m, double ls) {
  const double inv_s = exp(-ls);
#pragma omp simd
  for (int64_t j = 0; j < cols; ++j) {
    o[j] += (double)EXP(((LOAD(z[j]) - m) * k) * k2) * inv_s;
  }
}

/*
 * The rows of each class present, for in-batch centroids: gives each class
 * a slot (group_rows in mcmi_cpu.c) and the row statistics of every valid
 * row. Then class_mean forms the mean softmax of one slot.
 */
static void FN(row_stats_all)(const mcmi_problem *p, const int64_t *slots,
                              double *row_m, double *row_ls) {
  ACC_T k2;
  const ACC_T k = FN(inv_temperature)(p->temperature, &k2);
  const LOGIT_T *logits = (const LOGIT_T *)p->logits;
#pragma omp for schedule(static)
  for (int64_t i = 0; i < p->rows; ++i) {
    if (slots[i] >= 0) {
      FN(row_stats)(logits + i * p->logits_stride, p->cols, k, k2, &row_m[i],
                    &row_ls[i]);
    }
  }
}

/*
 * o = the mean softmax of the rows order[first..last), summed in double in
 * row order (by one thread): the KL against a mean of similar rows needs it
 * exact to well below float32's rounding of a many-term sum. Returns 1/n.
 */
static double FN(class_mean)(const mcmi_problem *p, const int64_t *order,
                             int64_t first, int64_t last, const double *row_m,
                             const double *row_ls, double *o) {
  const int64_t cols = p->cols;
  const LOGIT_T *logits = (const LOGIT_T *)p->logits;
  ACC_T k2;
  const ACC_T k = FN(inv_temperature)(p->temperature, &k2);
  memset(o, 0, (size_t)cols * sizeof(double));
  for (int64_t t = first; t < last; ++t) {
    const int64_t i = order[t];
    FN(accumulate_wide)(o, logits + i * p->logits_stride, cols, k, k2,
                        (ACC_T)row_m[i], row_ls[i]);
  }
  return 1.0 / (double)(last - first);
}

/* In-batch centroids on a batch-mode loss layout: writes the mean softmax
 * of each slot's rows to batch_q[slot]. */
static void FN(batch_means)(const mcmi_problem *p, const loss_layout *lay,
                            char *ws, int nt) {
  const int64_t cols = p->cols;
  const int64_t *start = (const int64_t *)(ws + lay->slot_count);
  const int64_t *order = (const int64_t *)(ws + lay->order);
  double *row_m = (double *)(ws + lay->row_val);
  double *row_ls = (double *)(ws + lay->row_qsum);
  ACC_T *means = (ACC_T *)(ws + lay->batch_q);
  const int64_t nslots = group_rows(p, lay, ws);

#pragma omp parallel num_threads(nt)
  {
    FN(row_stats_all)(p, (const int64_t *)(ws + lay->slot), row_m, row_ls);
    double *o = (double *)(ws + lay->wide +
                           (size_t)omp_get_thread_num() * lay->per_thread);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < nslots; ++c) {
      const double inv_n =
          FN(class_mean)(p, order, start[c], start[c + 1], row_m, row_ls, o);
      ACC_T *row = means + c * cols;
      for (int64_t j = 0; j < cols; ++j) {
        row[j] = (ACC_T)(o[j] * inv_n);
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
    ACC_T *scratch = (ACC_T *)(mine + lay->terms);
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

/* The EMA update of mcmi_cpu_ema_update, on an EMA layout: each class
 * present blends its batch mean, formed in the thread's double row, into
 * its centroid row. */
static void FN(ema_update)(const mcmi_problem *p, const loss_layout *lay,
                           double momentum, ACC_T *q, int64_t q_stride,
                           uint8_t *seen, char *ws, int nt) {
  const int64_t cols = p->cols;
  const int64_t *map = (const int64_t *)(ws + lay->class_map);
  const int64_t *start = (const int64_t *)(ws + lay->slot_count);
  const int64_t *order = (const int64_t *)(ws + lay->order);
  double *row_m = (double *)(ws + lay->row_val);
  double *row_ls = (double *)(ws + lay->row_qsum);
  const ACC_T mom = (ACC_T)momentum;
  group_rows(p, lay, ws);

#pragma omp parallel num_threads(nt)
  {
    FN(row_stats_all)(p, (const int64_t *)(ws + lay->slot), row_m, row_ls);
    double *o = (double *)(ws + lay->wide +
                           (size_t)omp_get_thread_num() * lay->per_thread);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < p->classes; ++c) {
      const int64_t slot = map[c];
      if (slot < 0) {
        continue;
      }
      const double inv_n = FN(class_mean)(p, order, start[slot],
                                          start[slot + 1], row_m, row_ls, o);
      ACC_T *row = q + c * q_stride;
      if (seen[c]) {
        for (int64_t j = 0; j < cols; ++j) {
          row[j] += mom * ((ACC_T)(o[j] * inv_n) - row[j]);
        }
      } else {
        for (int64_t j = 0; j < cols; ++j) {
          row[j] = (ACC_T)(o[j] * inv_n);
        }
      }
      seen[c] = 1;
    }
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
