// csm_ref.h - reference counts of the library's handles: an object in use is never freed.
//
// The rule, for every handle type (csm_model, csm_context, csm_mimi_codec and any later one):
//   - a handle is created with one reference, its caller's; `*_free` drops that reference;
//   - an object that depends on another holds a reference to it for its whole life (a context and
//     a Mimi runner hold their model);
//   - every C entry point holds a reference on each handle it was given for as long as it runs
//     (`csm_hold` at the top of the call, inside csm_guard).
// The object is deleted when its last reference goes. So `*_free` (which returns void) never frees
// under a running call: a free from another thread, or from a callback of that very call, takes
// effect when the call returns; freeing a model while contexts or codecs made from it live ends only
// the caller's use of the handle.
//
// To make a type count references: derive it from csm_refcounted, create it with new, free it with
// csm_release (never delete). Deleting happens on whichever thread drops the last reference.
//
// What it cannot cover: a call that starts after the free has returned and dropped the last
// reference (use after free, the caller's bug as with free()). pycsm's Python wrappers order their
// own calls and closes so that this does not happen (pycsm/_handle.py).
#pragma once

#include <atomic>
#include <cstdint>

struct csm_refcounted {
    mutable std::atomic<int32_t> refs{1};
};

template <typename T> T * csm_retain(T * p) {
    if (p) p->refs.fetch_add(1, std::memory_order_relaxed);
    return p;
}

// Drops one reference; deletes the object with the last one.
template <typename T> void csm_release(T * p) {
    if (p && p->refs.fetch_sub(1, std::memory_order_acq_rel) == 1) delete p;
}

// unique_ptr deleter for an owned reference: std::unique_ptr<csm_context, csm_releaser>.
struct csm_releaser {
    template <typename T> void operator()(T * p) const { csm_release(p); }
};

// A reference held for one scope (an API call, or a member for an object's life).
template <typename T> class csm_hold {
public:
    explicit csm_hold(T * p = nullptr) : p_(csm_retain(p)) {}
    csm_hold(const csm_hold &) = delete;
    csm_hold & operator=(const csm_hold &) = delete;
    ~csm_hold() { csm_release(p_); }
    void reset(T * p) {
        csm_retain(p);
        csm_release(p_);
        p_ = p;
    }
    T * get() const { return p_; }

private:
    T * p_;
};
