"""Runs one scheduled step through the model.

The whole step is ONE packed sequence ``input_ids [1, T]`` with per-token ``position_ids``:
no padding, so a decode token costs one token whatever the prompt lengths beside it. Only
the last hidden state of each sequence that samples goes through ``lm_head``.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from gateway.engine.attention import AttentionContext, attention_context
from gateway.engine.scheduler import Chunk


class ModelRunner:
    def __init__(self, model: PreTrainedModel, kv_pool: torch.Tensor, block_size: int) -> None:
        self.model = model
        self.decoder = model.base_model  # the transformer without lm_head
        self.lm_head = model.get_output_embeddings()
        self.kv_pool = kv_pool
        self.block_size = block_size
        self.device = kv_pool.device

    def prepare(self, chunks: list[Chunk]) -> tuple[torch.Tensor, torch.Tensor, AttentionContext, list[int]]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        q_lens: list[int] = []
        seq_lens: list[int] = []
        cu = [0]
        sample_rows: list[int] = []
        tables = []
        for c in chunks:
            assert c.seq.handle is not None, "a scheduled sequence holds its pages"
            table = c.seq.handle.block_table
            end = c.start + c.length
            input_ids.extend(c.seq.token_ids[c.start : end])
            positions.extend(range(c.start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(c.start, end))
            q_lens.append(c.length)
            seq_lens.append(end)
            cu.append(cu[-1] + c.length)
            tables.append(table[: -(-end // bs)])
            if c.samples:
                sample_rows.append(cu[-1] - 1)
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]

        def tensor(data: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(data, dtype=dtype).to(self.device, non_blocking=True)

        ctx = AttentionContext(
            kv_pool=self.kv_pool,
            slot_mapping=tensor(slots, torch.int64),
            block_tables=tensor(padded, torch.int32),
            cu_seqlens_q=tensor(cu, torch.int32),
            seq_lens=tensor(seq_lens, torch.int32),
            q_lens=q_lens,
            max_seqlen_q=max(q_lens),
            is_decode=all(n == 1 for n in q_lens),
            is_fresh=all(c.start == 0 for c in chunks),
        )
        ids = tensor(input_ids, torch.int64).unsqueeze(0)
        pos = tensor(positions, torch.int64).unsqueeze(0)
        return ids, pos, ctx, sample_rows

    @torch.inference_mode()
    def run(self, chunks: list[Chunk]) -> torch.Tensor:
        """Logits ``[n, vocab]`` (fp32, on the CPU) for the chunks that sample, in order."""
        ids, pos, ctx, rows = self.prepare(chunks)
        with attention_context(ctx):
            hidden = self.decoder(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
        if not rows:
            return torch.empty(0, self.lm_head.out_features)
        picked = hidden[0, torch.tensor(rows, device=hidden.device)]
        logits: torch.Tensor = self.lm_head(picked)
        return logits.float().cpu()
