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
 *   qk_attn_decode: one query per sequence over its cached keys (all visible), GQA, keys found
 *                  through a block table (the engine's paged cache; a contiguous cache is one
 *                  block per sequence).
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

/* One (sequence, query head) task of qk_attn_decode with ND = D / 8 a compile-time constant (so
 * the query and the output accumulators live in registers). Keys are walked block by block. */
#define ALWAYS_INLINE static inline __attribute__((always_inline))
ALWAYS_INLINE void attn_task(const int ND, const float *qh, const float *kbase, const float *vbase,
                             const int64_t *tab, int64_t L, int64_t bs, int64_t block_stride, int64_t tok,
                             int64_t koff, float scale, float *sc, float *oh) {
    __m256 qv[ND], o[ND];
    for (int d = 0; d < ND; d++) qv[d] = _mm256_mul_ps(_mm256_loadu_ps(qh + 8 * d), _mm256_set1_ps(scale));
    float mx = -INFINITY;
    for (int64_t j0 = 0; j0 < L; j0 += bs) {
        const int64_t n = L - j0 < bs ? L - j0 : bs;
        const float *kb = kbase + tab[j0 / bs] * block_stride + koff;
        for (int64_t j = 0; j < n; j++) {
            const float *kj = kb + j * tok;
            __m256 acc = _mm256_mul_ps(qv[0], _mm256_loadu_ps(kj));
            for (int d = 1; d < ND; d++) acc = _mm256_fmadd_ps(qv[d], _mm256_loadu_ps(kj + 8 * d), acc);
            const float v = hsum_ps(acc);
            sc[j0 + j] = v;
            mx = v > mx ? v : mx;
        }
    }
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
    for (int d = 0; d < ND; d++) o[d] = _mm256_setzero_ps();
    for (int64_t j0 = 0; j0 < L; j0 += bs) {
        const int64_t n = L - j0 < bs ? L - j0 : bs;
        const float *vb = vbase + tab[j0 / bs] * block_stride + koff;
        for (int64_t jj = 0; jj < n; jj++) {
            const float *vj = vb + jj * tok;
            const __m256 p = _mm256_set1_ps(sc[j0 + jj]);
            for (int d = 0; d < ND; d++) o[d] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vj + 8 * d), o[d]);
        }
    }
    const __m256 inv = _mm256_set1_ps(1.0f / sum);
    for (int d = 0; d < ND; d++) _mm256_storeu_ps(oh + 8 * d, _mm256_mul_ps(o[d], inv));
}

/* q: S sequences, row s at q + s*q_stride, Hq heads of D. Keys/values of sequence s, position j:
 * base + tables[s*tstride + j/bs]*block_stride + (j%bs)*Hkv*D + kv_head*D, j < ctx[s].
 * out (S, Hq, D). One task per (sequence, query head); D in {64, 128} (the callers check). */
void qk_attn_decode(const float *q, int64_t q_stride, const float *kbase, const float *vbase,
                    const int64_t *tables, int64_t tstride, const int64_t *ctx, int64_t block_stride,
                    int64_t bs, float *out, int64_t S, int64_t Hq, int64_t Hkv, int64_t D, float scale) {
    const int64_t group = Hq / Hkv, tok = Hkv * D;
    int64_t maxL = 1;
    for (int64_t s = 0; s < S; s++) maxL = ctx[s] > maxL ? ctx[s] : maxL;
#pragma omp parallel if (S * Hq > 1)
    {
        float *sc = (float *)malloc((size_t)maxL * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t task = 0; task < S * Hq; task++) {
            const int64_t s = task / Hq, h = task % Hq;
            const float *qh = q + s * q_stride + h * D;
            float *oh = out + (s * Hq + h) * D;
            const int64_t *tab = tables + s * tstride;
            if (D == 64)
                attn_task(8, qh, kbase, vbase, tab, ctx[s], bs, block_stride, tok, (h / group) * D, scale, sc, oh);
            else
                attn_task(16, qh, kbase, vbase, tab, ctx[s], bs, block_stride, tok, (h / group) * D, scale, sc, oh);
        }
        free(sc);
    }
}
