// mimi.cpp - placeholder until the Mimi codec lands: every entry point reports that it is missing.
#include "mimi.h"

#include "csm_log.h"

void mimi_check_tensors(const csm_model &) {}

extern "C" {

int64_t csm_mimi_decode(const csm_model *, const int32_t *, int32_t, float *, int64_t, int32_t) {
    csm_set_error("the Mimi decoder is not implemented yet");
    return -1;
}
int32_t csm_mimi_encode(const csm_model *, const float *, int64_t, int32_t *, int32_t, int32_t) {
    csm_set_error("the Mimi encoder is not implemented yet");
    return -1;
}
csm_mimi_codec * csm_mimi_codec_new(const csm_model *, int32_t) {
    csm_set_error("the Mimi decoder is not implemented yet");
    return nullptr;
}
void csm_mimi_codec_free(csm_mimi_codec *) {}
void csm_mimi_codec_reset(csm_mimi_codec *) {}
int64_t csm_mimi_codec_decode(csm_mimi_codec *, const int32_t *, int32_t, float *, int64_t) {
    csm_set_error("the Mimi decoder is not implemented yet");
    return -1;
}

} // extern "C"
