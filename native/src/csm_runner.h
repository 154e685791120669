// csm_runner.h - the pieces of the frame loop shared by csm_generate (one call, all utterances at
// once) and csm_batch (streams joining and leaving between frames): prompt checks, graph inputs,
// and a runner that prefills prompt rows, steps the backbone and runs the depth decoder.
#pragma once

#include "csm_context.h"

#include <chrono>
#include <vector>

using csm_clock = std::chrono::steady_clock;
double csm_ms_since(csm_clock::time_point t0);

// Throws unless the prompt has 1..n_ctx rows of valid, present columns.
void csm_check_prompt(const csm_model & m, const int32_t * prompt, int32_t n_pos, int32_t n_ctx);
// Throws unless the sampling parameters are usable.
void csm_check_sampling(const csm_sampling_params & s);

// Runs the graphs of a context. The step and depth graphs cover the context's first n_active
// sequences; prefill works on any one sequence.
struct csm_runner {
    csm_context & c;
    const csm_model & m;
    const int32_t V, ncb;
    std::vector<int32_t> ids, pos, text_ids;
    std::vector<int64_t> kv_idx, v_idx;
    std::vector<float> amask, tmask, kq;
    std::vector<float> logits;   // [V * n_seq]: codebook-0 logits after prefill / step; depth logits after depthk

    explicit csm_runner(csm_context & ctx);

    // Prefills the whole prompt of sequence `seq` from position 0; codebook-0 logits in logits[seq].
    // With reuse, the leading rows this prompt shares with the sequence's last prompt (at most
    // n_pos - 1) keep their cache rows and are not computed again; the result is the same (a row's
    // keys and values depend only on the rows before it, and products and attention give a row the
    // same result whatever rows are computed with it). Returns the rows reused.
    int32_t prefill(int32_t seq, const int32_t * prompt, int32_t n_pos, bool reuse = false);
    // Appends T prompt rows to sequence `seq` at its n_past (one graph; T <= CSM_PREFILL_CHUNK).
    // With last set, leaves the codebook-0 logits of the last row in logits[seq].
    void prefill_rows(int32_t seq, const int32_t * rows, int32_t T, bool last);
    // Feeds one frame per active sequence (codes[b * ncb + cb]) to the backbone; codebook-0 logits after.
    void step(const std::vector<int32_t> & codes);
    // Depth decoder position 0 from the backbone output.
    void depth0();
    // Depth decoder position k >= 1 fed with code prev[b] of codebook k-1; logits of codebook k.
    void depthk(int32_t k, const std::vector<int32_t> & prev);

private:
    int64_t bb_kvd() const;
    void depth_inputs(csm_graph & g, int32_t k);
};

const int32_t CSM_PREFILL_CHUNK = 256; // most prompt rows per prefill graph (bounds the attention scratch)
