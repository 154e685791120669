// csm_sampling.h - seeded PRNG and temperature / top-k sampling of audio codes.
#pragma once

#include <cstdint>
#include <vector>

// xoshiro256** seeded through splitmix64: same seed, same stream on every platform.
struct csm_rng {
    uint64_t s[4];
    explicit csm_rng(uint64_t seed = 0);
    uint64_t next();
    double uniform(); // [0, 1)
};

struct csm_sampler {
    std::vector<std::pair<float, int32_t>> buf; // scratch, reused across calls
    std::vector<double> prob;                   // scratch

    // Draws a code from logits[0, n_valid): argmax when temperature <= 0, otherwise softmax over
    // the top_k (<= 0: all) logits divided by temperature. Codes >= n_valid are never returned.
    int32_t sample(const float * logits, int32_t n_valid, float temperature, int32_t top_k, csm_rng & rng);
};
