// kernel_check.cpp - drives one of pycsm's kernels (native/src/kernels/) for tests/test_kernels.py:
// packs a matrix, quantises activations, multiplies, in row ranges split as the ggml ops split them
// for n_split threads.
//
//   kernel_check KERNEL      (avx512 | avx2 | neon)
//
// stdin:  int64 rows, cols, n_col, n_split, type (0: Q8_0, 1: Q4_K, 2: silu, 3: F16, 4: elu); then
//         type 0/1/3: the rows in the file format (Q8_0: 34 bytes per 32 values, Q4_K: 144 bytes per
//         256, F16: 2 bytes per value) and n_col * cols float32 activations (column c at c * cols);
//         type 2: rows = n, then n float32 g and n float32 u; type 4: rows = n, then n float32 x.
// stdout: int32 available (0: this CPU or build lacks the kernel, nothing follows); then
//         type 2: n + 1 float32, silu(g) * u and the untouched float after them;
//         type 4: n + 1 float32, elu(x) and the untouched float after them, then n float32, elu(x)
//         computed in place;
//         else n_col * rows float32 results of all columns in one call per row range (column c at
//         c * rows), the same from one call per column, and for types 0/1 the n_col * cols int8
//         quantised activations and n_col * cols / 32 float32 scales, in natural order.
#include "kernels/kernel.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

static void read_all(void * p, size_t n) {
    if (fread(p, 1, n, stdin) != n) { fprintf(stderr, "short input\n"); std::exit(2); }
}

int main(int argc, char ** argv) {
    if (argc != 2) { fprintf(stderr, "usage: %s avx512|avx2|neon\n", argv[0]); return 2; }
    const csm_kernel * k = !strcmp(argv[1], "avx512") ? csm_kernel_avx512()
                         : !strcmp(argv[1], "avx2")   ? csm_kernel_avx2()
                         : !strcmp(argv[1], "neon")   ? csm_kernel_neon() : nullptr;
    int64_t h[5];
    read_all(h, sizeof h);
    const int32_t avail = k ? 1 : 0;
    if (h[4] == 2) {
        const int64_t n = h[0];
        std::vector<float> g((size_t) n), u((size_t) n), out((size_t) n + 1, -12345.0f);
        read_all(g.data(), g.size() * sizeof(float));
        read_all(u.data(), u.size() * sizeof(float));
        fwrite(&avail, sizeof avail, 1, stdout);
        if (!avail) return 0;
        k->silu_mul(g.data(), u.data(), out.data(), n);
        fwrite(out.data(), sizeof(float), out.size(), stdout);
        return 0;
    }
    if (h[4] == 4) {
        const int64_t n = h[0];
        std::vector<float> x((size_t) n), out((size_t) n + 1, -12345.0f);
        read_all(x.data(), x.size() * sizeof(float));
        fwrite(&avail, sizeof avail, 1, stdout);
        if (!avail) return 0;
        k->elu(x.data(), out.data(), n);
        fwrite(out.data(), sizeof(float), out.size(), stdout);
        k->elu(x.data(), x.data(), n);
        fwrite(x.data(), sizeof(float), x.size(), stdout);
        return 0;
    }
    const int64_t rows = h[0], cols = h[1], n_col = h[2], n_split = h[3];
    const csm_wfmt fmt = h[4] == 0 ? CSM_WFMT_Q8_0 : h[4] == 1 ? CSM_WFMT_Q4_K : CSM_WFMT_F16;
    const csm_wformat & F = csm_wformat_get(fmt);
    const size_t row_in = (size_t) (cols / F.src_block_cols) * F.src_block_bytes;
    std::vector<uint8_t> src(rows * row_in);
    std::vector<float> x((size_t) (n_col * cols));
    read_all(src.data(), src.size());
    read_all(x.data(), x.size() * sizeof(float));
    fwrite(&avail, sizeof avail, 1, stdout);
    if (!avail) return 0;

    std::vector<uint8_t> w(rows * F.row_bytes(cols), 0xAB); // garbage: packing must write every byte
    F.pack_rows(src.data(), row_in, rows, cols, w.data());
    const int64_t nbp = csm_kernel_nbp(cols);
    std::vector<int8_t> y((size_t) (n_col * nbp * 32));
    std::vector<float> dy((size_t) (n_col * nbp));
    std::vector<int32_t> sb((size_t) (n_col * nbp));
    csm_kernel_input in;
    if (F.int8_input) {
        k->quantize(x.data(), cols, n_col, cols, nbp, y.data(), dy.data(), sb.data());
        in.y = y.data(), in.dy = dy.data(), in.sb = sb.data(), in.col_stride = n_col;
    } else {
        in.x = x.data(), in.x_stride = cols;
    }
    std::vector<float> all((size_t) (n_col * rows), -12345.0f), one((size_t) (n_col * rows), -12345.0f);
    const int64_t tiles = (rows + 3) / 4;
    for (int64_t i = 0; i < n_split; i++) {
        const int64_t t0 = tiles * i / n_split, t1 = tiles * (i + 1) / n_split;
        const int64_t r0 = t0 * 4, r1 = t1 * 4 < rows ? t1 * 4 : rows;
        if (r0 >= r1) continue;
        k->gemm[fmt](w.data(), rows, cols, r0, r1, in, 0, n_col, all.data() + r0, rows);
        for (int64_t c = 0; c < n_col; c++) k->gemm[fmt](w.data(), rows, cols, r0, r1, in, c, 1, one.data() + c * rows + r0, rows);
    }
    fwrite(all.data(), sizeof(float), all.size(), stdout);
    fwrite(one.data(), sizeof(float), one.size(), stdout);
    if (!F.int8_input) return 0;
    // the quantised activations back in natural order (groups of 8 blocks, [group][column], [m][l][4])
    const int64_t nb = cols / 32;
    std::vector<int8_t> yq((size_t) (n_col * cols));
    std::vector<float> dq((size_t) (n_col * nb));
    for (int64_t c = 0; c < n_col; c++) {
        for (int64_t b = 0; b < nb; b++) {
            for (int i = 0; i < 32; i++) {
                yq[c * cols + b * 32 + i] = y[((b / 8) * n_col + c) * 256 + ((i / 4) * 8 + b % 8) * 4 + i % 4];
            }
            dq[c * nb + b] = dy[((b / 8) * n_col + c) * 8 + b % 8];
        }
    }
    fwrite(yq.data(), 1, yq.size(), stdout);
    fwrite(dq.data(), sizeof(float), dq.size(), stdout);
    return 0;
}
