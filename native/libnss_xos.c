/*
 * libnss_xos.so.2 - glibc NSS module for the accounts mapped by xos-sshd.
 *
 * Serves the "passwd" and "group" databases (and initgroups) from the binary
 * index that xos_sshd/ams/nss_index.py writes; the format is specified in
 * docs/nss-index.md.  Design rules, in the spirit of systemd's and SSSD's
 * modules:
 *
 *  - No daemon on the lookup path.  The index is a file; the module maps it
 *    read-only.  If xos-sshd is down, lookups still work (or fail fast).
 *  - O(1) lookups: open-addressing hash tables inside the file, with the
 *    longest probe sequence stored in the header so that even a corrupt
 *    table can never make us loop for long.
 *  - Never trust the file.  Every offset and length read from it is checked
 *    against the section it must lie in before it is dereferenced.  A bad
 *    file means NSS_STATUS_UNAVAIL or NOTFOUND, never a crash.
 *  - One stat() per call to notice that the writer replaced the file (it
 *    always renames a new file into place, so the inode changes); the old
 *    mapping stays alive, reference-counted, until its last user is done.
 *  - Never leak a file descriptor: O_CLOEXEC, closed right after mmap().
 *  - Never return uid 0, gid 0 or the name "root": the module only serves
 *    VO accounts, so such an entry is treated as not found.
 *  - Never shadow: there is no shadow database here.
 *
 * The file must be replaced by rename(2), never rewritten in place: if it
 * were truncated under a live mapping, touching the lost pages would raise
 * SIGBUS.  The writer guarantees this.
 */
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <nss.h>
#include <pthread.h>
#include <pwd.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

#define XOS_DEFAULT_DIR "/var/lib/xos-sshd/nss"
#define XOS_INDEX_NAME "nss.index"

/* ---- on-disk format (docs/nss-index.md); all integers little-endian ---- */

#define XOS_MAGIC "XOSNSSI"         /* 8 bytes including the trailing NUL */
#define XOS_VERSION 1u
#define HDR_SIZE 256u
#define HDR_CHECKSUM_OFF 248u       /* FNV-1a 64 of bytes [0, 248) */

#define HDR_VERSION 8u
#define HDR_HEADER_SIZE 12u
#define HDR_FILE_SIZE 24u
#define HDR_N_USERS 32u
#define HDR_N_GROUPS 36u
#define HDR_N_MEMBERS 40u
#define HDR_SECTIONS 48u            /* S_COUNT x {u64 offset, u64 length} */
#define HDR_MAX_PROBE 224u          /* N_HASH x u32 */

enum section {
	S_STRINGS,
	S_USERS,
	S_GROUPS,
	S_MEMREFS,
	S_MEMBERS,
	S_GIDS,
	S_H_PWNAM,
	S_H_PWUID,
	S_H_GRNAM,
	S_H_GRGID,
	S_H_MEMBER,
	S_COUNT
};

enum hash_table { H_PWNAM, H_PWUID, H_GRNAM, H_GRGID, H_MEMBER, N_HASH };

#define USER_SIZE 40u     /* uid gid name(off,len) gecos home shell */
#define GROUP_SIZE 20u    /* gid name(off,len) first_memref n_memrefs */
#define MEMREF_SIZE 8u    /* member name(off,len) */
#define MEMBER_SIZE 16u   /* name(off,len) first_gid n_gids */
#define GID_SIZE 4u
#define BUCKET_SIZE 8u    /* tag (hash >> 32), record index + 1 (0 = empty) */

/* Index files larger than this are refused outright (string offsets are u32). */
#define MAX_FILE_SIZE ((uint64_t)1 << 32)
/* No real account name is longer; longer queries cannot match. */
#define MAX_NAME_LEN 256u

struct section_ref {
	uint64_t off;
	uint64_t len;
};

/* One mapping of one version of the index file.  Immutable once published,
 * except for the reference count. */
struct xmap {
	const uint8_t *base;
	size_t size;
	dev_t dev;
	ino_t ino;
	struct timespec mtim;
	char *path;
	unsigned long refs;
	uint32_t n_users, n_groups, n_members;
	uint32_t max_probe[N_HASH];
	struct section_ref sec[S_COUNT];
};

/* A validated string inside the string section (not NUL-terminated). */
struct str {
	const char *p;
	uint32_t len;
};

struct urec {
	uint32_t uid, gid;
	struct str name, gecos, home, shell;
};

struct grec {
	uint32_t gid;
	struct str name;
	uint32_t first_memref, n_memrefs;
};

/* ---------------------------------------------------------------------- */

static inline uint32_t rd32(const uint8_t *p)
{
	uint32_t v;
	memcpy(&v, p, sizeof(v));
	return le32toh(v);
}

static inline uint64_t rd64(const uint8_t *p)
{
	uint64_t v;
	memcpy(&v, p, sizeof(v));
	return le64toh(v);
}

/* FNV-1a 64: the same function as fnv1a64() in nss_index.py. */
static uint64_t fnv1a64(const void *data, size_t len)
{
	const unsigned char *p = data;
	uint64_t h = 0xcbf29ce484222325ULL;

	for (size_t i = 0; i < len; i++) {
		h ^= p[i];
		h *= 0x100000001b3ULL;
	}
	return h;
}

/* Numeric ids are hashed as their 4 little-endian bytes. */
static uint64_t hash_id(uint32_t id)
{
	uint32_t le = htole32(id);
	return fnv1a64(&le, sizeof(le));
}

static bool is_root_name(const char *p, size_t len)
{
	return len == 4 && memcmp(p, "root", 4) == 0;
}

/* ---- validation of the mapped file ----------------------------------- */

/* Checks one section descriptor against the file: inside it, aligned, not
 * overlapping the header, no integer overflow. */
static bool section_ok(const struct xmap *m, const struct section_ref *s)
{
	if (s->off % 8 != 0 || s->off < HDR_SIZE || s->off > m->size)
		return false;
	return s->len <= m->size - s->off;
}

static bool hash_section_ok(const struct section_ref *s, uint32_t max_probe)
{
	uint64_t nb = s->len / BUCKET_SIZE;

	if (s->len % BUCKET_SIZE != 0 || nb == 0 || nb > ((uint64_t)1 << 31))
		return false;
	if ((nb & (nb - 1)) != 0)            /* power of two: slot = h & mask */
		return false;
	return max_probe <= nb;
}

/* Validates the header and every section descriptor.  Costs O(1): records
 * are checked when they are read, not here, so that a lookup in a process
 * that just started does not scan a 100k-account file. */
static bool header_ok(struct xmap *m)
{
	const uint8_t *h = m->base;

	if (m->size < HDR_SIZE || memcmp(h, XOS_MAGIC, 8) != 0)
		return false;
	if (rd32(h + HDR_VERSION) != XOS_VERSION || rd32(h + HDR_HEADER_SIZE) != HDR_SIZE)
		return false;
	if (rd64(h + HDR_CHECKSUM_OFF) != fnv1a64(h, HDR_CHECKSUM_OFF))
		return false;
	if (rd64(h + HDR_FILE_SIZE) != m->size)
		return false;

	m->n_users = rd32(h + HDR_N_USERS);
	m->n_groups = rd32(h + HDR_N_GROUPS);
	m->n_members = rd32(h + HDR_N_MEMBERS);
	for (int i = 0; i < S_COUNT; i++) {
		m->sec[i].off = rd64(h + HDR_SECTIONS + 16u * i);
		m->sec[i].len = rd64(h + HDR_SECTIONS + 16u * i + 8);
		if (!section_ok(m, &m->sec[i]))
			return false;
	}
	for (int t = 0; t < N_HASH; t++) {
		m->max_probe[t] = rd32(h + HDR_MAX_PROBE + 4u * t);
		if (!hash_section_ok(&m->sec[S_H_PWNAM + t], m->max_probe[t]))
			return false;
	}
	/* Record sections must hold exactly the counted records: a header
	 * whose counts lie is refused here, not discovered later. */
	if (m->sec[S_USERS].len != (uint64_t)m->n_users * USER_SIZE ||
	    m->sec[S_GROUPS].len != (uint64_t)m->n_groups * GROUP_SIZE ||
	    m->sec[S_MEMBERS].len != (uint64_t)m->n_members * MEMBER_SIZE)
		return false;
	return m->sec[S_MEMREFS].len % MEMREF_SIZE == 0 &&
	       m->sec[S_GIDS].len % GID_SIZE == 0 &&
	       m->sec[S_STRINGS].len < MAX_FILE_SIZE;
}

/* Resolves (off, len) inside the string section.  Refuses embedded NULs:
 * no account name, home or shell contains one, and the caller gets C
 * strings. */
static bool str_at(const struct xmap *m, uint32_t off, uint32_t len, struct str *out)
{
	const struct section_ref *s = &m->sec[S_STRINGS];

	if (off > s->len || len > s->len - off)
		return false;
	out->p = (const char *)m->base + s->off + off;
	out->len = len;
	return memchr(out->p, '\0', len) == NULL;
}

/* Address of record i of a fixed-size section, or NULL if out of range. */
static const uint8_t *record(const struct xmap *m, enum section s, uint64_t i, size_t size)
{
	if (i >= m->sec[s].len / size)
		return NULL;
	return m->base + m->sec[s].off + i * size;
}

static bool user_at(const struct xmap *m, uint32_t i, struct urec *u)
{
	const uint8_t *r = record(m, S_USERS, i, USER_SIZE);

	if (!r)
		return false;
	u->uid = rd32(r);
	u->gid = rd32(r + 4);
	return str_at(m, rd32(r + 8), rd32(r + 12), &u->name) &&
	       str_at(m, rd32(r + 16), rd32(r + 20), &u->gecos) &&
	       str_at(m, rd32(r + 24), rd32(r + 28), &u->home) &&
	       str_at(m, rd32(r + 32), rd32(r + 36), &u->shell);
}

/* The entries this module must never hand out, whatever the file says. */
static bool user_allowed(const struct urec *u)
{
	return u->uid != 0 && u->gid != 0 && u->name.len > 0 &&
	       !is_root_name(u->name.p, u->name.len);
}

static bool group_at(const struct xmap *m, uint32_t i, struct grec *g)
{
	const uint8_t *r = record(m, S_GROUPS, i, GROUP_SIZE);

	if (!r)
		return false;
	g->gid = rd32(r);
	g->first_memref = rd32(r + 12);
	g->n_memrefs = rd32(r + 16);
	if ((uint64_t)g->first_memref + g->n_memrefs > m->sec[S_MEMREFS].len / MEMREF_SIZE)
		return false;
	return str_at(m, rd32(r + 4), rd32(r + 8), &g->name);
}

static bool group_allowed(const struct grec *g)
{
	return g->gid != 0 && g->name.len > 0 && !is_root_name(g->name.p, g->name.len);
}

/* ---- hash tables ------------------------------------------------------- */

typedef bool (*match_fn)(const struct xmap *m, uint32_t idx, const void *key);

/* Linear probing from slot (h & mask); a bucket is {tag = h >> 32, idx + 1}.
 * At most max_probe buckets are read: the writer stores the longest probe
 * sequence of any key, so a key that is present is always found within it,
 * and a corrupt table without empty buckets cannot make us spin. */
static bool find(const struct xmap *m, enum hash_table t, uint64_t h,
		 match_fn match, const void *key, uint32_t *idx)
{
	const struct section_ref *s = &m->sec[S_H_PWNAM + t];
	uint64_t mask = s->len / BUCKET_SIZE - 1;
	uint64_t slot = h & mask;
	uint32_t tag = (uint32_t)(h >> 32);

	for (uint32_t n = 0; n < m->max_probe[t]; n++, slot = (slot + 1) & mask) {
		const uint8_t *b = m->base + s->off + slot * BUCKET_SIZE;
		uint32_t ref = rd32(b + 4);

		if (ref == 0)
			return false;
		if (rd32(b) == tag && match(m, ref - 1, key)) {
			*idx = ref - 1;
			return true;
		}
	}
	return false;
}

struct name_key {
	const char *p;
	size_t len;
};

static bool str_eq(const struct str *s, const struct name_key *k)
{
	return s->len == k->len && memcmp(s->p, k->p, k->len) == 0;
}

static bool match_pwnam(const struct xmap *m, uint32_t idx, const void *key)
{
	struct urec u;
	return user_at(m, idx, &u) && str_eq(&u.name, key);
}

static bool match_pwuid(const struct xmap *m, uint32_t idx, const void *key)
{
	struct urec u;
	return user_at(m, idx, &u) && u.uid == *(const uint32_t *)key;
}

static bool match_grnam(const struct xmap *m, uint32_t idx, const void *key)
{
	struct grec g;
	return group_at(m, idx, &g) && str_eq(&g.name, key);
}

static bool match_grgid(const struct xmap *m, uint32_t idx, const void *key)
{
	struct grec g;
	return group_at(m, idx, &g) && g.gid == *(const uint32_t *)key;
}

static bool match_member(const struct xmap *m, uint32_t idx, const void *key)
{
	const uint8_t *r = record(m, S_MEMBERS, idx, MEMBER_SIZE);
	struct str s;
	return r && str_at(m, rd32(r), rd32(r + 4), &s) && str_eq(&s, key);
}

/* Turns a caller's name into a hash key; false for names that cannot be
 * ours (empty, absurdly long, or root). */
static bool name_key(const char *name, struct name_key *k)
{
	if (!name)
		return false;
	k->p = name;
	k->len = strnlen(name, MAX_NAME_LEN + 1);
	return k->len > 0 && k->len <= MAX_NAME_LEN && !is_root_name(name, k->len);
}

/* ---- the current mapping ---------------------------------------------- */

/* Protects `current` only; held for a few pointer operations, never across
 * I/O (files are opened and mapped outside it). */
static pthread_mutex_t map_lock = PTHREAD_MUTEX_INITIALIZER;
static struct xmap *current;
/* Protects the enumeration cursors (below); taken before map_lock. */
static pthread_mutex_t enum_lock = PTHREAD_MUTEX_INITIALIZER;

static void xmap_destroy(struct xmap *m)
{
	munmap((void *)m->base, m->size);
	free(m->path);
	free(m);
}

static void xmap_ref(struct xmap *m)
{
	__atomic_add_fetch(&m->refs, 1, __ATOMIC_RELAXED);
}

/* Drops one reference; the last one unmaps.  `current` holds one reference
 * of its own, so a published map is only destroyed once it is replaced. */
static void xmap_unref(struct xmap *m)
{
	if (m && __atomic_sub_fetch(&m->refs, 1, __ATOMIC_ACQ_REL) == 0)
		xmap_destroy(m);
}

/* Builds "<dir>/nss.index".  XOS_NSS_DIR is read through secure_getenv so
 * that a setuid program can never be pointed at a forged table. */
static bool index_path(char *buf, size_t size)
{
	const char *dir = secure_getenv("XOS_NSS_DIR");
	size_t dl, nl = sizeof(XOS_INDEX_NAME);

	if (!dir || !*dir)
		dir = XOS_DEFAULT_DIR;
	dl = strlen(dir);
	if (dl + 1 + nl > size)
		return false;
	memcpy(buf, dir, dl);
	buf[dl] = '/';
	memcpy(buf + dl + 1, XOS_INDEX_NAME, nl);
	return true;
}

static bool same_file(const struct xmap *m, const char *path, const struct stat *st)
{
	return m->dev == st->st_dev && m->ino == st->st_ino &&
	       m->size == (size_t)st->st_size &&
	       m->mtim.tv_sec == st->st_mtim.tv_sec &&
	       m->mtim.tv_nsec == st->st_mtim.tv_nsec &&
	       strcmp(m->path, path) == 0;
}

/* Opens, maps and validates the index.  The fd is closed before returning
 * on every path.  O_NONBLOCK: a FIFO planted at the path must not hang us;
 * it is then refused as not a regular file. */
static struct xmap *xmap_open(const char *path)
{
	struct xmap *m;
	struct stat st;
	void *base;
	int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);

	if (fd < 0)
		return NULL;
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || st.st_size < (off_t)HDR_SIZE ||
	    (uint64_t)st.st_size > MAX_FILE_SIZE) {
		close(fd);
		return NULL;
	}
	base = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
	close(fd);
	if (base == MAP_FAILED)
		return NULL;

	m = calloc(1, sizeof(*m));
	if (!m || !(m->path = strdup(path))) {
		free(m);
		munmap(base, (size_t)st.st_size);
		return NULL;
	}
	m->base = base;
	m->size = (size_t)st.st_size;
	m->dev = st.st_dev;
	m->ino = st.st_ino;
	m->mtim = st.st_mtim;
	m->refs = 1;
	if (!header_ok(m)) {
		xmap_destroy(m);
		return NULL;
	}
	return m;
}

/* Makes `fresh` (may be NULL) the current map and drops the old one. */
static void publish(struct xmap *fresh)
{
	struct xmap *old;

	pthread_mutex_lock(&map_lock);
	old = current;
	current = fresh;
	pthread_mutex_unlock(&map_lock);
	xmap_unref(old);
}

/* Returns a referenced map of the index as it is on disk now, remapping if
 * the file was replaced (one stat() when it was not).  The caller must
 * xmap_unref() it.  NULL with *errnop set when there is no usable table. */
static struct xmap *acquire(int *errnop)
{
	char path[PATH_MAX];
	struct stat st;
	struct xmap *m, *fresh;

	if (!index_path(path, sizeof(path)) || stat(path, &st) < 0) {
		publish(NULL);              /* tables gone: let the old map go */
		*errnop = ENOENT;
		return NULL;
	}

	pthread_mutex_lock(&map_lock);
	m = current;
	if (m && same_file(m, path, &st))
		xmap_ref(m);
	else
		m = NULL;
	pthread_mutex_unlock(&map_lock);
	if (m)
		return m;

	fresh = xmap_open(path);        /* I/O outside the lock */
	if (!fresh) {
		publish(NULL);
		*errnop = ENOENT;
		return NULL;
	}
	xmap_ref(fresh);                /* one for `current`, one for the caller */
	publish(fresh);
	return fresh;
}

/* Frees the current map when glibc unloads the module (__libc_freeres),
 * so that valgrind sees no leak.  Maps still in use keep their references. */
__attribute__((destructor)) static void xos_fini(void)
{
	publish(NULL);
}

/* fork() in a threaded caller: take our locks around it so that the child
 * never inherits one held by a thread that does not exist there.  Both are
 * only ever held briefly, and enum_lock is always taken before map_lock. */
static void atfork_prepare(void)
{
	pthread_mutex_lock(&enum_lock);
	pthread_mutex_lock(&map_lock);
}

static void atfork_release(void)
{
	pthread_mutex_unlock(&map_lock);
	pthread_mutex_unlock(&enum_lock);
}

__attribute__((constructor)) static void xos_init(void)
{
	pthread_atfork(atfork_prepare, atfork_release, atfork_release);
}

/* ---- filling the caller's structures ----------------------------------- */

/* Bump allocator over the caller's buffer. */
struct bufp {
	char *p;
	size_t left;
};

static char *put_str(struct bufp *b, const char *s, size_t len)
{
	char *out = b->p;

	if (len + 1 > b->left)
		return NULL;
	memcpy(out, s, len);
	out[len] = '\0';
	b->p += len + 1;
	b->left -= len + 1;
	return out;
}

static enum nss_status erange(int *errnop)
{
	*errnop = ERANGE;               /* glibc retries with a larger buffer */
	return NSS_STATUS_TRYAGAIN;
}

static enum nss_status notfound(int *errnop)
{
	*errnop = ENOENT;
	return NSS_STATUS_NOTFOUND;
}

static enum nss_status fill_passwd(const struct urec *u, struct passwd *pw,
				   char *buf, size_t buflen, int *errnop)
{
	struct bufp b = { buf, buflen };

	pw->pw_name = put_str(&b, u->name.p, u->name.len);
	pw->pw_passwd = put_str(&b, "x", 1);
	pw->pw_gecos = put_str(&b, u->gecos.p, u->gecos.len);
	pw->pw_dir = put_str(&b, u->home.p, u->home.len);
	pw->pw_shell = put_str(&b, u->shell.p, u->shell.len);
	if (!pw->pw_name || !pw->pw_passwd || !pw->pw_gecos || !pw->pw_dir || !pw->pw_shell)
		return erange(errnop);
	pw->pw_uid = u->uid;
	pw->pw_gid = u->gid;
	return NSS_STATUS_SUCCESS;
}

/* Member i of a group, if valid and not root (never listed as a member). */
static bool member_at(const struct xmap *m, const struct grec *g, uint32_t i, struct str *s)
{
	const uint8_t *r = record(m, S_MEMREFS, (uint64_t)g->first_memref + i, MEMREF_SIZE);

	return r && str_at(m, rd32(r), rd32(r + 4), s) && s->len > 0 &&
	       !is_root_name(s->p, s->len);
}

static enum nss_status fill_group(const struct xmap *m, const struct grec *g,
				  struct group *gr, char *buf, size_t buflen, int *errnop)
{
	size_t align = (size_t)(-(uintptr_t)buf) & (__alignof__(char *) - 1);
	size_t n = 0, ptrs;
	struct bufp b;
	struct str s;
	char **mem;

	for (uint32_t i = 0; i < g->n_memrefs; i++)
		n += member_at(m, g, i, &s);
	ptrs = (n + 1) * sizeof(char *);
	if (buflen < align || buflen - align < ptrs)
		return erange(errnop);
	mem = (char **)(void *)(buf + align);
	b.p = buf + align + ptrs;
	b.left = buflen - align - ptrs;

	gr->gr_name = put_str(&b, g->name.p, g->name.len);
	gr->gr_passwd = put_str(&b, "x", 1);
	if (!gr->gr_name || !gr->gr_passwd)
		return erange(errnop);
	n = 0;
	for (uint32_t i = 0; i < g->n_memrefs; i++) {
		if (!member_at(m, g, i, &s))
			continue;
		if (!(mem[n++] = put_str(&b, s.p, s.len)))
			return erange(errnop);
	}
	mem[n] = NULL;
	gr->gr_mem = mem;
	gr->gr_gid = g->gid;
	return NSS_STATUS_SUCCESS;
}

/* ---- passwd ------------------------------------------------------------ */

/* Shared tail of getpwnam/getpwuid: look up, check, copy out. */
static enum nss_status pw_lookup(enum hash_table t, uint64_t h, match_fn match,
				 const void *key, struct passwd *pw,
				 char *buf, size_t buflen, int *errnop)
{
	enum nss_status st;
	struct xmap *m = acquire(errnop);
	struct urec u;
	uint32_t idx;

	if (!m)
		return NSS_STATUS_UNAVAIL;
	if (find(m, t, h, match, key, &idx) && user_at(m, idx, &u) && user_allowed(&u))
		st = fill_passwd(&u, pw, buf, buflen, errnop);
	else
		st = notfound(errnop);
	xmap_unref(m);
	return st;
}

EXPORT enum nss_status _nss_xos_getpwnam_r(const char *name, struct passwd *pw,
					   char *buf, size_t buflen, int *errnop)
{
	struct name_key k;

	if (!name_key(name, &k))
		return notfound(errnop);
	return pw_lookup(H_PWNAM, fnv1a64(k.p, k.len), match_pwnam, &k, pw, buf, buflen, errnop);
}

EXPORT enum nss_status _nss_xos_getpwuid_r(uid_t uid, struct passwd *pw,
					   char *buf, size_t buflen, int *errnop)
{
	uint32_t key = (uint32_t)uid;

	if (uid == 0 || uid == (uid_t)-1)
		return notfound(errnop);
	return pw_lookup(H_PWUID, hash_id(key), match_pwuid, &key, pw, buf, buflen, errnop);
}

/* ---- group ------------------------------------------------------------- */

static enum nss_status gr_lookup(enum hash_table t, uint64_t h, match_fn match,
				 const void *key, struct group *gr,
				 char *buf, size_t buflen, int *errnop)
{
	enum nss_status st;
	struct xmap *m = acquire(errnop);
	struct grec g;
	uint32_t idx;

	if (!m)
		return NSS_STATUS_UNAVAIL;
	if (find(m, t, h, match, key, &idx) && group_at(m, idx, &g) && group_allowed(&g))
		st = fill_group(m, &g, gr, buf, buflen, errnop);
	else
		st = notfound(errnop);
	xmap_unref(m);
	return st;
}

EXPORT enum nss_status _nss_xos_getgrnam_r(const char *name, struct group *gr,
					   char *buf, size_t buflen, int *errnop)
{
	struct name_key k;

	if (!name_key(name, &k))
		return notfound(errnop);
	return gr_lookup(H_GRNAM, fnv1a64(k.p, k.len), match_grnam, &k, gr, buf, buflen, errnop);
}

EXPORT enum nss_status _nss_xos_getgrgid_r(gid_t gid, struct group *gr,
					   char *buf, size_t buflen, int *errnop)
{
	uint32_t key = (uint32_t)gid;

	if (gid == 0 || gid == (gid_t)-1)
		return notfound(errnop);
	return gr_lookup(H_GRGID, hash_id(key), match_grgid, &key, gr, buf, buflen, errnop);
}

/* ---- enumeration -------------------------------------------------------- */

/* One cursor per database, shared by the process as getpwent() requires.
 * The cursor pins the map it started on, so an enumeration sees one
 * consistent version of the tables even if the file is replaced meanwhile. */
struct cursor {
	struct xmap *m;
	uint32_t next;
};

static struct cursor pw_cursor, gr_cursor;

static enum nss_status cursor_set(struct cursor *c)
{
	int err;

	pthread_mutex_lock(&enum_lock);
	xmap_unref(c->m);
	c->m = acquire(&err);
	c->next = 0;
	pthread_mutex_unlock(&enum_lock);
	return c->m ? NSS_STATUS_SUCCESS : NSS_STATUS_UNAVAIL;
}

static enum nss_status cursor_end(struct cursor *c)
{
	pthread_mutex_lock(&enum_lock);
	xmap_unref(c->m);
	c->m = NULL;
	c->next = 0;
	pthread_mutex_unlock(&enum_lock);
	return NSS_STATUS_SUCCESS;
}

/* getXXent_r without a prior setXXent starts an enumeration implicitly. */
static bool cursor_ready(struct cursor *c, int *errnop)
{
	if (!c->m) {
		c->m = acquire(errnop);
		c->next = 0;
	}
	return c->m != NULL;
}

EXPORT enum nss_status _nss_xos_setpwent(int stayopen)
{
	(void)stayopen;
	return cursor_set(&pw_cursor);
}

EXPORT enum nss_status _nss_xos_endpwent(void)
{
	return cursor_end(&pw_cursor);
}

EXPORT enum nss_status _nss_xos_getpwent_r(struct passwd *pw, char *buf, size_t buflen,
					   int *errnop)
{
	enum nss_status st = NSS_STATUS_UNAVAIL;
	struct cursor *c = &pw_cursor;
	struct urec u;

	pthread_mutex_lock(&enum_lock);
	if (cursor_ready(c, errnop)) {
		st = notfound(errnop);
		for (; c->next < c->m->n_users; c->next++) {
			if (!user_at(c->m, c->next, &u) || !user_allowed(&u))
				continue;
			st = fill_passwd(&u, pw, buf, buflen, errnop);
			/* On ERANGE keep the cursor: the caller retries this entry. */
			if (st == NSS_STATUS_SUCCESS)
				c->next++;
			break;
		}
	}
	pthread_mutex_unlock(&enum_lock);
	return st;
}

EXPORT enum nss_status _nss_xos_setgrent(int stayopen)
{
	(void)stayopen;
	return cursor_set(&gr_cursor);
}

EXPORT enum nss_status _nss_xos_endgrent(void)
{
	return cursor_end(&gr_cursor);
}

EXPORT enum nss_status _nss_xos_getgrent_r(struct group *gr, char *buf, size_t buflen,
					   int *errnop)
{
	enum nss_status st = NSS_STATUS_UNAVAIL;
	struct cursor *c = &gr_cursor;
	struct grec g;

	pthread_mutex_lock(&enum_lock);
	if (cursor_ready(c, errnop)) {
		st = notfound(errnop);
		for (; c->next < c->m->n_groups; c->next++) {
			if (!group_at(c->m, c->next, &g) || !group_allowed(&g))
				continue;
			st = fill_group(c->m, &g, gr, buf, buflen, errnop);
			if (st == NSS_STATUS_SUCCESS)
				c->next++;
			break;
		}
	}
	pthread_mutex_unlock(&enum_lock);
	return st;
}

/* ---- initgroups -------------------------------------------------------- */

/* Appends gid to the caller's growing array, as glibc's nss_files does:
 * double the array up to `limit` (<= 0: unlimited).  Returns false only
 * when out of memory. */
static bool add_gid(gid_t gid, long int *start, long int *size, gid_t **groupsp, long int limit)
{
	gid_t *groups = *groupsp;

	for (long int i = 0; i < *start; i++)
		if (groups[i] == gid)
			return true;                /* already there */
	if (*start == *size) {
		long int newsize = *size > 0 ? 2 * *size : 8;

		if (limit > 0 && *size >= limit)
			return true;                /* full: glibc truncates */
		if (limit > 0 && newsize > limit)
			newsize = limit;
		groups = realloc(groups, (size_t)newsize * sizeof(*groups));
		if (!groups)
			return false;
		*groupsp = groups;
		*size = newsize;
	}
	groups[(*start)++] = gid;
	return true;
}

/* Adds the VO groups `user` is a member of (precomputed per member name in
 * the index, so O(its groups), not O(all groups)). */
EXPORT enum nss_status _nss_xos_initgroups_dyn(const char *user, gid_t group,
					       long int *start, long int *size,
					       gid_t **groupsp, long int limit, int *errnop)
{
	enum nss_status st = NSS_STATUS_SUCCESS;
	struct name_key k;
	const uint8_t *r;
	struct xmap *m;
	uint32_t idx, first, n;

	if (!name_key(user, &k))
		return notfound(errnop);
	if (!(m = acquire(errnop)))
		return NSS_STATUS_UNAVAIL;
	if (!find(m, H_MEMBER, fnv1a64(k.p, k.len), match_member, &k, &idx) ||
	    !(r = record(m, S_MEMBERS, idx, MEMBER_SIZE))) {
		xmap_unref(m);
		return notfound(errnop);
	}
	first = rd32(r + 8);
	n = rd32(r + 12);
	if ((uint64_t)first + n > m->sec[S_GIDS].len / GID_SIZE)
		n = 0;                          /* corrupt list: add nothing */
	for (uint32_t i = 0; i < n; i++) {
		gid_t gid = rd32(m->base + m->sec[S_GIDS].off + ((uint64_t)first + i) * GID_SIZE);

		if (gid == 0 || gid == group || gid == (gid_t)-1)
			continue;
		if (!add_gid(gid, start, size, groupsp, limit)) {
			*errnop = ENOMEM;
			st = NSS_STATUS_TRYAGAIN;
			break;
		}
	}
	xmap_unref(m);
	return st;
}
