"""A scripted model: the demo model whose output, for chosen tenants, is a given text.

Every logits row sampled for a request in a scripted namespace gets +30 on the script's next
token and -30 elsewhere, then EOS once the script is done. The text still goes through
everything an output goes through (grammar masks, sampling, detokenizing, stop strings,
parsers, billing), so tests can drive exact outputs, tool calls included, from random
weights."""

from __future__ import annotations

from typing import Any

from kvgate.gateway.engine import Engine
from testkit.admin import Tenant


class ScriptedModel:
    """The demo model with a script, installed on ``engine`` from construction until
    ``close()`` (or as a context manager). ``say(text)`` scripts every request;
    ``script(tenant, text)`` only that tenant's (a server shared by many tests)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.scripts: dict[str, list[int]] = {}  # namespace -> token ids, EOS last
        self.everyone: list[int] | None = None
        self._run = engine.runner.run
        engine.runner.run = self.run  # type: ignore[method-assign]

    def _ids(self, text: str) -> list[int]:
        return self.engine.tokenizer.encode(text) + self.engine.tokenizer.eos_token_ids[:1]

    def say(self, text: str) -> list[int]:
        """Every request answers ``text``; returns the script's ids (EOS included)."""
        self.everyone = self._ids(text)
        return self.everyone

    def script(self, tenant: Tenant, text: str) -> list[int]:
        """``tenant``'s requests answer ``text``; returns the script's ids (EOS included)."""
        ids = self.scripts[f"tenant:{tenant.id}"] = self._ids(text)
        return ids

    def run(self, chunks: list[Any]) -> Any:
        logits = self._run(chunks).clone()  # an inference tensor: not writable in place
        eos = self.engine.tokenizer.eos_token_ids[0]
        for row, chunk in zip(logits, [c for c in chunks if c.samples], strict=True):
            script = self.scripts.get(chunk.seq.request.namespace, self.everyone)
            if script is not None:
                pos = chunk.seq.num_output
                row.fill_(-30.0)
                row[script[pos] if pos < len(script) else eos] = 30.0
        return logits

    def close(self) -> None:
        self.engine.runner.run = self._run  # type: ignore[method-assign]

    def __enter__(self) -> ScriptedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
