// csm_sampling.cpp - seeded PRNG and temperature / top-k sampling.
#include "csm_sampling.h"

#include <algorithm>
#include <cmath>

static uint64_t splitmix64(uint64_t & x) {
    uint64_t z = (x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

csm_rng::csm_rng(uint64_t seed) {
    uint64_t x = seed;
    for (auto & v : s) v = splitmix64(x);
}

uint64_t csm_rng::next() {
    const uint64_t result = rotl(s[1] * 5, 7) * 9;
    const uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

double csm_rng::uniform() { return (double) (next() >> 11) * 0x1.0p-53; }

int32_t csm_sampler::sample(const float * logits, int32_t n_valid, float temperature, int32_t top_k, csm_rng & rng) {
    if (temperature <= 0.0f || top_k == 1) {
        int32_t best = 0;
        for (int32_t i = 1; i < n_valid; i++) {
            if (logits[i] > logits[best]) best = i;
        }
        return best;
    }
    buf.resize(n_valid);
    for (int32_t i = 0; i < n_valid; i++) buf[i] = {logits[i], i};
    int32_t k = (top_k <= 0 || top_k > n_valid) ? n_valid : top_k;
    // Highest logits first; ties broken by the lower code so the result never depends on the sort.
    auto higher = [](const std::pair<float, int32_t> & a, const std::pair<float, int32_t> & b) {
        return a.first > b.first || (a.first == b.first && a.second < b.second);
    };
    if (k < n_valid) std::partial_sort(buf.begin(), buf.begin() + k, buf.end(), higher);
    else std::sort(buf.begin(), buf.end(), higher);
    const double inv_t = 1.0 / temperature;
    const double max_l = buf[0].first;
    double sum = 0.0;
    std::vector<double> & p = prob;
    p.resize(k);
    for (int32_t i = 0; i < k; i++) {
        p[i] = std::exp((buf[i].first - max_l) * inv_t);
        sum += p[i];
    }
    double r = rng.uniform() * sum;
    for (int32_t i = 0; i < k; i++) {
        r -= p[i];
        if (r < 0) return buf[i].second;
    }
    return buf[k - 1].second;
}
