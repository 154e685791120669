// csm_q8.h - Q8_0 / Q4_K / F16 matrices re-laid out for pycsm's own CPU kernels (AVX512), and the
// matrix products that pick them or ggml's mul_mat.
#pragma once

#include "csm_model.h"

#include <cstdint>
#include <memory>
#include <vector>

// A Q8_0, Q4_K or F16 matrix of `rows` x `cols` (ggml's ne1 x ne0) in the kernels' tiled layouts
// (csm_q8_kernel.h): nbp blocks of 32 per row (cols / 32 rounded up to a multiple of 8; the input
// quantisation of Q8_0 / Q4_K uses it, F16 products take the f32 input as it is).
struct csm_q8_matrix {
    ggml_type type = GGML_TYPE_Q8_0; // GGML_TYPE_Q8_0, GGML_TYPE_Q4_K or GGML_TYPE_F16
    int64_t rows = 0, cols = 0, nbp = 0;
    uint8_t * w = nullptr;
    void * mem = nullptr;
    size_t mem_size = 0;
    ~csm_q8_matrix();
};

// Packed matrices with the same input that one op computes together: q, k and v of a layer, or its
// gate and up (same rows). The model keeps them (csm_model::q8_groups) so graph ops can point at them.
struct csm_q8_group {
    std::vector<const csm_q8_matrix *> mats;
};

// True when the CPU and this build run the kernels.
bool csm_q8_available();

// Can csm_q8_pack take this tensor (2-D Q8_0, Q4_K with rows of whole super-blocks, F16 with rows
// of a multiple of 16)?
bool csm_q8_packable(const ggml_tensor * w);
// Packs such a tensor held in host memory. Throws csm_error on allocation failure.
std::unique_ptr<csm_q8_matrix> csm_q8_pack(const ggml_tensor * w);
// Quantises rows x cols floats (row-major) to Q8_0 and packs them. cols % 32 == 0. Throws.
std::unique_ptr<csm_q8_matrix> csm_q8_pack_f32(const float * data, int64_t rows, int64_t cols);
// Packs rows x cols fp16 values (row-major) for the F16 kernel. cols % 16 == 0. Throws.
std::unique_ptr<csm_q8_matrix> csm_q8_pack_f16(const uint16_t * data, int64_t rows, int64_t cols);

// w x for a weight of the model: pycsm's kernel when the model holds a packed copy of w (then x must
// be f32 [w->ne[0], n], 2-D; its mapped pages are gone), else ggml_mul_mat. Result f32 [w->ne[1], n].
ggml_tensor * csm_mul_mat(ggml_context * ctx, const csm_model & m, ggml_tensor * w, ggml_tensor * x);

// q, k and v (f32 [rows, n] each) of input x: views of one op's result when the model has the three
// packed as a group (one quantisation of x, one pass over the threads), else three products.
void csm_mul_mat_qkv(ggml_context * ctx, const csm_model & m, ggml_tensor * wq, ggml_tensor * wk, ggml_tensor * wv,
                     ggml_tensor * x, ggml_tensor ** q, ggml_tensor ** k, ggml_tensor ** v);

// The gated feed-forward input silu(gate x) * (up x), f32 [ff, n]: one op when the model has gate
// and up packed as a group, else ggml's products, silu and mul.
ggml_tensor * csm_ffn_gate_up(ggml_context * ctx, const csm_model & m, ggml_tensor * w_gate, ggml_tensor * w_up,
                              ggml_tensor * x);

// Groups the model's packed q/k/v and gate/up matrices into m.q8_groups where their shapes allow.
void csm_q8_make_groups(csm_model & m);

// The depth heads: column b of x [dp_d, B] times head ids[b] (i32 [1, B]); result f32 [vocab, B].
// Uses the model's packed heads when it has them, else ggml_mul_mat_id on the F16/F32 copy.
ggml_tensor * csm_depth_heads(ggml_context * ctx, const csm_model & m, ggml_tensor * x, ggml_tensor * ids);
