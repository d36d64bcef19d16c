/* Fused elementwise and attention ops for CPU inference (fp32, AVX2 + FMA, OpenMP).
 *
 * Each replaces a chain of 4-10 eager torch ops (each with its own dispatch, allocation and pass
 * over memory) in the decode step, where the tensors are tiny and that overhead dominates.
 * Rounding: compiled with -ffp-contract=off; RoPE rounds exactly as torch's expression
 * (x*cos + rotate_half(x)*sin: two products, one sum); RMSNorm and softmax sums run in another
 * order than torch's reductions (differences of a few ulp).
 *
 *   qk_rms_norm:   y[m] = w * (x[m] * 1/sqrt(mean(x[m]^2) + eps))          x, y (M, H)
 *   qk_silu_mul:   y[m, i] = silu(g[m, i]) * u[m, i], g|u = gu[m, :I]|gu[m, I:]   gu (M, 2I)
 *   qk_rope:       in place, heads 0..H-1 of each token row (rotate_half form); cos/sin (T, D)
 *   qk_attn_paged: causal attention of a step's query rows (prefill chunks and decodes) over
 *                  the paged cache, GQA, keys found through block tables; each row over exactly
 *                  its keys 0..position, the same arithmetic for every row (batch-invariant)
 *   qk_attn_decode: its one-query-per-sequence form (a contiguous cache is one block per
 *                  sequence)
 */
#include "qk_simd.h"
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

void qk_rms_norm(const float *x, const float *w, float *y, int64_t M, int64_t H, float eps) {
#pragma omp parallel for schedule(static) if (M >= 16)
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * H;
        float *yr = y + m * H;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 16 <= H; i += 16) {
            __m256 v0 = _mm256_loadu_ps(xr + i), v1 = _mm256_loadu_ps(xr + i + 8);
            a0 = _mm256_fmadd_ps(v0, v0, a0);
            a1 = _mm256_fmadd_ps(v1, v1, a1);
        }
        float ss = hsum_ps(_mm256_add_ps(a0, a1));
        for (; i < H; i++) ss += xr[i] * xr[i];
        const float r = 1.0f / sqrtf(ss / (float)H + eps);
        const __m256 rv = _mm256_set1_ps(r);
        for (i = 0; i + 8 <= H; i += 8)  /* w * (x * r): the order HF rounds in */
            _mm256_storeu_ps(yr + i, _mm256_mul_ps(_mm256_loadu_ps(w + i), _mm256_mul_ps(_mm256_loadu_ps(xr + i), rv)));
        for (; i < H; i++) yr[i] = w[i] * (xr[i] * r);
    }
}

static inline float silu1(float g) { return g / (1.0f + expf(-g)); }

void qk_silu_mul(const float *gu, float *y, int64_t M, int64_t I) {
    const int64_t total = M * I;
#pragma omp parallel for schedule(static) if (total >= 65536)
    for (int64_t m = 0; m < M; m++) {
        const float *g = gu + m * 2 * I, *u = g + I;
        float *yr = y + m * I;
        const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
        int64_t i = 0;
        for (; i + 8 <= I; i += 8) {
            __m256 gv = _mm256_loadu_ps(g + i);
            __m256 e = exp_ps(_mm256_xor_ps(gv, sign));
            __m256 s = _mm256_div_ps(gv, _mm256_add_ps(one, e));
            _mm256_storeu_ps(yr + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
        }
        for (; i < I; i++) yr[i] = silu1(g[i]) * u[i];
    }
}

/* x: T token rows, `stride` floats apart; heads 0..H-1 of D floats each are rotated in place.
 * out[:D/2] = x1*c - x2*s, out[D/2:] = x2*c' + x1*s' with c, s the token's cos/sin row (D wide). */
void qk_rope(float *x, int64_t T, int64_t stride, int64_t H, int64_t D, const float *cos, const float *sin) {
    const int64_t half = D / 2;
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos + t * D, *s = sin + t * D;
        for (int64_t h = 0; h < H; h++) {
            float *p = x + t * stride + h * D;
            int64_t i = 0;
            for (; i + 8 <= half; i += 8) {
                __m256 x1 = _mm256_loadu_ps(p + i), x2 = _mm256_loadu_ps(p + half + i);
                __m256 o1 = _mm256_sub_ps(_mm256_mul_ps(x1, _mm256_loadu_ps(c + i)), _mm256_mul_ps(x2, _mm256_loadu_ps(s + i)));
                __m256 o2 = _mm256_add_ps(_mm256_mul_ps(x2, _mm256_loadu_ps(c + half + i)),
                                          _mm256_mul_ps(x1, _mm256_loadu_ps(s + half + i)));
                _mm256_storeu_ps(p + i, o1);
                _mm256_storeu_ps(p + half + i, o2);
            }
            for (; i < half; i++) {
                float x1 = p[i], x2 = p[half + i];
                p[i] = x1 * c[i] - x2 * s[i];
                p[half + i] = x2 * c[half + i] + x1 * s[half + i];
            }
        }
    }
}

/* ---- attention over the paged cache: qk_attn_paged (every query row of a step) and
 * qk_attn_decode (one row per sequence, the same kernel).
 *
 * Each (query row, head) pair -- a "row-head" -- is computed with the same instructions in the
 * same order whatever else is in the call: scores s_j = (q*scale) . k_j block by block, one
 * max, exp(s_j - max) summed 8 lanes wide from key 0, o = sum_j e_j v_j in key order, o / sum.
 * A row sees exactly its own keys 0..pos (no padding, no mask), so its result depends only on
 * its query and those keys: a prompt gives the same bits processed whole, in chunks, after a
 * prefix-cache hit or next to other sequences, and a prefill row the same as a decode row.
 * Tiling (rows of one sequence x the query heads of one KV head per task) only shares key and
 * value loads between row-heads; it never changes any row-head's arithmetic.
 * int8 pools (Q = 1, kv_cache_dtype="int8"): keys and values are int8 codes with one fp32 scale
 * per token and KV head; a score is ((q*scale) . codes) * k_scale_j and a value weighs in with
 * e_j * v_scale_j (the softmax sum stays over e_j) -- no dequantized copy of the pool. */
#define ALWAYS_INLINE static inline __attribute__((always_inline))
#define ATT_RT 8 /* query rows per task (prefill); decode rows run one (row, head) per task */

typedef struct {
    int64_t s, row0, nr, h0, nh; /* sequence, first flat row, rows, first query head, heads */
} attn_task_t;

/* 8 elements of a pool row from element i: fp32, or int8 codes widened to fp32 (Q). */
ALWAYS_INLINE __m256 ld_kv(const int Q, const void *p, int64_t i) {
    if (Q) return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)p + i))));
    return _mm256_loadu_ps((const float *)p + i);
}

/* Scores of the ND*8-wide query qs against keys [j0, j0 + n) of one block (kb: the block's
 * first key of this KV head, `tok` elements apart; Q: int8 codes with their scales at ks,
 * `stok` floats apart) into sc; returns the running max. Keys go in
 * fours from the block start (four dot products reduced together: ~5 shuffles for 4 keys
 * instead of ~7 per key), the rest of a short block one by one: a key's rounding depends on
 * its place in the block and on n, i.e. on the row's own length only. */
ALWAYS_INLINE float att_scores(const int ND, const int Q, const float *qs, const void *kb, const float *ks,
                               int64_t tok, int64_t stok, int64_t n, float *sc, float mx) {
    __m256 qv[ND];
    for (int d = 0; d < ND; d++) qv[d] = _mm256_loadu_ps(qs + 8 * d);
    int64_t j = 0;
    __m128 m4 = _mm_set1_ps(mx);
    for (; j + 4 <= n; j += 4) {
        const int64_t k0 = j * tok, k1 = k0 + tok, k2 = k1 + tok, k3 = k2 + tok;
        __m256 a0 = _mm256_mul_ps(qv[0], ld_kv(Q, kb, k0)), a1 = _mm256_mul_ps(qv[0], ld_kv(Q, kb, k1));
        __m256 a2 = _mm256_mul_ps(qv[0], ld_kv(Q, kb, k2)), a3 = _mm256_mul_ps(qv[0], ld_kv(Q, kb, k3));
        for (int d = 1; d < ND; d++) {
            a0 = _mm256_fmadd_ps(qv[d], ld_kv(Q, kb, k0 + 8 * d), a0);
            a1 = _mm256_fmadd_ps(qv[d], ld_kv(Q, kb, k1 + 8 * d), a1);
            a2 = _mm256_fmadd_ps(qv[d], ld_kv(Q, kb, k2 + 8 * d), a2);
            a3 = _mm256_fmadd_ps(qv[d], ld_kv(Q, kb, k3 + 8 * d), a3);
        }
        /* lanes (k0 k0 k1 k1 | k0 k0 k1 k1) + ... -> (k0 k1 k2 k3 | k0 k1 k2 k3) -> 4 sums */
        const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
        __m128 v = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        if (Q) {
            const float *s = ks + j * stok;
            v = _mm_mul_ps(v, _mm_setr_ps(s[0], s[stok], s[2 * stok], s[3 * stok]));
        }
        _mm_storeu_ps(sc + j, v);
        m4 = _mm_max_ps(m4, v);
    }
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    mx = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    for (; j < n; j++) {
        const int64_t kj = j * tok;
        __m256 acc = _mm256_mul_ps(qv[0], ld_kv(Q, kb, kj));
        for (int d = 1; d < ND; d++) acc = _mm256_fmadd_ps(qv[d], ld_kv(Q, kb, kj + 8 * d), acc);
        float v = hsum_ps(acc);
        if (Q) v *= ks[j * stok];
        sc[j] = v;
        mx = v > mx ? v : mx;
    }
    return mx;
}

/* sc[0..L) <- exp(sc - mx); returns their sum (8 lanes from key 0, then the tail in order). */
static float att_softmax(float *sc, int64_t L, float mx) {
    int64_t j = 0;
    __m256 sumv = _mm256_setzero_ps();
    const __m256 mv = _mm256_set1_ps(mx);
    for (; j + 8 <= L; j += 8) {
        __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(sc + j), mv));
        _mm256_storeu_ps(sc + j, e);
        sumv = _mm256_add_ps(sumv, e);
    }
    float sum = hsum_ps(sumv);
    for (; j < L; j++) {
        sc[j] = expf(sc[j] - mx);
        sum += sc[j];
    }
    return sum;
}

/* o (ND*8, in memory) += sum_j p[j] v_j over the n keys of one block (Q: p[j] * v_scale_j
 * times the int8 codes). */
ALWAYS_INLINE void att_pv(const int ND, const int Q, float *o, const float *p, const void *vb, const float *vs,
                          int64_t tok, int64_t stok, int64_t n) {
    __m256 acc[ND];
    for (int d = 0; d < ND; d++) acc[d] = _mm256_loadu_ps(o + 8 * d);
    for (int64_t j = 0; j < n; j++) {
        const __m256 pj = _mm256_set1_ps(Q ? p[j] * vs[j * stok] : p[j]);
        for (int d = 0; d < ND; d++) acc[d] = _mm256_fmadd_ps(pj, ld_kv(Q, vb, j * tok + 8 * d), acc[d]);
    }
    for (int d = 0; d < ND; d++) _mm256_storeu_ps(o + 8 * d, acc[d]);
}

/* One task: rows row0..row0+nr-1 of sequence s (positions pos0..pos0+nr-1, row r sees keys
 * 0..pos0+r), query heads h0..h0+nh-1 (one KV head). Blocks of keys are the outer loop so a
 * block's keys / values are read from L1 by every row-head of the task.
 * Scratch: sc (nr*nh, ldsc) scores, qs / ob (nr*nh, D) scaled queries / output sums, mx / sum
 * (nr*nh) score maxima / exp sums. Q: int8 pools, scales at ksbase / vsbase (blocks, bs, Hkv). */
ALWAYS_INLINE void att_task(const int ND, const int Q, const attn_task_t *t, int64_t pos0, const float *q,
                            int64_t q_stride, const void *kbase, const void *vbase, const float *ksbase,
                            const float *vsbase, const int64_t *tab, int64_t bs, int64_t block_stride, int64_t tok,
                            int64_t koff, float scale, float *out, int64_t Hq, float *sc, int64_t ldsc, float *qs,
                            float *ob, float *mx, float *sum) {
    const int64_t esz = Q ? 1 : 4, stok = tok / (8 * ND), sboff = koff / (8 * ND), sbstride = bs * stok;
    const int64_t D = 8 * ND, nrh = t->nr * t->nh, Lmax = pos0 + t->nr;
    for (int64_t r = 0; r < t->nr; r++)
        for (int64_t h = 0; h < t->nh; h++) {
            const int64_t i = r * t->nh + h;
            const float *qh = q + (t->row0 + r) * q_stride + (t->h0 + h) * D;
            for (int d = 0; d < ND; d++)
                _mm256_storeu_ps(qs + i * D + 8 * d, _mm256_mul_ps(_mm256_loadu_ps(qh + 8 * d), _mm256_set1_ps(scale)));
            for (int64_t d = 0; d < D; d++) ob[i * D + d] = 0.0f;
            mx[i] = -INFINITY;
        }
    for (int64_t j0 = 0; j0 < Lmax; j0 += bs) {
        const void *kb = (const char *)kbase + (tab[j0 / bs] * block_stride + koff) * esz;
        const float *ks = Q ? ksbase + tab[j0 / bs] * sbstride + sboff : NULL;
        for (int64_t r = 0; r < t->nr; r++) {
            const int64_t L = pos0 + r + 1;
            if (j0 >= L) continue;
            const int64_t n = L - j0 < bs ? L - j0 : bs;
            for (int64_t h = 0; h < t->nh; h++) {
                const int64_t i = r * t->nh + h;
                mx[i] = att_scores(ND, Q, qs + i * D, kb, ks, tok, stok, n, sc + i * ldsc + j0, mx[i]);
            }
        }
    }
    for (int64_t i = 0; i < nrh; i++) sum[i] = att_softmax(sc + i * ldsc, pos0 + i / t->nh + 1, mx[i]);
    if (nrh == 1) { /* one row-head (decode): the sums stay in registers across blocks (same FMAs) */
        __m256 acc[ND];
        for (int d = 0; d < ND; d++) acc[d] = _mm256_setzero_ps();
        for (int64_t j0 = 0; j0 < Lmax; j0 += bs) {
            const void *vb = (const char *)vbase + (tab[j0 / bs] * block_stride + koff) * esz;
            const float *vs = Q ? vsbase + tab[j0 / bs] * sbstride + sboff : NULL;
            const int64_t n = Lmax - j0 < bs ? Lmax - j0 : bs;
            for (int64_t j = 0; j < n; j++) {
                const __m256 pj = _mm256_set1_ps(Q ? sc[j0 + j] * vs[j * stok] : sc[j0 + j]);
                for (int d = 0; d < ND; d++) acc[d] = _mm256_fmadd_ps(pj, ld_kv(Q, vb, j * tok + 8 * d), acc[d]);
            }
        }
        for (int d = 0; d < ND; d++) _mm256_storeu_ps(ob + 8 * d, acc[d]);
    } else {
        for (int64_t j0 = 0; j0 < Lmax; j0 += bs) {
            const void *vb = (const char *)vbase + (tab[j0 / bs] * block_stride + koff) * esz;
            const float *vs = Q ? vsbase + tab[j0 / bs] * sbstride + sboff : NULL;
            for (int64_t r = 0; r < t->nr; r++) {
                const int64_t L = pos0 + r + 1;
                if (j0 >= L) continue;
                const int64_t n = L - j0 < bs ? L - j0 : bs;
                for (int64_t h = 0; h < t->nh; h++) {
                    const int64_t i = r * t->nh + h;
                    att_pv(ND, Q, ob + i * D, sc + i * ldsc + j0, vb, vs, tok, stok, n);
                }
            }
        }
    }
    for (int64_t i = 0; i < nrh; i++) {
        const int64_t r = i / t->nh, h = i % t->nh;
        float *oh = out + ((t->row0 + r) * Hq + t->h0 + h) * D;
        const __m256 inv = _mm256_set1_ps(1.0f / sum[i]);
        for (int d = 0; d < ND; d++)
            _mm256_storeu_ps(oh + 8 * d, _mm256_mul_ps(_mm256_loadu_ps(ob + i * D + 8 * d), inv));
    }
}

/* q: N query rows, row r at q + r*q_stride, Hq heads of D. Sequence s owns qlen[s] consecutive
 * rows (qlen NULL: one each); row i of them sits at position ctx[s] - qlen[s] + i and attends
 * to keys 0..that position. Key j of sequence s, KV head g:
 * base + tables[s*tstride + j/bs]*block_stride + (j%bs)*Hkv*D + g*D (in elements).  out (N, Hq, D).
 * ksbase / vsbase NULL: fp32 pools; else int8 pools and their fp32 scales (blocks, bs, Hkv).
 * D in {64, 128} (the callers check); Hq % Hkv == 0. */
void qk_attn_paged(const float *q, int64_t q_stride, const void *kbase, const void *vbase, const float *ksbase,
                   const float *vsbase, const int64_t *tables, int64_t tstride, const int64_t *ctx,
                   const int64_t *qlen, int64_t block_stride, int64_t bs, float *out, int64_t S, int64_t Hq,
                   int64_t Hkv, int64_t D, float scale) {
    const int Q = ksbase != NULL;
    const int64_t group = Hq / Hkv, tok = Hkv * D;
    /* tasks: a sequence's rows in tiles of ATT_RT x one KV head's query heads; a single row
     * (decode) is split per query head instead, for parallelism */
    int64_t ntasks = 0, maxL = 1;
    for (int64_t s = 0; s < S; s++) {
        const int64_t n = qlen ? qlen[s] : 1;
        ntasks += n == 1 ? Hq : ((n + ATT_RT - 1) / ATT_RT) * Hkv;
        maxL = ctx[s] > maxL ? ctx[s] : maxL;
    }
    attn_task_t *tasks = (attn_task_t *)malloc((size_t)ntasks * sizeof(attn_task_t));
    int64_t *pos0 = (int64_t *)malloc((size_t)ntasks * sizeof(int64_t));
    int64_t k = 0, row = 0, per = 1; /* per: the most row-heads of one task */
    for (int64_t s = 0; s < S; s++) {
        const int64_t n = qlen ? qlen[s] : 1;
        for (int64_t r0 = 0; r0 < n; r0 += ATT_RT) {
            const int64_t nr = n - r0 < ATT_RT ? n - r0 : ATT_RT;
            const int64_t nh = n == 1 ? 1 : group;
            per = nr * nh > per ? nr * nh : per;
            for (int64_t h0 = 0; h0 < Hq; h0 += nh) {
                tasks[k] = (attn_task_t){s, row + r0, nr, h0, nh};
                pos0[k++] = ctx[s] - n + r0;
            }
        }
        row += n;
    }
    const int64_t ldsc = (maxL + 15) & ~(int64_t)15;
#pragma omp parallel if (ntasks > 1)
    {
        float *sc = (float *)malloc((size_t)(per * (ldsc + 2 * D + 2)) * sizeof(float));
        float *qs = sc + per * ldsc, *ob = qs + per * D, *mx = ob + per * D, *sum = mx + per;
#define ATT_RUN(i)                                                                                              \
    do {                                                                                                        \
        const attn_task_t *t = tasks + (i);                                                                     \
        const int64_t *tab = tables + t->s * tstride, koff = (t->h0 / group) * D;                               \
        if (D == 64 && !Q)                                                                                      \
            att_task(8, 0, t, pos0[i], q, q_stride, kbase, vbase, NULL, NULL, tab, bs, block_stride, tok, koff, \
                     scale, out, Hq, sc, ldsc, qs, ob, mx, sum);                                                \
        else if (D == 64)                                                                                       \
            att_task(8, 1, t, pos0[i], q, q_stride, kbase, vbase, ksbase, vsbase, tab, bs, block_stride, tok,   \
                     koff, scale, out, Hq, sc, ldsc, qs, ob, mx, sum);                                          \
        else if (!Q)                                                                                            \
            att_task(16, 0, t, pos0[i], q, q_stride, kbase, vbase, NULL, NULL, tab, bs, block_stride, tok,      \
                     koff, scale, out, Hq, sc, ldsc, qs, ob, mx, sum);                                          \
        else                                                                                                    \
            att_task(16, 1, t, pos0[i], q, q_stride, kbase, vbase, ksbase, vsbase, tab, bs, block_stride, tok,  \
                     koff, scale, out, Hq, sc, ldsc, qs, ob, mx, sum);                                          \
    } while (0)
        if (per == 1) { /* decodes only: tasks of similar size */
#pragma omp for schedule(static)
            for (int64_t i = 0; i < ntasks; i++) ATT_RUN(i);
        } else { /* heaviest (last) tiles first: they see the most keys */
#pragma omp for schedule(dynamic, 1)
            for (int64_t i = ntasks - 1; i >= 0; i--) ATT_RUN(i);
        }
#undef ATT_RUN
        free(sc);
    }
    free(pos0);
    free(tasks);
}

/* One query per sequence over its ctx[s] cached keys (all visible): qk_attn_paged with one row
 * per sequence, the same arithmetic as a prefill row at that position. */
void qk_attn_decode(const float *q, int64_t q_stride, const void *kbase, const void *vbase, const float *ksbase,
                    const float *vsbase, const int64_t *tables, int64_t tstride, const int64_t *ctx,
                    int64_t block_stride, int64_t bs, float *out, int64_t S, int64_t Hq, int64_t Hkv, int64_t D,
                    float scale) {
    qk_attn_paged(q, q_stride, kbase, vbase, ksbase, vsbase, tables, tstride, ctx, NULL, block_stride, bs, out, S,
                  Hq, Hkv, D, scale);
}
