// csm_ops.h - the matrix products of the graphs: pycsm's kernels as ggml custom ops where the model
// holds packed copies of the weights (csm_packed.h), ggml's products elsewhere.
#pragma once

#include "csm_model.h"

// w x for a weight of the model: pycsm's kernel when the model holds a packed copy of w (then x must
// be f32 [w->ne[0], n], 2-D; its mapped pages are gone), else ggml_mul_mat. Result f32 [w->ne[1], n].
ggml_tensor * csm_mul_mat(ggml_context * ctx, const csm_model & m, ggml_tensor * w, ggml_tensor * x);

// res + w x (res f32 [w->ne[1], n]): one op with the residual added by the product's threads when
// the model holds a packed copy of w (the same bits as ggml_add(res, w x)), else ggml_add.
ggml_tensor * csm_mul_mat_add(ggml_context * ctx, const csm_model & m, ggml_tensor * w, ggml_tensor * x, ggml_tensor * res);

// W x for a matrix Mimi packed for pycsm's kernel and x f32 [W->cols, n, lanes]; result f32
// [W->rows, n, lanes]. For F16, x's columns may overlap (an im2col view: nb[1] under a row); the
// int8 formats (Mimi's transformer in a Q8_0 or Q4_K file) quantise x, which must be contiguous.
ggml_tensor * csm_mul_mat_packed(ggml_context * ctx, const csm_packed_matrix * W, ggml_tensor * x);

// q, k and v (f32 [rows, n] each) of input x: views of one op's result when the model has the three
// packed as a group (one quantisation of x, one pass over the threads), else three products.
void csm_mul_mat_qkv(ggml_context * ctx, const csm_model & m, ggml_tensor * wq, ggml_tensor * wk, ggml_tensor * wv,
                     ggml_tensor * x, ggml_tensor ** q, ggml_tensor ** k, ggml_tensor ** v);

// The gated feed-forward input silu(gate x) * (up x), f32 [ff, n]: one op when the model has gate
// and up packed as a group, else ggml's products, silu and mul.
ggml_tensor * csm_ffn_gate_up(ggml_context * ctx, const csm_model & m, ggml_tensor * w_gate, ggml_tensor * w_up,
                              ggml_tensor * x);

// The depth heads: column b of x [dp_d, B] times head ids[b] (i32 [1, B]); result f32 [vocab, B].
// Uses the model's packed heads when it has them, else ggml_mul_mat_id on the F16/F32 copy.
ggml_tensor * csm_depth_heads(ggml_context * ctx, const csm_model & m, ggml_tensor * x, ggml_tensor * ids);

// Attention of q [hd, nh, T, B] (after RoPE) over the cache views K [hd, nkv, n_kv, B] and
// V [n_kv, hd, nkv, B] (rows transposed) with the causal mask [n_kv, T, 1, B], f32 [hd, nh, T, B]:
// pycsm's kernel (kernel.h's attend: each query's result independent of the others and of the keys
// past its own) when the model runs one that has it, else null (the caller builds ggml's).
ggml_tensor * csm_attention(ggml_context * ctx, const csm_model & m, ggml_tensor * q, ggml_tensor * K, ggml_tensor * V,
                            ggml_tensor * mask);

// The backbone's input embeddings [d, n_tok] (csm_graph.cpp's embed_rows): one op that sums each
// position's masked audio rows (and its masked text row when text_ids is given) on the CPU, with
// the bits of ggml's get_rows, mul, sum_rows and add, when the model runs pycsm's kernels; else null.
ggml_tensor * csm_embed(ggml_context * ctx, const csm_model & m, ggml_tensor * audio_ids, ggml_tensor * audio_mask,
                        ggml_tensor * text_ids, ggml_tensor * text_mask);

// ELU (alpha 1) of x: pycsm's kernel (kernel.h: expm1 to 1e-6 relative) on the CPU backend when one
// runs here and x is contiguous f32, else ggml_elu (whose scalar expm1f took a sixth of a Mimi decode).
ggml_tensor * csm_elu(ggml_context * ctx, ggml_tensor * x, bool cpu);
