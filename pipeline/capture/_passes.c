/*
 * Native vocabulary-wide passes of teacher_logits on CPU (`vocab_passes: native`).
 *
 * `rows(...)` turns R rows of fp32 logits (R, Vp), Vp a multiple of BLOCK, into the soft labels
 * of `pipeline.capture.kernel` (k ids by `sample` or `topk`, their logprobs, the tail, covered
 * mass, entropy, top-1 probability), one row at a time while the row sits in L1/L2:
 *
 *   sweep 1: the row maximum m (and, for `topk`, each block's maximum);
 *   sweep 2: E = exp(L - m) into a row buffer, per-block sums of E and sum_v E_v (L_v - m), in
 *            one read, while the next row is prefetched;
 *   ids:     `sample` walks a float64 CDF over the block sums, then a prefix sum of the one
 *            block of E each draw lands in; `topk` keeps the k best of the values at or above
 *            the k-th largest block maximum;
 *   then:    logprobs of the ids, coverage, and the tail from the untouched blocks' sums plus
 *            the touched blocks re-summed without the chosen ids (no cancellation).
 *
 * The torch (`eager`) passes make ~15 separate trips over each row group and spend as much
 * again in per-op overhead on the small id-choice tensors; here each row is read twice and the
 * id choice reads only the blocks it needs (3.7-4.2x faster per row, docs/teacher-logits.md).
 * Trade-off: a second implementation to keep in step with the torch one
 * (tests/test_softlabels_kernel.py holds them to each other and to float64 references), and an
 * exponential of our own: a Cephes-style polynomial (relative error ~2e-7 over the range used),
 * with results below 2^-126 flushed to zero (torch keeps denormals; neither matters next to the
 * max id's 1).
 *
 * Determinism: GCC vector extensions and no x86 intrinsics, no FMA contraction
 * (-ffp-contract=off, set in setup.py), every sum in a fixed order: the AVX2 clone and the SSE2
 * baseline give the same bits (tested against an SSE2-only build of this file), so a store does
 * not depend on the x86-64 CPU that computed it, nor on the caller's thread count. The GIL is
 * released for the whole call, so compute threads run it in parallel.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 64
#define LANES 8
#define VECS (BLOCK / LANES)
#define TINY 1e-30
#define EL_RUN 16 /* blocks per float run of the entropy sum (1,024 values) */

typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
typedef uint32_t vu __attribute__((vector_size(32)));
typedef float vf_u __attribute__((vector_size(32), aligned(4))); /* unaligned load/store */

/* SOFTLABELS_NO_CLONES: the baseline build only (tests compare its bits with the clones') */
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(SOFTLABELS_NO_CLONES)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif
#define INLINE static inline __attribute__((always_inline))

INLINE vf load(const float *p) { return *(const vf_u *)p; }
INLINE void store(float *p, vf v) { *(vf_u *)p = v; }
INLINE vf splat(float x) { return (vf){x, x, x, x, x, x, x, x}; }
INLINE vi splat_i(int32_t x) { return (vi){x, x, x, x, x, x, x, x}; }
INLINE vu splat_u(uint32_t x) { return (vu){x, x, x, x, x, x, x, x}; }

INLINE vf vmax(vf a, vf b) {
    vi gt = a > b;
    return (vf)((gt & (vi)a) | (~gt & (vi)b));
}

/* Sum of the 8 lanes, in a fixed order. */
INLINE float hsum(vf v) { return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7])); }

INLINE float hmax(vf v) {
    float m = v[0];
    for (int i = 1; i < LANES; i++) m = v[i] > m ? v[i] : m;
    return m;
}

/* Maximum of one block's 64 values, per lane, as a tree of depth 3. */
INLINE vf block_max(const float *block) {
    vf a = vmax(load(block), load(block + LANES));
    vf b = vmax(load(block + 2 * LANES), load(block + 3 * LANES));
    vf c = vmax(load(block + 4 * LANES), load(block + 5 * LANES));
    vf d = vmax(load(block + 6 * LANES), load(block + 7 * LANES));
    return vmax(vmax(a, b), vmax(c, d));
}

/* exp(x) for x <= 0 (Cephes expf): x = n ln2 + r with |r| <= ln2 / 2, exp(r) by a degree-7
 * polynomial, 2^n built in the exponent bits; 0 below -87.33 (2^-126), exp(0) = 1 exactly.
 * Lanes below -87.33 are not clamped first: whatever they compute (never a denormal: the
 * scale's mantissa bits are 0) is masked to +0 at the end. */
INLINE vf vexp(vf x) {
    vi under = x < splat(-87.33654475f);
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    vf t = x * splat(1.44269504088896341f) + splat(magic);
    vf n = t - splat(magic);
    vf r = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
    vf y = splat(1.9875691500e-4f);
    y = y * r + splat(1.3981999507e-3f);
    y = y * r + splat(8.3334519073e-3f);
    y = y * r + splat(4.1665795894e-2f);
    y = y * r + splat(1.6666665459e-1f);
    y = y * r + splat(5.0000001201e-1f);
    y = y * (r * r) + r + splat(1.0f);
    /* 2^n: bits(t) = bits(magic) + n, so (bits(t) << 23) - ((bits(magic) - 127) << 23) is
     * (n + 127) << 23, in wrapping unsigned arithmetic */
    vu bias = splat_u(((uint32_t)0x4B400000u - 127u) << 23); /* 0x4B400000 = bits(magic) */
    vf scale = (vf)(((vu)t << 23) - bias);
    return (vf)(~under & (vi)(y * scale));
}

/* Sum of one block of exponentials, entries with skip bit i set counted as 0. */
INLINE float block_sum_without(const float *block, uint64_t skip) {
    const vi lane = {0, 1, 2, 3, 4, 5, 6, 7};
    vf acc = splat(0.0f);
    for (int j = 0; j < VECS; j++) {
        vf e = load(block + j * LANES);
        int32_t bits = (int32_t)(uint8_t)(skip >> (j * LANES));
        vi keep = ((splat_i(bits) >> lane) & 1) - 1; /* 0 where skipped, all ones elsewhere */
        acc += (vf)((vi)e & keep);
    }
    return hsum(acc);
}

/* Inclusive prefix sums of 64 floats in place, in a fixed order: within each vector of 8 by
 * three shifted adds, then the running total of the vectors before it. */
INLINE void prefix_sums(float *x) {
    const vi by1 = {0, 0, 1, 2, 3, 4, 5, 6}, by2 = {0, 0, 0, 1, 2, 3, 4, 5};
    const vi by4 = {0, 0, 0, 0, 0, 1, 2, 3};
    float carry = 0.0f;
    for (int j = 0; j < VECS; j++) {
        vf v = load(x + j * LANES);
        v += (vf)((vi)__builtin_shuffle(v, by1) & (vi){0, -1, -1, -1, -1, -1, -1, -1});
        v += (vf)((vi)__builtin_shuffle(v, by2) & (vi){0, 0, -1, -1, -1, -1, -1, -1});
        v += (vf)((vi)__builtin_shuffle(v, by4) & (vi){0, 0, 0, 0, -1, -1, -1, -1});
        v += splat(carry);
        store(x + j * LANES, v);
        carry = v[LANES - 1];
    }
}

/* How many of the 64 ascending values are <= x. */
INLINE int count_le(const float *x, float v) {
    vi n = {0};
    for (int j = 0; j < VECS; j++) n += load(x + j * LANES) <= splat(v);
    return -(((n[0] + n[1]) + (n[2] + n[3])) + ((n[4] + n[5]) + (n[6] + n[7])));
}

typedef struct {
    Py_ssize_t rows, padded, k;
    int topk, logprobs;
    const float *logits;    /* (R, Vp) */
    const double *uniforms; /* (R, k), sample only */
    int32_t *ids;           /* (R, k) */
    float *lp;              /* (R, k) */
    double *tail;           /* (R,) */
    float *covered, *entropy, *top1; /* (R,) */
    uint8_t *tiny;          /* (R,) */
} Job;

typedef struct {
    float *e;            /* (Vp,) exp(L - m) of the current row */
    float *bmax, *bsum;  /* (nb,) */
    double *cdf;         /* (nb,) */
    double *x;           /* (k,) CDF points */
    float *val;          /* (k,) top-k logits, then the chosen ids' exponentials */
    int64_t *sel, *asc;  /* (k,) */
} Scratch;

/* Insert (v, id) into the n <= k best so far, kept by descending value with earlier entries
 * first among equals (ids come ascending, so ties go to the lower id); returns the new n. */
INLINE Py_ssize_t keep_best(float *val, int64_t *sel, Py_ssize_t n, Py_ssize_t k, float v,
                            int64_t id) {
    if (n == k && !(v > val[k - 1])) return n;
    Py_ssize_t p = n < k ? n++ : k - 1; /* when full, the last slot is given up */
    while (p > 0 && val[p - 1] < v) {
        val[p] = val[p - 1];
        sel[p] = sel[p - 1];
        p--;
    }
    val[p] = v;
    sel[p] = id;
    return n;
}

/* `topk`: the k largest logits, ties to the lower id, into sel. The k-th largest block maximum
 * tau bounds the k-th largest logit from below (k blocks each hold a value >= tau), so only
 * values >= tau, in blocks whose maximum is >= tau, are candidates; a block whose maximum
 * cannot enter the current k is skipped too. NaN logits are never candidates; if they leave
 * fewer than k, every value is. */
INLINE void choose_topk(const float *row, const Scratch *s, Py_ssize_t nb, Py_ssize_t k) {
    float tau = -INFINITY;
    Py_ssize_t n = 0;
    if (nb >= k) {
        for (Py_ssize_t b = 0; b < nb; b++) n = keep_best(s->val, s->sel, n, k, s->bmax[b], b);
        tau = s->val[k - 1];
        n = 0;
    }
    for (Py_ssize_t b = 0; b < nb; b++) {
        if (!(s->bmax[b] >= tau) || (n == k && !(s->bmax[b] > s->val[k - 1]))) continue;
        for (Py_ssize_t i = b * BLOCK; i < (b + 1) * BLOCK; i++)
            if (row[i] >= tau) n = keep_best(s->val, s->sel, n, k, row[i], i);
    }
    if (n < k) /* NaN logits: take every value */
        for (Py_ssize_t i = n = 0; i < nb * BLOCK; i++)
            n = keep_best(s->val, s->sel, n, k, row[i], i);
}

/* `sample`: k inverse-CDF draws at points u * S, in ascending order, into sel: the block by
 * the float64 block CDF, the id by a float cumulative sum inside the block, taken once per
 * distinct block. */
INLINE void choose_sample(const Scratch *s, const double *u, Py_ssize_t nb, Py_ssize_t k) {
    double total = s->cdf[nb - 1];
    double below = nextafter(total, 0.0);
    for (Py_ssize_t j = 0; j < k; j++) {
        double x = u[j] * total;
        x = x < below ? x : below;
        Py_ssize_t p = j; /* insertion sort: systematic points arrive sorted */
        while (p > 0 && s->x[p - 1] > x) {
            s->x[p] = s->x[p - 1];
            p--;
        }
        s->x[p] = x;
    }
    float inner[BLOCK], limit = 0.0f;
    Py_ssize_t b = 0, cur = -1;
    for (Py_ssize_t j = 0; j < k; j++) {
        double x = s->x[j];
        while (s->cdf[b] <= x) b++; /* x < total: stops at the last block at the latest */
        if (b != cur) {
            memcpy(inner, s->e + b * BLOCK, sizeof(inner));
            prefix_sums(inner);
            limit = nextafterf(inner[BLOCK - 1], 0.0f);
            cur = b;
        }
        float rest = (float)(x - (b > 0 ? s->cdf[b - 1] : 0.0));
        rest = rest < limit ? rest : limit;
        int pos = count_le(inner, rest); /* < BLOCK: rest < inner[BLOCK - 1] */
        s->sel[j] = b * BLOCK + pos;
    }
}

/* Mass (unnormalised) outside the distinct ids asc (ascending): untouched blocks' sums plus the
 * touched blocks re-summed without the chosen ids. */
INLINE double uncovered(const Scratch *s, Py_ssize_t nb, Py_ssize_t k) {
    double kept = 0.0, untouched = 0.0;
    Py_ssize_t j = 0, next = s->asc[0] / BLOCK;
    for (Py_ssize_t b = 0; b < nb; b++) {
        if (b != next) {
            untouched += s->bsum[b];
            continue;
        }
        uint64_t skip = 0;
        while (j < k && s->asc[j] / BLOCK == b) skip |= 1ull << (s->asc[j++] % BLOCK);
        kept += block_sum_without(s->e + b * BLOCK, skip);
        next = j < k ? s->asc[j] / BLOCK : -1;
    }
    return kept + untouched;
}

INLINE void sort_ascending(int64_t *a, Py_ssize_t k) {
    for (Py_ssize_t j = 1; j < k; j++) {
        int64_t v = a[j];
        Py_ssize_t p = j;
        while (p > 0 && a[p - 1] > v) {
            a[p] = a[p - 1];
            p--;
        }
        a[p] = v;
    }
}

CLONES static void run_rows(const Job *job, Scratch *s) {
    const Py_ssize_t vp = job->padded, nb = vp / BLOCK, k = job->k;
    for (Py_ssize_t r = 0; r < job->rows; r++) {
        const float *row = job->logits + r * vp;
        /* sweep 1: the row maximum (and the block maxima `topk` skips blocks by), as trees of
         * independent maxima rather than one long chain */
        float m;
        if (job->topk) {
            m = -INFINITY;
            for (Py_ssize_t b = 0; b < nb; b++) {
                s->bmax[b] = hmax(block_max(row + b * BLOCK));
                m = s->bmax[b] > m ? s->bmax[b] : m;
            }
        } else {
            vf acc = block_max(row);
            for (Py_ssize_t b = 1; b < nb; b++) acc = vmax(acc, block_max(row + b * BLOCK));
            m = hmax(acc);
        }
        /* sweep 2: exponentials, block sums, sum E (L - m); the latter in float lanes over runs
         * of EL_RUN blocks, each run's total added in float64 */
        double el = 0.0, total = 0.0;
        vf acc_el = splat(0.0f);
        const char *next = (const char *)(row + vp); /* prefetched block by block (below) */
        for (Py_ssize_t b = 0; b < nb; b++) {
            if (r + 1 < job->rows) /* the next row's block, while this one computes */
                for (int line = 0; line < BLOCK * 4; line += 64)
                    __builtin_prefetch(next + b * BLOCK * 4 + line, 0, 3);
            vf acc = splat(0.0f);
#pragma GCC unroll 8
            for (int v = 0; v < VECS; v++) {
                vf sh = load(row + b * BLOCK + v * LANES) - splat(m);
                vf e = vexp(sh);
                store(s->e + b * BLOCK + v * LANES, e);
                acc += e;
                acc_el += e * sh;
            }
            s->bsum[b] = hsum(acc);
            s->cdf[b] = total += s->bsum[b];
            if (b % EL_RUN == EL_RUN - 1 || b == nb - 1) {
                el += hsum(acc_el);
                acc_el = splat(0.0f);
            }
        }
        double log_total = log(total);
        job->entropy[r] = (float)(log_total - el / total);
        job->top1[r] = (float)(1.0 / total);
        /* the k ids, ascending */
        if (job->topk) {
            choose_topk(row, s, nb, k);
        } else {
            choose_sample(s, job->uniforms + r * k, nb, k);
        }
        memcpy(s->asc, s->sel, k * sizeof(int64_t));
        sort_ascending(s->asc, k);
        int32_t *ids = job->ids + r * k;
        float *lp = job->lp + r * k;
        /* logprobs, canonical order: descending logprob, ties (and duplicates) by ascending id */
        for (Py_ssize_t j = 0; j < k; j++) {
            float sh = row[s->asc[j]] - m;
            float e = s->e[s->asc[j]];
            float l = job->logprobs ? (float)((double)sh - log_total) : NAN;
            int64_t id = s->asc[j];
            Py_ssize_t p = j;
            while (job->logprobs && p > 0 && lp[p - 1] < l) { /* stable insertion sort */
                lp[p] = lp[p - 1];
                ids[p] = ids[p - 1];
                s->val[p] = s->val[p - 1];
                p--;
            }
            lp[p] = l;
            ids[p] = (int32_t)id;
            s->val[p] = e;
        }
        double covered = 0.0;
        for (Py_ssize_t j = 0; j < k; j++)
            if (j == 0 || ids[j] != ids[j - 1]) covered += s->val[j];
        job->covered[r] = (float)(covered / total);
        if (job->logprobs) {
            double rest = uncovered(s, nb, k);
            job->tail[r] = log(rest) - log_total;
            job->tiny[r] = rest < TINY;
        } else {
            job->tail[r] = NAN;
            job->tiny[r] = 0;
        }
    }
}

static void *ptr(unsigned long long address) { return (void *)(uintptr_t)address; }

PyDoc_STRVAR(rows_doc,
             "rows(logits, rows, padded, k, topk, logprobs, uniforms, ids, lp, tail, covered, "
             "entropy, top1, tiny)\n\n"
             "Soft labels of `rows` rows of contiguous fp32 logits (rows, padded) at address "
             "`logits`; every array argument is the address of a contiguous buffer (see "
             "pipeline.capture.kernel.native_passes, the only caller). Releases the GIL.");

static PyObject *py_rows(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long a_logits, a_u, a_ids, a_lp, a_tail, a_cov, a_ent, a_top1, a_tiny;
    Job job;
    if (!PyArg_ParseTuple(args, "KnnnppKKKKKKKK", &a_logits, &job.rows, &job.padded, &job.k,
                          &job.topk, &job.logprobs, &a_u, &a_ids, &a_lp, &a_tail, &a_cov, &a_ent,
                          &a_top1, &a_tiny))
        return NULL;
    if (job.padded <= 0 || job.padded % BLOCK || job.k < 1 || job.k > job.padded ||
        job.rows < 0 || (!job.topk && !a_u) || (job.topk && !job.logprobs)) {
        PyErr_SetString(PyExc_ValueError, "rows: bad shape or flags");
        return NULL;
    }
    job.logits = ptr(a_logits);
    job.uniforms = ptr(a_u);
    job.ids = ptr(a_ids);
    job.lp = ptr(a_lp);
    job.tail = ptr(a_tail);
    job.covered = ptr(a_cov);
    job.entropy = ptr(a_ent);
    job.top1 = ptr(a_top1);
    job.tiny = ptr(a_tiny);
    Py_ssize_t nb = job.padded / BLOCK, k = job.k;
    size_t bytes = nb * (BLOCK * sizeof(float) + 2 * sizeof(float) + sizeof(double)) +
                   k * (sizeof(double) + sizeof(float) + 2 * sizeof(int64_t));
    char *mem = malloc(bytes);
    if (!mem) return PyErr_NoMemory();
    Scratch s;
    s.cdf = (double *)mem;
    s.x = s.cdf + nb;
    s.sel = (int64_t *)(s.x + k);
    s.asc = s.sel + k;
    s.e = (float *)(s.asc + k);
    s.bmax = s.e + job.padded;
    s.bsum = s.bmax + nb;
    s.val = s.bsum + nb;
    Py_BEGIN_ALLOW_THREADS
    run_rows(&job, &s);
    Py_END_ALLOW_THREADS
    free(mem);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"rows", py_rows, METH_VARARGS, rows_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_passes",
    "Native vocabulary-wide passes of teacher_logits (see pipeline/capture/_passes.c).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__passes(void) { return PyModule_Create(&module); }
