/*
 * An example service in C that uses ccmgr's service API (include/ccmgr.h); the same service
 * as examples/cc_service.rs.
 *
 * Started by ccmgr with -cc as its first argument it registers (ccmgr_alive), initialises,
 * says ready (ccmgr_ready), then serves: a heartbeat line on stdout now and then. When its
 * turn to shut down comes, the callback appends "begin <id> <t>" and, after the service's
 * clean-up (CC_SERVICE_STOP_MS, default 0), "shutdown <id> <t> <reason>" to the log file
 * (t: CLOCK_MONOTONIC in nanoseconds); then the service exits.
 *
 * Settings: --log PATH (else $CC_SERVICE_LOG; none: no log), $CC_SERVICE_STOP_MS,
 * $CC_SERVICE_INIT_MS, $CC_SERVICE_HEARTBEAT_MS (default 1000).
 *
 * Build: cargo build -p ccmgr-capi && make -C examples/c
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "ccmgr.h"

struct service {
    const char *id;
    const char *log;
    long stop_ms;
    int stop_pipe[2]; /* the callback writes a byte; main's poll wakes */
};

static long env_ms(const char *name, long fallback)
{
    const char *v = getenv(name);
    return v && *v ? strtol(v, NULL, 10) : fallback;
}

static unsigned long long monotonic_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (unsigned long long)t.tv_sec * 1000000000ULL + (unsigned long long)t.tv_nsec;
}

static void sleep_ms(long ms)
{
    struct timespec t = { ms / 1000, (ms % 1000) * 1000000L };
    while (nanosleep(&t, &t) == -1 && errno == EINTR) {
    }
}

/* One write(2) per line on an O_APPEND descriptor: lines of several services never mix. */
static void append(const char *log, const char *what, const char *id, const char *tail)
{
    char line[256];
    int fd, n;
    if (!log)
        return;
    n = snprintf(line, sizeof line, "%s %s %llu%s%s\n", what, id, monotonic_ns(),
                 tail ? " " : "", tail ? tail : "");
    fd = open(log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0 || write(fd, line, (size_t)n) != n)
        fprintf(stderr, "cc_service_c: cannot append to %s: %s\n", log, strerror(errno));
    if (fd >= 0)
        close(fd);
}

/* Called by ccmgr on its API thread when it is this service's turn to shut down. */
static void on_shutdown(void *arg)
{
    struct service *s = arg;
    char byte = 1;
    append(s->log, "begin", s->id, NULL);
    sleep_ms(s->stop_ms); /* the service's clean-up */
    append(s->log, "shutdown", s->id,
           ccmgr_shutdown_reason() == CCMGR_SHUTDOWN_COORDINATOR_DIED ? "coordinator-died"
                                                                      : "requested");
    if (write(s->stop_pipe[1], &byte, 1) != 1)
        fprintf(stderr, "cc_service_c: cannot wake main: %s\n", strerror(errno));
}

int main(int argc, char **argv)
{
    static struct service s;
    int cc = ccmgr_invoked_with_cc(argc, argv);
    long heartbeat = env_ms("CC_SERVICE_HEARTBEAT_MS", 1000);
    unsigned long beats = 0;
    int i;

    s.id = getenv("CCMGR_SERVICE") ? getenv("CCMGR_SERVICE") : "cc_service_c";
    s.log = getenv("CC_SERVICE_LOG");
    for (i = 1; i + 1 < argc; i++)
        if (strcmp(argv[i], "--log") == 0)
            s.log = argv[i + 1];
    s.stop_ms = env_ms("CC_SERVICE_STOP_MS", 0);
    if (pipe(s.stop_pipe) != 0) {
        perror("cc_service_c: pipe");
        return 1;
    }

    /* FIG. 6: register only when started with -cc; terminate if the API fails. */
    if (cc && ccmgr_alive(on_shutdown, &s) != 0) {
        fprintf(stderr, "cc_service_c: %s\n", ccmgr_last_error());
        return 1;
    }
    if (!cc)
        fprintf(stderr, "cc_service_c: not started with -cc: serving without ccmgr\n");

    sleep_ms(env_ms("CC_SERVICE_INIT_MS", 0)); /* initialisation */
    if (cc) {
        if (ccmgr_ready() != 0) {
            fprintf(stderr, "cc_service_c: %s\n", ccmgr_last_error());
            return 1;
        }
        fprintf(stderr, "cc_service_c: %s is ready\n", s.id);
    }

    /* Serve until the shutdown callback says stop. */
    for (;;) {
        struct pollfd p = { s.stop_pipe[0], POLLIN, 0 };
        int r = poll(&p, 1, (int)heartbeat);
        if (r > 0)
            break;
        if (r == 0) {
            printf("heartbeat %lu\n", ++beats);
            fflush(stdout);
        } else if (errno != EINTR) {
            perror("cc_service_c: poll");
            return 1;
        }
    }
    return 0;
}
