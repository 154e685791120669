// csm_kernel_neon.h - pycsm's matrix kernels for 64-bit ARM (NEON with the dot-product extension):
// Q8_0 and Q4_K weights times int8-quantised activations, F16 weights times f32 activations, the
// activation quantisation and silu(g) * u. They read the packed layouts of csm_q8_kernel.h and the
// same quantised activations (y, dy, sb), and have the same arguments as the AVX512 functions there.
//
// Batch-invariant: a column's result depends only on the weights and that column, never on how
// many columns are computed together or which slot the column has (bit for bit).
//
// Built with -march=armv8.2-a+dotprod where the compiler targets aarch64; elsewhere
// csm_neon_available() is false and the rest must not be called. Their speed has not been measured:
// pycsm's hosts are x86, where the file is checked for correctness only, under qemu-user
// (tests/native/neon_kernel_check.cpp, .ci/neon).
#pragma once

#include <stddef.h>
#include <stdint.h>

// True when this build has the NEON kernels and the CPU runs them (ASIMD with SDOT: Linux
// HWCAP_ASIMDDP, macOS hw.optional.arm.FEAT_DotProd).
bool csm_neon_available();

// As csm_q8_quantize (the same bytes: round to nearest even, scale max|x| / 127).
void csm_neon_quantize(const float * x, int64_t x_stride, int64_t n_col, int64_t K, int64_t nbp,
                       int8_t * y, float * dy, int32_t * sb);

// As csm_q8_gemm.
void csm_neon_q8_gemm(const uint8_t * w, int64_t rows, int64_t nbp, int64_t r0, int64_t r1,
                      const int8_t * y, const float * dy, const int32_t * sb, int64_t col_stride, int64_t n_col,
                      float * dst, int64_t dst_stride);

// As csm_q4k_gemm.
void csm_neon_q4k_gemm(const uint8_t * w, int64_t rows, int64_t nbp, int64_t r0, int64_t r1,
                       const int8_t * y, const float * dy, const int32_t * sb, int64_t col_stride, int64_t n_col,
                       float * dst, int64_t dst_stride);

// As csm_f16_gemm.
void csm_neon_f16_gemm(const uint8_t * w, int64_t rows, int64_t cols, int64_t r0, int64_t r1, const float * x,
                       int64_t x_stride, int64_t n_col, float * dst, int64_t dst_stride);

// As csm_silu_mul.
void csm_neon_silu_mul(const float * g, const float * u, float * out, int64_t n);
