/* watchdog.h: the fault programs' guard against a hang. Each sets `rank` and names what it is doing in
 * `current`; `signal(SIGALRM, on_alarm); alarm(WATCHDOG_S);` at start makes a rank stuck for WATCHDOG_S
 * seconds print "not ok - rank R hung for S s in: WHAT" and exit 3, so a hang is a failure with a name,
 * not a CI timeout. */
#ifndef SCMOE_FAULTS_WATCHDOG_H
#define SCMOE_FAULTS_WATCHDOG_H
#include <stdio.h>
#include <unistd.h>

#define WATCHDOG_S 60
static int rank;
static const char *current = "start";

static void on_alarm(int sig) {
    (void)sig;
    char buf[256];
    int n = snprintf(buf, sizeof buf, "not ok - rank %d hung for %d s in: %s\n", rank, WATCHDOG_S, current);
    if (write(1, buf, (size_t)n) < 0) {}
    _exit(3);
}
#endif
