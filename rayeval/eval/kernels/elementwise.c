/* Elementwise kernels of the HF engine's decoder layers on a CPU with AVX512-BF16, behind
   rayeval.eval.fused: compiled once per host into ~/.cache/rayeval/kernels/ and loaded
   with ctypes.  Computed in fp32, rounded to bf16 where eager PyTorch rounds (bf(x) below):
     rayeval_act_mul   the MLP's act(g) * u; act: SiLU, x * sigmoid(x), or the tanh GELU in its
                       sigmoid form, x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3))
     rayeval_rms       RMSNorm, alone or with the decoder layer's residual add beside it
     rayeval_rotary    the rotary embedding of one packed sequence
   Threads: OpenMP, the runtime PyTorch loaded. */
#include "avx512.h"

static inline __m512 round_bf16(__m512 x) {     /* x rounded to bf16 (nearest even), as an fp32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x)), 16));
}

/* 1 / (1 + exp(-z)); z clamped at -80 (exp(80) stays finite), where the result is 0 to fp32 */
static inline __m512 sigmoid512(__m512 z) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_max_ps(z, _mm512_set1_ps(-80.f))));
    const __m512 d = _mm512_add_ps(e, _mm512_set1_ps(1.f));
    const __m512 r = _mm512_rcp14_ps(d);                                   /* 2^-14, then one Newton step */
    return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.f)));
}

/* out[i] = bf(bf(act(g[i])) * u[i]) (eager PyTorch's roundings), i < n; act 0: SiLU, 1: tanh GELU.
   Returns 0, or -1 for another act. */
int rayeval_act_mul(const uint16_t* g, const uint16_t* u, uint16_t* out, int64_t n, int act, int nthreads) {
    if (act != 0 && act != 1) return -1;
    const int64_t chunks = (n + 15) / 16;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t i = c * 16;
        const __mmask16 m = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        const __m512 x = bf16x16(g + i, m), y = bf16x16(u + i, m);
        __m512 z = x;
        if (act == 1) {
            const __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
            z = _mm512_mul_ps(_mm512_set1_ps(1.5957691216057308f), _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), x3, x));
        }
        const __m256bh h = _mm512_cvtneps_pbh(_mm512_mul_ps(round_bf16(_mm512_mul_ps(x, sigmoid512(z))), y));
        _mm256_mask_storeu_epi16(out + i, m, (__m256i)h);
    }
    return 0;
}

/* RMSNorm and the decoder layers' residual adds beside it, over rows of D (D % 16 == 0, D <= 8192),
   with eager PyTorch's roundings to bf16 (n(x) = x * rsqrt(mean(x^2) + eps) in fp32):
     mode 0  Llama norm              y = bf(w1 * bf(n(x)))
     mode 1  Gemma norm              y = bf(n(x) * (1 + w1))
     mode 2  Llama add + norm        h = bf(r + x);                y = mode 0 of h
     mode 3  Gemma norm + add + norm h = bf(r + mode 1 of x, w1);  y = mode 1 of h with w2
     mode 4  Gemma norm + add        h = bf(r + mode 1 of x, w1)
   Row i = a * B + b of x starts at x + a * sa + b * sb (modes 0, 1: any two-level row layout, as
   a [1, H, T, D] view of token-major projections; modes 2-4: contiguous); r, h, y contiguous
   [A * B, D].  Returns 0, or -1 for a mode or size it does not take. */
static inline float inv_rms(const float* v, int64_t D, float eps) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
        const __m512 x = _mm512_loadu_ps(v + d);
        acc = _mm512_fmadd_ps(x, x, acc);
    }
    return 1.0f / __builtin_sqrtf(_mm512_reduce_add_ps(acc) / (float)D + eps);
}

/* dst <- bf16(norm of src) by `mode` (0: Llama with w, 1: Gemma with w), as fp32 in dst */
static inline void norm_row(const float* src, float* dst, const uint16_t* w, int64_t D, float eps, int gemma) {
    const __m512 s = _mm512_set1_ps(inv_rms(src, D, eps)), one = _mm512_set1_ps(1.f);
    for (int64_t d = 0; d < D; d += 16) {
        const __m512 n = _mm512_mul_ps(_mm512_loadu_ps(src + d), s), wd = bf16x16(w + d, 0xFFFF);
        _mm512_storeu_ps(dst + d, round_bf16(gemma ? _mm512_mul_ps(n, _mm512_add_ps(one, wd))
                                                   : _mm512_mul_ps(wd, round_bf16(n))));
    }
}

int rayeval_rms(const uint16_t* x, int64_t A, int64_t B, int64_t sa, int64_t sb, const uint16_t* r,
                const uint16_t* w1, const uint16_t* w2, uint16_t* h, uint16_t* y, int64_t D, float eps, int mode,
                int nthreads) {
    if (mode < 0 || mode > 4 || D % 16 || D > 8192) return -1;
    const int64_t rows = A * B;
#pragma omp parallel num_threads(nthreads)
    {
        float a[8192], b[8192];
#pragma omp for schedule(static)
        for (int64_t i = 0; i < rows; i++) {
            const uint16_t* xr = x + (i / B) * sa + (i % B) * sb;
            for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(a + d, bf16x16(xr + d, 0xFFFF));
            if (mode == 0 || mode == 1) {
                norm_row(a, b, w1, D, eps, mode);
            } else {
                const uint16_t* rr = r + i * D;
                if (mode == 2) {
                    for (int64_t d = 0; d < D; d += 16)
                        _mm512_storeu_ps(b + d, round_bf16(_mm512_add_ps(bf16x16(rr + d, 0xFFFF), _mm512_loadu_ps(a + d))));
                } else {
                    norm_row(a, b, w1, D, eps, 1);
                    for (int64_t d = 0; d < D; d += 16)
                        _mm512_storeu_ps(b + d, round_bf16(_mm512_add_ps(bf16x16(rr + d, 0xFFFF), _mm512_loadu_ps(b + d))));
                }
                for (int64_t d = 0; d < D; d += 16)    /* h: exact in bf16 already */
                    _mm256_storeu_si256((__m256i*)(h + i * D + d), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(b + d)));
                if (mode == 4) continue;
                norm_row(b, a, mode == 2 ? w1 : w2, D, eps, mode == 3);
                for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(b + d, _mm512_loadu_ps(a + d));
            }
            for (int64_t d = 0; d < D; d += 16)
                _mm256_storeu_si256((__m256i*)(y + i * D + d), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(b + d)));
        }
    }
    return 0;
}

/* transformers' apply_rotary_pos_emb on one packed sequence, eager PyTorch's roundings:
   out = bf(bf(x * cos) + bf(rotate_half(x) * sin)), rotate_half(x) = [-x2, x1] on halves of D.
   x: H heads x T tokens, head h token t at x + h * sh + t * st (D contiguous, D % 32 == 0);
   out: the same layout; cos / sin: [T, D] contiguous.  Returns 0, or -1 for a size it does not take. */
int rayeval_rotary(const uint16_t* x, uint16_t* out, int64_t H, int64_t T, int64_t sh, int64_t st,
                   const uint16_t* cs, const uint16_t* sn, int64_t D, int nthreads) {
    if (D % 32) return -1;
    const int64_t half = D / 2;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < H * T; i++) {
        const int64_t hd = i / T, t = i % T, off = hd * sh + t * st;
        const uint16_t *xr = x + off, *c = cs + t * D, *s = sn + t * D;
        uint16_t* o = out + off;
        for (int64_t d = 0; d < half; d += 16) {
            const __m512 a = bf16x16(xr + d, 0xFFFF), b = bf16x16(xr + half + d, 0xFFFF);
            const __m512 lo = _mm512_add_ps(round_bf16(_mm512_mul_ps(a, bf16x16(c + d, 0xFFFF))),
                                            round_bf16(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), b), bf16x16(s + d, 0xFFFF))));
            const __m512 hi = _mm512_add_ps(round_bf16(_mm512_mul_ps(b, bf16x16(c + half + d, 0xFFFF))),
                                            round_bf16(_mm512_mul_ps(a, bf16x16(s + half + d, 0xFFFF))));
            _mm256_storeu_si256((__m256i*)(o + d), (__m256i)_mm512_cvtneps_pbh(lo));
            _mm256_storeu_si256((__m256i*)(o + half + d), (__m256i)_mm512_cvtneps_pbh(hi));
        }
    }
    return 0;
}
