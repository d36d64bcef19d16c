/* Weight-only int8 / int4 GEMM with int8 activations, AVX2 or AVX512-VNNI, OpenMP over rows.
 *
 * Decode reads every weight once per token, so the kernel must stream the weights at memory
 * speed with as few instructions per byte as possible; batched decode and prefill are bound by
 * the integer dot products. Widening weights to fp32 (gemv_avx2.c) costs ~19 instructions per
 * 32 weights; here the activations are quantized once per call (one fp32 scale per block, as
 * llama.cpp's Q8 activations) and the weights stay int8 / int4 through integer dot products.
 * An unpacked weight vector is reused for every activation row of a tile.
 * Batch-invariant: a row's result does not depend on M or on the row's place in the batch
 * (the same instructions in the same order for every row), so a request's greedy tokens do
 * not change with what else the engine is running.
 *
 *   qk_quant_act_q8: x (M, K) fp32 -> xq (M, K) int8, |xq| <= Q8_QMAX, one fp32 scale dx per
 *                  block of QA8 columns (VNNI: 127 and 128, AVX2: 63 and 32; the last block of
 *                  a row takes the rest), dx (M, ceil(K/QA8)), xs = dx * (block sums of xq).
 *   qk_quant_act_q4: the same with blocks of 32 and |xq| <= 127: dx, xs (M, K/32).
 *   qk_gemm_q8:    y[m,n] = s[n] * sum_b dx[m,b] * <q[n, b], xq[m, b]>  (+ bias[n], both kernels,
 *                  when bias is not NULL)
 *                  q int8 (N, K) per output channel, symmetric, s fp32 (N,); q is stored in
 *                  tiles of NRW rows (qk_q8_tile_rows; the last tile takes the N % NRW rest):
 *                  a tile of r rows holds, per 32 columns, 32 bytes of each of its r rows in
 *                  turn, so the kernel reads its weights as one sequential stream (row-major
 *                  rows would be r interleaved streams, slower on cold weights; llama.cpp
 *                  repacks its Q4_0/Q8_0 the same way).
 *   qk_gemm_q4:    y[m,n] = sum_b (sc[n,g(b)] dx[m,b] <c[n,b], xq[m,b]>) + zp[n,g] * xs[m,b]
 *                  with w = (c - 8) * sc + z  (c in 0..15), zp = z - 8 sc; codes packed per
 *                  64 columns as 32 bytes: byte j = c[j] | c[j + 32] << 4; sc, z bf16 (N, G),
 *                  G = K / group_size, group_size a multiple of 32, K a multiple of 64.
 *
 * K must be a multiple of 32 (64 for int4). Built by qwenkit/cpu/build.py, with AVX512-VNNI where
 * the CPU has it (see DOT_ACC).
 */
#include "qk_simd.h"
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define QB 32 /* int4 activation / weight block; the unit of K everywhere */
#define MB 4  /* activation rows per pass over a weight row */

/* acc (8 int32) += <u8 x 32, s8 x 32>, lane j summing bytes 4j..4j+3 (ones: int16 1s).
 * AVX512-VNNI: one vpdpbusd (no intermediate rounding or saturation). AVX2: vpmaddubsw sums
 * byte pairs in int16 (saturating: the callers keep |u * s| pair sums < 2^15), vpmaddwd pairs
 * of pairs into int32, vpaddd. */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DOT_ACC(acc, u, s, ones) _mm256_dpbusd_epi32((acc), (u), (s))
#define QK_ISA 2
/* int8 activations: 8-bit codes (vpdpbusd cannot saturate), one scale per 128 columns, the
 * dot products of a block summed in int32: one vpdpbusd per 32 weights and row, the convert and
 * the FMA once per 128 (3 fp ops per 32 before: 1.7x at 16 rows, 1.35x at 64+, warm weights) */
#define Q8_QMAX 127.0f
#define QA8 128
/* int8 tile: 3 weight rows x 4 activation rows = 12 int32 + 12 fp32 accumulators (32 ymm regs) */
#define NRW 3
#else
#define DOT_ACC(acc, u, s, ones) _mm256_add_epi32((acc), _mm256_madd_epi16(_mm256_maddubs_epi16((u), (s)), (ones)))
#define QK_ISA 1
/* 7 bits: the u8 x s8 pairs of vpmaddubsw cannot saturate (2 * 255 * 63 = 32130); one scale
 * per 32 columns (7 bits over 128 would cost quality, and the sums could not stay in int32
 * for free: 16 ymm registers hold 2 x 4 fp32 accumulators and little else) */
#define Q8_QMAX 63.0f
#define QA8 32
#define NRW 2
#endif

/* Which dot product the library was built with: 1 = AVX2, 2 = AVX512-VNNI. */
int64_t qk_isa(void) { return QK_ISA; }
/* The int8 kernel's weight tile rows, activation code range and block (cgemv reads them). */
int64_t qk_q8_tile_rows(void) { return NRW; }
int64_t qk_q8_act_max(void) { return (int64_t)Q8_QMAX; }
int64_t qk_q8_act_block(void) { return QA8; }

/* Weights are prefetched this many rows ahead (both kernels): the hardware prefetcher alone
 * leaves the cold-weight stream slower (`qwenkit bench kernels`, lm_head at M=1). */
#define PREFETCH_ROWS 4

static inline void prefetch_bytes(const void *p, int64_t n) {
    for (int64_t off = 0; off < n; off += 64) _mm_prefetch((const char *)p + off, _MM_HINT_T0);
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline __m256 load_bf16x8(const uint16_t *p) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

static inline __m256 absmax32(const float *x, __m256 am) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int o = 0; o < QB; o += 8) am = _mm256_max_ps(am, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + o)));
    return am;
}

/* One block of ns * 32 values (ns = 1..4) -> codes with |q| <= qmax, scale and code-sum term. */
static void quant_block(const float *x, int8_t *q, float *d_out, float *s_out, float qmax, int ns) {
    __m256 am = _mm256_setzero_ps();
    for (int u = 0; u < ns; u++) am = absmax32(x + u * QB, am);
    float amax = hmax_ps(am);
    float d = amax / qmax;
    float id = amax > 0.0f ? qmax / amax : 0.0f;
    *d_out = d;
    const __m256 m = _mm256_set1_ps(id);
    __m256i is = _mm256_setzero_si256();
    for (int u = 0; u < ns; u++) {
        const float *xu = x + u * QB;
        /* cvtps rounds to nearest even (the default MXCSR mode) */
        __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xu), m));
        __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xu + 8), m));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xu + 16), m));
        __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xu + 24), m));
        is = _mm256_add_epi32(is, _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3)));
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(q + u * QB), p);
    }
    /* block sum of the *quantized* x (an exact integer < 2^24): the zero-point / +128 terms then
     * see the same x as the codes term, so the result is exactly dequant(W) @ dequant(xq) */
    *s_out = d * hsum_ps(_mm256_cvtepi32_ps(is));
}

/* Blocks of `blk` columns (a multiple of 32; a row's last block takes what is left). */
static void quant_act(const float *x, int8_t *xq, float *dx, float *xs, int64_t M, int64_t K, float qmax,
                      int64_t blk) {
    const int64_t nb = (K + blk - 1) / blk;
    const int64_t total = M * nb;
#pragma omp parallel for schedule(static) if (total * blk >= 131072)
    for (int64_t t = 0; t < total; t++) {
        int64_t m = t / nb, b = t % nb;
        int64_t len = K - b * blk < blk ? K - b * blk : blk;
        quant_block(x + m * K + b * blk, xq + m * K + b * blk, dx + t, xs + t, qmax, (int)(len / QB));
    }
}

/* Each kernel's own activation quantizer (the code range and block are the kernel's business). */
void qk_quant_act_q8(const float *x, int8_t *xq, float *dx, float *xs, int64_t M, int64_t K) {
    quant_act(x, xq, dx, xs, M, K, Q8_QMAX, QA8);
}

void qk_quant_act_q4(const float *x, int8_t *xq, float *dx, float *xs, int64_t M, int64_t K) {
    quant_act(x, xq, dx, xs, M, K, 127.0f, QB);
}

/* ---- int8: a tile of NR weight rows x R activation rows (NR, R compile-time constants after
 * inlining, so the accumulators live in registers).
 *
 * The weights are signed int8 (w, |w| <= 127) and the u8 x s8 dot products take unsigned bytes
 * first, so each weight vector is flipped once to unsigned, w ^ 0x80 = w + 128 (one XOR per
 * weight vector, shared by every activation row of the tile). The +128 offset adds
 * 128 * sum_k x to each dot product, one constant per activation row (128 * sum of its block
 * sums xs), subtracted in the epilogue: y = s[n] * (sum_b dx_b <w_n + 128, xq_b> - corr_m) + bias.
 * Inside an activation block the dot products add up in int32 (exact: |lane| <= 16 * 255 * 127);
 * per block one convert + one FMA by the block's scale. Each (row, weight row) pair gets the
 * same instructions in the same order whatever the tile: one int32 sum per block, one fp32
 * accumulator, then one horizontal sum (batch invariance). */
#define ALWAYS_INLINE static inline __attribute__((always_inline))
#define MC 64 /* activation rows per chunk: a chunk's codes stay in L2 while all weights pass */

/* ns sub-blocks of 32 columns starting at column c0 into the int32 sums ia.
 * pf: prefetch the weights PREFETCH_ROWS * K bytes ahead in the tile stream as they are read,
 * into L2 only (the first pass over a tile; the tiled layout makes the stream contiguous).
 * Not one burst per tile: a burst of K/64 lines queues the demand loads behind it; not into L1
 * (T0): that evicts the tile in use while it is read 4 activation rows at a time. */
ALWAYS_INLINE void q8_sub(const int NR, const int R, const int ns, const int8_t *w, const int8_t *xq, int64_t c0,
                          int64_t K, __m256i ia[NRW][MB], const int pf) {
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    const __m256i ones = _mm256_set1_epi16(1);
    (void)ones;
    for (int u = 0; u < ns; u++) {
        __m256i wu[NRW];
        if (pf)
            for (int j = 0; j < NR; j += 2)
                _mm_prefetch((const char *)(w + ((c0 / QB + u) * NR + j) * QB + PREFETCH_ROWS * K), _MM_HINT_T1);
        for (int j = 0; j < NR; j++)
            wu[j] = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(w + ((c0 / QB + u) * NR + j) * QB)), flip);
        for (int i = 0; i < R; i++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + i * K + c0 + u * QB));
            for (int j = 0; j < NR; j++) ia[j][i] = DOT_ACC(ia[j][i], wu[j], xv, ones);
        }
    }
}

ALWAYS_INLINE void q8_tile(const int NR, const int R, const int pf, const int8_t *w, const int8_t *xq, const float *dx,
                           const float *s, const float *corr, const float *bias, float *y, int64_t N, int64_t nb,
                           int64_t K) {
    __m256 acc[NRW][MB];
    __m256i ia[NRW][MB];
    for (int j = 0; j < NR; j++)
        for (int i = 0; i < R; i++) acc[j][i] = _mm256_setzero_ps();
    const int64_t nfull = K / QA8;
    for (int64_t b = 0; b < nb; b++) {
        for (int j = 0; j < NR; j++)
            for (int i = 0; i < R; i++) ia[j][i] = _mm256_setzero_si256();
        if (b < nfull)
            q8_sub(NR, R, QA8 / QB, w, xq, b * QA8, K, ia, pf);
        else
            q8_sub(NR, R, (int)((K - b * QA8) / QB), w, xq, b * QA8, K, ia, pf); /* the row's short last block */
        for (int i = 0; i < R; i++) {
            const __m256 d = _mm256_broadcast_ss(dx + i * nb + b);
            for (int j = 0; j < NR; j++) acc[j][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia[j][i]), d, acc[j][i]);
        }
    }
    for (int j = 0; j < NR; j++)
        for (int i = 0; i < R; i++)
            y[i * N + j] = s[j] * (hsum_ps(acc[j][i]) - corr[i]) + (bias ? bias[j] : 0.0f);
}

#define Q8_TILE_R(NR_)                                                                   \
    switch (mb) {                                                                        \
        case 1: q8_tile(NR_, 1, pf, Q8_ARGS); break;                                     \
        case 2: q8_tile(NR_, 2, pf, Q8_ARGS); break;                                     \
        case 3: q8_tile(NR_, 3, pf, Q8_ARGS); break;                                     \
        default: q8_tile(NR_, 4, pf, Q8_ARGS); break;                                    \
    }

void qk_gemm_q8(const int8_t *xq, const float *dx, const float *xs, const int8_t *q, const float *s,
                const float *bias, float *y, int64_t M, int64_t N, int64_t K) {
    const int64_t nb = (K + QA8 - 1) / QA8;
    const int64_t tiles = (N + NRW - 1) / NRW;
    float corr_small[MC];
    float *corr = M <= MC ? corr_small : (float *)malloc((size_t)M * sizeof(float));
    for (int64_t m = 0; m < M; m++) {
        float c = 0.0f;
        for (int64_t b = 0; b < nb; b++) c += xs[m * nb + b];
        corr[m] = 128.0f * c;
    }
    for (int64_t mc = 0; mc < M; mc += MC) {
        const int64_t mend = mc + MC < M ? mc + MC : M;
#pragma omp parallel for schedule(static)
        for (int64_t p = 0; p < tiles; p++) {
            const int64_t n = p * NRW;
            const int nr = N - n < NRW ? (int)(N - n) : NRW;
            const int8_t *w = q + n * K;
            const int ahead = mc == 0 && n + PREFETCH_ROWS + NRW <= N;
            for (int64_t m0 = mc; m0 < mend; m0 += MB) {
                const int64_t mb = mend - m0 < MB ? mend - m0 : MB;
                const int pf = ahead && m0 == mc;
#define Q8_ARGS w, xq + m0 * K, dx + m0 * nb, s + n, corr + m0, bias ? bias + n : NULL, y + m0 * N + n, N, nb, K
                if (nr == NRW) {
                    Q8_TILE_R(NRW)
                }
#if NRW > 2
                else if (nr == 2) {
                    Q8_TILE_R(2)
                }
#endif
                else {
                    Q8_TILE_R(1)
                }
#undef Q8_ARGS
            }
        }
    }
    if (corr != corr_small) free(corr);
}

ALWAYS_INLINE __m256i q4_dot(__m256i cv, const int8_t *xb, __m256i ones) {
    __m256i xv = _mm256_loadu_si256((const __m256i *)xb);
    return DOT_ACC(_mm256_setzero_si256(), cv, xv, ones); /* codes <= 15: pairs < 2^15 */
}

/* comb: R x nb combined scales sc * dx; zsum: R zero-point terms. Codes come in pairs of
 * blocks: 32 bytes hold block 2p in their low nibbles and block 2p + 1 in their high nibbles, so
 * one 256-bit load + two ANDs (+ one shift) unpack 64 codes. nb is even (K % 64 == 0). */
ALWAYS_INLINE void q4_row(const int R, const uint8_t *row, const int8_t *xq, const float *comb, const float *zsum,
                          float bias, float *y, int64_t ystride, int64_t nb, int64_t K, int64_t pfd) {
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    __m256 a0[MB], a1[MB];
    for (int i = 0; i < R; i++) a0[i] = a1[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b += 2) {
        if (pfd && !(b & 3)) _mm_prefetch((const char *)(row + b * 16 + pfd), _MM_HINT_T0);
        __m256i v = _mm256_loadu_si256((const __m256i *)(row + b * 16));
        __m256i c0 = _mm256_and_si256(v, low4), c1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
        for (int i = 0; i < R; i++) {
            const int8_t *xr = xq + i * K;
            const float *cr = comb + i * nb;
            a0[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q4_dot(c0, xr + b * QB, ones)), _mm256_broadcast_ss(cr + b), a0[i]);
            a1[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q4_dot(c1, xr + (b + 1) * QB, ones)), _mm256_broadcast_ss(cr + b + 1), a1[i]);
        }
    }
    for (int i = 0; i < R; i++) y[i * ystride] = (hsum_ps(_mm256_add_ps(a0[i], a1[i])) + zsum[i]) + bias;
}

void qk_gemm_q4(const int8_t *xq, const float *dx, const float *xs, const uint8_t *codes,
                const uint16_t *sc, const uint16_t *z, const float *bias, float *y, int64_t M, int64_t N, int64_t K,
                int64_t group_size) {
    const int64_t nb = K / QB;
    const int64_t bpg = group_size / QB; /* blocks per group */
    const int64_t G = K / group_size;
#pragma omp parallel
    {
        /* per-thread scratch: combined block scales sc*dx for MB activation rows */
        float comb[MB * 1024];
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            const uint8_t *row = codes + n * (K / 2);
            const uint16_t *scn = sc + n * G, *zn = z + n * G;
            /* codes: spread over the row's loop, PREFETCH_ROWS rows ahead (a burst of K/128 lines
             * at the row start queued the demand loads behind it: large K streamed at half speed) */
            const int64_t pfd = n + PREFETCH_ROWS < N ? PREFETCH_ROWS * (K / 2) : 0;
            if (n + PREFETCH_ROWS < N) {
                prefetch_bytes(sc + (n + PREFETCH_ROWS) * G, 2 * G);
                prefetch_bytes(z + (n + PREFETCH_ROWS) * G, 2 * G);
            }
            for (int64_t m0 = 0; m0 < M; m0 += MB) {
                const int64_t mb = M - m0 < MB ? M - m0 : MB;
                const int64_t pfd_m = m0 == 0 ? pfd : 0;
                float zsum[MB];
                for (int64_t i = 0; i < mb; i++) {
                    const float *dxr = dx + (m0 + i) * nb, *xsr = xs + (m0 + i) * nb;
                    float *c = comb + i * nb;
                    __m256 za = _mm256_setzero_ps();
                    int64_t b = 0;
                    if (bpg == 1) {
                        for (; b + 8 <= nb; b += 8) {
                            __m256 s8 = load_bf16x8(scn + b), z8 = load_bf16x8(zn + b);
                            _mm256_storeu_ps(c + b, _mm256_mul_ps(s8, _mm256_loadu_ps(dxr + b)));
                            __m256 zp = _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), s8, z8);
                            za = _mm256_fmadd_ps(zp, _mm256_loadu_ps(xsr + b), za);
                        }
                    }
                    float zt = hsum_ps(za);
                    if (bpg == 1 && b + 4 <= nb) {
                        __m128i sw = _mm_cvtepu16_epi32(_mm_loadl_epi64((const __m128i *)(scn + b)));
                        __m128i zw = _mm_cvtepu16_epi32(_mm_loadl_epi64((const __m128i *)(zn + b)));
                        __m128 s4 = _mm_castsi128_ps(_mm_slli_epi32(sw, 16)), z4 = _mm_castsi128_ps(_mm_slli_epi32(zw, 16));
                        _mm_storeu_ps(c + b, _mm_mul_ps(s4, _mm_loadu_ps(dxr + b)));
                        __m128 zp = _mm_fnmadd_ps(_mm_set1_ps(8.0f), s4, z4);
                        __m128 t = _mm_mul_ps(zp, _mm_loadu_ps(xsr + b));
                        t = _mm_add_ps(t, _mm_movehl_ps(t, t));
                        zt += _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
                        b += 4;
                    }
                    for (; b < nb; b++) {
                        float sg = bf16_to_f32(scn[b / bpg]), zg = bf16_to_f32(zn[b / bpg]);
                        c[b] = sg * dxr[b];
                        zt += (zg - 8.0f * sg) * xsr[b];
                    }
                    zsum[i] = zt;
                }
                const int8_t *x0 = xq + m0 * K;
                float *y0 = y + m0 * N + n;
                const float bn = bias ? bias[n] : 0.0f;
                switch (mb) {
                    case 1: q4_row(1, row, x0, comb, zsum, bn, y0, N, nb, K, pfd_m); break;
                    case 2: q4_row(2, row, x0, comb, zsum, bn, y0, N, nb, K, pfd_m); break;
                    case 3: q4_row(3, row, x0, comb, zsum, bn, y0, N, nb, K, pfd_m); break;
                    default: q4_row(4, row, x0, comb, zsum, bn, y0, N, nb, K, pfd_m); break;
                }
            }
        }
    }
}
