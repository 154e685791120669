// mimi.cpp - the Mimi codec's C API: one-shot, streaming and batched streaming decode, one-shot encode.
//
// A one-shot decode is a streaming decode of all frames from a fresh state; a streaming decoder is a
// batched one with one slot. Long inputs go through the graphs in chunks of at most mimi_chunk_frames
// frames (of codes or of PCM; 25 for Mimi; divided among the lanes of a batched call): the streaming
// state makes chunking exact, and it bounds the memory of the graphs and of attention.
#include "mimi.h"

#include "csm_backend.h"
#include "csm_log.h"

#include <cmath>
#include <cstring>

static const int64_t MAX_FRAMES = 1 << 22;    // ~93 h at 12.5 Hz: anything beyond is a caller bug
static const int32_t MAX_SLOTS = 256;         // streams of a batched decoder (~9 MB of state each at full size)

// Reference counted (csm_ref.h): each call holds the codec; its runner holds the model.
struct csm_mimi_codec : csm_refcounted {
    std::unique_ptr<mimi_runner> dec;
};

struct csm_mimi_batch_decoder : csm_refcounted {
    std::unique_ptr<mimi_runner> dec;
};

static std::unique_ptr<mimi_runner> new_runner(const csm_model * model, int32_t n_threads, bool encoder,
                                               int32_t n_slots = 1) {
    if (!model) csm_fail("model is NULL");
    auto r = std::make_unique<mimi_runner>();
    r->init(model, n_threads, encoder, n_slots);
    return r;
}

// A streaming decoder handle (csm_mimi_codec, csm_mimi_batch_decoder) around a new runner of n_slots.
template <typename T> static T * new_streaming(const csm_model * model, int32_t n_threads, int32_t n_slots) {
    T * h = new T();
    try {
        h->dec = new_runner(model, n_threads, false, n_slots);
    } catch (...) {
        csm_release(h);
        throw;
    }
    csm_pool_rest{h->dec->pools}.rest(); // preparing the weights woke it
    return h;
}

// The runner's graph for `key`, built when the shape changed. One graph at a time: ggml_gallocr
// places a graph's tensors once, so a graph cannot be re-placed after another one grew the buffer;
// rebuilding (well under a millisecond) is cheaper than a compute buffer per shape.
template <typename F> static mimi_graph & graph(mimi_runner & r, const std::vector<int64_t> & key, F && build) {
    if (r.graph && r.graph_key == key) return *r.graph;
    r.graph.reset();
    r.graph_key.clear();
    r.graph = build();
    if (!ggml_gallocr_alloc_graph(r.alloc, r.graph->gf)) {
        r.graph.reset();
        csm_fail("failed to allocate the Mimi compute buffer");
    }
    r.graph_key = key;
    return *r.graph;
}

// RoPE positions, key/value ring rows and sliding-window causal masks of a chunk of g.T positions
// per lane, lane i after the positions its slot slots[i] consumed. Ring row j of a slot holds, once
// the chunk is written, the latest position p <= its last with p % ring == j (none yet when p < 0).
static void set_attention(mimi_runner & r, mimi_graph & g, const std::vector<int32_t> & slots) {
    if (!g.pos) return;
    const int64_t T = g.T, ring = g.mask->ne[0], lanes = (int64_t) slots.size();
    std::vector<int32_t> pos((size_t) (T * lanes));
    std::vector<int64_t> rows((size_t) (T * lanes));
    std::vector<float> mask((size_t) (ring * T * lanes));
    for (int64_t i = 0; i < lanes; i++) {
        const int64_t slot = slots[(size_t) i], p0 = r.n_pos[(size_t) slot], last = p0 + T - 1;
        for (int64_t t = 0; t < T; t++) {
            pos[(size_t) (i * T + t)] = (int32_t) (p0 + t);
            rows[(size_t) (i * T + t)] = slot * ring + (p0 + t) % ring;
            const int64_t pq = p0 + t;
            for (int64_t j = 0; j < ring; j++) {
                const int64_t pk = last - ((last - j) % ring + ring) % ring;
                const bool ok = pk >= 0 && pk <= pq && pq - pk < MIMI_WINDOW;
                mask[(size_t) ((i * T + t) * ring + j)] = ok ? 0.0f : -INFINITY;
            }
        }
    }
    ggml_backend_tensor_set(g.pos, pos.data(), 0, pos.size() * sizeof(int32_t));
    ggml_backend_tensor_set(g.kv_rows, rows.data(), 0, rows.size() * sizeof(int64_t));
    ggml_backend_tensor_set(g.mask, mask.data(), 0, mask.size() * sizeof(float));
}

static void compute(mimi_runner & r, mimi_graph & g) {
    r.pools.before_compute();
    ggml_status st = ggml_backend_graph_compute(r.backend, g.gf);
    r.pools.after_compute();
    if (st != GGML_STATUS_SUCCESS) csm_fail("Mimi graph computation failed (status %d)", (int) st);
}

// Checks everything about a decode call that can be checked without reading past the caller's
// buffers: pointers, counts, the output size, every code (before any state changes). n_lanes streams
// of n_frames frames each, lane-major.
static void check_decode_args(const csm_model * m, const int32_t * codes, int64_t n_frames, const float * out,
                              int64_t max_samples, int64_t n_lanes = 1) {
    const csm_hparams & h = m->hp;
    if (!codes) csm_fail("codes is NULL");
    if (!out) csm_fail("out_pcm is NULL");
    if (n_frames < 0) csm_fail("n_frames is negative (%lld)", (long long) n_frames);
    if (n_frames > MAX_FRAMES) csm_fail("n_frames %lld is absurd (more than %lld)", (long long) n_frames, (long long) MAX_FRAMES);
    const int64_t need = n_lanes * n_frames * h.samples_per_frame;
    if (max_samples < need) {
        csm_fail("max_samples %lld is too small: %lld frames decode to %lld samples", (long long) max_samples,
                 (long long) (n_lanes * n_frames), (long long) need);
    }
    const int64_t nq = h.mimi_n_quantizers;
    for (int64_t f = 0; f < n_lanes * n_frames; f++) {
        for (int64_t q = 0; q < nq; q++) {
            const int32_t c = codes[f * nq + q];
            if (c < 0 || c >= h.mimi_codebook_size) {
                csm_fail("code %d at frame %lld, codebook %lld is outside [0, %d)", c, (long long) f, (long long) q,
                         h.mimi_codebook_size);
            }
        }
    }
}

// Decodes n_frames frames of each slot in `slots` after its state: codes lane-major
// (codes[(i * n_frames + f) * n_q + q] for slots[i]), out lane-major (n_frames * samples_per_frame
// floats per lane).
static int64_t decode_frames(mimi_runner & r, const std::vector<int32_t> & slots, const int32_t * codes,
                             int64_t n_frames, float * out) {
    const mimi_arch & a = r.arch;
    const int64_t lanes = (int64_t) slots.size(), spf = a.samples_per_frame;
    std::vector<int32_t> ids;
    const int64_t chunk = std::max<int64_t>(1, mimi_chunk_frames(a) / lanes);
    for (int64_t f0 = 0; f0 < n_frames; f0 += chunk) {
        const int64_t n = std::min(chunk, n_frames - f0);
        std::vector<int64_t> key = {n};
        key.insert(key.end(), slots.begin(), slots.end());
        mimi_graph & g = graph(r, key, [&] { return mimi_build_decoder(r, n, slots); });
        ids.resize((size_t) (n * lanes * a.n_q));
        for (int64_t i = 0; i < lanes; i++) {
            for (int64_t f = 0; f < n; f++) {
                for (int64_t q = 0; q < a.n_q; q++) {
                    ids[(size_t) (q * n * lanes + i * n + f)] = codes[(i * n_frames + f0 + f) * a.n_q + q];
                }
            }
        }
        ggml_backend_tensor_set(g.ids, ids.data(), 0, ids.size() * sizeof(int32_t));
        set_attention(r, g, slots);
        compute(r, g);
        for (int32_t s : slots) r.n_pos[(size_t) s] += g.T;
        for (int64_t i = 0; i < lanes; i++) {
            ggml_backend_tensor_get(g.pcm_out, out + (i * n_frames + f0) * spf, (size_t) (i * n * spf) * sizeof(float),
                                    (size_t) (n * spf) * sizeof(float));
        }
    }
    return lanes * n_frames * spf;
}

// Checks the slots of a batched call: 1 to n_slots of them, each in range, none twice.
static std::vector<int32_t> checked_slots(const mimi_runner & r, const int32_t * slots, int32_t n) {
    if (!slots) csm_fail("slots is NULL");
    if (n < 1 || n > r.n_slots) csm_fail("n_slots %d is outside [1, %d]", n, r.n_slots);
    std::vector<int32_t> out(slots, slots + n);
    std::vector<bool> seen((size_t) r.n_slots, false);
    for (int32_t i = 0; i < n; i++) {
        const int32_t s = out[(size_t) i];
        if (s < 0 || s >= r.n_slots) csm_fail("slot %d (entry %d) is outside [0, %d)", s, i, r.n_slots);
        if (seen[(size_t) s]) csm_fail("slot %d is given twice", s);
        seen[(size_t) s] = true;
    }
    return out;
}

static int32_t encode(const csm_model * model, const float * pcm, int64_t n_samples, int32_t * out_codes,
                      int32_t max_frames, int32_t n_threads) {
    if (!model) csm_fail("model is NULL");
    if (!pcm) csm_fail("pcm is NULL");
    if (!out_codes) csm_fail("out_codes is NULL");
    if (n_samples <= 0) csm_fail("n_samples must be positive, got %lld", (long long) n_samples);
    const int64_t spf = model->hp.samples_per_frame;
    if (n_samples > MAX_FRAMES * spf) {
        csm_fail("n_samples %lld is absurd (more than %lld frames of audio)", (long long) n_samples, (long long) MAX_FRAMES);
    }
    for (int64_t i = 0; i < n_samples; i++) {
        if (!std::isfinite(pcm[i])) csm_fail("sample %lld is not finite (%f)", (long long) i, (double) pcm[i]);
    }
    std::unique_ptr<mimi_runner> rp = new_runner(model, n_threads, true);
    mimi_runner & r = *rp;
    const mimi_arch & a = r.arch;
    const int64_t n_out = mimi_encoded_frames(a, n_samples);
    if (max_frames < n_out) {
        csm_fail("max_frames %d is too small: %lld samples encode to %lld frames", max_frames, (long long) n_samples,
                 (long long) n_out);
    }
    const int64_t chunk = mimi_chunk_frames(a) * a.samples_per_frame;
    int64_t done = 0;
    std::vector<int32_t> idx;
    for (int64_t s0 = 0; s0 < n_samples; s0 += chunk) {
        const int64_t n = std::min(chunk, n_samples - s0);
        const bool first = s0 == 0, last = s0 + n == n_samples;
        const std::vector<int64_t> key = {n * 4 + (first ? 2 : 0) + (last ? 1 : 0)};
        mimi_graph & g = graph(r, key, [&] { return mimi_build_encoder(r, n, first, last); });
        ggml_backend_tensor_set(g.pcm_in, pcm + s0, 0, (size_t) n * sizeof(float));
        set_attention(r, g, {0});
        compute(r, g);
        r.n_pos[0] += g.T;
        const int64_t F = g.codes_out[0]->ne[0];
        if (done + F > n_out) csm_fail("internal error: the encoder produced more frames than expected");
        idx.resize((size_t) F);
        for (int64_t q = 0; q < a.n_q; q++) {
            ggml_backend_tensor_get(g.codes_out[q], idx.data(), 0, (size_t) F * sizeof(int32_t));
            for (int64_t f = 0; f < F; f++) out_codes[(done + f) * a.n_q + q] = idx[f];
        }
        done += F;
    }
    if (done != n_out) csm_fail("internal error: the encoder produced %lld frames, expected %lld", (long long) done, (long long) n_out);
    return (int32_t) done;
}

extern "C" {

int64_t csm_mimi_decode(const csm_model * model, const int32_t * codes, int32_t n_frames, float * out_pcm,
                        int64_t max_samples, int32_t n_threads) {
    return csm_guard<int64_t>(-1, [&]() -> int64_t {
        if (!model) csm_fail("model is NULL");
        const csm_hold<const csm_model> hold(model);
        if (n_frames <= 0) csm_fail("n_frames must be positive, got %d", n_frames);
        check_decode_args(model, codes, n_frames, out_pcm, max_samples);
        std::unique_ptr<mimi_runner> r = new_runner(model, n_threads, false);
        return decode_frames(*r, {0}, codes, n_frames, out_pcm);
    });
}

int32_t csm_mimi_encode(const csm_model * model, const float * pcm, int64_t n_samples, int32_t * out_codes,
                        int32_t max_frames, int32_t n_threads) {
    return csm_guard<int32_t>(-1, [&] {
        const csm_hold<const csm_model> hold(model);
        return encode(model, pcm, n_samples, out_codes, max_frames, n_threads);
    });
}

csm_mimi_codec * csm_mimi_codec_new(const csm_model * model, int32_t n_threads) {
    return csm_guard<csm_mimi_codec *>(nullptr, [&] {
        const csm_hold<const csm_model> hold(model);
        return new_streaming<csm_mimi_codec>(model, n_threads, 1);
    });
}

void csm_mimi_codec_free(csm_mimi_codec * codec) { csm_release(codec); }

void csm_mimi_codec_reset(csm_mimi_codec * codec) {
    const csm_hold<csm_mimi_codec> hold(codec);
    if (codec) codec->dec->reset();
}

int64_t csm_mimi_codec_decode(csm_mimi_codec * codec, const int32_t * codes, int32_t n_frames, float * out_pcm,
                              int64_t max_samples) {
    return csm_guard<int64_t>(-1, [&]() -> int64_t {
        if (!codec) csm_fail("codec is NULL");
        const csm_hold<csm_mimi_codec> hold(codec);
        if (n_frames == 0) return 0;
        check_decode_args(codec->dec->model, codes, n_frames, out_pcm, max_samples);
        const csm_pool_rest pool{codec->dec->pools}; // asleep between the caller's chunks
        return decode_frames(*codec->dec, {0}, codes, n_frames, out_pcm);
    });
}

csm_mimi_batch_decoder * csm_mimi_batch_decoder_new(const csm_model * model, int32_t n_slots, int32_t n_threads) {
    return csm_guard<csm_mimi_batch_decoder *>(nullptr, [&] {
        const csm_hold<const csm_model> hold(model);
        if (n_slots < 1 || n_slots > MAX_SLOTS) csm_fail("n_slots %d is outside [1, %d]", n_slots, MAX_SLOTS);
        return new_streaming<csm_mimi_batch_decoder>(model, n_threads, n_slots);
    });
}

void csm_mimi_batch_decoder_free(csm_mimi_batch_decoder * dec) { csm_release(dec); }

int32_t csm_mimi_batch_decoder_n_slots(const csm_mimi_batch_decoder * dec) {
    return csm_guard<int32_t>(-1, [&] {
        if (!dec) csm_fail("decoder is NULL");
        const csm_hold<const csm_mimi_batch_decoder> hold(dec);
        return dec->dec->n_slots;
    });
}

int32_t csm_mimi_batch_decoder_reset(csm_mimi_batch_decoder * dec, int32_t slot) {
    return csm_guard<int32_t>(-1, [&] {
        if (!dec) csm_fail("decoder is NULL");
        const csm_hold<csm_mimi_batch_decoder> hold(dec);
        if (slot < 0 || slot >= dec->dec->n_slots) csm_fail("slot %d is outside [0, %d)", slot, dec->dec->n_slots);
        dec->dec->reset_slot(slot);
        return 0;
    });
}

int64_t csm_mimi_batch_decoder_decode(csm_mimi_batch_decoder * dec, const int32_t * slots, int32_t n_slots,
                                      const int32_t * codes, int32_t n_frames, float * out_pcm, int64_t max_samples) {
    return csm_guard<int64_t>(-1, [&]() -> int64_t {
        if (!dec) csm_fail("decoder is NULL");
        const csm_hold<csm_mimi_batch_decoder> hold(dec);
        const std::vector<int32_t> lanes = checked_slots(*dec->dec, slots, n_slots);
        check_decode_args(dec->dec->model, codes, n_frames, out_pcm, max_samples, n_slots);
        if (n_frames == 0) return 0;
        const csm_pool_rest pool{dec->dec->pools}; // asleep between the caller's calls
        return decode_frames(*dec->dec, lanes, codes, n_frames, out_pcm);
    });
}

} // extern "C"
