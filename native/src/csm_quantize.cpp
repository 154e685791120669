// csm_quantize.cpp - rewrite a CSM GGUF with quantised matrices, using ggml's quantisation functions.
//
// The rule of the published cstr/csm-1b-GGUF files: a tensor is quantised only when it has exactly
// 2 dims, its name contains "weight" or ends in "_w", its name has no "norm", and ne0 is a multiple
// of the block size (for Q4_K a row that is a multiple of 32 but not of 256 falls back to Q4_0).
// Other 2-D and 3-D tensors are F16, 1-D tensors F32.
#include "csm.h"
#include "csm_backend.h"
#include "csm_gguf_check.h"
#include "csm_log.h"
#include "csm_platform.h"

#include "ggml.h"
#include "ggml-cpu.h"
#include "gguf.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <system_error>
#include <thread>
#include <vector>


static bool ends_with(const std::string & s, const char * suf) {
    size_t n = strlen(suf);
    return s.size() >= n && s.compare(s.size() - n, n, suf) == 0;
}

static ggml_type target_type(const ggml_tensor * t, ggml_type q) {
    const std::string name = t->name;
    const int nd = ggml_n_dims(t);
    if (nd <= 1) return GGML_TYPE_F32;
    const bool eligible = nd == 2 && (name.find("weight") != std::string::npos || ends_with(name, "_w")) &&
                          name.find("norm") == std::string::npos;
    if (eligible) {
        if (t->ne[0] % ggml_blck_size(q) == 0) return q;
        if (q == GGML_TYPE_Q4_K && t->ne[0] % ggml_blck_size(GGML_TYPE_Q4_0) == 0) return GGML_TYPE_Q4_0;
    }
    return GGML_TYPE_F16;
}

// general.file_type values (llama.cpp's LLAMA_FTYPE numbering) for the types we write.
static int32_t file_type_of(ggml_type q) {
    switch (q) {
        case GGML_TYPE_F32:  return 0;
        case GGML_TYPE_F16:  return 1;
        case GGML_TYPE_Q4_0: return 2;
        case GGML_TYPE_Q4_1: return 3;
        case GGML_TYPE_Q8_0: return 7;
        case GGML_TYPE_Q5_0: return 8;
        case GGML_TYPE_Q5_1: return 9;
        case GGML_TYPE_Q2_K: return 10;
        case GGML_TYPE_Q3_K: return 12;
        case GGML_TYPE_Q4_K: return 15;
        case GGML_TYPE_Q5_K: return 17;
        case GGML_TYPE_Q6_K: return 18;
        case GGML_TYPE_BF16: return 32;
        default: return -1;
    }
}

struct file_closer {
    void operator()(FILE * f) const { if (f) fclose(f); }
};
using file_ptr = std::unique_ptr<FILE, file_closer>;

struct gguf_deleter {
    void operator()(gguf_context * g) const { gguf_free(g); }
};
struct ggml_deleter {
    void operator()(ggml_context * c) const { ggml_free(c); }
};

// Source tensor data -> f32 (any type ggml can convert).
static void to_f32(const ggml_tensor * t, const void * src, float * dst, int64_t n) {
    if (t->type == GGML_TYPE_F32) { memcpy(dst, src, n * sizeof(float)); return; }
    const ggml_type_traits * tr = ggml_get_type_traits(t->type);
    if (!tr || !tr->to_float) csm_fail("tensor '%s': cannot convert type %s to f32", t->name, ggml_type_name(t->type));
    tr->to_float(src, dst, n);
}

static void quantize_rows(ggml_type type, const float * src, char * dst, int64_t nrows, int64_t n_per_row, int n_threads) {
    if (type == GGML_TYPE_F32) { memcpy(dst, src, nrows * n_per_row * sizeof(float)); return; }
    const size_t row_size = ggml_row_size(type, n_per_row);
    n_threads = (int) std::max<int64_t>(1, std::min<int64_t>(n_threads, nrows));
    std::vector<std::thread> pool;
    for (int i = 0; i < n_threads; i++) {
        int64_t r0 = nrows * i / n_threads, r1 = nrows * (i + 1) / n_threads;
        auto work = [=] {
            if (type == GGML_TYPE_F16) {
                ggml_fp32_to_fp16_row(src + r0 * n_per_row, (ggml_fp16_t *) (dst + r0 * row_size), (r1 - r0) * n_per_row);
            } else if (type == GGML_TYPE_BF16) {
                ggml_fp32_to_bf16_row(src + r0 * n_per_row, (ggml_bf16_t *) (dst + r0 * row_size), (r1 - r0) * n_per_row);
            } else {
                ggml_quantize_chunk(type, src, dst, r0 * n_per_row, r1 - r0, n_per_row, nullptr);
            }
        };
        try {
            pool.emplace_back(work);
        } catch (const std::system_error &) { // no thread to be had: do this chunk here
            work();
        }
    }
    for (auto & th : pool) th.join();
}

static void quantize(const char * in_path, const char * out_path, const csm_quantize_params & p) {
    csm_install_ggml_log();
    if (!in_path || !out_path) csm_fail("input and output paths are required");
    const ggml_type q = (ggml_type) p.type;
    if (p.type < 0 || p.type >= GGML_TYPE_COUNT || ggml_type_size(q) == 0 || file_type_of(q) < 0) {
        csm_fail("unsupported target type %d", p.type);
    }
    if (ggml_quantize_requires_imatrix(q)) csm_fail("type %s needs an importance matrix, which is not supported", ggml_type_name(q));
    if (p.n_threads > CSM_MAX_THREADS) csm_fail("n_threads %d is out of range: at most %d (<= 0: all cores)", p.n_threads, CSM_MAX_THREADS);
    const int n_cores = csm_usable_cpus();
    const int n_threads = p.n_threads > 0 ? std::min(p.n_threads, n_cores) : n_cores;

    try {
        csm_gguf_precheck_path(in_path);
    } catch (const csm_error & e) {
        csm_fail("cannot read '%s': not a valid GGUF file (%s)", in_path, e.msg.c_str());
    }
    ggml_context * ctx_raw = nullptr;
    gguf_init_params gp = {true, &ctx_raw};
    std::unique_ptr<gguf_context, gguf_deleter> in(gguf_init_from_file(in_path, gp));
    std::unique_ptr<ggml_context, ggml_deleter> ctx_in(ctx_raw);
    if (!in) csm_fail("cannot read '%s': not a valid GGUF file (%s)", in_path, csm_last_ggml_error().c_str());
    int64_t arch = gguf_find_key(in.get(), "general.architecture");
    if (arch < 0 || gguf_get_kv_type(in.get(), arch) != GGUF_TYPE_STRING) csm_fail("'%s' has no general.architecture", in_path);
    std::string a = gguf_get_val_str(in.get(), arch);
    if (a != "csm-tts" && a != "csm" && a != "csm_tts") csm_fail("'%s' is not a CSM model (architecture '%.64s')", in_path, a.c_str());

    file_ptr fin(csm_os_fopen_read(in_path));
    if (!fin) csm_fail("cannot open '%s'", in_path);
    const size_t in_size = (size_t) csm_os_fsize(fin.get());

    std::unique_ptr<gguf_context, gguf_deleter> out(gguf_init_empty());
    gguf_set_kv(out.get(), in.get());
    gguf_set_val_u32(out.get(), "general.quantization_version", GGML_QNT_VERSION);
    gguf_set_val_u32(out.get(), "general.file_type", (uint32_t) file_type_of(q));

    const int64_t n = gguf_get_n_tensors(in.get());
    ggml_init_params ip = {(size_t) (n + 1) * ggml_tensor_overhead(), nullptr, true};
    std::unique_ptr<ggml_context, ggml_deleter> ctx_out(ggml_init(ip));
    std::vector<ggml_tensor *> src(n), dst(n);
    for (int64_t i = 0; i < n; i++) {
        src[i] = ggml_get_tensor(ctx_in.get(), gguf_get_tensor_name(in.get(), i));
        ggml_tensor * t = src[i];
        const size_t off = gguf_get_data_offset(in.get()) + gguf_get_tensor_offset(in.get(), i);
        if (off > in_size || ggml_nbytes(t) > in_size - off) csm_fail("'%s' is truncated (tensor '%s')", in_path, t->name);
        ggml_type tt = target_type(t, q);
        dst[i] = ggml_new_tensor(ctx_out.get(), tt, GGML_MAX_DIMS, t->ne);
        ggml_set_name(dst[i], t->name);
        gguf_add_tensor(out.get(), dst[i]);
    }

    // The output is written to a temporary file of an unpredictable name, created exclusively (no
    // symlink followed, nothing overwritten) next to the output, then renamed over it: a fixed
    // "<out>.part" let a planted symlink redirect the write to another file.
    std::string tmp_path = std::string(out_path) + ".XXXXXX";
    file_ptr fout(csm_os_create_temp(tmp_path));
    if (!fout) csm_fail("cannot create a temporary file next to '%s': %s", out_path, strerror(errno));
    bool ok = false;
    struct remover {
        const std::string & path; bool & ok;
        ~remover() { if (!ok) csm_os_remove(path.c_str()); }
    } rm{tmp_path, ok};

    std::vector<char> meta(gguf_get_meta_size(out.get()));
    gguf_get_meta_data(out.get(), meta.data());
    if (fwrite(meta.data(), 1, meta.size(), fout.get()) != meta.size()) csm_fail("write to '%s' failed", tmp_path.c_str());
    const size_t align = gguf_get_alignment(out.get());

    std::vector<char> raw, qbuf;
    std::vector<float> f32;
    size_t pos = meta.size();
    for (int64_t i = 0; i < n; i++) {
        ggml_tensor * t = src[i];
        const size_t nb = ggml_nbytes(t);
        raw.resize(nb);
        csm_os_fseek(fin.get(), gguf_get_data_offset(in.get()) + gguf_get_tensor_offset(in.get(), i));
        if (fread(raw.data(), 1, nb, fin.get()) != nb) csm_fail("reading tensor '%s' failed", t->name);
        const char * data = raw.data();
        size_t out_nb = ggml_nbytes(dst[i]);
        if (dst[i]->type != t->type) {
            const int64_t ne = ggml_nelements(t);
            f32.resize(ne);
            to_f32(t, raw.data(), f32.data(), ne);
            qbuf.resize(out_nb);
            quantize_rows(dst[i]->type, f32.data(), qbuf.data(), ne / t->ne[0], t->ne[0], n_threads);
            data = qbuf.data();
        }
        const size_t at = meta.size() + gguf_get_tensor_offset(out.get(), i);
        static const char zeros[64] = {0};
        while (pos < at) {
            size_t k = std::min(sizeof(zeros), at - pos);
            fwrite(zeros, 1, k, fout.get());
            pos += k;
        }
        if (fwrite(data, 1, out_nb, fout.get()) != out_nb) csm_fail("write to '%s' failed (disk full?)", tmp_path.c_str());
        pos += out_nb;
        if (p.progress && !p.progress((int32_t) (i + 1), (int32_t) n, p.progress_user_data)) csm_fail("quantisation aborted");
    }
    while (pos % align) { fputc(0, fout.get()); pos++; }
    if (fflush(fout.get()) != 0) csm_fail("write to '%s' failed", tmp_path.c_str());
    fout.reset();
    if (csm_os_replace(tmp_path.c_str(), out_path) != 0) csm_fail("cannot rename '%s' to '%s': %s", tmp_path.c_str(), out_path, strerror(errno));
    ok = true;
}

extern "C" {

struct csm_quantize_params csm_quantize_default_params(void) {
    csm_quantize_params p;
    p.type = GGML_TYPE_Q8_0;
    p.n_threads = 0;
    p.progress = nullptr;
    p.progress_user_data = nullptr;
    return p;
}

int32_t csm_quantize(const char * in_path, const char * out_path, struct csm_quantize_params params) {
    return csm_guard<int32_t>(-1, [&] { quantize(in_path, out_path, params); return 0; });
}

} // extern "C"
