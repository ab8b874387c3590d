/*
 * pam_app - a tiny Linux-PAM application for tests/test_pam.py.
 *
 * It drives real libpam (pam_start_confdir, so the PAM configuration comes
 * from a test directory and the host's /etc/pam.d is never read or changed)
 * and answers the conversation the way the test asks:
 *
 *   pam_app -C CONFDIR -s SERVICE -u USER [-a ANSWER | -i | -c | -e]
 *           [-t TTY] [-r RHOST] [-n ROUNDS] OP...
 *
 *   -a ANSWER  answer every PAM_PROMPT_ECHO_* with ANSWER
 *   -i         interactive: print "PROMPT <text>" on stdout, answer with the
 *              next line of stdin (so a test can sign the challenge)
 *   -c         the conversation fails (PAM_CONV_ERR)
 *   -e         answer with an empty string
 *   OP         auth | acct | open | close | setcred
 *
 * Output, one line each: "prompt <style> <text>" for every message,
 * "<op> <rc> <PAM_NAME> <milliseconds>" for every call, and at the end
 * "fds <before pam_start> <after round 1> <after last round> <after pam_end>".
 * Exit status 0 unless the arguments are wrong.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <security/pam_appl.h>

enum mode { ANSWER, INTERACTIVE, CONV_FAIL, EMPTY };

struct app {
	enum mode mode;
	const char *answer;
};

static int count_fds(void)
{
	DIR *d = opendir("/proc/self/fd");
	struct dirent *e;
	int n = 0;

	if (!d)
		return -1;
	while ((e = readdir(d)) != NULL)
		if (e->d_name[0] != '.')
			n++;
	closedir(d);
	return n - 1;           /* the DIR's own descriptor */
}

static char *read_line(void)
{
	char *line = NULL;
	size_t cap = 0;
	ssize_t n = getline(&line, &cap, stdin);

	if (n < 0) {
		free(line);
		return NULL;
	}
	while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r'))
		line[--n] = '\0';
	return line;
}

static int conv(int num, const struct pam_message **msg, struct pam_response **resp, void *data)
{
	struct app *app = data;
	struct pam_response *r;

	if (num <= 0 || num > PAM_MAX_NUM_MSG)
		return PAM_CONV_ERR;
	r = calloc((size_t)num, sizeof(*r));
	if (!r)
		return PAM_BUF_ERR;
	for (int i = 0; i < num; i++) {
		int style = msg[i]->msg_style;

		printf("prompt %d %s\n", style, msg[i]->msg);
		fflush(stdout);
		if (style != PAM_PROMPT_ECHO_ON && style != PAM_PROMPT_ECHO_OFF)
			continue;
		switch (app->mode) {
		case CONV_FAIL:
			goto fail;
		case EMPTY:
			r[i].resp = strdup("");
			break;
		case ANSWER:
			r[i].resp = strdup(app->answer);
			break;
		case INTERACTIVE:
			r[i].resp = read_line();
			if (!r[i].resp)
				goto fail;
			break;
		}
		if (!r[i].resp)
			goto fail;
	}
	*resp = r;
	return PAM_SUCCESS;
fail:
	for (int i = 0; i < num; i++)
		free(r[i].resp);
	free(r);
	return PAM_CONV_ERR;
}

static const char *rc_name(int rc)
{
	switch (rc) {
#define N(x) case x: return #x
	N(PAM_SUCCESS); N(PAM_OPEN_ERR); N(PAM_SYMBOL_ERR); N(PAM_SERVICE_ERR);
	N(PAM_SYSTEM_ERR); N(PAM_BUF_ERR); N(PAM_PERM_DENIED); N(PAM_AUTH_ERR);
	N(PAM_CRED_INSUFFICIENT); N(PAM_AUTHINFO_UNAVAIL); N(PAM_USER_UNKNOWN);
	N(PAM_MAXTRIES); N(PAM_NEW_AUTHTOK_REQD); N(PAM_ACCT_EXPIRED);
	N(PAM_SESSION_ERR); N(PAM_CRED_UNAVAIL); N(PAM_CRED_EXPIRED); N(PAM_CRED_ERR);
	N(PAM_CONV_ERR); N(PAM_ABORT); N(PAM_IGNORE); N(PAM_MODULE_UNKNOWN);
#undef N
	default: return "PAM_OTHER";
	}
}

static long long now_ms(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (long long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

int main(int argc, char **argv)
{
	struct app app = { ANSWER, "" };
	const char *confdir = NULL, *service = "xos-test", *user = "nobody";
	const char *tty = NULL, *rhost = NULL;
	int rounds = 1, opt, fd_start, fd_round1 = -1, fd_last = -1, fd_end;
	pam_handle_t *pamh = NULL;
	struct pam_conv pc = { conv, &app };
	int rc;

	while ((opt = getopt(argc, argv, "C:s:u:a:icet:r:n:")) != -1) {
		switch (opt) {
		case 'C': confdir = optarg; break;
		case 's': service = optarg; break;
		case 'u': user = optarg; break;
		case 'a': app.mode = ANSWER; app.answer = optarg; break;
		case 'i': app.mode = INTERACTIVE; break;
		case 'c': app.mode = CONV_FAIL; break;
		case 'e': app.mode = EMPTY; break;
		case 't': tty = optarg; break;
		case 'r': rhost = optarg; break;
		case 'n': rounds = atoi(optarg); break;
		default: return 2;
		}
	}
	if (optind >= argc || rounds < 1) {
		fprintf(stderr, "usage: pam_app -C DIR -s SERVICE -u USER [-a ANSWER|-i|-c|-e] OP...\n");
		return 2;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	fd_start = count_fds();
	rc = pam_start_confdir(service, user, &pc, confdir, &pamh);
	if (rc != PAM_SUCCESS) {
		printf("pam_start %d %s 0\n", rc, rc_name(rc));
		return 1;
	}
	if (tty)
		pam_set_item(pamh, PAM_TTY, tty);
	if (rhost)
		pam_set_item(pamh, PAM_RHOST, rhost);
	for (int round = 0; round < rounds; round++) {
		for (int i = optind; i < argc; i++) {
			const char *op = argv[i];
			long long t0 = now_ms();

			if (strcmp(op, "auth") == 0)
				rc = pam_authenticate(pamh, 0);
			else if (strcmp(op, "acct") == 0)
				rc = pam_acct_mgmt(pamh, 0);
			else if (strcmp(op, "open") == 0)
				rc = pam_open_session(pamh, 0);
			else if (strcmp(op, "close") == 0)
				rc = pam_close_session(pamh, 0);
			else if (strcmp(op, "setcred") == 0)
				rc = pam_setcred(pamh, PAM_ESTABLISH_CRED);
			else {
				fprintf(stderr, "unknown op %s\n", op);
				pam_end(pamh, PAM_SUCCESS);
				return 2;
			}
			printf("%s %d %s %lld\n", op, rc, rc_name(rc), now_ms() - t0);
		}
		if (round == 0)
			fd_round1 = count_fds();
		fd_last = count_fds();
	}
	pam_end(pamh, rc);
	fd_end = count_fds();
	printf("fds %d %d %d %d\n", fd_start, fd_round1, fd_last, fd_end);
	return 0;
}
