// formats.cpp - the weight-format table and the packing of each format into its kernel layout
// (kernel.h). Compiled without instruction-set flags: packing runs on any CPU.
#include "kernel.h"

#include <string.h>

namespace {

// Where row r of a packed matrix of `rows` rows lies: in a tile of R rows (4, or 1 for the last
// rows % 4) starting at row r0, as its row ri.
struct tile_pos {
    int64_t R, r0, ri;
    tile_pos(int64_t r, int64_t rows) : R(r < rows / 4 * 4 ? 4 : 1), r0(R == 4 ? r / 4 * 4 : r), ri(r - r0) {}
};

int64_t q8_0_row_bytes(int64_t cols) { return csm_kernel_nbp(cols) * 34; }
int64_t q4_k_row_bytes(int64_t cols) { return cols / 256 * 148; }
int64_t f16_row_bytes(int64_t cols) { return cols * 2; }

void pack_q8_0(const uint8_t * src, size_t row_stride, int64_t rows, int64_t cols, uint8_t * out) {
    const int64_t nb = cols / 32, nbp = csm_kernel_nbp(cols);
    for (int64_t r = 0; r < rows; r++) {
        const tile_pos tp(r, rows);
        const int64_t R = tp.R, ri = tp.ri;
        uint8_t * tile = out + tp.r0 * nbp * 34;
        if (nb < nbp) { // zero the padding blocks of the last group (scales and quants)
            uint8_t * grp = tile + (nbp / 8 - 1) * R * 272;
            for (int64_t b = nb % 8; b < 8; b++) {
                grp[(ri * 8 + b) * 2] = grp[(ri * 8 + b) * 2 + 1] = 0;
                for (int i = 0; i < 32; i++) grp[R * 16 + ri * 256 + ((i / 4) * 8 + b) * 4 + i % 4] = 0;
            }
        }
        const uint8_t * row = src + r * row_stride;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t * blk = row + b * 34; // fp16 scale, 32 int8 quants
            uint8_t * grp = tile + (b / 8) * R * 272;
            grp[(ri * 8 + b % 8) * 2] = blk[0];
            grp[(ri * 8 + b % 8) * 2 + 1] = blk[1];
            uint8_t * q = grp + R * 16 + ri * 256 + (b % 8) * 4;
            for (int m = 0; m < 8; m++) { // bytes 4m..4m+3 of the block to lane b % 8 of vector m, + 128
                for (int i = 0; i < 4; i++) q[m * 32 + i] = (uint8_t) (blk[2 + 4 * m + i] ^ 0x80);
            }
        }
    }
}

void pack_q4_k(const uint8_t * src, size_t row_stride, int64_t rows, int64_t cols, uint8_t * out) {
    const int64_t ns = cols / 256;
    for (int64_t r = 0; r < rows; r++) {
        const tile_pos tp(r, rows);
        const int64_t R = tp.R, ri = tp.ri;
        uint8_t * tile = out + tp.r0 * ns * 148;
        const uint8_t * row = src + r * row_stride;
        for (int64_t s = 0; s < ns; s++) {
            const uint8_t * blk = row + s * 144;
            const uint8_t * sm = blk + 4;
            const uint8_t * qs = blk + 16;
            uint8_t * grp = tile + s * R * 148;
            uint8_t * hdr = grp + ri * 20;
            for (int i = 0; i < 4; i++) hdr[i] = blk[i];
            for (int j = 0; j < 8; j++) { // ggml's 6-bit scale and min of sub-block j
                hdr[4 + j] = j < 4 ? (uint8_t) (sm[j] & 63) : (uint8_t) ((sm[j + 4] & 0xF) | ((sm[j - 4] >> 6) << 4));
                hdr[12 + j] = j < 4 ? (uint8_t) (sm[j + 4] & 63) : (uint8_t) ((sm[j + 4] >> 4) | ((sm[j] >> 6) << 4));
            }
            uint8_t * q = grp + R * 20 + ri * 128;
            memset(q, 0, 128);
            for (int j = 0; j < 8; j++) {          // sub-block j = lane j
                for (int e = 0; e < 32; e++) {     // its value e, in activation vector m = e / 4
                    const uint8_t v = (uint8_t) (j % 2 == 0 ? qs[32 * (j / 2) + e] & 0xF : qs[32 * (j / 2) + e] >> 4);
                    const int m = e / 4, k = m / 4 * 2 + m % 2, hi = m % 4 / 2;
                    q[k * 32 + j * 4 + e % 4] |= (uint8_t) (v << (4 * hi));
                }
            }
        }
    }
}

void pack_f16(const uint8_t * src, size_t row_stride, int64_t rows, int64_t cols, uint8_t * out) {
    const int64_t nch = cols / 16;
    for (int64_t r = 0; r < rows; r++) {
        const tile_pos tp(r, rows);
        uint8_t * tile = out + tp.r0 * cols * 2;
        const uint8_t * row = src + r * row_stride;
        for (int64_t c = 0; c < nch; c++) memcpy(tile + (c * tp.R + tp.ri) * 32, row + c * 32, 32);
    }
}

const csm_wformat FORMATS[CSM_WFMT_COUNT] = {
    {"q8_0", 32, 32, 34, true, q8_0_row_bytes, pack_q8_0},
    {"q4_k", 256, 256, 144, true, q4_k_row_bytes, pack_q4_k},
    {"f16", 16, 1, 2, false, f16_row_bytes, pack_f16},
};

} // namespace

const csm_wformat & csm_wformat_get(csm_wfmt f) { return FORMATS[f]; }
