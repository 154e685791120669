// kernel_bench.cpp - times pycsm's Q8_0 / Q4_K matrix kernels alone on one depth-decoder step's
// products (4 layers of q/k/v 1536x1024, output 1024x1024, gate+up 16384x1024, down 1024x8192:
// 113 M weights; random quants, valid scales), split over 2 threads in fixed halves as the library
// does. Prints the fastest and the median time of REPS passes, the weight bytes read per second and
// the multiply-adds per second. Build and run (x86-64 with AVX512-VNNI):
//
//   g++ -O2 -std=c++17 -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mf16c -mfma -Wno-maybe-uninitialized
//       -Inative/src benchmarks/kernel_bench.cpp native/src/csm_q8_kernel.cpp -o /tmp/kernel_bench -lpthread
//   (one command line)
//   /tmp/kernel_bench q4k 4 30        # TYPE (q8 | q4k), columns (1 = one stream, 4 = a batch of 4), passes
#include "csm_q8_kernel.h"

#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

namespace {

struct matrix {
    int64_t rows, cols;
    uint8_t * w; // packed
};

// A random matrix in the file's block format (fp16 scales set to 2^-7), packed for the kernel.
matrix make_matrix(bool q4k, int64_t rows, int64_t cols, std::mt19937 & rng, size_t & bytes) {
    const size_t row_bytes = q4k ? cols / 256 * 144 : cols / 32 * 34, block = q4k ? 144 : 34;
    std::vector<uint8_t> src(rows * row_bytes);
    for (auto & b : src) b = (uint8_t) rng();
    for (size_t o = 0; o < src.size(); o += block) { // d (and dmin) = 0x2000 = 2^-7
        src[o] = 0x00, src[o + 1] = 0x20;
        if (q4k) src[o + 2] = 0x00, src[o + 3] = 0x20;
    }
    const size_t size = q4k ? rows * (cols / 256) * 148 : rows * cols / 32 * 34, huge = (size_t) 1 << 21;
    uint8_t * w = (uint8_t *) aligned_alloc(huge, (size + huge - 1) / huge * huge);
    if (!w) { fprintf(stderr, "out of memory\n"); exit(1); }
    madvise(w, size, MADV_HUGEPAGE);
    if (q4k) csm_q4k_pack_rows(src.data(), row_bytes, rows, cols, w);
    else csm_q8_pack_rows(src.data(), row_bytes, rows, cols, w);
    bytes += size;
    return {rows, cols, w};
}

} // namespace

int main(int argc, char ** argv) {
    if (argc != 4 || (strcmp(argv[1], "q8") && strcmp(argv[1], "q4k")) || atoi(argv[2]) < 1 || atoi(argv[3]) < 1) {
        fprintf(stderr, "usage: %s q8|q4k COLUMNS PASSES\n", argv[0]);
        return 2;
    }
    if (!csm_q8_kernel_available()) {
        fprintf(stderr, "this CPU (or build) has no AVX512-VNNI kernel\n");
        return 1;
    }
    const bool q4k = !strcmp(argv[1], "q4k");
    const int n_col = atoi(argv[2]), passes = atoi(argv[3]);

    std::mt19937 rng(1);
    std::vector<matrix> mats;
    size_t bytes = 0;
    double macs = 0;
    for (int layer = 0; layer < 4; layer++) {
        for (auto [rows, cols] : {std::pair<int64_t, int64_t>{1536, 1024}, {1024, 1024}, {16384, 1024}, {1024, 8192}}) {
            mats.push_back(make_matrix(q4k, rows, cols, rng, bytes));
            macs += (double) rows * cols * n_col;
        }
    }

    const int64_t K = 8192, nbp = K / 32; // activations for the widest input, quantised once
    std::vector<float> x(K * n_col);
    for (auto & v : x) v = (float) (rng() % 2001) / 1000.0f - 1.0f;
    std::vector<int8_t> y(n_col * nbp * 32);
    std::vector<float> dy(n_col * nbp);
    std::vector<int32_t> sb(n_col * nbp);
    csm_q8_quantize(x.data(), K, n_col, K, nbp, y.data(), dy.data(), sb.data());
    std::vector<float> out(16384 * n_col);

    auto products = [&](int ith) {
        for (const matrix & m : mats) {
            const int64_t tiles = m.rows / 4, r0 = tiles * ith / 2 * 4, r1 = tiles * (ith + 1) / 2 * 4;
            (q4k ? csm_q4k_gemm : csm_q8_gemm)(m.w, m.rows, m.cols / 32, r0, r1, y.data(), dy.data(), sb.data(),
                                               n_col, n_col, out.data(), m.rows);
        }
    };
    std::vector<double> ms;
    for (int i = 0; i < passes; i++) {
        const auto t0 = std::chrono::steady_clock::now();
        std::thread other(products, 1);
        products(0);
        other.join();
        ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(ms.begin(), ms.end());
    printf("%s, %d column(s), %.1f MB of weights: fastest %.3f ms, median %.3f ms (%.1f GB/s, %.1f G multiply-adds/s)\n",
           argv[1], n_col, bytes / 1e6, ms[0], ms[passes / 2], bytes / ms[0] / 1e6, macs / ms[0] / 1e6);
    for (matrix & m : mats) free(m.w);
    return 0;
}
