// neon.cpp - the NEON kernel (kernel.h) for 64-bit ARM with the dot-product extension: Q8_0 and
// Q4_K as int8 dot products (SDOT), F16 as f32 FMAs. The only file built with -march=armv8.2-a+dotprod
// (and, with GCC, -fno-schedule-insns: GCC 12's scheduling before register allocation hoists the
// unrolled loads of a tile and spills, 297 vector spills and reloads in a Q8_0 4-row, 2-column tile
// with it, none without, counted in the aarch64 disassembly). Keep it free of C++ library headers:
// inline library code compiled here with the dot-product extension could be picked by the linker for
// other files.
//
// Batch invariance (kernel.h): every column goes through the same float operations whatever the
// number of columns in a pass, and the x86 kernels' operations: exact integer dot products per block,
// then per group of 8 blocks one fused multiply-add per lane (8 lanes, block l in lane l: two 4-lane
// accumulators) into that row and column's own accumulators, summed at the end in kernel.h's tree.
//
// Speed: not measured; pycsm's hosts are x86, where this file is checked for correctness only, under
// qemu-user (tests/native/neon_kernel_check.cpp, .ci/neon). The choices below follow the cores'
// published widths (2-4 SDOT and 2-4 FMA pipes, 32 vector registers), not a profile. No i8mm path:
// its SMMLA/USMMLA multiply 8-byte segments of two rows by two columns, which the shared packed
// layouts (4-byte lanes, one block each) do not hold, and its USDOT would only save the one EOR per
// 16 weight bytes below; neither can be weighed without an ARM host.
#include "kernel.h"

#if !defined(__aarch64__) || !defined(__ARM_FEATURE_DOTPROD)
#error "kernels/neon.cpp is built for aarch64 with -march=armv8.2-a+dotprod (CMakeLists.txt)"
#endif

#include <arm_neon.h>

#if defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20) // Linux's arch/arm64 uapi hwcap.h
#endif
#elif defined(__APPLE__)
#include <sys/sysctl.h>
#endif

namespace {

// ASIMD with SDOT/UDOT (Armv8.2 dotprod, standard from Armv8.4).
bool cpu_ok() {
#if defined(__linux__)
    return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#elif defined(__APPLE__)
    int v = 0;
    size_t n = sizeof v;
    return sysctlbyname("hw.optional.arm.FEAT_DotProd", &v, &n, nullptr, 0) == 0 && v != 0;
#else
    return false; // no way to ask this system; ggml's kernels run instead
#endif
}

void quantize(const float * x, int64_t x_stride, int64_t n_col, int64_t K, int64_t nbp, int8_t * y, float * dy,
              int32_t * sb) {
    const int64_t nb = K / 32;
    for (int64_t c = 0; c < n_col; c++) {
        const float * xc = x + c * x_stride;
        for (int64_t b = 0; b < nb; b++) {
            float32x4_t v[8];
            _Pragma("GCC unroll 16") for (int i = 0; i < 8; i++) v[i] = vld1q_f32(xc + b * 32 + i * 4);
            float32x4_t a = vabsq_f32(v[0]);
            _Pragma("GCC unroll 16") for (int i = 1; i < 8; i++) a = vmaxq_f32(a, vabsq_f32(v[i]));
            const float amax = vmaxvq_f32(a);
            const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
            int32x4_t q[8];
            int32x4_t s = vdupq_n_s32(0); // the sum of the block's quants
            _Pragma("GCC unroll 16") for (int i = 0; i < 8; i++) {
                q[i] = vcvtnq_s32_f32(vmulq_n_f32(v[i], id)); // round to nearest even
                s = vaddq_s32(s, q[i]);
            }
            // vector q[m] holds bytes 4m..4m+3 of the block: they go to lane b % 8 of vector m
            const int64_t gi = (b / 8) * n_col + c;
            int32_t * grp = (int32_t *) (y + gi * 256);
            _Pragma("GCC unroll 16") for (int h = 0; h < 2; h++) {
                const int16x8_t lo = vcombine_s16(vqmovn_s32(q[4 * h]), vqmovn_s32(q[4 * h + 1]));
                const int16x8_t hi = vcombine_s16(vqmovn_s32(q[4 * h + 2]), vqmovn_s32(q[4 * h + 3]));
                const int32x4_t bytes = vreinterpretq_s32_s8(vcombine_s8(vqmovn_s16(lo), vqmovn_s16(hi)));
                grp[(4 * h + 0) * 8 + b % 8] = vgetq_lane_s32(bytes, 0);
                grp[(4 * h + 1) * 8 + b % 8] = vgetq_lane_s32(bytes, 1);
                grp[(4 * h + 2) * 8 + b % 8] = vgetq_lane_s32(bytes, 2);
                grp[(4 * h + 3) * 8 + b % 8] = vgetq_lane_s32(bytes, 3);
            }
            dy[gi * 8 + b % 8] = amax / 127.0f;
            sb[gi * 8 + b % 8] = -128 * vaddvq_s32(s);
        }
        for (int64_t b = nb; b < nbp; b++) {
            const int64_t gi = (b / 8) * n_col + c;
            int32_t * grp = (int32_t *) (y + gi * 256);
            _Pragma("GCC unroll 16") for (int m = 0; m < 8; m++) grp[m * 8 + b % 8] = 0;
            dy[gi * 8 + b % 8] = 0.0f;
            sb[gi * 8 + b % 8] = 0;
        }
    }
}

// x = n ln2 + r with n = round(x / ln2), |r| <= ln2 / 2 (ln2 = 0.693359375 - 2.12194440e-4, two steps).
inline float32x4_t reduce_ln2(float32x4_t x, float32x4_t & n) {
    n = vrndnq_f32(vmulq_n_f32(x, 1.44269504088896341f));
    const float32x4_t r = vfmsq_f32(x, n, vdupq_n_f32(0.693359375f));
    return vfmsq_f32(r, n, vdupq_n_f32(-2.12194440e-4f));
}

// c[0] r^(N-1) + ... + c[N-1] by Horner's rule.
template <int N>
inline float32x4_t horner(float32x4_t r, const float (&c)[N]) {
    float32x4_t p = vdupq_n_f32(c[0]);
    for (int i = 1; i < N; i++) p = vfmaq_f32(vdupq_n_f32(c[i]), p, r);
    return p;
}

// 2^n for integral n in [-127, 127], built in the exponent field (2^-127 comes out as 0).
inline float32x4_t pow2(float32x4_t n) {
    return vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23));
}

// exp(x) for x in [-88, 88]: exp(r) (kernel.h's series) times 2^n (2^-127 as 0 only moves exp(-88)
// from 6e-39 to 0).
inline float32x4_t exp_ps(float32x4_t x) {
    float32x4_t n;
    const float32x4_t r = reduce_ln2(vminq_f32(vmaxq_f32(x, vdupq_n_f32(-88.0f)), vdupq_n_f32(88.0f)), n);
    return vmulq_f32(horner(r, CSM_EXP_SERIES), pow2(n));
}

// exp(x) - 1 for x in [-87, 0.35], as in avx512.cpp.
inline float32x4_t expm1_ps(float32x4_t x) {
    float32x4_t n;
    const float32x4_t r = reduce_ln2(vmaxq_f32(x, vdupq_n_f32(-87.0f)), n);
    const float32x4_t p2 = pow2(n);
    return vaddq_f32(vmulq_f32(vmulq_f32(r, horner(r, CSM_EXPM1_SERIES)), p2), vsubq_f32(p2, vdupq_n_f32(1.0f)));
}

// Attention (kernel.h), as in avx512.cpp: the block's queries four lanes at a time (only the
// quarters holding queries), the same operations per lane, lanes past a query's n_keys kept by
// selects.
void attend(const csm_attn_block & a) {
    const int64_t hd = a.hd;
    alignas(16) int32_t nk[16];
    const int32_t L = csm_attn_begin(a, nk);
    if (L == 0) return;
    float * qt = a.scratch, * st = qt + hd * 16, * tmp = st + (int64_t) L * 16;
    const float32x4_t scale = vdupq_n_f32(a.scale);
    for (int h = 0; h * 4 < a.n_q; h++) {
        const int32x4_t nkv = vld1q_s32(nk + h * 4);
        float * sh = st + h * 4;
        const float * qh = qt + h * 4;
        for (int32_t j0 = 0; j0 < L; j0 += 8) {
            const float * kr[8];
            for (int u = 0; u < 8; u++) kr[u] = a.k + (int64_t) (j0 + u < L ? j0 + u : L - 1) * a.k_stride;
            float32x4_t acc[8];
            for (int u = 0; u < 8; u++) acc[u] = vdupq_n_f32(0.0f);
            for (int64_t d = 0; d < hd; d++) {
                const float32x4_t qv = vld1q_f32(qh + d * 16);
                for (int u = 0; u < 8; u++) acc[u] = vfmaq_f32(acc[u], qv, vdupq_n_f32(kr[u][d]));
            }
            for (int u = 0; u < 8; u++)
                if (j0 + u < L) vst1q_f32(sh + (int64_t) (j0 + u) * 16, vmulq_f32(acc[u], scale));
        }
        float32x4_t mx = vdupq_n_f32(-__builtin_inff());
        for (int32_t j = 0; j < L; j++) {
            const uint32x4_t m = vcgtq_s32(nkv, vdupq_n_s32(j));
            mx = vbslq_f32(m, vmaxq_f32(mx, vld1q_f32(sh + (int64_t) j * 16)), mx);
        }
        float32x4_t sum = vdupq_n_f32(0.0f);
        for (int32_t j = 0; j < L; j++) {
            const uint32x4_t m = vcgtq_s32(nkv, vdupq_n_s32(j));
            const float32x4_t e = exp_ps(vsubq_f32(vld1q_f32(sh + (int64_t) j * 16), mx));
            vst1q_f32(sh + (int64_t) j * 16, e);
            sum = vbslq_f32(m, vaddq_f32(sum, e), sum);
        }
        const uint32x4_t pos = vcgtq_f32(sum, vdupq_n_f32(0.0f));
        const float32x4_t inv = vbslq_f32(pos, vdivq_f32(vdupq_n_f32(1.0f), sum), vdupq_n_f32(0.0f));
        for (int64_t d0 = 0; d0 < hd; d0 += 8) {
            const float * vr = a.vt + d0 * a.vt_stride;
            float32x4_t acc[8];
            for (int u = 0; u < 8; u++) acc[u] = vdupq_n_f32(0.0f);
            for (int32_t j = 0; j < L; j++) {
                const uint32x4_t m = vcgtq_s32(nkv, vdupq_n_s32(j));
                const float32x4_t p = vld1q_f32(sh + (int64_t) j * 16);
                for (int u = 0; u < 8; u++)
                    acc[u] = vbslq_f32(m, vfmaq_f32(acc[u], p, vdupq_n_f32(vr[u * a.vt_stride + j])), acc[u]);
            }
            for (int u = 0; u < 8; u++) vst1q_f32(tmp + u * 4, vmulq_f32(acc[u], inv));
            for (int i = h * 4; i < a.n_q && i < h * 4 + 4; i++)
                for (int u = 0; u < 8; u++) a.out[i][d0 + u] = tmp[u * 4 + i - h * 4];
        }
    }
}

inline float32x4_t elu4(float32x4_t v) {
    const float32x4_t e = expm1_ps(vminq_f32(v, vdupq_n_f32(0.0f)));
    return vbslq_f32(vcgtq_f32(v, vdupq_n_f32(0.0f)), v, e);
}

void elu(const float * x, float * out, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(out + i, elu4(vld1q_f32(x + i)));
    if (i < n) { // the last n % 4 values, lane for lane as above
        float xt[4] = {0, 0, 0, 0}, ot[4];
        for (int64_t j = i; j < n; j++) xt[j - i] = x[j];
        vst1q_f32(ot, elu4(vld1q_f32(xt)));
        for (int64_t j = i; j < n; j++) out[j] = ot[j - i];
    }
}

inline float32x4_t silu_mul4(float32x4_t g, float32x4_t u) {
    const float32x4_t e = exp_ps(vnegq_f32(g));
    return vmulq_f32(vdivq_f32(g, vaddq_f32(vdupq_n_f32(1.0f), e)), u);
}

void silu_mul(const float * g, const float * u, float * out, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(out + i, silu_mul4(vld1q_f32(g + i), vld1q_f32(u + i)));
    if (i < n) { // the last n % 4 values, lane for lane as above
        float gt[4] = {0, 0, 0, 0}, ut[4] = {0, 0, 0, 0}, ot[4];
        for (int64_t j = i; j < n; j++) { gt[j - i] = g[j]; ut[j - i] = u[j]; }
        vst1q_f32(ot, silu_mul4(vld1q_f32(gt), vld1q_f32(ut)));
        for (int64_t j = i; j < n; j++) out[j] = ot[j - i];
    }
}

// Eight fp16 values (unaligned) as two f32 vectors: values 0-3 and 4-7.
inline void load_f16x8(const uint8_t * p, float32x4_t & lo, float32x4_t & hi) {
    const float16x8_t h = vreinterpretq_f16_u8(vld1q_u8(p));
    lo = vcvt_f32_f16(vget_low_f16(h));
    hi = vcvt_high_f32_f16(h);
}

// dst[n * dst_stride + r] = the sum of acc[r][n]'s 8 lanes (blocks 0-3, 4-7) in kernel.h's tree:
// halves (lane l + lane l + 4), pairs (l + l + 2), neighbours, as the x86 kernels' hsum.
template <int R, int NC>
inline void store(const float32x4_t (&acc)[R][NC][2], float * dst, int64_t dst_stride) {
    _Pragma("GCC unroll 16") for (int r = 0; r < R; r++)
        _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) {
            const float32x4_t h = vaddq_f32(acc[r][n][0], acc[r][n][1]);
            dst[n * dst_stride + r] = vpadds_f32(vadd_f32(vget_low_f32(h), vget_high_f32(h)));
        }
}

// The int8 tiles below hold R x NC x 2 dot products and as many float accumulators in registers and
// load each activation vector once per group for all R rows: R x NC = 4 (4 rows x 1 column, 1 row x
// 4 columns) gives 16 of the 32 vector registers, plus the activations and weights (R x NC = 8
// spills). Per row and column the two dot products and the two accumulators hold blocks (sub-blocks)
// 0-3 and 4-7 of a group, lane l block l.

// Q8_0 tile of R rows (kernel.h) times NC columns; y, dy: the first column. The weights
// are stored as q + 128; XOR 0x80 gives back the signed q, so SDOT needs no offset term (sb is unused).
template <int R, int NC>
inline void tile_q8(const uint8_t * t, int64_t nbp, const int8_t * y, const float * dy, int64_t col_stride,
                    float * dst, int64_t dst_stride) {
    float32x4_t acc[R][NC][2];
    _Pragma("GCC unroll 16") for (int r = 0; r < R; r++)
        _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) acc[r][n][0] = acc[r][n][1] = vdupq_n_f32(0.0f);
    const uint8x16_t flip = vdupq_n_u8(0x80);
    for (int64_t g = 0; g < nbp / 8; g++, t += R * 272) {
        const uint8_t * qt = t + R * 16;
        int32x4_t d[R][NC][2];
        _Pragma("GCC unroll 16") for (int r = 0; r < R; r++)
            _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) d[r][n][0] = d[r][n][1] = vdupq_n_s32(0);
        _Pragma("GCC unroll 8") for (int m = 0; m < 8; m++) {
            int8x16_t yv[NC][2];
            _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) {
                const int8_t * yn = y + (g * col_stride + n) * 256 + m * 32;
                yv[n][0] = vld1q_s8(yn);
                yv[n][1] = vld1q_s8(yn + 16);
            }
            _Pragma("GCC unroll 16") for (int r = 0; r < R; r++) {
                const int8x16_t w0 = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(qt + r * 256 + m * 32), flip));
                const int8x16_t w1 = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(qt + r * 256 + m * 32 + 16), flip));
                _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) {
                    d[r][n][0] = vdotq_s32(d[r][n][0], w0, yv[n][0]);
                    d[r][n][1] = vdotq_s32(d[r][n][1], w1, yv[n][1]);
                }
            }
        }
        _Pragma("GCC unroll 16") for (int r = 0; r < R; r++) {
            float32x4_t dx0, dx1;
            load_f16x8(t + r * 16, dx0, dx1);
            _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) {
                const float * dn = dy + (g * col_stride + n) * 8;
                acc[r][n][0] = vfmaq_f32(acc[r][n][0], vcvtq_f32_s32(d[r][n][0]), vmulq_f32(dx0, vld1q_f32(dn)));
                acc[r][n][1] = vfmaq_f32(acc[r][n][1], vcvtq_f32_s32(d[r][n][1]), vmulq_f32(dx1, vld1q_f32(dn + 4)));
            }
        }
    }
    store<R, NC>(acc, dst, dst_stride);
}

// Q4_K tile: lane l of the dot products collects sub-block l (4-bit quants, 0..15, are already
// valid signed bytes); value = d * sc_l * q - dmin * m_l, hence per group and 4 sub-blocks:
// acc += d sc dy . dot, then acc -= dmin m . (dy sum(y)), with sum(y) = sb / -128.
template <int R, int NC>
inline void tile_q4k(const uint8_t * t, int64_t nbp, const int8_t * y, const float * dy, const int32_t * sb,
                     int64_t col_stride, float * dst, int64_t dst_stride) {
    float32x4_t acc[R][NC][2];
    _Pragma("GCC unroll 16") for (int r = 0; r < R; r++)
        _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) acc[r][n][0] = acc[r][n][1] = vdupq_n_f32(0.0f);
    const uint8x16_t low = vdupq_n_u8(0x0F);
    for (int64_t g = 0; g < nbp / 8; g++, t += R * 148) {
        const uint8_t * qt = t + R * 20;
        int32x4_t d[R][NC][2];
        _Pragma("GCC unroll 16") for (int r = 0; r < R; r++)
            _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) d[r][n][0] = d[r][n][1] = vdupq_n_s32(0);
        _Pragma("GCC unroll 8") for (int kh = 0; kh < 8; kh++) {
            // half h of vector k: activation vector m = k / 2 * 4 + k % 2 in the low nibbles, m + 2 in the high
            const int k = kh / 2, h = kh % 2;
            int8x16_t ylo[NC], yhi[NC];
            _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) {
                const int8_t * yn = y + (g * col_stride + n) * 256 + (k / 2 * 4 + k % 2) * 32 + h * 16;
                ylo[n] = vld1q_s8(yn);
                yhi[n] = vld1q_s8(yn + 64);
            }
            _Pragma("GCC unroll 16") for (int r = 0; r < R; r++) {
                const uint8x16_t p = vld1q_u8(qt + r * 128 + k * 32 + h * 16);
                const int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(p, low)), hi = vreinterpretq_s8_u8(vshrq_n_u8(p, 4));
                _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++)
                    d[r][n][h] = vdotq_s32(vdotq_s32(d[r][n][h], lo, ylo[n]), hi, yhi[n]);
            }
        }
        float32x4_t ys[NC][2]; // dy * sum(y) of sub-blocks 0-3 and 4-7
        _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) {
            const int64_t o = (g * col_stride + n) * 8;
            ys[n][0] = vmulq_f32(vmulq_n_f32(vcvtq_f32_s32(vld1q_s32(sb + o)), -1.0f / 128.0f), vld1q_f32(dy + o));
            ys[n][1] = vmulq_f32(vmulq_n_f32(vcvtq_f32_s32(vld1q_s32(sb + o + 4)), -1.0f / 128.0f), vld1q_f32(dy + o + 4));
        }
        _Pragma("GCC unroll 16") for (int r = 0; r < R; r++) {
            // the row's header: fp16 d, fp16 dmin, 8 scales, 8 mins
            const uint8_t * hd = t + r * 20;
            const float32x4_t dm = vcvt_f32_f16(vreinterpret_f16_u8(vld1_u8(hd))); // lanes 0, 1: d, dmin
            const float dd = vgetq_lane_f32(dm, 0), dmin = vgetq_lane_f32(dm, 1);
            const uint16x8_t sc = vmovl_u8(vld1_u8(hd + 4)), mn = vmovl_u8(vld1_u8(hd + 12));
            const float32x4_t dsc0 = vmulq_n_f32(vcvtq_f32_u32(vmovl_u16(vget_low_u16(sc))), dd);
            const float32x4_t dsc1 = vmulq_n_f32(vcvtq_f32_u32(vmovl_high_u16(sc)), dd);
            const float32x4_t dmn0 = vmulq_n_f32(vcvtq_f32_u32(vmovl_u16(vget_low_u16(mn))), dmin);
            const float32x4_t dmn1 = vmulq_n_f32(vcvtq_f32_u32(vmovl_high_u16(mn)), dmin);
            _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) {
                const float * dn = dy + (g * col_stride + n) * 8;
                acc[r][n][0] = vfmsq_f32(vfmaq_f32(acc[r][n][0], vcvtq_f32_s32(d[r][n][0]), vmulq_f32(dsc0, vld1q_f32(dn))), dmn0, ys[n][0]);
                acc[r][n][1] = vfmsq_f32(vfmaq_f32(acc[r][n][1], vcvtq_f32_s32(d[r][n][1]), vmulq_f32(dsc1, vld1q_f32(dn + 4))), dmn1, ys[n][1]);
            }
        }
    }
    store<R, NC>(acc, dst, dst_stride);
}

// F16 tile: per chunk of 16 columns, the R rows' 16 halves converted to f32 and multiplied into the
// NC activation columns (not rounded) with f32 FMAs. Two accumulators per row and column (values
// 0-3 and 8-11, 4-7 and 12-15) halve the chain of dependent FMAs a single column waits on.
template <int R, int NC>
inline void tile_f16(const uint8_t * t, int64_t nch, const float * x, int64_t x_stride, float * dst,
                     int64_t dst_stride) {
    float32x4_t acc[R][NC][2];
    _Pragma("GCC unroll 16") for (int r = 0; r < R; r++)
        _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) acc[r][n][0] = acc[r][n][1] = vdupq_n_f32(0.0f);
    for (int64_t c = 0; c < nch; c++, t += R * 32) {
        float32x4_t w[R][4];
        _Pragma("GCC unroll 16") for (int r = 0; r < R; r++) {
            load_f16x8(t + r * 32, w[r][0], w[r][1]);
            load_f16x8(t + r * 32 + 16, w[r][2], w[r][3]);
        }
        _Pragma("GCC unroll 16") for (int q = 0; q < 4; q++) {
            _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) {
                const float32x4_t xv = vld1q_f32(x + n * x_stride + c * 16 + q * 4);
                _Pragma("GCC unroll 16") for (int r = 0; r < R; r++) acc[r][n][q % 2] = vfmaq_f32(acc[r][n][q % 2], w[r][q], xv);
            }
        }
    }
    _Pragma("GCC unroll 16") for (int r = 0; r < R; r++)
        _Pragma("GCC unroll 16") for (int n = 0; n < NC; n++) dst[n * dst_stride + r] = vaddvq_f32(vaddq_f32(acc[r][n][0], acc[r][n][1]));
}

// All columns of one F16 tile, two at a time (2 x 4 x 2 accumulators fill half the registers).
template <int R>
inline void tile_f16_cols(const uint8_t * t, int64_t nch, const float * x, int64_t x_stride, int64_t n_col,
                          float * dst, int64_t dst_stride) {
    int64_t c = 0;
    for (; c + 2 <= n_col; c += 2) tile_f16<R, 2>(t, nch, x + c * x_stride, x_stride, dst + c * dst_stride, dst_stride);
    if (c < n_col) tile_f16<R, 1>(t, nch, x + c * x_stride, x_stride, dst + c * dst_stride, dst_stride);
}

void gemm_f16(const uint8_t * w, int64_t rows, int64_t cols, int64_t r0, int64_t r1, const csm_kernel_input & in,
              int64_t c0, int64_t n_col, float * dst, int64_t dst_stride) {
    const int64_t full = rows / 4 * 4, nch = cols / 16;
    const float * x = in.x + c0 * in.x_stride;
    int64_t r = r0;
    for (; r + 4 <= r1 && r + 4 <= full; r += 4) tile_f16_cols<4>(w + r * cols * 2, nch, x, in.x_stride, n_col, dst + r - r0, dst_stride);
    for (; r < r1; r++) tile_f16_cols<1>(w + r * cols * 2, nch, x, in.x_stride, n_col, dst + r - r0, dst_stride);
}

// One int8 tile times n <= NC columns.
template <bool Q4K, int R, int NC>
inline void tile_any(int64_t n, const uint8_t * t, int64_t nbp, const int8_t * y, const float * dy, const int32_t * sb,
                     int64_t col_stride, float * dst, int64_t dst_stride) {
    if constexpr (NC > 1) {
        if (n < NC) return tile_any<Q4K, R, NC - 1>(n, t, nbp, y, dy, sb, col_stride, dst, dst_stride);
    }
    if constexpr (Q4K) tile_q4k<R, NC>(t, nbp, y, dy, sb, col_stride, dst, dst_stride);
    else tile_q8<R, NC>(t, nbp, y, dy, col_stride, dst, dst_stride);
}

// All columns of one int8 tile, NC at a time: 1 for 4-row tiles, 4 for single rows (see above).
template <bool Q4K, int R>
inline void tile_cols(const uint8_t * t, int64_t nbp, const int8_t * y, const float * dy, const int32_t * sb,
                      int64_t col_stride, int64_t n_col, float * dst, int64_t dst_stride) {
    constexpr int NC = R == 4 ? 1 : 4;
    for (int64_t c = 0; c < n_col; c += NC) {
        tile_any<Q4K, R, NC>(n_col - c < NC ? n_col - c : NC, t, nbp, y + c * 256, dy + c * 8, sb + c * 8, col_stride,
                             dst + c * dst_stride, dst_stride);
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
    for (; r + 4 <= r1 && r + 4 <= full; r += 4)
        tile_cols<Q4K, 4>(w + r * row_bytes, nbp, y, dy, sb, in.col_stride, n_col, dst + r - r0, dst_stride);
    for (; r < r1; r++) tile_cols<Q4K, 1>(w + r * row_bytes, nbp, y, dy, sb, in.col_stride, n_col, dst + r - r0, dst_stride);
}

const csm_kernel KERNEL = {
    "neon", "NEON dotprod", quantize, {gemm_int8<false>, gemm_int8<true>, gemm_f16}, silu_mul, elu, attend,
};

} // namespace

const csm_kernel * csm_kernel_neon() {
    static const bool ok = cpu_ok();
    return ok ? &KERNEL : nullptr;
}
