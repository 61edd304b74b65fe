/* check.h: the test suites' tiny harness. Each CHECK prints "ok - ..." or "not ok - ...", and
 * check_summary() prints the "N passed, N failed" line the runner adds up. */
#ifndef SCMOE_CHECK_H
#define SCMOE_CHECK_H
#include <stdio.h>

static int check_passed, check_failed, check_quiet;

#define CHECK(cond, ...)                                                                                               \
    do {                                                                                                               \
        if (cond) {                                                                                                    \
            check_passed++;                                                                                            \
            if (!check_quiet) {                                                                                        \
                printf("ok - ");                                                                                       \
                printf(__VA_ARGS__);                                                                                   \
                printf("\n");                                                                                          \
            }                                                                                                          \
        } else {                                                                                                       \
            check_failed++;                                                                                            \
            printf("not ok - ");                                                                                       \
            printf(__VA_ARGS__);                                                                                       \
            printf("  (%s:%d)\n", __FILE__, __LINE__);                                                                 \
        }                                                                                                              \
        fflush(stdout);                                                                                                \
    } while (0)

static int check_summary(void) {
    printf("%d passed, %d failed\n", check_passed, check_failed);
    return check_failed ? 1 : 0;
}
#endif
