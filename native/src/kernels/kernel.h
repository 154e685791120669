// kernel.h - pycsm's matrix kernels: the weight formats they read, their packed layouts, and the
// interface each instruction-set kernel (kernels/avx512.cpp, avx2.cpp, neon.cpp) implements.
//
// This layer knows neither ggml nor the model: packed weights (csm_packed.h) build on it.
//
// Formats and packed layouts (packing: kernels/formats.cpp, compiled without ISA flags, so it runs
// on any CPU). Rows are grouped in tiles of 4 (the last rows % 4 rows alone, as tiles of 1); row r
// starts at byte r * row_bytes(cols), its tile's start when r % 4 == 0.
//
// - Q8_0 (ggml block_q8_0: fp16 scale, 32 int8 quants). nbp = blocks of 32 per row rounded up to a
//   multiple of 8 (padding blocks are zero). A tile of R rows is nbp / 8 groups of 8 blocks; a group
//   holds R x 8 fp16 scales ([row][block]), then per row the 8 blocks' 256 quants stored as unsigned
//   (quant + 128, i.e. quant ^ 0x80) in [m][l][4] order: bytes 4m..4m+3 of block l, so that 32-bit
//   lane l of a 256-bit vector m always belongs to block l. row_bytes = nbp * 34.
// - Q4_K (ggml block_q4_K, 256 values: fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes
//   of nibbles); cols % 256 == 0. A group is one super-block: per row 20 bytes (fp16 d, fp16 dmin,
//   8 scales, 8 mins, one byte each), then per row 128 bytes of quants: 4 vectors of 32 bytes; lane l
//   of vector k holds sub-block l's 4 values of activation vector m = k / 2 * 4 + k % 2 (values
//   4m..4m+3) in its low nibbles and those of vector m + 2 in its high nibbles. row_bytes = cols / 256 * 148.
// - F16: cols % 16 == 0. A tile is cols / 16 chunks, each the R rows' 16 fp16 values of those columns
//   (32 bytes per row). row_bytes = cols * 2.
//
// Activations of the int8 formats (Q8_0, Q4_K) are quantised per 32 values as Q8_0 (scale
// max|x| / 127, round to nearest even, quants in [-127, 127]) by the kernel's quantize(): y (int8, in
// groups of 8 blocks, [m][l][4] like the Q8_0 weights), dy (the scales), and sb: per block
// -128 * (the sum of its quants), which removes the +128 of the Q8_0 weight quants from an unsigned x
// signed dot product and gives Q4_K's min term. The columns' groups are interleaved, [group][column]:
// group g of column c is at y + (g * n_col + c) * 256, dy + (g * n_col + c) * 8 and
// sb + (g * n_col + c) * 8. F16 products take the f32 activations as they are.
//
// Batch invariance (every kernel, every format): a column's result depends only on the weights and
// that column, never on how many columns are multiplied together, which slot the column is in, or the
// row range [r0, r1): integer dot products are exact, and each (row, column) accumulates its float
// terms in one fixed order, the same for one column and for many. The int8 formats' order, in every
// kernel: 8 float lanes per (row, column), lane l for block l of each group of 8 blocks; per group
// acc_l = fma(float(dot_l), dx_l * dy_l, acc_l), dot_l being block l's whole integer dot product of
// the signed quants, exact however it is computed (AVX512's Q8_0 starts it from sb_l to undo the
// +128). Q4_K: dx_l = d * scale_l, and then acc_l = acc_l - (dmin * min_l) * ysum_l by one fused
// multiply-subtract, ysum_l = (float(sb_l) * (-1/128)) * dy_l. At the end the 8 lanes are summed as
// halves (l + l + 4), pairs (l + l + 2), neighbours. (Eight lanes per (row, column) keep the float
// work at one multiply, one convert and one FMA per 8 blocks, and let a 512-bit register hold two
// rows.) F16: fp32 FMAs over 16 lanes (lane j: columns k with k % 16 == j), summed as halves,
// quarters, pairs, neighbours. The x86 kernels agree bit for bit; NEON follows the int8 order (its
// F16 tree differs).
#pragma once

#include <stddef.h>
#include <stdint.h>

// The series the kernels' exp and expm1 share (Horner's order, highest power first): exp(r) and
// (exp(r) - 1) / r to r^7, relative error below 1e-8 for |r| <= ln2 / 2 (after x = n ln2 + r).
constexpr float CSM_EXP_SERIES[8] = {1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
constexpr float CSM_EXPM1_SERIES[8] = {1.0f / 40320, 1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f};

// The weight formats; the index of a kernel's per-format entry points.
enum csm_wfmt { CSM_WFMT_Q8_0, CSM_WFMT_Q4_K, CSM_WFMT_F16, CSM_WFMT_COUNT };

struct csm_wformat {
    const char * name;
    int64_t col_multiple;   // columns per row must be a multiple of this
    int64_t src_block_cols; // values per block of the source rows (32, 256, 1)
    size_t src_block_bytes; // bytes per block of the source rows (34, 144, 2)
    bool int8_input;        // its products take activations quantised by csm_kernel::quantize
    int64_t (*row_bytes)(int64_t cols);
    // Packs rows x cols (row r at src + r * src_stride bytes, in the source format) into out, which
    // holds rows * row_bytes(cols) bytes; writes every byte of it.
    void (*pack_rows)(const uint8_t * src, size_t src_stride, int64_t rows, int64_t cols, uint8_t * out);
};

// The format table.
const csm_wformat & csm_wformat_get(csm_wfmt f);

// Blocks of 32 per quantised activation column of K values (K / 32 rounded up to a multiple of 8).
inline int64_t csm_kernel_nbp(int64_t K) { return (K / 32 + 7) / 8 * 8; }

// The input of a product: for int8 formats the outputs of quantize() for all col_stride columns
// (column 0's group 0); for F16 the f32 columns (column c at x + c * x_stride).
struct csm_kernel_input {
    const int8_t * y = nullptr;
    const float * dy = nullptr;
    const int32_t * sb = nullptr;
    int64_t col_stride = 0;
    const float * x = nullptr;
    int64_t x_stride = 0;
};

// dst[c * dst_stride + r - r0] = sum_k W[r, k] * x[k, c0 + c] for rows [r0, r1) of a packed matrix
// of rows x cols and columns [c0, c0 + n_col) of the input. r0 % 4 == 0; r1 % 4 == 0 or r1 == rows.
typedef void (*csm_gemm_fn)(const uint8_t * w, int64_t rows, int64_t cols, int64_t r0, int64_t r1,
                            const csm_kernel_input & in, int64_t c0, int64_t n_col, float * dst, int64_t dst_stride);

// Attention of up to CSM_ATTN_QUERIES queries that share their keys and values (one sequence, one
// KV head): out[i] = sum_j p_ij v_j over j < n_keys[i], p_i = softmax_j(scale * (q[i] . k_j)). Query i
// and out[i] hold hd floats; key j is at k + j * k_stride, component d of value j at
// vt[d * vt_stride + j] (the V cache's transposed rows). Every kernel computes a query's result from
// its own q, n_keys and the keys and values it sees only, in this order, so a query gives the same
// bits whichever queries share the call and however many keys the cache holds past n_keys:
// s_j = (q_0 k_j0 + ... by FMAs over d ascending) * scale; m = max_j s_j; e_j = exp(s_j - m) (the
// kernel's exp); S = e_0 + e_1 + ... in j order; out_d = (e_0 v_0d + ... by FMAs over j ascending) *
// (1 / S). n_keys[i] = 0 gives zeros.
constexpr int CSM_ATTN_QUERIES = 16;
struct csm_attn_block {
    const float * q[CSM_ATTN_QUERIES];
    float * out[CSM_ATTN_QUERIES];
    int32_t n_keys[CSM_ATTN_QUERIES];
    int n_q;       // 1..CSM_ATTN_QUERIES
    int64_t hd;    // a multiple of 8
    float scale;
    const float * k;
    int64_t k_stride;
    const float * vt;
    int64_t vt_stride;
    float * scratch; // csm_attn_scratch(hd, max n_keys) floats, 64-byte aligned
};
inline int64_t csm_attn_scratch(int64_t hd, int64_t n_keys) { return (hd + n_keys + 8) * CSM_ATTN_QUERIES; }

// The scalar start every kernel's attend() shares: the lanes' key counts into nk (0 past n_q), the
// queries transposed into the scratch's first hd * 16 floats ([d][lane], 0 past n_q). Returns the
// most keys a query sees; 0 when there are none, the outputs then zeroed and nothing left to do.
// (static: each kernel file compiles its own copy with its own flags.)
static inline int32_t csm_attn_begin(const csm_attn_block & a, int32_t (&nk)[CSM_ATTN_QUERIES]) {
    int32_t L = 0;
    for (int i = 0; i < CSM_ATTN_QUERIES; i++) {
        nk[i] = i < a.n_q ? a.n_keys[i] : 0;
        if (nk[i] > L) L = nk[i];
    }
    if (L == 0) {
        for (int i = 0; i < a.n_q; i++)
            for (int64_t d = 0; d < a.hd; d++) a.out[i][d] = 0.0f;
        return 0;
    }
    for (int64_t d = 0; d < a.hd; d++)
        for (int i = 0; i < CSM_ATTN_QUERIES; i++) a.scratch[d * CSM_ATTN_QUERIES + i] = i < a.n_q ? a.q[i][d] : 0.0f;
    return L;
}

// One instruction set's kernel. Its functions run only on CPUs that have that set (the getters below
// return null elsewhere).
struct csm_kernel {
    const char * name; // as PYCSM_KERNEL spells it: "avx512", "avx2", "neon"
    const char * isa;  // for people: "AVX512-VNNI", ...
    // Quantises n_col columns of K floats (column c at x + c * x_stride) into nbp blocks each (layout
    // above; blocks past K are zero): n_col * nbp * 32 bytes of y, n_col * nbp dy, n_col * nbp sb.
    void (*quantize)(const float * x, int64_t x_stride, int64_t n_col, int64_t K, int64_t nbp, int8_t * y, float * dy,
                     int32_t * sb);
    csm_gemm_fn gemm[CSM_WFMT_COUNT]; // per format; null: this kernel lacks the format
    // out[i] = silu(g[i]) * u[i] for i < n, within 2e-6 relative; huge |g| give 0 or g * u, never inf/nan.
    void (*silu_mul)(const float * g, const float * u, float * out, int64_t n);
    // out[i] = x[i] > 0 ? x[i] : exp(x[i]) - 1 (Mimi's ELU) for i < n, within 1e-6 relative (expm1's
    // accuracy near 0, not exp's minus 1); -inf gives -1, never nan for finite x. out may be x.
    void (*elu)(const float * x, float * out, int64_t n);
    // The attention above; null: this kernel lacks it (ggml's products and softmax run instead).
    void (*attend)(const csm_attn_block & a);
};

// The kernels of this build, each null when the build lacks it or the CPU cannot run it.
const csm_kernel * csm_kernel_avx512();
const csm_kernel * csm_kernel_avx2();
const csm_kernel * csm_kernel_neon();

// The kernel to use: PYCSM_KERNEL=avx512|avx2|neon|ggml when set (ggml, or a kernel this CPU or build
// lacks: null), else the best one the CPU runs, else null (ggml's own products). Read at every call.
const csm_kernel * csm_kernel_pick();
// One line for people: which kernel csm_kernel_pick() gives and why ("pycsm avx512 (AVX512-VNNI)",
// "ggml (PYCSM_KERNEL=ggml)", ...).
const char * csm_kernel_describe(char * buf, size_t size);
