"""Fuzz the keyboard-interactive challenge answer (``verify_challenge_answer``): the one line a
hostile client hands pam_xos, which the daemon decodes as base64, JSON, PEM and a signature.

Every corpus answer is signed for :data:`targets.CHALLENGE_NONCE` / ``sshd`` / ``alice``."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzzlib import corpus, corpus_files, fuzz_settings, ids, mutate_bytes, mutate_der, mutated, seeded
from targets import check_challenge

#: Mutated certificates make cryptography warn (e.g. "serial number wasn't positive").
pytestmark = pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")

ANSWER_FILES = corpus_files("challenge_answer")
ANSWER_SEEDS = corpus("challenge_answer")
VALID = [p.read_text() for p in ANSWER_FILES if p.name.endswith("-valid.txt")]
_PEM = re.compile(r"-----BEGIN CERTIFICATE-----\n(.*?)-----END CERTIFICATE-----\n", re.S)


@pytest.mark.parametrize("path", ANSWER_FILES, ids=ids(ANSWER_FILES))
def test_challenge_answer_seed(path: Path) -> None:
    result = check_challenge(path.read_text())
    assert (result is not None) == path.name.endswith("-valid.txt") or path.name == "crlf-wrapped.txt", path.name


@seeded
@fuzz_settings()
@given(answer=st.one_of(mutated(ANSWER_SEEDS).map(lambda b: b.decode("latin-1")), st.text(max_size=64)))
def test_challenge_answer_fuzz(answer: str) -> None:
    check_challenge(answer)


def _pem(der: bytes) -> str:
    return "-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(der).decode("ascii") + "-----END CERTIFICATE-----\n"


@st.composite
def structured_answers(draw) -> str:
    """A valid answer taken apart and edited at one layer: a certificate's DER tree, the PEM
    text, the signature bytes, the JSON document, or the outer base64."""
    doc = json.loads(base64.b64decode(draw(st.sampled_from(VALID))))
    layer = draw(st.sampled_from(["der", "der", "pem", "sig", "json", "nest", "base64"]))
    if layer == "der":
        certs = [base64.b64decode("".join(m.split())) for m in _PEM.findall(doc["chain"])]
        i = draw(st.integers(0, len(certs) - 1))
        certs[i] = draw(mutate_der(certs[i]))
        doc["chain"] = "".join(_pem(c) for c in certs)
    elif layer == "pem":
        doc["chain"] = draw(mutate_bytes(doc["chain"].encode("ascii"))).decode("latin-1")
    elif layer == "sig":
        sig = draw(mutate_bytes(base64.b64decode(doc["sig"])))
        doc["sig"] = base64.b64encode(sig).decode("ascii")
    elif layer == "json":
        key = draw(st.sampled_from(["chain", "sig", "extra"]))
        doc[key] = draw(st.one_of(st.none(), st.integers(), st.text(max_size=8), st.lists(st.text(max_size=4), max_size=2),
                                  st.just(doc.get("chain")), st.just(doc.get("sig"))))
        if draw(st.booleans()):
            doc = draw(st.sampled_from([[doc], doc, {"chain": doc["chain"]}, {"doc": doc}]))
    text = json.dumps(doc, separators=(",", ":"))
    if layer == "nest":  # the document inside N arrays, or N open arrays alone
        depth = draw(st.sampled_from([1, 64, 999, 2000, 20000]))
        text = draw(st.sampled_from(["[" * depth + text + "]" * depth, "[" * depth, '{"chain":' * depth]))
    answer = base64.b64encode(text.encode("utf-8")).decode("ascii")
    if layer == "base64":
        answer = draw(st.sampled_from([answer.rstrip("="), " " + answer + " \n", answer[:4] + "\n" + answer[4:],
                                       answer + "=", answer.replace("+", "-"), answer * 2]))
    return answer


@seeded
@fuzz_settings(weight=0.5)
@given(answer=structured_answers())
def test_challenge_answer_structured_fuzz(answer: str) -> None:
    check_challenge(answer)
