# xos-sshd — see README.md.  `make run`: dev gateway on 127.0.0.1:2222;  `make test`: everything.
# The system's python3 when there is one: mapped users run .venv/bin/xos-cr inside their
# sessions, and an interpreter under a private home (pyenv in /root, 0700) is not theirs to run.
PYTHON ?= $(firstword $(wildcard /usr/bin/python3) python3)
VENV   := .venv
STAMP  := $(VENV)/.installed

.PHONY: run test venv native native-exec criu system-deps-run system-deps-test clean

# Sessions start through native/build/xos-session-exec (the exec shim): built here too.
run: system-deps-run $(STAMP) native-exec
	$(VENV)/bin/xos-sshd --dev --state-dir .xos-dev --port 2222

test: system-deps-test $(STAMP) native criu
	$(VENV)/bin/pytest -q

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

native:
	$(MAKE) -C native

# Only the session exec shim (no libpam headers needed): what `make run` builds.
native-exec:
	$(MAKE) -C native exec

# CRIU >= 4.0 for the checkpoint/restart tests (quiet and quick when already there).
criu:
	@sh scripts/install-criu.sh

system-deps-run:
	sh scripts/system-deps.sh run

system-deps-test:
	sh scripts/system-deps.sh test

clean:
	$(MAKE) -C native clean
	rm -rf $(VENV) *.egg-info
