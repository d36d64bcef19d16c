/* int8 weight-only GEMV / small-M GEMM with fp32 activations, AVX2 + FMA, OpenMP over rows.
 *
 *   y[m, n] = s[n] * sum_k x[m, k] * q[n, k] (+ bias[n])
 *   x (M, K), y (M, N) fp32 row-major; q int8 (N, K); s, bias fp32 (N).
 *
 * Activations stay fp32 (no bf16 rounding); the weights are converted in registers. Rows are
 * split across OpenMP threads (the libgomp that torch already loaded). Built at first use by
 * qwenkit/cpu/build.py.
 */
#include "qk_simd.h"
#include <stdint.h>

#define MB 4 /* activation rows per pass over a weight row */

static inline __m256 i8_to_ps(__m128i v8) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v8)); }

void qk_gemm_int8(const float *x, const int8_t *q, const float *s, const float *bias, float *y,
                  int64_t M, int64_t N, int64_t K) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *row = q + n * K;
        for (int64_t m0 = 0; m0 < M; m0 += MB) {
            int64_t mb = M - m0 < MB ? M - m0 : MB;
            __m256 acc[MB];
            for (int i = 0; i < MB; i++) acc[i] = _mm256_setzero_ps();
            int64_t k = 0;
            for (; k + 32 <= K; k += 32) {
                __m256i w = _mm256_loadu_si256((const __m256i *)(row + k));
                __m128i w0 = _mm256_castsi256_si128(w), w1 = _mm256_extracti128_si256(w, 1);
                __m256 f0 = i8_to_ps(w0), f1 = i8_to_ps(_mm_srli_si128(w0, 8));
                __m256 f2 = i8_to_ps(w1), f3 = i8_to_ps(_mm_srli_si128(w1, 8));
                for (int i = 0; i < mb; i++) {
                    const float *xr = x + (m0 + i) * K + k;
                    __m256 a = acc[i];
                    a = _mm256_fmadd_ps(f0, _mm256_loadu_ps(xr), a);
                    a = _mm256_fmadd_ps(f1, _mm256_loadu_ps(xr + 8), a);
                    a = _mm256_fmadd_ps(f2, _mm256_loadu_ps(xr + 16), a);
                    a = _mm256_fmadd_ps(f3, _mm256_loadu_ps(xr + 24), a);
                    acc[i] = a;
                }
            }
            for (int i = 0; i < mb; i++) {
                float t = hsum_ps(acc[i]);
                const float *xr = x + (m0 + i) * K;
                for (int64_t kk = k; kk < K; kk++) t += (float)row[kk] * xr[kk];
                t *= s[n];
                y[(m0 + i) * N + n] = bias ? t + bias[n] : t;
            }
        }
    }
}
