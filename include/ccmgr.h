/*
 * ccmgr.h - the service API of ccmgr, for C (C99) and C++.
 *
 * A service started by ccmgr links this API to take part in ccmgr's cooperative protocol:
 * it registers ("alive"), says when its initialisation is done ("ready"), and is called back
 * to shut down, in the instance's shutdown order, when the coordinator asks it to (a stop, or
 * a failure sequence) or, under `takeover = "restart"`, when the coordinator dies.
 *
 * Link with -lccmgr_service (libccmgr_service.so, or libccmgr_service.a plus -lpthread -ldl
 * -lm), built by `cargo build -p ccmgr-capi`. The Rust API is the module ccmgr::service.
 *
 * Typical use (the original design's registration, FIG. 6):
 *
 *     static void on_shutdown(void *arg) { ... make the service stop ... }
 *
 *     int main(int argc, char **argv) {
 *         if (ccmgr_invoked_with_cc(argc, argv)) {
 *             if (ccmgr_alive(on_shutdown, NULL) != 0) {
 *                 fprintf(stderr, "%s\n", ccmgr_last_error());
 *                 return 1;
 *             }
 *         }
 *         ... initialise ...
 *         if (ccmgr_invoked_with_cc(argc, argv) && ccmgr_ready() != 0) {
 *             fprintf(stderr, "%s\n", ccmgr_last_error());
 *             return 1;
 *         }
 *         ... serve ...
 *     }
 *
 * Environment read (set by ccmgr for every service): CCMGR_RUN_DIR (the instance's run
 * directory, where its files are), CCMGR_INSTANCE, CCMGR_SERVICE and NOTIFY_SOCKET.
 *
 * Security: the service never opens the coordinator's own segment. It maps the instance's
 * control segment ($CCMGR_RUN_DIR/<instance>.ctl, mode 0644, written only by the
 * coordinator) read-only, and takes every decision from it; it keeps its component lock in
 * the API file ($CCMGR_RUN_DIR/<instance>.api, mode 0666), which holds nothing trusted. The
 * run directory must be its owner's alone (the instance's owner), as must every file in it.
 * Readiness reaches the coordinator as READY=1 on NOTIFY_SOCKET, where the kernel vouches
 * for the sender's pid.
 *
 * Threads: ccmgr_alive starts one thread ("ccmgr-api") that lives until the shutdown
 * callback has returned. Processes: a child forked (without exec) after ccmgr_alive shares
 * the component lock's open file, so the service counts as alive until the child exits too.
 */
#ifndef CCMGR_H
#define CCMGR_H

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Register with ccmgr as the service that CCMGR_INSTANCE and CCMGR_SERVICE name (the
 * "alive" API). Opens the instance's files, takes this service's component lock (held until
 * the shutdown callback returns, or the process ends) and starts the API's thread.
 *
 * shutdown_cb is called exactly once, with arg, on the API's thread (not the caller's),
 * when it is this service's turn to shut down: after every service before it in the
 * shutdown sequence that the same shutdown concerns has finished its callback or died. It
 * should make the service stop its work or exit; ccmgr does not exit the process. Whatever
 * arg points to must be usable from that thread. When shutdown_cb returns, the next service
 * proceeds.
 *
 * At most once per process. Fails after 10 s if another process holds this service's
 * component lock (an earlier instance of it still running).
 *
 * Returns 0 on success, -1 on error (see ccmgr_last_error). Per the original design, a
 * service should terminate when it fails.
 */
int ccmgr_alive(void (*shutdown_cb)(void *arg), void *arg);

/* What ccmgr_shutdown_reason answers. */
#define CCMGR_SHUTDOWN_REQUESTED 1        /* a stop or a failure sequence asked for it */
#define CCMGR_SHUTDOWN_COORDINATOR_DIED 2 /* the coordinator died; takeover = "restart" */

/*
 * Why the shutdown callback running now was called: CCMGR_SHUTDOWN_REQUESTED or
 * CCMGR_SHUTDOWN_COORDINATOR_DIED; 0 when called outside the callback.
 */
int ccmgr_shutdown_reason(void);

/*
 * Say that initialisation is done (the "ready" API): records it for the services' own
 * bookkeeping and sends READY=1 to NOTIFY_SOCKET, which is how a coordinator waiting for this
 * service (`ready = "cc"`) learns it. Call after ccmgr_alive succeeded. Blocks 5 s at most.
 *
 * Returns 0 on success, -1 on error (see ccmgr_last_error).
 */
int ccmgr_ready(void);

/*
 * Returns 1 if argv[1] is "-cc" (ccmgr's sign that the service should register: `cc_arg =
 * true` in its service file), else 0. argv may be NULL when argc < 2.
 */
int ccmgr_invoked_with_cc(int argc, char **argv);

/*
 * The message of the calling thread's last failed ccmgr_* call: a sentence for the service's
 * log, never NULL ("" before any error). Valid until the same thread's next failing call.
 */
const char *ccmgr_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* CCMGR_H */
