/* Nested-bit expert record -> ggml Q4_1 blocks, in one pass (edge/quant/nested.py documents the
 * record layout; this is the same computation as its numpy path, `to_q4_1`, minus temporaries).
 *
 * Within each block of 32 weights the record stores codes in Q4_1 nibble order
 * (0, 16, 1, 17, ...): a byte of the top section (four 2-bit codes) becomes two Q4_1 bytes, a
 * byte of a bit plane (eight 1-bit codes) adds one bit to four Q4_1 bytes.
 */
#include <stdint.h>
#include <string.h>

static uint16_t top_lut[3][256];
static uint32_t plane_lut[3][256];
static int ready = 0;

static void init(void) {
    for (int s = 0; s < 3; s++) {
        for (int v = 0; v < 256; v++) {
            uint32_t a0 = (v >> 6) & 3, a1 = (v >> 4) & 3, a2 = (v >> 2) & 3, a3 = v & 3;
            top_lut[s][v] = (uint16_t)(((a0 << s) | ((a1 << s) << 4)) | (((a2 << s) | ((a3 << s) << 4)) << 8));
            uint32_t out = 0;
            for (int k = 0; k < 4; k++) {
                uint32_t lo = (v >> (7 - 2 * k)) & 1, hi = (v >> (6 - 2 * k)) & 1;
                out |= ((lo << s) | ((hi << s) << 4)) << (8 * k);
            }
            plane_lut[s][v] = out;
        }
    }
    ready = 1;
}

/* n weights (multiple of 64); bits in 2..4; top: n/4 bytes; planes: (bits-2) * n/8 bytes;
 * d16, m16: one fp16 pair per group of 64 weights; out: n/32 blocks of 20 bytes. */
int edge_nested_to_q4_1(const uint8_t *top, const uint8_t *planes, int64_t n, int bits,
                        const uint16_t *d16, const uint16_t *m16, uint8_t *out) {
    if (bits < 2 || bits > 4 || n % 64) return -1;
    if (!ready) init();
    const int64_t nb = n / 32, plane_bytes = n / 8;
    const uint16_t *tl = top_lut[bits - 2];
    for (int64_t b = 0; b < nb; b++) {
        uint8_t *blk = out + b * 20;
        memcpy(blk, &d16[b / 2], 2);
        memcpy(blk + 2, &m16[b / 2], 2);
        uint32_t qs[4];
        const uint8_t *t = top + b * 8;
        for (int k = 0; k < 4; k++) qs[k] = (uint32_t)tl[t[2 * k]] | ((uint32_t)tl[t[2 * k + 1]] << 16);
        for (int p = 0; p < bits - 2; p++) {
            const uint32_t *pl = plane_lut[bits - 3 - p];
            const uint8_t *src = planes + p * plane_bytes + b * 4;
            for (int k = 0; k < 4; k++) qs[k] |= pl[src[k]];
        }
        memcpy(blk + 4, qs, 16);
    }
    return 0;
}
