"""The demo model, --model PATH loading, and the attention registration."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from kvgate.gateway.engine import EngineConfig, GenerateRequest
from kvgate.gateway.engine.attention import ATTN_IMPLEMENTATION
from kvgate.gateway.engine.demo import build_model, build_tokenizer
from kvgate.gateway.engine.engine import Engine
from kvgate.gateway.engine.loader import ModelFilesMissing, load_model, save_pretrained

from .conftest import collect, greedy, prompt_of


def test_demo_weights_are_reproducible():
    a, b = build_model("demo", seed=0), build_model("demo", seed=0)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.lm_head.weight, build_model("demo", seed=1).lm_head.weight)


def test_demo_tokenizer_is_byte_level_with_specials_and_template():
    tok = build_tokenizer()
    text = "héllo\n\t{}"
    assert tok.encode(text) == list(text.encode())
    assert tok.decode(tok.encode(text)) == text
    ids = tok.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "u"}]}])
    names = [tok.tokenizer.id_to_token(i) for i in ids]
    assert names == ["<|begin_of_text|>", "<|system|>", "s", "<|eot|>", "<|user|>", "u", "<|eot|>", "<|assistant|>"]
    assert tok.decode(ids) == "su"  # specials are not text


def test_engine_config_resolves_device_and_dtype():
    cfg = EngineConfig(block_size=32, device_cache_bytes=1 << 20, max_batch_tokens=99)
    assert (cfg.block_size, cfg.device_cache_bytes, cfg.max_batch_tokens, cfg.model) == (32, 1 << 20, 99, "demo")
    assert cfg.torch_dtype == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    with pytest.raises(ValueError):
        EngineConfig(dtype="int8")


def test_attention_and_mask_functions_are_registered(demo_loaded):
    assert demo_loaded.model.config._attn_implementation == ATTN_IMPLEMENTATION
    assert ATTN_IMPLEMENTATION in AttentionInterface._global_mapping
    mask_fn = AttentionMaskInterface._global_mapping[ATTN_IMPLEMENTATION]
    assert mask_fn(batch_size=1, q_length=4, kv_length=4) is None
    # outside the runner there are no pages to write: a clear error, not a silent dense path
    with pytest.raises(RuntimeError, match="attention context"):
        demo_loaded.model(torch.tensor([[1, 2, 3]]))
    assert demo_loaded.info["demo"] is True and "meaningless" in demo_loaded.info["note"]


async def test_model_path_loads_a_saved_model(tmp_path, demo_loaded, make_engine):
    save_pretrained(demo_loaded, tmp_path)
    loaded = load_model(EngineConfig(model=str(tmp_path)))
    assert loaded.info["demo"] is False and loaded.model_id == tmp_path.name
    assert loaded.tokenizer.eos_token_ids == demo_loaded.tokenizer.eos_token_ids
    engine = Engine(EngineConfig(model=str(tmp_path), device_cache_bytes=8 << 20, host_cache_bytes=0), loaded=loaded)
    await engine.start()
    try:
        demo_engine = await make_engine()
        prompt = prompt_of(demo_engine, "same weights")
        assert engine.render_chat([{"role": "user", "content": "same weights"}]) == prompt
        got, _, _ = await collect(engine, GenerateRequest("a", "t", prompt, greedy(8)))
        want, _, _ = await collect(demo_engine, GenerateRequest("a", "t", prompt, greedy(8)))
        assert got == want
    finally:
        await engine.stop()


@pytest.mark.parametrize("victim", ["config.json", "tokenizer.json", "model.safetensors"])
def test_missing_model_file_is_named(tmp_path, demo_loaded, victim):
    save_pretrained(demo_loaded, tmp_path)
    (tmp_path / victim).unlink()
    expect = "safetensors" if victim.endswith("safetensors") else victim
    with pytest.raises(ModelFilesMissing, match=expect.replace(".", r"\.")):
        load_model(EngineConfig(model=str(tmp_path)))


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelFilesMissing, match="no such directory"):
        load_model(EngineConfig(model=str(tmp_path / "nope")))


def test_saved_tokenizer_config_keeps_the_chat_template(tmp_path, demo_loaded):
    save_pretrained(demo_loaded, tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "tokenizer.json"} <= files
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    template = cfg.get("chat_template") or (tmp_path / "chat_template.jinja").read_text()
    assert "<|assistant|>" in template


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
async def test_other_architectures_load_from_a_directory_and_match_oracle(tmp_path, arch):
    from transformers import AutoConfig, AutoModelForCausalLM

    from kvgate.gateway.engine.loader import LoadedModel

    tok = build_tokenizer()
    cfg = AutoConfig.for_model(
        arch, vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )
    torch.manual_seed(3)
    hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    save_pretrained(LoadedModel(hf, tok, arch), tmp_path)
    engine = Engine(EngineConfig(model=str(tmp_path), device_cache_bytes=1 << 20, host_cache_bytes=0))
    assert engine.model_info["architecture"] == arch
    await engine.start()
    try:
        prompt = engine.render_chat([{"role": "user", "content": "any architecture"}])
        first, _, _ = await collect(engine, GenerateRequest("a", "t", prompt, greedy(6)))
        second, _, fin = await collect(engine, GenerateRequest("b", "t", prompt, greedy(6)))
    finally:
        await engine.stop()
    hf.generation_config.eos_token_id = None
    with torch.inference_mode():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt):].tolist()
    assert fin.usage.cached_tokens > 0
    assert first == second == want


async def test_bfloat16_runs_on_bf16_pages():
    engine = Engine(EngineConfig(dtype="bfloat16", device_cache_bytes=4 << 20, host_cache_bytes=0))
    assert engine.store.device_pool.dtype == torch.bfloat16
    await engine.start()
    try:
        prompt = prompt_of(engine, "half precision")
        ids, _, fin = await collect(engine, GenerateRequest("a", "t", prompt, greedy(4)))
    finally:
        await engine.stop()
    assert len(ids) == 4 and fin.finish_reason == "length"
