// csm_q8.cpp - packing Q8_0 matrices for the AVX512-VNNI kernel and running it as a ggml custom op.
#include "csm_q8.h"

#include "csm_log.h"
#include "csm_q8_kernel.h"

#include <cstdlib>
#include <cstring>
#include <vector>

#include <sys/mman.h>

csm_q8_matrix::~csm_q8_matrix() { free(mem); }

bool csm_q8_available() {
    static const bool ok = csm_q8_kernel_available();
    return ok;
}

std::unique_ptr<csm_q8_matrix> csm_q8_pack(const ggml_tensor * w) {
    if (w->type != GGML_TYPE_Q8_0 || w->ne[2] != 1 || w->ne[3] != 1 || w->ne[0] % 32 != 0) {
        csm_fail("internal: cannot pack tensor '%s' for the int8 kernel", w->name);
    }
    auto m = std::make_unique<csm_q8_matrix>();
    m->rows = w->ne[1];
    m->cols = w->ne[0];
    const int64_t nb = m->cols / 32;
    m->nbp = (nb + 7) / 8 * 8;
    const size_t bytes = (size_t) (m->rows * m->nbp * 34);
    const size_t align = 2u << 20; // 2 MiB: lets the kernel use transparent huge pages
    m->mem_size = (bytes + align - 1) / align * align;
    m->mem = aligned_alloc(align, m->mem_size);
    if (!m->mem) csm_fail("out of memory packing '%s' (%zu bytes)", w->name, m->mem_size);
#ifdef MADV_HUGEPAGE
    madvise(m->mem, m->mem_size, MADV_HUGEPAGE);
#endif
    m->w = (uint8_t *) m->mem;
    csm_q8_pack_rows((const uint8_t *) w->data, w->nb[1], m->rows, m->cols, m->w);
    return m;
}

namespace {

struct q8_scratch {
    std::vector<int8_t> y;
    std::vector<float> dy;
    std::vector<int32_t> sb;
};

// dst = W x, W = userdata; every thread quantises x itself (cheap next to its share of W) and then
// computes its own contiguous range of 4-row tiles.
void q8_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const csm_q8_matrix & W = *(const csm_q8_matrix *) userdata;
    const ggml_tensor * x = dst->src[0];
    const int64_t n = x->ne[1];
    thread_local q8_scratch s;
    const size_t nblk = (size_t) (n * W.nbp);
    if (s.y.size() < nblk * 32) s.y.resize(nblk * 32);
    if (s.dy.size() < nblk) { s.dy.resize(nblk); s.sb.resize(nblk); }
    csm_q8_quantize((const float *) x->data, (int64_t) (x->nb[1] / sizeof(float)), n, W.cols, W.nbp,
                    s.y.data(), s.dy.data(), s.sb.data());
    const int64_t tiles = (W.rows + 3) / 4;
    const int64_t t0 = tiles * ith / nth, t1 = tiles * (ith + 1) / nth;
    const int64_t r0 = t0 * 4, r1 = t1 * 4 < W.rows ? t1 * 4 : W.rows;
    if (r0 >= r1) return;
    csm_q8_gemm(W.w, W.rows, W.nbp, r0, r1, s.y.data(), s.dy.data(), s.sb.data(), n, (float *) dst->data,
                (int64_t) (dst->nb[1] / sizeof(float)));
}

} // namespace

ggml_tensor * csm_mul_mat(ggml_context * ctx, const csm_model & m, ggml_tensor * w, ggml_tensor * x) {
    auto it = m.q8.find(w);
    if (it == m.q8.end()) return ggml_mul_mat(ctx, w, x);
    const csm_q8_matrix * W = it->second.get();
    if (x->type != GGML_TYPE_F32 || x->ne[0] != W->cols || x->ne[2] != 1 || x->ne[3] != 1 || x->nb[0] != sizeof(float)) {
        return ggml_mul_mat(ctx, w, x);
    }
    ggml_tensor * args[1] = {x};
    return ggml_custom_4d(ctx, GGML_TYPE_F32, W->rows, x->ne[1], 1, 1, args, 1, q8_op, GGML_N_TASKS_MAX, (void *) W);
}
