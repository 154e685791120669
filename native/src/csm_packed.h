// csm_packed.h - weight matrices packed for pycsm's kernels (kernels/kernel.h), made from ggml tensors
// or raw rows. Knows the formats and the kernels, not the model.
#pragma once

#include "kernels/kernel.h"

#include "ggml.h"

#include <cstdint>
#include <memory>
#include <vector>

// A matrix of `rows` x `cols` (ggml's ne1 x ne0) in its format's packed layout, and the kernel that
// multiplies it (it was chosen when the matrix was packed).
struct csm_packed_matrix {
    const csm_kernel * kernel = nullptr;
    csm_wfmt fmt = CSM_WFMT_Q8_0;
    int64_t rows = 0, cols = 0;
    int64_t nbp = 0;       // blocks of 32 per quantised input column (csm_kernel_nbp(cols))
    int64_t row_bytes = 0; // packed bytes per row
    uint8_t * w = nullptr;
    void * mem = nullptr;
    size_t mem_size = 0;
    ~csm_packed_matrix();
};

// Packed matrices with the same input that one op computes together: q, k and v of a layer, or its
// gate and up (same rows). The model keeps them (csm_model::packed_groups) so graph ops can point at them.
struct csm_packed_group {
    std::vector<const csm_packed_matrix *> mats;
};

// The format of a ggml type in the table, false when there is none.
bool csm_wfmt_of(ggml_type type, csm_wfmt * f);

// Can kernel k take this tensor: 2-D, of a format k has, rows of whole blocks (Q8_0: cols % 32,
// Q4_K: % 256, F16: % 16)?
bool csm_packable(const csm_kernel * k, const ggml_tensor * w);
// Packs such a tensor held in host memory for k. Throws csm_error on allocation failure.
std::unique_ptr<csm_packed_matrix> csm_pack(const csm_kernel * k, const ggml_tensor * w);
// Quantises rows x cols floats (row-major) to Q8_0 and packs them. cols % 32 == 0. Throws.
std::unique_ptr<csm_packed_matrix> csm_pack_f32_as_q8_0(const csm_kernel * k, const float * data, int64_t rows, int64_t cols);
// Packs rows x cols fp16 values (row-major). cols % 16 == 0. Throws.
std::unique_ptr<csm_packed_matrix> csm_pack_f16(const csm_kernel * k, const uint16_t * data, int64_t rows, int64_t cols);

// A group of matrices one op can compute with one prepared input (same kernel, columns and kind of
// input; with same_rows, also the same rows), else null.
std::unique_ptr<csm_packed_group> csm_packed_group_make(std::vector<const csm_packed_matrix *> mats, bool same_rows);
