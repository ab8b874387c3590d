"""Coverage-guided fuzzing of the same targets with atheris (libFuzzer), for long campaigns.

    .venv/bin/pip install atheris                       # optional; not a test dependency
    .venv/bin/python tests/fuzz/atheris_fuzz.py TARGET [libFuzzer options]
    .venv/bin/python tests/fuzz/atheris_fuzz.py xos_cert -max_total_time=600 -jobs=2

TARGET is one of :data:`TARGETS`.  The seeds of ``tests/fuzz_corpus/<corpus>/`` are copied to
a work directory (``$XOS_FUZZ_WORK``, default ``/tmp/xos-fuzz/<TARGET>``) that libFuzzer grows,
so the checked-in corpus is never written to; crashes land in the current directory as
``crash-*`` files.  The properties are ``targets.py``'s (the hypothesis tests use the same
checks); open findings (``targets.OPEN_FINDINGS``) are let through as there.  Inputs worth
keeping go into the checked-in corpus by hand (``make_corpus.py`` for generated ones).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import atheris  # noqa: E402

with atheris.instrument_imports(include=["xos_sshd"]):
    import targets  # noqa: E402
    import xos_sshd.cr.subsystem  # noqa: E402,F401  (targets imports it lazily)
    from xos_sshd.auth import profile  # noqa: E402
    from xos_sshd.control.protocol import MAX_FRAME  # noqa: E402

_LIMITS = (MAX_FRAME, 0, 1, 16)


def _attr_value(data: bytes) -> None:
    if data:
        targets.check_attr_value(profile.ATTRIBUTES[data[0] % len(profile.ATTRIBUTES)], data[1:])


def _ssh_cert(data: bytes) -> None:
    cert = targets.check_ssh_cert(data)
    if cert is not None:
        targets.check_ssh_extensions(cert.extensions)


def _control_stream(data: bytes) -> None:
    if data:
        targets.check_control_stream(data[1:], _LIMITS[data[0] % len(_LIMITS)])


def _cr_lines(data: bytes) -> None:
    if data:
        targets.check_cr_lines(data[1:], (data[0] + 1, 4096, 65536), interrupt_every=data[0] % 4)


#: name -> (corpus directory, one-input function)
TARGETS = {
    "attr_value": ("xos_attr_value", _attr_value),
    "xos_cert": ("xos_cert", targets.check_xos_cert),
    "ssh_cert": ("ssh_cert", _ssh_cert),
    "ssh_cert_file": ("ssh_cert_file", targets.check_ssh_cert_file),
    "challenge": ("challenge_answer", lambda data: targets.check_challenge(data.decode("latin-1"))),
    "control_stream": ("control_stream", _control_stream),
    "cr_lines": ("cr_lines", _cr_lines),
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} TARGET [libFuzzer options]; TARGET: {', '.join(TARGETS)}")
    name = sys.argv[1]
    corpus_dir, one_input = TARGETS[name]
    work = Path(os.environ.get("XOS_FUZZ_WORK", f"/tmp/xos-fuzz/{name}"))
    work.mkdir(parents=True, exist_ok=True)
    # the first byte picks the attribute / frame limit / read size for these targets
    prefixes = {"attr_value": range(8), "control_stream": [0], "cr_lines": [255]}.get(name, [None])
    for seed in (HERE.parent / "fuzz_corpus" / corpus_dir).iterdir():
        if seed.is_file() and not seed.name.startswith("finding-"):
            for p in prefixes:
                head = b"" if p is None else bytes([p])
                (work / f"seed-{p}-{seed.name}").write_bytes(head + seed.read_bytes())
    args = [sys.argv[0], *sys.argv[2:]]
    if not any(not a.startswith("-") for a in sys.argv[2:]):
        args.append(str(work))
    atheris.Setup(args, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
