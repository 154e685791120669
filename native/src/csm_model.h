// csm_model.h - the loaded model: hyper-parameters, weight tensors, the backend holding them.
#pragma once

#include "csm.h"
#include "csm_ref.h"

#include "ggml.h"
#include "ggml-backend.h"
#include "gguf.h"

#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

struct csm_kernel; // kernels/kernel.h
struct csm_packed_matrix; // csm_packed.h
struct csm_packed_group;

// One Llama block (backbone and depth decoder share the shape).
struct csm_layer {
    ggml_tensor * attn_norm = nullptr;
    ggml_tensor * wq = nullptr;
    ggml_tensor * wk = nullptr;
    ggml_tensor * wv = nullptr;
    ggml_tensor * wo = nullptr;
    ggml_tensor * ffn_norm = nullptr;
    ggml_tensor * w_gate = nullptr;
    ggml_tensor * w_up = nullptr;
    ggml_tensor * w_down = nullptr;
};

// Llama-3 style RoPE frequency scaling (type "llama3"), or none.
struct csm_rope {
    float   theta = 500000.0f;
    bool    llama3 = false;
    float   factor = 1.0f;
    float   low_freq_factor = 1.0f;
    float   high_freq_factor = 1.0f;
    int32_t orig_max_pos = 0;
    ggml_tensor * freq_factors = nullptr; // [head_dim / 2] divisors of the base frequencies, or null
};

struct csm_llama {
    int32_t n_layers = 0, d_model = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0, ff_dim = 0;
    csm_rope rope;
    std::vector<csm_layer> layers;
    ggml_tensor * output_norm = nullptr;
};

// Reference counted (csm_ref.h): contexts and Mimi runners hold their model; csm_model_free drops
// the caller's reference.
struct csm_model : csm_refcounted {
    std::string path;
    csm_hparams hp{};
    int32_t file_type = -1;
    std::string name;

    csm_llama backbone;
    csm_llama depth;
    ggml_tensor * text_embd = nullptr;       // [d, text_vocab]
    ggml_tensor * audio_embd = nullptr;      // [d, n_codebooks * audio_vocab]
    ggml_tensor * codebook0_head = nullptr;  // [d, audio_vocab]
    ggml_tensor * depth_proj = nullptr;      // [bb_d, dp_d]
    ggml_tensor * depth_embd = nullptr;      // [bb_d, n_codebooks * audio_vocab]
    ggml_tensor * depth_heads_file = nullptr; // [audio_vocab, dp_d, n_codebooks - 1] as stored
    ggml_tensor * depth_heads = nullptr;     // [dp_d, audio_vocab, n_codebooks - 1] transposed copy

    gguf_context * gguf = nullptr;
    ggml_context * ctx_w = nullptr;          // tensor metadata of the file's weights
    ggml_context * ctx_extra = nullptr;      // derived tensors (RoPE factors, transposed depth heads)
    ggml_context * ctx_repack = nullptr;     // matrices moved to the CPU repack buffer
    const csm_kernel * kernel = nullptr;    // pycsm's kernel for the packed matrices below, or null (ggml's)
    std::unordered_map<const ggml_tensor *, std::unique_ptr<csm_packed_matrix>> packed; // matrices packed for it
    std::unordered_map<const ggml_tensor *, std::unique_ptr<csm_packed_group>> packed_groups; // by first member (wq, w_gate)
    std::vector<std::unique_ptr<csm_packed_matrix>> packed_heads; // depth heads, packed (Q8_0, or F16 in F16 files)
    ggml_backend_dev_t dev = nullptr;        // device holding the weights
    std::vector<ggml_backend_buffer_t> bufs; // weight buffers
    void * mmap_addr = nullptr;              // the mapped file (use_mmap without use_repack, CPU)
    size_t mmap_size = 0;
    bool read_into_host = false;             // the file was read into a host buffer
    uint64_t n_params = 0, n_bytes = 0;
    int32_t n_tensors = 0;

    // Looks up a tensor of the file and checks its shape (ne, fastest first; unused dims 1).
    // Throws csm_error when it is missing or has another shape.
    ggml_tensor * get(const std::string & name, std::vector<int64_t> ne) const;
    ggml_tensor * find(const std::string & name) const; // null when absent

    ~csm_model();
};

// True when the tensor's data lives in host memory (CPU backend).
bool csm_model_on_host(const csm_model * model);
