// csm_q8_kernel.cpp - AVX512 kernels for Q8_0, Q4_K (int8, VNNI) and F16 weights (see csm_q8_kernel.h).
//
// Built with -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mf16c -mfma where the compiler targets
// x86-64; elsewhere only the stubs below are compiled. Keep this file free of C++ library headers:
// inline library code compiled here with AVX512 enabled could be picked by the linker for other files.
#include "csm_q8_kernel.h"

// Where row r of a packed matrix of `rows` rows lies: in a tile of R rows (4, or 1 for the last
// rows % 4) starting at row r0, as its row ri.
struct tile_pos {
    int64_t R, r0, ri;
    tile_pos(int64_t r, int64_t rows) : R(r < rows / 4 * 4 ? 4 : 1), r0(R == 4 ? r / 4 * 4 : r), ri(r - r0) {}
};

void csm_q8_pack_rows(const uint8_t * src, size_t row_stride, int64_t rows, int64_t cols, uint8_t * out) {
    const int64_t nb = cols / 32, nbp = (nb + 7) / 8 * 8;
    for (int64_t r = 0; r < rows; r++) {
        const tile_pos tp(r, rows);
        const int64_t R = tp.R, r0 = tp.r0, ri = tp.ri;
        uint8_t * tile = out + r0 * nbp * 34;
        if (nb < nbp) { // zero the padding blocks of the last group (scales and quants)
            uint8_t * grp = tile + (nbp / 8 - 1) * R * 272;
            for (int64_t b = nb % 8; b < 8; b++) {
                grp[(ri * 8 + b) * 2] = grp[(ri * 8 + b) * 2 + 1] = 0;
                for (int i = 0; i < 32; i++) grp[R * 16 + ri * 256 + ((i / 4) * 8 + b) * 4 + i % 4] = 0;
            }
        }
        const uint8_t * row = src + r * row_stride;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t * blk = row + b * 34; // block_q8_0: fp16 scale, 32 int8 quants
            uint8_t * grp = tile + (b / 8) * R * 272;
            grp[(ri * 8 + b % 8) * 2] = blk[0];
            grp[(ri * 8 + b % 8) * 2 + 1] = blk[1];
            uint8_t * q = grp + R * 16 + ri * 256 + (b % 8) * 4;
            for (int m = 0; m < 8; m++) { // bytes 4m..4m+3 of the block to lane b % 8 of vector m, + 128
                uint32_t v;
                __builtin_memcpy(&v, blk + 2 + 4 * m, 4);
                v ^= 0x80808080u;
                __builtin_memcpy(q + m * 32, &v, 4);
            }
        }
    }
}


void csm_q4k_pack_rows(const uint8_t * src, size_t row_stride, int64_t rows, int64_t cols, uint8_t * out) {
    const int64_t ns = cols / 256;
    for (int64_t r = 0; r < rows; r++) {
        const tile_pos tp(r, rows);
        const int64_t R = tp.R, r0 = tp.r0, ri = tp.ri;
        uint8_t * tile = out + r0 * ns * 148;
        const uint8_t * row = src + r * row_stride;
        for (int64_t s = 0; s < ns; s++) {
            // block_q4_K: fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles
            const uint8_t * blk = row + s * 144;
            const uint8_t * sm = blk + 4;
            const uint8_t * qs = blk + 16;
            uint8_t * grp = tile + s * R * 148;
            uint8_t * hdr = grp + ri * 20;
            for (int i = 0; i < 4; i++) hdr[i] = blk[i];
            for (int j = 0; j < 8; j++) {
                const uint8_t sc = j < 4 ? (uint8_t) (sm[j] & 63) : (uint8_t) ((sm[j + 4] & 0xF) | ((sm[j - 4] >> 6) << 4));
                const uint8_t mn = j < 4 ? (uint8_t) (sm[j + 4] & 63) : (uint8_t) ((sm[j + 4] >> 4) | ((sm[j] >> 6) << 4));
                hdr[4 + j] = sc;
                hdr[12 + j] = mn;
            }
            uint8_t * q = grp + R * 20 + ri * 128;
            for (int i = 0; i < 128; i++) q[i] = 0;
            for (int j = 0; j < 8; j++) {          // sub-block j = lane j
                for (int e = 0; e < 32; e++) {     // its value e, in activation vector m = e / 4
                    const uint8_t v = (uint8_t) (j % 2 == 0 ? qs[32 * (j / 2) + e] & 0xF : qs[32 * (j / 2) + e] >> 4);
                    const int m = e / 4, k = m / 4 * 2 + m % 2, hi = m % 4 / 2;
                    q[k * 32 + j * 4 + e % 4] |= (uint8_t) (v << (4 * hi));
                }
            }
        }
    }
}

void csm_f16_pack_rows(const uint8_t * src, size_t row_stride, int64_t rows, int64_t cols, uint8_t * out) {
    const int64_t nch = cols / 16;
    for (int64_t r = 0; r < rows; r++) {
        const tile_pos tp(r, rows);
        const int64_t R = tp.R, r0 = tp.r0, ri = tp.ri;
        uint8_t * tile = out + r0 * cols * 2;
        const uint8_t * row = src + r * row_stride;
        for (int64_t c = 0; c < nch; c++) __builtin_memcpy(tile + (c * R + ri) * 32, row + c * 32, 32);
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && \
    defined(__F16C__) && defined(__FMA__)

#include <immintrin.h>

bool csm_q8_kernel_available() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
           __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
}

void csm_q8_quantize(const float * x, int64_t x_stride, int64_t n_col, int64_t K, int64_t nbp,
                     int8_t * y, float * dy, int32_t * sb) {
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

// exp(x) for x in [-88, 88]: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its Taylor series to r^7
// (relative error below 1e-8 there), times 2^n.
static inline __m512 exp_ps(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-88.0f)), _mm512_set1_ps(88.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x); // ln2 = 0.693359375 - 2.12194440e-4
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

void csm_silu_mul(const float * g, const float * u, float * out, int64_t n) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 k = n - i >= 16 ? (__mmask16) 0xFFFF : (__mmask16) ((1u << (n - i)) - 1);
        const __m512 gv = _mm512_maskz_loadu_ps(k, g + i), uv = _mm512_maskz_loadu_ps(k, u + i);
        const __m512 s = _mm512_div_ps(gv, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
        _mm512_mask_storeu_ps(out + i, k, _mm512_mul_ps(s, uv));
    }
}

// With several columns a tile is compute-heavy enough that the core stops running ahead of memory:
// fetch the weights this many bytes ahead into L2. (Measured on a Zen 5 host: B=4 steps 18 % faster with
// 4-8 KiB.)
static constexpr int64_t PREFETCH_BYTES = 6144;
// One column: Q8_0 is best left to the hardware prefetcher (it reads as fast as a plain read loop),
// but Q4_K and F16, with more instructions per byte, fall behind it; fetching 8 KiB ahead into L2
// makes one Q4_K stream 10-16 % faster and one F16 stream 5-7 % (Zen 5, frame-by-frame A/B; on an
// Intel Xeon, depth-decoder-sized Q4_K products 7-10 % faster).
static constexpr int64_t PREFETCH_1COL_BYTES = 8192;

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

template <int R, int NC>
static inline void zero(__m256 (&acc)[R][NC]) {
    _Pragma("GCC unroll 16") for (int r = 0; r < R; r++)
        _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) acc[r][n] = _mm256_setzero_ps();
}

// dst[n * dst_stride + r] = the sum of acc[r][n]'s lanes.
template <int R, int NC>
static inline void store(__m256 (&acc)[R][NC], float * dst, int64_t dst_stride) {
    _Pragma("GCC unroll 16") for (int r = 0; r < R; r++)
        _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) dst[n * dst_stride + r] = hsum(acc[r][n]);
}

// R rows x NC columns from one tile (see csm_q8_kernel.h); y, dy, sb: the first column. Lane l of
// the eight dot-product accumulators of a group collects block l, so one conversion and one FMA
// per group apply the eight blocks' scales.
template <int R, int NC>
static inline void tile(const uint8_t * t, int64_t nbp, const int8_t * y, const float * dy, const int32_t * sb,
                        int64_t col_stride, float * dst, int64_t dst_stride) {
    __m256 acc[R][NC];
    zero<R, NC>(acc);
    const int64_t group = R * (16 + 8 * 32);
    for (int64_t g = 0; g < nbp / 8; g++, t += group) {
        if (NC > 1) {
            _Pragma("GCC unroll 32") for (int64_t o = 0; o < group; o += 64)
                _mm_prefetch((const char *) t + PREFETCH_BYTES + o, _MM_HINT_T1);
        }
        const uint8_t * qt = t + R * 16;
        if constexpr (NC >= 3 && R % 2 == 0) {
            // many columns: rows in pairs with m outer, so each activation vector loaded serves
            // two rows (the loads, not the dot products, limit this case)
            _Pragma("GCC unroll 4") for (int r0 = 0; r0 < R; r0 += 2) {
                __m256i dot[2][NC];
                _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++)
                    dot[0][n] = dot[1][n] = _mm256_loadu_si256((const __m256i *) (sb + (g * col_stride + n) * 8));
                _Pragma("GCC unroll 8") for (int m = 0; m < 8; m++) {
                    __m256i yv[NC];
                    _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++)
                        yv[n] = _mm256_loadu_si256((const __m256i *) (y + (g * col_stride + n) * 256 + m * 32));
                    _Pragma("GCC unroll 2") for (int r = 0; r < 2; r++) {
                        const __m256i xv = _mm256_loadu_si256((const __m256i *) (qt + (r0 + r) * 256 + m * 32));
                        _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) dot[r][n] = _mm256_dpbusd_epi32(dot[r][n], xv, yv[n]);
                    }
                }
                _Pragma("GCC unroll 2") for (int r = 0; r < 2; r++) {
                    const __m256 dx = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (t + (r0 + r) * 16)));
                    _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) {
                        const __m256 sc = _mm256_mul_ps(dx, _mm256_loadu_ps(dy + (g * col_stride + n) * 8));
                        acc[r0 + r][n] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r][n]), sc, acc[r0 + r][n]);
                    }
                }
            }
        } else {
            _Pragma("GCC unroll 16") for (int r = 0; r < R; r++) {
                // two chains of dot products per column (even and odd m) halve the dependency latency
                __m256i dot[NC], dot2[NC];
                _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) {
                    dot[n] = _mm256_loadu_si256((const __m256i *) (sb + (g * col_stride + n) * 8));
                    dot2[n] = _mm256_setzero_si256();
                }
                _Pragma("GCC unroll 8") for (int m = 0; m < 8; m += 2) {
                    const __m256i x0 = _mm256_loadu_si256((const __m256i *) (qt + r * 256 + m * 32));
                    const __m256i x1 = _mm256_loadu_si256((const __m256i *) (qt + r * 256 + m * 32 + 32));
                    _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) {
                        const int8_t * yn = y + (g * col_stride + n) * 256 + m * 32;
                        dot[n] = _mm256_dpbusd_epi32(dot[n], x0, _mm256_loadu_si256((const __m256i *) yn));
                        dot2[n] = _mm256_dpbusd_epi32(dot2[n], x1, _mm256_loadu_si256((const __m256i *) (yn + 32)));
                    }
                }
                _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) dot[n] = _mm256_add_epi32(dot[n], dot2[n]);
                const __m256 dx = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (t + r * 16)));
                _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) {
                    const __m256 sc = _mm256_mul_ps(dx, _mm256_loadu_ps(dy + (g * col_stride + n) * 8));
                    acc[r][n] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[n]), sc, acc[r][n]);
                }
            }
        }
    }
    store<R, NC>(acc, dst, dst_stride);
}

// The same product with 512-bit dot products, for several columns, where the core's arithmetic
// rather than memory sets the pace (a prompt; a batch when memory is fast): on Zen 5 a zmm vpdpbusd
// does twice the work of a ymm one per cycle (Zen 4 splits it in two halves: no loss). One zmm load
// covers vectors m and m + 1, so lanes 0-7 of a dot product collect the even m and lanes 8-15 the
// odd m of blocks 0-7; the scales are applied to both halves, the halves summed at the end.
// (The masked forms of the shuffles: GCC 12 warns about the undefined source of the plain ones.)
static inline float hsum512(__m512 v) { // swap and add halves, quarters, pairs, neighbours
    v = _mm512_add_ps(v, _mm512_mask_shuffle_f32x4(v, 0xFFFF, v, v, 0x4E));
    v = _mm512_add_ps(v, _mm512_mask_shuffle_f32x4(v, 0xFFFF, v, v, 0xB1));
    v = _mm512_add_ps(v, _mm512_mask_permute_ps(v, 0xFFFF, v, 0x4E));
    v = _mm512_add_ps(v, _mm512_mask_permute_ps(v, 0xFFFF, v, 0xB1));
    return _mm512_cvtss_f32(v);
}
static inline __m512 dup8(__m256 v) { return _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(v))); }

template <int R, int NC>
static inline void tile_zmm(const uint8_t * t, int64_t nbp, const int8_t * y, const float * dy, const int32_t * sb,
                            int64_t col_stride, float * dst, int64_t dst_stride) {
    __m512 acc[R][NC];
    _Pragma("GCC unroll 16") for (int r = 0; r < R; r++)
        _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) acc[r][n] = _mm512_setzero_ps();
    const int64_t group = R * (16 + 8 * 32);
    constexpr int RP = R % 2 == 0 ? 2 : 1; // rows per pass
    for (int64_t g = 0; g < nbp / 8; g++, t += group) {
        if (NC > 1) {
            _Pragma("GCC unroll 32") for (int64_t o = 0; o < group; o += 64)
                _mm_prefetch((const char *) t + PREFETCH_BYTES + o, _MM_HINT_T1);
        }
        const uint8_t * qt = t + R * 16;
        _Pragma("GCC unroll 4") for (int r0 = 0; r0 < R; r0 += RP) {
            __m512i dot[RP][NC];
            _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) {
                const __m512i s = _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *) (sb + (g * col_stride + n) * 8)));
                _Pragma("GCC unroll 2") for (int r = 0; r < RP; r++) dot[r][n] = s;
            }
            _Pragma("GCC unroll 4") for (int m2 = 0; m2 < 4; m2++) {
                __m512i yv[NC];
                _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++)
                    yv[n] = _mm512_loadu_si512((const void *) (y + (g * col_stride + n) * 256 + m2 * 64));
                _Pragma("GCC unroll 2") for (int r = 0; r < RP; r++) {
                    const __m512i xv = _mm512_loadu_si512((const void *) (qt + (r0 + r) * 256 + m2 * 64));
                    _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) dot[r][n] = _mm512_dpbusd_epi32(dot[r][n], xv, yv[n]);
                }
            }
            _Pragma("GCC unroll 2") for (int r = 0; r < RP; r++) {
                const __m512 dx = _mm512_cvtph_ps(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *) (t + (r0 + r) * 16))));
                _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) {
                    const __m512 sc = _mm512_mul_ps(dx, dup8(_mm256_loadu_ps(dy + (g * col_stride + n) * 8)));
                    acc[r0 + r][n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r][n]), sc, acc[r0 + r][n]);
                }
            }
        }
    }
    _Pragma("GCC unroll 16") for (int r = 0; r < R; r++)
        _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) dst[n * dst_stride + r] = hsum512(acc[r][n]);
}

// Q4_K tile: lane l of the dot products collects sub-block l (unsigned 4-bit quants, so no offset);
// value = d * sc_l * q - dmin * m_l, hence per group: acc += d sc dy . dot - dmin m . (dy sum(y)).
template <int R, int NC>
static inline void tile_q4k(const uint8_t * t, int64_t nbp, const int8_t * y, const float * dy, const int32_t * sb,
                            int64_t col_stride, float * dst, int64_t dst_stride) {
    __m256 acc[R][NC];
    zero<R, NC>(acc);
    const int64_t group = R * 148;
    const __m256i low = _mm256_set1_epi8(0x0F);
    const __m256 neg128 = _mm256_set1_ps(-1.0f / 128.0f);
    for (int64_t g = 0; g < nbp / 8; g++, t += group) {
        _Pragma("GCC unroll 32") for (int64_t o = 0; o < group; o += 64)
            _mm_prefetch((const char *) t + (NC > 1 ? PREFETCH_BYTES : PREFETCH_1COL_BYTES) + o, _MM_HINT_T1);
        __m256 ysum[NC]; // dy * sum(y) per block (sb = -128 * sum(y))
        _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) {
            const __m256 s = _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *) (sb + (g * col_stride + n) * 8)));
            ysum[n] = _mm256_mul_ps(_mm256_mul_ps(s, neg128), _mm256_loadu_ps(dy + (g * col_stride + n) * 8));
        }
        const uint8_t * qt = t + R * 20;
        _Pragma("GCC unroll 16") for (int r = 0; r < R; r++) {
            __m256i dot[NC], dot2[NC];
            _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) dot[n] = dot2[n] = _mm256_setzero_si256();
            _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) {
                // vector k: activation vector m = k / 2 * 4 + k % 2 in the low nibbles, m + 2 in the high
                const __m256i p = _mm256_loadu_si256((const __m256i *) (qt + r * 128 + k * 32));
                const __m256i x0 = _mm256_and_si256(p, low);
                const __m256i x1 = _mm256_and_si256(_mm256_srli_epi16(p, 4), low);
                _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) {
                    const int8_t * yn = y + (g * col_stride + n) * 256 + (k / 2 * 4 + k % 2) * 32;
                    dot[n] = _mm256_dpbusd_epi32(dot[n], x0, _mm256_loadu_si256((const __m256i *) yn));
                    dot2[n] = _mm256_dpbusd_epi32(dot2[n], x1, _mm256_loadu_si256((const __m256i *) (yn + 64)));
                }
            }
            const uint8_t * h = t + r * 20;
            uint16_t d16, m16;
            __builtin_memcpy(&d16, h, 2);
            __builtin_memcpy(&m16, h + 2, 2);
            const __m256 dsc = _mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss(d16)),
                                             _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *) (h + 4)))));
            const __m256 dmn = _mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss(m16)),
                                             _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *) (h + 12)))));
            _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) {
                const __m256i dt = _mm256_add_epi32(dot[n], dot2[n]);
                const __m256 sc = _mm256_mul_ps(dsc, _mm256_loadu_ps(dy + (g * col_stride + n) * 8));
                acc[r][n] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dt), sc, acc[r][n]);
                acc[r][n] = _mm256_fnmadd_ps(dmn, ysum[n], acc[r][n]);
            }
        }
    }
    store<R, NC>(acc, dst, dst_stride);
}

// Q4_K with 512-bit dot products (several columns): the 64 bytes of vectors 2J and 2J + 1 hold
// activation vectors 4J, 4J + 1 in their low nibbles and 4J + 2, 4J + 3 in their high nibbles, so
// each nibble half pairs with one contiguous zmm of activations. Lanes 8-15 repeat blocks 0-7: the
// scales are duplicated, the min term (once per block) goes to lanes 0-7 only.
template <int R, int NC>
static inline void tile_q4k_zmm(const uint8_t * t, int64_t nbp, const int8_t * y, const float * dy, const int32_t * sb,
                                int64_t col_stride, float * dst, int64_t dst_stride) {
    __m512 acc[R][NC];
    _Pragma("GCC unroll 16") for (int r = 0; r < R; r++)
        _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) acc[r][n] = _mm512_setzero_ps();
    const int64_t group = R * 148;
    constexpr int RP = R % 2 == 0 ? 2 : 1; // rows per pass
    const __m512i low = _mm512_set1_epi8(0x0F);
    const __m256 neg128 = _mm256_set1_ps(-1.0f / 128.0f);
    for (int64_t g = 0; g < nbp / 8; g++, t += group) {
        _Pragma("GCC unroll 32") for (int64_t o = 0; o < group; o += 64)
            _mm_prefetch((const char *) t + PREFETCH_BYTES + o, _MM_HINT_T1);
        alignas(32) float ysum[NC][8]; // dy * sum(y) per block (sb = -128 * sum(y)), once per group
        _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) {
            const __m256 sy = _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *) (sb + (g * col_stride + n) * 8)));
            _mm256_store_ps(ysum[n], _mm256_mul_ps(_mm256_mul_ps(sy, neg128), _mm256_loadu_ps(dy + (g * col_stride + n) * 8)));
        }
        const uint8_t * qt = t + R * 20;
        _Pragma("GCC unroll 4") for (int r0 = 0; r0 < R; r0 += RP) {
            __m512i dot[RP][NC];
            _Pragma("GCC unroll 2") for (int r = 0; r < RP; r++)
                _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) dot[r][n] = _mm512_setzero_si512();
            _Pragma("GCC unroll 2") for (int J = 0; J < 2; J++) {
                _Pragma("GCC unroll 2") for (int hi = 0; hi < 2; hi++) {
                    __m512i yv[NC];
                    _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++)
                        yv[n] = _mm512_loadu_si512((const void *) (y + (g * col_stride + n) * 256 + J * 128 + hi * 64));
                    _Pragma("GCC unroll 2") for (int r = 0; r < RP; r++) {
                        const __m512i p = _mm512_loadu_si512((const void *) (qt + (r0 + r) * 128 + J * 64));
                        const __m512i xv = _mm512_and_si512(hi ? _mm512_srli_epi16(p, 4) : p, low);
                        _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) dot[r][n] = _mm512_dpbusd_epi32(dot[r][n], xv, yv[n]);
                    }
                }
            }
            _Pragma("GCC unroll 2") for (int r = 0; r < RP; r++) {
                const uint8_t * h = t + (r0 + r) * 20;
                uint16_t d16, m16;
                __builtin_memcpy(&d16, h, 2);
                __builtin_memcpy(&m16, h + 2, 2);
                const __m512 dsc = dup8(_mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss(d16)),
                                                      _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *) (h + 4))))));
                const __m512 dmn = _mm512_zextps256_ps512(_mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss(m16)),
                    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *) (h + 12))))));
                _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) {
                    const __m512 sc = _mm512_mul_ps(dsc, dup8(_mm256_loadu_ps(dy + (g * col_stride + n) * 8)));
                    acc[r0 + r][n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r][n]), sc, acc[r0 + r][n]);
                    acc[r0 + r][n] = _mm512_fnmadd_ps(dmn, _mm512_zextps256_ps512(_mm256_load_ps(ysum[n])), acc[r0 + r][n]);
                }
            }
        }
    }
    _Pragma("GCC unroll 16") for (int r = 0; r < R; r++)
        _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) dst[n * dst_stride + r] = hsum512(acc[r][n]);
}

// F16 tile: per chunk of 16 columns, the R rows' 16 halves converted to fp32 and multiplied into
// the NC activation columns with fp32 FMAs (the activations are not rounded).
template <int R, int NC>
static inline void tile_f16(const uint8_t * t, int64_t nch, const float * x, int64_t x_stride, float * dst,
                            int64_t dst_stride) {
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
static inline void tile_f16_cols(const uint8_t * t, int64_t nch, const float * x, int64_t x_stride, int64_t n_col,
                                 float * dst, int64_t dst_stride) {
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

void csm_f16_gemm(const uint8_t * w, int64_t rows, int64_t cols, int64_t r0, int64_t r1, const float * x,
                  int64_t x_stride, int64_t n_col, float * dst, int64_t dst_stride) {
    const int64_t full = rows / 4 * 4, nch = cols / 16;
    int64_t r = r0;
    for (; r + 4 <= r1 && r + 4 <= full; r += 4) tile_f16_cols<4>(w + r * cols * 2, nch, x, x_stride, n_col, dst + r, dst_stride);
    for (; r < r1; r++) tile_f16_cols<1>(w + r * cols * 2, nch, x, x_stride, n_col, dst + r, dst_stride);
}

template <bool Q4K, int R, int NC>
static inline void tile_any(const uint8_t * t, int64_t nbp, const int8_t * y, const float * dy, const int32_t * sb,
                            int64_t col_stride, float * dst, int64_t dst_stride) {
    if constexpr (Q4K && NC > 1) tile_q4k_zmm<R, NC>(t, nbp, y, dy, sb, col_stride, dst, dst_stride);
    else if constexpr (Q4K) tile_q4k<R, NC>(t, nbp, y, dy, sb, col_stride, dst, dst_stride);
    else if constexpr (NC > 1) tile_zmm<R, NC>(t, nbp, y, dy, sb, col_stride, dst, dst_stride);
    else tile<R, NC>(t, nbp, y, dy, sb, col_stride, dst, dst_stride);
}

// All columns of one tile, four at a time.
template <bool Q4K, int R>
static inline void tile_cols(const uint8_t * t, int64_t nbp, const int8_t * y, const float * dy, const int32_t * sb,
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

// Rows [r0, r1): whole 4-row tiles, then the last rows % 4 rows one by one.
template <bool Q4K>
static void gemm(const uint8_t * w, int64_t rows, int64_t nbp, int64_t row_bytes, int64_t r0, int64_t r1,
                 const int8_t * y, const float * dy, const int32_t * sb, int64_t col_stride, int64_t n_col,
                 float * dst, int64_t dst_stride) {
    const int64_t full = rows / 4 * 4;
    int64_t r = r0;
    for (; r + 4 <= r1 && r + 4 <= full; r += 4) {
        tile_cols<Q4K, 4>(w + r * row_bytes, nbp, y, dy, sb, col_stride, n_col, dst + r, dst_stride);
    }
    for (; r < r1; r++) tile_cols<Q4K, 1>(w + r * row_bytes, nbp, y, dy, sb, col_stride, n_col, dst + r, dst_stride);
}

void csm_q8_gemm(const uint8_t * w, int64_t rows, int64_t nbp, int64_t r0, int64_t r1,
                 const int8_t * y, const float * dy, const int32_t * sb, int64_t col_stride, int64_t n_col,
                 float * dst, int64_t dst_stride) {
    gemm<false>(w, rows, nbp, nbp * 34, r0, r1, y, dy, sb, col_stride, n_col, dst, dst_stride);
}

void csm_q4k_gemm(const uint8_t * w, int64_t rows, int64_t nbp, int64_t r0, int64_t r1,
                  const int8_t * y, const float * dy, const int32_t * sb, int64_t col_stride, int64_t n_col,
                  float * dst, int64_t dst_stride) {
    gemm<true>(w, rows, nbp, nbp / 8 * 148, r0, r1, y, dy, sb, col_stride, n_col, dst, dst_stride);
}

#else // no AVX512-VNNI in this build

void csm_silu_mul(const float *, const float *, float *, int64_t) { __builtin_trap(); }

bool csm_q8_kernel_available() { return false; }

void csm_q8_quantize(const float *, int64_t, int64_t, int64_t, int64_t, int8_t *, float *, int32_t *) {
    __builtin_trap();
}

void csm_q8_gemm(const uint8_t *, int64_t, int64_t, int64_t, int64_t, const int8_t *, const float *, const int32_t *,
                 int64_t, int64_t, float *, int64_t) {
    __builtin_trap();
}

void csm_q4k_gemm(const uint8_t *, int64_t, int64_t, int64_t, int64_t, const int8_t *, const float *, const int32_t *,
                  int64_t, int64_t, float *, int64_t) {
    __builtin_trap();
}

void csm_f16_gemm(const uint8_t *, int64_t, int64_t, int64_t, int64_t, const float *, int64_t, int64_t, float *, int64_t) {
    __builtin_trap();
}

#endif
