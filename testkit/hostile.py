"""Hypothesis strategies for hostile input, which schema-driven fuzzing never generates:
strings of lone UTF-16 surrogates, NULs, Unicode digits and separators; integers past every
database's range; JSON nested thousands deep; containers where strings belong. Shared by
the fuzz tests of ``tests/http`` and ``tests/harness``.
"""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

from hypothesis import strategies as st

# Each one broke something once: surrogates (unencodable text), NUL (PostgreSQL text),
# Unicode digits (str.isdigit() is True, int() may fail), separators and invisible spaces.
HOSTILE_CHARS = ("\ud800", "\udbff", "\udc00", "\udfff", "\x00", "\x1f", "²", "٣", "߀", "Ⅻ",
                 "\u2028", "\u2029", "\u00a0", "\u200b", "\ufeff", "\ufffd", "a", "-", " ")
HUGE_INTS = (2**31, 2**32, 2**53 + 1, 2**63, 2**64, -(2**63) - 1, 10**30, -1, -(2**31) - 1)

hostile_text = st.text(alphabet=st.sampled_from(HOSTILE_CHARS), min_size=1, max_size=12)
huge_int = st.sampled_from(HUGE_INTS)


def _nest(depth: int, kind: str) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value] if kind == "list" else {"a": value}
    return value


# Built iteratively and sent pre-serialized (see ``dumps``): Python's own json.dumps
# recurses, so very deep values are written by hand.
deep = st.tuples(st.integers(65, 20_000), st.sampled_from(["list", "dict"]))

hostile_value = st.one_of(
    hostile_text, huge_int, deep.map(lambda d: DeepJson(*d)),
    st.lists(hostile_text, min_size=1, max_size=3),
    st.dictionaries(hostile_text, hostile_text, min_size=1, max_size=2),
    st.sampled_from([[], {}, [[]], True, None, 1.5, float("inf"), float("nan")]),
)

# Path segments and query values: hostile text and out-of-range numbers; never plain ASCII
# digits, which could name a real row that a fuzzed DELETE would then remove.
hostile_segment = st.one_of(hostile_text, huge_int.map(str),
                            st.sampled_from(["9223372036854775808", "2147483648", "1e3",
                                             "0x1", "+1", "1.0", "１"]))


class DeepJson:
    """JSON nested ``depth`` levels deep, written without recursion."""

    def __init__(self, depth: int, kind: str) -> None:
        self.depth, self.kind = depth, kind

    def json(self) -> str:
        if self.kind == "list":
            return "[" * self.depth + "1" + "]" * self.depth
        return "{\"a\": " * self.depth + "1" + "}" * self.depth


def dumps(value: Any) -> bytes:
    """JSON bytes for a body holding hostile values: lone surrogates escaped (as a client's
    JSON library writes them), ``DeepJson`` spliced in as text."""
    holes: list[str] = []

    def default(obj: object) -> str:
        if isinstance(obj, DeepJson):
            holes.append(obj.json())
            return f"\x00deep{len(holes) - 1}\x00"
        raise TypeError(type(obj).__name__)

    text = json.dumps(value, default=default)
    for i, hole in enumerate(holes):
        text = text.replace(json.dumps(f"\x00deep{i}\x00"), hole)
    return text.encode()


def quote(segment: str) -> str:
    """A URL path or query piece for any string, lone surrogates included (as their
    UTF-8-style bytes, which is what a careless client sends)."""
    return urllib.parse.quote(segment.encode("utf-8", "surrogatepass"), safe="")
