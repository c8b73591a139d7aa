/* Compiled CPU kernels of the spectral stage: eigenvalues of many small symmetric matrices (the
   FARMS Gram blocks) and the moments of a weight matrix, all in float64.

   Compiled on first use by alphaq/native.py with the machine's C compiler (-O3 -march=native)
   and called through ctypes, which releases the GIL: one call per block batch and thread.

   Why not LAPACK's dsyevd (numpy's eigvalsh), measured on 256x256 Gram matrices here:
   - its blocked reduction to tridiagonal form (dsytrd) reads the trailing matrix for a
     symmetric matrix-vector product in each of its n steps and reads and writes it again in the
     blocked update. Here the matrix is stored packed (lower triangle by columns, 263 KB for
     n = 256, so it stays in L2) and the rank-2 update of step k is fused into the
     matrix-vector product of step k+1: one pass per step, two columns at a time. The arithmetic
     is that of LAPACK's unblocked dsytd2 ('L'). (A dlatrd-style blocked variant measured no
     faster.)
   - its tridiagonal solver (dsterf, ~1.1 ms of the ~3.5) is a chain of dependent divisions;
     sweeping several matrices side by side lets the core overlap them.

   Inputs are Gram matrices of float32 weights, so nonzero entries are >= ~1e-90 in magnitude:
   far from float64's underflow, which is why the reflector needs no dlarfg-style rescaling. */

#include <math.h>
#include <stddef.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define ALPHAQ_AVX2 1
#endif

/* Scratch doubles `alphaq_symmetric_eigenvalues` needs for `count` matrices of order n. */
size_t alphaq_work_size(int n, int count) { return (size_t)n * (n + 1) / 2 + (5 + (size_t)count) * (size_t)n; }

/* 2-norm of x[0..m-1] without overflow or underflow (scaled sum of squares, as LAPACK dnrm2). */
static double norm2(const double *x, int m) {
    double scale = 0.0, ssq = 1.0;
    for (int r = 0; r < m; r++) {
        double ax = fabs(x[r]);
        if (ax == 0.0) continue;
        if (scale < ax) {
            ssq = 1.0 + ssq * (scale / ax) * (scale / ax);
            scale = ax;
        } else {
            ssq += (ax / scale) * (ax / scale);
        }
    }
    return scale * sqrt(ssq);
}

#ifdef ALPHAQ_AVX2
static double hsum(__m256d x) {
    double t[4];
    _mm256_storeu_pd(t, x);
    return (t[0] + t[1]) + (t[2] + t[3]);
}
#endif

/* One pass over column j (rows j..n-1, cj[r]) of the trailing matrix: apply the pending update
   a -= vp w'^T + w' vp^T (vp = wp = 0 when nothing is pending), then accumulate p += A v
   (lower storage: a_rj feeds p_r and p_j). Returns the updated diagonal a_jj; *dot_out gets
   the column's sum_{r>j} a_rj v_r. Used for the last column when their number is odd. */
static double column_pass(double *cj, int j, int n, const double *vp, const double *wp, const double *v,
                          double *p, double *dot_out) {
    const double vj = vp[j], wj = wp[j], nj = v[j];
    double s = 0.0;
    int r = j + 1;
    cj[j] -= vp[j] * wj + wp[j] * vj;
#ifdef ALPHAQ_AVX2
    const __m256d VJ = _mm256_set1_pd(vj), WJ = _mm256_set1_pd(wj), NJ = _mm256_set1_pd(nj);
    __m256d S = _mm256_setzero_pd();
    for (; r + 4 <= n; r += 4) {
        __m256d x = _mm256_loadu_pd(cj + r);
        x = _mm256_fnmadd_pd(_mm256_loadu_pd(vp + r), WJ, x);
        x = _mm256_fnmadd_pd(_mm256_loadu_pd(wp + r), VJ, x);
        _mm256_storeu_pd(cj + r, x);
        _mm256_storeu_pd(p + r, _mm256_fmadd_pd(x, NJ, _mm256_loadu_pd(p + r)));
        S = _mm256_fmadd_pd(x, _mm256_loadu_pd(v + r), S);
    }
    s = hsum(S);
#endif
    for (; r < n; r++) {
        const double x = cj[r] - vp[r] * wj - wp[r] * vj;
        cj[r] = x;
        p[r] += x * nj;
        s += x * v[r];
    }
    *dot_out = s;
    return cj[j];
}

/* `column_pass` for columns j and j+1 (c0, c1) at once: each load of vp, wp, v and p serves
   both. Row j+1 of column j is done first, then rows j+2.. of both. */
static void column_pair_pass(double *c0, double *c1, int j, int n, const double *vp, const double *wp,
                             const double *v, double *p, double diag[2], double dot[2]) {
    const double v0 = vp[j], w0 = wp[j], v1 = vp[j + 1], w1 = wp[j + 1];
    const double n0 = v[j], n1 = v[j + 1];
    c0[j] -= vp[j] * w0 + wp[j] * v0;
    const double x01 = c0[j + 1] - vp[j + 1] * w0 - wp[j + 1] * v0;
    c0[j + 1] = x01;
    c1[j + 1] -= vp[j + 1] * w1 + wp[j + 1] * v1;
    double s0 = x01 * v[j + 1], s1 = 0.0;
    p[j + 1] += x01 * n0;
    int r = j + 2;
#ifdef ALPHAQ_AVX2
    const __m256d V0 = _mm256_set1_pd(v0), W0 = _mm256_set1_pd(w0), V1 = _mm256_set1_pd(v1);
    const __m256d W1 = _mm256_set1_pd(w1), N0 = _mm256_set1_pd(n0), N1 = _mm256_set1_pd(n1);
    __m256d S0 = _mm256_setzero_pd(), S1 = _mm256_setzero_pd();
    for (; r + 4 <= n; r += 4) {
        const __m256d VP = _mm256_loadu_pd(vp + r), WP = _mm256_loadu_pd(wp + r), VV = _mm256_loadu_pd(v + r);
        __m256d x = _mm256_loadu_pd(c0 + r), y = _mm256_loadu_pd(c1 + r);
        x = _mm256_fnmadd_pd(VP, W0, x);
        y = _mm256_fnmadd_pd(VP, W1, y);
        x = _mm256_fnmadd_pd(WP, V0, x);
        y = _mm256_fnmadd_pd(WP, V1, y);
        _mm256_storeu_pd(c0 + r, x);
        _mm256_storeu_pd(c1 + r, y);
        _mm256_storeu_pd(p + r, _mm256_fmadd_pd(y, N1, _mm256_fmadd_pd(x, N0, _mm256_loadu_pd(p + r))));
        S0 = _mm256_fmadd_pd(x, VV, S0);
        S1 = _mm256_fmadd_pd(y, VV, S1);
    }
    s0 += hsum(S0);
    s1 += hsum(S1);
#endif
    for (; r < n; r++) {
        const double x = c0[r] - vp[r] * w0 - wp[r] * v0, y = c1[r] - vp[r] * w1 - wp[r] * v1;
        c0[r] = x;
        c1[r] = y;
        p[r] += x * n0 + y * n1;
        s0 += x * v[r];
        s1 += y * v[r];
    }
    diag[0] = c0[j];
    diag[1] = c1[j + 1];
    dot[0] = s0;
    dot[1] = s1;
}

/* Householder reduction of the symmetric matrix g (n x n, row-major; only its upper triangle,
   g[j*n + r] for r >= j, i.e. column j of the lower one, is read) to tridiagonal form:
   diagonal d[0..n-1], off-diagonal e[0..n-2]. `a` holds the packed matrix, v/vp/wp/p are
   n-vectors, co n column offsets. */
static void tridiagonalize(const double *g, int n, double *d, double *e, double *a, double *v, double *vp,
                           double *wp, double *p, size_t *co) {
    size_t off = 0;
    for (int j = 0; j < n; j++) {
        co[j] = off - (size_t)j;  /* column j's row r lives at a[co[j] + r] */
        memcpy(a + off, g + (size_t)j * n + j, sizeof(double) * (size_t)(n - j));
        off += (size_t)(n - j);
    }
    /* The trailing matrix is always A - vp wp^T - wp vp^T: the last step's rank-2 update is
       applied lazily, by the next step's pass. vp = wp = 0 stands for "nothing pending". */
    memset(vp, 0, sizeof(double) * (size_t)n);
    memset(wp, 0, sizeof(double) * (size_t)n);
    for (int i = 0; i < n - 1; i++) {
        double *ci = a + co[i];
        const double vi = vp[i], wi = wp[i];  /* column i first: the reflector is built from it */
        for (int r = i; r < n; r++) ci[r] -= vp[r] * wi + wp[r] * vi;
        d[i] = ci[i];

        /* reflector H = I - tau u u^T (u[i+1] = 1) with H (ci[i+1..n-1]) = (beta, 0, ..., 0) */
        const double alpha = ci[i + 1];
        const double xnorm = norm2(ci + i + 2, n - i - 2);
        double tau = 0.0, beta = alpha;
        if (xnorm != 0.0) {
            beta = -copysign(hypot(alpha, xnorm), alpha);
            tau = (beta - alpha) / beta;
            const double scale = 1.0 / (alpha - beta);
            v[i + 1] = 1.0;
            for (int r = i + 2; r < n; r++) v[r] = ci[r] * scale;
        }
        e[i] = beta;

        if (tau == 0.0) {  /* H = I: apply the pending update, and nothing is pending after */
            for (int j = i + 1; j < n; j++) {
                double *cj = a + co[j];
                for (int r = j; r < n; r++) cj[r] -= vp[r] * wp[j] + wp[r] * vp[j];
            }
            memset(vp, 0, sizeof(double) * (size_t)n);
            memset(wp, 0, sizeof(double) * (size_t)n);
            continue;
        }
        /* p = A v over the trailing matrix, applying the pending update on the way */
        for (int r = i + 1; r < n; r++) p[r] = 0.0;
        int j = i + 1;
        for (; j + 1 < n; j += 2) {
            double diag[2], dot[2];
            column_pair_pass(a + co[j], a + co[j + 1], j, n, vp, wp, v, p, diag, dot);
            p[j] += diag[0] * v[j] + dot[0];
            p[j + 1] += diag[1] * v[j + 1] + dot[1];
        }
        if (j < n) {
            double dot;
            const double ajj = column_pass(a + co[j], j, n, vp, wp, v, p, &dot);
            p[j] += ajj * v[j] + dot;
        }
        /* w = tau p - (tau^2/2)(p.v) v; the trailing matrix becomes A - v w^T - w v^T */
        double pv = 0.0;
        for (int r = i + 1; r < n; r++) {
            p[r] *= tau;
            pv += p[r] * v[r];
        }
        const double half = -0.5 * tau * pv;
        for (int r = i + 1; r < n; r++) {
            vp[r] = v[r];
            wp[r] = p[r] + half * v[r];
        }
    }
    d[n - 1] = a[co[n - 1] + n - 1] - 2.0 * vp[n - 1] * wp[n - 1];
}

/* ---- Tridiagonal eigenvalues: Pal-Walker-Kahan root-free QL, several matrices interleaved ----

   The implicit QL sweep is a chain of dependent divisions (~50 cycles per step here), so one
   matrix at a time leaves the divider mostly idle. STREAMS matrices are swept side by side: the
   joint loop advances every stream's sweep by one step per round, and the out-of-order core
   overlaps the independent chains. Per stream the arithmetic is the classic root-free QL on the
   squared off-diagonals (as in LAPACK's dsterf): splitting at negligible off-diagonals, 2x2
   blocks in closed form, a Wilkinson-type shift; a block whose last diagonal entry is smaller
   in magnitude than its first is reversed first, so the sweep always chases from the larger
   end (what dsterf's QR/QL choice achieves). */

#define STREAMS 4

typedef struct {
    double *d, *e;  /* diagonal; squared off-diagonal of the block being reduced */
    int k;          /* which matrix of the batch */
    int n, next;    /* order; where the search for the next unreduced block starts */
    int l, lend;    /* block [l, lend] being reduced */
    int iter, maxit;
    /* the sweep in progress: step index i runs from m-1 down to l */
    int i, m;
    double c, s, gamma, p, sigma;
} stream;

static const double EPS = 1.1102230246251565e-16;  /* 2^-53, LAPACK's dlamch('E') */
/* A block whose largest entry lies outside [SSFMIN, SSFMAX] would need the rescaling dsterf
   does (its sqrt(safmax)/3 and sqrt(safmin)/eps^2); Gram matrices of float32 weights never get
   there (nonzero entries between ~1e-90 and ~1e80), so such a block is refused instead. */
static const double SSFMAX = 2.2346346549904327e+153, SSFMIN = 1.210184973390412e-122;

/* eigenvalues of [[a, b], [b, c]] (LAPACK dlae2's formulas): rt1 >= rt2 in magnitude order */
static void eig2(double a, double b, double c, double *rt1, double *rt2) {
    const double sm = a + c, adf = fabs(a - c), ab = fabs(b + b);
    const double acmx = fabs(a) > fabs(c) ? a : c, acmn = fabs(a) > fabs(c) ? c : a;
    double rt;
    if (adf > ab) rt = adf * sqrt(1.0 + (ab / adf) * (ab / adf));
    else if (adf < ab) rt = ab * sqrt(1.0 + (adf / ab) * (adf / ab));
    else rt = ab * sqrt(2.0);
    if (sm != 0.0) {
        *rt1 = sm < 0.0 ? 0.5 * (sm - rt) : 0.5 * (sm + rt);
        *rt2 = (acmx / *rt1) * acmn - (b / *rt1) * b;
    } else {
        *rt1 = 0.5 * rt;
        *rt2 = -0.5 * rt;
    }
}

static void reverse(double *x, int lo, int hi) {
    for (; lo < hi; lo++, hi--) {
        double t = x[lo];
        x[lo] = x[hi];
        x[hi] = t;
    }
}

/* Runs stream q's control logic until it needs a QL sweep (returns 1, sweep state set up) or
   its matrix is fully reduced (returns 0). Returns -1 if the iteration limit was hit or a block
   is outside the range that needs no rescaling. */
static int next_sweep(stream *q) {
    double *d = q->d, *e = q->e;
    for (;;) {
        if (q->l > q->lend) {  /* find the next unreduced block */
            int l1 = q->next, n = q->n;
            if (l1 >= n) return 0;
            if (l1 > 0) e[l1 - 1] = 0.0;
            int m = l1;
            for (; m < n - 1; m++) {
                double t = fabs(e[m]);
                if (t == 0.0) break;
                if (t <= sqrt(fabs(d[m])) * sqrt(fabs(d[m + 1])) * EPS) {
                    e[m] = 0.0;
                    break;
                }
            }
            q->l = l1;
            q->lend = m;
            q->next = m + 1;
            if (m == l1) continue;
            double anorm = 0.0;
            for (int i = l1; i <= m; i++) anorm = fmax(anorm, fabs(d[i]));
            for (int i = l1; i < m; i++) anorm = fmax(anorm, fabs(e[i]));
            if (anorm == 0.0) {
                q->l = m + 1;
                continue;
            }
            if (anorm > SSFMAX || anorm < SSFMIN) return -1;
            for (int i = l1; i < m; i++) e[i] *= e[i];
            if (fabs(d[m]) < fabs(d[l1])) {  /* chase from the larger end */
                reverse(d, l1, m);
                reverse(e, l1, m - 1);
            }
        }
        const int l = q->l, lend = q->lend;
        int m = l;
        for (; m < lend; m++)
            if (fabs(e[m]) <= EPS * EPS * fabs(d[m] * d[m + 1])) break;
        if (m < lend) e[m] = 0.0;
        const double p = d[l];
        if (m == l) {  /* d[l] is an eigenvalue */
            q->l = l + 1;
            continue;
        }
        if (m == l + 1) {  /* a 2x2 block */
            double rt1, rt2;
            eig2(d[l], sqrt(e[l]), d[l + 1], &rt1, &rt2);
            d[l] = rt1;
            d[l + 1] = rt2;
            e[l] = 0.0;
            q->l = l + 2;
            continue;
        }
        if (q->iter == q->maxit) return -1;
        q->iter++;
        const double rte = sqrt(e[l]);
        double sigma = (d[l + 1] - p) / (2.0 * rte);
        const double r = hypot(sigma, 1.0);
        sigma = p - rte / (sigma + copysign(r, sigma));
        q->sigma = sigma;
        q->c = 1.0;
        q->s = 0.0;
        q->gamma = d[m] - sigma;
        q->p = q->gamma * q->gamma;
        q->m = m;
        q->i = m - 1;
        return 1;
    }
}

/* One step of stream q's sweep (the loop body of the root-free QL). */
static inline void sweep_step(stream *q, double *sink) {
    double *d = q->d, *e = q->e;
    const int i = q->i;
    const double bb = e[i], r = q->p + bb;
    *(i == q->m - 1 ? sink : e + i + 1) = q->s * r;
    const double oldc = q->c, oldgam = q->gamma, alpha = d[i];
    const double c = q->p / r;
    q->s = bb / r;
    q->gamma = c * (alpha - q->sigma) - q->s * oldgam;
    d[i + 1] = oldgam + (alpha - q->gamma);
    q->p = c != 0.0 ? (q->gamma * q->gamma) / c : oldc * bb;
    q->c = c;
    q->i = i - 1;
}

static void finish_sweep(stream *q) {
    q->e[q->l] = q->s * q->p;
    q->d[q->l] = q->sigma + q->gamma;
}

static int cmp_double(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Point stream q at the next matrices of the batch (from *taken on) until one needs a sweep:
   returns 1 then, 0 when the batch is used up. A matrix that fails sets *failed (1 + its index)
   if nothing failed before. */
static int refill(stream *q, double *d, double *e, int count, int n, int *taken, int *failed) {
    while (*taken < count) {
        const int k = (*taken)++;
        *q = (stream){.d = d + (size_t)k * n, .e = e + (size_t)k * n, .k = k, .n = n, .next = 0,
                      .l = 1, .lend = 0, .iter = 0, .maxit = 30 * n};
        const int rc = next_sweep(q);
        if (rc == 1) return 1;
        if (rc < 0 && !*failed) *failed = k + 1;
    }
    return 0;
}

/* Eigenvalues of `count` symmetric tridiagonal matrices of order n: diagonals in d (count x n,
   overwritten with the eigenvalues, ascending), off-diagonals in e (count x n, entry n-1 unused;
   destroyed). Returns 0, or 1 + the index of a matrix that failed (iteration limit or range). */
int alphaq_tridiagonal_eigenvalues(double *d, double *e, int count, int n) {
    stream st[STREAMS];
    int active[STREAMS], n_active = 0, taken = 0, failed = 0;
    double sink;
    for (int q = 0; q < STREAMS; q++) {
        active[q] = refill(&st[q], d, e, count, n, &taken, &failed);
        n_active += active[q];
    }
    while (n_active > 0) {
        int steps = 1 << 30;
        for (int q = 0; q < STREAMS; q++)
            if (active[q] && st[q].i - st[q].l + 1 < steps) steps = st[q].i - st[q].l + 1;
        if (n_active == STREAMS) {  /* the common case, without a test per step */
            for (int t = 0; t < steps; t++)
                for (int q = 0; q < STREAMS; q++) sweep_step(&st[q], &sink);
        } else {
            for (int t = 0; t < steps; t++)
                for (int q = 0; q < STREAMS; q++)
                    if (active[q]) sweep_step(&st[q], &sink);
        }
        for (int q = 0; q < STREAMS; q++) {
            if (!active[q] || st[q].i >= st[q].l) continue;
            finish_sweep(&st[q]);
            const int rc = next_sweep(&st[q]);
            if (rc == 1) continue;
            if (rc < 0 && !failed) failed = st[q].k + 1;
            active[q] = refill(&st[q], d, e, count, n, &taken, &failed);
            n_active -= !active[q];
        }
    }
    for (int k = 0; k < count; k++) qsort(d + (size_t)k * n, (size_t)n, sizeof(double), cmp_double);
    return failed;
}

/* Eigenvalues, ascending, of `count` symmetric n x n matrices stored contiguously (row-major,
   upper triangles read) in g, into out (count x n). work: alphaq_work_size(n, count) doubles.
   Returns 0, or 1 + the index of a matrix whose tridiagonal eigenvalues failed (then use
   another solver for the batch). */
int alphaq_symmetric_eigenvalues(const double *g, int count, int n, double *out, double *work) {
    if (n <= 0 || count <= 0) return 0;
    double *a = work;
    double *v = a + (size_t)n * (n + 1) / 2, *vp = v + n, *wp = vp + n, *p = wp + n;
    size_t *co = (size_t *)(p + n);
    double *e = (double *)(co + n);  /* count x n off-diagonals */
    for (int k = 0; k < count; k++)
        tridiagonalize(g + (size_t)k * n * n, n, out + (size_t)k * n, e + (size_t)k * n, a, v, vp, wp, p, co);
    return alphaq_tridiagonal_eigenvalues(out, e, count, n);
}

/* ---- Moments of a weight matrix ----

   The spectral stage's finiteness check and population variance of float32 weights, in float64:
   numpy needs ~12 ms for 3M weights (float64 temporaries), this ~2 ms. Returns the number of
   non-finite values; when it is 0, *mean and *m2 (the sum of squared deviations from the mean)
   are set. Two passes, each with 8 independent float64 partial sums (fixed order: the same
   bits on every run). */
size_t alphaq_moments(const float *x, size_t n, double *mean, double *m2) {
    double acc[8] = {0};
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) acc[k] += (double)x[i + k];
    double sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; i < n; i++) sum += (double)x[i];
    if (!isfinite(sum)) {  /* float32 values cannot overflow a float64 sum: some are NaN or Inf */
        size_t bad = 0;
        for (i = 0; i < n; i++) bad += !isfinite(x[i]);
        return bad;
    }
    const double mu = n ? sum / (double)n : 0.0;
    for (int k = 0; k < 8; k++) acc[k] = 0.0;
    for (i = 0; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) {
            const double dv = (double)x[i + k] - mu;
            acc[k] += dv * dv;
        }
    double ss = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; i < n; i++) ss += ((double)x[i] - mu) * ((double)x[i] - mu);
    *mean = mu;
    *m2 = ss;
    return 0;
}
