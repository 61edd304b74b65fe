/* fuzz_input.h: reading typed values off a libFuzzer input, shared by the harnesses in fuzz/.
 *
 * Every take_* returns 0 (or the given default) once the input is exhausted, so any byte string is a
 * valid input and a shorter one simply means "zeros from here on". pick_int() maps one byte to a value
 * that is usually small and in range (so most inputs reach deep code) and sometimes an edge value
 * (0, -1, the limits, INT_MIN / INT_MAX) so validation is exercised too. */
#ifndef SCMOE_FUZZ_INPUT_H
#define SCMOE_FUZZ_INPUT_H

#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef struct fuzz_in {
    const uint8_t *p;
    size_t n, i;
} fuzz_in;

static inline uint8_t take_u8(fuzz_in *in) { return in->i < in->n ? in->p[in->i++] : 0; }
static inline uint16_t take_u16(fuzz_in *in) { return (uint16_t)(take_u8(in) | take_u8(in) << 8); }
static inline uint32_t take_u32(fuzz_in *in) { return (uint32_t)take_u16(in) | (uint32_t)take_u16(in) << 16; }
static inline uint64_t take_u64(fuzz_in *in) { return (uint64_t)take_u32(in) | (uint64_t)take_u32(in) << 32; }
static inline float take_f32_bits(fuzz_in *in) {
    uint32_t v = take_u32(in);
    float f;
    memcpy(&f, &v, sizeof f);
    return f;
}
static inline size_t remaining(const fuzz_in *in) { return in->n - in->i; }

/* One byte: b < 224 gives lo + b % (hi - lo + 1) (in range); otherwise one of the edge values. */
static inline int pick_int(fuzz_in *in, int lo, int hi) {
    uint8_t b = take_u8(in);
    if (b < 224) return lo + (int)(b % (unsigned)(hi - lo + 1));
    static const int edges[] = {0,
                                -1,
                                1,
                                2,
                                3,
                                INT_MIN,
                                INT_MAX,
                                1 << 20,
                                (1 << 20) + 1,
                                1 << 22,
                                (1 << 22) + 1,
                                1 << 24,
                                (1 << 24) + 1,
                                4096,
                                4097,
                                -2,
                                5,
                                7,
                                8,
                                16,
                                31,
                                32,
                                63,
                                64,
                                65,
                                127,
                                128,
                                255,
                                256,
                                1000,
                                1023,
                                1024};
    return edges[(b - 224) % (sizeof edges / sizeof *edges)];
}

/* One byte for a float: mostly a few meaningful values, sometimes 4 raw bytes (NaN, Inf, huge, ...). */
static inline float pick_float(fuzz_in *in, const float *table, int n_table) {
    uint8_t b = take_u8(in);
    if (b < 200) return table[b % n_table];
    if (b < 216) return take_f32_bits(in);
    static const float edges[] = {0.0f,     -0.0f,     -1.0f, 1e-30f,   1e30f, 3.0e38f,       -3.0e38f, 1e-45f,
                                  INFINITY, -INFINITY, NAN,   65536.0f, 1e9f,  2147483648.0f, 9.3e18f,  0.5f};
    return edges[(b - 200) % (sizeof edges / sizeof *edges)];
}

/* Known, reported library bugs whose checks are skipped when listed (comma-separated) in the
 * environment variable SCMOE_KNOWN_BUGS, so a fuzzing run can look past them. Each skip is
 * counted and printed at exit, so a replay shows which known bugs the inputs still hit. */
#include <stdio.h>
#include <stdlib.h>
static int known_bug_hits[8];
static const char *known_bug_names[8];
static void known_bug_report(void) {
    for (int i = 0; i < 8 && known_bug_names[i]; i++)
        if (known_bug_hits[i])
            fprintf(stderr, "# known library bug '%s' hit %d time(s) (skipped: listed in SCMOE_KNOWN_BUGS)\n",
                    known_bug_names[i], known_bug_hits[i]);
}
/* 1 if the check named `name` is to be skipped (and counts the hit) */
static inline int known_bug(const char *name) {
    const char *list = getenv("SCMOE_KNOWN_BUGS");
    if (!list) return 0;
    size_t n = strlen(name);
    for (const char *p = list; (p = strstr(p, name)) != NULL; p += n)
        if ((p == list || p[-1] == ',') && (p[n] == 0 || p[n] == ',')) {
            for (int i = 0; i < 8; i++) {
                if (!known_bug_names[i]) {
                    if (i == 0) atexit(known_bug_report);
                    known_bug_names[i] = name;
                }
                if (strcmp(known_bug_names[i], name) == 0) {
                    known_bug_hits[i]++;
                    break;
                }
            }
            return 1;
        }
    return 0;
}

#endif
