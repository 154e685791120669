// kernel_bench.cpp - times one of pycsm's kernels alone on one depth-decoder step's products (4 layers
// of q/k/v 1536x1024, output 1024x1024, gate+up 16384x1024, down 1024x8192: 113 M weights; random
// quants, valid scales), split over 2 threads in fixed halves as the library does. Prints the fastest
// and the median time of PASSES passes, the weight bytes read per second and the multiply-adds per
// second, and the CPU time of the slower thread (on a busy host the time a thread was descheduled
// does not count there, so A/B comparisons of kernels are steadier on it). Build and run:
//
//   cmake --build build/dev --target kernel_bench
//   build/dev/kernel_bench avx512 q4_k 4 30   # KERNEL, FORMAT (q8_0 | q4_k | f16), columns, passes
#include "kernels/kernel.h"

#include <sys/mman.h>
#include <time.h>

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

// A random matrix in the format's source blocks (fp16 scales, and Q4_K's dmin, set to 2^-7; F16
// values random halves of magnitude below 2), packed for the kernels.
matrix make_matrix(csm_wfmt fmt, int64_t rows, int64_t cols, std::mt19937 & rng, size_t & bytes) {
    const csm_wformat & F = csm_wformat_get(fmt);
    const size_t row_bytes = (size_t) (cols / F.src_block_cols) * F.src_block_bytes;
    std::vector<uint8_t> src(rows * row_bytes);
    for (auto & b : src) b = (uint8_t) rng();
    for (size_t o = 0; o < src.size(); o += F.src_block_bytes) {
        if (fmt == CSM_WFMT_F16) {
            src[o + 1] &= 0xBF; // exponent below 16: no inf / nan
        } else {
            src[o] = 0x00, src[o + 1] = 0x20; // d = 0x2000 = 2^-7
            if (fmt == CSM_WFMT_Q4_K) src[o + 2] = 0x00, src[o + 3] = 0x20;
        }
    }
    const size_t size = (size_t) (rows * F.row_bytes(cols)), huge = (size_t) 1 << 21;
    uint8_t * w = (uint8_t *) aligned_alloc(huge, (size + huge - 1) / huge * huge);
    if (!w) { fprintf(stderr, "out of memory\n"); exit(1); }
    madvise(w, size, MADV_HUGEPAGE);
    F.pack_rows(src.data(), row_bytes, rows, cols, w);
    bytes += size;
    return {rows, cols, w};
}

} // namespace

int main(int argc, char ** argv) {
    const csm_kernel * k = nullptr;
    csm_wfmt fmt = CSM_WFMT_COUNT;
    if (argc == 5) {
        k = !strcmp(argv[1], "avx512") ? csm_kernel_avx512() : !strcmp(argv[1], "avx2") ? csm_kernel_avx2()
          : !strcmp(argv[1], "neon") ? csm_kernel_neon() : nullptr;
        for (int f = 0; f < CSM_WFMT_COUNT; f++) {
            if (!strcmp(argv[2], csm_wformat_get((csm_wfmt) f).name)) fmt = (csm_wfmt) f;
        }
    }
    if (argc != 5 || fmt == CSM_WFMT_COUNT || atoi(argv[3]) < 1 || atoi(argv[4]) < 1) {
        fprintf(stderr, "usage: %s avx512|avx2|neon q8_0|q4_k|f16 COLUMNS PASSES\n", argv[0]);
        return 2;
    }
    if (!k) {
        fprintf(stderr, "this CPU (or build) has no %s kernel\n", argv[1]);
        return 1;
    }
    const int n_col = atoi(argv[3]), passes = atoi(argv[4]);

    std::mt19937 rng(1);
    std::vector<matrix> mats;
    size_t bytes = 0;
    double macs = 0;
    for (int layer = 0; layer < 4; layer++) {
        for (auto [rows, cols] : {std::pair<int64_t, int64_t>{1536, 1024}, {1024, 1024}, {16384, 1024}, {1024, 8192}}) {
            mats.push_back(make_matrix(fmt, rows, cols, rng, bytes));
            macs += (double) rows * cols * n_col;
        }
    }

    const int64_t K = 8192, nbp = csm_kernel_nbp(K); // activations for the widest input, prepared once
    std::vector<float> x(K * n_col);
    for (auto & v : x) v = (float) (rng() % 2001) / 1000.0f - 1.0f;
    std::vector<int8_t> y(n_col * nbp * 32);
    std::vector<float> dy(n_col * nbp);
    std::vector<int32_t> sb(n_col * nbp);
    k->quantize(x.data(), K, n_col, K, nbp, y.data(), dy.data(), sb.data());
    csm_kernel_input in; // the int8 formats read y / dy / sb, F16 reads x
    in.y = y.data(), in.dy = dy.data(), in.sb = sb.data(), in.col_stride = n_col, in.x = x.data(), in.x_stride = K;
    std::vector<float> out(16384 * n_col);

    double cpu_ms[2];
    auto products = [&](int ith) {
        timespec c0, c1;
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c0);
        for (const matrix & m : mats) {
            const int64_t tiles = m.rows / 4, r0 = tiles * ith / 2 * 4, r1 = tiles * (ith + 1) / 2 * 4;
            csm_kernel_input mi = in;
            if (fmt == CSM_WFMT_F16) mi.x_stride = m.cols; // column c of a narrower input: x + c * m.cols
            k->gemm[fmt](m.w, m.rows, m.cols, r0, r1, mi, 0, n_col, out.data() + r0, m.rows);
        }
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c1);
        cpu_ms[ith] = (c1.tv_sec - c0.tv_sec) * 1e3 + (c1.tv_nsec - c0.tv_nsec) / 1e6;
    };
    std::vector<double> ms, cpu;
    for (int i = 0; i < passes; i++) {
        const auto t0 = std::chrono::steady_clock::now();
        std::thread other(products, 1);
        products(0);
        other.join();
        ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
        cpu.push_back(std::max(cpu_ms[0], cpu_ms[1]));
    }
    std::sort(ms.begin(), ms.end());
    std::sort(cpu.begin(), cpu.end());
    printf("%s %s, %d column(s), %.1f MB of weights: fastest %.3f ms, median %.3f ms (%.1f GB/s, %.1f G multiply-adds/s); "
           "CPU time of the slower thread: fastest %.3f ms, median %.3f ms\n",
           argv[1], argv[2], n_col, bytes / 1e6, ms[0], ms[passes / 2], bytes / ms[0] / 1e6, macs / ms[0] / 1e6, cpu[0], cpu[passes / 2]);
    for (matrix & m : mats) free(m.w);
    return 0;
}
