// mimi.h - the Mimi codec (RVQ + transformer + SEANet) on ggml: decode codes to PCM, encode PCM to codes.
//
// Layout: every activation is [channels, time] (channels fastest), the layout of the transformer's
// hidden states, so a causal convolution over a left-padded input is a matrix product with an
// overlapping strided view of the input (no im2col copy on the CPU) and a transposed convolution is a
// matrix product followed by an overlap-add of two halves. Both need the convolution weights with the
// input channel fastest: each codec (and each one-shot call) keeps such a permuted copy.
//
// Streaming: every causal layer keeps what it needs from the previous chunk in a state tensor (the
// last inputs of a convolution, the overlap tail of a transposed convolution, read at the start of
// the chunk's graph and rewritten at its end; the keys and values of each attention layer in a ring
// of the last positions, where a chunk writes its own rows in place), so any chunking of the input
// gives the output of one pass over all of it.
//
// Slots: a decoder keeps the state of n_slots independent streams (each state tensor has a last
// dimension of n_slots, slot-major). One decoder graph runs any subset of the slots at once: the
// activations get a third dimension, one lane per slot, so every weight product serves all of them,
// while attention runs lane by lane against its own slot's keys. A lane's output is that of the
// slot decoded alone.
#pragma once

#include "csm_backend.h"
#include "csm_model.h"
#include "csm_packed.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"

#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

// Checks at load time that every Mimi tensor is present with the shape and type the codec needs.
// Throws csm_error otherwise.
void mimi_check_tensors(const csm_model & model);

// ---------------------------------------------------------------------------------------------
// Architecture: the file's tensors and the sizes derived from them
// ---------------------------------------------------------------------------------------------

static const int MIMI_WINDOW = 250;  // sliding attention window (positions, the query's own included)

// A causal Conv1d (zero left padding of kernel - stride, as transformers' MimiConv1d).
struct mimi_conv {
    ggml_tensor * w = nullptr;    // file tensor, ne [k, in, out]
    ggml_tensor * b = nullptr;    // [out] f32, or null
    int64_t k = 0, in = 0, out = 0, stride = 1;
    ggml_tensor * wp = nullptr;   // prepared: ne [in, k, out] (k == 1: the file tensor itself)
    ggml_tensor * tail = nullptr; // state: f32 [in, k - stride, n_slots], the previous chunk's last inputs
};

// A causal ConvTranspose1d with kernel 2 * stride, trimmed on the right (trim_right_ratio 1).
struct mimi_convtr {
    ggml_tensor * w = nullptr;    // file tensor, ne [k, out, in]
    ggml_tensor * b = nullptr;    // [out] f32
    int64_t k = 0, in = 0, out = 0, stride = 1;
    ggml_tensor * wp = nullptr;   // prepared: ne [in, out, k]
    ggml_tensor * tail = nullptr; // state: f32 [out * stride, 1, n_slots], overlap of the previous chunk's last input
};

// SEANet residual block: x + conv1x1(elu(conv_k(elu(x)))).
struct mimi_resblock {
    mimi_conv c1, c2;
};

// One SEANet stage. Decoder: ELU, transposed conv (up), residual block. Encoder: residual block,
// ELU, strided conv (down).
struct mimi_stage {
    int64_t ratio = 0;
    mimi_convtr up;
    mimi_conv down;
    mimi_resblock res;
};

struct mimi_seanet {
    mimi_conv first;               // k7: decoder dim -> channels, encoder 1 -> num_filters
    std::vector<mimi_stage> stages;
    mimi_conv last;                // k3: decoder num_filters -> 1, encoder channels -> dim
};

struct mimi_tfm_layer {
    ggml_tensor * qkv = nullptr, * out = nullptr, * up = nullptr, * down = nullptr; // matrices (any type)
    ggml_tensor * n1w = nullptr, * n1b = nullptr, * n2w = nullptr, * n2b = nullptr; // f32 [dim]
    ggml_tensor * ls1 = nullptr, * ls2 = nullptr;                                 // f32 [dim]
    // state: f32 [dim, ring, n_slots] (post-RoPE keys); position p of a slot in row p % ring. On the
    // CPU v_cache is f32 [ring, dim, n_slots]: a slot's values transposed, position p in column p % ring
    ggml_tensor * k_cache = nullptr, * v_cache = nullptr;
};

struct mimi_tfm {
    std::vector<mimi_tfm_layer> layers;
    int64_t dim = 0, n_heads = 0, head_dim = 0, ff = 0;
    // rows of a key/value ring: the MIMI_WINDOW - 1 positions before a chunk and the chunk's own, so
    // that writing a chunk never overwrites a key one of its queries reads
    int64_t ring = 0;
};

struct mimi_rvq {
    ggml_tensor * in_proj = nullptr;   // ne [1, dim, cb_dim]
    ggml_tensor * out_proj = nullptr;  // ne [1, cb_dim, dim]
    std::vector<ggml_tensor *> books;  // ne [cb_dim, cb_size] each
    std::vector<ggml_tensor *> norms;  // prepared (encoder): f32 [cb_size] squared row norms
};

struct mimi_arch {
    int64_t dim = 0, cb_dim = 0, cb_size = 0, n_q = 0, n_sem = 0;
    int64_t latent_stride = 2;       // frames of the transformer per code frame
    int64_t samples_per_frame = 0;   // latent_stride * prod(ratios)
    mimi_seanet dec, enc;
    mimi_tfm dec_tfm, enc_tfm;
    ggml_tensor * up_w = nullptr;    // depthwise ConvTranspose1d, ne [2 * latent_stride, 1, dim]
    ggml_tensor * up_wp = nullptr;   // prepared: f32 [dim, 2 * latent_stride]
    ggml_tensor * up_tail = nullptr; // state: f32 [dim, 1, n_slots], the previous chunk's last latent frame
    mimi_conv down;                  // ne [2 * latent_stride, dim, dim], no bias, replicate padding
                                     // (its tail holds the first frame replicated before the first chunk)
    mimi_rvq rvq_sem, rvq_ac;
};

// Binds the Mimi tensors of a model and derives the sizes; throws csm_error on any mismatch.
void mimi_bind(const csm_model & m, mimi_arch & a);

// ---------------------------------------------------------------------------------------------
// Runtime: backend, prepared weights, streaming state, graphs
// ---------------------------------------------------------------------------------------------

// A built graph with its inputs and outputs (one per chunk shape).
struct mimi_graph {
    ggml_context * ctx = nullptr;
    ggml_cgraph * gf = nullptr;
    ggml_tensor * ids = nullptr;    // decoder: i32 [n_frames * lanes, n_q] codes, codebook-major, lane-major
    ggml_tensor * pcm_in = nullptr; // encoder: f32 [1, n_samples]
    ggml_tensor * pos = nullptr;    // i32 [T * lanes] RoPE positions (null without transformer layers)
    ggml_tensor * kv_rows = nullptr; // i64 [T * lanes] rows of the key/value state (all slots' rings in a row) to write
    ggml_tensor * mask = nullptr;   // f32 [ring, T, lanes] attention masks over each lane's ring
    ggml_tensor * pcm_out = nullptr; // decoder: f32 [1, n_frames * samples_per_frame, lanes]
    std::vector<ggml_tensor *> codes_out; // encoder: i32 [n_frames] per codebook
    int64_t T = 0;                  // transformer positions of the chunk (per lane)
    std::vector<int32_t> slots;     // lane i runs the state of slots[i] (read by the graph's ops)
    const struct csm_kernel * kernel = nullptr; // pycsm's CPU kernel the graph's ops call, if any
    ~mimi_graph();
};

// Everything a decoder or encoder pass needs: backend, prepared weights, state, graphs. The state
// tensors hang off `arch` (tail / k_cache / v_cache), n_slots streams of it (an encoder has one);
// reset() zeroes all of them, reset_slot() one stream's.
struct mimi_runner {
    csm_hold<const csm_model> model_ref;   // the model outlives the runner (destroyed last)
    const csm_model * model = nullptr;
    mimi_arch arch;
    bool encoder = false;
    ggml_backend_t backend = nullptr;
    csm_thread_pools pools;   // the CPU backend's thread pools (none on other devices)
    bool cpu = true;

    ggml_context * ctx_prep = nullptr;     // prepared weights
    ggml_backend_buffer_t buf_prep = nullptr;
    // Matrices packed for the model's pycsm kernel on the CPU, by the tensor the graph multiplies:
    // the F16 convolution matrices (their prepared tensor, wp; f32 inputs instead of ggml's f16 dot
    // products) and the transformer's qkv, out, up and down (any format the kernel has)
    std::unordered_map<const ggml_tensor *, std::unique_ptr<csm_packed_matrix>> packed;
    ggml_context * ctx_state = nullptr;    // streaming state
    ggml_backend_buffer_t buf_state = nullptr;

    int32_t n_slots = 1;
    std::vector<int64_t> n_pos;             // per slot: transformer positions consumed since its reset

    std::unique_ptr<mimi_graph> graph;      // the graph of the last chunk shape, allocated by alloc
    std::vector<int64_t> graph_key;         // what it was built for (empty: none)
    ggml_gallocr_t alloc = nullptr;

    // Binds the weights, starts the backend, prepares weights and state; throws csm_error. Call it on a
    // runner owned by a smart pointer so that a failure half way frees what was made.
    void init(const csm_model * m, int32_t n_threads, bool encoder, int32_t n_slots = 1);
    ~mimi_runner();
    void reset();
    void reset_slot(int32_t slot);
};

// Nodes a chunk's graph may need (sized from the layers, stages, codebooks and latent stride), per lane.
size_t mimi_graph_nodes(const mimi_arch & a);
// Code frames per chunk graph: 25 (2 s) at Mimi's latent stride of 2, fewer for a larger stride, so
// that a chunk's attention stays at about 50 transformer positions whatever the file says.
int64_t mimi_chunk_frames(const mimi_arch & a);

// Graph builders (mimi_graph.cpp). The graph is left unallocated.
// Decodes n_frames more frames of each of the given slots (distinct, lane i runs slots[i]).
std::unique_ptr<mimi_graph> mimi_build_decoder(mimi_runner & r, int64_t n_frames, const std::vector<int32_t> & slots);
// n_samples: samples of this chunk; first: the chunk starts the signal; last: it ends it (pad the tail).
std::unique_ptr<mimi_graph> mimi_build_encoder(mimi_runner & r, int64_t n_samples, bool first, bool last);

// Output length of a causal conv layer chain for the reference's padding: ceil(len / stride).
int64_t mimi_encoded_frames(const mimi_arch & a, int64_t n_samples);
