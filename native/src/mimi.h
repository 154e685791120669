// mimi.h - the Mimi codec (RVQ + transformer + SEANet) on ggml: decode codes to PCM, encode PCM to codes.
#pragma once

#include "csm_model.h"

// Checks at load time that every Mimi tensor is present with the shape and type the codec needs.
// Throws csm_error otherwise.
void mimi_check_tensors(const csm_model & model);
