// csm_context.h - generation state: backend + thread pool (csm_backend.h), KV caches, graphs kept for reuse.
#pragma once

#include "csm_backend.h"
#include "csm_model.h"
#include "csm_sampling.h"

#include "ggml-alloc.h"

#include <vector>

// A graph built for one input shape, with its own compute buffer, reused while the shape holds.
struct csm_graph {
    ggml_context * ctx = nullptr;
    ggml_cgraph * gf = nullptr;
    ggml_gallocr_t alloc = nullptr;
    int64_t key = -1;               // shape the graph was built for (-1: none)

    // inputs (null when the graph has no such input)
    ggml_tensor * text_ids = nullptr;   // i32 [T*B] text column ids
    ggml_tensor * text_mask = nullptr;  // f32 [1, T*B] 1 where the text column is present
    ggml_tensor * audio_ids = nullptr;  // i32 [32*T*B] audio embedding rows (cb * vocab + code)
    ggml_tensor * audio_mask = nullptr; // f32 [1, 32*T*B]
    ggml_tensor * pos = nullptr;        // i32 [T*B] RoPE positions
    ggml_tensor * kv_idx = nullptr;     // i64 [T*B] K cache rows written (seq * n_ctx + pos)
    ggml_tensor * v_idx = nullptr;      // i64 [kvd*T*B] V cache values written ((seq * kvd + c) * n_ctx + pos)
    ggml_tensor * kq_mask = nullptr;    // f32 [n_kv, T, 1, B]
    ggml_tensor * head_ids = nullptr;   // i32 [1, B] depth head per sequence
    // outputs
    ggml_tensor * logits = nullptr;     // f32 [vocab, B]

    void reset();
    ~csm_graph() { reset(); }
};

struct csm_kv_layer {
    ggml_tensor * k = nullptr; // f32 [head_dim * n_kv_heads, n_ctx * n_seq]
    ggml_tensor * v = nullptr; // f32 [1, n_ctx * head_dim * n_kv_heads * n_seq]: position fastest
};

// Reference counted (csm_ref.h): every call holds its context, csm_context_free drops the caller's
// reference. model_ref keeps the model alive as long as the context (destroyed last).
struct csm_context : csm_refcounted {
    csm_hold<const csm_model> model_ref;
    const csm_model * model = nullptr;
    csm_context_params params{};
    int32_t n_ctx = 0;       // backbone positions per sequence
    int32_t n_seq = 1;       // sequences generated together
    int32_t n_active = 1;    // sequences the step and depth graphs run: [0, n_active) (a csm_batch varies it)
    int32_t n_dctx = 0;      // depth decoder positions (n_codebooks, padded)

    ggml_backend_t backend = nullptr;
    csm_thread_pools pools;   // the CPU backend's thread pools (none on other devices)

    ggml_context * ctx_state = nullptr;
    ggml_backend_buffer_t buf_state = nullptr;
    std::vector<csm_kv_layer> kv_bb, kv_dp;
    ggml_tensor * h_buf = nullptr;   // f32 [bb_d, n_seq] backbone output of the last position

    csm_graph g_prefill, g_step, g_d0, g_dk;

    std::vector<int32_t> n_past;     // backbone positions filled per sequence
    // Per sequence: the prompt rows (CSM_N_COLUMNS int32 each) whose backbone cache rows it still
    // holds from its last prefill, for csm_runner::prefill's prefix reuse; cleared by anything else
    // that writes those rows.
    std::vector<std::vector<int32_t>> prompt_rows;

    ~csm_context();
};

// Graph construction (csm_graph.cpp). Each leaves the graph allocated and ready for inputs.
// Prefill of T prompt rows of sequence `seq`, starting at n_past[seq]; logits = codebook 0.
void csm_build_prefill(csm_context & c, int32_t seq, int32_t T, int32_t n_kv);
// One frame position for the first n_active sequences (audio rows only); logits = codebook 0.
void csm_build_step(csm_context & c, int32_t n_kv);
// Depth decoder position 0 (input: h_buf) for the first n_active sequences; no logits.
void csm_build_depth0(csm_context & c);
// Depth decoder position k >= 1 for the first n_active sequences (input: audio_ids, head_ids); logits.
void csm_build_depthk(csm_context & c);

// Runs a built graph on the context's backend. Throws on failure.
void csm_compute(csm_context & c, csm_graph & g);
