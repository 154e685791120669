// csm_gguf_check.h - a bounded scan of a GGUF header before ggml parses it, and the weight-type rule.
//
// ggml's gguf_init_from_file() checks each field, but it compares every key with every earlier key
// and every tensor name with every earlier name: a 4 MB file of 200 000 tiny keys keeps it busy for
// minutes, a 70 MB one for hours. The scan below reads the header once (linear time, no allocation
// beyond a read buffer) and rejects counts and lengths no CSM file comes near, so that ggml only
// ever sees headers it parses quickly. Everything else (types, shapes, alignment, offsets) is left
// to ggml and to the loader's own checks; the scan repeats a few of them only to give clearer
// messages and to keep zero-sized dimensions away from code that divides by ne[0].
#pragma once

#include "ggml.h"

#include <cstddef>
#include <cstdint>

struct csm_gguf_limits {
    uint64_t max_kv        = 1024;      // key/value pairs (a CSM file has about 60)
    uint64_t max_tensors   = 8192;      // tensors (CSM-1B with Mimi has about 700)
    uint64_t max_key_len   = 1024;      // bytes of one key (GGUF keys are short ASCII paths)
    uint64_t max_name_len  = 63;        // bytes of a tensor name (GGML_MAX_NAME - 1)
    uint64_t max_string    = 16u << 20; // bytes of one string value or array element
};

// Scans the GGUF header of the open regular file `fd` (file_size bytes). Throws csm_error (through
// csm_fail) naming `path` and the first problem: bad magic or version, a count or length over the
// limits or past the end of the file, an unknown value type, a tensor with more than 4 dimensions,
// a negative or zero dimension, an element count that overflows, or an unknown / removed ggml type.
void csm_gguf_precheck(int fd, size_t file_size, const char * path, const csm_gguf_limits & limits = {});

// Opens `path` and runs csm_gguf_precheck on it (for callers without an open descriptor).
void csm_gguf_precheck_path(const char * path, const csm_gguf_limits & limits = {});

// Can a tensor of this type be a weight? F32, F16, BF16, or a quantised type that ggml can both
// dequantise (to_float: row lookups, conversions) and multiply on the CPU (vec_dot). Q8_1 and Q8_K
// are quantised but have neither (they are formats for activations): a matrix of either made the
// CPU backend call a null function pointer.
bool csm_weight_type_ok(ggml_type type);
