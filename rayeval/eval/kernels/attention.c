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

#include "avx512.h"

/* r[i][j] <- r[j][i], 16 x 16 32-bit words. */
static inline void transpose16(__m512i* r) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i]   = _mm512_unpacklo_epi32(r[i], r[i+1]);
        t[i+1] = _mm512_unpackhi_epi32(r[i], r[i+1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i]   = _mm512_unpacklo_epi64(t[i],   t[i+2]);
        r[i+1] = _mm512_unpackhi_epi64(t[i],   t[i+2]);
        r[i+2] = _mm512_unpacklo_epi64(t[i+1], t[i+3]);
        r[i+3] = _mm512_unpackhi_epi64(t[i+1], t[i+3]);
    }
    for (int i = 0; i < 16; i += 8)
        for (int j = 0; j < 4; j++) {
            t[i+j]   = _mm512_shuffle_i32x4(r[i+j], r[i+j+4], 0x88);
            t[i+j+4] = _mm512_shuffle_i32x4(r[i+j], r[i+j+4], 0xdd);
        }
    for (int j = 0; j < 8; j++) {
        r[j]   = _mm512_shuffle_i32x4(t[j], t[j+8], 0x88);
        r[j+8] = _mm512_shuffle_i32x4(t[j], t[j+8], 0xdd);
    }
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

/* The same for c[16, 0:64]: four column tiles, four independent accumulations (a product's
   latency is several times its issue interval on a tile). */
static inline void tile_quad(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, int64_t b_step,
                             int64_t steps, float* c, int64_t ldc) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t k = 0; k < steps; k++) {
        const uint16_t* bk = b + k * b_step;
        _tile_loadd(4, a + k * 32, lda);
        _tile_loadd(5, bk, ldb);
        _tile_loadd(6, bk + 32, ldb);
        _tile_loadd(7, bk + 64, ldb);
        _tile_dpbf16ps(0, 4, 5);
        _tile_dpbf16ps(1, 4, 6);
        _tile_dpbf16ps(2, 4, 7);
        _tile_loadd(5, bk + 96, ldb);
        _tile_dpbf16ps(3, 4, 5);
    }
    _tile_stored(0, c, ldc);
    _tile_stored(1, c + 16, ldc);
    _tile_stored(2, c + 32, ldc);
    _tile_stored(3, c + 48, ldc);
}

/* c[16, 0:n] for n a multiple of 32: quads, then a pair. */
static inline void tile_row(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, int64_t b_step,
                            int64_t steps, float* c, int64_t ldc, int64_t n) {
    int64_t j = 0;
    for (; j + 64 <= n; j += 64) tile_quad(a, lda, b + j * 2, ldb, b_step, steps, c + j, ldc);
    if (j < n) tile_pair(a, lda, b + j * 2, ldb, b_step, steps, c + j, ldc);
}

/* The outputs of block lb of head b: its probabilities (slot (lb / 16) % 2) x values, each row
   scaled by 1 / its sum, to its row of out. */
static inline void finish_block(int64_t lb, int64_t L, int64_t b, int64_t Sp, int64_t D, const uint16_t* pbufs,
                                const float* invs, const uint16_t* vp, float* obuf, uint16_t* out, const int64_t* put) {
    const int64_t rows = L - lb < 16 ? L - lb : 16, slot = (lb / 16) & 1;
    tile_row(pbufs + slot * 16 * Sp, Sp * 2, vp, D * 4, 16 * D * 2, Sp / 32, obuf, D * 4, D);
    for (int64_t i = 0; i < rows; i++) {
        const __m512 w = _mm512_set1_ps(invs[slot * 16 + i]);
        uint16_t* orow = out + put[b * L + lb + i] * D;
        for (int64_t d = 0; d < D; d += 16)
            store_bf16x16(orow + d, _mm512_mul_ps(_mm512_load_ps(obuf + i * D + d), w));
    }
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
        uint16_t* pbufs = aligned_alloc(64, (size_t)2 * 16 * Sp * 2);   /* two blocks' probabilities */
        uint16_t qbuf[16 * 256] __attribute__((aligned(64)));
        float obuf[16 * 256] __attribute__((aligned(64)));
        float invs[32];
        if (!kp || !vp || !sbuf || !pbufs) bad = 1;
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
            /* this head's keys and values of row r, 16 at a time (pointers; NULL: padding, zeros) */
            for (int64_t s = 0; s < Sp; s += 16) {
                const uint16_t* kr[16];
                const uint16_t* vr[16];
                for (int j = 0; j < 16; j++) {
                    const int64_t t = s + j;
                    if (t < pmax) {
                        kr[j] = sk + (pidx[r * pmax + t] * hkv + h) * D;
                        vr[j] = sv + (pidx[r * pmax + t] * hkv + h) * D;
                    } else if (t < S) {
                        kr[j] = k0 + qidx[r * qm + t - pmax] * kst + h * ksh;
                        vr[j] = v0 + qidx[r * qm + t - pmax] * vst + h * vsh;
                    } else {
                        kr[j] = vr[j] = NULL;
                    }
                }
                /* keys: pairs of the head dimension interleaved, kp32[dp][t] = word dp of key t
                   (16 keys x 16 words transposed in registers) */
                for (int64_t dp = 0; dp < D / 2; dp += 16) {
                    __m512i w[16];
                    for (int j = 0; j < 16; j++) w[j] = kr[j] ? _mm512_loadu_si512(kr[j] + 2 * dp) : _mm512_setzero_si512();
                    transpose16(w);
                    for (int i = 0; i < 16; i++) _mm512_store_si512((uint32_t*)kp + (dp + i) * Sp + s, w[i]);
                }
                /* values: pairs of key positions interleaved, vp[t / 2][d][t % 2] */
                for (int j = 0; j < 16; j += 2)
                    for (int64_t d = 0; d < D; d += 32) {
                        const __m512i x = vr[j] ? _mm512_loadu_si512(vr[j] + d) : _mm512_setzero_si512();
                        const __m512i y = vr[j + 1] ? _mm512_loadu_si512(vr[j + 1] + d) : _mm512_setzero_si512();
                        uint16_t* o = vp + ((s + j) / 2) * 2 * D + 2 * d;
                        _mm512_store_si512(o, _mm512_permutex2var_epi16(x, lo, y));
                        _mm512_store_si512(o + 32, _mm512_permutex2var_epi16(x, hi, y));
                    }
            }
            /* blocks of 16 queries; a block's product with the values waits for the next block's
               scores and softmax: the tile loads of its probabilities then find the vector stores
               that wrote them done (a tile load right after them stalls) */
            int64_t prev = -1;
            for (int64_t lb = 0; lb < L; lb += 16) {
                const int64_t rows = L - lb < 16 ? L - lb : 16;
                uint16_t* pbuf = pbufs + ((lb / 16) & 1) * 16 * Sp;
                float* inv = invs + ((lb / 16) & 1) * 16;
                for (int64_t i = 0; i < 16; i++) {
                    if (i < rows) memcpy(qbuf + i * D, qrows + take[b * L + lb + i] * D, D * 2);
                    else memset(qbuf + i * D, 0, D * 2);
                }
                tile_row(qbuf, D * 2, kp, Sp * 4, 16 * Sp * 2, D / 32, sbuf, Sp * 4, Sp);     /* scores: q [16, D] x keys */
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
                        const __m512 x = _mm512_load_ps(srow + s);
                        if (!_mm512_cmp_ps_mask(x, ninf, _CMP_NEQ_OQ)) {   /* masked keys only (padding, later tokens) */
                            _mm256_storeu_si256((__m256i*)(prow + s), _mm256_setzero_si256());
                            continue;
                        }
                        const __m512 e = exp512(_mm512_sub_ps(x, mx));
                        vsum = _mm512_add_ps(vsum, e);
                        store_bf16x16(prow + s, e);
                    }
                    inv[i] = 1.0f / _mm512_reduce_add_ps(vsum);
                }
                if (prev >= 0) finish_block(prev, L, b, Sp, D, pbufs, invs, vp, obuf, out, put);
                prev = lb;
            }
            if (prev >= 0) finish_block(prev, L, b, Sp, D, pbufs, invs, vp, obuf, out, put);
        }
        if (!bad) _tile_release();
        free(kp); free(vp); free(sbuf); free(pbufs);
    }
    return bad ? -2 : 0;
}
