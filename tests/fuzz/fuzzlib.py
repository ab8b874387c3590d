"""Shared fuzzing machinery: the seed corpus, run-length settings and byte-mutation strategies.

Run length
    The default run is short and deterministic (``derandomize``, no example database), so
    ``make test`` always tries the same inputs: about :data:`DEFAULT_EXAMPLES` per target,
    scaled down for targets that sign certificates.  For a longer, randomised campaign::

        XOS_FUZZ_EXAMPLES=20000 .venv/bin/pytest -q tests/fuzz

    ``XOS_FUZZ_EXAMPLES`` sets the examples of every target (no scaling), switches
    ``derandomize`` off and keeps failing examples in ``.pytest_cache/hypothesis`` (or
    ``XOS_FUZZ_DB``), so a failure found once replays first on the next run.
    ``XOS_FUZZ_SEED=N`` makes that long run repeatable.  ``XOS_FUZZ_STRICT=1`` stops
    tolerating the open findings (``targets.OPEN_FINDINGS``): the property tests then fail on
    them too, which shows the fuzzers find them.

Corpus
    ``tests/fuzz_corpus/<target>/``: checked-in seeds (``make_corpus.py`` regenerates them).
    Each seed is tried as is (parametrized tests) and used as a base for mutations
    (:func:`mutated`).  ``finding-*`` files reproduce open findings and are left out while open.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.database import DirectoryBasedExampleDatabase

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "fuzz_corpus"

# Keep hypothesis' own files out of the work tree (.pytest_cache is git-ignored).
set_hypothesis_home_dir(str(ROOT / ".pytest_cache" / "hypothesis"))

DEFAULT_EXAMPLES = 200
_ENV_EXAMPLES = int(os.environ.get("XOS_FUZZ_EXAMPLES", "0") or 0)
LONG_RUN = _ENV_EXAMPLES > 0
_SEED = os.environ.get("XOS_FUZZ_SEED")

#: Per-example time limit: generous for a loaded 2-core CI box, but a parser that loops or
#: goes quadratic on hostile input blows through it.
DEADLINE_MS = 2000


def fuzz_settings(weight: float = 1.0, deadline_ms: int = DEADLINE_MS) -> settings:
    """Hypothesis settings for one fuzz target; ``weight`` scales the default example count."""
    if LONG_RUN:
        examples = _ENV_EXAMPLES
        database = DirectoryBasedExampleDatabase(
            os.environ.get("XOS_FUZZ_DB", str(ROOT / ".pytest_cache" / "hypothesis" / "examples")))
    else:
        examples = max(20, int(DEFAULT_EXAMPLES * weight))
        database = None
    return settings(
        max_examples=examples,
        deadline=timedelta(milliseconds=deadline_ms),
        derandomize=not LONG_RUN,
        database=database,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.large_base_example, HealthCheck.filter_too_much],
    )


def seeded(test):
    """Apply ``XOS_FUZZ_SEED`` (long runs only) to a hypothesis test."""
    if LONG_RUN and _SEED is not None:
        from hypothesis import seed
        return seed(int(_SEED))(test)
    return test


# --- corpus ------------------------------------------------------------------------------------


def _open_finding(path: Path) -> bool:
    """``finding-FUZZ-N-*`` of a finding still in ``targets.OPEN_FINDINGS``."""
    from targets import OPEN_FINDINGS

    m = re.match(r"finding-(FUZZ-\d+)-", path.name)
    return bool(m) and m.group(1) in OPEN_FINDINGS


def corpus_files(target: str, *, findings: bool = False) -> list[Path]:
    """The seed files of ``target``, sorted: without the reproducers of open findings, or
    (``findings``) only the ``finding-*`` files.  A fixed finding's file is an ordinary seed."""
    directory = CORPUS / target
    files = sorted(p for p in directory.iterdir() if p.is_file())
    assert files, f"empty fuzz corpus {directory}"
    if findings:
        return [p for p in files if p.name.startswith("finding-")]
    return [p for p in files if not _open_finding(p)]


def corpus(target: str) -> list[bytes]:
    """The seeds of ``target`` (reproducers of open findings excluded) as bytes."""
    return [p.read_bytes() for p in corpus_files(target)]


def finding(target: str, name_part: str) -> bytes:
    """The corpus file reproducing one open finding."""
    (path,) = [p for p in corpus_files(target, findings=True) if name_part in p.name]
    return path.read_bytes()


def ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


# --- mutation ------------------------------------------------------------------------------------

#: Byte values that tend to matter to DER/SSH/JSON parsers.
_MAGIC_BYTES = [0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x0A, 0x0C, 0x0D, 0x20, 0x22, 0x2C, 0x30,
                0x5B, 0x5C, 0x7B, 0x7F, 0x80, 0x81, 0x82, 0x84, 0x85, 0xC0, 0xED, 0xFE, 0xFF]
#: Big-endian uint32s for length fields (SSH strings, frame headers).
_MAGIC_U32 = [0, 1, 2, 3, 4, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, 0x10001,
              0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]
_OPS = ("flip", "set", "insert", "delete", "duplicate", "truncate", "splice", "u32", "swap")


@st.composite
def mutate_bytes(draw, data: bytes, others: list[bytes] | tuple[bytes, ...] = (), max_ops: int = 4) -> bytes:
    """``data`` after 0..``max_ops`` random byte-level edits (AFL-style havoc, shrinkable)."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(0, max_ops))):
        op = draw(st.sampled_from(_OPS))
        n = len(buf)
        if op == "flip" and n:
            i = draw(st.integers(0, n - 1))
            buf[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and n:
            i = draw(st.integers(0, n - 1))
            buf[i] = draw(st.sampled_from(_MAGIC_BYTES) | st.integers(0, 255))
        elif op == "insert":
            i = draw(st.integers(0, n))
            buf[i:i] = draw(st.binary(min_size=1, max_size=16) | st.sampled_from(_MAGIC_BYTES).map(lambda b: bytes([b])))
        elif op == "delete" and n:
            i = draw(st.integers(0, n - 1))
            del buf[i : i + draw(st.integers(1, min(32, n - i)))]
        elif op == "duplicate" and n:
            i = draw(st.integers(0, n - 1))
            chunk = bytes(buf[i : i + draw(st.integers(1, min(64, n - i)))])
            j = draw(st.integers(0, n))
            buf[j:j] = chunk
        elif op == "truncate" and n:
            del buf[draw(st.integers(0, n - 1)) :]
        elif op == "splice" and others:
            other = draw(st.sampled_from(list(others)))
            i = draw(st.integers(0, n))
            j = draw(st.integers(0, len(other)))
            buf[i:] = other[j:]
        elif op == "u32" and n >= 4:
            i = draw(st.integers(0, n - 4))
            buf[i : i + 4] = draw(st.sampled_from(_MAGIC_U32) | st.integers(0, 2**32 - 1)).to_bytes(4, "big")
        elif op == "swap" and n >= 2:
            i, j = sorted((draw(st.integers(0, n - 1)), draw(st.integers(0, n - 1))))
            buf[i], buf[j] = buf[j], buf[i]
    return bytes(buf)


def mutated(seeds: list[bytes], max_ops: int = 4) -> st.SearchStrategy[bytes]:
    """A corpus seed (first, so shrinking goes back to the seed) after byte mutations."""
    return st.sampled_from(seeds).flatmap(lambda s: mutate_bytes(s, seeds, max_ops))


def fuzz_bytes(seeds: list[bytes], max_ops: int = 4) -> st.SearchStrategy[bytes]:
    """Mostly corpus mutations, sometimes unstructured bytes."""
    return st.one_of(mutated(seeds, max_ops), st.binary(max_size=256))


# --- structure-aware DER mutation ---------------------------------------------------------------


class DERNode:
    """One TLV: constructed (or an OCTET/BIT STRING that wraps DER) holds ``children``."""

    __slots__ = ("tag", "content", "children", "prefix")

    def __init__(self, tag: int, content: bytes, children: list[DERNode] | None, prefix: bytes = b"") -> None:
        self.tag, self.content, self.children, self.prefix = tag, content, children, prefix

    def copy(self) -> DERNode:
        kids = None if self.children is None else [c.copy() for c in self.children]
        return DERNode(self.tag, self.content, kids, self.prefix)


def der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def parse_der(data: bytes, depth: int = 0) -> list[DERNode] | None:
    """Split ``data`` into TLVs (definite lengths, low tag numbers); None if it is not that."""
    nodes, pos = [], 0
    while pos < len(data):
        if len(data) - pos < 2 or data[pos] & 0x1F == 0x1F:
            return None
        tag, first = data[pos], data[pos + 1]
        if first < 0x80:
            length, hdr = first, 2
        elif first == 0x80 or first & 0x7F > 4:
            return None
        else:
            k = first & 0x7F
            length, hdr = int.from_bytes(data[pos + 2 : pos + 2 + k], "big"), 2 + k
        content = data[pos + hdr : pos + hdr + length]
        if len(content) != length:
            return None
        children, prefix = None, b""
        if depth < 12:
            if tag & 0x20:
                children = parse_der(content, depth + 1)
            elif tag == 0x04 and content[:1] in (b"\x04", b"\x03", b"\x30", b"\x0c"):
                children = parse_der(content, depth + 1)  # extnValue and the like
            elif tag == 0x03 and content[:2] == b"\x00\x30":
                children, prefix = parse_der(content[1:], depth + 1), b"\x00"
        nodes.append(DERNode(tag, content, children, prefix if children is not None else b""))
        pos += hdr + length
    return nodes


def encode_der(nodes: list[DERNode]) -> bytes:
    out = bytearray()
    for n in nodes:
        content = n.content if n.children is None else n.prefix + encode_der(n.children)
        out += bytes([n.tag]) + der_length(len(content)) + content
    return bytes(out)


def _flatten(nodes: list[DERNode], out: list[tuple[list[DERNode], int]]) -> None:
    for i, n in enumerate(nodes):
        out.append((nodes, i))
        if n.children is not None:
            _flatten(n.children, out)


_DER_OPS = ("content", "content", "content", "tag", "duplicate", "delete", "swap", "raw-length")


@st.composite
def mutate_der(draw, data: bytes, content: st.SearchStrategy[bytes] | None = None, max_ops: int = 3) -> bytes:
    """``data`` (DER) with 1..``max_ops`` edits of its tree, lengths re-computed: leaf contents
    mutated or replaced (``content``), tags changed, elements duplicated, deleted or swapped.
    Falls back to byte mutation when ``data`` is not DER."""
    tree = parse_der(data)
    if not tree:
        return draw(mutate_bytes(data))
    tree = [n.copy() for n in tree]
    raw_length_edit = None
    for _ in range(draw(st.integers(1, max_ops))):
        flat: list[tuple[list[DERNode], int]] = []
        _flatten(tree, flat)
        if not flat:
            break
        siblings, i = draw(st.sampled_from(flat))
        node = siblings[i]
        op = draw(st.sampled_from(_DER_OPS))
        if op == "content":
            current = node.content if node.children is None else node.prefix + encode_der(node.children)
            node.children, node.prefix = None, b""
            if content is not None and draw(st.booleans()):
                node.content = draw(content)
            else:
                node.content = draw(mutate_bytes(current))
        elif op == "tag":
            node.tag = draw(st.sampled_from([0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x0C, 0x13, 0x16, 0x17, 0x18,
                                             0x23, 0x24, 0x30, 0x31, 0xA0, 0xA3]) | st.integers(0, 0x1E))
        elif op == "duplicate":
            siblings.insert(draw(st.integers(0, len(siblings))), node.copy())
        elif op == "delete" and len(flat) > 1:
            del siblings[i]
        elif op == "swap" and len(siblings) > 1:
            j = draw(st.integers(0, len(siblings) - 1))
            siblings[i], siblings[j] = siblings[j], siblings[i]
        elif op == "raw-length":
            raw_length_edit = draw(st.integers(0, 2**16))
    out = encode_der(tree)
    if raw_length_edit is not None and out:  # one final byte-level slip, e.g. a bad length
        out = draw(mutate_bytes(out, max_ops=1))
    return out
