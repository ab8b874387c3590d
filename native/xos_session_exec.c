/*
 * xos-session-exec: the exec shim that turns a root process into a mapped account's session.
 *
 * The gateway (and the per-session PAM helper) start it as root with posix vfork+exec: no
 * Python runs between the fork and this program's exec, and the caller's Popen returns as
 * soon as this program is running -- still as root, so no user can stop it before that.
 * Everything the account can influence (signals once the uid is theirs, their home on a
 * hung NFS or a FUSE mount of theirs) happens here, where only this session waits on it.
 *
 * Called with the session's stdio as fds 0-2, as a session leader (the caller's setsid),
 * with an empty environment (the session's comes through --env-fd: the dynamic loader
 * honours LD_PRELOAD and GLIBC_TUNABLES for a plain root process, so the session's
 * environment is never this program's own).  In this order:
 *
 *   1. read the environment (NAME=VALUE entries, each ending in a NUL byte) from --env-fd,
 *      close it and every other descriptor above 2;
 *   2. every signal back to its default action, an empty signal mask;
 *   3. as root, the --rlimit limits (only root may raise a hard limit);
 *   4. setgroups(--groups), setresgid(gid, gid, gid), setresuid(uid, uid, uid), and a check
 *      that all three ids of each are the account's (never uid 0 or gid 0);
 *   5. as the account: PR_SET_NO_NEW_PRIVS; with --parent PID, PR_SET_PDEATHSIG(SIGKILL)
 *      (set after the drop, which clears it) and an exit if PID is no longer the parent;
 *   6. with --tty, fd 0 becomes the controlling terminal (TIOCSCTTY);
 *   7. chdir(--home), or "/" when that fails (as before: a missing home is no refusal);
 *   8. execve(EXECUTABLE, ARGV0 ARG..., environment).
 *
 * usage: xos-session-exec --uid UID --gid GID [--groups GID,GID...] --home DIR [--tty]
 *            [--rlimit RESOURCE:SOFT:HARD]... [--parent PID] --env-fd FD
 *            -- EXECUTABLE ARGV0 [ARG]...
 *   (SOFT and HARD: a number or "unlimited"; RESOURCE: the RLIMIT_* number)
 *
 * A failure writes one line "xos-sshd: ..." on fd 2 (the session's stderr) and exits, as
 * env(1) and a shell do: 125 the set-up failed (nothing ran), 126 EXECUTABLE could not be
 * run, 127 EXECUTABLE was not found.
 */
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#define EXIT_SETUP 125
#define EXIT_CANNOT_RUN 126
#define EXIT_NOT_FOUND 127
#define MAX_RLIMITS RLIM_NLIMITS
/* execve(2) takes at most a quarter of the stack limit for argv + environment anyway. */
#define MAX_ENV_BYTES (4u << 20)

struct limit {
    int resource;
    struct rlimit value;
};

struct request {
    uid_t uid;
    gid_t gid;
    gid_t *groups;
    size_t ngroups;
    const char *home;
    int take_tty;
    struct limit limits[MAX_RLIMITS];
    size_t nlimits;
    pid_t parent; /* 0: none */
    int env_fd;
    char *const *command; /* EXECUTABLE, ARGV0, ARG... */
};

/* One line on the session's stderr, then exit with STATUS. */
__attribute__((noreturn, format(printf, 2, 3)))
static void die(int status, const char *fmt, ...)
{
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    if ((size_t)n > sizeof line - 2)
        n = (int)sizeof line - 2;
    memcpy(line + n, "\n", 2);
    ssize_t ignored = write(2, "xos-sshd: ", 10);
    ignored = write(2, line, (size_t)n + 1);
    (void)ignored; /* nothing better to do when stderr is gone */
    _exit(status);
}

/* A decimal number in [min, max], or die naming OPTION. */
static unsigned long long number(const char *text, unsigned long long min,
                                 unsigned long long max, const char *option)
{
    char *end;
    errno = 0;
    unsigned long long value = strtoull(text, &end, 10);
    if (text[0] < '0' || text[0] > '9' || errno || *end || value < min || value > max)
        die(EXIT_SETUP, "session exec shim: bad %s value '%s'", option, text);
    return value;
}

static rlim_t limit_value(const char *text)
{
    if (strcmp(text, "unlimited") == 0)
        return RLIM_INFINITY;
    return (rlim_t)number(text, 0, RLIM_INFINITY - 1, "--rlimit");
}

static void parse_groups(struct request *req, char *list)
{
    size_t count = *list ? 1 : 0;
    if (req->groups)
        die(EXIT_SETUP, "session exec shim: --groups given twice");
    for (const char *p = list; *p; p++)
        count += *p == ',';
    if (count > (size_t)NGROUPS_MAX)
        die(EXIT_SETUP, "session exec shim: more than %d groups", NGROUPS_MAX);
    req->groups = calloc(count ? count : 1, sizeof *req->groups);
    if (!req->groups)
        die(EXIT_SETUP, "session exec shim: out of memory");
    for (char *rest = *list ? list : NULL, *tok; (tok = strsep(&rest, ",")) != NULL;)
        req->groups[req->ngroups++] = (gid_t)number(tok, 1, (gid_t)-2, "--groups"); /* never root's */
}

static void parse_limit(struct request *req, char *spec)
{
    char *soft = strchr(spec, ':');
    char *hard = soft ? strchr(soft + 1, ':') : NULL;
    if (!hard)
        die(EXIT_SETUP, "session exec shim: --rlimit wants RESOURCE:SOFT:HARD, got '%s'", spec);
    *soft++ = '\0';
    *hard++ = '\0';
    if (req->nlimits == MAX_RLIMITS)
        die(EXIT_SETUP, "session exec shim: too many --rlimit options");
    struct limit *l = &req->limits[req->nlimits++];
    l->resource = (int)number(spec, 0, RLIM_NLIMITS - 1, "--rlimit");
    l->value.rlim_cur = limit_value(soft);
    l->value.rlim_max = limit_value(hard);
}

static void usage(void)
{
    die(EXIT_SETUP, "usage: xos-session-exec --uid UID --gid GID [--groups GID,...] --home DIR "
        "[--tty] [--rlimit RES:SOFT:HARD]... [--parent PID] --env-fd FD -- EXECUTABLE ARGV0 "
        "[ARG]...");
}

static void parse(struct request *req, int argc, char **argv)
{
    int have_uid = 0, have_gid = 0, i;
    req->env_fd = -1;
    for (i = 1; i < argc && strcmp(argv[i], "--") != 0; i++) {
        const char *opt = argv[i];
        if (strcmp(opt, "--tty") == 0) {
            req->take_tty = 1;
            continue;
        }
        if (i + 1 >= argc)
            usage();
        char *val = argv[++i];
        if (strcmp(opt, "--uid") == 0) {
            req->uid = (uid_t)number(val, 0, (uid_t)-2, opt);
            have_uid = 1;
        } else if (strcmp(opt, "--gid") == 0) {
            req->gid = (gid_t)number(val, 0, (gid_t)-2, opt);
            have_gid = 1;
        } else if (strcmp(opt, "--groups") == 0) {
            parse_groups(req, val);
        } else if (strcmp(opt, "--home") == 0) {
            req->home = val;
        } else if (strcmp(opt, "--rlimit") == 0) {
            parse_limit(req, val);
        } else if (strcmp(opt, "--parent") == 0) {
            req->parent = (pid_t)number(val, 1, INT_MAX, opt);
        } else if (strcmp(opt, "--env-fd") == 0) {
            req->env_fd = (int)number(val, 3, INT_MAX, opt);
        } else {
            die(EXIT_SETUP, "session exec shim: unknown option '%s'", opt);
        }
    }
    if (!have_uid || !have_gid || !req->home || req->env_fd < 0 || i + 2 >= argc)
        usage();
    if (req->uid == 0 || req->gid == 0)
        die(EXIT_SETUP, "refusing to start a process as uid %u/gid %u",
            (unsigned)req->uid, (unsigned)req->gid);
    req->command = argv + i + 1;
}

/* The whole environment block from FD (then closed): a NULL-terminated envp. */
static char **read_environment(int fd)
{
    size_t size = 0, cap = 4096;
    char *buf = malloc(cap);
    for (;;) {
        if (!buf)
            die(EXIT_SETUP, "session exec shim: out of memory");
        ssize_t n = read(fd, buf + size, cap - size);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            die(EXIT_SETUP, "session exec shim: cannot read the environment: %s", strerror(errno));
        if (n == 0)
            break;
        size += (size_t)n;
        if (size == cap) {
            if (cap >= MAX_ENV_BYTES)
                die(EXIT_SETUP, "session exec shim: environment larger than %u bytes",
                    MAX_ENV_BYTES);
            cap *= 2;
            buf = realloc(buf, cap);
        }
    }
    close(fd);
    if (size && buf[size - 1] != '\0')
        die(EXIT_SETUP, "session exec shim: the environment does not end in a NUL byte");
    size_t count = 0;
    for (size_t i = 0; i < size; i++)
        count += buf[i] == '\0';
    char **envp = calloc(count + 1, sizeof *envp);
    if (!envp)
        die(EXIT_SETUP, "session exec shim: out of memory");
    for (size_t i = 0, at = 0; at < size; i++) {
        char *entry = buf + at;
        if (entry[0] == '=' || !strchr(entry, '='))
            die(EXIT_SETUP, "session exec shim: bad environment entry '%.64s'", entry);
        envp[i] = entry;
        at += strlen(entry) + 1;
    }
    return envp;
}

/* Nothing above fd 2 may reach the session (Popen's close_fds did it; this is the check). */
static void close_other_descriptors(void)
{
    if (close_range(3, ~0u, 0) == 0 || errno == ENOSYS || errno == EINVAL)
        return; /* a kernel before 5.9: the caller's close_fds stands */
    die(EXIT_SETUP, "session exec shim: close_range: %s", strerror(errno));
}

/* SIG_DFL for a signal glibc keeps for itself (32 and 33, its thread cancellation and
 * setxid signals): its sigaction() refuses them, yet an ignored disposition of theirs is
 * inherited across exec like any other.  The kernel's struct sigaction all zeros is SIG_DFL,
 * no flags, an empty mask, whatever the architecture's field order. */
static void default_action_raw(int sig)
{
    unsigned long zero[8] = {0};
    (void)syscall(SYS_rt_sigaction, sig, zero, NULL, (size_t)(NSIG - 1) / 8);
}

static void reset_signals(void)
{
    sigset_t none;
    for (int sig = 1; sig < NSIG; sig++)
        if (sig != SIGKILL && sig != SIGSTOP && signal(sig, SIG_DFL) == SIG_ERR)
            default_action_raw(sig);
    sigemptyset(&none);
    if (sigprocmask(SIG_SETMASK, &none, NULL) != 0)
        die(EXIT_SETUP, "session exec shim: sigprocmask: %s", strerror(errno));
}

static void apply_limits(const struct request *req)
{
    for (size_t i = 0; i < req->nlimits; i++)
        if (setrlimit(req->limits[i].resource, &req->limits[i].value) != 0)
            die(EXIT_SETUP, "cannot set resource limits: resource %d: %s",
                req->limits[i].resource, strerror(errno));
}

static void drop(const struct request *req)
{
    uid_t ru, eu, su;
    gid_t rg, eg, sg;
    if (setgroups(req->ngroups, req->groups) != 0)
        die(EXIT_SETUP, "cannot start a session as uid %u: setgroups: %s",
            (unsigned)req->uid, strerror(errno));
    if (setresgid(req->gid, req->gid, req->gid) != 0)
        die(EXIT_SETUP, "cannot start a session as uid %u: setresgid: %s",
            (unsigned)req->uid, strerror(errno));
    if (setresuid(req->uid, req->uid, req->uid) != 0)
        die(EXIT_SETUP, "cannot start a session as uid %u: setresuid: %s",
            (unsigned)req->uid, strerror(errno));
    if (getresuid(&ru, &eu, &su) != 0 || getresgid(&rg, &eg, &sg) != 0
            || ru != req->uid || eu != req->uid || su != req->uid
            || rg != req->gid || eg != req->gid || sg != req->gid)
        die(EXIT_SETUP, "cannot start a session as uid %u: the credentials did not change",
            (unsigned)req->uid);
}

static void harden(const struct request *req)
{
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
        die(EXIT_SETUP, "cannot set no_new_privs: %s", strerror(errno));
    if (req->parent) {
        if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0)
            die(EXIT_SETUP, "cannot set the parent-death signal: %s", strerror(errno));
        if (getppid() != req->parent) /* it died before the line above */
            _exit(EXIT_SETUP);
    }
    if (req->take_tty && ioctl(0, TIOCSCTTY, 0) != 0)
        die(EXIT_SETUP, "cannot take the session's terminal: %s", strerror(errno));
}

int main(int argc, char **argv)
{
    struct request req;
    memset(&req, 0, sizeof req);
    parse(&req, argc, argv);
    char **envp = read_environment(req.env_fd);
    close_other_descriptors();
    reset_signals();
    apply_limits(&req);
    drop(&req);
    harden(&req);
    if (chdir(req.home) != 0 && chdir("/") != 0)
        die(EXIT_SETUP, "cannot change to / : %s", strerror(errno));
    execve(req.command[0], req.command + 1, envp);
    int err = errno;
    die(err == ENOENT ? EXIT_NOT_FOUND : EXIT_CANNOT_RUN, "cannot run %s: %s",
        req.command[0], strerror(err));
}
