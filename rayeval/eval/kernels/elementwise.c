/* The MLP's activation product for the HF engine on a CPU with AVX512-BF16: the kernel behind
   rayeval.eval.fused's act_mul, compiled once per host into ~/.cache/rayeval/kernels/ and loaded
   with ctypes.  out = act(g) * u over bf16 vectors, computed in fp32 and rounded once to bf16
   (as the compiled kernel it replaces); act: SiLU, x * sigmoid(x), or the tanh GELU in its
   sigmoid form, x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3)).  Threads: OpenMP, the runtime
   PyTorch loaded. */
#include "avx512.h"

/* 1 / (1 + exp(-z)); z clamped at -80 (exp(80) stays finite), where the result is 0 to fp32 */
static inline __m512 sigmoid512(__m512 z) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_max_ps(z, _mm512_set1_ps(-80.f))));
    const __m512 d = _mm512_add_ps(e, _mm512_set1_ps(1.f));
    const __m512 r = _mm512_rcp14_ps(d);                                   /* 2^-14, then one Newton step */
    return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.f)));
}

/* out[i] = act(g[i]) * u[i], i < n; act 0: SiLU, 1: tanh GELU.  Returns 0, or -1 for another act. */
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
        const __m256bh h = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_mul_ps(x, sigmoid512(z)), y));
        _mm256_mask_storeu_epi16(out + i, m, (__m256i)h);
    }
    return 0;
}
