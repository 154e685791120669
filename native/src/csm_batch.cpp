// csm_batch.cpp - continuous batching: streams join a running batch between frames (their prompts
// prefilled a chunk of rows per step) and leave at their end; the running streams always occupy the
// context's first sequences, so every step computes only them.
#include "csm_log.h"
#include "csm_runner.h"

#include <algorithm>
#include <climits>
#include <cstring>
#include <deque>
#include <memory>

namespace {

const int32_t MAX_STREAMS = 64;
const double SPEED_EMA = 0.25; // weight of the newest measurement in the speed estimates

struct batch_stream {
    int64_t id = -1;
    std::vector<int32_t> prompt;  // rows still needed for the prefill (freed once it is done)
    int32_t n_pos = 0;
    int32_t n_prefilled = 0;
    float t0 = 0, td = 0;         // codebook-0 / depth temperatures
    int32_t k0 = 0, kd = 0;       // codebook-0 / depth top-k
    bool stop_at_eos = true;
    int32_t limit = INT32_MAX;    // frame cap
    csm_rng rng;
    int32_t n_frames = 0;
    int32_t frame[CSM_N_CODEBOOKS] = {};
    int32_t stop_reason = -1;
};

} // namespace

// Reference counted (csm_ref.h): each call holds the batch; the batch owns its context's reference.
struct csm_batch : csm_refcounted {
    std::unique_ptr<csm_context, csm_releaser> ctx;
    std::unique_ptr<csm_runner> run_graphs;
    csm_batch_params params{};
    csm_sampler sampler;
    std::vector<batch_stream> run;     // run[b] generates in context sequence b
    std::deque<batch_stream> joining;  // the front one prefills into sequence run.size()
    int32_t joining_seq = -1;          // where the front one's prefilled rows are (-1: none yet)
    std::vector<float> logits0;        // codebook-0 logits of run[b] at [b * V]
    std::vector<int32_t> frames, prev; // scratch
    std::vector<float> copy_buf;       // scratch of copy_rows
    int64_t next_id = 0;
    int64_t rows_reused = 0;           // prompt rows taken from cache rows instead of prefilled
    double ms_per_frame = 0, ms_per_row = 0; // measured speeds (0: not yet)

    int32_t V() const { return ctx->model->hp.audio_vocab_size; }

    // Copies backbone cache rows [0, n) of sequence `from` into sequence `to`.
    void copy_rows(int32_t from, int32_t to, int32_t n) {
        csm_context & c = *ctx;
        const csm_llama & L = c.model->backbone;
        const size_t kvd = (size_t) L.head_dim * L.n_kv_heads, es = sizeof(float);
        copy_buf.resize(std::max(kvd * n, (size_t) c.h_buf->ne[0]));
        auto copy = [&](ggml_tensor * t, size_t src, size_t dst, size_t bytes) {
            if (bytes == 0) return;
            ggml_backend_tensor_get(t, copy_buf.data(), src, bytes);
            ggml_backend_tensor_set(t, copy_buf.data(), dst, bytes);
        };
        for (const csm_kv_layer & l : c.kv_bb) {
            copy(l.k, (size_t) from * c.n_ctx * kvd * es, (size_t) to * c.n_ctx * kvd * es, kvd * n * es);
            for (size_t ch = 0; ch < kvd; ch++) {  // V: [sequence][channel][position]
                copy(l.v, ((from * kvd + ch) * c.n_ctx) * es, ((to * kvd + ch) * c.n_ctx) * es, (size_t) n * es);
            }
        }
    }

    // Moves sequence `from`'s filled cache rows, its backbone output, its logits and the prompt rows
    // it holds into sequence `to` (streams leave from the middle; the last running one fills the hole).
    void move_seq(int32_t from, int32_t to) {
        csm_context & c = *ctx;
        c.prompt_rows[to].clear(); // while the rows are in flux
        copy_rows(from, to, c.n_past[from]);
        ggml_tensor * h = c.h_buf;
        ggml_backend_tensor_get(h, copy_buf.data(), (size_t) from * h->nb[1], h->nb[1]);
        ggml_backend_tensor_set(h, copy_buf.data(), (size_t) to * h->nb[1], h->nb[1]);
        c.n_past[to] = c.n_past[from];
        c.prompt_rows[to] = c.prompt_rows[from];
        std::copy_n(logits0.begin() + (size_t) from * V(), V(), logits0.begin() + (size_t) to * V());
    }

    // Prompt reuse: the joining stream s starts in sequence seq. Of the sequences' held prompt rows
    // (every sequence keeps those of the last prompt prefilled into it, running or not), the longest
    // that s's prompt begins with (at most n_pos - 1 rows) is kept in place, or copied in from
    // another sequence when that one holds more. Returns the rows s need not prefill.
    int32_t reuse_rows(const batch_stream & s, int32_t seq) {
        csm_context & c = *ctx;
        auto shared = [&](int32_t q) {
            const std::vector<int32_t> & held = c.prompt_rows[q];
            const int32_t n_held = (int32_t) (held.size() / CSM_N_COLUMNS);
            int32_t n = 0;
            while (n < s.n_pos - 1 && n < n_held &&
                   std::equal(held.begin() + (size_t) n * CSM_N_COLUMNS, held.begin() + (size_t) (n + 1) * CSM_N_COLUMNS,
                              s.prompt.begin() + (size_t) n * CSM_N_COLUMNS)) {
                n++;
            }
            return n;
        };
        int32_t keep = shared(seq), best = seq, best_n = keep;
        for (int32_t q = 0; q < c.n_seq; q++) {
            if (q == seq) continue;
            const int32_t n = shared(q);
            if (n > best_n) best = q, best_n = n;
        }
        if (best != seq) { // a copy: about 64 KiB a row against a prefilled row's ~5 ms
            c.prompt_rows[seq].clear();
            copy_rows(best, seq, best_n);
            keep = best_n;
        }
        c.prompt_rows[seq].assign(s.prompt.begin(), s.prompt.begin() + (size_t) keep * CSM_N_COLUMNS);
        return keep;
    }

    // Drops run[b], moving the last running stream into its sequence; then keeps the joining
    // stream's prefilled rows right after the running ones.
    void drop_running(int32_t b) {
        const int32_t last = (int32_t) run.size() - 1;
        if (b != last) {
            move_seq(last, b);
            run[b] = std::move(run[last]);
        }
        run.pop_back();
        if (joining_seq >= 0 && joining_seq != (int32_t) run.size()) {
            move_seq(joining_seq, (int32_t) run.size());
            joining_seq = (int32_t) run.size();
        }
    }

    int32_t chunk_rows() const {
        if (run.empty()) return CSM_PREFILL_CHUNK;  // nobody waits
        if (params.prefill_chunk > 0) return params.prefill_chunk;
        if (ms_per_frame <= 0 || ms_per_row <= 0) return 16;
        const double rows = ms_per_frame / ms_per_row;
        return (int32_t) std::clamp(rows, 1.0, (double) CSM_PREFILL_CHUNK);
    }

    static void measure(double & ema, double value) { ema = ema > 0 ? ema + SPEED_EMA * (value - ema) : value; }

    // Prefills up to `budget` rows of the first joining stream (at least one); it starts running
    // when its prompt is done. Returns the rows prefilled.
    int32_t prefill_chunk(int32_t budget) {
        batch_stream & s = joining.front();
        const int32_t seq = (int32_t) run.size();
        std::vector<int32_t> & held = ctx->prompt_rows[seq];
        if (joining_seq < 0) {
            s.n_prefilled = params.reuse_prompt ? reuse_rows(s, seq) : 0;
            if (!params.reuse_prompt) held.clear();
            rows_reused += s.n_prefilled;
            ctx->n_past[seq] = s.n_prefilled;
            joining_seq = seq;
        }
        const int32_t T = std::min(std::max(budget, 1), s.n_pos - s.n_prefilled);
        const bool last = s.n_prefilled + T == s.n_pos;
        const auto t0 = csm_clock::now();
        const int32_t * rows = s.prompt.data() + (size_t) s.n_prefilled * CSM_N_COLUMNS;
        held.resize((size_t) s.n_prefilled * CSM_N_COLUMNS); // until the chunk is written
        run_graphs->prefill_rows(seq, rows, T, last);
        held.insert(held.end(), rows, rows + (size_t) T * CSM_N_COLUMNS);
        measure(ms_per_row, csm_ms_since(t0) / T);
        s.n_prefilled += T;
        if (!last) return T;
        std::copy_n(run_graphs->logits.begin() + (size_t) seq * V(), V(), logits0.begin() + (size_t) seq * V());
        s.prompt = std::vector<int32_t>();
        run.push_back(std::move(s));
        joining.pop_front();
        joining_seq = -1;
        return T;
    }

    // The step's prefill: chunk_rows() rows in all, of the joining streams in the order they were
    // added, so that several short prompts that arrived together join in one step.
    void prefill() {
        int32_t budget = chunk_rows();
        while (!joining.empty() && budget > 0) budget -= prefill_chunk(budget);
    }

    int32_t step(csm_batch_event * events) {
        csm_context & c = *ctx;
        const csm_pool_rest pool{c.pools}; // asleep between the caller's steps
        prefill();
        const int32_t B = (int32_t) run.size();
        if (B == 0) return 0;
        const auto t0 = csm_clock::now();
        const csm_hparams & hp = c.model->hp;
        const int32_t ncb = hp.n_codebooks, n_valid = hp.mimi_codebook_size;
        c.n_active = B;
        prev.resize(B);
        for (int32_t b = 0; b < B; b++) {
            batch_stream & s = run[b];
            s.frame[0] = sampler.sample(logits0.data() + (size_t) b * V(), n_valid, s.t0, s.k0, s.rng);
            prev[b] = s.frame[0];
        }
        csm_runner & r = *run_graphs;
        r.depth0();
        for (int32_t k = 1; k < ncb; k++) {
            r.depthk(k, prev);
            for (int32_t b = 0; b < B; b++) {
                batch_stream & s = run[b];
                s.frame[k] = sampler.sample(r.logits.data() + (size_t) b * V(), n_valid, s.td, s.kd, s.rng);
                prev[b] = s.frame[k];
            }
        }
        int32_t n_events = 0;
        for (int32_t b = 0; b < B; b++) {
            batch_stream & s = run[b];
            csm_batch_event & ev = events[n_events++];
            ev.stream = s.id;
            ev.frame_index = -1;
            bool eos = true;
            for (int32_t k = 0; k < ncb; k++) eos = eos && s.frame[k] == hp.codebook_eos_token_id;
            if (eos && s.stop_at_eos) {
                s.stop_reason = CSM_STOP_EOS;
            } else {
                ev.frame_index = s.n_frames++;
                memcpy(ev.codes, s.frame, sizeof(s.frame));
                if (s.n_frames >= s.limit) s.stop_reason = CSM_STOP_MAX_FRAMES;
                else if (c.n_past[b] >= c.n_ctx) s.stop_reason = CSM_STOP_CONTEXT_FULL;
            }
            ev.stop_reason = s.stop_reason;
        }
        for (int32_t b = B - 1; b >= 0; b--) {
            if (run[b].stop_reason >= 0) drop_running(b);
        }
        if (!run.empty()) {
            const int32_t n = (int32_t) run.size();
            frames.resize((size_t) n * ncb);
            for (int32_t b = 0; b < n; b++) memcpy(frames.data() + (size_t) b * ncb, run[b].frame, sizeof(run[b].frame));
            c.n_active = n;
            r.step(frames);
            std::copy_n(r.logits.begin(), (size_t) n * V(), logits0.begin());
        }
        measure(ms_per_frame, csm_ms_since(t0));
        return n_events;
    }

    void clear() {
        run.clear();
        joining.clear();
        joining_seq = -1;
        for (auto & held : ctx->prompt_rows) held.clear(); // a failed step or move leaves rows unknown
    }
};

namespace {

csm_batch * create(const csm_model * m, const csm_batch_params & p) {
    if (!m) csm_fail("model is NULL");
    if (p.max_streams < 1 || p.max_streams > MAX_STREAMS) csm_fail("max_streams %d is out of range [1, %d]", p.max_streams, MAX_STREAMS);
    if (p.prefill_chunk < 0 || p.prefill_chunk > CSM_PREFILL_CHUNK) {
        csm_fail("prefill_chunk %d is out of range [0, %d]", p.prefill_chunk, CSM_PREFILL_CHUNK);
    }
    csm_context_params cp = csm_context_default_params();
    cp.n_threads = p.n_threads;
    cp.max_pos = p.max_pos;
    cp.n_batch = p.max_streams;
    auto b = std::make_unique<csm_batch>();
    b->ctx.reset(csm_context_new(m, cp));
    if (!b->ctx) csm_fail("%s", csm_last_error());
    b->run_graphs = std::make_unique<csm_runner>(*b->ctx);
    b->params = p;
    b->logits0.resize((size_t) b->V() * p.max_streams);
    return b.release();
}

int64_t add(csm_batch & b, const int32_t * prompt, int32_t n_pos, const csm_stream_params & p) {
    const int32_t n = (int32_t) (b.run.size() + b.joining.size());
    if (n >= b.params.max_streams) csm_fail("the batch is full (%d streams)", n);
    csm_check_prompt(*b.ctx->model, prompt, n_pos, b.ctx->n_ctx);
    csm_check_sampling(p.sampling);
    batch_stream s;
    s.id = b.next_id++;
    s.prompt.assign(prompt, prompt + (size_t) n_pos * CSM_N_COLUMNS);
    s.n_pos = n_pos;
    s.t0 = p.sampling.temperature;
    s.k0 = p.sampling.top_k;
    s.td = p.sampling.depth_temperature < 0 ? s.t0 : p.sampling.depth_temperature;
    s.kd = p.sampling.depth_top_k < 0 ? s.k0 : p.sampling.depth_top_k;
    s.stop_at_eos = p.stop_at_eos;
    s.limit = p.max_frames > 0 ? p.max_frames : INT32_MAX;
    s.rng = csm_rng(p.sampling.seed);
    b.joining.push_back(std::move(s));
    return b.joining.back().id;
}

// false when the batch holds no such stream
bool remove(csm_batch & b, int64_t id) {
    for (size_t i = 0; i < b.run.size(); i++) {
        if (b.run[i].id != id) continue;
        b.drop_running((int32_t) i);
        return true;
    }
    for (size_t i = 0; i < b.joining.size(); i++) {
        if (b.joining[i].id != id) continue;
        if (i == 0) b.joining_seq = -1; // its prefilled rows are simply overwritten by the next one
        b.joining.erase(b.joining.begin() + (ptrdiff_t) i);
        return true;
    }
    return false;
}

} // namespace

extern "C" {

struct csm_batch_params csm_batch_default_params(void) {
    csm_batch_params p;
    p.n_threads = 0;
    p.max_pos = 0;
    p.max_streams = 4;
    p.prefill_chunk = 0;
    p.reuse_prompt = true;
    return p;
}

struct csm_stream_params csm_stream_default_params(void) {
    const csm_generate_params g = csm_generate_default_params();
    csm_stream_params p;
    p.sampling = g.sampling;
    p.max_frames = g.max_frames;
    p.stop_at_eos = g.stop_at_eos;
    return p;
}

csm_batch * csm_batch_new(const csm_model * model, struct csm_batch_params params) {
    return csm_guard<csm_batch *>(nullptr, [&] { return create(model, params); });
}

void csm_batch_free(csm_batch * batch) { csm_release(batch); }

int64_t csm_batch_add(csm_batch * batch, const int32_t * prompt, int32_t n_pos, struct csm_stream_params params) {
    return csm_guard<int64_t>(-1, [&] {
        if (!batch) csm_fail("batch is NULL");
        const csm_hold<csm_batch> hold(batch);
        return add(*batch, prompt, n_pos, params);
    });
}

int32_t csm_batch_remove(csm_batch * batch, int64_t stream) {
    return csm_guard<int32_t>(-1, [&] {
        if (!batch) csm_fail("batch is NULL");
        const csm_hold<csm_batch> hold(batch);
        bool found;
        try {
            found = remove(*batch, stream);
        } catch (...) {  // a failed cache move leaves the sequences unknown
            batch->clear();
            throw;
        }
        if (!found) csm_fail("the batch holds no stream %lld", (long long) stream);
        return 0;
    });
}

int32_t csm_batch_step(csm_batch * batch, struct csm_batch_event * events, int32_t max_events) {
    return csm_guard<int32_t>(-1, [&] {
        if (!batch) csm_fail("batch is NULL");
        const csm_hold<csm_batch> hold(batch);
        if (!events) csm_fail("events is NULL");
        if (max_events < batch->params.max_streams) {
            csm_fail("max_events %d is less than max_streams %d", max_events, batch->params.max_streams);
        }
        try {
            return batch->step(events);
        } catch (...) {
            batch->clear();
            throw;
        }
    });
}

int32_t csm_batch_n_streams(const csm_batch * batch) {
    return batch ? (int32_t) (batch->run.size() + batch->joining.size()) : 0;
}

int32_t csm_batch_n_running(const csm_batch * batch) { return batch ? (int32_t) batch->run.size() : 0; }

int64_t csm_batch_rows_reused(const csm_batch * batch) { return batch ? batch->rows_reused : 0; }

} // extern "C"
