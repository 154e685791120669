// csm_model.cpp - loading a CSM GGUF: metadata, validation, weights into a backend buffer.
#include "csm_model.h"

#include "csm_backend.h"
#include "csm_gguf_check.h"
#include "csm_log.h"
#include "csm_platform.h"
#include "csm_packed.h"
#include "mimi.h"

#include "ggml-cpu.h"

#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <system_error>
#include <thread>


// ---------------------------------------------------------------------------------------------
// metadata helpers
// ---------------------------------------------------------------------------------------------

static bool gguf_int_type(gguf_type t) {
    return t == GGUF_TYPE_UINT8 || t == GGUF_TYPE_INT8 || t == GGUF_TYPE_UINT16 || t == GGUF_TYPE_INT16 ||
           t == GGUF_TYPE_UINT32 || t == GGUF_TYPE_INT32 || t == GGUF_TYPE_UINT64 || t == GGUF_TYPE_INT64;
}

static int64_t kv_int(const gguf_context * g, int64_t id) {
    switch (gguf_get_kv_type(g, id)) {
        case GGUF_TYPE_UINT8:  return gguf_get_val_u8(g, id);
        case GGUF_TYPE_INT8:   return gguf_get_val_i8(g, id);
        case GGUF_TYPE_UINT16: return gguf_get_val_u16(g, id);
        case GGUF_TYPE_INT16:  return gguf_get_val_i16(g, id);
        case GGUF_TYPE_UINT32: return gguf_get_val_u32(g, id);
        case GGUF_TYPE_INT32:  return gguf_get_val_i32(g, id);
        case GGUF_TYPE_UINT64: return (int64_t) std::min<uint64_t>(gguf_get_val_u64(g, id), INT64_MAX);
        case GGUF_TYPE_INT64:  return gguf_get_val_i64(g, id);
        default: return 0;
    }
}

// Reads an integer key and checks lo <= value <= hi. Missing key: default when given, else an error.
static int32_t get_u32(const gguf_context * g, const char * key, int64_t lo, int64_t hi, int64_t def = INT64_MIN) {
    int64_t id = gguf_find_key(g, key);
    if (id < 0) {
        if (def != INT64_MIN) return (int32_t) def;
        csm_fail("missing metadata key '%s' (not a CSM GGUF?)", key);
    }
    if (!gguf_int_type(gguf_get_kv_type(g, id))) {
        csm_fail("metadata key '%s' has type %s, expected an integer", key, gguf_type_name(gguf_get_kv_type(g, id)));
    }
    int64_t v = kv_int(g, id);
    if (v < lo || v > hi) {
        csm_fail("metadata key '%s' = %lld is out of range [%lld, %lld]", key, (long long) v, (long long) lo, (long long) hi);
    }
    return (int32_t) v;
}

static float get_f32(const gguf_context * g, const char * key, float lo, float hi, float def, bool required) {
    int64_t id = gguf_find_key(g, key);
    if (id < 0) {
        if (!required) return def;
        csm_fail("missing metadata key '%s' (not a CSM GGUF?)", key);
    }
    gguf_type t = gguf_get_kv_type(g, id);
    double v;
    if (t == GGUF_TYPE_FLOAT32) v = gguf_get_val_f32(g, id);
    else if (t == GGUF_TYPE_FLOAT64) v = gguf_get_val_f64(g, id);
    else if (gguf_int_type(t)) v = (double) kv_int(g, id);
    else csm_fail("metadata key '%s' has type %s, expected a number", key, gguf_type_name(t));
    if (!std::isfinite(v) || v < lo || v > hi) {
        csm_fail("metadata key '%s' = %g is out of range [%g, %g]", key, v, (double) lo, (double) hi);
    }
    return (float) v;
}

static std::string get_str(const gguf_context * g, const char * key, bool required) {
    int64_t id = gguf_find_key(g, key);
    if (id < 0) {
        if (!required) return "";
        csm_fail("missing metadata key '%s' (not a CSM GGUF?)", key);
    }
    if (gguf_get_kv_type(g, id) != GGUF_TYPE_STRING) {
        csm_fail("metadata key '%s' has type %s, expected a string", key, gguf_type_name(gguf_get_kv_type(g, id)));
    }
    return gguf_get_val_str(g, id);
}

// A file's string for an error message: at most 64 bytes, non-printable bytes as '?'.
static std::string quoted(const std::string & v) {
    std::string out;
    for (size_t i = 0; i < v.size() && i < 64; i++) out += (v[i] >= 32 && v[i] < 127) ? v[i] : '?';
    if (v.size() > 64) out += "...";
    return out;
}

// ---------------------------------------------------------------------------------------------
// tensors
// ---------------------------------------------------------------------------------------------

static std::string ne_str(const int64_t * ne, int n) {
    std::string s = "[";
    for (int i = 0; i < n; i++) s += (i ? ", " : "") + std::to_string(ne[i]);
    return s + "]";
}

ggml_tensor * csm_model::find(const std::string & tname) const {
    return ggml_get_tensor(ctx_w, tname.c_str());
}

ggml_tensor * csm_model::get(const std::string & tname, std::vector<int64_t> ne) const {
    ggml_tensor * t = find(tname);
    if (!t) csm_fail("tensor '%s' is missing from %s", tname.c_str(), path.c_str());
    int64_t want[GGML_MAX_DIMS] = {1, 1, 1, 1};
    for (size_t i = 0; i < ne.size() && i < GGML_MAX_DIMS; i++) want[i] = ne[i];
    for (int i = 0; i < GGML_MAX_DIMS; i++) {
        if (t->ne[i] != want[i]) {
            csm_fail("tensor '%s' has shape %s, expected %s", tname.c_str(), ne_str(t->ne, ggml_n_dims(t)).c_str(),
                     ne_str(want, (int) ne.size()).c_str());
        }
    }
    // Matrices may be of any floating or quantised type ggml can multiply; integers are no weights.
    if (ne.size() >= 2 && !csm_weight_type_ok(t->type)) {
        csm_fail("tensor '%s' has type %s, which is not a weight type", tname.c_str(), ggml_type_name(t->type));
    }
    // 1-D tensors (norm weights, scales, biases) are added/multiplied element-wise: F32 only.
    if (ne.size() == 1 && t->type != GGML_TYPE_F32) {
        csm_fail("tensor '%s' has type %s, expected f32", tname.c_str(), ggml_type_name(t->type));
    }
    return t;
}

bool csm_model_on_host(const csm_model * model) {
    return model->dev && ggml_backend_dev_type(model->dev) == GGML_BACKEND_DEVICE_TYPE_CPU;
}

csm_model::~csm_model() {
    for (auto * b : bufs) ggml_backend_buffer_free(b);
    if (ctx_extra) ggml_free(ctx_extra);
    if (ctx_repack) ggml_free(ctx_repack);
    if (ctx_w) ggml_free(ctx_w);
    if (gguf) gguf_free(gguf);
    if (mmap_addr) csm_os_unmap(mmap_addr, mmap_size);
}

// ---------------------------------------------------------------------------------------------
// loading
// ---------------------------------------------------------------------------------------------

static void read_rope(const gguf_context * g, const std::string & pfx, csm_rope & r, float theta,
                      const csm_rope & defaults) {
    r = defaults;
    r.theta = theta;
    const std::string keys[5] = {pfx + "rope_scaling_type", pfx + "rope_scaling_factor", pfx + "rope_low_freq_factor",
                                 pfx + "rope_high_freq_factor", pfx + "rope_orig_max_pos"};
    int present = 0;
    for (const auto & k : keys) present += gguf_find_key(g, k.c_str()) >= 0;
    if (present == 0) return;
    std::string type = get_str(g, keys[0].c_str(), false);
    if (present != 5 && !(present == 1 && !type.empty() && type != "llama3")) {
        csm_fail("partial RoPE scaling metadata under '%s*': all of rope_scaling_type, rope_scaling_factor, "
                 "rope_low_freq_factor, rope_high_freq_factor, rope_orig_max_pos are needed", pfx.c_str());
    }
    if (type == "none" || type == "default" || type == "linear_none") {
        r.llama3 = false;
        return;
    }
    if (type != "llama3") csm_fail("unsupported RoPE scaling type '%s' in '%s'", quoted(type).c_str(), keys[0].c_str());
    r.llama3 = true;
    r.factor = get_f32(g, keys[1].c_str(), 1e-3f, 1e6f, 1, true);
    r.low_freq_factor = get_f32(g, keys[2].c_str(), 1e-9f, 1e6f, 1, true);
    r.high_freq_factor = get_f32(g, keys[3].c_str(), 1e-9f, 1e6f, 1, true);
    r.orig_max_pos = get_u32(g, keys[4].c_str(), 1, 1 << 24);
    if (r.high_freq_factor <= r.low_freq_factor) {
        csm_fail("RoPE scaling in '%s*': high_freq_factor must exceed low_freq_factor", pfx.c_str());
    }
}

// Divisors of the base RoPE frequencies for llama3 scaling, as transformers computes them.
static std::vector<float> llama3_freq_factors(const csm_rope & r, int head_dim) {
    std::vector<float> out(head_dim / 2, 1.0f);
    if (!r.llama3) return out;
    const double low_wavelen = r.orig_max_pos / r.low_freq_factor;
    const double high_wavelen = r.orig_max_pos / r.high_freq_factor;
    for (int i = 0; i < head_dim / 2; i++) {
        double inv_freq = 1.0 / std::pow((double) r.theta, (2.0 * i) / head_dim);
        double wavelen = 2.0 * M_PI / inv_freq;
        double scaled;
        if (wavelen < high_wavelen) {
            scaled = inv_freq;
        } else if (wavelen > low_wavelen) {
            scaled = inv_freq / r.factor;
        } else {
            double smooth = (r.orig_max_pos / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
            scaled = (1 - smooth) * inv_freq / r.factor + smooth * inv_freq;
        }
        out[i] = (float) (inv_freq / scaled);
    }
    return out;
}

static void bind_llama(csm_model & m, csm_llama & L, const std::string & pfx) {
    const int64_t d = L.d_model, q = (int64_t) L.n_heads * L.head_dim, kv = (int64_t) L.n_kv_heads * L.head_dim;
    L.layers.resize(L.n_layers);
    for (int i = 0; i < L.n_layers; i++) {
        const std::string b = pfx + ".blk." + std::to_string(i) + ".";
        csm_layer & l = L.layers[i];
        l.attn_norm = m.get(b + "attn_norm.weight", {d});
        l.wq = m.get(b + "attn_q.weight", {d, q});
        l.wk = m.get(b + "attn_k.weight", {d, kv});
        l.wv = m.get(b + "attn_v.weight", {d, kv});
        l.wo = m.get(b + "attn_output.weight", {q, d});
        l.ffn_norm = m.get(b + "ffn_norm.weight", {d});
        l.w_gate = m.get(b + "ffn_gate.weight", {d, L.ff_dim});
        l.w_up = m.get(b + "ffn_up.weight", {d, L.ff_dim});
        l.w_down = m.get(b + "ffn_down.weight", {L.ff_dim, d});
    }
    L.output_norm = m.get(pfx + ".output_norm.weight", {d});
}

// The tokenizer's arrays (read by pycsm's Python tokenizer): one string per text token at most, and a
// bounded merge list. Checked here, where reading the counts costs nothing, so that a file with
// millions of extra entries is refused before anything builds a vocabulary from it.
static const int64_t MAX_MERGES = 1 << 20;  // Llama 3 has 280 147

static void check_tokenizer_arrays(const gguf_context * g, const csm_hparams & h) {
    const struct { const char * key; int64_t max; } arrays[] = {
        {"tokenizer.ggml.tokens", h.text_vocab_size}, {"tokenizer.ggml.merges", MAX_MERGES}};
    for (const auto & a : arrays) {
        const int64_t id = gguf_find_key(g, a.key);
        if (id < 0) continue;
        if (gguf_get_kv_type(g, id) != GGUF_TYPE_ARRAY || gguf_get_arr_type(g, id) != GGUF_TYPE_STRING) {
            csm_fail("metadata key '%s' must be an array of strings", a.key);
        }
        const int64_t n = (int64_t) gguf_get_arr_n(g, id);
        if (n > a.max) {
            csm_fail("metadata key '%s' has %lld entries, more than %lld (csm.text_vocab_size for the tokens)", a.key,
                     (long long) n, (long long) a.max);
        }
    }
}

static void read_hparams(csm_model & m) {
    const gguf_context * g = m.gguf;
    std::string arch = get_str(g, "general.architecture", true);
    if (arch != "csm-tts" && arch != "csm" && arch != "csm_tts") {
        csm_fail("unsupported architecture '%s' (expected 'csm-tts'): %s is not a CSM model", quoted(arch).c_str(), m.path.c_str());
    }
    m.name = get_str(g, "general.name", false);
    m.file_type = get_u32(g, "general.file_type", 0, 1 << 20, -1);

    csm_hparams & h = m.hp;
    h.bb_n_layers = get_u32(g, "csm.backbone.n_layers", 1, 1024);
    h.bb_d_model = get_u32(g, "csm.backbone.d_model", 1, 65536);
    h.bb_n_heads = get_u32(g, "csm.backbone.n_heads", 1, 4096);
    h.bb_n_kv_heads = get_u32(g, "csm.backbone.n_kv_heads", 1, 4096);
    h.bb_head_dim = get_u32(g, "csm.backbone.head_dim", 2, 4096);
    h.bb_ff_dim = get_u32(g, "csm.backbone.ff_dim", 1, 1 << 18);
    h.bb_max_pos = get_u32(g, "csm.backbone.max_pos", 2, 65536);
    h.bb_rope_theta = get_f32(g, "csm.backbone.rope_theta", 1.0f, 1e12f, 500000.0f, true);
    h.rms_norm_eps = get_f32(g, "csm.backbone.rms_norm_eps", 0.0f, 1.0f, 1e-5f, true);
    h.dp_n_layers = get_u32(g, "csm.depth.n_layers", 1, 1024);
    h.dp_d_model = get_u32(g, "csm.depth.d_model", 1, 65536);
    h.dp_n_heads = get_u32(g, "csm.depth.n_heads", 1, 4096);
    h.dp_n_kv_heads = get_u32(g, "csm.depth.n_kv_heads", 1, 4096);
    h.dp_head_dim = get_u32(g, "csm.depth.head_dim", 2, 4096);
    h.dp_ff_dim = get_u32(g, "csm.depth.ff_dim", 1, 1 << 18);
    h.dp_rope_theta = get_f32(g, "csm.depth.rope_theta", 1.0f, 1e12f, h.bb_rope_theta, false);
    int32_t bb_hidden = get_u32(g, "csm.depth.backbone_hidden", 1, 65536);
    h.text_vocab_size = get_u32(g, "csm.text_vocab_size", 1, 1 << 24);
    h.audio_vocab_size = get_u32(g, "csm.audio_vocab_size", 2, 1 << 20);
    h.n_codebooks = get_u32(g, "csm.audio_num_codebooks", 1, 1024);
    h.audio_eos_token_id = get_u32(g, "csm.audio_eos_token_id", 0, INT32_MAX);
    h.audio_token_id = get_u32(g, "csm.audio_token_id", 0, INT32_MAX);
    h.bos_token_id = get_u32(g, "csm.bos_token_id", 0, INT32_MAX);
    h.codebook_eos_token_id = get_u32(g, "csm.codebook_eos_token_id", 0, INT32_MAX);
    h.codebook_pad_token_id = get_u32(g, "csm.codebook_pad_token_id", 0, INT32_MAX);
    h.mimi_dim = get_u32(g, "csm.mimi.dim", 1, 65536);
    h.mimi_n_heads = get_u32(g, "csm.mimi.n_heads", 1, 4096);
    h.mimi_n_layers = get_u32(g, "csm.mimi.n_layers", 1, 1024);
    h.mimi_codebook_dim = get_u32(g, "csm.mimi.codebook_dim", 1, 65536);
    h.mimi_codebook_size = get_u32(g, "csm.mimi.codebook_size", 1, 1 << 20);
    h.mimi_n_quantizers = get_u32(g, "csm.mimi.n_quantizers", 1, 1024);
    h.mimi_n_semantic = get_u32(g, "csm.mimi.n_semantic", 1, 1024);
    h.sample_rate = get_u32(g, "csm.mimi.sample_rate", 1, 1 << 22);
    h.frame_rate = get_f32(g, "csm.mimi.frame_rate", 0.01f, 1e6f, 12.5f, true);
    h.samples_per_frame = 1920; // SEANet strides 8 * 6 * 5 * 4 times the x2 down/upsampling

    if (bb_hidden != h.bb_d_model) {
        csm_fail("csm.depth.backbone_hidden (%d) differs from csm.backbone.d_model (%d)", bb_hidden, h.bb_d_model);
    }
    if (h.bb_n_heads % h.bb_n_kv_heads || h.dp_n_heads % h.dp_n_kv_heads) {
        csm_fail("attention heads must be a multiple of key/value heads");
    }
    if (h.bb_head_dim % 2 || h.dp_head_dim % 2) csm_fail("head_dim must be even");
    if (h.n_codebooks != h.mimi_n_quantizers) {
        csm_fail("csm.audio_num_codebooks (%d) differs from csm.mimi.n_quantizers (%d)", h.n_codebooks, h.mimi_n_quantizers);
    }
    if (h.n_codebooks != CSM_N_CODEBOOKS) csm_fail("this build supports %d codebooks, the file has %d", CSM_N_CODEBOOKS, h.n_codebooks);
    if (h.mimi_codebook_size > h.audio_vocab_size) {
        csm_fail("csm.mimi.codebook_size (%d) exceeds csm.audio_vocab_size (%d)", h.mimi_codebook_size, h.audio_vocab_size);
    }
    if (h.mimi_n_semantic >= h.mimi_n_quantizers) csm_fail("csm.mimi.n_semantic must be below n_quantizers");
    if (h.mimi_dim % h.mimi_n_heads) csm_fail("csm.mimi.dim must be a multiple of csm.mimi.n_heads");
    if (h.codebook_eos_token_id >= h.audio_vocab_size) csm_fail("csm.codebook_eos_token_id out of range");
    if (h.bos_token_id >= h.text_vocab_size) csm_fail("csm.bos_token_id out of range");
    // Mimi's strides make 1920 samples per frame: a rate pair that disagrees would label the audio
    // with a rate it does not play at (8000 Hz would play 3x slow)
    if (std::fabs((double) h.frame_rate * h.samples_per_frame - h.sample_rate) > 0.5) {
        csm_fail("csm.mimi.sample_rate (%d) / csm.mimi.frame_rate (%g) must be %d samples per frame", h.sample_rate,
                 (double) h.frame_rate, h.samples_per_frame);
    }
    check_tokenizer_arrays(g, h);

    // transformers' csm-1b RoPE scaling (llama3), the default when the file does not say.
    csm_rope bb_def, dp_def;
    bb_def.llama3 = dp_def.llama3 = true;
    bb_def.factor = dp_def.factor = 32.0f;
    bb_def.low_freq_factor = 0.125f; bb_def.high_freq_factor = 0.5f; bb_def.orig_max_pos = 1024;
    dp_def.low_freq_factor = 1.0f / 512; dp_def.high_freq_factor = 1.0f / 128; dp_def.orig_max_pos = 16;
    read_rope(g, "csm.backbone.", m.backbone.rope, h.bb_rope_theta, bb_def);
    read_rope(g, "csm.depth.", m.depth.rope, h.dp_rope_theta, dp_def);

    csm_llama & B = m.backbone;
    B.n_layers = h.bb_n_layers; B.d_model = h.bb_d_model; B.n_heads = h.bb_n_heads;
    B.n_kv_heads = h.bb_n_kv_heads; B.head_dim = h.bb_head_dim; B.ff_dim = h.bb_ff_dim;
    csm_llama & D = m.depth;
    D.n_layers = h.dp_n_layers; D.d_model = h.dp_d_model; D.n_heads = h.dp_n_heads;
    D.n_kv_heads = h.dp_n_kv_heads; D.head_dim = h.dp_head_dim; D.ff_dim = h.dp_ff_dim;
}

static void bind_tensors(csm_model & m) {
    const csm_hparams & h = m.hp;
    const int64_t n_audio = (int64_t) h.n_codebooks * h.audio_vocab_size;
    m.text_embd = m.get("backbone.text_embd.weight", {h.bb_d_model, h.text_vocab_size});
    m.audio_embd = m.get("backbone.audio_embd.weight", {h.bb_d_model, n_audio});
    m.codebook0_head = m.get("backbone.codebook0_head.weight", {h.bb_d_model, h.audio_vocab_size});
    m.depth_proj = m.get("depth.projection.weight", {h.bb_d_model, h.dp_d_model});
    m.depth_embd = m.get("depth.token_embd.weight", {h.bb_d_model, n_audio});
    m.depth_heads_file = m.get("depth.codebooks_head.weight", {h.audio_vocab_size, h.dp_d_model, h.n_codebooks - 1});
    bind_llama(m, m.backbone, "backbone");
    bind_llama(m, m.depth, "depth");
    mimi_check_tensors(m);
}

// Every tensor's data must lie inside the file; gguf checks the header, we check the extent.
static void check_extents(const csm_model & m, size_t file_size) {
    const size_t data_off = gguf_get_data_offset(m.gguf);
    const int64_t n = gguf_get_n_tensors(m.gguf);
    for (int64_t i = 0; i < n; i++) {
        const char * tname = gguf_get_tensor_name(m.gguf, i);
        ggml_tensor * t = ggml_get_tensor(m.ctx_w, tname);
        if (!t) csm_fail("tensor '%s' could not be indexed", tname);
        if ((size_t) t->type >= (size_t) GGML_TYPE_COUNT || ggml_type_size(t->type) == 0) {
            csm_fail("tensor '%s' has an unsupported type", tname);
        }
        const size_t off = gguf_get_tensor_offset(m.gguf, i);
        const size_t nb = ggml_nbytes(t);
        if (data_off > file_size || off > file_size - data_off || nb > file_size - data_off - off) {
            csm_fail("tensor '%s' (%zu bytes at offset %zu) extends past the end of the file (%zu bytes): "
                     "the file is truncated", tname, nb, data_off + off, file_size);
        }
    }
}

static ggml_backend_dev_t pick_device(const csm_model_params & p) {
    ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (p.device == CSM_DEVICE_CPU) return cpu;
    std::vector<ggml_backend_dev_t> gpus;
    for (size_t i = 0; i < ggml_backend_dev_count(); i++) {
        ggml_backend_dev_t d = ggml_backend_dev_get(i);
        if (ggml_backend_dev_type(d) == GGML_BACKEND_DEVICE_TYPE_GPU) gpus.push_back(d);
    }
    if (p.device == CSM_DEVICE_GPU) {
        if (gpus.empty()) csm_fail("device 'gpu' requested but this ggml build has no GPU backend (%s)", csm_system_info());
        if (p.gpu_index < 0 || (size_t) p.gpu_index >= gpus.size()) {
            csm_fail("gpu_index %d out of range: %zu GPU device(s)", p.gpu_index, gpus.size());
        }
        return gpus[p.gpu_index];
    }
    if (p.device != CSM_DEVICE_AUTO) csm_fail("unknown device %d", p.device);
    return gpus.empty() ? cpu : gpus[std::max(0, std::min<int>(p.gpu_index, (int) gpus.size() - 1))];
}

// Drops the pages of a tensor that has been copied (whole pages inside the tensor): mapped file pages,
// or the pages of the buffer the file was read into (MADV_DONTNEED gives them back; nothing reads a
// copied tensor's original again).
static void drop_mapped_pages(const csm_model & m, const ggml_tensor * t) {
    if (!m.mmap_addr && !m.read_into_host) return;
    const uintptr_t page = csm_os_page_size();
    uintptr_t a = ((uintptr_t) t->data + page - 1) / page * page;
    uintptr_t e = ((uintptr_t) t->data + ggml_nbytes(t)) / page * page;
    if (e > a) csm_os_drop_pages((void *) a, e - a);
}

// RoPE factor tensors live in a small buffer on the weights' device. The depth heads, stored as
// [vocab, d, k] (transformers' layout), are transposed for the matrix products: with pack_heads
// into packed matrices for pycsm's kernels (F16 when the file's heads are F16 and its matrices
// too, else Q8_0), else into a [d, vocab, k] copy (F32 when the file is F32, else F16). Either way
// the file's copy is not read again.
static void make_extra(csm_model & m, bool pack_heads, bool heads_f16) {
    ggml_init_params ip = {3 * ggml_tensor_overhead(), nullptr, true};
    m.ctx_extra = ggml_init(ip);
    if (!m.ctx_extra) csm_fail("out of memory");
    csm_llama * L[2] = {&m.backbone, &m.depth};
    std::vector<float> ff[2];
    for (int i = 0; i < 2; i++) {
        if (!L[i]->rope.llama3) continue;
        ff[i] = llama3_freq_factors(L[i]->rope, L[i]->head_dim);
        L[i]->rope.freq_factors = ggml_new_tensor_1d(m.ctx_extra, GGML_TYPE_F32, L[i]->head_dim / 2);
    }
    const ggml_tensor * hf = m.depth_heads_file;
    const ggml_type ht = hf->type == GGML_TYPE_F32 ? GGML_TYPE_F32 : GGML_TYPE_F16;
    if (!pack_heads) m.depth_heads = ggml_new_tensor_3d(m.ctx_extra, ht, hf->ne[1], hf->ne[0], hf->ne[2]);
    if (ggml_get_first_tensor(m.ctx_extra)) {
        ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(m.ctx_extra, ggml_backend_dev_buffer_type(m.dev));
        if (!buf) csm_fail("failed to allocate the RoPE factor and depth head buffer");
        m.bufs.push_back(buf);
    }
    for (int i = 0; i < 2; i++) {
        if (L[i]->rope.freq_factors) ggml_backend_tensor_set(L[i]->rope.freq_factors, ff[i].data(), 0, ff[i].size() * sizeof(float));
    }
    const int64_t V = hf->ne[0], d = hf->ne[1];
    const ggml_type_traits * tr = ggml_get_type_traits(hf->type);
    if (hf->type != GGML_TYPE_F32 && (!tr || !tr->to_float)) csm_fail("depth.codebooks_head.weight: unsupported type %s", ggml_type_name(hf->type));
    std::vector<char> raw(hf->nb[2]);
    std::vector<float> src((size_t) V * d), dst((size_t) V * d);
    std::vector<ggml_fp16_t> h16(ht == GGML_TYPE_F16 ? (size_t) V * d : 0);
    for (int64_t k = 0; k < hf->ne[2]; k++) {
        ggml_backend_tensor_get(hf, raw.data(), k * hf->nb[2], hf->nb[2]);
        if (hf->type == GGML_TYPE_F32) memcpy(src.data(), raw.data(), src.size() * sizeof(float));
        else for (int64_t r = 0; r < d; r++) tr->to_float(raw.data() + r * hf->nb[1], src.data() + r * V, V);
        for (int64_t r = 0; r < d; r++)
            for (int64_t v = 0; v < V; v++) dst[(size_t) v * d + r] = src[(size_t) r * V + v];
        if (pack_heads && heads_f16 && hf->type == GGML_TYPE_F16) {
            ggml_fp32_to_fp16_row(dst.data(), h16.data(), (int64_t) dst.size()); // exact: the values came from F16
            m.packed_heads.push_back(csm_pack_f16(m.kernel, (const uint16_t *) h16.data(), V, d));
            continue;
        }
        if (pack_heads) {
            m.packed_heads.push_back(csm_pack_f32_as_q8_0(m.kernel, dst.data(), V, d));
            continue;
        }
        const size_t off = (size_t) k * m.depth_heads->nb[2];
        if (ht == GGML_TYPE_F32) {
            ggml_backend_tensor_set(m.depth_heads, dst.data(), off, dst.size() * sizeof(float));
        } else {
            ggml_fp32_to_fp16_row(dst.data(), h16.data(), (int64_t) dst.size());
            ggml_backend_tensor_set(m.depth_heads, h16.data(), off, h16.size() * sizeof(ggml_fp16_t));
        }
    }
    drop_mapped_pages(m, hf);
}

// Whether every tensor of the file starts at a multiple of 32 bytes (ggml's tensor alignment): the
// kernels and permute_host load whole elements from the weights. A file written with a smaller
// general.alignment is read into an aligned buffer instead of being mapped.
static bool tensors_aligned(const csm_model & m) {
    const size_t data_off = gguf_get_data_offset(m.gguf);
    for (int64_t i = 0; i < gguf_get_n_tensors(m.gguf); i++) {
        if ((data_off + gguf_get_tensor_offset(m.gguf, i)) % 32) return false;
    }
    return true;
}

// Maps the file (use_mmap, CPU, aligned tensors) or reads it into a buffer of the device.
static void load_weights(csm_model & m, bool use_mmap, int fd, size_t file_size) {
    const size_t data_off = gguf_get_data_offset(m.gguf);
    const bool host = csm_model_on_host(&m);
    if (host && use_mmap && tensors_aligned(m)) {
        void * addr = csm_os_map_read(fd, file_size);
        if (!addr) csm_fail("mmap of %s failed: %s", m.path.c_str(), strerror(errno));
        m.mmap_addr = addr;
        m.mmap_size = file_size;
        ggml_backend_buffer_t buf = ggml_backend_cpu_buffer_from_ptr(addr, file_size);
        if (!buf) csm_fail("could not wrap the mapped file in a ggml buffer");
        ggml_backend_buffer_set_usage(buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
        m.bufs.push_back(buf);
        for (int64_t i = 0; i < gguf_get_n_tensors(m.gguf); i++) {
            ggml_tensor * t = ggml_get_tensor(m.ctx_w, gguf_get_tensor_name(m.gguf, i));
            char * at = (char *) addr + data_off + gguf_get_tensor_offset(m.gguf, i);
            if (ggml_backend_tensor_alloc(buf, t, at) != GGML_STATUS_SUCCESS) csm_fail("could not place tensor '%s'", t->name);
        }
        return;
    }
    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(m.ctx_w, ggml_backend_dev_buffer_type(m.dev));
    if (!buf) csm_fail("failed to allocate %.1f MiB for the weights on %s", m.n_bytes / 1048576.0, ggml_backend_dev_name(m.dev));
    ggml_backend_buffer_set_usage(buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
    m.bufs.push_back(buf);
    std::vector<char> tmp;
    for (int64_t i = 0; i < gguf_get_n_tensors(m.gguf); i++) {
        ggml_tensor * t = ggml_get_tensor(m.ctx_w, gguf_get_tensor_name(m.gguf, i));
        const size_t nb = ggml_nbytes(t);
        const uint64_t at = data_off + gguf_get_tensor_offset(m.gguf, i);
        char * dst = host ? (char *) t->data : nullptr;
        if (!dst) { tmp.resize(nb); dst = tmp.data(); }
        size_t done = 0;
        while (done < nb) {
            int64_t r = csm_os_pread(fd, dst + done, nb - done, at + done);
            if (r <= 0) csm_fail("reading tensor '%s' from %s failed", t->name, m.path.c_str());
            done += (size_t) r;
        }
        if (!host) ggml_backend_tensor_set(t, dst, 0, nb);
    }
}

// ggml's CPU "repack" buffer type (weights re-laid out for faster matrix products), if any.
static ggml_backend_buffer_type_t cpu_repack_buft(ggml_backend_dev_t cpu) {
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(cpu);
    auto get_extra = (ggml_backend_buffer_type_t * (*)(ggml_backend_dev_t))
        ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts");
    if (!get_extra) return nullptr;
    for (ggml_backend_buffer_type_t * p = get_extra(cpu); p && *p; ++p) {
        if (strcmp(ggml_backend_buft_name(*p), "CPU_REPACK") == 0) return *p;
    }
    return nullptr;
}

// Would the device run w x (x a column vector) with w stored in buft?
static bool matmul_supported(ggml_backend_dev_t dev, ggml_backend_buffer_type_t buft, const ggml_tensor * w) {
    ggml_init_params ip = {3 * ggml_tensor_overhead(), nullptr, true};
    ggml_context * ctx = ggml_init(ip);
    if (!ctx) return false;
    ggml_tensor * wc = ggml_new_tensor(ctx, w->type, GGML_MAX_DIMS, w->ne);
    ggml_tensor * x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, w->ne[0], 1);
    ggml_tensor * op = ggml_mul_mat(ctx, wc, x);
    ggml_backend_buffer_t dummy = ggml_backend_buft_alloc_buffer(buft, 0);
    wc->buffer = dummy;
    const bool ok = dummy && ggml_backend_dev_supports_op(dev, op);
    if (dummy) ggml_backend_buffer_free(dummy);
    ggml_free(ctx);
    return ok;
}

// The matrices of the matrix products (the slots that hold them, so a copy can replace them).
static std::vector<ggml_tensor **> matmul_slots(csm_model & m) {
    std::vector<ggml_tensor **> slots = {&m.codebook0_head, &m.depth_proj};
    for (csm_llama * L : {&m.backbone, &m.depth}) {
        for (csm_layer & l : L->layers) {
            for (ggml_tensor ** t : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down}) slots.push_back(t);
        }
    }
    return slots;
}

// Packs the matrices pycsm's kernel (m.kernel) takes, on as many threads as cores (up to 8), and
// groups the packed q/k/v and gate/up of each layer for one op each. A thread the system refuses (a
// pids or RLIMIT_NPROC limit) leaves its share to the threads that started: the matrices are handed
// out one at a time.
static void pack_matrices(csm_model & m) {
    std::vector<ggml_tensor *> todo;
    for (ggml_tensor ** t : matmul_slots(m)) {
        if (csm_packable(m.kernel, *t)) todo.push_back(*t);
    }
    if (todo.empty()) return;
    std::vector<std::unique_ptr<csm_packed_matrix>> out(todo.size());
    std::vector<std::string> errors(todo.size());
    const unsigned n_thr = (unsigned) std::min(8, csm_usable_cpus());
    std::atomic<size_t> next{0};
    auto work = [&] {
        for (size_t i; (i = next.fetch_add(1)) < todo.size();) {
            try {
                out[i] = csm_pack(m.kernel, todo[i]);
                drop_mapped_pages(m, todo[i]);
            } catch (const std::exception & e) {
                errors[i] = e.what();
            }
        }
    };
    std::vector<std::thread> pool;
    for (unsigned i = 1; i < n_thr; i++) {
        try {
            pool.emplace_back(work);
        } catch (const std::system_error &) {
            break;
        }
    }
    work();
    for (auto & th : pool) th.join();
    size_t bytes = 0;
    for (size_t i = 0; i < todo.size(); i++) {
        if (!errors[i].empty()) csm_fail("%s", errors[i].c_str());
        bytes += out[i]->mem_size;
        m.packed[todo[i]] = std::move(out[i]);
    }
    auto packed = [&](const ggml_tensor * t) -> const csm_packed_matrix * {
        auto it = m.packed.find(t);
        return it == m.packed.end() ? nullptr : it->second.get();
    };
    for (const csm_llama * L : {&m.backbone, &m.depth}) {
        for (const csm_layer & l : L->layers) {
            if (auto g = csm_packed_group_make({packed(l.wq), packed(l.wk), packed(l.wv)}, false)) m.packed_groups[l.wq] = std::move(g);
            if (auto g = csm_packed_group_make({packed(l.w_gate), packed(l.w_up)}, true)) m.packed_groups[l.w_gate] = std::move(g);
        }
    }
    csm_log(CSM_LOG_INFO, "packed %zu matrices (%.1f MiB) for pycsm's %s kernel, %zu fused q/k/v or gate/up groups",
            todo.size(), bytes / 1048576.0, m.kernel->isa, m.packed_groups.size());
}

// Moves the matrices of the matrix products into the CPU repack buffer where ggml supports their
// type; the mapped originals are dropped from memory as they are copied.
static void repack_weights(csm_model & m) {
    ggml_backend_buffer_type_t buft = cpu_repack_buft(m.dev);
    if (!buft) return;
    std::vector<ggml_tensor **> chosen;
    for (ggml_tensor ** t : matmul_slots(m)) {
        if (!m.packed.count(*t) && matmul_supported(m.dev, buft, *t)) chosen.push_back(t);
    }
    if (chosen.empty()) return;
    ggml_init_params ip = {chosen.size() * ggml_tensor_overhead(), nullptr, true};
    m.ctx_repack = ggml_init(ip);
    if (!m.ctx_repack) csm_fail("out of memory");
    std::vector<ggml_tensor *> copies;
    for (ggml_tensor ** t : chosen) {
        ggml_tensor * c = ggml_new_tensor(m.ctx_repack, (*t)->type, GGML_MAX_DIMS, (*t)->ne);
        ggml_set_name(c, (*t)->name);
        copies.push_back(c);
    }
    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(m.ctx_repack, buft);
    if (!buf) csm_fail("cannot allocate the repacked weights");
    ggml_backend_buffer_set_usage(buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
    m.bufs.push_back(buf);
    size_t bytes = 0;
    for (size_t i = 0; i < chosen.size(); i++) {
        ggml_tensor * src = *chosen[i];
        ggml_backend_tensor_set(copies[i], src->data, 0, ggml_nbytes(src));
        bytes += ggml_nbytes(src);
        drop_mapped_pages(m, src);
        *chosen[i] = copies[i];
    }
    csm_log(CSM_LOG_INFO, "repacked %zu matrices (%.1f MiB) for faster CPU matrix products", chosen.size(), bytes / 1048576.0);
}

// A name for the file open as fd, for ggml's parser (which opens by name): /proc/self/fd/N where
// there is one, so that the file parsed is the one checked even if the path changes meanwhile.
struct fd_guard {
    int fd;
    ~fd_guard() { if (fd >= 0) csm_os_close(fd); }
};

static csm_model * load(const char * path, const csm_model_params & p) {
    csm_install_ggml_log();
    if (!path || !*path) csm_fail("no model path given");
    auto m = std::make_unique<csm_model>();
    m->path = path;

    // stat first: opening a FIFO for reading blocks until a writer comes. O_NONBLOCK covers a swap
    // between the two (it means nothing for a regular file), and fstat checks what was opened.
    if (csm_os_is_regular_path(path) == 0) csm_fail("'%s' is not a regular file", path);
    fd_guard fd{csm_os_open_read(path)};
    if (fd.fd < 0) csm_fail("cannot open model file '%s': %s", path, strerror(errno));
    const int64_t size = csm_os_regular_file_size(fd.fd);
    if (size < 0) csm_fail("'%s' is not a regular file", path);
    const size_t file_size = (size_t) size;
    char magic[4] = {0};
    if (file_size < 24 || csm_os_pread(fd.fd, magic, 4, 0) != 4 || memcmp(magic, "GGUF", 4) != 0) {
        csm_fail("'%s' is not a GGUF file (bad magic or too short)", path);
    }

    csm_gguf_precheck(fd.fd, file_size, path); // bounded scan first: ggml's parser is quadratic in counts
    gguf_init_params gp = {true, &m->ctx_w};
    m->gguf = gguf_init_from_file(csm_os_fd_path(fd.fd, path).c_str(), gp);
    if (!m->gguf) csm_fail("'%s' is a corrupt or truncated GGUF file (%s)", path, csm_last_ggml_error().c_str());

    m->n_tensors = (int32_t) gguf_get_n_tensors(m->gguf);
    read_hparams(*m);
    check_extents(*m, file_size);
    bind_tensors(*m);
    for (ggml_tensor * t = ggml_get_first_tensor(m->ctx_w); t; t = ggml_get_next_tensor(m->ctx_w, t)) {
        m->n_params += (uint64_t) ggml_nelements(t);
        m->n_bytes += ggml_nbytes(t);
    }

    m->dev = pick_device(p);
    if (!m->dev) csm_fail("no ggml device available");
    // A mapped file that is rewritten or truncated while the model lives kills the process with
    // SIGBUS on the next read. When the load copies the matrices anyway (use_repack on the CPU),
    // the file is read instead of mapped, so that nothing a frame reads stays mapped.
    const bool copies = p.use_repack && csm_model_on_host(m.get());
    load_weights(*m, p.use_mmap && !copies, fd.fd, file_size);
    m->read_into_host = csm_model_on_host(m.get()) && !m->mmap_addr;
    // In a quantised file (its matrices neither F32 nor F16) the depth heads, which converters keep
    // in F16, join the int8 kernel as Q8_0: 31 of them are read per frame. In an F16 file they join
    // the F16 kernel as they are.
    const ggml_type wt = m->backbone.layers[0].w_up->type;
    const bool quantised = wt != GGML_TYPE_F32 && wt != GGML_TYPE_F16 && wt != GGML_TYPE_BF16;
    const bool f16 = wt == GGML_TYPE_F16 && m->depth_heads_file->type == GGML_TYPE_F16;
    if (p.use_repack && csm_model_on_host(m.get())) m->kernel = csm_kernel_pick();
    make_extra(*m, m->kernel && (quantised || f16) && m->hp.dp_d_model % 32 == 0, f16);
    if (m->kernel) pack_matrices(*m);
    if (p.use_repack && csm_model_on_host(m.get())) repack_weights(*m);
    csm_log(CSM_LOG_INFO, "loaded %s: %d tensors, %.1f MiB on %s", path, m->n_tensors, m->n_bytes / 1048576.0,
            ggml_backend_dev_name(m->dev));
    return m.release();
}

extern "C" {

struct csm_model_params csm_model_default_params(void) {
    csm_model_params p;
    p.device = CSM_DEVICE_AUTO;
    p.gpu_index = 0;
    p.use_mmap = true;
    p.use_repack = true;
    return p;
}

csm_model * csm_model_load(const char * path, struct csm_model_params params) {
    return csm_guard<csm_model *>(nullptr, [&] { return load(path, params); });
}

void csm_model_free(csm_model * model) { csm_release(model); }

struct csm_hparams csm_model_hparams(const csm_model * model) {
    if (!model) return csm_hparams{};
    return model->hp;
}

int32_t csm_model_file_type(const csm_model * model) { return model ? model->file_type : -1; }
const char * csm_model_name(const csm_model * model) { return model ? model->name.c_str() : ""; }
uint64_t csm_model_n_params(const csm_model * model) { return model ? model->n_params : 0; }
uint64_t csm_model_n_bytes(const csm_model * model) { return model ? model->n_bytes : 0; }
int32_t csm_model_n_tensors(const csm_model * model) { return model ? model->n_tensors : 0; }
const char * csm_model_device(const csm_model * model) {
    return model && model->dev ? ggml_backend_dev_name(model->dev) : "";
}

} // extern "C"
