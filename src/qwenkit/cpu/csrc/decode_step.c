/* The decoder layers of one decode step in one C call (CPU inference, quantized linears).
 *
 * A decode step of the 0.5B runs 24 layers x ~12 ops; called one by one from Python each op
 * costs its module call, dispatch, allocation and ctypes crossing (about a quarter of the
 * step: docs/benchmarks.md). Here the same kernels run back to back from C, in the same order and
 * with the same roundings as the per-op path (qwenkit.model + qwenkit.cpu.ops + the quantized
 * linears' small-M kernels), so the hidden states come out bit-identical:
 *
 *   per layer:  xn = rms_norm(h, ln1);  qkv = xn @ Wqkv^T + b;  rope(q, k);  write k, v to the
 *               cache slots;  o = decode_attention(q, cache);  h = h + o @ Wo^T;
 *               xn = rms_norm(h, ln2);  gu = xn @ Wgu^T;  a = silu(g) * u;  h = h + a @ Wd^T
 *   then:       out = rms_norm(h, norm)
 *
 * Linears are int8 per channel (qk_gemm_q8) or int4 group-wise (qk_gemm_q4), each layer's own
 * format; activations are quantized once per linear, by that kernel's own quantizer
 * (qk_quant_act_q8 / qk_quant_act_q4). One query per sequence,
 * every cached key visible; the KV cache is addressed through block tables (a contiguous cache
 * is one block per sequence), new keys go to `slots` (block * bs + offset). An int8 cache
 * (k_scale / v_scale given) stores each new key / value head as int8 codes + one fp32 scale,
 * rounded exactly as qwenkit.engine.kv_cache.quantize_kv, and attention reads the codes in place.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

void qk_rms_norm(const float *x, const float *w, float *y, int64_t M, int64_t H, float eps);
void qk_silu_mul(const float *gu, float *y, int64_t M, int64_t I);
void qk_rope(float *x, int64_t T, int64_t stride, int64_t H, int64_t D, const float *cos, const float *sin);
void qk_attn_decode(const float *q, int64_t q_stride, const void *kbase, const void *vbase, const float *ksbase,
                    const float *vsbase, const int64_t *tables, int64_t tstride, const int64_t *ctx,
                    int64_t block_stride, int64_t bs, float *out, int64_t S, int64_t Hq, int64_t Hkv, int64_t D,
                    float scale);
void qk_quant_act_q8(const float *x, int8_t *xq, float *dx, float *xs, int64_t M, int64_t K);
void qk_quant_act_q4(const float *x, int8_t *xq, float *dx, float *xs, int64_t M, int64_t K);
void qk_gemm_q8(const int8_t *xq, const float *dx, const float *xs, const int8_t *q, const float *s, const float *bias,
                float *y, int64_t M, int64_t N, int64_t K);
void qk_gemm_q4(const int8_t *xq, const float *dx, const float *xs, const uint8_t *codes, const uint16_t *sc,
                const uint16_t *z, const float *bias, float *y, int64_t M, int64_t N, int64_t K, int64_t group_size);

/* Field order and types match qwenkit/cpu/decode_step.py (ctypes.Structure). */
typedef struct {
    int64_t kind; /* 1 = int8 per channel, 2 = int4 group-wise */
    int64_t N, K, group_size;
    const void *w;         /* int8 (N, K) | int4 codes (N, K/2) */
    const float *s;        /* int8: fp32 scales (N,) */
    const uint16_t *sc, *z; /* int4: bf16 scales / zeros (N, K/group_size) */
    const float *bias;     /* (N,) or NULL */
} qk_linear;

typedef struct {
    const float *ln1, *ln2;
    qk_linear qkv, o, gate_up, down;
} qk_layer;

typedef struct {
    int64_t n_layers, H, Hq, Hkv, D, I;
    float eps, scale;
    const qk_layer *layers;
    const float *norm; /* final RMSNorm weight */
} qk_model;

#define QB 32

/* x (M, K) -> y (M, N) through the layer's quantized kernel; qs: activation scratch. */
static void linear(const qk_linear *l, const float *x, float *y, int64_t M, float *qs) {
    const int64_t nb = M * (l->K / QB);
    float *dx = qs, *xs = qs + nb;
    int8_t *xq = (int8_t *)(qs + 2 * nb);
    if (l->kind == 1) {
        qk_quant_act_q8(x, xq, dx, xs, M, l->K);
        qk_gemm_q8(xq, dx, xs, (const int8_t *)l->w, l->s, l->bias, y, M, l->N, l->K);
    } else {
        qk_quant_act_q4(x, xq, dx, xs, M, l->K);
        qk_gemm_q4(xq, dx, xs, (const uint8_t *)l->w, l->sc, l->z, l->bias, y, M, l->N, l->K, l->group_size);
    }
}

/* x (n heads of D) -> int8 codes + one scale per head: scale = absmax / 127 (1 when absmax is 0),
 * code = round-half-even(x / scale) (nearbyintf in the default rounding mode), as torch.round. */
static void quant_heads(const float *x, int8_t *codes, float *scales, int64_t n, int64_t D) {
    for (int64_t h = 0; h < n; h++) {
        const float *xh = x + h * D;
        float amax = 0.0f;
        for (int64_t d = 0; d < D; d++) amax = fmaxf(amax, fabsf(xh[d]));
        float s = amax / 127.0f;
        if (!(s > 0.0f)) s = 1.0f;
        for (int64_t d = 0; d < D; d++) {
            float c = nearbyintf(xh[d] / s);
            codes[h * D + d] = (int8_t)(c > 127.0f ? 127.0f : (c < -127.0f ? -127.0f : c));
        }
        scales[h] = s;
    }
}

static void add_(float *h, const float *t, int64_t n) {
    for (int64_t i = 0; i < n; i++) h[i] = h[i] + t[i];
}

/* Floats of scratch the step needs for M rows (the caller allocates it). */
int64_t qk_decode_scratch_floats(const qk_model *m, int64_t M) {
    const int64_t W = (m->Hq + 2 * m->Hkv) * m->D;
    int64_t kmax = m->H > m->I ? m->H : m->I;
    if (m->Hq * m->D > kmax) kmax = m->Hq * m->D;
    /* xn | qkv | attn | gu | act | tmp | activation quantization (2 floats per 32 + codes) */
    return M * (m->H + W + m->Hq * m->D + 2 * m->I + m->I + m->H) + M * (2 * (kmax / QB) + kmax / 4 + 1) + 64;
}

/* h (M, H): the residual stream in, the final-normed hidden states out (in place).
 * cos / sin (M, D): each row's rotary row. k_cache / v_cache: per layer, the base of that
 * layer's pool (blocks, bs, Hkv, D), fp32, or int8 when k_scale / v_scale (per layer, the base
 * of its (blocks, bs, Hkv) fp32 scales) are not NULL. slots (M,): where each row's new key goes.
 * tables (M, tstride), ctx (M,): block tables and context lengths (new key included). */
void qk_decode_layers(const qk_model *m, float *h, int64_t M, const float *cos, const float *sin,
                      void *const *k_cache, void *const *v_cache, float *const *k_scale, float *const *v_scale,
                      const int64_t *slots, const int64_t *tables, int64_t tstride, const int64_t *ctx, int64_t bs,
                      float *scratch) {
    const int64_t H = m->H, D = m->D, Hq = m->Hq, Hkv = m->Hkv, I = m->I;
    const int64_t W = (Hq + 2 * Hkv) * D, tok = Hkv * D, block_stride = bs * tok;
    float *xn = scratch, *qkv = xn + M * H, *attn = qkv + M * W, *gu = attn + M * Hq * D;
    float *act = gu + M * 2 * I, *tmp = act + M * I, *qs = tmp + M * H;
    for (int64_t li = 0; li < m->n_layers; li++) {
        const qk_layer *L = m->layers + li;
        qk_rms_norm(h, L->ln1, xn, M, H, m->eps);
        linear(&L->qkv, xn, qkv, M, qs);
        qk_rope(qkv, M, W, Hq + Hkv, D, cos, sin);
        const float *ks = k_scale ? k_scale[li] : NULL, *vs = v_scale ? v_scale[li] : NULL;
        for (int64_t r = 0; r < M; r++) {
            const float *kr = qkv + r * W + Hq * D, *vr = qkv + r * W + (Hq + Hkv) * D;
            if (ks) {
                quant_heads(kr, (int8_t *)k_cache[li] + slots[r] * tok, k_scale[li] + slots[r] * Hkv, Hkv, D);
                quant_heads(vr, (int8_t *)v_cache[li] + slots[r] * tok, v_scale[li] + slots[r] * Hkv, Hkv, D);
            } else {
                memcpy((float *)k_cache[li] + slots[r] * tok, kr, (size_t)tok * sizeof(float));
                memcpy((float *)v_cache[li] + slots[r] * tok, vr, (size_t)tok * sizeof(float));
            }
        }
        qk_attn_decode(qkv, W, k_cache[li], v_cache[li], ks, vs, tables, tstride, ctx, block_stride, bs, attn, M, Hq,
                       Hkv, D, m->scale);
        linear(&L->o, attn, tmp, M, qs);
        add_(h, tmp, M * H);
        qk_rms_norm(h, L->ln2, xn, M, H, m->eps);
        linear(&L->gate_up, xn, gu, M, qs);
        qk_silu_mul(gu, act, M, I);
        linear(&L->down, act, tmp, M, qs);
        add_(h, tmp, M * H);
    }
    qk_rms_norm(h, m->norm, xn, M, H, m->eps);
    memcpy(h, xn, (size_t)(M * H) * sizeof(float));
}
