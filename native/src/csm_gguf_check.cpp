// csm_gguf_check.cpp - bounded GGUF header scan (see csm_gguf_check.h).
#include "csm_gguf_check.h"

#include "csm_log.h"
#include "csm_platform.h"

#include "ggml-cpu.h"
#include "gguf.h"

#include <cerrno>
#include <cstring>
#include <vector>


namespace {

// Sequential reader over pread with a small window; never reads past file_size.
struct hreader {
    int fd;
    uint64_t size;
    const char * path;
    uint64_t pos = 0;
    std::vector<unsigned char> buf = std::vector<unsigned char>(1 << 16);
    uint64_t buf_start = 0, buf_len = 0;

    uint64_t remain() const { return size - pos; }

    [[noreturn]] void truncated(const char * what) {
        csm_fail("'%s' is a corrupt or truncated GGUF file: the header ends inside %s (offset %llu of %llu bytes)",
                 path, what, (unsigned long long) pos, (unsigned long long) size);
    }

    void read(void * dst, size_t n, const char * what) {
        if (n > remain()) truncated(what);
        unsigned char * out = static_cast<unsigned char *>(dst);
        while (n > 0) {
            if (pos < buf_start || pos >= buf_start + buf_len) {
                const size_t want = (size_t) std::min<uint64_t>(buf.size(), size - pos);
                int64_t r = csm_os_pread(fd, buf.data(), want, pos);
                if (r <= 0) csm_fail("reading the header of '%s' failed: %s", path, r < 0 ? strerror(errno) : "end of file");
                buf_start = pos;
                buf_len = (uint64_t) r;
            }
            const size_t k = (size_t) std::min<uint64_t>(n, buf_start + buf_len - pos);
            memcpy(out, buf.data() + (pos - buf_start), k);
            out += k;
            pos += k;
            n -= k;
        }
    }

    void skip(uint64_t n, const char * what) {
        if (n > remain()) truncated(what);
        pos += n;
    }

    template <typename T> T get(const char * what) {
        T v;
        read(&v, sizeof(v), what);
        return v;
    }
};

size_t scalar_size(int32_t t) {
    switch (t) {
        case GGUF_TYPE_UINT8: case GGUF_TYPE_INT8: case GGUF_TYPE_BOOL: return 1;
        case GGUF_TYPE_UINT16: case GGUF_TYPE_INT16: return 2;
        case GGUF_TYPE_UINT32: case GGUF_TYPE_INT32: case GGUF_TYPE_FLOAT32: return 4;
        case GGUF_TYPE_UINT64: case GGUF_TYPE_INT64: case GGUF_TYPE_FLOAT64: return 8;
        default: return 0;
    }
}

std::string printable(const std::string & s) {
    std::string out;
    for (unsigned char c : s.substr(0, 64)) out += (c >= 32 && c < 127 && c != '\'') ? (char) c : '?';
    return s.size() > 64 ? out + "..." : out;
}

} // namespace

void csm_gguf_precheck(int fd, size_t file_size, const char * path, const csm_gguf_limits & L) {
    hreader r{fd, (uint64_t) file_size, path};
    char magic[4];
    r.read(magic, 4, "the magic");
    if (memcmp(magic, "GGUF", 4) != 0) csm_fail("'%s' is not a GGUF file (bad magic)", path);
    const uint32_t version = r.get<uint32_t>("the version");
    if (version < 2 || version > 3) {
        csm_fail("'%s' is a corrupt GGUF file or of an unsupported GGUF version (%u; supported: 2 and 3)", path, version);
    }
    const uint64_t n_tensors = r.get<uint64_t>("the tensor count");
    const uint64_t n_kv = r.get<uint64_t>("the key count");
    if (n_kv > L.max_kv) {
        csm_fail("'%s' is a corrupt GGUF file: %llu key/value pairs, more than the %llu a CSM file may have", path,
                 (unsigned long long) n_kv, (unsigned long long) L.max_kv);
    }
    if (n_tensors > L.max_tensors) {
        csm_fail("'%s' is a corrupt GGUF file: %llu tensors, more than the %llu a CSM file may have", path,
                 (unsigned long long) n_tensors, (unsigned long long) L.max_tensors);
    }

    std::string key;
    for (uint64_t i = 0; i < n_kv; i++) {
        const uint64_t klen = r.get<uint64_t>("a key length");
        if (klen == 0 || klen > L.max_key_len) {
            csm_fail("'%s' is a corrupt GGUF file: key %llu has length %llu (allowed: 1 to %llu bytes)", path,
                     (unsigned long long) i, (unsigned long long) klen, (unsigned long long) L.max_key_len);
        }
        key.resize((size_t) klen);
        r.read(&key[0], (size_t) klen, "a key");
        int32_t type = r.get<int32_t>("a value type");
        uint64_t n = 1;
        const bool is_array = type == GGUF_TYPE_ARRAY;
        if (is_array) {
            type = r.get<int32_t>("an array type");
            n = r.get<uint64_t>("an array length");
        }
        if (type == GGUF_TYPE_STRING) {
            if (n > r.remain() / 8) {
                csm_fail("'%s' is a corrupt GGUF file: key '%s' claims %llu strings, more than the file holds", path,
                         printable(key).c_str(), (unsigned long long) n);
            }
            for (uint64_t j = 0; j < n; j++) {
                const uint64_t len = r.get<uint64_t>("a string length");
                if (len > L.max_string) {
                    csm_fail("'%s' is a corrupt GGUF file: a string of key '%s' is %llu bytes long (at most %llu)", path,
                             printable(key).c_str(), (unsigned long long) len, (unsigned long long) L.max_string);
                }
                r.skip(len, "a string");
            }
        } else {
            const size_t es = scalar_size(type);
            if (es == 0) {
                csm_fail("'%s' is a corrupt GGUF file: key '%s' has the unknown value type %d", path,
                         printable(key).c_str(), (int) type);
            }
            if (n > r.remain() / es) {
                csm_fail("'%s' is a corrupt GGUF file: key '%s' claims %llu values, more than the file holds", path,
                         printable(key).c_str(), (unsigned long long) n);
            }
            r.skip(n * es, "a value");
        }
    }

    std::string name;
    for (uint64_t i = 0; i < n_tensors; i++) {
        const uint64_t nlen = r.get<uint64_t>("a tensor name length");
        if (nlen > L.max_name_len) {
            csm_fail("'%s' is a corrupt GGUF file: the name of tensor %llu is %llu bytes long (at most %llu)", path,
                     (unsigned long long) i, (unsigned long long) nlen, (unsigned long long) L.max_name_len);
        }
        name.resize((size_t) nlen);
        if (nlen) r.read(&name[0], (size_t) nlen, "a tensor name");
        const uint32_t n_dims = r.get<uint32_t>("a tensor's dimension count");
        if (n_dims > GGML_MAX_DIMS) {
            csm_fail("'%s' is a corrupt GGUF file: tensor '%s' has %u dimensions (at most %d)", path,
                     printable(name).c_str(), n_dims, GGML_MAX_DIMS);
        }
        int64_t ne[GGML_MAX_DIMS] = {1, 1, 1, 1};
        for (uint32_t j = 0; j < n_dims; j++) ne[j] = r.get<int64_t>("a tensor shape");
        // A CSM weight never has an empty dimension; code dividing by ne[0] must never see one.
        uint64_t total = 1;
        for (int j = 0; j < GGML_MAX_DIMS; j++) {
            if (ne[j] <= 0) {
                csm_fail("'%s' is a corrupt GGUF file: tensor '%s' has dimension %d of size %lld", path,
                         printable(name).c_str(), j, (long long) ne[j]);
            }
            if ((uint64_t) ne[j] > (uint64_t) INT64_MAX / total) {
                csm_fail("'%s' is a corrupt GGUF file: tensor '%s' has too many elements", path, printable(name).c_str());
            }
            total *= (uint64_t) ne[j];
        }
        const int32_t type = r.get<int32_t>("a tensor type");
        if (type < 0 || type >= GGML_TYPE_COUNT || ggml_blck_size((ggml_type) type) <= 0 ||
            ggml_type_size((ggml_type) type) == 0) {
            csm_fail("'%s' is a corrupt GGUF file: tensor '%s' has the unknown or removed ggml type %d", path,
                     printable(name).c_str(), (int) type);
        }
        r.get<uint64_t>("a tensor offset");
    }
}

void csm_gguf_precheck_path(const char * path, const csm_gguf_limits & limits) {
    if (!path) csm_fail("no path given");
    // as the loader: a FIFO must not block the open (stat first, then O_NONBLOCK and fstat)
    if (csm_os_is_regular_path(path) == 0) csm_fail("'%s' is not a regular file", path);
    const int fd = csm_os_open_read(path);
    if (fd < 0) csm_fail("cannot open '%s': %s", path, strerror(errno));
    const int64_t size = csm_os_regular_file_size(fd);
    if (size < 0) {
        csm_os_close(fd);
        csm_fail("'%s' is not a regular file", path);
    }
    try {
        csm_gguf_precheck(fd, (size_t) size, path, limits);
    } catch (...) {
        csm_os_close(fd);
        throw;
    }
    csm_os_close(fd);
}

bool csm_weight_type_ok(ggml_type t) {
    if (t == GGML_TYPE_F32 || t == GGML_TYPE_F16 || t == GGML_TYPE_BF16) return true;
    if ((int) t < 0 || (int) t >= GGML_TYPE_COUNT || !ggml_is_quantized(t)) return false;
    const ggml_type_traits * tr = ggml_get_type_traits(t);
    const ggml_type_traits_cpu * tc = ggml_get_type_traits_cpu(t);
    return tr && tr->to_float && tc && tc->vec_dot;
}
