// kernel_check.cpp - drives one of pycsm's kernels (native/src/kernels/) for tests/test_kernels.py:
// packs a matrix, quantises activations, multiplies, in row ranges split as the ggml ops split them
// for n_split threads.
//
//   kernel_check KERNEL      (avx512 | avx2 | neon)
//
// stdin:  int64 rows, cols, n_col, n_split, type (0: Q8_0, 1: Q4_K, 2: silu, 3: F16, 4: elu,
//         5: attention); then
//         type 0/1/3: the rows in the file format (Q8_0: 34 bytes per 32 values, Q4_K: 144 bytes per
//         256, F16: 2 bytes per value) and n_col * cols float32 activations (column c at c * cols);
//         type 2: rows = n, then n float32 g and n float32 u; type 4: rows = n, then n float32 x;
//         type 5: rows = n_q (1-16), cols = hd, n_col = n_kv (key rows held), then n_q int32 n_keys,
//         n_q * hd float32 queries, n_kv * hd float32 keys, hd * n_kv float32 values (component d
//         of key j at d * n_kv + j).
// stdout: int32 available (0: this CPU or build lacks the kernel, nothing follows); then
//         type 2: n + 1 float32, silu(g) * u and the untouched float after them;
//         type 4: n + 1 float32, elu(x) and the untouched float after them, then n float32, elu(x)
//         computed in place;
//         type 5: n_q * hd float32 outputs of one call for all queries, then of one call per
//         query, then of one call per query whose keys and values past its n_keys are NaN (the
//         keys at a stride of hd + 8 in every call);
//         else n_col * rows float32 results of all columns in one call per row range (column c at
//         c * rows), the same from one call per column, and for types 0/1 the n_col * cols int8
//         quantised activations and n_col * cols / 32 float32 scales, in natural order.
#include "kernels/kernel.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

static void read_all(void * p, size_t n) {
    if (fread(p, 1, n, stdin) != n) { fprintf(stderr, "short input\n"); std::exit(2); }
}

// Type 5: csm_kernel::attend, its scratch exactly csm_attn_scratch() floats followed by a guard.
static int attention(const csm_kernel * k, int64_t n_q, int64_t hd, int64_t n_kv) {
    std::vector<int32_t> n_keys((size_t) n_q);
    std::vector<float> q((size_t) (n_q * hd)), kin((size_t) (n_kv * hd)), vt((size_t) (hd * n_kv));
    read_all(n_keys.data(), n_keys.size() * sizeof(int32_t));
    read_all(q.data(), q.size() * sizeof(float));
    read_all(kin.data(), kin.size() * sizeof(float));
    read_all(vt.data(), vt.size() * sizeof(float));
    const int32_t avail = k && k->attend ? 1 : 0;
    fwrite(&avail, sizeof avail, 1, stdout);
    if (!avail) return 0;
    const int64_t ks = hd + 8;
    std::vector<float> keys((size_t) (n_kv * ks), 777.0f), out((size_t) (n_q * hd), -12345.0f);
    for (int64_t j = 0; j < n_kv; j++) memcpy(&keys[(size_t) (j * ks)], &kin[(size_t) (j * hd)], (size_t) hd * sizeof(float));
    const int64_t need = csm_attn_scratch(hd, n_kv);
    std::vector<float> scratch((size_t) need + 16 + 64, 0.0f);
    float * sc = (float *) (((uintptr_t) scratch.data() + 63) & ~(uintptr_t) 63);
    for (int g = 0; g < 64; g++) sc[need + g] = 4242.0f;
    auto call = [&](int64_t q0, int64_t nq, const float * K, const float * V) {
        csm_attn_block a;
        a.n_q = (int) nq;
        a.hd = hd;
        a.scale = 1.0f / sqrtf((float) hd);
        a.k = K, a.k_stride = ks, a.vt = V, a.vt_stride = n_kv, a.scratch = sc;
        for (int64_t i = 0; i < nq; i++) {
            a.q[i] = &q[(size_t) ((q0 + i) * hd)];
            a.out[i] = &out[(size_t) ((q0 + i) * hd)];
            a.n_keys[i] = n_keys[(size_t) (q0 + i)];
        }
        k->attend(a);
        for (int g = 0; g < 64; g++) {
            if (sc[need + g] != 4242.0f) { fprintf(stderr, "attend wrote past its scratch\n"); std::exit(3); }
        }
    };
    call(0, n_q, keys.data(), vt.data());
    fwrite(out.data(), sizeof(float), out.size(), stdout);
    std::fill(out.begin(), out.end(), -12345.0f);
    for (int64_t i = 0; i < n_q; i++) call(i, 1, keys.data(), vt.data());
    fwrite(out.data(), sizeof(float), out.size(), stdout);
    std::fill(out.begin(), out.end(), -12345.0f);
    for (int64_t i = 0; i < n_q; i++) {
        std::vector<float> K2 = keys, V2 = vt;
        for (int64_t j = n_keys[(size_t) i]; j < n_kv; j++) {
            for (int64_t d = 0; d < hd; d++) K2[(size_t) (j * ks + d)] = NAN, V2[(size_t) (d * n_kv + j)] = NAN;
        }
        call(i, 1, K2.data(), V2.data());
    }
    fwrite(out.data(), sizeof(float), out.size(), stdout);
    return 0;
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
    if (h[4] == 5) return attention(k, h[0], h[1], h[2]);
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
