// avx2.cpp - the AVX2 kernel (kernel.h), for x86 CPUs without AVX512-VNNI: Q8_0 and Q4_K as int8
// products (vpmaddubsw + vpmaddwd), F16 as fp32 FMAs. The only file built with -mavx2 -mfma -mf16c.
// Same packed layouts as the AVX512 kernel, and the same float accumulation order, so its results
// equal that kernel's bit for bit (the integer dot products are exact either way). Keep it free of
// C++ library headers (see avx512.cpp).
#include "kernel.h"

#include <immintrin.h>

namespace {

bool cpu_ok() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

inline int32_t hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

inline float hmax(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

void quantize(const float * x, int64_t x_stride, int64_t n_col, int64_t K, int64_t nbp, int8_t * y, float * dy,
              int32_t * sb) {
    const int64_t nb = K / 32;
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7); // undoes the packs' lane interleave
    for (int64_t c = 0; c < n_col; c++) {
        const float * xc = x + c * x_stride;
        for (int64_t b = 0; b < nb; b++) {
            __m256 v[4];
            for (int i = 0; i < 4; i++) v[i] = _mm256_loadu_ps(xc + b * 32 + i * 8);
            const __m256 a = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], abs_mask), _mm256_and_ps(v[1], abs_mask)),
                                           _mm256_max_ps(_mm256_and_ps(v[2], abs_mask), _mm256_and_ps(v[3], abs_mask)));
            const float amax = hmax(a);
            const __m256 vid = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
            __m256i q[4];
            for (int i = 0; i < 4; i++) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], vid)); // round to nearest even
            const __m256i q16 = _mm256_packs_epi32(q[0], q[1]), q16b = _mm256_packs_epi32(q[2], q[3]);
            const __m256i q8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(q16, q16b), order);
            alignas(32) int32_t chunk[8]; // the block's 32 quants as 8 groups of 4 bytes
            _mm256_store_si256((__m256i *) chunk, q8);
            const int64_t gi = (b / 8) * n_col + c;
            int32_t * grp = (int32_t *) (y + gi * 256);
            for (int m = 0; m < 8; m++) grp[m * 8 + b % 8] = chunk[m];
            dy[gi * 8 + b % 8] = amax / 127.0f;
            const __m256i qs = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            sb[gi * 8 + b % 8] = -128 * hsum_epi32(qs);
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

// x = n ln2 + r, as in avx512.cpp.
inline __m256 reduce_ln2(__m256 x, __m256 & n) {
    n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    return _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
}

template <int N>
inline __m256 horner(__m256 r, const float (&c)[N]) {
    __m256 p = _mm256_set1_ps(c[0]);
    _Pragma("GCC unroll 16") for (int i = 1; i < N; i++) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c[i]));
    return p;
}

// 2^n for integral n in [-126, 127], built in the exponent bits.
inline __m256 pow2(__m256 n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}

// exp(x) for x in [-88, 88], as in avx512.cpp (n >= -126: below, exp(x) is under 2^-126 and only
// ever added to 1).
inline __m256 exp_ps(__m256 x) {
    __m256 n;
    const __m256 r = reduce_ln2(_mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.0f)), _mm256_set1_ps(88.0f)), n);
    return _mm256_mul_ps(horner(r, CSM_EXP_SERIES), pow2(_mm256_max_ps(n, _mm256_set1_ps(-126.0f))));
}

void silu_mul(const float * g, const float * u, float * out, int64_t n) {
    const __m256 one = _mm256_set1_ps(1.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 s = _mm256_div_ps(gv, _mm256_add_ps(one, exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
    }
    if (i < n) { // the tail through a buffer: no read or write past n
        alignas(32) float gb[8] = {0}, ub[8] = {0}, ob[8];
        for (int64_t j = i; j < n; j++) gb[j - i] = g[j], ub[j - i] = u[j];
        silu_mul(gb, ub, ob, 8);
        for (int64_t j = i; j < n; j++) out[j] = ob[j - i];
    }
}

// exp(x) - 1 for x in [-87, 0.35], as in avx512.cpp.
inline __m256 expm1_ps(__m256 x) {
    __m256 n;
    const __m256 r = reduce_ln2(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), n);
    const __m256 p2 = pow2(n);
    return _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(r, horner(r, CSM_EXPM1_SERIES)), p2), _mm256_sub_ps(p2, _mm256_set1_ps(1.0f)));
}

inline __m256 elu8(__m256 v) {
    const __m256 e = expm1_ps(_mm256_min_ps(v, _mm256_setzero_ps()));
    return _mm256_blendv_ps(e, v, _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GT_OQ));
}

void elu(const float * x, float * out, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, elu8(_mm256_loadu_ps(x + i)));
    if (i < n) { // the tail through a buffer: no read or write past n
        alignas(32) float xb[8] = {0}, ob[8];
        for (int64_t j = i; j < n; j++) xb[j - i] = x[j];
        _mm256_store_ps(ob, elu8(_mm256_load_ps(xb)));
        for (int64_t j = i; j < n; j++) out[j] = ob[j - i];
    }
}

// Attention (kernel.h), as in avx512.cpp: the block's queries as two halves of 8 lanes (the second
// only when n_q > 8), the same operations per lane, lanes past a query's n_keys kept by blends.
void attend(const csm_attn_block & a) {
    const int64_t hd = a.hd;
    alignas(32) int32_t nk[16];
    const int32_t L = csm_attn_begin(a, nk);
    if (L == 0) return;
    float * qt = a.scratch, * st = qt + hd * 16, * tmp = st + (int64_t) L * 16;
    const __m256 scale = _mm256_set1_ps(a.scale);
    for (int h = 0; h * 8 < a.n_q; h++) {
        const __m256i nkv = _mm256_load_si256((const __m256i *) (nk + h * 8));
        float * sh = st + h * 8;
        const float * qh = qt + h * 8;
        for (int32_t j0 = 0; j0 < L; j0 += 8) {
            const float * kr[8];
            _Pragma("GCC unroll 8") for (int u = 0; u < 8; u++) kr[u] = a.k + (int64_t) (j0 + u < L ? j0 + u : L - 1) * a.k_stride;
            __m256 acc[8];
            _Pragma("GCC unroll 8") for (int u = 0; u < 8; u++) acc[u] = _mm256_setzero_ps();
            for (int64_t d = 0; d < hd; d++) {
                const __m256 qv = _mm256_load_ps(qh + d * 16);
                _Pragma("GCC unroll 8") for (int u = 0; u < 8; u++) acc[u] = _mm256_fmadd_ps(qv, _mm256_broadcast_ss(kr[u] + d), acc[u]);
            }
            _Pragma("GCC unroll 8") for (int u = 0; u < 8; u++)
                if (j0 + u < L) _mm256_store_ps(sh + (int64_t) (j0 + u) * 16, _mm256_mul_ps(acc[u], scale));
        }
        __m256 mx = _mm256_set1_ps(-__builtin_inff());
        for (int32_t j = 0; j < L; j++) {
            const __m256 m = _mm256_castsi256_ps(_mm256_cmpgt_epi32(nkv, _mm256_set1_epi32(j)));
            mx = _mm256_blendv_ps(mx, _mm256_max_ps(mx, _mm256_load_ps(sh + (int64_t) j * 16)), m);
        }
        __m256 sum = _mm256_setzero_ps();
        for (int32_t j = 0; j < L; j++) {
            const __m256 m = _mm256_castsi256_ps(_mm256_cmpgt_epi32(nkv, _mm256_set1_epi32(j)));
            const __m256 e = exp_ps(_mm256_sub_ps(_mm256_load_ps(sh + (int64_t) j * 16), mx));
            _mm256_store_ps(sh + (int64_t) j * 16, e);
            sum = _mm256_blendv_ps(sum, _mm256_add_ps(sum, e), m);
        }
        const __m256 pos = _mm256_cmp_ps(sum, _mm256_setzero_ps(), _CMP_GT_OQ);
        const __m256 inv = _mm256_and_ps(_mm256_div_ps(_mm256_set1_ps(1.0f), sum), pos);
        for (int64_t d0 = 0; d0 < hd; d0 += 8) {
            const float * vr = a.vt + d0 * a.vt_stride;
            __m256 acc[8];
            _Pragma("GCC unroll 8") for (int u = 0; u < 8; u++) acc[u] = _mm256_setzero_ps();
            for (int32_t j = 0; j < L; j++) {
                const __m256 m = _mm256_castsi256_ps(_mm256_cmpgt_epi32(nkv, _mm256_set1_epi32(j)));
                const __m256 p = _mm256_load_ps(sh + (int64_t) j * 16);
                _Pragma("GCC unroll 8") for (int u = 0; u < 8; u++)
                    acc[u] = _mm256_blendv_ps(acc[u], _mm256_fmadd_ps(p, _mm256_broadcast_ss(vr + u * a.vt_stride + j), acc[u]), m);
            }
            _Pragma("GCC unroll 8") for (int u = 0; u < 8; u++) _mm256_store_ps(tmp + u * 8, _mm256_mul_ps(acc[u], inv));
            for (int i = h * 8; i < a.n_q && i < h * 8 + 8; i++)
                _Pragma("GCC unroll 8") for (int u = 0; u < 8; u++) a.out[i][d0 + u] = tmp[u * 8 + i - h * 8];
        }
    }
}

constexpr int64_t PREFETCH_BYTES = 6144;      // several columns (see avx512.cpp)
constexpr int64_t PREFETCH_1COL_BYTES = 8192; // one column (Q8_0 too: 4 more instructions per 32 bytes than
                                               // AVX512's vpdpbusd leave the hardware prefetcher behind)

// The float side of the int8 products, identical to avx512.cpp's (kernel.h): per (row, column) one
// 8-lane accumulator, lane l collecting block l; per group acc = fma(float(dot), dx_l * dy_l, acc)
// with dot block l's whole integer dot product (Q4_K then subtracts its min term); at the end hsum.
inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

template <int R, int NC>
inline void zero(__m256 (&acc)[R][NC]) {
    _Pragma("GCC unroll 16") for (int r = 0; r < R; r++)
        _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) acc[r][n] = _mm256_setzero_ps();
}

template <int R, int NC>
inline void store(__m256 (&acc)[R][NC], float * dst, int64_t dst_stride) {
    _Pragma("GCC unroll 16") for (int r = 0; r < R; r++)
        _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) dst[n * dst_stride + r] = hsum(acc[r][n]);
}

inline __m256 q8_scale(const uint8_t * t, int r, const float * dy) {
    return _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (t + r * 16))), _mm256_loadu_ps(dy));
}

// Q8_0, R rows x NC columns of a tile. The weights are stored as quant ^ 0x80; with the quant back
// in signed form, |q| <= 128 and |y| <= 127, so vpmaddubsw(|q|, y * sign(q)) never saturates
// (2 * 128 * 127 < 32768) and the dot products are exact (no sb offset needed).
template <int R, int NC>
inline void tile_q8(const uint8_t * t, int64_t nbp, const int8_t * y, const float * dy, int64_t col_stride, float * dst,
                    int64_t dst_stride) {
    __m256 acc[R][NC];
    zero<R, NC>(acc);
    const int64_t group = R * (16 + 8 * 32);
    constexpr int RP = NC == 1 ? R : NC == 2 && R % 2 == 0 ? 2 : 1; // rows per pass: what the registers hold
    const __m256i flip = _mm256_set1_epi8((char) 0x80), ones = _mm256_set1_epi16(1);
    for (int64_t g = 0; g < nbp / 8; g++, t += group) {
        _Pragma("GCC unroll 32") for (int64_t o = 0; o < group; o += 64)
            _mm_prefetch((const char *) t + (NC > 1 ? PREFETCH_BYTES : PREFETCH_1COL_BYTES) + o, _MM_HINT_T1);
        const uint8_t * qt = t + R * 16;
        _Pragma("GCC unroll 4") for (int r0 = 0; r0 < R; r0 += RP) {
            __m256i dot[RP][NC];
            _Pragma("GCC unroll 4") for (int r = 0; r < RP; r++)
                _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) dot[r][n] = _mm256_setzero_si256();
            _Pragma("GCC unroll 8") for (int m = 0; m < 8; m++) {
                __m256i yv[NC];
                _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++)
                    yv[n] = _mm256_loadu_si256((const __m256i *) (y + (g * col_stride + n) * 256 + m * 32));
                _Pragma("GCC unroll 4") for (int r = 0; r < RP; r++) {
                    const __m256i q = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *) (qt + (r0 + r) * 256 + m * 32)), flip);
                    const __m256i aq = _mm256_abs_epi8(q);
                    _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) {
                        const __m256i p = _mm256_maddubs_epi16(aq, _mm256_sign_epi8(yv[n], q));
                        dot[r][n] = _mm256_add_epi32(dot[r][n], _mm256_madd_epi16(p, ones));
                    }
                }
            }
            _Pragma("GCC unroll 4") for (int r = 0; r < RP; r++)
                _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) {
                    const __m256 sc = q8_scale(t, r0 + r, dy + (g * col_stride + n) * 8);
                    acc[r0 + r][n] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r][n]), sc, acc[r0 + r][n]);
                }
        }
    }
    store<R, NC>(acc, dst, dst_stride);
}

inline void q4k_factors(const uint8_t * h, __m256 & dsc, __m256 & dmn) {
    uint16_t d16, m16;
    __builtin_memcpy(&d16, h, 2);
    __builtin_memcpy(&m16, h + 2, 2);
    dsc = _mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss(d16)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *) (h + 4)))));
    dmn = _mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss(m16)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *) (h + 12)))));
}

inline __m256 q4k_ysum(const int32_t * sb, const float * dy) {
    const __m256 s = _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *) sb));
    return _mm256_mul_ps(_mm256_mul_ps(s, _mm256_set1_ps(-1.0f / 128.0f)), _mm256_loadu_ps(dy));
}

// Q4_K, R rows x NC columns: nibbles (0..15) times int8 activations (|y| <= 127). A group's 8
// vpmaddubsw per row and column sum in int16 (8 * 2 * 15 * 127 = 30480 < 32768) before one vpmaddwd.
template <int R, int NC>
inline void tile_q4k(const uint8_t * t, int64_t nbp, const int8_t * y, const float * dy, const int32_t * sb,
                     int64_t col_stride, float * dst, int64_t dst_stride) {
    __m256 acc[R][NC];
    zero<R, NC>(acc);
    const int64_t group = R * 148;
    constexpr int RP = NC == 1 ? R : NC == 2 && R % 2 == 0 ? 2 : 1;
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    for (int64_t g = 0; g < nbp / 8; g++, t += group) {
        _Pragma("GCC unroll 32") for (int64_t o = 0; o < group; o += 64)
            _mm_prefetch((const char *) t + (NC > 1 ? PREFETCH_BYTES : PREFETCH_1COL_BYTES) + o, _MM_HINT_T1);
        __m256 ysum[NC];
        _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++)
            ysum[n] = q4k_ysum(sb + (g * col_stride + n) * 8, dy + (g * col_stride + n) * 8);
        const uint8_t * qt = t + R * 20;
        _Pragma("GCC unroll 4") for (int r0 = 0; r0 < R; r0 += RP) {
            __m256i s16[RP][NC];
            _Pragma("GCC unroll 4") for (int r = 0; r < RP; r++)
                _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) s16[r][n] = _mm256_setzero_si256();
            _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) {
                const int m = k / 2 * 4 + k % 2; // low nibbles: activation vector m, high: m + 2
                __m256i ylo[NC], yhi[NC];
                _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) {
                    ylo[n] = _mm256_loadu_si256((const __m256i *) (y + (g * col_stride + n) * 256 + m * 32));
                    yhi[n] = _mm256_loadu_si256((const __m256i *) (y + (g * col_stride + n) * 256 + m * 32 + 64));
                }
                _Pragma("GCC unroll 4") for (int r = 0; r < RP; r++) {
                    const __m256i p = _mm256_loadu_si256((const __m256i *) (qt + (r0 + r) * 128 + k * 32));
                    const __m256i pl = _mm256_and_si256(p, low), ph = _mm256_and_si256(_mm256_srli_epi16(p, 4), low);
                    _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) {
                        s16[r][n] = _mm256_add_epi16(s16[r][n], _mm256_maddubs_epi16(pl, ylo[n]));
                        s16[r][n] = _mm256_add_epi16(s16[r][n], _mm256_maddubs_epi16(ph, yhi[n]));
                    }
                }
            }
            _Pragma("GCC unroll 4") for (int r = 0; r < RP; r++) {
                __m256 dsc, dmn;
                q4k_factors(t + (r0 + r) * 20, dsc, dmn);
                _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) {
                    const __m256 sc = _mm256_mul_ps(dsc, _mm256_loadu_ps(dy + (g * col_stride + n) * 8));
                    const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16[r][n], ones));
                    acc[r0 + r][n] = _mm256_fnmadd_ps(dmn, ysum[n], _mm256_fmadd_ps(dot, sc, acc[r0 + r][n]));
                }
            }
        }
    }
    store<R, NC>(acc, dst, dst_stride);
}

// F16: a 16-value chunk in two 8-lane accumulators (lanes 0-7 and 8-15 of avx512.cpp's one), summed
// as lo + hi and then the 8-lane tree: the AVX512 kernel's 16-lane tree, term for term. Rows
// [rs, rs + RP) of an R-row tile (so that the accumulators fit the 16 registers).
template <int R, int RP, int NC>
inline void tile_f16(const uint8_t * t, int rs, int64_t nch, const float * x, int64_t x_stride, float * dst,
                     int64_t dst_stride) {
    __m256 lo[RP][NC], hi[RP][NC];
    zero<RP, NC>(lo);
    zero<RP, NC>(hi);
    for (int64_t c = 0; c < nch; c++, t += R * 32) {
        constexpr int64_t ahead = NC > 1 ? PREFETCH_BYTES : PREFETCH_1COL_BYTES;
        if constexpr (R * 32 >= 64) {
            if (rs == 0) {
                _Pragma("GCC unroll 4") for (int o = 0; o < R * 32; o += 64) _mm_prefetch((const char *) t + ahead + o, _MM_HINT_T1);
            }
        } else if (c % 2 == 0) { // a 1-row tile's chunk is half a cache line
            _mm_prefetch((const char *) t + ahead, _MM_HINT_T1);
        }
        _Pragma("GCC unroll 4") for (int r = 0; r < RP; r++) {
            const __m256 w0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (t + (rs + r) * 32)));
            const __m256 w1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (t + (rs + r) * 32 + 16)));
            _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) {
                lo[r][n] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + n * x_stride + c * 16), lo[r][n]);
                hi[r][n] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + n * x_stride + c * 16 + 8), hi[r][n]);
            }
        }
    }
    _Pragma("GCC unroll 16") for (int r = 0; r < RP; r++)
        _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) dst[n * dst_stride + rs + r] = hsum(_mm256_add_ps(lo[r][n], hi[r][n]));
}

// All columns of one tile: one column with all R rows at once, several two by two in row pairs.
template <int R>
inline void f16_cols(const uint8_t * t, int64_t nch, const float * x, int64_t x_stride, int64_t n_col, float * dst,
                     int64_t dst_stride) {
    constexpr int RP = R % 2 == 0 ? 2 : 1;
    for (int64_t c = 0; c < n_col; c += 2) {
        const float * xc = x + c * x_stride;
        float * oc = dst + c * dst_stride;
        if (n_col - c == 1) {
            tile_f16<R, R, 1>(t, 0, nch, xc, x_stride, oc, dst_stride);
        } else {
            for (int rs = 0; rs < R; rs += RP) tile_f16<R, RP, 2>(t, rs, nch, xc, x_stride, oc, dst_stride);
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

template <bool Q4K, int R, int NC>
inline void tile_any(const uint8_t * t, int64_t nbp, const int8_t * y, const float * dy, const int32_t * sb,
                     int64_t col_stride, float * dst, int64_t dst_stride) {
    if constexpr (Q4K) tile_q4k<R, NC>(t, nbp, y, dy, sb, col_stride, dst, dst_stride);
    else tile_q8<R, NC>(t, nbp, y, dy, col_stride, dst, dst_stride);
}

// All columns of one tile, up to four at a time.
template <bool Q4K, int R>
inline void int8_cols(const uint8_t * t, int64_t nbp, const int8_t * y, const float * dy, const int32_t * sb,
                      int64_t col_stride, int64_t n_col, float * dst, int64_t dst_stride) {
    for (int64_t c = 0; c < n_col; c += 4) {
        const int8_t * yc = y + c * 256;
        const float * dc = dy + c * 8;
        const int32_t * sc = sb + c * 8;
        float * oc = dst + c * dst_stride;
        switch (n_col - c < 4 ? n_col - c : 4) {
            case 1: tile_any<Q4K, R, 1>(t, nbp, yc, dc, sc, col_stride, oc, dst_stride); break;
            case 2: tile_any<Q4K, R, 2>(t, nbp, yc, dc, sc, col_stride, oc, dst_stride); break;
            case 3: tile_any<Q4K, R, 3>(t, nbp, yc, dc, sc, col_stride, oc, dst_stride); break;
            default: tile_any<Q4K, R, 4>(t, nbp, yc, dc, sc, col_stride, oc, dst_stride); break;
        }
    }
}

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
    "avx2", "AVX2", quantize, {gemm_int8<false>, gemm_int8<true>, gemm_f16}, silu_mul, elu, attend,
};

} // namespace

const csm_kernel * csm_kernel_avx2() {
    static const bool ok = cpu_ok();
    return ok ? &KERNEL : nullptr;
}
