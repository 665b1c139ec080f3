/* LD_PRELOAD shim: fail open() of chosen paths with a chosen errno, the way an NFS/FUSE volume does under load.
 *
 *   FAILOPEN_PATHS  colon-separated SUBSTRING[=ERRNO]; an open whose path contains SUBSTRING may fail, with
 *                   ERRNO (e.g. 5 = EIO, 116 = ESTALE, 107 = ENOTCONN) or else FAILOPEN_ERRNO (default EIO)
 *   FAILOPEN_TIMES  fail the first N opens of each matching path (-1: every open)
 *   FAILOPEN_LOG    a file that gets one line "errno path" per injected failure (the test reads it back)
 *
 * Built by tests at test time with the system C compiler; nothing here is part of the project's runtime.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_SEEN 4096

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static char *seen_path[MAX_SEEN];
static int seen_count[MAX_SEEN];
static int n_seen;

/* The errno an open of `path` fails with when it is chosen, or 0 when it is not. */
static int matches(const char *path) {
    const char *spec = getenv("FAILOPEN_PATHS"), *e = getenv("FAILOPEN_ERRNO");
    if (!spec || !path) return 0;
    char buf[4096];
    strncpy(buf, spec, sizeof buf - 1);
    buf[sizeof buf - 1] = 0;
    for (char *save = NULL, *tok = strtok_r(buf, ":", &save); tok; tok = strtok_r(NULL, ":", &save)) {
        char *eq = strchr(tok, '=');
        if (eq) *eq = 0;
        if (*tok && strstr(path, tok)) return eq ? atoi(eq + 1) : (e ? atoi(e) : EIO);
    }
    return 0;
}

/* The errno when this open of `path` is to fail, else 0 (opens counted per path under a lock: validate reads
 * images on threads). */
static int should_fail(const char *path) {
    int err = matches(path);
    if (!err) return 0;
    const char *t = getenv("FAILOPEN_TIMES");
    int times = t ? atoi(t) : 1, fail = 0, i;
    pthread_mutex_lock(&lock);
    for (i = 0; i < n_seen && strcmp(seen_path[i], path) != 0; i++) {}
    if (i == n_seen && n_seen < MAX_SEEN) { seen_path[n_seen] = strdup(path); seen_count[n_seen++] = 0; }
    if (i < n_seen) { fail = times < 0 || seen_count[i] < times; seen_count[i]++; }
    pthread_mutex_unlock(&lock);
    return fail ? err : 0;
}

static int inject(const char *path, int err) {
    const char *log = getenv("FAILOPEN_LOG");
    if (log) {
        int (*real_open)(const char *, int, ...) = (int (*)(const char *, int, ...))dlsym(RTLD_NEXT, "open");
        int fd = real_open(log, O_WRONLY | O_APPEND | O_CREAT, 0644);
        if (fd >= 0) { dprintf(fd, "%d %s\n", err, path); close(fd); }
    }
    errno = err;
    return -1;
}

#define MODE_ARG(flags) \
    mode_t mode = 0; \
    if ((flags) & (O_CREAT | O_TMPFILE)) { va_list ap; va_start(ap, flags); mode = va_arg(ap, mode_t); va_end(ap); }

#define WRAP_OPEN(name) \
    int name(const char *path, int flags, ...) { \
        MODE_ARG(flags) \
        int err = should_fail(path); \
        if (err) return inject(path, err); \
        int (*real)(const char *, int, ...) = (int (*)(const char *, int, ...))dlsym(RTLD_NEXT, #name); \
        return real(path, flags, mode); \
    }

#define WRAP_OPENAT(name) \
    int name(int dirfd, const char *path, int flags, ...) { \
        MODE_ARG(flags) \
        int err = should_fail(path); \
        if (err) return inject(path, err); \
        int (*real)(int, const char *, int, ...) = (int (*)(int, const char *, int, ...))dlsym(RTLD_NEXT, #name); \
        return real(dirfd, path, flags, mode); \
    }

WRAP_OPEN(open)
WRAP_OPEN(open64)
WRAP_OPENAT(openat)
WRAP_OPENAT(openat64)

/* glibc's fortified entry points (code built with _FORTIFY_SOURCE calls these instead of open/open64) */
int __open_2(const char *path, int flags) {
    int err = should_fail(path);
    if (err) return inject(path, err);
    int (*real)(const char *, int) = (int (*)(const char *, int))dlsym(RTLD_NEXT, "__open_2");
    return real(path, flags);
}

int __open64_2(const char *path, int flags) {
    int err = should_fail(path);
    if (err) return inject(path, err);
    int (*real)(const char *, int) = (int (*)(const char *, int))dlsym(RTLD_NEXT, "__open64_2");
    return real(path, flags);
}
