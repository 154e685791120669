// csm_q8_kernel.h - pycsm's matrix kernels for Q8_0 and Q4_K weights (int8, x86 AVX512-VNNI) and
// F16 weights (fp32 FMAs).
//
// Layout of a packed Q8_0 matrix of `rows` rows and nbp blocks of 32 columns per row (the row's blocks
// zero-padded to a multiple of 8): rows are grouped in tiles of 4 (the last rows % 4 rows alone, as
// tiles of 1). A tile of R rows is nbp / 8 groups of 8 blocks; a group holds R x 8 fp16 scales
// ([row][block]) and then, per row, the 8 blocks' 256 unsigned quants (quant + 128) as [m][l][4]:
// bytes 4m..4m+3 of block l, so that 32-bit lane l of a vector always belongs to block l. Row r
// starts at byte r * nbp * 34 (its tile's start when r % 4 == 0), the same size as Q8_0.
// Activations are quantised per 32 values as in Q8_0: y (int8, groups of 8 blocks in the [m][l][4]
// order of the weights), dy (scale), sb = -128 * sum(y) (removes the +128 offset of q inside vpdpbusd).
// The columns' groups are interleaved, [group][column]: group g of column c is at y + (g * n_col + c)
// * 256 and at dy, sb + (g * n_col + c) * 8, so the columns a tile reads lie together.
//
// One column at a time the kernels use 256-bit dot products (memory bound); several columns (a
// batch, a prompt) use 512-bit ones, which cover two activation vectors per instruction.
//
// This file is compiled with AVX512 flags; call nothing here unless csm_q8_kernel_available().
#pragma once

#include <stddef.h>
#include <stdint.h>

// True when this build has the kernels and the CPU runs them (AVX512 F/BW/VL/VNNI, F16C, FMA).
bool csm_q8_kernel_available();

// Packs rows x cols of Q8_0 blocks (row r at q8_0 + r * row_stride bytes) into out, which holds
// rows * nbp * 34 bytes. Plain C: safe to call on any CPU.
void csm_q8_pack_rows(const uint8_t * q8_0, size_t row_stride, int64_t rows, int64_t cols, uint8_t * out);

// Q4_K: rows x cols (cols % 256 == 0) of ggml block_q4_K (144 bytes per 256 values) packed for
// csm_q4k_gemm: tiles of 4 rows as above; a group (one super-block of 256) holds, per row, 20
// bytes (fp16 d, fp16 dmin, 8 scales, 8 mins) and then, per row, 128 bytes of quants: 4 vectors of
// 32 bytes; lane l of vector k holds sub-block l's 4 values of activation vector m = k / 2 * 4 + k % 2
// (values 4m..4m+3) in its low nibbles and those of vector m + 2 in its high nibbles, so that the
// 64 bytes of vectors 2J, 2J + 1 pair with activation vectors 4J, 4J + 1 (low) and 4J + 2, 4J + 3
// (high). Row r starts at byte r * (cols / 256) * 148. Plain C.
void csm_q4k_pack_rows(const uint8_t * q4_k, size_t row_stride, int64_t rows, int64_t cols, uint8_t * out);

// F16: rows x cols (cols % 16 == 0) of fp16 values packed for csm_f16_gemm: tiles of 4 rows as
// above; a tile is cols / 16 chunks, each the R rows' 16 values of those columns (32 bytes per row).
// Row r starts at byte r * cols * 2, the same size as F16. Plain C.
void csm_f16_pack_rows(const uint8_t * f16, size_t row_stride, int64_t rows, int64_t cols, uint8_t * out);

// Quantises n_col columns of K floats (column c at x + c * x_stride floats) to blocks of 32, laid
// out as above (n_col * nbp * 32 bytes of y, n_col * nbp dy and sb); blocks past K are zero.
void csm_q8_quantize(const float * x, int64_t x_stride, int64_t n_col, int64_t K, int64_t nbp,
                     int8_t * y, float * dy, int32_t * sb);

// dst[c * dst_stride + r] = sum_k W[r, k] * x[k, c] for rows [r0, r1) and n_col columns; y, dy, sb
// point at the first column's group 0 (csm_q8_quantize's outputs + c0 * 256, c0 * 8, c0 * 8), col_stride is the
// number of columns quantised together. r0 is a multiple of 4, r1 a multiple of 4 or `rows`.
void csm_q8_gemm(const uint8_t * w, int64_t rows, int64_t nbp, int64_t r0, int64_t r1,
                 const int8_t * y, const float * dy, const int32_t * sb, int64_t col_stride, int64_t n_col,
                 float * dst, int64_t dst_stride);

// The same product for a matrix packed by csm_q4k_pack_rows (nbp = cols / 32).
void csm_q4k_gemm(const uint8_t * w, int64_t rows, int64_t nbp, int64_t r0, int64_t r1,
                  const int8_t * y, const float * dy, const int32_t * sb, int64_t col_stride, int64_t n_col,
                  float * dst, int64_t dst_stride);

// dst[c * dst_stride + r] = sum_k W[r, k] * x[c * x_stride + k] for rows [r0, r1) of a matrix packed
// by csm_f16_pack_rows and n_col f32 columns, in fp32 (the activations are not rounded to fp16).
void csm_f16_gemm(const uint8_t * w, int64_t rows, int64_t cols, int64_t r0, int64_t r1, const float * x,
                  int64_t x_stride, int64_t n_col, float * dst, int64_t dst_stride);

// out[i] = silu(g[i]) * u[i] = g[i] / (1 + exp(-g[i])) * u[i] for i < n, within 2e-6 relative
// (the exp argument is clamped to +-88, so huge |g| give 0 or g * u, never inf or nan).
void csm_silu_mul(const float * g, const float * u, float * out, int64_t n);
