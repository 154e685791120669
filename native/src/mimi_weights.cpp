// mimi_weights.cpp - binding the Mimi tensors of a CSM GGUF, deriving the codec's sizes from their
// shapes, and preparing a runner: backend, permuted convolution weights, streaming state.
#include "mimi.h"

#include "csm_backend.h"
#include "csm_log.h"

#include <algorithm>
#include <cmath>

// ---------------------------------------------------------------------------------------------
// binding
// ---------------------------------------------------------------------------------------------

static ggml_tensor * need(const csm_model & m, const std::string & name) {
    ggml_tensor * t = m.find(name);
    if (!t) csm_fail("Mimi tensor '%s' is missing from %s", name.c_str(), m.path.c_str());
    return t;
}

// Convolution weights are permuted into a prepared copy, which ggml can do for these types only.
static void need_float(const ggml_tensor * t) {
    if (t->type != GGML_TYPE_F32 && t->type != GGML_TYPE_F16 && t->type != GGML_TYPE_BF16) {
        csm_fail("Mimi tensor '%s' has type %s; convolution weights must be f32, f16 or bf16", t->name,
                 ggml_type_name(t->type));
    }
}

// A Conv1d "<prefix>.weight" (+ "<prefix>.bias" when has_bias) with `in` input channels; the kernel
// and output channels come from the file. stride 0: the kernel is 2 * stride (SEANet down-sampling).
static void bind_conv(const csm_model & m, mimi_conv & c, const std::string & prefix, int64_t in, int64_t stride,
                      bool has_bias = true) {
    ggml_tensor * w = need(m, prefix + ".weight");
    const int64_t k = w->ne[0], out = w->ne[2];
    if (k < 1 || out < 1 || ggml_n_dims(w) > 3) csm_fail("Mimi tensor '%s' is not a convolution kernel", w->name);
    if (stride == 0) {
        if (k % 2) csm_fail("Mimi tensor '%s': a strided convolution needs an even kernel, got %lld", w->name, (long long) k);
        stride = k / 2;
    }
    if (k < stride) csm_fail("Mimi tensor '%s': kernel %lld is shorter than its stride %lld", w->name, (long long) k, (long long) stride);
    c.w = m.get(prefix + ".weight", {k, in, out});
    need_float(c.w);
    c.b = has_bias ? m.get(prefix + ".bias", {out}) : nullptr;
    c.k = k;
    c.in = in;
    c.out = out;
    c.stride = stride;
}

// A ConvTranspose1d "<prefix>.weight" [k, out, in] with bias, stride k / 2.
static void bind_convtr(const csm_model & m, mimi_convtr & c, const std::string & prefix, int64_t in) {
    ggml_tensor * w = need(m, prefix + ".weight");
    const int64_t k = w->ne[0], out = w->ne[1];
    if (k < 2 || k % 2 || out < 1) {
        csm_fail("Mimi tensor '%s': a transposed convolution needs an even kernel (2 x stride), got %lld", w->name, (long long) k);
    }
    c.w = m.get(prefix + ".weight", {k, out, in});
    need_float(c.w);
    c.b = m.get(prefix + ".bias", {out});
    c.k = k;
    c.in = in;
    c.out = out;
    c.stride = k / 2;
}

static void bind_res(const csm_model & m, mimi_resblock & r, const std::string & prefix, int64_t ch) {
    bind_conv(m, r.c1, prefix + ".blk1", ch, 1);
    bind_conv(m, r.c2, prefix + ".blk3", r.c1.out, 1);
    if (r.c2.k != 1) csm_fail("Mimi tensor '%s.blk3.weight': expected a 1x1 convolution, got kernel %lld", prefix.c_str(), (long long) r.c2.k);
    if (r.c2.out != ch) csm_fail("Mimi residual block '%s' maps %lld channels to %lld", prefix.c_str(), (long long) ch, (long long) r.c2.out);
}

static void bind_tfm(const csm_model & m, mimi_tfm & t, const std::string & prefix, const csm_hparams & h) {
    t.dim = h.mimi_dim;
    t.n_heads = h.mimi_n_heads;
    t.head_dim = t.dim / t.n_heads;
    if (t.head_dim % 2) csm_fail("Mimi attention head width %lld must be even (RoPE)", (long long) t.head_dim);
    t.layers.resize(h.mimi_n_layers);
    for (int i = 0; i < h.mimi_n_layers; i++) {
        const std::string b = prefix + ".layers." + std::to_string(i) + ".";
        mimi_tfm_layer & l = t.layers[i];
        ggml_tensor * up = need(m, b + "ffn_up_w");
        if (i == 0) t.ff = up->ne[1];
        l.qkv = m.get(b + "attn.qkv_w", {t.dim, 3 * t.dim});
        l.out = m.get(b + "attn.out_w", {t.dim, t.dim});
        l.up = m.get(b + "ffn_up_w", {t.dim, t.ff});
        l.down = m.get(b + "ffn_down_w", {t.ff, t.dim});
        l.n1w = m.get(b + "norm1.weight", {t.dim});
        l.n1b = m.get(b + "norm1.bias", {t.dim});
        l.n2w = m.get(b + "norm2.weight", {t.dim});
        l.n2b = m.get(b + "norm2.bias", {t.dim});
        l.ls1 = m.get(b + "ls1", {t.dim});
        l.ls2 = m.get(b + "ls2", {t.dim});
    }
}

static void bind_rvq(const csm_model & m, mimi_rvq & q, const std::string & prefix, int64_t n, const mimi_arch & a) {
    q.in_proj = m.get(prefix + ".input_proj.weight", {1, a.dim, a.cb_dim});
    q.out_proj = m.get(prefix + ".output_proj.weight", {1, a.cb_dim, a.dim});
    need_float(q.in_proj);
    need_float(q.out_proj);
    q.books.resize(n);
    for (int64_t i = 0; i < n; i++) {
        q.books[i] = m.get(prefix + ".vq.layers." + std::to_string(i) + "._codebook.embedding", {a.cb_dim, a.cb_size});
    }
}

static const int MAX_STAGES = 16;

void mimi_bind(const csm_model & m, mimi_arch & a) {
    const csm_hparams & h = m.hp;
    a.dim = h.mimi_dim;
    a.cb_dim = h.mimi_codebook_dim;
    a.cb_size = h.mimi_codebook_size;
    a.n_q = h.mimi_n_quantizers;
    a.n_sem = h.mimi_n_semantic;
    if (a.n_sem < 1 || a.n_sem >= a.n_q) csm_fail("csm.mimi.n_semantic (%lld) must be in [1, n_quantizers)", (long long) a.n_sem);

    bind_rvq(m, a.rvq_sem, "mimi.quantizer.rvq_first", a.n_sem, a);
    bind_rvq(m, a.rvq_ac, "mimi.quantizer.rvq_rest", a.n_q - a.n_sem, a);

    // x2 resampling between the SEANet rate (25 Hz) and the code rate (12.5 Hz)
    ggml_tensor * up = need(m, "mimi.upsample.conv3.weight");
    if (up->ne[0] < 2 || up->ne[0] % 2) csm_fail("Mimi tensor '%s' must have an even kernel, got %lld", up->name, (long long) up->ne[0]);
    a.latent_stride = up->ne[0] / 2;
    a.up_w = m.get("mimi.upsample.conv3.weight", {2 * a.latent_stride, 1, a.dim}); // depthwise only
    need_float(a.up_w);
    bind_conv(m, a.down, "mimi.downsample.conv3", a.dim, a.latent_stride, false);
    if (a.down.k != 2 * a.latent_stride || a.down.out != a.dim) {
        csm_fail("Mimi downsample conv has shape [%lld, %lld, %lld], expected [%lld, %lld, %lld]", (long long) a.down.k,
                 (long long) a.down.in, (long long) a.down.out, (long long) (2 * a.latent_stride), (long long) a.dim, (long long) a.dim);
    }

    // SEANet decoder: model.0 conv; stage i: ELU (3i+1), ConvTranspose (3i+2), residual block (3i+3);
    // ELU, last conv (3n+2).
    const std::string dec = "mimi.decoder.model.";
    bind_conv(m, a.dec.first, dec + "0.conv2", a.dim, 1);
    int64_t ch = a.dec.first.out;
    for (int i = 0; i < MAX_STAGES && m.find(dec + std::to_string(3 * i + 3) + ".blk1.weight"); i++) {
        mimi_stage st;
        bind_convtr(m, st.up, dec + std::to_string(3 * i + 2) + ".conv2", ch);
        st.ratio = st.up.stride;
        ch = st.up.out;
        bind_res(m, st.res, dec + std::to_string(3 * i + 3), ch);
        a.dec.stages.push_back(st);
    }
    const int nd = (int) a.dec.stages.size();
    if (nd == 0) csm_fail("Mimi decoder has no up-sampling stage ('%s3.blk1.weight' is missing)", dec.c_str());
    bind_conv(m, a.dec.last, dec + std::to_string(3 * nd + 2) + ".conv2", ch, 1);
    if (a.dec.last.out != 1) csm_fail("Mimi decoder's last conv has %lld output channels, expected 1 (mono)", (long long) a.dec.last.out);

    // SEANet encoder: model.0 conv; stage i: residual block (3i+1), ELU (3i+2), strided conv (3i+3);
    // ELU, last conv (3n+2).
    const std::string enc = "mimi.encoder.model.";
    bind_conv(m, a.enc.first, enc + "0.conv2", 1, 1);
    ch = a.enc.first.out;
    for (int i = 0; i < MAX_STAGES && m.find(enc + std::to_string(3 * i + 1) + ".blk1.weight"); i++) {
        mimi_stage st;
        bind_res(m, st.res, enc + std::to_string(3 * i + 1), ch);
        bind_conv(m, st.down, enc + std::to_string(3 * i + 3) + ".conv2", ch, 0);
        st.ratio = st.down.stride;
        ch = st.down.out;
        a.enc.stages.push_back(st);
    }
    const int ne = (int) a.enc.stages.size();
    bind_conv(m, a.enc.last, enc + std::to_string(3 * ne + 2) + ".conv2", ch, 1);
    if (a.enc.last.out != a.dim) {
        csm_fail("Mimi encoder's last conv has %lld output channels, expected csm.mimi.dim = %lld", (long long) a.enc.last.out, (long long) a.dim);
    }
    if (ne != nd) csm_fail("Mimi encoder has %d stages but the decoder has %d", ne, nd);
    int64_t hop = a.latent_stride;
    for (int i = 0; i < nd; i++) {
        if (a.enc.stages[i].ratio != a.dec.stages[nd - 1 - i].ratio) {
            csm_fail("Mimi encoder stride %lld (stage %d) differs from the decoder's mirrored stride %lld", (long long) a.enc.stages[i].ratio,
                     i, (long long) a.dec.stages[nd - 1 - i].ratio);
        }
        hop *= a.dec.stages[i].ratio;
    }
    a.samples_per_frame = hop;
    if (hop != h.samples_per_frame) {
        csm_fail("Mimi strides give %lld samples per frame, the model says %d", (long long) hop, h.samples_per_frame);
    }

    bind_tfm(m, a.dec_tfm, "mimi.dec_tfm", h);
    bind_tfm(m, a.enc_tfm, "mimi.enc_tfm", h);
}

void mimi_check_tensors(const csm_model & model) {
    mimi_arch a;
    mimi_bind(model, a);
}

int64_t mimi_chunk_frames(const mimi_arch & a) { return std::max<int64_t>(1, 50 / a.latent_stride); }

int64_t mimi_encoded_frames(const mimi_arch & a, int64_t n) {
    for (const mimi_stage & st : a.enc.stages) n = (n + st.ratio - 1) / st.ratio;
    return (n + a.latent_stride - 1) / a.latent_stride;
}

// ---------------------------------------------------------------------------------------------
// runner: backend, prepared weights, state
// ---------------------------------------------------------------------------------------------

mimi_graph::~mimi_graph() {
    if (ctx) ggml_free(ctx);
}

namespace {

// Copies to make once: dst = op(src) where op permutes / converts.
struct prep_item {
    enum kind_t { CONV, CONVTR, UPSAMPLE, NORMS } kind;
    ggml_tensor * src;
    ggml_tensor * dst;
};

struct prep_plan {
    ggml_context * ctx = nullptr;
    std::vector<prep_item> items;

    ggml_tensor * add(prep_item::kind_t kind, ggml_tensor * src, ggml_type type, int64_t ne0, int64_t ne1,
                      int64_t ne2 = 1) {
        ggml_tensor * t = ggml_new_tensor_3d(ctx, type, ne0, ne1, ne2);
        items.push_back({kind, src, t});
        return t;
    }
    void conv(mimi_conv & c) {
        if (c.k == 1) {
            c.wp = c.w;  // [1, in, out] is already input-channel fastest
        } else {
            c.wp = add(prep_item::CONV, c.w, c.w->type, c.in, c.k, c.out);
        }
    }
    void convtr(mimi_convtr & c) { c.wp = add(prep_item::CONVTR, c.w, c.w->type, c.in, c.out, c.k); }
    void res(mimi_resblock & r) {
        conv(r.c1);
        conv(r.c2);
    }
};

} // namespace

// dst = src with its three axes reordered: dst axis j is src axis perm[j] (host memory). The dst
// rows are filled 16 elements at a time so that the strided reads of a tile share cache lines.
template <typename T> static void permute_host(const T * src, T * dst, const int64_t ne[3], const int perm[3]) {
    const int64_t sb[3] = {1, ne[0], ne[0] * ne[1]};                    // src strides per src axis
    const int64_t dn[3] = {ne[perm[0]], ne[perm[1]], ne[perm[2]]};      // dst extents
    const int64_t ds[3] = {sb[perm[0]], sb[perm[1]], sb[perm[2]]};      // src stride per dst axis
    const int64_t TILE = 16;
    for (int64_t b0 = 0; b0 < dn[0]; b0 += TILE) {
        const int64_t e0 = std::min(dn[0], b0 + TILE);
        for (int64_t i2 = 0; i2 < dn[2]; i2++) {
            for (int64_t i1 = 0; i1 < dn[1]; i1++) {
                const T * s = src + i2 * ds[2] + i1 * ds[1];
                T * d = dst + (i2 * dn[1] + i1) * dn[0];
                for (int64_t i0 = b0; i0 < e0; i0++) d[i0] = s[i0 * ds[0]];
            }
        }
    }
}

// Packs a prepared convolution matrix (wp read as rows x cols F16, row-major) for pycsm's kernel
// when the CPU runs one and the matrix suits it; else leaves it to ggml.
static void pack_conv(mimi_runner & r, const ggml_tensor * wp, int64_t rows, int64_t cols) {
    const csm_kernel * k = r.model->kernel;
    if (!r.cpu || !k || !k->gemm[CSM_WFMT_F16] || wp->type != GGML_TYPE_F16 || cols % 16 != 0 ||
        !ggml_is_contiguous(wp) || ggml_nelements(wp) != rows * cols || !wp->buffer ||
        !ggml_backend_buffer_is_host(wp->buffer) || r.packed.count(wp)) {
        return;
    }
    r.packed[wp] = csm_pack_f16(k, (const uint16_t *) wp->data, rows, cols);
}

// Packs a transformer matrix of the file (Q8_0, Q4_K or F16) for pycsm's kernel when the CPU runs
// one with its format; else leaves it to ggml.
static void pack_matrix(mimi_runner & r, const ggml_tensor * w) {
    const csm_kernel * k = r.model->kernel;
    if (!r.cpu || !k || !csm_packable(k, w) || !w->buffer || !ggml_backend_buffer_is_host(w->buffer) ||
        r.packed.count(w)) {
        return;
    }
    r.packed[w] = csm_pack(k, w);
}

// The weight products the runner can hand to pycsm's kernel: the SEANet's convolutions and the
// transformer's matrices.
static void pack_products(mimi_runner & r, mimi_seanet & sn, const mimi_tfm & tfm, bool enc) {
    auto conv = [&](const mimi_conv & c) { pack_conv(r, c.wp, c.out, c.in * c.k); };
    conv(sn.first);
    for (const mimi_stage & st : sn.stages) {
        if (enc) {
            conv(st.down);
        } else {
            pack_conv(r, st.up.wp, st.up.out * st.up.k, st.up.in);
        }
        conv(st.res.c1);
        conv(st.res.c2);
    }
    conv(sn.last);
    if (enc) conv(r.arch.down);
    const size_t n_convs = r.packed.size();
    for (const mimi_tfm_layer & l : tfm.layers) {
        pack_matrix(r, l.qkv);
        pack_matrix(r, l.out);
        pack_matrix(r, l.up);
        pack_matrix(r, l.down);
    }
    if (!r.packed.empty()) {
        csm_log(CSM_LOG_DEBUG, "Mimi %s: %zu convolutions and %zu transformer matrices packed for pycsm's %s kernel",
                enc ? "encoder" : "decoder", n_convs, r.packed.size() - n_convs, r.model->kernel->isa);
    }
}

static ggml_tensor * state(ggml_context * ctx, int64_t rows, int64_t cols, int32_t n_slots) {
    if (cols <= 0) return nullptr;
    return ggml_new_tensor_3d(ctx, GGML_TYPE_F32, rows, cols, n_slots);
}

static void conv_state(ggml_context * ctx, mimi_conv & c, int32_t n_slots) {
    c.tail = state(ctx, c.in, c.k - c.stride, n_slots);
}

void mimi_runner::init(const csm_model * m, int32_t n_threads, bool enc, int32_t slots) {
    model_ref.reset(m);
    model = m;
    encoder = enc;
    if (slots < 1 || (enc && slots != 1)) csm_fail("internal error: %d Mimi slots", slots);
    n_slots = slots;
    mimi_bind(*m, arch);
    // the default count (n_threads <= 0) adapts to other processes' load (csm_thread_pools)
    csm_backend_init(m, csm_default_threads(n_threads), n_threads <= 0, &backend, pools);
    cpu = ggml_backend_is_cpu(backend);
    mimi_arch & a = arch;

    // prepared weights: permuted convolution kernels, f32 upsample taps, codebook norms
    prep_plan plan;
    // prepared tensors: at most 4 per SEANet stage, the first/last/down convolutions, the upsampling
    // taps, one norm per codebook
    const size_t n_prep = 16 + 4 * std::max(a.dec.stages.size(), a.enc.stages.size()) + (size_t) a.n_q;
    ggml_init_params ip = {n_prep * ggml_tensor_overhead(), nullptr, true};
    ctx_prep = plan.ctx = ggml_init(ip);
    if (!ctx_prep) csm_fail("out of memory");
    mimi_seanet & sn = enc ? a.enc : a.dec;
    plan.conv(sn.first);
    for (mimi_stage & st : sn.stages) {
        if (enc) {
            plan.res(st.res);
            plan.conv(st.down);
        } else {
            plan.convtr(st.up);
            plan.res(st.res);
        }
    }
    plan.conv(sn.last);
    if (enc) {
        plan.conv(a.down);
        for (mimi_rvq * q : {&a.rvq_sem, &a.rvq_ac}) {
            for (ggml_tensor * b : q->books) q->norms.push_back(plan.add(prep_item::NORMS, b, GGML_TYPE_F32, a.cb_size, 1));
        }
    } else {
        a.up_wp = plan.add(prep_item::UPSAMPLE, a.up_w, GGML_TYPE_F32, a.dim, 2 * a.latent_stride);
    }
    buf_prep = ggml_backend_alloc_ctx_tensors(ctx_prep, backend);
    if (!buf_prep) csm_fail("cannot allocate the Mimi codec's prepared weights");

    {
        const size_t n_nodes = 8 * plan.items.size() + 16;
        ggml_init_params gp = {n_nodes * ggml_tensor_overhead() + ggml_graph_overhead_custom(n_nodes, false), nullptr, true};
        ggml_context * ctx = ggml_init(gp);
        if (!ctx) csm_fail("out of memory");
        ggml_cgraph * gf = ggml_new_graph_custom(ctx, n_nodes, false);
        ggml_tensor * rows = nullptr;
        const bool host = ggml_backend_buffer_is_host(buf_prep);
        for (const prep_item & it : plan.items) {
            // kernel permutations of host weights: a plain loop (ggml copies such views element by element)
            const bool conv_kind = it.kind == prep_item::CONV || it.kind == prep_item::CONVTR;
            if (conv_kind && host && it.src->buffer && ggml_backend_buffer_is_host(it.src->buffer) &&
                ggml_is_contiguous(it.src) && it.src->type == it.dst->type) {
                static const int p_conv[3] = {1, 0, 2}, p_convtr[3] = {2, 1, 0};
                const int * perm = it.kind == prep_item::CONV ? p_conv : p_convtr;
                if (ggml_element_size(it.src) == 4) {
                    permute_host((const uint32_t *) it.src->data, (uint32_t *) it.dst->data, it.src->ne, perm);
                } else {
                    permute_host((const uint16_t *) it.src->data, (uint16_t *) it.dst->data, it.src->ne, perm);
                }
                continue;
            }
            ggml_tensor * v = nullptr;
            switch (it.kind) {
                case prep_item::CONV:     // [k, in, out] -> [in, k, out]
                    v = ggml_permute(ctx, it.src, 1, 0, 2, 3);
                    break;
                case prep_item::CONVTR:   // [k, out, in] -> [in, out, k]
                    v = ggml_permute(ctx, it.src, 2, 1, 0, 3);
                    break;
                case prep_item::UPSAMPLE: // [k, 1, dim] -> [dim, k]
                    v = ggml_transpose(ctx, ggml_reshape_2d(ctx, it.src, it.src->ne[0], it.src->ne[2]));
                    break;
                case prep_item::NORMS: {  // squared norm of every codebook row (get_rows dequantises any type)
                    if (!rows) {
                        rows = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, a.cb_size);
                        ggml_set_input(rows);
                    }
                    ggml_tensor * e = ggml_get_rows(ctx, it.src, rows);
                    v = ggml_sum_rows(ctx, ggml_sqr(ctx, e));
                    break;
                }
            }
            ggml_build_forward_expand(gf, ggml_cpy(ctx, v, it.dst));
        }
        ggml_gallocr_t ga = ggml_gallocr_new(ggml_backend_get_default_buffer_type(backend));
        bool ok = ga && ggml_gallocr_alloc_graph(ga, gf);
        if (ok && rows) {
            std::vector<int32_t> idx(a.cb_size);
            for (int64_t i = 0; i < a.cb_size; i++) idx[i] = (int32_t) i;
            ggml_backend_tensor_set(rows, idx.data(), 0, idx.size() * sizeof(int32_t));
        }
        ggml_status st = ok ? ggml_backend_graph_compute(backend, gf) : GGML_STATUS_ALLOC_FAILED;
        if (ga) ggml_gallocr_free(ga);
        ggml_free(ctx);
        if (st != GGML_STATUS_SUCCESS) csm_fail("preparing the Mimi weights failed (status %d)", (int) st);
    }

    pack_products(*this, sn, enc ? a.enc_tfm : a.dec_tfm, enc);

    // streaming state
    // state tensors: 3 per SEANet stage, 2 per transformer layer, a few more
    const size_t n_state = 16 + 3 * sn.stages.size() + 2 * (enc ? a.enc_tfm : a.dec_tfm).layers.size();
    ggml_init_params sp = {n_state * ggml_tensor_overhead(), nullptr, true};
    ctx_state = ggml_init(sp);
    if (!ctx_state) csm_fail("out of memory");
    conv_state(ctx_state, sn.first, slots);
    for (mimi_stage & st : sn.stages) {
        conv_state(ctx_state, st.res.c1, slots);
        conv_state(ctx_state, st.res.c2, slots);
        if (enc) {
            conv_state(ctx_state, st.down, slots);
        } else {
            st.up.tail = state(ctx_state, st.up.out * st.up.stride, 1, slots);
        }
    }
    conv_state(ctx_state, sn.last, slots);
    mimi_tfm & t = enc ? a.enc_tfm : a.dec_tfm;
    t.ring = MIMI_WINDOW - 1 + mimi_chunk_frames(a) * a.latent_stride;  // a chunk's transformer positions at most
    for (mimi_tfm_layer & l : t.layers) {
        l.k_cache = state(ctx_state, t.dim, t.ring, slots);
        // on the CPU a slot's values are held transposed, [channel][ring row], as attention reads them
        l.v_cache = cpu ? state(ctx_state, t.ring, t.dim, slots) : state(ctx_state, t.dim, t.ring, slots);
    }
    if (enc) {
        conv_state(ctx_state, a.down, slots);
    } else {
        a.up_tail = state(ctx_state, a.dim, 1, slots);
    }
    buf_state = ggml_backend_alloc_ctx_tensors(ctx_state, backend);
    if (!buf_state) csm_fail("cannot allocate the Mimi codec's state");

    alloc = ggml_gallocr_new(ggml_backend_get_default_buffer_type(backend));
    if (!alloc) csm_fail("out of memory creating a graph allocator");
    reset();
    csm_log(CSM_LOG_DEBUG, "Mimi %s: prepared weights %.1f MiB, state %.1f MiB", enc ? "encoder" : "decoder",
            ggml_backend_buffer_get_size(buf_prep) / 1048576.0, ggml_backend_buffer_get_size(buf_state) / 1048576.0);
}

mimi_runner::~mimi_runner() {
    graph.reset();
    if (alloc) ggml_gallocr_free(alloc);
    if (buf_state) ggml_backend_buffer_free(buf_state);
    if (ctx_state) ggml_free(ctx_state);
    if (buf_prep) ggml_backend_buffer_free(buf_prep);
    if (ctx_prep) ggml_free(ctx_prep);
    if (backend) ggml_backend_free(backend);
}

void mimi_runner::reset() {
    ggml_backend_buffer_clear(buf_state, 0);
    n_pos.assign((size_t) n_slots, 0);
}

void mimi_runner::reset_slot(int32_t slot) {
    for (ggml_tensor * t = ggml_get_first_tensor(ctx_state); t; t = ggml_get_next_tensor(ctx_state, t)) {
        ggml_backend_tensor_memset(t, 0, slot * t->nb[2], t->nb[2]);
    }
    n_pos[(size_t) slot] = 0;
}
