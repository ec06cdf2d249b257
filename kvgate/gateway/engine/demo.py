"""The built-in demo model: Llama architecture, random weights, byte-level tokenizer.

Its text is meaningless. It exists so the whole service runs anywhere with no download,
and so benchmarks have a model of known shape. Weights come from a fixed seed, so two
processes (or a test and its oracle) build the very same model. transformers is imported
by the functions that build it: the shapes and the tokenizer (the router's, the planner's)
do without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from kvgate.gateway.engine.tokenizer import TextTokenizer

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM

BOS = "<|begin_of_text|>"
EOT = "<|eot|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|tool|>")
PAD = "<|pad|>"
SPECIAL_TOKENS = (BOS, EOT, *ROLE_TOKENS, PAD)

# One role marker per message, the text, then <|eot|>; unknown roles fall back to user.
# Tools in the Hermes/Qwen form: their JSON in <tools></tools> in the system turn (before
# the system text, in Anthropic's cache order: tools, system, messages), calls as
# <tool_call>{"name", "arguments"}</tool_call> in assistant turns, results in
# <tool_response>. Without tools, the text is the plain form above. ("\n" is written as
# {{ NL }}: trim_blocks would eat a newline that follows a block tag.)
_TOOLS_SYSTEM = (
    "{% set NL = '\n' %}"
    "{% if tools %}<|system|>"
    "# Tools{{ NL }}{{ NL }}You may call one or more functions to assist with the user query."
    "{{ NL }}{{ NL }}You are provided with function signatures within <tools></tools> XML "
    "tags:{{ NL }}<tools>{% for t in tools %}{{ NL }}{{ t | tojson }}{% endfor %}{{ NL }}"
    "</tools>{{ NL }}{{ NL }}For each function call, return a json object with function name "
    "and arguments within <tool_call></tool_call> XML tags:{{ NL }}<tool_call>{{ NL }}"
    '{"name": <function-name>, "arguments": <args-json-object>}{{ NL }}</tool_call>'
    "{% if messages and messages[0]['role'] == 'system' %}{{ NL }}{{ NL }}"
    "{{ messages[0]['content'] }}{% endif %}<|eot|>"
    "{% endif %}"
)
_TOOL_CALLS = (
    "{% for tc in m['tool_calls'] or [] %}"
    "{% set f = tc['function'] if tc['function'] is defined else tc %}"
    "{% if m['content'] or not loop.first %}{{ NL }}{% endif %}"
    '<tool_call>{{ NL }}{"name": {{ f[\'name\'] | tojson }}, "arguments": '
    "{% if f['arguments'] is string %}{{ f['arguments'] }}{% else %}{{ f['arguments'] | tojson }}"
    "{% endif %}}{{ NL }}</tool_call>"
    "{% endfor %}"
)
CHAT_TEMPLATE = (
    "{{ bos_token }}" + _TOOLS_SYSTEM +
    "{% for m in messages %}"
    "{% if tools and loop.first and m['role'] == 'system' %}"
    "{% elif m['role'] == 'tool' %}<|tool|><tool_response>{{ NL }}{{ m['content'] }}{{ NL }}"
    "</tool_response><|eot|>"
    "{% elif m['role'] == 'assistant' and m['tool_calls'] is defined %}"
    "<|assistant|>{{ m['content'] }}" + _TOOL_CALLS + "<|eot|>"
    "{% else %}"
    "{% if m['role'] in ['system', 'user', 'assistant'] %}<|{{ m['role'] }}|>"
    "{% else %}<|user|>{% endif %}"
    "{{ m['content'] }}<|eot|>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# name → LlamaConfig overrides. "demo" is small enough for tests and a 2-core CPU;
# "bench" (~150M parameters) is the named larger shape the TTFT benchmark also runs.
@dataclass(frozen=True)
class Shape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int


SHAPES = {
    "demo": Shape(hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=64),
    "bench": Shape(hidden_size=1024, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=16, num_key_value_heads=4, head_dim=64),
}
MAX_POSITIONS = 8192


def build_tokenizer() -> TextTokenizer:
    """Ids 0..255 are the bytes themselves; the specials follow from 256."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=_byte_of)
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return TextTokenizer(tok, CHAT_TEMPLATE, bos_token=BOS, eos_tokens=[EOT])


def _byte_of(ch: str) -> int:
    """Inverse of GPT-2's bytes→unicode table, so byte b gets id b."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    if ord(ch) in bs:
        return ord(ch)
    extra = [b for b in range(256) if b not in bs]
    return extra[ord(ch) - 256]


def demo_config(shape: str = "demo", tokenizer: TextTokenizer | None = None) -> LlamaConfig:
    from transformers import LlamaConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown demo shape {shape!r}; known: {', '.join(SHAPES)}")
    tok = tokenizer or build_tokenizer()
    ids = tok.tokenizer
    dims = SHAPES[shape]
    return LlamaConfig(
        vocab_size=tok.vocab_size,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=ids.token_to_id(BOS),
        eos_token_id=ids.token_to_id(EOT),
        pad_token_id=ids.token_to_id(PAD),
        initializer_range=0.05,  # peaky logits: greedy ties between tokens stay rare
        hidden_size=dims.hidden_size, intermediate_size=dims.intermediate_size,
        num_hidden_layers=dims.num_hidden_layers, num_attention_heads=dims.num_attention_heads,
        num_key_value_heads=dims.num_key_value_heads, head_dim=dims.head_dim,
    )


def build_model(
    shape: str = "demo",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> LlamaForCausalLM:
    """Same (shape, seed) → bit-identical weights, on any machine."""
    from transformers import LlamaForCausalLM

    config = demo_config(shape)
    config._attn_implementation = attn_implementation
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with torch.random.fork_rng(devices=list(range(devices))):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    torch.nn.Module.to(model, dtype)  # in place; a plain model has nothing to guard
    model.eval()
    return model


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
