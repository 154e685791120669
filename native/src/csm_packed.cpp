// csm_packed.cpp - packing ggml tensors (or raw rows) into the kernels' layouts (kernels/kernel.h).
#include "csm_packed.h"

#include "csm_log.h"
#include "csm_platform.h"

#include <cstdlib>

csm_packed_matrix::~csm_packed_matrix() { csm_os_aligned_free(mem); }

bool csm_wfmt_of(ggml_type type, csm_wfmt * f) {
    switch (type) {
        case GGML_TYPE_Q8_0: *f = CSM_WFMT_Q8_0; return true;
        case GGML_TYPE_Q4_K: *f = CSM_WFMT_Q4_K; return true;
        case GGML_TYPE_F16: *f = CSM_WFMT_F16; return true;
        default: return false;
    }
}

static std::unique_ptr<csm_packed_matrix> alloc_packed(const csm_kernel * k, csm_wfmt fmt, int64_t rows, int64_t cols) {
    auto m = std::make_unique<csm_packed_matrix>();
    m->kernel = k;
    m->fmt = fmt;
    m->rows = rows;
    m->cols = cols;
    m->nbp = csm_kernel_nbp(cols);
    m->row_bytes = csm_wformat_get(fmt).row_bytes(cols);
    const size_t bytes = (size_t) (rows * m->row_bytes);
    // 2 MiB for a matrix of at least that: lets the kernel use transparent huge pages. A smaller one
    // (Mimi's convolutions) on cache lines: a huge page each made a Mimi decoder's set up 6x slower.
    const size_t huge = 2u << 20, align = bytes >= huge ? huge : 64;
    m->mem_size = (bytes + align - 1) / align * align;
    m->mem = csm_os_aligned_alloc(align, m->mem_size);
    if (!m->mem) csm_fail("out of memory packing a %lld x %lld matrix", (long long) rows, (long long) cols);
    if (align == huge) csm_os_advise_huge_pages(m->mem, m->mem_size);
    m->w = (uint8_t *) m->mem;
    return m;
}

bool csm_packable(const csm_kernel * k, const ggml_tensor * w) {
    csm_wfmt f;
    if (!k || w->ne[2] != 1 || w->ne[3] != 1 || !csm_wfmt_of(w->type, &f) || !k->gemm[f]) return false;
    return w->ne[0] % csm_wformat_get(f).col_multiple == 0;
}

std::unique_ptr<csm_packed_matrix> csm_pack(const csm_kernel * k, const ggml_tensor * w) {
    csm_wfmt f;
    if (!csm_packable(k, w) || !csm_wfmt_of(w->type, &f)) csm_fail("internal: cannot pack tensor '%s' for pycsm's kernels", w->name);
    auto m = alloc_packed(k, f, w->ne[1], w->ne[0]);
    csm_wformat_get(f).pack_rows((const uint8_t *) w->data, w->nb[1], m->rows, m->cols, m->w);
    return m;
}

std::unique_ptr<csm_packed_matrix> csm_pack_f32_as_q8_0(const csm_kernel * k, const float * data, int64_t rows, int64_t cols) {
    if (cols % 32 != 0) csm_fail("internal: cannot pack a matrix of %lld columns", (long long) cols);
    const size_t row_bytes = ggml_row_size(GGML_TYPE_Q8_0, cols);
    std::vector<uint8_t> q8((size_t) rows * row_bytes);
    ggml_quantize_chunk(GGML_TYPE_Q8_0, data, q8.data(), 0, rows, cols, nullptr);
    auto m = alloc_packed(k, CSM_WFMT_Q8_0, rows, cols);
    csm_wformat_get(CSM_WFMT_Q8_0).pack_rows(q8.data(), row_bytes, rows, cols, m->w);
    return m;
}

std::unique_ptr<csm_packed_matrix> csm_pack_f16(const csm_kernel * k, const uint16_t * data, int64_t rows, int64_t cols) {
    if (cols % 16 != 0) csm_fail("internal: cannot pack a matrix of %lld columns", (long long) cols);
    auto m = alloc_packed(k, CSM_WFMT_F16, rows, cols);
    csm_wformat_get(CSM_WFMT_F16).pack_rows((const uint8_t *) data, (size_t) cols * 2, rows, cols, m->w);
    return m;
}

std::unique_ptr<csm_packed_group> csm_packed_group_make(std::vector<const csm_packed_matrix *> mats, bool same_rows) {
    if (mats.empty()) return nullptr;
    const csm_packed_matrix * a = mats[0];
    for (const csm_packed_matrix * b : mats) {
        if (!b || b->kernel != a->kernel || b->cols != a->cols ||
            csm_wformat_get(b->fmt).int8_input != csm_wformat_get(a->fmt).int8_input || (same_rows && b->rows != a->rows)) {
            return nullptr;
        }
    }
    return std::make_unique<csm_packed_group>(csm_packed_group{std::move(mats)});
}
