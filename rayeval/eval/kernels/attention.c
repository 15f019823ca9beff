/* Attention of packed rows for the HF engine on a CPU with AMX (bf16 tiles): the kernel behind
   rayeval.eval.cpu_attention, compiled once per host into ~/.cache/rayeval/kernels/ and loaded
   with ctypes.  One call computes one attention group of a packed pass: it gathers the group's
   queries, its rows' parent keys/values (from the engine's KV store) and own keys/values (from
   the pass) by index, so no padded copy of them is made in PyTorch; the products run on AMX tiles
   (bf16 in, fp32 accumulate), the masked softmax in fp32 with AVX-512, as SDPA's CPU kernel does.
   Threads: OpenMP, the runtime PyTorch loaded (one pool, torch.get_num_threads() wide). */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>

typedef struct { uint8_t palette_id, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } tilecfg;

int rayeval_amx_init(void) { return (int)syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */); }

static inline __m512 exp512(__m512 x) {
    __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
    __mmask16 live = _mm512_cmp_ps_mask(t, _mm512_set1_ps(-126.f), _CMP_GE_OQ);
    t = _mm512_max_ps(t, _mm512_set1_ps(-126.f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(1.525273380405984e-05f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530393381606e-04f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-03f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129107628477e-03f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866482158e-02f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402265069591007e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471805599453e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));
}

static inline __m512 bf16x16(const uint16_t* p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

static inline void store_bf16x16(uint16_t* p, __m512 x) {
    __m256bh h = _mm512_cvtneps_pbh(x);
    _mm256_storeu_si256((__m256i*)p, (__m256i)h);
}

/* c[16, 0:32] (fp32, row stride ldc bytes) = a[16, 32 * steps] x b: a bf16 row-major (row stride
   lda bytes), b in AMX's pair layout, each step of 32 a-columns 16 pair rows further (b_step
   elements); the second 16 columns of c 32 elements along b's row. */
static inline void tile_pair(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, int64_t b_step,
                             int64_t steps, float* c, int64_t ldc) {
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t k = 0; k < steps; k++) {
        _tile_loadd(2, a + k * 32, lda);
        _tile_loadd(3, b + k * b_step, ldb);
        _tile_loadd(4, b + k * b_step + 32, ldb);
        _tile_dpbf16ps(0, 2, 3);
        _tile_dpbf16ps(1, 2, 4);
    }
    _tile_stored(0, c, ldc);
    _tile_stored(1, c + 16, ldc);
}

/* One group of packed rows, every kv head: R rows x hkv heads ("b" = r * hkv + h).
   Query (b, l), l < L, is row take[b*L + l] of qrows [*, D]; its output goes to row put[b*L + l]
   of out [*, D].  Keys/values of row r: its parent path (pmax slots pidx[r*pmax + s] of the store
   sk/sv [slots, hkv, D]), then its own qm tokens (rows qidx[r*qm + j] of k0/v0, token stride
   kst/vst, head stride ksh/vsh).  bias [R, L, pmax + qm] bf16 additive (0 / -inf); every query
   row sees at least one key.  Scores and softmax in fp32, probabilities rounded to bf16 for the
   second product (as SDPA's CPU kernel). */
int rayeval_amx_attention(const uint16_t* qrows, const int64_t* take, uint16_t* out, const int64_t* put,
                          const uint16_t* k0, const uint16_t* v0, int64_t kst, int64_t ksh, int64_t vst, int64_t vsh,
                          const uint16_t* sk, const uint16_t* sv, const int64_t* qidx, const int64_t* pidx,
                          const uint16_t* bias, int64_t R, int64_t hkv, int64_t L, int64_t qm, int64_t pmax,
                          int64_t D, float scale, int nthreads) {
    if (D % 32 || D > 256) return -1;
    const int64_t S = pmax + qm, Sp = (S + 31) / 32 * 32, B = R * hkv;
    int bad = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : bad)
    {
        uint16_t* kp = aligned_alloc(64, (size_t)D * Sp * 2);      /* [D/2][Sp][2] */
        uint16_t* vp = aligned_alloc(64, (size_t)D * Sp * 2);      /* [Sp/2][D][2] */
        float* sbuf = aligned_alloc(64, (size_t)16 * Sp * 4);
        uint16_t* pbuf = aligned_alloc(64, (size_t)16 * Sp * 2);
        uint16_t qbuf[16 * 256] __attribute__((aligned(64)));
        float obuf[16 * 256] __attribute__((aligned(64)));
        float inv[16];
        if (!kp || !vp || !sbuf || !pbuf) bad = 1;
        tilecfg cfg = {0};
        cfg.palette_id = 1;
        for (int t = 0; t < 8; t++) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
        if (!bad) _tile_loadconfig(&cfg);
        const __m512 vscale = _mm512_set1_ps(scale), ninf = _mm512_set1_ps(-__builtin_inff());
        const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                            39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
        const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++) {
            if (bad) continue;
            const int64_t r = b / hkv, h = b % hkv;
            /* keys, pairs of the head dimension interleaved: kp32[dp][s] = word dp of key s */
            uint32_t* kp32 = (uint32_t*)kp;
            for (int64_t s = 0; s < Sp; s += 2) {
                const uint16_t* a; const uint16_t* c;
                const uint16_t* ka; const uint16_t* kc;
                if (s < pmax) { a = sv + (pidx[r * pmax + s] * hkv + h) * D; ka = sk + (pidx[r * pmax + s] * hkv + h) * D; }
                else if (s < S) { a = v0 + qidx[r * qm + s - pmax] * vst + h * vsh; ka = k0 + qidx[r * qm + s - pmax] * kst + h * ksh; }
                else { a = NULL; ka = NULL; }
                if (s + 1 < pmax) { c = sv + (pidx[r * pmax + s + 1] * hkv + h) * D; kc = sk + (pidx[r * pmax + s + 1] * hkv + h) * D; }
                else if (s + 1 < S) { c = v0 + qidx[r * qm + s + 1 - pmax] * vst + h * vsh; kc = k0 + qidx[r * qm + s + 1 - pmax] * kst + h * ksh; }
                else { c = NULL; kc = NULL; }
                for (int64_t dp = 0; dp < D / 2; dp++) {
                    kp32[dp * Sp + s] = ka ? ((const uint32_t*)ka)[dp] : 0;
                    kp32[dp * Sp + s + 1] = kc ? ((const uint32_t*)kc)[dp] : 0;
                }
                for (int64_t d = 0; d < D; d += 32) {
                    __m512i x = a ? _mm512_loadu_si512(a + d) : _mm512_setzero_si512();
                    __m512i y = c ? _mm512_loadu_si512(c + d) : _mm512_setzero_si512();
                    _mm512_store_si512(vp + (s / 2) * 2 * D + 2 * d, _mm512_permutex2var_epi16(x, lo, y));
                    _mm512_store_si512(vp + (s / 2) * 2 * D + 2 * d + 32, _mm512_permutex2var_epi16(x, hi, y));
                }
            }
            for (int64_t lb = 0; lb < L; lb += 16) {
                const int64_t rows = L - lb < 16 ? L - lb : 16;
                for (int64_t i = 0; i < 16; i++) {
                    if (i < rows) memcpy(qbuf + i * D, qrows + take[b * L + lb + i] * D, D * 2);
                    else memset(qbuf + i * D, 0, D * 2);
                }
                for (int64_t n = 0; n < Sp; n += 32)   /* scores: q [16, D] x keys */
                    tile_pair(qbuf, D * 2, kp + n * 2, Sp * 4, 16 * Sp * 2, D / 32, sbuf + n, Sp * 4);
                for (int64_t i = 0; i < 16; i++) {
                    float* srow = sbuf + i * Sp;
                    uint16_t* prow = pbuf + i * Sp;
                    if (i >= rows) { memset(prow, 0, Sp * 2); continue; }
                    const uint16_t* brow = bias + (r * L + lb + i) * S;
                    __m512 vmax = ninf;
                    for (int64_t s = 0; s < Sp; s += 16) {
                        const __mmask16 m = S - s >= 16 ? 0xFFFF : S - s <= 0 ? 0 : (__mmask16)((1u << (S - s)) - 1);
                        __m512 x = _mm512_mask_mov_ps(ninf, m, _mm512_fmadd_ps(_mm512_load_ps(srow + s), vscale, bf16x16(brow + s, m)));
                        _mm512_store_ps(srow + s, x);
                        vmax = _mm512_max_ps(vmax, x);
                    }
                    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
                    __m512 vsum = _mm512_setzero_ps();
                    for (int64_t s = 0; s < Sp; s += 16) {
                        __m512 e = exp512(_mm512_sub_ps(_mm512_load_ps(srow + s), mx));
                        vsum = _mm512_add_ps(vsum, e);
                        store_bf16x16(prow + s, e);
                    }
                    inv[i] = 1.0f / _mm512_reduce_add_ps(vsum);
                }
                for (int64_t nd = 0; nd < D; nd += 32)  /* outputs: p [16, Sp] x values */
                    tile_pair(pbuf, Sp * 2, vp + nd * 2, D * 4, 16 * D * 2, Sp / 32, obuf + nd, D * 4);
                for (int64_t i = 0; i < rows; i++) {
                    const __m512 w = _mm512_set1_ps(inv[i]);
                    uint16_t* orow = out + put[b * L + lb + i] * D;
                    for (int64_t d = 0; d < D; d += 16)
                        store_bf16x16(orow + d, _mm512_mul_ps(_mm512_load_ps(obuf + i * D + d), w));
                }
            }
        }
        if (!bad) _tile_release();
        free(kp); free(vp); free(sbuf); free(pbuf);
    }
    return bad ? -2 : 0;
}
