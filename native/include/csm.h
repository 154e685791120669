// csm.h - C API of pycsm: Sesame's CSM-1B text-to-speech on ggml.
//
// Usage sketch (error handling shortened; every call that can fail returns 0 / NULL / a negative
// number and leaves a message in csm_last_error()):
//
//     struct csm_model_params mp = csm_model_default_params();
//     csm_model * model = csm_model_load("csm-1b-q8_0.gguf", mp);
//     if (!model) { fprintf(stderr, "%s\n", csm_last_error()); return 1; }
//
//     struct csm_context_params cp = csm_context_default_params();
//     csm_context * ctx = csm_context_new(model, cp);
//
//     // prompt: n_pos rows of CSM_N_COLUMNS int32 values; columns 0..31 are audio codes, column 32
//     // the text token; -1 marks an absent column (text rows set only column 32, audio rows 0..31).
//     struct csm_generate_params gp = csm_generate_default_params();
//     gp.max_frames = 125;                                   // 10 s of audio at 12.5 frames/s
//     int32_t codes[125 * 32];
//     struct csm_generate_result res;
//     int32_t n_frames = csm_generate(ctx, prompt, n_pos, gp, codes, 125, &res);
//
//     float * pcm = malloc(sizeof(float) * n_frames * 1920);
//     int64_t n_samples = csm_mimi_decode(model, codes, n_frames, pcm, n_frames * 1920, 0);
//
//     csm_context_free(ctx);
//     csm_model_free(model);
//
// Threading: a csm_model is immutable after loading and may be shared by any number of contexts
// and Mimi codecs used from different threads at once. A csm_context or csm_mimi_codec must be used
// by one thread at a time. csm_last_error() is thread-local. csm_log_set() is global.
//
// Lifetime: every handle is reference counted. A context or codec keeps its model alive, so
// csm_model_free may come before theirs; a *_free while a call on that handle runs (from another
// thread, or from the call's own callback) takes effect when the call returns.
//
// The library never prints by itself: messages go to the callback set with csm_log_set().

#ifndef CSM_H
#define CSM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef CSM_SHARED
#    if defined(_WIN32)
#        ifdef CSM_BUILD
#            define CSM_API __declspec(dllexport)
#        else
#            define CSM_API __declspec(dllimport)
#        endif
#    else
#        define CSM_API __attribute__((visibility("default")))
#    endif
#else
#    define CSM_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define CSM_N_CODEBOOKS 32   // audio codebooks per frame
#define CSM_N_COLUMNS   33   // prompt columns per position: 32 audio codes + 1 text token
#define CSM_TEXT_COLUMN 32   // index of the text column in a prompt row

#define CSM_MAX_THREADS  1024                 // n_threads above this is refused everywhere
#define CSM_MAX_KV_BYTES (8LL << 30)          // a context's KV caches: refused beyond 8 GiB
#define CSM_API_VERSION  2                    // bumped when a declaration of this header changes

typedef struct csm_model      csm_model;       // weights + hyper-parameters (read-only, shareable)
typedef struct csm_context    csm_context;     // generation state: KV caches, graphs, thread pool
typedef struct csm_mimi_codec csm_mimi_codec;  // Mimi decoder/encoder state for streaming
typedef struct csm_mimi_batch_decoder csm_mimi_batch_decoder;  // streaming Mimi state of several streams

// ---------------------------------------------------------------------------------------------
// Errors, logging, version
// ---------------------------------------------------------------------------------------------

enum csm_log_level {
    CSM_LOG_DEBUG = 0,
    CSM_LOG_INFO  = 1,
    CSM_LOG_WARN  = 2,
    CSM_LOG_ERROR = 3,
};

// Receives every message of the library (and of ggml while a csm call runs). text ends in '\n'.
typedef void (*csm_log_callback)(int32_t level, const char * text, void * user_data);

// Sets the callback and its user data together; NULL silences. A message that another thread had
// begun to deliver when this returns may still reach the previous pair: keep it valid (pycsm installs
// one callback for the life of the process and switches its target in Python).
CSM_API void         csm_log_set(csm_log_callback callback, void * user_data);
CSM_API const char * csm_last_error(void);      // message of the last failure on this thread ("" if none)
CSM_API const char * csm_version(void);         // pycsm's native library version, "MAJOR.MINOR.PATCH" (+ "+cuNNN" in CUDA wheels)
CSM_API const char * csm_ggml_version(void);    // version of the ggml library actually loaded
CSM_API const char * csm_ggml_build_version(void); // version of ggml this library was compiled against
CSM_API const char * csm_system_info(void);     // backends and CPU features, one line

// ABI handshake for bindings (pycsm/_native.py): the CSM_API_VERSION the library was built with and
// sizeof() of each public struct, so that a binding refuses a library built from another header.
enum csm_struct {
    CSM_STRUCT_MODEL_PARAMS     = 0,
    CSM_STRUCT_HPARAMS          = 1,
    CSM_STRUCT_QUANTIZE_PARAMS  = 2,
    CSM_STRUCT_CONTEXT_PARAMS   = 3,
    CSM_STRUCT_SAMPLING_PARAMS  = 4,
    CSM_STRUCT_GENERATE_PARAMS  = 5,
    CSM_STRUCT_GENERATE_RESULT  = 6,
    CSM_STRUCT_BATCH_PARAMS     = 7,
    CSM_STRUCT_STREAM_PARAMS    = 8,
    CSM_STRUCT_BATCH_EVENT      = 9,
};
CSM_API int32_t      csm_api_version(void);
CSM_API int64_t      csm_struct_size(int32_t which); // enum csm_struct; -1 for an unknown value

// ---------------------------------------------------------------------------------------------
// Model
// ---------------------------------------------------------------------------------------------

enum csm_device {
    CSM_DEVICE_AUTO = 0,   // a GPU backend when ggml has one, else the CPU
    CSM_DEVICE_CPU  = 1,   // always the CPU
    CSM_DEVICE_GPU  = 2,   // a GPU backend; fails when ggml has none
};

struct csm_model_params {
    int32_t device;        // enum csm_device
    int32_t gpu_index;     // which GPU device when several (0 = first)
    bool    use_mmap;      // map the file instead of reading it (CPU weights, without use_repack, tensors
                           // aligned to 32 bytes). A mapped file must not be rewritten or truncated while
                           // the model lives: the next read of a changed page is SIGBUS
    bool    use_repack;    // CPU: copy Q8_0 / Q4_K / F16 matrices into the layouts of pycsm's kernel for
                           // this CPU (AVX512-VNNI, AVX2 or NEON; PYCSM_KERNEL forces one), with the
                           // depth heads as Q8_0 in quantised files; Q4_0: ggml's repack
};

// Hyper-parameters as stored in the GGUF (csm.* keys).
struct csm_hparams {
    int32_t bb_n_layers;        // backbone: transformer blocks
    int32_t bb_d_model;         // backbone: hidden width
    int32_t bb_n_heads;         // backbone: query heads
    int32_t bb_n_kv_heads;      // backbone: key/value heads
    int32_t bb_head_dim;        // backbone: width of one head
    int32_t bb_ff_dim;          // backbone: SwiGLU inner width
    int32_t bb_max_pos;         // backbone: context length (text tokens + frames)
    float   bb_rope_theta;      // backbone: RoPE base
    float   rms_norm_eps;       // RMSNorm epsilon (backbone and depth decoder)
    int32_t dp_n_layers;        // depth decoder: transformer blocks
    int32_t dp_d_model;         // depth decoder: hidden width
    int32_t dp_n_heads;         // depth decoder: query heads
    int32_t dp_n_kv_heads;      // depth decoder: key/value heads
    int32_t dp_head_dim;        // depth decoder: width of one head
    int32_t dp_ff_dim;          // depth decoder: SwiGLU inner width
    float   dp_rope_theta;      // depth decoder: RoPE base
    int32_t text_vocab_size;    // text tokens
    int32_t audio_vocab_size;   // logits per audio codebook (2051: 2048 codes + 3 specials)
    int32_t n_codebooks;        // audio codebooks per frame (32)
    int32_t audio_eos_token_id; // text id of <|audio_eos|>
    int32_t audio_token_id;     // text id of <|AUDIO|>
    int32_t bos_token_id;       // text id of <|begin_of_text|>
    int32_t codebook_eos_token_id; // audio code that ends speech when all 32 codes are it
    int32_t codebook_pad_token_id; // audio padding code
    int32_t mimi_dim;           // Mimi transformer width
    int32_t mimi_n_heads;       // Mimi transformer heads
    int32_t mimi_n_layers;      // Mimi transformer layers (each of encoder and decoder)
    int32_t mimi_codebook_dim;  // Mimi codebook vector width
    int32_t mimi_codebook_size; // Mimi codes per codebook (2048)
    int32_t mimi_n_quantizers;  // Mimi codebooks (32)
    int32_t mimi_n_semantic;    // Mimi semantic codebooks (1)
    int32_t sample_rate;        // audio sample rate (24000)
    int32_t samples_per_frame;  // PCM samples per frame (1920)
    float   frame_rate;         // frames per second (12.5)
};

CSM_API struct csm_model_params csm_model_default_params(void);

// Loads a CSM GGUF file. NULL on failure (missing, corrupt or not a CSM file; see csm_last_error).
CSM_API csm_model * csm_model_load(const char * path, struct csm_model_params params);
CSM_API void        csm_model_free(csm_model * model);       // NULL is fine

CSM_API struct csm_hparams csm_model_hparams(const csm_model * model);
CSM_API int32_t     csm_model_file_type(const csm_model * model);  // general.file_type, -1 if absent
CSM_API const char * csm_model_name(const csm_model * model);      // general.name ("" if absent)
CSM_API uint64_t    csm_model_n_params(const csm_model * model);   // elements in all tensors
CSM_API uint64_t    csm_model_n_bytes(const csm_model * model);    // bytes of all tensors
CSM_API int32_t     csm_model_n_tensors(const csm_model * model);  // tensors in the file
CSM_API const char * csm_model_device(const csm_model * model);    // name of the backend holding weights

// ---------------------------------------------------------------------------------------------
// Quantisation (file to file)
// ---------------------------------------------------------------------------------------------

// Progress callback: done and total tensors; return false to abort.
typedef bool (*csm_progress_callback)(int32_t done, int32_t total, void * user_data);

struct csm_quantize_params {
    int32_t type;                       // target ggml type (GGML_TYPE_Q8_0 = 8, Q4_K = 12, ...)
    int32_t n_threads;                  // threads; <= 0 means all the CPUs this process may use
    csm_progress_callback progress;     // may be NULL
    void *  progress_user_data;         // passed to progress
};

CSM_API struct csm_quantize_params csm_quantize_default_params(void);

// Rewrites a CSM GGUF with its matrices quantised by the published files' rule (see README).
// Returns 0 on success, -1 on failure.
CSM_API int32_t csm_quantize(const char * in_path, const char * out_path, struct csm_quantize_params params);

// ---------------------------------------------------------------------------------------------
// Generation: text + context prompt -> Mimi codes
// ---------------------------------------------------------------------------------------------

struct csm_context_params {
    int32_t n_threads;          // CPU threads; <= 0 means all the CPUs this process may use
    int32_t max_pos;            // context length; 0 = the model's (bb_max_pos)
    int32_t n_batch;            // utterances generated together by csm_generate_batch (1 = one)
};

CSM_API struct csm_context_params csm_context_default_params(void);
CSM_API csm_context * csm_context_new(const csm_model * model, struct csm_context_params params);
CSM_API void          csm_context_free(csm_context * ctx);   // NULL is fine

struct csm_sampling_params {
    float    temperature;       // backbone (codebook 0) temperature; 0 = argmax
    int32_t  top_k;             // backbone top-k; <= 0 = all codes
    float    depth_temperature; // depth decoder temperature; < 0 = same as temperature
    int32_t  depth_top_k;       // depth decoder top-k; < 0 = same as top_k
    uint64_t seed;              // PRNG seed; the same seed gives the same codes for any thread count
};

// Called after each frame with its 32 codes; return false to stop (result: CSM_STOP_ABORTED).
// csm_generate_batch calls it once per running utterance per frame step, utterances in order.
typedef bool (*csm_frame_callback)(int32_t frame_index, const int32_t * codes, void * user_data);

struct csm_generate_params {
    struct csm_sampling_params sampling; // how codes are drawn
    int32_t max_frames;          // stop after this many frames (<= 0: until EOS or a full context)
    bool    stop_at_eos;         // end at an all-zero frame (benchmarks turn this off)
    bool    reuse_prompt;        // keep the cache rows of the leading prompt rows this context's last
                                 // prompt for the same sequence shares (a saved voice, the earlier turns
                                 // of a conversation) instead of computing them again; the codes are the
                                 // same either way, only the prefill is shorter. Default true.
    csm_frame_callback on_frame; // may be NULL
    void *  user_data;           // passed to on_frame
};

enum csm_stop_reason {
    CSM_STOP_EOS          = 0,   // the model produced the all-zero end frame (not returned)
    CSM_STOP_MAX_FRAMES   = 1,   // max_frames reached
    CSM_STOP_CONTEXT_FULL = 2,   // the context (max_pos positions) is full
    CSM_STOP_ABORTED      = 3,   // on_frame returned false
};

struct csm_generate_result {
    int32_t n_frames;            // frames written to out_codes
    int32_t stop_reason;         // enum csm_stop_reason
    int32_t n_prompt;            // prompt positions
    int32_t n_prompt_reused;     // of those, leading positions whose cache rows were reused (reuse_prompt)
    double  t_prefill_ms;        // time spent in the prompt prefill
    double  t_backbone_ms;       // time spent in backbone steps after the prefill (incl. codebook 0)
    double  t_depth_ms;          // time spent in the depth decoder (codebooks 1..31)
};

CSM_API struct csm_generate_params csm_generate_default_params(void);

// Generates frames after the prompt (n_pos rows of CSM_N_COLUMNS int32, -1 = absent column).
// out_codes receives up to max_out frames of CSM_N_CODEBOOKS codes, each in [0, 2048).
// Returns the number of frames (>= 0), or -1 on error. result may be NULL.
CSM_API int32_t csm_generate(csm_context * ctx, const int32_t * prompt, int32_t n_pos,
                             struct csm_generate_params params, int32_t * out_codes, int32_t max_out,
                             struct csm_generate_result * result);

// Generates n_batch utterances together (n_batch <= the context's n_batch); every weight read serves
// all of them. prompts[b] has n_pos[b] rows; out_codes[b] receives up to max_out frames; each
// utterance b uses seed params.sampling.seed + b. results has n_batch entries (may be NULL).
// Returns 0, or -1 on error.
CSM_API int32_t csm_generate_batch(csm_context * ctx, int32_t n_batch, const int32_t * const * prompts,
                                   const int32_t * n_pos, struct csm_generate_params params,
                                   int32_t * const * out_codes, int32_t max_out,
                                   struct csm_generate_result * results);

// Diagnostics for tests: prefills the prompt and writes the codebook-0 logits (audio_vocab_size
// floats) of its last position; then, teacher-forced with codes (CSM_N_CODEBOOKS values), writes
// the depth decoder's logits of codebooks 1..31 ((n_codebooks - 1) * audio_vocab_size floats).
// depth_logits may be NULL (then codes may be NULL too). Returns 0, or -1 on error.
CSM_API int32_t csm_eval_frame_logits(csm_context * ctx, const int32_t * prompt, int32_t n_pos,
                                      const int32_t * codes, float * logits0, float * depth_logits);

// ---------------------------------------------------------------------------------------------
// Mimi codec: codes <-> 24 kHz PCM
// ---------------------------------------------------------------------------------------------

// One-shot decode of n_frames frames (frame-major: codes[f * 32 + cb], each in [0, 2048)) into
// n_frames * samples_per_frame float samples. n_threads <= 0: all the CPUs this process may use.
// Returns the number of samples written, or -1 on error.
CSM_API int64_t csm_mimi_decode(const csm_model * model, const int32_t * codes, int32_t n_frames,
                                float * out_pcm, int64_t max_samples, int32_t n_threads);

// One-shot encode of mono 24 kHz PCM into frames of 32 codes (frame-major). A trailing partial frame
// is padded as the reference does. Returns the number of frames written, or -1 on error.
CSM_API int32_t csm_mimi_encode(const csm_model * model, const float * pcm, int64_t n_samples,
                                int32_t * out_codes, int32_t max_frames, int32_t n_threads);

// Streaming decoder: feed frames in chunks of any size; the concatenated output equals the
// one-shot decode of all frames.
CSM_API csm_mimi_codec * csm_mimi_codec_new(const csm_model * model, int32_t n_threads);
CSM_API void    csm_mimi_codec_free(csm_mimi_codec * codec);   // NULL is fine
CSM_API void    csm_mimi_codec_reset(csm_mimi_codec * codec);  // forget all streamed state
// Decodes n_frames more frames; writes n_frames * samples_per_frame samples. -1 on error.
CSM_API int64_t csm_mimi_codec_decode(csm_mimi_codec * codec, const int32_t * codes, int32_t n_frames,
                                      float * out_pcm, int64_t max_samples);

// Batched streaming decoder: the streaming state of n_slots streams (1..256), decoded together. One
// call decodes n_frames more frames of each of several slots in one pass, every weight product
// serving all of them; each slot's output equals that of a csm_mimi_codec fed the same frames.
// Slots are independent: reset one when a new stream takes it.
CSM_API csm_mimi_batch_decoder * csm_mimi_batch_decoder_new(const csm_model * model, int32_t n_slots,
                                                            int32_t n_threads);
CSM_API void    csm_mimi_batch_decoder_free(csm_mimi_batch_decoder * dec);  // NULL is fine
CSM_API int32_t csm_mimi_batch_decoder_n_slots(const csm_mimi_batch_decoder * dec);  // -1 on error
// Forgets one slot's streamed state. 0, or -1 on error.
CSM_API int32_t csm_mimi_batch_decoder_reset(csm_mimi_batch_decoder * dec, int32_t slot);
// Decodes n_frames more frames of each of the n_slots distinct slots in `slots`. codes: n_slots *
// n_frames frames, slot by slot in the order of `slots` (codes[((i * n_frames) + f) * 32 + cb]);
// out_pcm: n_slots * n_frames * samples_per_frame samples, in the same order. Returns the number of
// samples written, or -1 on error (nothing decoded, no state changed).
CSM_API int64_t csm_mimi_batch_decoder_decode(csm_mimi_batch_decoder * dec, const int32_t * slots,
                                              int32_t n_slots, const int32_t * codes, int32_t n_frames,
                                              float * out_pcm, int64_t max_samples);

// ---------------------------------------------------------------------------------------------
// Continuous batching: streams join and leave a running batch between frames
// ---------------------------------------------------------------------------------------------
//
// A csm_batch generates up to max_streams utterances ("streams") together, as csm_generate_batch
// does, but a stream joins at any frame boundary and leaves at its end frame, its frame cap, a full
// context, or when removed. Each csm_batch_step() runs one frame of every running stream and, while
// streams are joining, a chunk of their prompts' prefill (prefill_chunk rows in all), so that the
// running streams wait about one frame's time at most while others join. Streams join in the order
// they were added; short prompts added together join in the same step when the chunk holds them.
// Each stream has its own sampling parameters, seed and cap; its codes equal csm_generate's with
// the same prompt and parameters, whatever else is in the batch, when the matrix products give each
// column the same result for any number of columns.
//
//     struct csm_batch_params bp = csm_batch_default_params();
//     bp.max_streams = 4;
//     csm_batch * batch = csm_batch_new(model, bp);
//     struct csm_stream_params sp = csm_stream_default_params();
//     sp.sampling.seed = 42;
//     int64_t id = csm_batch_add(batch, prompt, n_pos, sp);      // any time, up to max_streams
//     struct csm_batch_event ev[4];
//     while (csm_batch_n_streams(batch) > 0) {
//         int32_t n = csm_batch_step(batch, ev, 4);              // ev[i]: a frame and/or an end
//     }
//     csm_batch_free(batch);
//
// Threading: a csm_batch must be used by one thread at a time.

typedef struct csm_batch csm_batch;             // running streams: one context of max_streams sequences

struct csm_batch_params {
    int32_t n_threads;          // CPU threads; <= 0 means all the CPUs this process may use
    int32_t max_pos;            // context length of each stream; 0 = the model's (bb_max_pos)
    int32_t max_streams;        // streams at once, running or joining (1..64)
    int32_t prefill_chunk;      // prompt rows prefilled per step while streams run (1..256); 0 = about
                                // one frame's time, from the measured speeds. Alone, a stream
                                // prefills 256 rows per step.
    bool    reuse_prompt;       // a joining stream takes the cache rows of the leading prompt rows it
                                // shares with a prompt the batch prefilled before (a saved voice),
                                // held by a running or a free sequence, instead of computing them;
                                // the codes are the same. Default true.
};

struct csm_stream_params {
    struct csm_sampling_params sampling; // how this stream's codes are drawn (its own seed)
    int32_t max_frames;         // stop after this many frames (<= 0: until EOS or a full context)
    bool    stop_at_eos;        // end at an all-zero frame
};

// What one step did for one stream.
struct csm_batch_event {
    int64_t stream;             // the id csm_batch_add returned
    int32_t frame_index;        // index of the frame in codes within the stream; -1: no frame
    int32_t stop_reason;        // -1: the stream runs on; else enum csm_stop_reason: it has left the batch
    int32_t codes[CSM_N_CODEBOOKS]; // the frame (when frame_index >= 0), each in [0, 2048)
};

CSM_API struct csm_batch_params  csm_batch_default_params(void);
CSM_API struct csm_stream_params csm_stream_default_params(void);
CSM_API csm_batch * csm_batch_new(const csm_model * model, struct csm_batch_params params);
CSM_API void        csm_batch_free(csm_batch * batch);   // NULL is fine

// Adds a stream after the prompt (n_pos rows of CSM_N_COLUMNS, copied); it joins during the next
// steps. Returns its id (>= 0, never reused by this batch), or -1 when the batch holds max_streams
// streams already or the prompt or parameters are invalid.
CSM_API int64_t csm_batch_add(csm_batch * batch, const int32_t * prompt, int32_t n_pos,
                              struct csm_stream_params params);
// Removes a stream now, running or joining (no event follows for it). 0, or -1 when the batch
// holds no such stream.
CSM_API int32_t csm_batch_remove(csm_batch * batch, int64_t stream);
// Runs one step: a prefill chunk (of the joining streams, first added first; a stream whose
// prompt is done runs from this step), then one frame of every running stream. Writes one event
// per stream that produced a frame or ended (at most max_streams; max_events must be at least that). Returns the number of events, or -1 on error; after an error
// the batch is empty (every stream has left) and can be used again.
CSM_API int32_t csm_batch_step(csm_batch * batch, struct csm_batch_event * events, int32_t max_events);
CSM_API int32_t csm_batch_n_streams(const csm_batch * batch);  // streams in the batch, running or joining
CSM_API int32_t csm_batch_n_running(const csm_batch * batch);  // streams past their prefill
CSM_API int64_t csm_batch_rows_reused(const csm_batch * batch); // prompt rows reused so far (reuse_prompt)

#ifdef __cplusplus
}
#endif

#endif // CSM_H
