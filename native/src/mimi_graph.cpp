// mimi_graph.cpp - ggml graphs of the Mimi decoder (codes -> PCM) and encoder (PCM -> codes), one
// chunk at a time, with the streaming state read at the start of a graph and rewritten at its end.
#include "mimi.h"

#include "csm_log.h"
#include "csm_ops.h"
#include "kernels/kernel.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

// Nodes (and tensors) of a chunk's graph, from the sizes the file sets: about 40 per transformer
// layer, 6 per step of the latent upsampling (latent_stride steps), a few per codebook and SEANet
// stage. A fixed 8192 aborted in ggml_new_tensor from 200 layers or a latent stride of 1920.
size_t mimi_graph_nodes(const mimi_arch & a) {
    const size_t layers = std::max(a.dec_tfm.layers.size(), a.enc_tfm.layers.size());
    const size_t stages = std::max(a.dec.stages.size(), a.enc.stages.size());
    return 1024 + 64 * layers + 8 * (size_t) a.latent_stride + 16 * (size_t) a.n_q + 64 * stages;
}

namespace {

struct builder {
    ggml_context * ctx;
    ggml_cgraph * gf;
    bool cpu;
    std::vector<int32_t> slots;  // lane i runs the state of slots[i]
    const mimi_runner * r;
    mimi_graph * g;              // the graph built (its slots and kernel outlive the build)
};

// wp read as a [cols, rows] matrix times x [cols, n, lanes] (for F16 its columns may overlap):
// pycsm's kernel when the runner packed wp, else ggml_mul_mat. Result [rows, n, lanes].
ggml_tensor * weight_product(builder & b, ggml_tensor * wp, int64_t cols, int64_t rows, ggml_tensor * x) {
    auto it = b.r->packed.find(wp);
    if (it != b.r->packed.end()) return csm_mul_mat_packed(b.ctx, it->second.get(), x);
    return ggml_mul_mat(b.ctx, ggml_reshape_2d(b.ctx, wp, cols, rows), x);
}

// w x for a transformer matrix w of the file and x [w->ne[0], T, lanes] (contiguous).
ggml_tensor * matrix_product(builder & b, ggml_tensor * w, ggml_tensor * x) {
    return weight_product(b, w, w->ne[0], w->ne[1], x);
}

} // namespace

// The state of slots [s0, s0 + n) of a state tensor [rows, cols, n_slots].
static ggml_tensor * slot_view(ggml_context * ctx, ggml_tensor * st, int32_t s0, int64_t n) {
    return ggml_view_3d(ctx, st, st->ne[0], st->ne[1], n, st->nb[1], st->nb[2], st->nb[2] * s0);
}

// [tail | x] along time, lane by lane (x [C, T, lanes], lane i reading slot slots[i] of tail);
// schedules the rewrite of each lane's slot with its last tail->ne[1] columns. Consecutive slots in
// consecutive lanes are read and written as one block (the usual case: streams take the lowest free
// slot).
static ggml_tensor * with_tail(builder & b, ggml_tensor * tail, ggml_tensor * x) {
    if (!tail) return x;
    const int32_t * slots = b.slots.data();
    const int64_t lanes = (int64_t) b.slots.size();
    std::vector<std::pair<int64_t, int64_t>> runs;  // (first lane, lanes) of consecutive slots
    for (int64_t i = 0; i < lanes; i++) {
        if (!runs.empty() && slots[i] == slots[runs.back().first] + runs.back().second) {
            runs.back().second++;
        } else {
            runs.push_back({i, 1});
        }
    }
    ggml_tensor * tails = nullptr;
    for (const auto & run : runs) {
        ggml_tensor * t = slot_view(b.ctx, tail, slots[run.first], run.second);
        tails = tails ? ggml_concat(b.ctx, tails, t, 2) : t;
    }
    ggml_tensor * xp = ggml_concat(b.ctx, tails, x, 1);
    const int64_t P = tail->ne[1];
    for (const auto & run : runs) {
        ggml_tensor * keep = ggml_view_3d(b.ctx, xp, xp->ne[0], P, run.second, xp->nb[1], xp->nb[2],
                                          xp->nb[2] * run.first + xp->nb[1] * (xp->ne[1] - P));
        ggml_build_forward_expand(b.gf, ggml_cpy(b.ctx, keep, slot_view(b.ctx, tail, slots[run.first], run.second)));
    }
    return xp;
}

// The [row, n, lanes] view of a contiguous tensor [C, len, lanes] whose column t of a lane starts
// t * step bytes into the lane: the columns overlap when step is shorter than a row. ggml_view_3d sizes
// a view as if it were contiguous, so the view is made one column long and then widened; each lane's
// last byte stays inside that lane.
static ggml_tensor * overlapping_view(ggml_context * ctx, ggml_tensor * x, int64_t row, int64_t n, size_t step) {
    GGML_ASSERT(ggml_is_contiguous(x) && (size_t) row * ggml_element_size(x) + (n - 1) * step <= x->nb[2]);
    ggml_tensor * v = ggml_view_3d(ctx, x, row, 1, x->ne[2], x->nb[1], x->nb[2], 0);
    v->ne[1] = n;
    v->nb[1] = step;
    v->nb[3] = v->nb[2] * v->ne[2];
    return v;
}

// Convolution over a contiguous, already padded input xp [in, len, lanes]: a matrix product with the
// overlapping view whose column t is xp[:, t*stride .. t*stride + k) (im2col without a copy).
static ggml_tensor * conv_padded(builder & b, const mimi_conv & c, ggml_tensor * xp) {
    const int64_t len = xp->ne[1];
    const int64_t T = (len - c.k) / c.stride + 1;
    ggml_tensor * y;
    if (c.k == 1 && c.stride == 1) {
        y = weight_product(b, c.wp, c.in, c.out, xp);
    } else {
        ggml_tensor * cols = overlapping_view(b.ctx, xp, c.in * c.k, T, xp->nb[1] * c.stride);
        if (!b.cpu) cols = ggml_cont(b.ctx, cols);  // other backends may want plain rows
        y = weight_product(b, c.wp, c.in * c.k, c.out, cols);
    }
    if (c.b) y = ggml_add(b.ctx, y, c.b);
    return y;
}

// The share [i0, i1) of thread ith of nth in n items.
static void share(int64_t n, int ith, int nth, int64_t & i0, int64_t & i1) {
    i0 = n * ith / nth;
    i1 = n * (ith + 1) / nth;
}

// dst [C, P + T, lanes] = per lane i [tail of slot slots[i] | f(x[:, :, i])] along time, f the
// kernel's ELU (userdata's graph kernel; f = a copy when not `elu`), and then the slot's tail
// (src[1], f32 [C, P, n_slots]) rewritten with the last P columns: with_tail(tail, csm_elu(x)) in
// one pass, the same bits. x (src[0]) is contiguous f32 [C, T, lanes]. The threads take ranges of
// time (a lane's columns are one run of floats); lane i's tail is read and rewritten by thread
// i % nth alone, from a copy of the old one and from x, so no thread waits for another.
static void tail_concat(ggml_tensor * dst, int ith, int nth, void * userdata, bool elu) {
    const mimi_graph & g = *(const mimi_graph *) userdata;
    const ggml_tensor * x = dst->src[0], * tail = dst->src[1];
    const int64_t C = x->ne[0], T = x->ne[1], lanes = x->ne[2], P = tail->ne[1];
    auto f = [&](const float * v, float * o, int64_t n) {
        if (n <= 0) return;
        if (elu) g.kernel->elu(v, o, n);
        else memcpy(o, v, (size_t) n * sizeof(float));
    };
    int64_t t0, t1;
    share(T, ith, nth, t0, t1);
    std::vector<float> old;
    for (int64_t i = 0; i < lanes; i++) {
        const float * in = (const float *) ((const char *) x->data + i * x->nb[2]);
        float * out = (float *) ((char *) dst->data + i * dst->nb[2]);
        f(in + t0 * C, out + (P + t0) * C, (t1 - t0) * C);
        if (i % nth != ith) continue;
        float * st = (float *) ((char *) tail->data + g.slots[(size_t) i] * tail->nb[2]);
        old.assign(st, st + P * C);
        memcpy(out, old.data(), (size_t) (P * C) * sizeof(float));
        // new tail column j: column T + j of [old | f(x)], i.e. old column T + j, or x column j - (P - T)
        const int64_t from_old = std::max<int64_t>(0, P - T);
        if (from_old > 0) memcpy(st, old.data() + T * C, (size_t) (from_old * C) * sizeof(float));
        f(in + (T - (P - from_old)) * C, st + from_old * C, (P - from_old) * C);
    }
}
static void tail_concat_op(ggml_tensor * dst, int ith, int nth, void * userdata) { tail_concat(dst, ith, nth, userdata, false); }
static void tail_elu_op(ggml_tensor * dst, int ith, int nth, void * userdata) { tail_concat(dst, ith, nth, userdata, true); }

// [tail | f(x)] with the tail rewritten, f the ELU when `elu`: one op on the CPU when x is
// contiguous f32 (and the kernel has the ELU, when one is wanted), else ggml's ops; the same bits.
static ggml_tensor * with_tail_of(builder & b, ggml_tensor * tail, ggml_tensor * x, bool elu) {
    const bool fused = tail && b.cpu && x->type == GGML_TYPE_F32 && ggml_is_contiguous(x) &&
                       (!elu || (b.g->kernel && b.g->kernel->elu));
    if (!fused) return with_tail(b, tail, elu ? csm_elu(b.ctx, x, b.cpu) : x);
    ggml_tensor * args[2] = {x, tail};
    return ggml_custom_4d(b.ctx, GGML_TYPE_F32, x->ne[0], tail->ne[1] + x->ne[1], x->ne[2], 1, args, 2,
                          elu ? tail_elu_op : tail_concat_op, GGML_N_TASKS_MAX, b.g);
}

// Causal conv (zero left context from the state) of f(x), f the ELU when `elu`, `extra` zero
// columns appended on the right (the reference's padding of a partial last frame).
static ggml_tensor * conv(builder & b, const mimi_conv & c, ggml_tensor * x, bool elu, int64_t extra = 0) {
    ggml_tensor * xp = with_tail_of(b, c.tail, x, elu);
    if (extra > 0) xp = ggml_pad(b.ctx, xp, 0, (int) extra, 0, 0);
    if (!ggml_is_contiguous(xp)) xp = ggml_cont(b.ctx, xp);
    return conv_padded(b, c, xp);
}

// dst [oc, s L, lanes] = the overlap-add of a transposed conv's product Y (src[0], f32 [2 oc s, L,
// lanes]) plus the bias (src[2], f32 [oc]): column m of a lane is (Y_lo[:, m] + Y_hi[:, m - 1]) + b,
// Y_hi[:, -1] the slot's tail (src[1], f32 [oc s, 1, n_slots]), which then takes Y_hi[:, L - 1]:
// convtr's concat and two adds in one pass, the same bits. The threads take ranges of columns; the
// one with column 0 reads the tails and then rewrites them (from Y).
static void overlap_add_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const mimi_graph & g = *(const mimi_graph *) userdata;
    const ggml_tensor * Y = dst->src[0], * tail = dst->src[1], * bias = dst->src[2];
    const int64_t oc = bias->ne[0], half = Y->ne[0] / 2, s = half / oc, L = Y->ne[1], lanes = Y->ne[2];
    int64_t m0, m1;
    share(L, ith, nth, m0, m1);
    if (m0 >= m1) return;
    const float * bv = (const float *) bias->data;
    for (int64_t i = 0; i < lanes; i++) {
        float * st = (float *) ((char *) tail->data + g.slots[(size_t) i] * tail->nb[2]);
        const char * y = (const char *) Y->data + i * Y->nb[2];
        float * out = (float *) ((char *) dst->data + i * dst->nb[2]);
        for (int64_t m = m0; m < m1; m++) {
            const float * lo = (const float *) (y + m * Y->nb[1]);
            const float * hi = m ? (const float *) (y + (m - 1) * Y->nb[1]) + half : st;
            float * o = out + m * half;
            for (int64_t j = 0; j < s; j++)
                for (int64_t c = 0; c < oc; c++) o[j * oc + c] = (lo[j * oc + c] + hi[j * oc + c]) + bv[c];
        }
        if (m0 == 0) memcpy(st, (const float *) (y + (L - 1) * Y->nb[1]) + half, (size_t) half * sizeof(float));
    }
}

// Causal ConvTranspose1d, kernel 2s, stride s, right trim s: out[:, m*s + r] =
// W_r^T x[:, m] + W_{r+s}^T x[:, m-1] + bias; the x[:, -1] part comes from the state.
static ggml_tensor * convtr(builder & b, const mimi_convtr & c, ggml_tensor * x) {
    const int64_t s = c.stride, oc = c.out, L = x->ne[1], lanes = x->ne[2];
    ggml_tensor * Y = weight_product(b, c.wp, c.in, oc * c.k, x);                           // [oc*2s, L, lanes]
    if (b.cpu && c.k == 2 * s && Y->type == GGML_TYPE_F32 && ggml_is_contiguous(Y) && c.b && c.b->type == GGML_TYPE_F32 &&
        c.b->ne[0] == oc && ggml_nelements(c.b) == oc && c.tail && ggml_nelements(c.tail) == oc * s * c.tail->ne[2]) {
        ggml_tensor * args[3] = {Y, c.tail, c.b};
        return ggml_custom_4d(b.ctx, GGML_TYPE_F32, oc, s * L, lanes, 1, args, 3, overlap_add_op, GGML_N_TASKS_MAX, b.g);
    }
    ggml_tensor * lo = ggml_view_3d(b.ctx, Y, oc * s, L, lanes, Y->nb[1], Y->nb[2], 0);
    ggml_tensor * hi = ggml_view_3d(b.ctx, Y, oc * s, L, lanes, Y->nb[1], Y->nb[2], oc * s * ggml_element_size(Y));
    ggml_tensor * hp = with_tail(b, c.tail, hi);                                            // [oc*s, L+1, lanes]
    ggml_tensor * y = ggml_add(b.ctx, lo, ggml_view_3d(b.ctx, hp, oc * s, L, lanes, hp->nb[1], hp->nb[2], 0));
    y = ggml_reshape_3d(b.ctx, y, oc, s * L, lanes);
    return ggml_add(b.ctx, y, c.b);
}

static ggml_tensor * resblock(builder & b, const mimi_resblock & r, ggml_tensor * x) {
    ggml_tensor * h = conv(b, r.c1, x, true);
    h = conv(b, r.c2, h, true);
    return ggml_add(b.ctx, x, h);
}

static ggml_tensor * layer_norm(builder & b, ggml_tensor * x, ggml_tensor * w, ggml_tensor * bias) {
    return ggml_add(b.ctx, ggml_mul(b.ctx, ggml_norm(b.ctx, x, 1e-5f), w), bias);
}

// Writes the chunk's values v [d, n] (rows v->nb[1] apart) into transposed key/value rings
// (dst = a, f32 [ring, d, n_slots]: value channel c of ring row j of slot s at [j, c, s]): value i
// into ring row rows[i] of the rings laid end to end (s * ring + j), as ggml_set_rows writes the
// keys. The threads take ranges of channels.
static void set_value_columns(ggml_tensor * dst, const ggml_tensor * a, const ggml_tensor * v, const ggml_tensor * rows,
                              int ith, int nth, void *) {
    const int64_t ring = a->ne[0], d = a->ne[1], n_all = ring * a->ne[2], n = v->ne[1];
    int64_t c0, c1;
    share(d, ith, nth, c0, c1);
    for (int64_t i = 0; i < n; i++) {
        const int64_t r = ((const int64_t *) rows->data)[i];
        if (r < 0 || r >= n_all) continue;  // set_attention's rows are in range; never write outside
        const float * src = (const float *) ((const char *) v->data + i * v->nb[1]);
        char * slot = (char *) dst->data + (r / ring) * dst->nb[2] + (r % ring) * sizeof(float);
        for (int64_t c = c0; c < c1; c++) *(float *) (slot + c * dst->nb[1]) = src[c];
    }
}

// Transformer over x [dim, T, lanes] with sliding-window causal attention. Each layer writes the
// chunk's keys/values into the rings of the lanes' slots (one row per position, in place: nothing
// else of a ring is copied; on the CPU the values go into a transposed ring, one column per position,
// which the product with the attention weights reads as it is), then each lane attends over its ring
// with its mask, which leaves out
// rows of positions that are not (yet or any more) in its window. The products with the weights take
// all lanes at once; attention runs per lane.
static ggml_tensor * transformer(builder & b, const mimi_tfm & t, ggml_tensor * x, ggml_tensor * pos,
                                 ggml_tensor * kv_rows, ggml_tensor * mask) {
    ggml_context * ctx = b.ctx;
    const int64_t d = t.dim, hd = t.head_dim, nh = t.n_heads, T = x->ne[1], lanes = x->ne[2];
    const int64_t n_kv = t.ring;
    if (T > n_kv - (MIMI_WINDOW - 1)) csm_fail("internal error: a chunk of %lld positions exceeds the key ring", (long long) T);
    const float scale = 1.0f / std::sqrt((float) hd);
    for (const mimi_tfm_layer & l : t.layers) {
        ggml_tensor * h = layer_norm(b, x, l.n1w, l.n1b);
        ggml_tensor * qkv = matrix_product(b, l.qkv, h);                          // [3d, T, lanes]
        const size_t es = ggml_element_size(qkv);
        // every lane's positions in a row (RoPE takes one position per index of dimension 2)
        ggml_tensor * q = ggml_view_3d(ctx, qkv, hd, nh, T * lanes, hd * es, qkv->nb[1], 0);
        ggml_tensor * k = ggml_view_3d(ctx, qkv, hd, nh, T * lanes, hd * es, qkv->nb[1], d * es);
        ggml_tensor * v = ggml_view_2d(ctx, qkv, d, T * lanes, qkv->nb[1], 2 * d * es);
        q = ggml_rope_ext(ctx, q, pos, nullptr, (int) hd, GGML_ROPE_TYPE_NEOX, 0, 10000.0f, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f);
        k = ggml_rope_ext(ctx, k, pos, nullptr, (int) hd, GGML_ROPE_TYPE_NEOX, 0, 10000.0f, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f);
        const int64_t n_rows = n_kv * l.k_cache->ne[2];
        ggml_tensor * Ks = ggml_set_rows(ctx, ggml_reshape_2d(ctx, l.k_cache, d, n_rows), ggml_reshape_2d(ctx, k, d, T * lanes), kv_rows);
        ggml_tensor * Vs = b.cpu ? ggml_map_custom3_inplace(ctx, l.v_cache, v, kv_rows, set_value_columns, GGML_N_TASKS_MAX, nullptr)
                                 : ggml_set_rows(ctx, ggml_reshape_2d(ctx, l.v_cache, d, n_rows), ggml_cont(ctx, v), kv_rows);
        ggml_tensor * o_all = nullptr;                                             // [d, T * lanes]
        for (int64_t i = 0; i < lanes; i++) {
            const size_t ring0 = Ks->nb[1] * n_kv * (size_t) b.slots[(size_t) i];
            ggml_tensor * K = ggml_view_2d(ctx, Ks, d, n_kv, Ks->nb[1], ring0);         // [d, n_kv]
            K = ggml_permute(ctx, ggml_reshape_3d(ctx, K, hd, nh, n_kv), 0, 2, 1, 3);  // [hd, n_kv, nh]
            ggml_tensor * V;                                                           // [n_kv, hd, nh]
            if (b.cpu) {  // the slot's transposed ring as it is
                V = ggml_view_3d(ctx, Vs, n_kv, hd, nh, Vs->nb[1], Vs->nb[1] * hd, Vs->nb[2] * (size_t) b.slots[(size_t) i]);
            } else {
                V = ggml_view_2d(ctx, Vs, d, n_kv, Vs->nb[1], ring0);
                V = ggml_cont(ctx, ggml_permute(ctx, ggml_reshape_3d(ctx, V, hd, nh, n_kv), 1, 2, 0, 3));
            }
            ggml_tensor * qi = ggml_view_3d(ctx, q, hd, nh, T, q->nb[1], q->nb[2], q->nb[2] * T * i);
            qi = ggml_permute(ctx, qi, 0, 2, 1, 3);                                    // [hd, T, nh]
            ggml_tensor * kq = ggml_mul_mat(ctx, K, qi);                               // [n_kv, T, nh]
            ggml_tensor * mi = ggml_view_2d(ctx, mask, mask->ne[0], T, mask->nb[1], mask->nb[2] * i);
            kq = ggml_soft_max_ext(ctx, kq, mi, scale, 0.0f);
            ggml_tensor * o = ggml_mul_mat(ctx, V, kq);                                // [hd, T, nh]
            o = ggml_reshape_2d(ctx, ggml_cont(ctx, ggml_permute(ctx, o, 0, 2, 1, 3)), d, T);
            o_all = o_all ? ggml_concat(ctx, o_all, o, 1) : o;
        }
        ggml_tensor * o = matrix_product(b, l.out, ggml_reshape_3d(ctx, o_all, d, T, lanes));
        x = ggml_add(ctx, x, ggml_mul(ctx, o, l.ls1));

        h = layer_norm(b, x, l.n2w, l.n2b);
        h = matrix_product(b, l.down, ggml_gelu_erf(ctx, matrix_product(b, l.up, h)));
        x = ggml_add(ctx, x, ggml_mul(ctx, h, l.ls2));
    }
    return x;
}

static void new_graph(mimi_runner & r, mimi_graph & g, builder & b, std::vector<int32_t> slots) {
    const size_t n = mimi_graph_nodes(r.arch) * slots.size();
    ggml_init_params ip = {n * ggml_tensor_overhead() + ggml_graph_overhead_custom(n, false), nullptr, true};
    g.ctx = ggml_init(ip);
    if (!g.ctx) csm_fail("out of memory creating a graph");
    g.gf = ggml_new_graph_custom(g.ctx, n, false);
    g.slots = slots;
    g.kernel = r.cpu ? csm_kernel_pick() : nullptr;
    b = {g.ctx, g.gf, r.cpu, std::move(slots), &r, &g};
}

static void attention_inputs(mimi_graph & g, const mimi_tfm & t, int64_t T, int64_t lanes) {
    g.T = T;
    if (t.layers.empty()) return;  // no attention: no inputs (they would stay unallocated)
    g.pos = ggml_new_tensor_1d(g.ctx, GGML_TYPE_I32, T * lanes);
    ggml_set_input(g.pos);
    g.kv_rows = ggml_new_tensor_1d(g.ctx, GGML_TYPE_I64, T * lanes);
    ggml_set_input(g.kv_rows);
    g.mask = ggml_new_tensor_3d(g.ctx, GGML_TYPE_F32, t.ring, T, lanes);
    ggml_set_input(g.mask);
}

std::unique_ptr<mimi_graph> mimi_build_decoder(mimi_runner & r, int64_t n, const std::vector<int32_t> & slots) {
    const mimi_arch & a = r.arch;
    auto g = std::make_unique<mimi_graph>();
    builder b;
    new_graph(r, *g, b, slots);
    ggml_context * ctx = b.ctx;
    const int64_t lanes = (int64_t) slots.size();

    // RVQ: sum of codebook rows, per quantizer group through its 1x1 output projection
    g->ids = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, n * lanes, a.n_q);
    ggml_set_input(g->ids);
    ggml_tensor * lat = nullptr;
    int64_t q0 = 0;
    for (const mimi_rvq * q : {&a.rvq_sem, &a.rvq_ac}) {
        ggml_tensor * sum = nullptr;
        for (size_t i = 0; i < q->books.size(); i++) {
            ggml_tensor * ids = ggml_view_1d(ctx, g->ids, n * lanes, g->ids->nb[1] * (q0 + (int64_t) i));
            ggml_tensor * e = ggml_get_rows(ctx, q->books[i], ids);            // [cb_dim, n * lanes]
            sum = sum ? ggml_add(ctx, sum, e) : e;
        }
        q0 += (int64_t) q->books.size();
        ggml_tensor * p = ggml_mul_mat(ctx, ggml_reshape_2d(ctx, q->out_proj, a.cb_dim, a.dim), sum); // [dim, n * lanes]
        lat = lat ? ggml_add(ctx, lat, p) : p;
    }
    lat = ggml_reshape_3d(ctx, lat, a.dim, n, lanes);

    // upsample: depthwise ConvTranspose1d, kernel 2s, stride s, no bias
    const int64_t s = a.latent_stride;
    ggml_tensor * xp = with_tail(b, a.up_tail, lat);                          // [dim, n+1, lanes]
    ggml_tensor * cur = ggml_view_3d(ctx, xp, a.dim, n, lanes, xp->nb[1], xp->nb[2], xp->nb[1]);
    ggml_tensor * prev = ggml_view_3d(ctx, xp, a.dim, n, lanes, xp->nb[1], xp->nb[2], 0);
    ggml_tensor * x = nullptr;
    for (int64_t j = 0; j < s; j++) {
        ggml_tensor * w0 = ggml_view_2d(ctx, a.up_wp, a.dim, 1, a.up_wp->nb[1], a.up_wp->nb[1] * j);
        ggml_tensor * w1 = ggml_view_2d(ctx, a.up_wp, a.dim, 1, a.up_wp->nb[1], a.up_wp->nb[1] * (j + s));
        ggml_tensor * o = ggml_add(ctx, ggml_mul(ctx, cur, w0), ggml_mul(ctx, prev, w1));
        o = ggml_reshape_4d(ctx, o, a.dim, 1, n, lanes);
        x = x ? ggml_concat(ctx, x, o, 1) : o;                                 // [dim, j+1, n, lanes]
    }
    x = ggml_reshape_3d(ctx, x, a.dim, s * n, lanes);

    attention_inputs(*g, a.dec_tfm, s * n, lanes);
    x = transformer(b, a.dec_tfm, x, g->pos, g->kv_rows, g->mask);

    // SEANet decoder
    x = conv(b, a.dec.first, x, false);
    for (const mimi_stage & st : a.dec.stages) {
        x = convtr(b, st.up, csm_elu(ctx, x, b.cpu));
        x = resblock(b, st.res, x);
    }
    x = conv(b, a.dec.last, x, true);                                         // [1, n * spf, lanes]
    g->pcm_out = x;
    ggml_set_output(x);
    ggml_build_forward_expand(g->gf, x);
    return g;
}

// Columns of zero padding the reference appends to a strided conv's input of length len at the end
// of the signal: up to a multiple of the stride.
static int64_t extra_padding(int64_t len, int64_t stride) { return (stride - len % stride) % stride; }

std::unique_ptr<mimi_graph> mimi_build_encoder(mimi_runner & r, int64_t n_samples, bool first, bool last) {
    const mimi_arch & a = r.arch;
    auto g = std::make_unique<mimi_graph>();
    builder b;
    new_graph(r, *g, b, {0});
    ggml_context * ctx = b.ctx;

    g->pcm_in = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 1, n_samples);
    ggml_set_input(g->pcm_in);

    // SEANet encoder
    ggml_tensor * x = conv(b, a.enc.first, g->pcm_in, false);
    for (const mimi_stage & st : a.enc.stages) {
        x = resblock(b, st.res, x);
        const int64_t len = x->ne[1];
        if (!last && len % st.ratio) csm_fail("internal error: encoder chunk not aligned to its strides");
        x = conv(b, st.down, x, true, last ? extra_padding(len, st.ratio) : 0);
    }
    x = conv(b, a.enc.last, x, true);                                         // [dim, T]

    attention_inputs(*g, a.enc_tfm, x->ne[1], 1);
    x = transformer(b, a.enc_tfm, x, g->pos, g->kv_rows, g->mask);

    // downsample: conv k 2s stride s, no bias, replicate padding (first column on the left before the
    // first chunk, last column on the right at the end)
    const mimi_conv & dc = a.down;
    const int64_t T = x->ne[1];
    const int64_t P = dc.k - dc.stride;
    ggml_tensor * xp;
    if (first) {
        ggml_tensor * col0 = ggml_view_2d(ctx, x, a.dim, 1, x->nb[1], 0);
        ggml_tensor * left = ggml_repeat_4d(ctx, col0, a.dim, P, 1, 1);
        xp = ggml_concat(ctx, left, x, 1);
        ggml_tensor * keep = ggml_view_2d(ctx, xp, a.dim, P, xp->nb[1], xp->nb[1] * (xp->ne[1] - P));
        ggml_build_forward_expand(b.gf, ggml_cpy(ctx, keep, dc.tail));
    } else {
        xp = with_tail(b, dc.tail, x);
    }
    const int64_t extra = last ? extra_padding(T, dc.stride) : 0;
    if (!last && T % dc.stride) csm_fail("internal error: encoder chunk not aligned to the downsampling");
    if (extra > 0) {
        ggml_tensor * colN = ggml_view_2d(ctx, xp, a.dim, 1, xp->nb[1], xp->nb[1] * (xp->ne[1] - 1));
        xp = ggml_concat(ctx, xp, ggml_repeat_4d(ctx, colN, a.dim, extra, 1, 1), 1);
    }
    ggml_tensor * lat = conv_padded(b, dc, xp);                                // [dim, F]

    // RVQ encode: per group, project, then for each codebook the nearest row (largest
    // 2 x.e - |e|^2) and subtract it from the residual
    for (const mimi_rvq * q : {&a.rvq_sem, &a.rvq_ac}) {
        ggml_tensor * res = ggml_mul_mat(ctx, ggml_reshape_2d(ctx, q->in_proj, a.dim, a.cb_dim), lat); // [cb_dim, F]
        for (size_t i = 0; i < q->books.size(); i++) {
            ggml_tensor * sc = ggml_mul_mat(ctx, q->books[i], res);            // [cb_size, F]
            sc = ggml_sub(ctx, ggml_scale(ctx, sc, 2.0f), q->norms[i]);
            ggml_tensor * idx = ggml_argmax(ctx, sc);                          // i32 [F]
            ggml_set_output(idx);
            ggml_build_forward_expand(g->gf, idx);
            g->codes_out.push_back(idx);
            if (i + 1 < q->books.size()) res = ggml_sub(ctx, res, ggml_get_rows(ctx, q->books[i], idx));
        }
    }
    return g;
}
