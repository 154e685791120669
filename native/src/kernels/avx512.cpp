// avx512.cpp - the AVX512-VNNI kernel (kernel.h): Q8_0 and Q4_K as int8 dot products (vpdpbusd), F16
// as fp32 FMAs. The only file built with -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mf16c -mfma.
// Keep it free of C++ library headers: inline library code compiled here with AVX512 enabled could
// be picked by the linker for other files.
#include "kernel.h"

#include <immintrin.h>

namespace {

bool cpu_ok() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
           __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
}

void quantize(const float * x, int64_t x_stride, int64_t n_col, int64_t K, int64_t nbp, int8_t * y, float * dy,
              int32_t * sb) {
    const int64_t nb = K / 32;
    for (int64_t c = 0; c < n_col; c++) {
        const float * xc = x + c * x_stride;
        for (int64_t b = 0; b < nb; b++) {
            const __m512 v0 = _mm512_loadu_ps(xc + b * 32), v1 = _mm512_loadu_ps(xc + b * 32 + 16);
            const __m512 a = _mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1));
            const float amax = _mm512_reduce_max_ps(a);
            const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
            const __m512 vid = _mm512_set1_ps(id);
            const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, vid)); // round to nearest even
            const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, vid));
            alignas(32) int32_t chunk[8]; // the block's 32 quants as 8 groups of 4 bytes
            _mm_store_si128((__m128i *) chunk, _mm512_cvtsepi32_epi8(q0));
            _mm_store_si128((__m128i *) (chunk + 4), _mm512_cvtsepi32_epi8(q1));
            const int64_t gi = (b / 8) * n_col + c;
            int32_t * grp = (int32_t *) (y + gi * 256);
            for (int m = 0; m < 8; m++) grp[m * 8 + b % 8] = chunk[m];
            dy[gi * 8 + b % 8] = amax / 127.0f;
            sb[gi * 8 + b % 8] = -128 * _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        }
        for (int64_t b = nb; b < nbp; b++) {
            const int64_t gi = (b / 8) * n_col + c;
            int32_t * grp = (int32_t *) (y + gi * 256);
            for (int m = 0; m < 8; m++) grp[m * 8 + b % 8] = 0;
            dy[gi * 8 + b % 8] = 0.0f;
            sb[gi * 8 + b % 8] = 0;
        }
    }
}

// x = n ln2 + r with n = round(x / ln2), |r| <= ln2 / 2 (ln2 = 0.693359375 - 2.12194440e-4, two steps).
inline __m512 reduce_ln2(__m512 x, __m512 & n) {
    n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    return _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
}

// c[0] r^(N-1) + ... + c[N-1] by Horner's rule.
template <int N>
inline __m512 horner(__m512 r, const float (&c)[N]) {
    __m512 p = _mm512_set1_ps(c[0]);
    _Pragma("GCC unroll 16") for (int i = 1; i < N; i++) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c[i]));
    return p;
}

// exp(x) for x in [-88, 88]: exp(r) times 2^n.
inline __m512 exp_ps(__m512 x) {
    __m512 n;
    const __m512 r = reduce_ln2(_mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-88.0f)), _mm512_set1_ps(88.0f)), n);
    return _mm512_scalef_ps(horner(r, CSM_EXP_SERIES), n);
}

void silu_mul(const float * g, const float * u, float * out, int64_t n) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 k = n - i >= 16 ? (__mmask16) 0xFFFF : (__mmask16) ((1u << (n - i)) - 1);
        const __m512 gv = _mm512_maskz_loadu_ps(k, g + i), uv = _mm512_maskz_loadu_ps(k, u + i);
        const __m512 s = _mm512_div_ps(gv, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
        _mm512_mask_storeu_ps(out + i, k, _mm512_mul_ps(s, uv));
    }
}

// exp(x) - 1 for x in [-88, 0.35], accurate relative to the result near 0 as well:
// 2^n (r (exp(r) - 1) / r) + (2^n - 1).
inline __m512 expm1_ps(__m512 x) {
    __m512 n;
    const __m512 r = reduce_ln2(_mm512_max_ps(x, _mm512_set1_ps(-88.0f)), n);
    const __m512 p2 = _mm512_scalef_ps(_mm512_set1_ps(1.0f), n);
    return _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(r, horner(r, CSM_EXPM1_SERIES)), p2), _mm512_sub_ps(p2, _mm512_set1_ps(1.0f)));
}

void elu(const float * x, float * out, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 k = n - i >= 16 ? (__mmask16) 0xFFFF : (__mmask16) ((1u << (n - i)) - 1);
        const __m512 v = _mm512_maskz_loadu_ps(k, x + i);
        const __mmask16 pos = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GT_OQ);
        const __m512 e = expm1_ps(_mm512_min_ps(v, _mm512_setzero_ps()));
        _mm512_mask_storeu_ps(out + i, k, _mm512_mask_blend_ps(pos, e, v));
    }
}

// Attention (kernel.h): the 16 queries of a block in the 16 lanes of a zmm. The queries are
// transposed once ([d][lane]); the scores go to scratch as [j][lane], 8 keys at a time (8 chains
// over d, each key component broadcast); the softmax runs down the columns; the values' 8 components
// at a time (8 chains over j, masked per lane past its n_keys). Lanes past n_q compute garbage that
// is never stored.
void attend(const csm_attn_block & a) {
    const int64_t hd = a.hd;
    alignas(64) int32_t nk[16];
    const int32_t L = csm_attn_begin(a, nk);
    if (L == 0) return;
    float * qt = a.scratch, * st = qt + hd * 16, * tmp = st + (int64_t) L * 16;
    const __m512i nkv = _mm512_load_si512(nk);
    const __m512 scale = _mm512_set1_ps(a.scale);
    for (int32_t j0 = 0; j0 < L; j0 += 8) {
        const float * kr[8];
        _Pragma("GCC unroll 8") for (int u = 0; u < 8; u++) kr[u] = a.k + (int64_t) (j0 + u < L ? j0 + u : L - 1) * a.k_stride;
        __m512 acc[8];
        _Pragma("GCC unroll 8") for (int u = 0; u < 8; u++) acc[u] = _mm512_setzero_ps();
        for (int64_t d = 0; d < hd; d++) {
            const __m512 qv = _mm512_load_ps(qt + d * 16);
            _Pragma("GCC unroll 8") for (int u = 0; u < 8; u++) acc[u] = _mm512_fmadd_ps(qv, _mm512_set1_ps(kr[u][d]), acc[u]);
        }
        _Pragma("GCC unroll 8") for (int u = 0; u < 8; u++)
            if (j0 + u < L) _mm512_store_ps(st + (int64_t) (j0 + u) * 16, _mm512_mul_ps(acc[u], scale));
    }
    __m512 mx = _mm512_set1_ps(-__builtin_inff());
    for (int32_t j = 0; j < L; j++) {
        const __mmask16 m = _mm512_cmpgt_epi32_mask(nkv, _mm512_set1_epi32(j));
        mx = _mm512_mask_max_ps(mx, m, mx, _mm512_load_ps(st + (int64_t) j * 16));
    }
    __m512 sum = _mm512_setzero_ps();
    for (int32_t j = 0; j < L; j++) {
        const __mmask16 m = _mm512_cmpgt_epi32_mask(nkv, _mm512_set1_epi32(j));
        const __m512 e = exp_ps(_mm512_sub_ps(_mm512_load_ps(st + (int64_t) j * 16), mx));
        _mm512_store_ps(st + (int64_t) j * 16, e);
        sum = _mm512_mask_add_ps(sum, m, sum, e);
    }
    const __m512 inv = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(sum, _mm512_setzero_ps(), _CMP_GT_OQ), _mm512_set1_ps(1.0f), sum);
    for (int64_t d0 = 0; d0 < hd; d0 += 8) {
        const float * vr = a.vt + d0 * a.vt_stride;
        __m512 acc[8];
        _Pragma("GCC unroll 8") for (int u = 0; u < 8; u++) acc[u] = _mm512_setzero_ps();
        for (int32_t j = 0; j < L; j++) {
            const __mmask16 m = _mm512_cmpgt_epi32_mask(nkv, _mm512_set1_epi32(j));
            const __m512 p = _mm512_load_ps(st + (int64_t) j * 16);
            _Pragma("GCC unroll 8") for (int u = 0; u < 8; u++)
                acc[u] = _mm512_mask3_fmadd_ps(p, _mm512_set1_ps(vr[u * a.vt_stride + j]), acc[u], m);
        }
        _Pragma("GCC unroll 8") for (int u = 0; u < 8; u++) _mm512_store_ps(tmp + u * 16, _mm512_mul_ps(acc[u], inv));
        for (int i = 0; i < a.n_q; i++)
            _Pragma("GCC unroll 8") for (int u = 0; u < 8; u++) a.out[i][d0 + u] = tmp[u * 16 + i];
    }
}

// With several columns a tile is compute-heavy enough that the core stops running ahead of memory:
// fetch the weights this many bytes ahead into L2. (Measured on a Zen 5 host: B=4 steps 18 % faster with
// 4-8 KiB.)
constexpr int64_t PREFETCH_BYTES = 6144;
// One column: Q8_0 is best left to the hardware prefetcher (it reads as fast as a plain read loop),
// but Q4_K and F16, with more instructions per byte, fall behind it; fetching 8 KiB ahead into L2
// makes one Q4_K stream 10-16 % faster and one F16 stream 5-7 % (Zen 5, frame-by-frame A/B; on an
// Intel Xeon, depth-decoder-sized Q4_K products 7-10 % faster).
constexpr int64_t PREFETCH_1COL_BYTES = 8192;

// The float side of the int8 products (kernel.h): per (row, column) 8 float lanes, lane l collecting
// block l; per group acc_l = fma(float(dot_l), dx_l * dy_l, acc_l), where dot_l is block l's whole
// integer dot product (Q4_K then subtracts its min term); at the end hsum's tree. A zmm holds two
// (row, column) pairs, rows r and r + 1 of one column in its halves: one float instruction per two
// pairs, and the same per-lane operations as the one-row ymm code.
inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// The halves of a zmm. (The masked extract: GCC 12 warns about the undefined source of the plain one,
// which its _mm512_castps512_ps256 uses too.)
template <int H>
inline __m256 half(__m512 v) {
    return _mm256_castpd_ps(_mm512_mask_extractf64x4_pd(_mm256_setzero_pd(), 0xF, _mm512_castps_pd(v), H));
}

// The two rows' results of a zmm accumulator: dst[0] (lanes 0-7), dst[1] (lanes 8-15).
inline void store2(__m512 acc, float * dst) {
    dst[0] = hsum(half<0>(acc));
    dst[1] = hsum(half<1>(acc));
}

// 8 values (floats, ints) from p in both halves of a zmm: a load, no shuffle.
inline __m512 bcast8(const float * p) { return _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_loadu_pd((const double *) p))); }
inline __m512i bcast8(const int32_t * p) { return _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *) p)); }
inline __m512i bcast32(const int8_t * p) { return _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *) p)); }
// Vector m of rows r and r + 1 of a Q8_0 tile (at p and p + 256) in the halves of a zmm.
inline __m512i rows2(const uint8_t * p) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *) p)), _mm256_loadu_si256((const __m256i *) (p + 256)), 1);
}
inline __m512 dup8(__m256 v) { return _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(v))); }
inline __m512 join(__m256 lo, __m256 hi) {
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(lo)), _mm256_castps_pd(hi), 1));
}

// Q8_0, one column (memory-bound): R rows of a tile one by one in ymm, each row's 256 quants of a
// group read in order; the even and odd m are two dependency chains (the first started from sb),
// added at the group's end.
template <int R>
inline void tile_q8_1(const uint8_t * t, int64_t nbp, const int8_t * y, const float * dy, const int32_t * sb,
                      int64_t col_stride, float * dst) {
    __m256 acc[R];
    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < nbp / 8; g++, t += R * 272) {
        const int64_t o = g * col_stride;
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {
            __m256i d[2] = {_mm256_loadu_si256((const __m256i *) (sb + o * 8)), _mm256_setzero_si256()};
            _Pragma("GCC unroll 8") for (int m = 0; m < 8; m++) {
                d[m % 2] = _mm256_dpbusd_epi32(d[m % 2], _mm256_loadu_si256((const __m256i *) (t + R * 16 + r * 256 + m * 32)),
                                               _mm256_loadu_si256((const __m256i *) (y + o * 256 + m * 32)));
            }
            const __m256 dx = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (t + r * 16)));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(d[0], d[1])), _mm256_mul_ps(dx, _mm256_loadu_ps(dy + o * 8)), acc[r]);
        }
    }
    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) dst[r] = hsum(acc[r]);
}

// Q8_0, 4 rows x NC columns (a batch of 2-4; a prompt's last columns, its others going 6 at a time
// through tile_q8_4x2p): per activation vector m, rows 0-1 and 2-3 joined in two zmm serve all NC
// columns, each column's vector broadcast to both halves; all 2 x NC dot products and float
// accumulators stay in registers. Per group 16 NC vpdpbusd against 3 NC float instructions and 16
// inserts. (Packing the
// rows interleaved per vector m, so that one load gives two rows, made 64-column products 10-15 %
// faster but one column 5-10 % slower: kernel_bench CPU time, Zen 4. Rejoining each tile once into
// that form for a prompt's many column passes gave no clear gain: 256 columns -7 %, 64 +5 %.)
template <int NC>
inline void tile_q8_4xn(const uint8_t * t, int64_t nbp, const int8_t * y, const float * dy, const int32_t * sb,
                        int64_t col_stride, float * dst, int64_t dst_stride) {
    __m512 acc[2][NC];
    _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) acc[0][n] = acc[1][n] = _mm512_setzero_ps();
    for (int64_t g = 0; g < nbp / 8; g++, t += 4 * 272) {
        _Pragma("GCC unroll 32") for (int64_t o = 0; o < 4 * 272; o += 64)
            _mm_prefetch((const char *) t + PREFETCH_BYTES + o, _MM_HINT_T1);
        const uint8_t * qt = t + 64;
        const int64_t o = g * col_stride;
        __m512i d[2][NC];
        _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) d[0][n] = d[1][n] = bcast8(sb + (o + n) * 8);
        _Pragma("GCC unroll 8") for (int m = 0; m < 8; m++) {
            const __m512i w0 = rows2(qt + m * 32), w1 = rows2(qt + 512 + m * 32);
            _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) {
                const __m512i yv = bcast32(y + (o + n) * 256 + m * 32);
                d[0][n] = _mm512_dpbusd_epi32(d[0][n], w0, yv);
                d[1][n] = _mm512_dpbusd_epi32(d[1][n], w1, yv);
            }
        }
        const __m512 dx0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) t));
        const __m512 dx1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) (t + 32)));
        _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) {
            const __m512 dyv = bcast8(dy + (o + n) * 8);
            acc[0][n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[0][n]), _mm512_mul_ps(dx0, dyv), acc[0][n]);
            acc[1][n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[1][n]), _mm512_mul_ps(dx1, dyv), acc[1][n]);
        }
    }
    _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) {
        store2(acc[0][n], dst + n * dst_stride);
        store2(acc[1][n], dst + n * dst_stride + 2);
    }
}

// Q8_0, 4 rows x 2 NP columns (a prompt): the same sums as tile_q8_4xn, held the other way round.
// Each row's vector m is broadcast to both halves of a zmm (a load, no shuffle) and serves NP zmm
// that each join two columns' activations; a zmm accumulator holds one row and two columns, so
// the columns' dy and sb are one load each. 4 row broadcasts and NP joins per 4 NP vpdpbusd, where
// tile_q8_4xn<6> needs 2 joins and 4 + 6 loads per 12: kernel_bench-style loops with the data in
// L1, Zen 4: 156-162 G multiply-adds/s per core against 149-151 (at 2 or 4 columns this is slower).
template <int NP>
inline void tile_q8_4x2p(const uint8_t * t, int64_t nbp, const int8_t * y, const float * dy, const int32_t * sb,
                         int64_t col_stride, float * dst, int64_t dst_stride) {
    __m512 acc[4][NP];
    _Pragma("GCC unroll 4") for (int r = 0; r < 4; r++)
        _Pragma("GCC unroll 8") for (int n = 0; n < NP; n++) acc[r][n] = _mm512_setzero_ps();
    for (int64_t g = 0; g < nbp / 8; g++, t += 4 * 272) {
        _Pragma("GCC unroll 32") for (int64_t o = 0; o < 4 * 272; o += 64)
            _mm_prefetch((const char *) t + PREFETCH_BYTES + o, _MM_HINT_T1);
        const uint8_t * qt = t + 64;
        const int64_t o = g * col_stride;
        __m512i d[4][NP];
        _Pragma("GCC unroll 8") for (int n = 0; n < NP; n++) {
            const __m512i s0 = _mm512_loadu_si512(sb + (o + 2 * n) * 8); // columns 2n and 2n + 1
            _Pragma("GCC unroll 4") for (int r = 0; r < 4; r++) d[r][n] = s0;
        }
        _Pragma("GCC unroll 8") for (int m = 0; m < 8; m++) {
            __m512i yv[NP];
            _Pragma("GCC unroll 8") for (int n = 0; n < NP; n++) {
                const int8_t * yc = y + (o + 2 * n) * 256 + m * 32;
                yv[n] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *) yc)),
                                           _mm256_loadu_si256((const __m256i *) (yc + 256)), 1);
            }
            _Pragma("GCC unroll 4") for (int r = 0; r < 4; r++) {
                const __m512i w = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *) (qt + r * 256 + m * 32)));
                _Pragma("GCC unroll 8") for (int n = 0; n < NP; n++) d[r][n] = _mm512_dpbusd_epi32(d[r][n], w, yv[n]);
            }
        }
        _Pragma("GCC unroll 4") for (int r = 0; r < 4; r++) {
            const __m512 dx = dup8(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (t + r * 16))));
            _Pragma("GCC unroll 8") for (int n = 0; n < NP; n++) {
                const __m512 dyv = _mm512_loadu_ps(dy + (o + 2 * n) * 8);
                acc[r][n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[r][n]), _mm512_mul_ps(dx, dyv), acc[r][n]);
            }
        }
    }
    _Pragma("GCC unroll 8") for (int n = 0; n < NP; n++)
        _Pragma("GCC unroll 4") for (int r = 0; r < 4; r++) {
            dst[2 * n * dst_stride + r] = hsum(half<0>(acc[r][n]));
            dst[(2 * n + 1) * dst_stride + r] = hsum(half<1>(acc[r][n]));
        }
}

// Q4_K's per-row factors of a group: d * scale_l and dmin * min_l.
inline void q4k_factors(const uint8_t * h, __m256 & dsc, __m256 & dmn) {
    uint16_t d16, m16;
    __builtin_memcpy(&d16, h, 2);
    __builtin_memcpy(&m16, h + 2, 2);
    dsc = _mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss(d16)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *) (h + 4)))));
    dmn = _mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss(m16)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *) (h + 12)))));
}

// dy * sum(y) per block of a column's group (sb = -128 * sum(y)).
inline __m256 q4k_ysum(const int32_t * sb, const float * dy) {
    const __m256 s = _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *) sb));
    return _mm256_mul_ps(_mm256_mul_ps(s, _mm256_set1_ps(-1.0f / 128.0f)), _mm256_loadu_ps(dy));
}

// Q4_K: value = d * sc_l * q - dmin * m_l per sub-block l, hence per group and lane l:
// acc = fma(float(dot), d sc dy, acc), then acc -= dmin m . (dy sum(y)).

// Q4_K, one column: lane l of the dot products collects sub-block l (unsigned 4-bit quants, so no
// offset). Packed vectors k = 0, 2 hold the even activation vectors m, k = 1, 3 the odd ones: two
// chains, added at the group's end.
template <int R>
inline void tile_q4k_1(const uint8_t * t, int64_t nbp, const int8_t * y, const float * dy, const int32_t * sb,
                       int64_t col_stride, float * dst) {
    __m256 acc[R];
    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    const int64_t group = R * 148;
    const __m256i low = _mm256_set1_epi8(0x0F);
    for (int64_t g = 0; g < nbp / 8; g++, t += group) {
        _Pragma("GCC unroll 32") for (int64_t o = 0; o < group; o += 64)
            _mm_prefetch((const char *) t + PREFETCH_1COL_BYTES + o, _MM_HINT_T1);
        const int8_t * yg = y + g * col_stride * 256;
        const float * dg = dy + g * col_stride * 8;
        const __m256 ysum = q4k_ysum(sb + g * col_stride * 8, dg);
        const uint8_t * qt = t + R * 20;
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {
            __m256i dot[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()}; // even, odd m
            _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) {
                // vector k: activation vector m = k / 2 * 4 + k % 2 in the low nibbles, m + 2 in the high
                const __m256i p = _mm256_loadu_si256((const __m256i *) (qt + r * 128 + k * 32));
                const int8_t * ym = yg + (k / 2 * 4 + k % 2) * 32;
                dot[k % 2] = _mm256_dpbusd_epi32(dot[k % 2], _mm256_and_si256(p, low), _mm256_loadu_si256((const __m256i *) ym));
                dot[k % 2] = _mm256_dpbusd_epi32(dot[k % 2], _mm256_and_si256(_mm256_srli_epi16(p, 4), low),
                                                 _mm256_loadu_si256((const __m256i *) (ym + 64)));
            }
            __m256 dsc, dmn;
            q4k_factors(t + r * 20, dsc, dmn);
            const __m256 sc = _mm256_mul_ps(dsc, _mm256_loadu_ps(dg));
            acc[r] = _mm256_fnmadd_ps(dmn, ysum, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(dot[0], dot[1])), sc, acc[r]));
        }
    }
    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) dst[r] = hsum(acc[r]);
}

// Q4_K, 4 rows x NC columns: the 64 bytes of vectors 2J and 2J + 1 hold activation vectors 4J, 4J + 1
// in their low nibbles and 4J + 2, 4J + 3 in their high nibbles, so each nibble half pairs with one
// contiguous zmm of activations (lanes 0-7 the even m, 8-15 the odd m). Per group the two halves of
// rows r and r + 1 are folded (in integer) into one zmm, whose float update is that of two rows.
template <int NC>
inline void tile_q4k_4xn(const uint8_t * t, int64_t nbp, const int8_t * y, const float * dy, const int32_t * sb,
                         int64_t col_stride, float * dst, int64_t dst_stride) {
    __m512 acc[2][NC];
    _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) acc[0][n] = acc[1][n] = _mm512_setzero_ps();
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int64_t g = 0; g < nbp / 8; g++, t += 4 * 148) {
        _Pragma("GCC unroll 32") for (int64_t o = 0; o < 4 * 148; o += 64)
            _mm_prefetch((const char *) t + PREFETCH_BYTES + o, _MM_HINT_T1);
        const int64_t o = g * col_stride;
        const uint8_t * qt = t + 80;
        __m512i dot[4][NC];
        _Pragma("GCC unroll 4") for (int r = 0; r < 4; r++)
            _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) dot[r][n] = _mm512_setzero_si512();
        _Pragma("GCC unroll 2") for (int J = 0; J < 2; J++) {
            _Pragma("GCC unroll 2") for (int hi = 0; hi < 2; hi++) {
                __m512i xv[4];
                _Pragma("GCC unroll 4") for (int r = 0; r < 4; r++) {
                    const __m512i p = _mm512_loadu_si512((const void *) (qt + r * 128 + J * 64));
                    xv[r] = _mm512_and_si512(hi ? _mm512_srli_epi16(p, 4) : p, low);
                }
                _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) {
                    const __m512i yv = _mm512_loadu_si512((const void *) (y + (o + n) * 256 + J * 128 + hi * 64));
                    _Pragma("GCC unroll 4") for (int r = 0; r < 4; r++) dot[r][n] = _mm512_dpbusd_epi32(dot[r][n], xv[r], yv);
                }
            }
        }
        __m512 dsc[2], dmn[2]; // rows 2p, 2p + 1 in the halves
        _Pragma("GCC unroll 2") for (int p = 0; p < 2; p++) {
            __m256 dsc0, dmn0, dsc1, dmn1;
            q4k_factors(t + (2 * p) * 20, dsc0, dmn0);
            q4k_factors(t + (2 * p + 1) * 20, dsc1, dmn1);
            dsc[p] = join(dsc0, dsc1);
            dmn[p] = join(dmn0, dmn1);
        }
        _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) {
            const __m512 dyv = bcast8(dy + (o + n) * 8), ysum = dup8(q4k_ysum(sb + (o + n) * 8, dy + (o + n) * 8));
            _Pragma("GCC unroll 2") for (int p = 0; p < 2; p++) {
                const __m512i a = dot[2 * p][n], b = dot[2 * p + 1][n];
                const __m512i fold = _mm512_add_epi32(_mm512_shuffle_i64x2(a, b, 0x44), _mm512_shuffle_i64x2(a, b, 0xEE));
                const __m512 sc = _mm512_mul_ps(dsc[p], dyv);
                acc[p][n] = _mm512_fnmadd_ps(dmn[p], ysum, _mm512_fmadd_ps(_mm512_cvtepi32_ps(fold), sc, acc[p][n]));
            }
        }
    }
    _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) {
        store2(acc[0][n], dst + n * dst_stride);
        store2(acc[1][n], dst + n * dst_stride + 2);
    }
}

// F16's 16-lane tree: halves, quarters, pairs, neighbours (= hsum(lo + hi) of the two 8-lane halves).
// (The masked forms of the shuffles: GCC 12 warns about the undefined source of the plain ones.)
inline float hsum512(__m512 v) {
    v = _mm512_add_ps(v, _mm512_mask_shuffle_f32x4(v, 0xFFFF, v, v, 0x4E));
    v = _mm512_add_ps(v, _mm512_mask_shuffle_f32x4(v, 0xFFFF, v, v, 0xB1));
    v = _mm512_add_ps(v, _mm512_mask_permute_ps(v, 0xFFFF, v, 0x4E));
    v = _mm512_add_ps(v, _mm512_mask_permute_ps(v, 0xFFFF, v, 0xB1));
    return _mm512_cvtss_f32(v);
}

// F16 tile: per chunk of 16 columns, the R rows' 16 halves converted to fp32 and multiplied into
// the NC activation columns with fp32 FMAs (the activations are not rounded). Each column has its
// own accumulators, updated in the same order whatever NC is.
template <int R, int NC>
inline void tile_f16(const uint8_t * t, int64_t nch, const float * x, int64_t x_stride, float * dst, int64_t dst_stride) {
    __m512 acc[R][NC];
    _Pragma("GCC unroll 16") for (int r = 0; r < R; r++)
        _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) acc[r][n] = _mm512_setzero_ps();
    for (int64_t c = 0; c < nch; c++, t += R * 32) {
        constexpr int64_t ahead = NC > 1 ? PREFETCH_BYTES : PREFETCH_1COL_BYTES;
        if constexpr (R * 32 >= 64) {
            _Pragma("GCC unroll 4") for (int o = 0; o < R * 32; o += 64) _mm_prefetch((const char *) t + ahead + o, _MM_HINT_T1);
        } else if (c % 2 == 0) { // a 1-row tile's chunk is half a cache line
            _mm_prefetch((const char *) t + ahead, _MM_HINT_T1);
        }
        __m512 xv[NC];
        _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) xv[n] = _mm512_loadu_ps(x + n * x_stride + c * 16);
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {
            const __m512 wv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) (t + r * 32)));
            _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) acc[r][n] = _mm512_fmadd_ps(wv, xv[n], acc[r][n]);
        }
    }
    _Pragma("GCC unroll 16") for (int r = 0; r < R; r++)
        _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) dst[n * dst_stride + r] = hsum512(acc[r][n]);
}

template <int R>
inline void f16_cols(const uint8_t * t, int64_t nch, const float * x, int64_t x_stride, int64_t n_col, float * dst,
                     int64_t dst_stride) {
    for (int64_t c = 0; c < n_col; c += 4) {
        const float * xc = x + c * x_stride;
        float * oc = dst + c * dst_stride;
        switch (n_col - c < 4 ? n_col - c : 4) {
            case 1: tile_f16<R, 1>(t, nch, xc, x_stride, oc, dst_stride); break;
            case 2: tile_f16<R, 2>(t, nch, xc, x_stride, oc, dst_stride); break;
            case 3: tile_f16<R, 3>(t, nch, xc, x_stride, oc, dst_stride); break;
            default: tile_f16<R, 4>(t, nch, xc, x_stride, oc, dst_stride); break;
        }
    }
}

void gemm_f16(const uint8_t * w, int64_t rows, int64_t cols, int64_t r0, int64_t r1, const csm_kernel_input & in,
              int64_t c0, int64_t n_col, float * dst, int64_t dst_stride) {
    const int64_t full = rows / 4 * 4, nch = cols / 16;
    const float * x = in.x + c0 * in.x_stride;
    int64_t r = r0;
    for (; r + 4 <= r1 && r + 4 <= full; r += 4) f16_cols<4>(w + r * cols * 2, nch, x, in.x_stride, n_col, dst + r - r0, dst_stride);
    for (; r < r1; r++) f16_cols<1>(w + r * cols * 2, nch, x, in.x_stride, n_col, dst + r - r0, dst_stride);
}

// Columns taken at a time by a 4-row Q8_0 tile while that many remain: 6 rather than 4 makes 64- and
// 256-column products 7-11 % faster (kernel_bench CPU time, Zen 4). Q4_K's tile holds 4 (its 16-lane
// dot products take twice the registers).
constexpr int64_t Q8_COLS = 6;

// All columns of one tile: a 4-row tile Q8_COLS at a time (Q8_0, tile_q8_4x2p) or up to four, a 1-row tile (the
// last rows % 4 rows of a matrix, at most 3) one by one.
template <bool Q4K, int R>
inline void int8_cols(const uint8_t * t, int64_t nbp, const int8_t * y, const float * dy, const int32_t * sb,
                      int64_t col_stride, int64_t n_col, float * dst, int64_t dst_stride) {
    for (int64_t c = 0, step; c < n_col; c += step) {
        step = R == 1 ? 1 : !Q4K && n_col - c >= Q8_COLS ? Q8_COLS : 4;
        const int8_t * yc = y + c * 256;
        const float * dc = dy + c * 8;
        const int32_t * sc = sb + c * 8;
        float * oc = dst + c * dst_stride;
        if constexpr (R == 1) {
            if constexpr (Q4K) tile_q4k_1<1>(t, nbp, yc, dc, sc, col_stride, oc);
            else tile_q8_1<1>(t, nbp, yc, dc, sc, col_stride, oc);
            continue;
        }
        if (step == Q8_COLS) {
            tile_q8_4x2p<Q8_COLS / 2>(t, nbp, yc, dc, sc, col_stride, oc, dst_stride);
            continue;
        }
        switch (n_col - c < 4 ? n_col - c : 4) {
            case 1: Q4K ? tile_q4k_1<4>(t, nbp, yc, dc, sc, col_stride, oc) : tile_q8_1<4>(t, nbp, yc, dc, sc, col_stride, oc); break;
            case 2: Q4K ? tile_q4k_4xn<2>(t, nbp, yc, dc, sc, col_stride, oc, dst_stride) : tile_q8_4xn<2>(t, nbp, yc, dc, sc, col_stride, oc, dst_stride); break;
            case 3: Q4K ? tile_q4k_4xn<3>(t, nbp, yc, dc, sc, col_stride, oc, dst_stride) : tile_q8_4xn<3>(t, nbp, yc, dc, sc, col_stride, oc, dst_stride); break;
            default: Q4K ? tile_q4k_4xn<4>(t, nbp, yc, dc, sc, col_stride, oc, dst_stride) : tile_q8_4xn<4>(t, nbp, yc, dc, sc, col_stride, oc, dst_stride); break;
        }
    }
}

// Rows [r0, r1): whole 4-row tiles, then the last rows % 4 rows one by one.
template <bool Q4K>
void gemm_int8(const uint8_t * w, int64_t rows, int64_t cols, int64_t r0, int64_t r1, const csm_kernel_input & in,
               int64_t c0, int64_t n_col, float * dst, int64_t dst_stride) {
    const int64_t nbp = csm_kernel_nbp(cols), row_bytes = Q4K ? cols / 256 * 148 : nbp * 34, full = rows / 4 * 4;
    const int8_t * y = in.y + c0 * 256;
    const float * dy = in.dy + c0 * 8;
    const int32_t * sb = in.sb + c0 * 8;
    int64_t r = r0;
    for (; r + 4 <= r1 && r + 4 <= full; r += 4) {
        int8_cols<Q4K, 4>(w + r * row_bytes, nbp, y, dy, sb, in.col_stride, n_col, dst + r - r0, dst_stride);
    }
    for (; r < r1; r++) int8_cols<Q4K, 1>(w + r * row_bytes, nbp, y, dy, sb, in.col_stride, n_col, dst + r - r0, dst_stride);
}

const csm_kernel KERNEL = {
    "avx512", "AVX512-VNNI", quantize, {gemm_int8<false>, gemm_int8<true>, gemm_f16}, silu_mul, elu, attend,
};

} // namespace

const csm_kernel * csm_kernel_avx512() {
    static const bool ok = cpu_ok();
    return ok ? &KERNEL : nullptr;
}
