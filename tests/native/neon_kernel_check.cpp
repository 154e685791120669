// neon_kernel_check.cpp - correctness driver for pycsm's NEON kernel (native/src/kernels/neon.cpp).
//
// Cross-compiled for aarch64 and run under qemu-user by .ci/neon (a compile-and-correctness check: the
// kernel's speed cannot be measured on an emulator). It packs random Q8_0, Q4_K and F16 matrices
// with pycsm's packing code (kernels/formats.cpp) and checks, for tail rows (rows % 4 != 0), padded
// block groups, 1-8 columns and the backbone's width:
//   - the activation quantisation against a plain C++ one (the same int8 values, scales and sums);
//   - every product against a double-precision product of the dequantised weights (decoded here from
//     the ggml block formats, not from the packed layout) with those activations;
//   - batch invariance: each column's result in a batch of 1-8 columns, at any slot, in one call or
//     split over two calls and over row ranges, equals bit for bit its result computed alone;
//   - silu(g) * u and Mimi's ELU against double precision, for lengths with and without a tail of n % 4;
//   - the run-time choice: csm_kernel_pick() gives the NEON kernel unless PYCSM_KERNEL names ggml
//     or another instruction set's kernel.
// With --expect-unavailable it checks instead that neither csm_kernel_neon() nor csm_kernel_pick()
// offers the NEON kernel (qemu with a CPU model without the dot-product extension; any x86 build).
//
// Prints one line per failed check and a closing "N passed, M failed"; exit status 1 if M > 0.
#include "kernels/kernel.h"

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

namespace {

int n_pass = 0, n_fail = 0;
const csm_kernel * K = nullptr; // the NEON kernel

std::string strf(const char * fmt, ...) {
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return buf;
}

// One named check: counted once when it goes out of scope, its first failure printed.
struct check {
    std::string name;
    bool ok = true;
    explicit check(std::string name_) : name(std::move(name_)) {}
    void fail(const std::string & why) {
        if (ok) printf("FAIL %s: %s\n", name.c_str(), why.c_str());
        ok = false;
    }
    ~check() { ok ? n_pass++ : n_fail++; }
};

// splitmix64: a fixed, portable sequence
struct rng {
    uint64_t s;
    explicit rng(uint64_t seed) : s(seed) {}
    uint64_t next() {
        uint64_t z = (s += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    int below(int n) { return (int) (next() % (uint64_t) n); }
    double uniform() { return (double) (next() >> 11) / 9007199254740992.0; } // [0, 1)
};

// IEEE half -> float, by the bits (normals, subnormals, zeros; no inf/nan is generated here).
float half_to_float(uint16_t h) {
    const int sign = h >> 15, exp = (h >> 10) & 31, man = h & 1023;
    const double v = exp == 0 ? std::ldexp((double) man, -24) : std::ldexp(1024.0 + man, exp - 25);
    return (float) (sign ? -v : v);
}

// A positive half of exponent in [lo, hi] (biased) with a random mantissa.
uint16_t random_half(rng & r, int lo, int hi) {
    return (uint16_t) (((lo + r.below(hi - lo + 1)) << 10) | r.below(1024));
}

void put16(uint8_t * p, uint16_t v) { p[0] = (uint8_t) v; p[1] = (uint8_t) (v >> 8); }

constexpr csm_wfmt Q8_0 = CSM_WFMT_Q8_0, Q4_K = CSM_WFMT_Q4_K, F16 = CSM_WFMT_F16;

// rows x cols random weights in ggml's block format (row-major), and their values as doubles.
struct weights {
    std::vector<uint8_t> raw;
    size_t row_bytes = 0;
    std::vector<double> val;  // the dequantised weight
    std::vector<double> mag;  // its magnitude as the kernel sums it (Q4_K: |d sc q| + |dmin m|)
};

weights make_weights(csm_wfmt f, int64_t rows, int64_t cols, rng & r) {
    weights w;
    w.row_bytes = f == Q8_0 ? (size_t) cols / 32 * 34 : f == Q4_K ? (size_t) cols / 256 * 144 : (size_t) cols * 2;
    w.raw.resize(w.row_bytes * (size_t) rows);
    w.val.resize((size_t) (rows * cols));
    w.mag.resize(w.val.size());
    for (int64_t i = 0; i < rows; i++) {
        uint8_t * row = w.raw.data() + i * w.row_bytes;
        double * v = w.val.data() + i * cols, * m = w.mag.data() + i * cols;
        if (f == Q8_0) { // fp16 d, then 32 int8 q over the whole range: value d * q
            for (int64_t b = 0; b < cols / 32; b++) {
                uint8_t * blk = row + b * 34;
                const uint16_t d = random_half(r, 5, 16);
                put16(blk, d);
                for (int k = 0; k < 32; k++) {
                    blk[2 + k] = (uint8_t) r.below(256);
                    v[b * 32 + k] = (double) half_to_float(d) * (int8_t) blk[2 + k];
                    m[b * 32 + k] = std::fabs(v[b * 32 + k]);
                }
            }
        } else if (f == Q4_K) {
            // fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins for 8 sub-blocks of 32, then 128
            // bytes: byte 32j + l holds value l of sub-block 2j (low nibble) and of 2j + 1 (high)
            for (int64_t s = 0; s < cols / 256; s++) {
                uint8_t * blk = row + s * 144;
                const uint16_t d = random_half(r, 3, 14), dmin = random_half(r, 3, 14);
                put16(blk, d);
                put16(blk + 2, dmin);
                for (int k = 4; k < 144; k++) blk[k] = (uint8_t) r.below(256);
                const uint8_t * sm = blk + 4;
                for (int j = 0; j < 8; j++) {
                    const int sc = j < 4 ? sm[j] & 63 : (sm[j + 4] & 15) | (sm[j - 4] >> 6) << 4;
                    const int mn = j < 4 ? sm[j + 4] & 63 : (sm[j + 4] >> 4) | (sm[j] >> 6) << 4;
                    for (int l = 0; l < 32; l++) {
                        const uint8_t byte = blk[16 + 32 * (j / 2) + l];
                        const int q = j % 2 == 0 ? byte & 15 : byte >> 4;
                        const double a = (double) half_to_float(d) * sc * q, b = (double) half_to_float(dmin) * mn;
                        v[s * 256 + j * 32 + l] = a - b;
                        m[s * 256 + j * 32 + l] = std::fabs(a) + std::fabs(b);
                    }
                }
            }
        } else { // F16: signed halves over exponents 2^-10 .. 2^1, some zero
            for (int64_t k = 0; k < cols; k++) {
                const uint16_t h = r.below(16) == 0 ? 0 : (uint16_t) (random_half(r, 5, 16) | r.below(2) << 15);
                put16(row + k * 2, h);
                v[k] = half_to_float(h);
                m[k] = std::fabs(v[k]);
            }
        }
    }
    return w;
}

// 8 columns of activations: varied magnitude per column and per block, one all-zero block.
std::vector<float> make_activations(int64_t cols, rng & r) {
    std::vector<float> x((size_t) (8 * cols));
    for (int64_t c = 0; c < 8; c++) {
        const double col_scale = std::ldexp(1.0, r.below(12) - 6);
        for (int64_t b = 0; b < cols / 16; b++) {
            const double s = col_scale * (0.05 + r.uniform());
            for (int k = 0; k < 16; k++) x[c * cols + b * 16 + k] = (float) (s * (2 * r.uniform() - 1));
        }
    }
    if (cols >= 64) for (int k = 32; k < 64; k++) x[3 * cols + k] = 0.0f;
    return x;
}

// Q8_0-style quantisation of one column (what kernels/kernel.h specifies): per 32 values amax =
// max |x|, q = round-half-even(x * (127 / amax)), scale amax / 127, in float as the kernels do; per
// block the sum of its quants.
void reference_quantize(const float * x, int64_t cols, int8_t * q, float * d, int32_t * sum) {
    for (int64_t b = 0; b < cols / 32; b++) {
        float amax = 0.0f;
        for (int k = 0; k < 32; k++) amax = std::fmax(amax, std::fabs(x[b * 32 + k]));
        const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
        int32_t s = 0;
        for (int k = 0; k < 32; k++) {
            const float p = x[b * 32 + k] * id;
            q[b * 32 + k] = (int8_t) std::nearbyint(p); // the default rounding mode: half to even
            s += q[b * 32 + k];
        }
        d[b] = amax / 127.0f;
        sum[b] = s;
    }
}

// The kernels' inputs for n_col columns of one matrix: quantised (Q8_0, Q4_K) or f32 (F16).
struct columns {
    int64_t n_col, nbp;
    std::vector<int8_t> y;
    std::vector<float> dy, x;
    std::vector<int32_t> sb;
};

columns prepare(csm_wfmt f, const float * x, int64_t cols, int64_t n_col) {
    columns in;
    in.n_col = n_col;
    in.nbp = csm_kernel_nbp(cols);
    in.x.assign(x, x + n_col * cols);
    if (f != F16) {
        in.y.assign((size_t) (n_col * in.nbp * 32), 0x55);
        in.dy.assign((size_t) (n_col * in.nbp), -1.0f);
        in.sb.assign(in.dy.size(), 12345);
        K->quantize(x, cols, n_col, cols, in.nbp, in.y.data(), in.dy.data(), in.sb.data());
    }
    return in;
}

// Rows [r0, r1) times columns [c0, c0 + n) of `in`, into out (column c at c * rows).
void product(csm_wfmt f, const uint8_t * w, int64_t rows, int64_t cols, const columns & in, int64_t r0, int64_t r1,
             int64_t c0, int64_t n, float * out) {
    csm_kernel_input ki;
    if (f == F16) {
        ki.x = in.x.data();
        ki.x_stride = cols;
    } else {
        ki.y = in.y.data();
        ki.dy = in.dy.data();
        ki.sb = in.sb.data();
        ki.col_stride = in.n_col;
    }
    K->gemm[f](w, rows, cols, r0, r1, ki, c0, n, out + c0 * rows + r0, rows);
}

// All rows, split at tile boundaries into n_split ranges (as threads do); each range's columns in
// one call, or in two calls (c0 = 0 and the rest) when split_cols.
std::vector<float> run(csm_wfmt f, const uint8_t * w, int64_t rows, int64_t cols, const columns & in, int n_split,
                       int64_t split_cols) {
    std::vector<float> out((size_t) (in.n_col * rows + 1), -12345.0f); // + a sentinel after the end
    const int64_t tiles = (rows + 3) / 4;
    for (int i = 0; i < n_split; i++) {
        const int64_t t0 = tiles * i / n_split, t1 = tiles * (i + 1) / n_split;
        const int64_t r0 = t0 * 4, r1 = t1 * 4 < rows ? t1 * 4 : rows;
        if (r0 >= r1) continue;
        if (split_cols > 0 && split_cols < in.n_col) {
            product(f, w, rows, cols, in, r0, r1, 0, split_cols, out.data());
            product(f, w, rows, cols, in, r0, r1, split_cols, in.n_col - split_cols, out.data());
        } else {
            product(f, w, rows, cols, in, r0, r1, 0, in.n_col, out.data());
        }
    }
    return out;
}

// Column c of n_col quantised columns in natural order (groups of 8 blocks, [group][column], [m][l][4]);
// sb: one per block.
void unpack_column(const columns & in, int64_t cols, int64_t c, int8_t * q, float * d, int32_t * sb) {
    for (int64_t b = 0; b < cols / 32; b++) {
        const int64_t gi = (b / 8) * in.n_col + c;
        for (int k = 0; k < 32; k++) q[b * 32 + k] = in.y[(size_t) (gi * 256 + ((k / 4) * 8 + b % 8) * 4 + k % 4)];
        d[b] = in.dy[(size_t) (gi * 8 + b % 8)];
        sb[b] = in.sb[(size_t) (gi * 8 + b % 8)];
    }
}

void check_format(csm_wfmt f, int64_t rows, int64_t cols, uint64_t seed) {
    rng r(seed);
    const weights W = make_weights(f, rows, cols, r);
    const std::vector<float> x = make_activations(cols, r);
    const csm_wformat & fmt = csm_wformat_get(f);
    const int64_t nbp = csm_kernel_nbp(cols);
    std::vector<uint8_t> w((size_t) (rows * fmt.row_bytes(cols)), 0xAB); // garbage: packing must write every byte
    fmt.pack_rows(W.raw.data(), W.row_bytes, rows, cols, w.data());
    const char * name = fmt.name;

    // Each column alone: quantisation and product against the references.
    std::vector<std::vector<float>> alone(8);
    for (int64_t c = 0; c < 8; c++) {
        const columns in = prepare(f, x.data() + c * cols, cols, 1);
        std::vector<float> xq((size_t) cols); // the activations the product must use
        if (f != F16) {
            check q(strf("quantize %s cols=%ld column %ld", name, (long) cols, (long) c));
            std::vector<int8_t> yk((size_t) cols), yr((size_t) cols);
            std::vector<float> dk((size_t) cols / 32), dr((size_t) cols / 32);
            std::vector<int32_t> sk((size_t) cols / 32), sr((size_t) cols / 32);
            unpack_column(in, cols, 0, yk.data(), dk.data(), sk.data());
            reference_quantize(x.data() + c * cols, cols, yr.data(), dr.data(), sr.data());
            for (int64_t b = 0; b < cols / 32; b++) {
                if (memcmp(yk.data() + b * 32, yr.data() + b * 32, 32) != 0) q.fail(strf("block %ld: int8 values differ", (long) b));
                if (dk[b] != dr[b]) q.fail(strf("block %ld: scale %g, expected %g", (long) b, dk[b], dr[b]));
                if (sk[b] != -128 * sr[b]) q.fail(strf("block %ld: sb %d, expected %d", (long) b, sk[b], -128 * sr[b]));
                for (int k = 0; k < 32; k++) xq[b * 32 + k] = (float) yr[b * 32 + k] * dr[b];
            }
            for (int64_t b = cols / 32; b < nbp; b++) { // padding blocks are zero
                const int64_t gi = b / 8;
                for (int k = 0; k < 32; k++)
                    if (in.y[(size_t) (gi * 256 + ((k / 4) * 8 + b % 8) * 4 + k % 4)] != 0) q.fail(strf("padding block %ld: quants not zero", (long) b));
                if (in.dy[(size_t) (gi * 8 + b % 8)] != 0.0f || in.sb[(size_t) (gi * 8 + b % 8)] != 0) q.fail(strf("padding block %ld: scale or sum not zero", (long) b));
            }
        } else {
            for (int64_t k = 0; k < cols; k++) xq[k] = x[c * cols + k];
        }
        alone[c] = run(f, w.data(), rows, cols, in, 1, 0);
        check p(strf("product %s rows=%ld cols=%ld column %ld", name, (long) rows, (long) cols, (long) c));
        for (int64_t i = 0; i < rows; i++) {
            double ref = 0.0, mag = 0.0;
            for (int64_t k = 0; k < cols; k++) {
                ref += W.val[i * cols + k] * xq[k];
                mag += W.mag[i * cols + k] * std::fabs(xq[k]);
            }
            // the kernels sum in f32: a few roundings of the running sums' size per block group
            const double tol = 1e-5 * mag + 1e-30;
            if (!(std::fabs(alone[c][i] - ref) <= tol))
                p.fail(strf("row %ld: %.9g, expected %.9g", (long) i, alone[c][i], ref));
        }
        if (alone[c][rows] != -12345.0f) p.fail("wrote past the last row");
    }

    // Batches of 1-8 columns, the columns rotated through the slots; rows and columns split.
    for (int64_t n_col = 1; n_col <= 8; n_col++) {
        for (int64_t rot = 0; rot < 8; rot += 3) {
            std::vector<float> xb((size_t) (n_col * cols));
            for (int64_t j = 0; j < n_col; j++)
                memcpy(xb.data() + j * cols, x.data() + (j + rot) % 8 * cols, (size_t) cols * sizeof(float));
            const columns in = prepare(f, xb.data(), cols, n_col);
            check b(strf("batch invariance %s rows=%ld cols=%ld n_col=%ld rotation %ld", name, (long) rows, (long) cols,
                         (long) n_col, (long) rot));
            if (f != F16) { // the quantised column is the same wherever it sits
                for (int64_t j = 0; j < n_col; j++) {
                    std::vector<int8_t> q1((size_t) cols), qb((size_t) cols);
                    std::vector<float> d1((size_t) cols / 32), db((size_t) cols / 32);
                    std::vector<int32_t> s1((size_t) cols / 16), s2((size_t) cols / 16);
                    const columns one = prepare(f, xb.data() + j * cols, cols, 1);
                    unpack_column(one, cols, 0, q1.data(), d1.data(), s1.data());
                    unpack_column(in, cols, j, qb.data(), db.data(), s2.data());
                    if (q1 != qb || d1 != db || s1 != s2) b.fail(strf("slot %ld: quantised column differs", (long) j));
                }
            }
            for (int n_split = 1; n_split <= 3; n_split++) {
                const std::vector<float> out = run(f, w.data(), rows, cols, in, n_split, n_split == 2 ? n_col / 2 : 0);
                for (int64_t j = 0; j < n_col; j++) {
                    const std::vector<float> & ref = alone[(j + rot) % 8];
                    if (memcmp(out.data() + j * rows, ref.data(), (size_t) rows * sizeof(float)) != 0)
                        b.fail(strf("slot %ld (%d row ranges): not bit-identical to the column alone", (long) j, n_split));
                }
                if (out[(size_t) (n_col * rows)] != -12345.0f) b.fail("wrote past the last column");
            }
        }
    }
}

void check_silu(int64_t n, uint64_t seed) {
    rng r(seed);
    std::vector<float> g((size_t) n), u((size_t) n), out((size_t) n + 1, -12345.0f);
    const float special[] = {0.0f, -0.0f, 88.0f, -88.0f, 1000.0f, -1000.0f, 1e-20f, -30.0f};
    for (int64_t i = 0; i < n; i++) {
        g[i] = i < 8 && n > 16 ? special[i] : (float) (40 * r.uniform() - 20);
        u[i] = (float) (4 * r.uniform() - 2);
    }
    K->silu_mul(g.data(), u.data(), out.data(), n);
    check c(strf("silu_mul n=%ld", (long) n));
    for (int64_t i = 0; i < n; i++) {
        const double ref = (double) g[i] / (1.0 + std::exp(-(double) g[i])) * u[i];
        if (!(std::fabs(out[i] - ref) <= 2e-6 * std::fabs(ref) + 1e-30))
            c.fail(strf("silu(%g) * %g = %.9g", g[i], u[i], out[i]));
    }
    if (out[(size_t) n] != -12345.0f) c.fail("wrote past the end");
}

// What csm_kernel_pick() gives: the NEON kernel when the CPU has it and PYCSM_KERNEL allows it;
// never a kernel that calls itself neon when it does not. (No other kernel is built for aarch64.)
void check_pick(bool have_neon) {
    const struct { const char * env; bool neon; } cases[] = {{nullptr, have_neon}, {"neon", have_neon},
                                                            {"ggml", false}, {"avx512", false}, {"avx2", false}};
    for (const auto & c : cases) {
        if (c.env) setenv("PYCSM_KERNEL", c.env, 1);
        else unsetenv("PYCSM_KERNEL");
        char line[128];
        check p(strf("pick with PYCSM_KERNEL=%s: %s", c.env ? c.env : "(unset)", csm_kernel_describe(line, sizeof line)));
        const csm_kernel * k = csm_kernel_pick();
        if (c.neon && (!k || k != csm_kernel_neon())) p.fail("not the NEON kernel");
        if (!c.neon && k && !strcmp(k->name, "neon")) p.fail("the NEON kernel");
        if (!c.neon && k && c.env && !strcmp(c.env, "ggml")) p.fail("a kernel, expected ggml's products");
    }
    unsetenv("PYCSM_KERNEL");
}

void check_elu(int64_t n, uint64_t seed) {
    rng r(seed);
    std::vector<float> x((size_t) n), out((size_t) n + 1, -12345.0f);
    const float special[] = {0.0f, -0.0f, -1e-7f, 3e-8f, -87.5f, -1000.0f, 1e30f, -1e30f};
    for (int64_t i = 0; i < n; i++) x[i] = i < 8 && n > 16 ? special[i] : (float) (i % 2 ? 6 * r.uniform() - 5 : -1e-3 * r.uniform());
    K->elu(x.data(), out.data(), n);
    check c(strf("elu n=%ld", (long) n));
    for (int64_t i = 0; i < n; i++) {
        const double ref = x[i] > 0 ? (double) x[i] : std::expm1((double) x[i]);
        if (!(std::fabs(out[i] - ref) <= 1e-6 * std::fabs(ref) + 1e-38)) c.fail(strf("elu(%g) = %.9g", x[i], out[i]));
    }
    if (out[(size_t) n] != -12345.0f) c.fail("wrote past the end");
    std::vector<float> y = x;
    K->elu(y.data(), y.data(), n);
    if (memcmp(y.data(), out.data(), sizeof(float) * (size_t) n) != 0) c.fail("in place differs");
}

// The attention kernel: against a double softmax (2e-6 of the largest output), each query alone
// equal to it in a block of n_q, keys and values past a query's n_keys (NaN) ignored, nothing
// written past the scratch.
void check_attention(int64_t n_q, int64_t hd, int64_t n_kv, uint64_t seed) {
    rng r(seed);
    check c(strf("attend n_q=%ld hd=%ld n_kv=%ld", (long) n_q, (long) hd, (long) n_kv));
    const int64_t ks = hd + 8;
    std::vector<int32_t> n_keys((size_t) n_q);
    std::vector<float> q((size_t) (n_q * hd)), k((size_t) (n_kv * ks)), vt((size_t) (hd * n_kv));
    for (int64_t i = 0; i < n_q; i++) n_keys[i] = i == 0 ? (int32_t) n_kv : i == 1 ? 0 : 1 + (int32_t) (r.uniform() * (double) n_kv) % (int32_t) n_kv;
    for (float & x : q) x = (float) (4 * r.uniform() - 2);
    for (float & x : k) x = (float) (4 * r.uniform() - 2);
    for (float & x : vt) x = (float) (2 * r.uniform() - 1);
    const int64_t need = csm_attn_scratch(hd, n_kv);
    std::vector<float> scratch((size_t) need + 16 + 64);
    float * sc = (float *) (((uintptr_t) scratch.data() + 63) & ~(uintptr_t) 63);
    for (int g = 0; g < 64; g++) sc[need + g] = 4242.0f;
    std::vector<float> block((size_t) (n_q * hd), -1.0f), alone = block, nanp = block;
    auto call = [&](int64_t q0, int64_t nq, const float * keys, const float * values, std::vector<float> & out) {
        csm_attn_block a;
        a.n_q = (int) nq, a.hd = hd, a.scale = 1.0f / std::sqrt((float) hd);
        a.k = keys, a.k_stride = ks, a.vt = values, a.vt_stride = n_kv, a.scratch = sc;
        for (int64_t i = 0; i < nq; i++) {
            a.q[i] = &q[(size_t) ((q0 + i) * hd)], a.out[i] = &out[(size_t) ((q0 + i) * hd)], a.n_keys[i] = n_keys[(size_t) (q0 + i)];
        }
        K->attend(a);
    };
    call(0, n_q, k.data(), vt.data(), block);
    for (int64_t i = 0; i < n_q; i++) call(i, 1, k.data(), vt.data(), alone);
    for (int64_t i = 0; i < n_q; i++) {
        std::vector<float> k2 = k, v2 = vt;
        for (int64_t j = n_keys[(size_t) i]; j < n_kv; j++)
            for (int64_t d = 0; d < hd; d++) k2[(size_t) (j * ks + d)] = NAN, v2[(size_t) (d * n_kv + j)] = NAN;
        call(i, 1, k2.data(), v2.data(), nanp);
    }
    for (int g = 0; g < 64; g++)
        if (sc[need + g] != 4242.0f) c.fail("wrote past its scratch");
    if (memcmp(block.data(), alone.data(), block.size() * sizeof(float)) != 0) c.fail("a query alone differs from it in a block");
    if (memcmp(block.data(), nanp.data(), block.size() * sizeof(float)) != 0) c.fail("keys past a query's own changed it");
    for (int64_t i = 0; i < n_q; i++) {
        const int64_t L = n_keys[(size_t) i];
        std::vector<double> s((size_t) L), o((size_t) hd, 0.0);
        double mx = -1e300, sum = 0, big = 1.0;
        for (int64_t j = 0; j < L; j++) {
            double dot = 0;
            for (int64_t d = 0; d < hd; d++) dot += (double) q[(size_t) (i * hd + d)] * k[(size_t) (j * ks + d)];
            s[(size_t) j] = dot / std::sqrt((double) hd);
            mx = std::max(mx, s[(size_t) j]);
        }
        for (int64_t j = 0; j < L; j++) sum += s[(size_t) j] = std::exp(s[(size_t) j] - mx);
        for (int64_t d = 0; d < hd; d++) {
            for (int64_t j = 0; j < L; j++) o[(size_t) d] += s[(size_t) j] / sum * vt[(size_t) (d * n_kv + j)];
            big = std::max(big, std::fabs(o[(size_t) d]));
        }
        for (int64_t d = 0; d < hd; d++) {
            if (!(std::fabs(block[(size_t) (i * hd + d)] - o[(size_t) d]) <= 2e-6 * big))
                c.fail(strf("query %ld dim %ld: %.9g, expected %.9g", (long) i, (long) d, block[(size_t) (i * hd + d)], o[(size_t) d]));
        }
    }
}

} // namespace

int main(int argc, char ** argv) {
    const bool expect_unavailable = argc > 1 && strcmp(argv[1], "--expect-unavailable") == 0;
    K = csm_kernel_neon();
    {
        check a(expect_unavailable ? "no NEON kernel on this CPU" : "NEON kernel on this CPU");
        if ((K != nullptr) == expect_unavailable) a.fail("csm_kernel_neon() says the opposite");
        if (K && (strcmp(K->name, "neon") != 0 || !K->quantize || !K->silu_mul || !K->elu || !K->attend || !K->gemm[Q8_0] || !K->gemm[Q4_K] || !K->gemm[F16]))
            a.fail("incomplete kernel table");
    }
    check_pick(!expect_unavailable);
    if (!expect_unavailable && n_fail == 0) {
        // rows: one tile, tiles plus 1-3 tail rows, only tail rows; cols: padded last groups
        const int64_t rows_list[] = {1, 3, 4, 6, 9, 15};
        const int64_t q8_cols[] = {32, 256, 288, 800};
        const int64_t q4k_cols[] = {256, 768};
        const int64_t f16_cols[] = {16, 48, 400};
        uint64_t seed = 1;
        for (int64_t rows : rows_list) {
            for (int64_t cols : q8_cols) check_format(Q8_0, rows, cols, seed++);
            for (int64_t cols : q4k_cols) check_format(Q4_K, rows, cols, seed++);
            for (int64_t cols : f16_cols) check_format(F16, rows, cols, seed++);
        }
        // the backbone's width: 8 groups of 8 blocks (Q8_0), 8 super-blocks (Q4_K), 128 chunks (F16)
        for (csm_wfmt f : {Q8_0, Q4_K, F16}) check_format(f, 10, 2048, seed++);
        for (int64_t n : {1, 3, 4, 7, 8, 33, 1000}) check_silu(n, seed++);
        for (int64_t n : {1, 3, 4, 7, 8, 33, 1000}) check_elu(n, seed++);
        const int64_t attn[][3] = {{1, 64, 1}, {4, 64, 37}, {16, 64, 200}, {13, 8, 9}, {16, 128, 64}, {6, 64, 33}};
        for (const auto & t : attn) check_attention(t[0], t[1], t[2], seed++);
    }
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail > 0 ? 1 : 0;
}
