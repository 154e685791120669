// q8_kernel_check.cpp - drives pycsm's Q8_0 / Q4_K int8 kernels (native/src/csm_q8_kernel.cpp) for
// tests/test_q8_kernel.py: packs a matrix, quantises activations, multiplies, in row ranges
// split like the ggml op does for n_split threads.
//
// Type 3 drives the F16 kernel: stdin int64 rows, cols, n_col, n_split, 3, then rows * cols fp16
// weights (row-major) and the activations as below; stdout int32 available, then the results.
//
// Type 2 drives csm_silu_mul instead: stdin int64 n, 0, 0, 0, 2, then n float32 g and n float32 u;
// stdout int32 available, then n float32 silu(g) * u.
//
// stdin:  int64 rows, cols, n_col, n_split, type (0: Q8_0, 1: Q4_K); the rows' blocks (Q8_0: 34
//         bytes per 32 values, Q4_K: 144 bytes per 256);
//         n_col * cols float32 activations (column-major: column c at c * cols)
// stdout: int32 available (0: this CPU or build lacks the kernel, nothing follows);
//         n_col * rows float32 results (column c at c * rows);
//         n_col * cols int8 quantised activations and n_col * cols / 32 float32 scales, in natural order
#include "csm_q8_kernel.h"

#include <cstdio>
#include <cstdlib>
#include <vector>

static void read_all(void * p, size_t n) {
    if (fread(p, 1, n, stdin) != n) { fprintf(stderr, "short input\n"); std::exit(2); }
}

int main() {
    int64_t h[5];
    read_all(h, sizeof h);
    if (h[4] == 2) {
        const int64_t n = h[0];
        std::vector<float> g((size_t) n), u((size_t) n), out((size_t) n + 1, -12345.0f);
        read_all(g.data(), g.size() * sizeof(float));
        read_all(u.data(), u.size() * sizeof(float));
        int32_t avail = csm_q8_kernel_available() ? 1 : 0;
        fwrite(&avail, sizeof avail, 1, stdout);
        if (!avail) return 0;
        csm_silu_mul(g.data(), u.data(), out.data(), n);
        fwrite(out.data(), sizeof(float), out.size(), stdout); // + the float after: must be untouched
        return 0;
    }
    if (h[4] == 3) {
        const int64_t rows = h[0], cols = h[1], n_col = h[2], n_split = h[3];
        std::vector<uint8_t> f16((size_t) (rows * cols * 2)), w((size_t) (rows * cols * 2), 0xAB);
        std::vector<float> x((size_t) (n_col * cols)), out((size_t) (n_col * rows), -12345.0f);
        read_all(f16.data(), f16.size());
        read_all(x.data(), x.size() * sizeof(float));
        int32_t avail = csm_q8_kernel_available() ? 1 : 0;
        fwrite(&avail, sizeof avail, 1, stdout);
        if (!avail) return 0;
        csm_f16_pack_rows(f16.data(), (size_t) cols * 2, rows, cols, w.data());
        const int64_t tiles = (rows + 3) / 4;
        for (int64_t i = 0; i < n_split; i++) {
            const int64_t t0 = tiles * i / n_split, t1 = tiles * (i + 1) / n_split;
            const int64_t r0 = t0 * 4, r1 = t1 * 4 < rows ? t1 * 4 : rows;
            if (r0 < r1) csm_f16_gemm(w.data(), rows, cols, r0, r1, x.data(), cols, 1, out.data(), rows);
            if (r0 < r1 && n_col > 1) {
                csm_f16_gemm(w.data(), rows, cols, r0, r1, x.data() + cols, cols, n_col - 1, out.data() + rows, rows);
            }
        }
        fwrite(out.data(), sizeof(float), out.size(), stdout);
        return 0;
    }
    const int64_t rows = h[0], cols = h[1], n_col = h[2], n_split = h[3], q4k = h[4];
    const int64_t nb = cols / 32, nbp = (nb + 7) / 8 * 8;
    const size_t row_in = q4k ? (size_t) (cols / 256 * 144) : (size_t) (nb * 34);
    const size_t row_out = q4k ? (size_t) (cols / 256 * 148) : (size_t) (nbp * 34);
    std::vector<uint8_t> q8(rows * row_in);
    std::vector<float> x((size_t) (n_col * cols));
    read_all(q8.data(), q8.size());
    read_all(x.data(), x.size() * sizeof(float));
    int32_t avail = csm_q8_kernel_available() ? 1 : 0;
    fwrite(&avail, sizeof avail, 1, stdout);
    if (!avail) return 0;

    std::vector<uint8_t> w(rows * row_out, 0xAB); // garbage: packing must write every byte
    if (q4k) csm_q4k_pack_rows(q8.data(), row_in, rows, cols, w.data());
    else csm_q8_pack_rows(q8.data(), row_in, rows, cols, w.data());
    auto gemm = q4k ? csm_q4k_gemm : csm_q8_gemm;
    std::vector<int8_t> y((size_t) (n_col * nbp * 32));
    std::vector<float> dy((size_t) (n_col * nbp));
    std::vector<int32_t> sb((size_t) (n_col * nbp));
    csm_q8_quantize(x.data(), cols, n_col, cols, nbp, y.data(), dy.data(), sb.data());
    std::vector<float> out((size_t) (n_col * rows), -12345.0f);
    const int64_t tiles = (rows + 3) / 4;
    for (int64_t i = 0; i < n_split; i++) {
        const int64_t t0 = tiles * i / n_split, t1 = tiles * (i + 1) / n_split;
        const int64_t r0 = t0 * 4, r1 = t1 * 4 < rows ? t1 * 4 : rows;
        // columns in two calls (the first one, then the rest) as csm_q8 does for runs of heads
        if (r0 < r1) gemm(w.data(), rows, nbp, r0, r1, y.data(), dy.data(), sb.data(), n_col, 1, out.data(), rows);
        if (r0 < r1 && n_col > 1) {
            gemm(w.data(), rows, nbp, r0, r1, y.data() + 256, dy.data() + 8, sb.data() + 8, n_col, n_col - 1,
                        out.data() + rows, rows);
        }
    }
    fwrite(out.data(), sizeof(float), out.size(), stdout);
    // the quantised activations back in natural order (groups of 8 blocks, [group][column], [m][l][4])
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
