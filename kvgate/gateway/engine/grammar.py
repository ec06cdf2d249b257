"""Enforcing structured outputs: grammars compiled with llguidance, batched token masks.

Why llguidance: one small wheel with no dependencies (xgrammar pulls transformers and a
compiler runtime into the serving install), it reads a ``tokenizers`` JSON directly, speaks
JSON schema, regex and Lark (with ``%json`` to embed a schema in a grammar), and fills the
masks of a whole batch in parallel native threads with the GIL released.

Per request: the spec is compiled once (``compile``, cached by spec with a bound) into a
matcher in its start state, and each sequence gets its own copy (``matcher``). Per step:
``apply`` fills one bitmask row per sequence that samples under a grammar (one parallel
call), unpacks it with numpy and masks the step's logits in one masked store per logits
tensor; ``accept`` advances a sequence's matcher with the token it sampled and says when
the grammar is complete (the sequence then stops, finish reason ``stop``). EOS is in the
mask only where the grammar accepts.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import llguidance as llg
import llguidance.numpy as llg_np
import numpy as np
import torch

from kvgate.gateway.engine.request import InvalidGrammar
from kvgate.gateway.engine.structured import StructuredSpec

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

    from kvgate.gateway.engine.scheduler import Chunk
    from kvgate.gateway.engine.sequence import Sequence

# Compact JSON: whitespace between tokens would let a model loop on blanks.
JSON_DEFAULTS: JsonCompileOptions = {"whitespace_flexible": False}
CACHE_SIZE = 256


def grammar_text(spec: StructuredSpec) -> str:
    """The spec as an llguidance grammar (not yet checked)."""
    try:
        if spec.kind == "json_object":
            return llg.LLMatcher.grammar_from_json_schema({"type": "object"},
                                                          defaults=JSON_DEFAULTS.copy())
        if spec.kind == "json_schema":
            schema = json.loads(spec.spec)
            if not isinstance(schema, dict):
                raise InvalidGrammar("the JSON schema must be an object")
            return llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_DEFAULTS.copy())
        if spec.kind == "regex":
            return llg.LLMatcher.grammar_from_regex(spec.spec)
        return llg.LLMatcher.grammar_from_lark(spec.spec)
    except (ValueError, TypeError) as exc:
        raise InvalidGrammar(f"the {spec.kind} does not compile: {exc}") from None


class GrammarEngine:
    """The model's tokenizer as llguidance sees it, the compiled grammars, the executor."""

    def __init__(self, tokenizer_json: str, eos_token_ids: list[int], vocab_size: int,
                 threads: int | None = None) -> None:
        # ``vocab_size`` is the model's (its logits' width): ids past the tokenizer's are
        # never allowed under a grammar.
        self.tokenizer = llg.LLTokenizer(tokenizer_json, n_vocab=vocab_size,
                                         eos_token=eos_token_ids or None)
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self.executor = llg.LLExecutor(num_threads=threads)
        self._cache: OrderedDict[StructuredSpec, llg.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()  # compile runs on request threads, matcher on any

    def compile(self, spec: StructuredSpec) -> llg.LLMatcher:
        """The spec's matcher in its start state (cached); ``InvalidGrammar`` when the spec
        does not compile. Do not advance it: ``matcher`` hands out copies."""
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
        check_bounds(spec)
        matcher = llg.LLMatcher(self.tokenizer, grammar_text(spec), log_level=0)
        if matcher.is_error():
            raise InvalidGrammar(f"the {spec.kind} does not compile: {matcher.get_error()}")
        # Some grammars compile and then fail at their first token (too many items to
        # track): try the first step on a copy, so they are a 400 now, not a failed request.
        probe = matcher.deep_copy()
        probe.compute_bitmask()
        probe.compute_ff_tokens()
        if probe.is_error():
            raise InvalidGrammar(f"the {spec.kind} is too complex to follow: "
                                 f"{probe.get_error()}")
        with self._lock:
            self._cache[spec] = matcher
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return matcher

    def matcher(self, spec: StructuredSpec) -> llg.LLMatcher:
        """A fresh matcher for one sequence."""
        return self.compile(spec).deep_copy()

    def of(self, seq: Sequence) -> llg.LLMatcher | None:
        """The sequence's matcher, made on first use (a fork of ``n`` gets its own)."""
        spec = seq.params.structured
        if spec is not None and seq.grammar is None:
            seq.grammar = self.matcher(spec)
        return seq.grammar

    def fill(self, matchers: list[tuple[llg.LLMatcher, int]], rows: int) -> np.ndarray:
        """Bitmask ``[rows, words]`` int32: the rows named in ``matchers`` filled by their
        grammar (in parallel, GIL released), the others all ones."""
        mask = np.full((rows, self.words), -1, dtype=np.int32)
        llg_np.fill_next_token_bitmask_par(self.executor, matchers, mask)
        return mask

    @staticmethod
    def disallowed(mask: np.ndarray, width: int) -> np.ndarray:
        """Bool ``[rows, width]``: True where the bitmask forbids the token."""
        bits = np.unpackbits((~mask).view(np.uint8), axis=1, count=width, bitorder="little")
        return bits.view(np.bool_)

    @torch.inference_mode()  # the runner's logits are inference tensors
    def apply(self, computed: list[tuple[Chunk, torch.Tensor | None]]) -> None:
        """Masks, in place, the logits rows of the sequences that sample under a grammar.
        Rows are grouped by the logits tensor they are views of (one, unless a failed
        forward was split), and each tensor is masked in one op."""
        groups: dict[int, tuple[torch.Tensor, list[tuple[llg.LLMatcher, int]]]] = {}
        for chunk, row in computed:
            grammar = None if row is None else self.of(chunk.seq)
            if row is None or grammar is None:
                continue
            base = row._base
            if not (base is not None and base.dim() == 2 and base.is_contiguous()
                    and base.shape[1] == row.shape[0]):
                base, index = row.unsqueeze(0), 0
            else:
                index = (row.storage_offset() - base.storage_offset()) // base.stride(0)
            entry = groups.setdefault(id(base), (base, []))
            entry[1].append((grammar, index))
        for base, matchers in groups.values():
            rows, width = base.shape
            banned = self.disallowed(self.fill(matchers, rows), width)
            if base.device.type == "cpu" and base.dtype == torch.float32:
                # numpy's masked store is vectorized; torch's CPU masked_fill_ is not
                np.copyto(base.numpy(), -np.inf, where=banned)
            else:
                base.masked_fill_(torch.from_numpy(banned).to(base.device), float("-inf"))

    def accept(self, seq: Sequence, token: int) -> bool:
        """Advances the sequence's matcher by the token it sampled; True when its grammar
        is complete (nothing but EOS may follow); False without a grammar. A grammar the
        engine cannot follow fails its sequence alone, with ``InvalidGrammar``."""
        matcher = self.of(seq)
        if matcher is None:
            return False
        if not matcher.consume_token(token):
            # The grammar engine gave up on the client's grammar (e.g. one that can never
            # end tracks too many items): the client's spec, so a 4xx, not a server fault.
            raise InvalidGrammar(f"the grammar could not be followed past token {token}: "
                                 f"{matcher.get_error()}")
        return bool(matcher.is_stopped())


# Bounds checked before the grammar engine sees a spec: past them its compiler recurses
# deep enough to crash the process (a chain of 1000 "$ref"s or 3000 Lark rules did), and
# a spec this large is no real client's.
MAX_SPEC_CHARS = 64 * 1024
MAX_NESTING = 64  # brackets, braces and parentheses, outside string literals
MAX_REFS = 128  # "$ref"s in a JSON schema (chains of definitions)
MAX_RULES = 512  # Lark rules
# Regular expressions in JSON schemas ("pattern", "patternProperties" keys): the grammar
# engine's compile time grows faster than linearly with them (600 patternProperties: 43 s).
MAX_PATTERNS = 32
_LARK_RULE = re.compile(r"^[ \t]*[?!]?[A-Za-z_]\w*(?:\.-?\d+)?[ \t]*:", re.MULTILINE)


def check_bounds(spec: StructuredSpec) -> None:
    """``InvalidGrammar`` for a spec past the bounds above, with the bound it broke."""
    text = spec.spec
    if len(text) > MAX_SPEC_CHARS:
        raise InvalidGrammar(f"the {spec.kind} is {len(text)} characters; the limit is "
                             f"{MAX_SPEC_CHARS}")
    depth = deepest = 0
    quote: str | None = None
    escaped = False
    for ch in text:
        if quote is not None:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = None
        elif ch == '"' or (ch == "'" and spec.kind != "regex"):
            quote = ch
        elif ch in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")]}":
            depth -= 1
    if deepest > MAX_NESTING:
        raise InvalidGrammar(f"the {spec.kind} nests {deepest} levels deep; the limit is "
                             f"{MAX_NESTING}")
    refs = text.count('"$ref"')
    if refs > MAX_REFS:
        raise InvalidGrammar(f"the {spec.kind} has {refs} \"$ref\"s; the limit is {MAX_REFS}")
    if spec.kind == "lark":
        rules = len(_LARK_RULE.findall(text))
        if rules > MAX_RULES:
            raise InvalidGrammar(f"the grammar has {rules} rules; the limit is {MAX_RULES}")
    schemas = _schemas(spec)
    if any(isinstance(s, dict) and not isinstance(s.get("x-guidance", {}), dict)
           for s in schemas):
        raise InvalidGrammar("the schema's 'x-guidance' must be an object of options")
    patterns = sum(_patterns(schema) for schema in schemas)
    if patterns > MAX_PATTERNS:
        raise InvalidGrammar(f"the {spec.kind} has {patterns} regular expressions (pattern, "
                             f"patternProperties); the limit is {MAX_PATTERNS}")


def _schemas(spec: StructuredSpec) -> list[Any]:
    """The JSON schemas in a spec: the spec itself, or each ``%json {...}`` of a grammar."""
    if spec.kind == "json_schema":
        try:
            return [json.loads(spec.spec)]
        except ValueError:
            return []
    if spec.kind != "lark":
        return []
    out, decoder, at = [], json.JSONDecoder(), spec.spec.find("%json")
    while at >= 0:
        start = spec.spec.find("{", at)
        try:
            value, _ = decoder.raw_decode(spec.spec, start) if start >= 0 else (None, 0)
            out.append(value)
        except ValueError:
            pass
        at = spec.spec.find("%json", at + 5)
    return out


def _patterns(node: Any) -> int:
    if isinstance(node, list):
        return sum(_patterns(v) for v in node)
    if not isinstance(node, dict):
        return 0
    own = (isinstance(node.get("pattern"), str)
           + (len(node["patternProperties"]) if isinstance(node.get("patternProperties"), dict)
              else 0))
    return own + sum(_patterns(v) for v in node.values())
