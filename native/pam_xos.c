/*
 * pam_xos.so - Linux-PAM module: fallback login through a stock sshd for
 * VO users that xos-sshd has already mapped to a local account.
 *
 * The module holds no secret and does no cryptography.  It is a thin client
 * of the xos-sshd control socket (docs/internals.md, "control socket"):
 *
 *   auth     pam.challenge {service, user} -> nonce; one PAM_PROMPT_ECHO_ON
 *            "XOS-CHALLENGE <nonce> <service>"; pam.auth {service, user,
 *            answer} on the same connection (the nonce is bound to it).
 *   account  pam.account {service, user}
 *   session  pam.open_session / pam.close_session {service, user, tty, rhost}
 *   setcred  nothing to do: PAM_SUCCESS.
 *
 * Module arguments: socket=PATH (default /run/xos-sshd/control.sock),
 * timeout=SECONDS (default 5: the most one PAM call waits for the daemon;
 * the time the application spends answering the prompt is not counted),
 * debug.
 *
 * Rules:
 *  - Never hang: every connect, send and receive is non-blocking and waits
 *    with poll() for at most the time left before the call's deadline.  A
 *    daemon that is down, slow, or answers garbage gives
 *    PAM_AUTHINFO_UNAVAIL in auth (the call-specific equivalent elsewhere).
 *  - Never leak: the socket is SOCK_CLOEXEC and closed on every path; every
 *    allocation is freed on every path.  No global state.
 *  - Never trust the daemon's bytes: replies are length-prefixed (4 bytes
 *    big-endian), at most 64 KiB, parsed by a strict JSON reader with bounds
 *    checks and a nesting limit; the daemon must be root (SO_PEERCRED) so
 *    that a socket planted by someone else can never grant a login.
 *  - Never raise SIGPIPE in the application (MSG_NOSIGNAL).
 *  - Only return the codes Linux-PAM documents for each pam_sm_* call.
 */
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/un.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#include <security/pam_ext.h>
#include <security/pam_modules.h>

#define EXPORT __attribute__((visibility("default")))

#define DEFAULT_SOCKET "/run/xos-sshd/control.sock"
#define DEFAULT_TIMEOUT_MS 5000L
#define MAX_TIMEOUT_MS 600000L       /* timeout=600 at most */
#define MAX_FRAME (64u * 1024u)      /* the control socket's frame limit */
#define MAX_NAME 1024u               /* user, service: longer is refused */
#define MAX_INFO 256u                /* tty, rhost: longer ones are not sent */
#define MAX_NONCE 1368u              /* base64 of 1024 bytes (the client's limit) */
#define MAX_SERVICE 64u              /* the client's service name limit */
#define MAX_DEPTH 32                 /* JSON nesting accepted in a reply */
#define MAX_LOGGED 256u              /* bytes of a daemon string put in syslog */

/* An answer is base64 (no escaping); the frame must still hold the other
 * fields.  Real answers are a few KiB (one certificate chain). */
#define MAX_ANSWER (60u * 1024u)

struct options {
	const char *socket;
	long timeout_ms;
	bool debug;
};

/* ---------------------------------------------------------------------- */
/* Arguments                                                              */

static void parse_options(pam_handle_t *pamh, int argc, const char **argv, struct options *o)
{
	o->socket = DEFAULT_SOCKET;
	o->timeout_ms = DEFAULT_TIMEOUT_MS;
	o->debug = false;

	for (int i = 0; i < argc; i++) {
		const char *a = argv[i];

		if (strncmp(a, "socket=", 7) == 0) {
			if (a[7] == '/')
				o->socket = a + 7;
			else
				pam_syslog(pamh, LOG_ERR, "bad module argument %s (an absolute path); using %s",
					   a, o->socket);
		} else if (strncmp(a, "timeout=", 8) == 0) {
			char *end = NULL;
			double secs;

			errno = 0;
			secs = strtod(a + 8, &end);
			if (errno != 0 || end == a + 8 || *end != '\0' || !(secs > 0.0) ||
			    secs * 1000.0 > (double)MAX_TIMEOUT_MS) {
				pam_syslog(pamh, LOG_ERR, "bad module argument %s (seconds, > 0, <= %ld); using %ld",
					   a, MAX_TIMEOUT_MS / 1000, DEFAULT_TIMEOUT_MS / 1000);
				continue;
			}
			o->timeout_ms = (long)(secs * 1000.0 + 0.5);
			if (o->timeout_ms < 1)
				o->timeout_ms = 1;
		} else if (strcmp(a, "debug") == 0) {
			o->debug = true;
		} else {
			pam_syslog(pamh, LOG_ERR, "unknown module argument ignored: %s", a);
		}
	}
}

/* ---------------------------------------------------------------------- */
/* Text helpers                                                           */

/* Length of the valid UTF-8 sequence at s[0..n), or 0 if it is not one
 * (overlong forms, surrogates and code points above U+10FFFF refused). */
static size_t utf8_seq(const unsigned char *s, size_t n)
{
	unsigned char c = s[0];
	size_t len;
	uint32_t cp;

	if (c < 0x80)
		return 1;
	if (c >= 0xc2 && c <= 0xdf) {
		len = 2;
		cp = c & 0x1f;
	} else if (c >= 0xe0 && c <= 0xef) {
		len = 3;
		cp = c & 0x0f;
	} else if (c >= 0xf0 && c <= 0xf4) {
		len = 4;
		cp = c & 0x07;
	} else {
		return 0;
	}
	if (n < len)
		return 0;
	for (size_t i = 1; i < len; i++) {
		if ((s[i] & 0xc0) != 0x80)
			return 0;
		cp = (cp << 6) | (s[i] & 0x3f);
	}
	if ((len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) || cp > 0x10ffff ||
	    (cp >= 0xd800 && cp <= 0xdfff))
		return 0;
	return len;
}

static bool utf8_valid(const char *s)
{
	const unsigned char *p = (const unsigned char *)s;
	size_t n = strlen(s);

	for (size_t i = 0; i < n;) {
		size_t l = utf8_seq(p + i, n - i);
		if (l == 0)
			return false;
		i += l;
	}
	return true;
}

/* True when s is 1..max characters, each alphanumeric or one of extra. */
static bool charset_ok(const char *s, size_t max, const char *extra)
{
	size_t n = strlen(s);

	if (n == 0 || n > max)
		return false;
	for (size_t i = 0; i < n; i++) {
		char c = s[i];
		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
		      strchr(extra, c)))
			return false;
	}
	return true;
}

/* A PAM service name as the client accepts it in the prompt:
 * [A-Za-z0-9._+-]{1,64}. */
static bool service_ok(const char *s)
{
	return charset_ok(s, MAX_SERVICE, "._+-");
}

/* The nonce goes into the prompt verbatim: only base64 characters. */
static bool nonce_ok(const char *s)
{
	return charset_ok(s, MAX_NONCE, "+/=");
}

/* Copies a daemon-supplied string for syslog: control characters become
 * '?', at most MAX_LOGGED bytes. */
static void log_safe(char out[MAX_LOGGED + 1], const char *s)
{
	size_t i = 0;

	if (s == NULL)
		s = "";
	for (; s[i] != '\0' && i < MAX_LOGGED; i++) {
		unsigned char c = (unsigned char)s[i];
		out[i] = (c < 0x20 || c == 0x7f) ? '?' : (char)c;
	}
	out[i] = '\0';
}

/* ---------------------------------------------------------------------- */
/* Growable buffer and the JSON request encoder                           */

struct buf {
	char *p;
	size_t len, cap;
	bool failed;            /* out of memory or over MAX_FRAME */
};

static void buf_put(struct buf *b, const void *data, size_t n)
{
	if (b->failed)
		return;
	if (n > MAX_FRAME + 4u - b->len) {
		b->failed = true;
		return;
	}
	if (b->len + n > b->cap) {
		size_t cap = b->cap ? b->cap : 256;
		char *p;

		while (cap < b->len + n)
			cap *= 2;
		p = realloc(b->p, cap);
		if (p == NULL) {
			b->failed = true;
			return;
		}
		b->p = p;
		b->cap = cap;
	}
	memcpy(b->p + b->len, data, n);
	b->len += n;
}

static void buf_puts(struct buf *b, const char *s)
{
	buf_put(b, s, strlen(s));
}

static void buf_free(struct buf *b)
{
	free(b->p);
	b->p = NULL;
	b->len = b->cap = 0;
}

enum utf8_mode { UTF8_STRICT, UTF8_LOSSY };

/* Appends s as a JSON string.  Quote, backslash, every byte < 0x20 and DEL
 * are escaped; valid UTF-8 passes through.  Invalid UTF-8 fails in strict
 * mode and becomes U+FFFD in lossy mode.  NULL is written as null. */
static bool json_string(struct buf *b, const char *s, enum utf8_mode mode)
{
	static const char hex[] = "0123456789abcdef";
	const unsigned char *p = (const unsigned char *)s;
	size_t n;

	if (s == NULL) {
		buf_puts(b, "null");
		return true;
	}
	n = strlen(s);
	buf_put(b, "\"", 1);
	for (size_t i = 0; i < n;) {
		unsigned char c = p[i];

		if (c == '"' || c == '\\') {
			char esc[2] = { '\\', (char)c };
			buf_put(b, esc, 2);
			i++;
		} else if (c < 0x20 || c == 0x7f) {
			char esc[6] = { '\\', 'u', '0', '0', hex[c >> 4], hex[c & 15] };
			buf_put(b, esc, 6);
			i++;
		} else if (c < 0x80) {
			buf_put(b, &p[i], 1);
			i++;
		} else {
			size_t l = utf8_seq(p + i, n - i);

			if (l == 0) {
				if (mode == UTF8_STRICT)
					return false;
				buf_puts(b, "\\ufffd");
				i++;
			} else {
				buf_put(b, &p[i], l);
				i += l;
			}
		}
	}
	buf_put(b, "\"", 1);
	return true;
}

struct field {
	const char *key;        /* a plain ASCII identifier */
	const char *value;      /* NULL: JSON null */
	enum utf8_mode mode;
};

/* Builds one frame: 4-byte big-endian length, then {"op": OP, fields...}.
 * Returns false for an invalid strict field, out of memory, or a frame over
 * MAX_FRAME. */
static bool build_frame(struct buf *b, const char *op, const struct field *f, size_t nf)
{
	uint32_t len;

	buf_put(b, "\0\0\0\0", 4);
	buf_puts(b, "{\"op\":");
	json_string(b, op, UTF8_STRICT);
	for (size_t i = 0; i < nf; i++) {
		buf_puts(b, ",\"");
		buf_puts(b, f[i].key);
		buf_puts(b, "\":");
		if (!json_string(b, f[i].value, f[i].mode))
			return false;
	}
	buf_puts(b, "}");
	if (b->failed || b->len - 4 > MAX_FRAME)
		return false;
	len = (uint32_t)(b->len - 4);
	b->p[0] = (char)(len >> 24);
	b->p[1] = (char)(len >> 16);
	b->p[2] = (char)(len >> 8);
	b->p[3] = (char)len;
	return true;
}

/* ---------------------------------------------------------------------- */
/* The reply parser                                                       */

/* What pam_xos reads from a reply: top-level "ok" (must be true or false),
 * and the top-level strings "nonce", "reason", "error".  Everything else is
 * validated as JSON and skipped. */
struct reply {
	int ok;                 /* -1: absent */
	char *nonce, *reason, *error;
};

static void reply_free(struct reply *r)
{
	free(r->nonce);
	free(r->reason);
	free(r->error);
	memset(r, 0, sizeof(*r));
	r->ok = -1;
}

struct json {
	const char *p, *end;
};

static void skip_ws(struct json *j)
{
	while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
		j->p++;
}

static int hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

static bool read_hex4(struct json *j, uint32_t *out)
{
	uint32_t v = 0;

	if (j->end - j->p < 4)
		return false;
	for (int i = 0; i < 4; i++) {
		int h = hexval(j->p[i]);
		if (h < 0)
			return false;
		v = (v << 4) | (uint32_t)h;
	}
	j->p += 4;
	*out = v;
	return true;
}

/* Writes one code point as UTF-8 if out is not NULL (room guaranteed by the
 * caller: decoded text is never longer than its JSON form). */
static size_t put_utf8(char *out, uint32_t cp)
{
	unsigned char t[4];
	size_t n;

	if (cp < 0x80) {
		t[0] = (unsigned char)cp;
		n = 1;
	} else if (cp < 0x800) {
		t[0] = (unsigned char)(0xc0 | (cp >> 6));
		t[1] = (unsigned char)(0x80 | (cp & 0x3f));
		n = 2;
	} else if (cp < 0x10000) {
		t[0] = (unsigned char)(0xe0 | (cp >> 12));
		t[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3f));
		t[2] = (unsigned char)(0x80 | (cp & 0x3f));
		n = 3;
	} else {
		t[0] = (unsigned char)(0xf0 | (cp >> 18));
		t[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3f));
		t[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3f));
		t[3] = (unsigned char)(0x80 | (cp & 0x3f));
		n = 4;
	}
	if (out)
		memcpy(out, t, n);
	return n;
}

/* Parses a JSON string at j->p (which must be '"').  If out is not NULL it
 * receives the decoded, NUL-terminated text and must have room for
 * (j->end - j->p) bytes; a decoded NUL is then refused (C strings).  Raw
 * control characters, bad escapes and lone surrogates are refused. */
static bool parse_string(struct json *j, char *out, size_t *out_len)
{
	size_t n = 0;

	if (j->p >= j->end || *j->p != '"')
		return false;
	j->p++;
	while (j->p < j->end) {
		unsigned char c = (unsigned char)*j->p++;

		if (c == '"') {
			if (out)
				out[n] = '\0';
			if (out_len)
				*out_len = n;
			return true;
		}
		if (c < 0x20)
			return false;
		if (c != '\\') {
			if (out)
				out[n] = (char)c;
			n++;
			continue;
		}
		if (j->p >= j->end)
			return false;
		c = (unsigned char)*j->p++;
		char simple = 0;
		switch (c) {
		case '"': simple = '"'; break;
		case '\\': simple = '\\'; break;
		case '/': simple = '/'; break;
		case 'b': simple = '\b'; break;
		case 'f': simple = '\f'; break;
		case 'n': simple = '\n'; break;
		case 'r': simple = '\r'; break;
		case 't': simple = '\t'; break;
		case 'u': {
			uint32_t cp, lo;

			if (!read_hex4(j, &cp))
				return false;
			if (cp >= 0xdc00 && cp <= 0xdfff)
				return false;
			if (cp >= 0xd800 && cp <= 0xdbff) {
				if (j->end - j->p < 2 || j->p[0] != '\\' || j->p[1] != 'u')
					return false;
				j->p += 2;
				if (!read_hex4(j, &lo) || lo < 0xdc00 || lo > 0xdfff)
					return false;
				cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
			}
			if (cp == 0 && out)
				return false;
			n += put_utf8(out ? out + n : NULL, cp);
			continue;
		}
		default:
			return false;
		}
		if (out)
			out[n] = simple;
		n++;
	}
	return false;
}

static bool parse_number(struct json *j)
{
	const char *start;

	if (j->p < j->end && *j->p == '-')
		j->p++;
	if (j->p >= j->end)
		return false;
	if (*j->p == '0') {
		j->p++;
	} else if (*j->p >= '1' && *j->p <= '9') {
		while (j->p < j->end && *j->p >= '0' && *j->p <= '9')
			j->p++;
	} else {
		return false;
	}
	if (j->p < j->end && *j->p == '.') {
		j->p++;
		start = j->p;
		while (j->p < j->end && *j->p >= '0' && *j->p <= '9')
			j->p++;
		if (j->p == start)
			return false;
	}
	if (j->p < j->end && (*j->p == 'e' || *j->p == 'E')) {
		j->p++;
		if (j->p < j->end && (*j->p == '+' || *j->p == '-'))
			j->p++;
		start = j->p;
		while (j->p < j->end && *j->p >= '0' && *j->p <= '9')
			j->p++;
		if (j->p == start)
			return false;
	}
	return true;
}

static bool parse_literal(struct json *j, const char *lit)
{
	size_t n = strlen(lit);

	if ((size_t)(j->end - j->p) < n || memcmp(j->p, lit, n) != 0)
		return false;
	j->p += n;
	return true;
}

/* Validates and skips any JSON value. */
static bool skip_value(struct json *j, int depth)
{
	if (depth > MAX_DEPTH)
		return false;
	skip_ws(j);
	if (j->p >= j->end)
		return false;
	switch (*j->p) {
	case '"':
		return parse_string(j, NULL, NULL);
	case 't':
		return parse_literal(j, "true");
	case 'f':
		return parse_literal(j, "false");
	case 'n':
		return parse_literal(j, "null");
	case '{':
	case '[': {
		bool object = *j->p == '{';
		char close = object ? '}' : ']';

		j->p++;
		skip_ws(j);
		if (j->p < j->end && *j->p == close) {
			j->p++;
			return true;
		}
		for (;;) {
			if (object) {
				skip_ws(j);
				if (!parse_string(j, NULL, NULL))
					return false;
				skip_ws(j);
				if (j->p >= j->end || *j->p != ':')
					return false;
				j->p++;
			}
			if (!skip_value(j, depth + 1))
				return false;
			skip_ws(j);
			if (j->p >= j->end)
				return false;
			if (*j->p == ',') {
				j->p++;
				continue;
			}
			if (*j->p == close) {
				j->p++;
				return true;
			}
			return false;
		}
	}
	default:
		return parse_number(j);
	}
}

/* Reads a top-level string member into *dst (a fresh allocation).  A
 * repeated member makes the reply malformed. */
static bool take_string(struct json *j, char **dst)
{
	size_t room = (size_t)(j->end - j->p);
	char *s;

	if (*dst != NULL)
		return false;
	skip_ws(j);
	if (j->p < j->end && *j->p == 'n')      /* "error": null is "absent" */
		return parse_literal(j, "null");
	s = malloc(room + 1);
	if (s == NULL)
		return false;
	if (!parse_string(j, s, NULL)) {
		free(s);
		return false;
	}
	*dst = s;
	return true;
}

/* Parses one reply: a JSON object (and nothing else but whitespace) with a
 * boolean "ok".  On failure r is left empty. */
static bool parse_reply(const char *data, size_t len, struct reply *r)
{
	struct json j = { data, data + len };
	char key[16];
	size_t klen;

	reply_free(r);
	skip_ws(&j);
	if (j.p >= j.end || *j.p != '{')
		goto bad;
	j.p++;
	skip_ws(&j);
	if (j.p < j.end && *j.p == '}') {
		j.p++;
	} else {
		for (;;) {
			struct json k;

			skip_ws(&j);
			/* Decode the key only if it can be one we want (short, no NUL). */
			k = j;
			if (!parse_string(&k, NULL, &klen))
				goto bad;
			if (klen >= sizeof(key) || !parse_string(&j, key, NULL))
				key[0] = '\0';
			j = k;
			skip_ws(&j);
			if (j.p >= j.end || *j.p != ':')
				goto bad;
			j.p++;
			skip_ws(&j);
			if (strcmp(key, "ok") == 0) {
				if (r->ok != -1)
					goto bad;
				if (parse_literal(&j, "true"))
					r->ok = 1;
				else if (parse_literal(&j, "false"))
					r->ok = 0;
				else
					goto bad;
			} else if (strcmp(key, "nonce") == 0) {
				if (!take_string(&j, &r->nonce))
					goto bad;
			} else if (strcmp(key, "reason") == 0) {
				if (!take_string(&j, &r->reason))
					goto bad;
			} else if (strcmp(key, "error") == 0) {
				if (!take_string(&j, &r->error))
					goto bad;
			} else if (!skip_value(&j, 1)) {
				goto bad;
			}
			skip_ws(&j);
			if (j.p >= j.end)
				goto bad;
			if (*j.p == ',') {
				j.p++;
				continue;
			}
			if (*j.p == '}') {
				j.p++;
				break;
			}
			goto bad;
		}
	}
	skip_ws(&j);
	if (j.p != j.end || r->ok == -1)
		goto bad;
	return true;
bad:
	reply_free(r);
	return false;
}

/* ---------------------------------------------------------------------- */
/* The connection: every wait bounded by the call's deadline              */

struct conn {
	pam_handle_t *pamh;
	const struct options *o;
	int fd;
	struct timespec deadline;       /* CLOCK_MONOTONIC */
};

static struct timespec now_mono(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t;
}

static long long ts_ms(struct timespec t)
{
	return (long long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

static void ts_add_ms(struct timespec *t, long long ms)
{
	t->tv_sec += (time_t)(ms / 1000);
	t->tv_nsec += (long)(ms % 1000) * 1000000L;
	if (t->tv_nsec >= 1000000000L) {
		t->tv_sec++;
		t->tv_nsec -= 1000000000L;
	}
}

/* Milliseconds left before the deadline (rounded up), 0 if it has passed. */
static int remaining_ms(const struct conn *c)
{
	struct timespec now = now_mono();
	long long ns = ((long long)c->deadline.tv_sec - now.tv_sec) * 1000000000LL +
		       (c->deadline.tv_nsec - now.tv_nsec);

	if (ns <= 0)
		return 0;
	ns = (ns + 999999) / 1000000;
	return ns > INT_MAX ? INT_MAX : (int)ns;
}

/* Waits for events on the socket until the deadline.  0 on readiness,
 * -1 with errno (ETIMEDOUT when the time is up). */
static int wait_fd(struct conn *c, short events)
{
	for (;;) {
		struct pollfd pfd = { .fd = c->fd, .events = events, .revents = 0 };
		int ms = remaining_ms(c);
		int r;

		if (ms == 0) {
			errno = ETIMEDOUT;
			return -1;
		}
		r = poll(&pfd, 1, ms);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		if (r == 0)
			continue;       /* re-check the clock */
		if (pfd.revents & POLLNVAL) {
			errno = EBADF;
			return -1;
		}
		return 0;               /* readable/writable, or HUP/ERR: the I/O call reports it */
	}
}

static void conn_close(struct conn *c)
{
	if (c->fd >= 0) {
		close(c->fd);
		c->fd = -1;
	}
}

/* Connects to the daemon.  On failure logs why and returns false (the fd
 * is closed). */
static bool conn_open(struct conn *c)
{
	struct sockaddr_un sa;
	size_t plen = strlen(c->o->socket);
	long backoff = 5;
	struct ucred cred;
	socklen_t clen = sizeof(cred);

	c->fd = -1;
	memset(&sa, 0, sizeof(sa));
	sa.sun_family = AF_UNIX;
	if (plen == 0 || plen >= sizeof(sa.sun_path)) {
		pam_syslog(c->pamh, LOG_ERR, "socket path too long: %s", c->o->socket);
		return false;
	}
	memcpy(sa.sun_path, c->o->socket, plen);

	c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (c->fd < 0) {
		pam_syslog(c->pamh, LOG_ERR, "socket: %m");
		return false;
	}
	for (;;) {
		if (connect(c->fd, (struct sockaddr *)&sa, sizeof(sa)) == 0)
			break;
		/* EINTR: the connection goes on in the background, as for EINPROGRESS. */
		if (errno == EINPROGRESS || errno == EINTR) {
			int err = 0;
			socklen_t elen = sizeof(err);

			if (wait_fd(c, POLLOUT) < 0)
				goto fail;
			if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &elen) < 0)
				goto fail;
			if (err != 0) {
				errno = err;
				goto fail;
			}
			break;
		}
		if (errno == EAGAIN) {
			/* AF_UNIX: the listen backlog is full; retry until the deadline. */
			int ms = remaining_ms(c);

			if (ms == 0) {
				errno = ETIMEDOUT;
				goto fail;
			}
			poll(NULL, 0, ms < backoff ? ms : (int)backoff);
			if (backoff < 100)
				backoff *= 2;
			continue;
		}
		goto fail;
	}
	/* Only root's daemon may answer: a socket planted by anyone else is
	 * never believed. */
	if (getsockopt(c->fd, SOL_SOCKET, SO_PEERCRED, &cred, &clen) < 0)
		goto fail;
	if (cred.uid != 0) {
		pam_syslog(c->pamh, LOG_ERR, "%s is served by uid %u, not root: not trusted",
			   c->o->socket, (unsigned)cred.uid);
		conn_close(c);
		return false;
	}
	return true;
fail:
	pam_syslog(c->pamh, LOG_ERR, "cannot connect to xos-sshd at %s: %m", c->o->socket);
	conn_close(c);
	return false;
}

static bool send_all(struct conn *c, const char *p, size_t n)
{
	while (n > 0) {
		ssize_t w = send(c->fd, p, n, MSG_NOSIGNAL);

		if (w > 0) {
			p += w;
			n -= (size_t)w;
			continue;
		}
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
			if (wait_fd(c, POLLOUT) < 0)
				return false;
			continue;
		}
		if (w == 0)
			errno = EPIPE;
		return false;
	}
	return true;
}

static bool recv_exact(struct conn *c, char *p, size_t n)
{
	while (n > 0) {
		ssize_t r = recv(c->fd, p, n, 0);

		if (r > 0) {
			p += r;
			n -= (size_t)r;
			continue;
		}
		if (r == 0) {
			errno = ECONNRESET;     /* closed by the daemon */
			return false;
		}
		if (errno == EINTR)
			continue;
		if (errno == EAGAIN || errno == EWOULDBLOCK) {
			if (wait_fd(c, POLLIN) < 0)
				return false;
			continue;
		}
		return false;
	}
	return true;
}

/* One request/reply exchange.  Returns true with *r parsed, or false when
 * the daemon could not be used (cause logged): unreachable, timed out,
 * closed, oversized or malformed reply, or a request we cannot encode. */
static bool rpc(struct conn *c, const char *op, const struct field *f, size_t nf, struct reply *r)
{
	struct buf req = { 0 };
	unsigned char hdr[4];
	uint32_t len;
	char *data = NULL;
	bool ok = false;

	reply_free(r);
	if (!build_frame(&req, op, f, nf)) {
		pam_syslog(c->pamh, LOG_ERR, "%s: cannot encode the request (invalid UTF-8, too long, or out of memory)", op);
		goto out;
	}
	if (c->o->debug)
		pam_syslog(c->pamh, LOG_DEBUG, "%s: sending %zu bytes", op, req.len - 4);
	if (!send_all(c, req.p, req.len)) {
		pam_syslog(c->pamh, LOG_ERR, "%s: sending to xos-sshd failed: %m", op);
		goto out;
	}
	if (!recv_exact(c, (char *)hdr, 4)) {
		pam_syslog(c->pamh, LOG_ERR, "%s: no reply from xos-sshd: %m", op);
		goto out;
	}
	len = (uint32_t)hdr[0] << 24 | (uint32_t)hdr[1] << 16 | (uint32_t)hdr[2] << 8 | hdr[3];
	if (len == 0 || len > MAX_FRAME) {
		pam_syslog(c->pamh, LOG_ERR, "%s: reply of %u bytes refused (limit %u)", op, len, MAX_FRAME);
		goto out;
	}
	data = malloc(len);
	if (data == NULL) {
		pam_syslog(c->pamh, LOG_CRIT, "%s: out of memory", op);
		goto out;
	}
	if (!recv_exact(c, data, len)) {
		pam_syslog(c->pamh, LOG_ERR, "%s: incomplete reply from xos-sshd: %m", op);
		goto out;
	}
	if (!parse_reply(data, len, r)) {
		pam_syslog(c->pamh, LOG_ERR, "%s: malformed reply from xos-sshd", op);
		goto out;
	}
	if (c->o->debug)
		pam_syslog(c->pamh, LOG_DEBUG, "%s: reply ok=%d", op, r->ok);
	ok = true;
out:
	free(data);
	buf_free(&req);
	return ok;
}

/* Reasons the daemon gives when it could not serve the request at all (as
 * opposed to refusing the user): treated like an unreachable daemon. */
static bool service_failure(const char *reason)
{
	static const char *const codes[] = {
		"bad-request", "unknown-op", "permission-denied", "frame-too-large",
		"frame-timeout", "truncated-frame", "reply-too-large", "timeout",
		"internal-error", "busy", NULL,
	};

	if (reason == NULL)
		return true;            /* a refusal without a reason is malformed */
	for (size_t i = 0; codes[i]; i++)
		if (strcmp(reason, codes[i]) == 0)
			return true;
	return false;
}

static void log_refusal(pam_handle_t *pamh, const char *op, const char *user, const struct reply *r)
{
	char reason[MAX_LOGGED + 1], error[MAX_LOGGED + 1], who[MAX_LOGGED + 1];

	log_safe(reason, r->reason ? r->reason : "(no reason)");
	log_safe(error, r->error);
	log_safe(who, user);
	pam_syslog(pamh, LOG_NOTICE, "%s refused for user %s: %s%s%s", op, who, reason,
		   error[0] ? ": " : "", error);
}

static bool reason_is(const struct reply *r, const char *code)
{
	return r->reason != NULL && strcmp(r->reason, code) == 0;
}

/* ---------------------------------------------------------------------- */
/* Common setup                                                           */

enum names { NAMES_OK, NAMES_NO_USER, NAMES_NO_SERVICE };

/* The PAM user (asked for through pam_get_user in auth, read as an item
 * elsewhere) and the PAM service, both checked: non-empty, at most
 * MAX_NAME bytes, valid UTF-8. */
static enum names get_names(pam_handle_t *pamh, bool prompt, const char **user, const char **service)
{
	const void *item = NULL;
	int rc;

	*user = NULL;
	*service = NULL;
	if (prompt) {
		rc = pam_get_user(pamh, user, NULL);
	} else {
		rc = pam_get_item(pamh, PAM_USER, &item);
		*user = item;
	}
	if (rc != PAM_SUCCESS || *user == NULL || **user == '\0') {
		pam_syslog(pamh, LOG_NOTICE, "no user name");
		return NAMES_NO_USER;
	}
	if (strlen(*user) > MAX_NAME || !utf8_valid(*user)) {
		pam_syslog(pamh, LOG_NOTICE, "user name refused (too long or not UTF-8)");
		return NAMES_NO_USER;
	}
	item = NULL;
	if (pam_get_item(pamh, PAM_SERVICE, &item) != PAM_SUCCESS || item == NULL ||
	    strlen(item) > MAX_NAME || !utf8_valid(item)) {
		pam_syslog(pamh, LOG_ERR, "no usable PAM service name");
		return NAMES_NO_SERVICE;
	}
	*service = item;
	return NAMES_OK;
}

static void conn_init(struct conn *c, pam_handle_t *pamh, const struct options *o)
{
	c->pamh = pamh;
	c->o = o;
	c->fd = -1;
	c->deadline = now_mono();
	ts_add_ms(&c->deadline, o->timeout_ms);
}

/* A PAM item as an informational string field: NULL if unset. */
static const char *item_str(pam_handle_t *pamh, int type)
{
	const void *item = NULL;

	if (pam_get_item(pamh, type, &item) != PAM_SUCCESS || item == NULL)
		return NULL;
	if (strnlen(item, MAX_INFO + 1) > MAX_INFO)
		return NULL;
	return item;
}

/* ---------------------------------------------------------------------- */
/* auth                                                                   */

EXPORT int pam_sm_authenticate(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
	struct options o;
	struct conn c;
	struct reply r = { .ok = -1 };
	const char *user, *service;
	char *answer = NULL;
	int rc = PAM_AUTHINFO_UNAVAIL;
	struct timespec conv_start;
	long long conv_ms;

	(void)flags;
	parse_options(pamh, argc, argv, &o);
	switch (get_names(pamh, true, &user, &service)) {
	case NAMES_OK: break;
	case NAMES_NO_USER: return PAM_USER_UNKNOWN;
	default: return PAM_AUTHINFO_UNAVAIL;
	}
	if (!service_ok(service)) {
		pam_syslog(pamh, LOG_ERR, "PAM service name unusable in the XOS challenge ([A-Za-z0-9._+-]{1,64})");
		return PAM_AUTHINFO_UNAVAIL;
	}
	conn_init(&c, pamh, &o);
	if (!conn_open(&c))
		return PAM_AUTHINFO_UNAVAIL;

	{
		const struct field f[] = {
			{ "service", service, UTF8_STRICT },
			{ "user", user, UTF8_STRICT },
		};
		if (!rpc(&c, "pam.challenge", f, 2, &r))
			goto out;               /* PAM_AUTHINFO_UNAVAIL */
	}
	if (r.ok != 1) {
		log_refusal(pamh, "pam.challenge", user, &r);
		rc = service_failure(r.reason) ? PAM_AUTHINFO_UNAVAIL :
		     reason_is(&r, "not-mapped") ? PAM_USER_UNKNOWN : PAM_AUTH_ERR;
		goto out;
	}
	if (r.nonce == NULL || !nonce_ok(r.nonce)) {
		pam_syslog(pamh, LOG_ERR, "pam.challenge: reply without a valid base64 nonce");
		goto out;
	}

	/* The application's conversation is not the daemon's time: the
	 * deadline moves by however long the answer took. */
	conv_start = now_mono();
	rc = pam_prompt(pamh, PAM_PROMPT_ECHO_ON, &answer, "XOS-CHALLENGE %s %s", r.nonce, service);
	conv_ms = ts_ms(now_mono()) - ts_ms(conv_start);
	ts_add_ms(&c.deadline, conv_ms > 0 ? conv_ms : 0);
	if (rc != PAM_SUCCESS) {
		pam_syslog(pamh, LOG_NOTICE, "conversation failed: %s", pam_strerror(pamh, rc));
		rc = PAM_CRED_INSUFFICIENT;
		goto out;
	}
	if (answer == NULL || answer[0] == '\0') {
		pam_syslog(pamh, LOG_NOTICE, "no answer to the XOS challenge for user %s", user);
		rc = PAM_AUTH_ERR;
		goto out;
	}
	if (strlen(answer) > MAX_ANSWER) {
		pam_syslog(pamh, LOG_NOTICE, "answer to the XOS challenge too long (%zu bytes)", strlen(answer));
		rc = PAM_AUTH_ERR;
		goto out;
	}

	{
		const struct field f[] = {
			{ "service", service, UTF8_STRICT },
			{ "user", user, UTF8_STRICT },
			{ "answer", answer, UTF8_LOSSY },
			{ "rhost", item_str(pamh, PAM_RHOST), UTF8_LOSSY },
		};
		rc = PAM_AUTHINFO_UNAVAIL;
		if (!rpc(&c, "pam.auth", f, 4, &r))
			goto out;
	}
	if (r.ok == 1) {
		if (o.debug)
			pam_syslog(pamh, LOG_DEBUG, "pam.auth accepted user %s", user);
		rc = PAM_SUCCESS;
	} else {
		log_refusal(pamh, "pam.auth", user, &r);
		rc = service_failure(r.reason) ? PAM_AUTHINFO_UNAVAIL :
		     reason_is(&r, "not-mapped") ? PAM_USER_UNKNOWN : PAM_AUTH_ERR;
	}
out:
	free(answer);
	reply_free(&r);
	conn_close(&c);
	return rc;
}

EXPORT int pam_sm_setcred(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
	(void)pamh;
	(void)flags;
	(void)argc;
	(void)argv;
	return PAM_SUCCESS;
}

/* ---------------------------------------------------------------------- */
/* account                                                                */

/* pam_sm_acct_mgmt may return PAM_ACCT_EXPIRED, PAM_AUTH_ERR,
 * PAM_NEW_AUTHTOK_REQD, PAM_PERM_DENIED, PAM_SUCCESS, PAM_USER_UNKNOWN.
 * "The daemon could not be asked" is PAM_AUTH_ERR; "the daemon says no" is
 * PAM_PERM_DENIED, PAM_ACCT_EXPIRED or PAM_USER_UNKNOWN. */
EXPORT int pam_sm_acct_mgmt(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
	struct options o;
	struct conn c;
	struct reply r = { .ok = -1 };
	const char *user, *service;
	int rc = PAM_AUTH_ERR;

	(void)flags;
	parse_options(pamh, argc, argv, &o);
	switch (get_names(pamh, false, &user, &service)) {
	case NAMES_OK: break;
	case NAMES_NO_USER: return PAM_USER_UNKNOWN;
	default: return PAM_AUTH_ERR;
	}
	conn_init(&c, pamh, &o);
	if (!conn_open(&c))
		return PAM_AUTH_ERR;
	{
		const struct field f[] = {
			{ "service", service, UTF8_STRICT },
			{ "user", user, UTF8_STRICT },
		};
		if (!rpc(&c, "pam.account", f, 2, &r))
			goto out;
	}
	if (r.ok == 1) {
		rc = PAM_SUCCESS;
	} else {
		log_refusal(pamh, "pam.account", user, &r);
		if (service_failure(r.reason))
			rc = PAM_AUTH_ERR;
		else if (reason_is(&r, "not-mapped"))
			rc = PAM_USER_UNKNOWN;
		else if (reason_is(&r, "expired") || reason_is(&r, "lease-expired"))
			rc = PAM_ACCT_EXPIRED;
		else
			rc = PAM_PERM_DENIED;   /* banned, revoked, ... */
	}
out:
	reply_free(&r);
	conn_close(&c);
	return rc;
}

/* ---------------------------------------------------------------------- */
/* session                                                                */

static int session_call(pam_handle_t *pamh, const char *op, int argc, const char **argv)
{
	struct options o;
	struct conn c;
	struct reply r = { .ok = -1 };
	const char *user, *service;
	int rc = PAM_SESSION_ERR;

	parse_options(pamh, argc, argv, &o);
	if (get_names(pamh, false, &user, &service) != NAMES_OK)
		return PAM_SESSION_ERR;
	conn_init(&c, pamh, &o);
	if (!conn_open(&c))
		return PAM_SESSION_ERR;
	{
		const struct field f[] = {
			{ "service", service, UTF8_STRICT },
			{ "user", user, UTF8_STRICT },
			{ "tty", item_str(pamh, PAM_TTY), UTF8_LOSSY },
			{ "rhost", item_str(pamh, PAM_RHOST), UTF8_LOSSY },
		};
		if (!rpc(&c, op, f, 4, &r))
			goto out;
	}
	if (r.ok == 1)
		rc = PAM_SUCCESS;
	else
		log_refusal(pamh, op, user, &r);
out:
	reply_free(&r);
	conn_close(&c);
	return rc;
}

EXPORT int pam_sm_open_session(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
	(void)flags;
	return session_call(pamh, "pam.open_session", argc, argv);
}

EXPORT int pam_sm_close_session(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
	(void)flags;
	return session_call(pamh, "pam.close_session", argc, argv);
}
