"""Runs one scheduled step through the model.

The whole step is ONE packed sequence ``input_ids [1, T]`` with per-token ``position_ids``:
no padding, so a decode token costs one token whatever the prompt lengths beside it. Only
the last hidden state of each sequence that samples goes through ``lm_head``.

The step's inputs are built with array operations, not per token: positions and slot
mappings come from each chunk's start and length, block tables from each sequence's
``PageRow`` (appended to as its handle grows), and everything goes to the device as ONE
int64 buffer (through a pinned staging buffer on CUDA). On CUDA a decode step replays a
captured graph of the decoder and ``lm_head`` (``graphs.py``); everything else runs eager.
"""

from __future__ import annotations

import contextlib
import itertools

import numpy as np
import torch
from transformers import PreTrainedModel

from kvgate.cachestore import CacheSeq
from kvgate.gateway.engine.attention import AttentionContext, attention_context
from kvgate.gateway.engine.graphs import DecodeGraphs, GraphUnavailable
from kvgate.gateway.engine.scheduler import Chunk
from kvgate.kernels.dispatch import use_triton
from kvgate.kernels.layout import KVLayout
from kvgate.kernels.reference import add_prefill_rows, pool_rows


class StepInputs:
    """One step's tensors on the device, views of one buffer."""

    def __init__(self, ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext,
                 sample_rows: torch.Tensor, num_samples: int) -> None:
        self.ids = ids  # [T] int64
        self.positions = positions  # [T] int64
        self.ctx = ctx
        self.sample_rows = sample_rows  # [n] int64: the tokens whose hidden state samples
        self.num_samples = num_samples


def _handle(chunk: Chunk) -> CacheSeq:
    handle = chunk.seq.handle
    assert handle is not None, "a scheduled sequence holds its pages"
    return handle


class ModelRunner:
    def __init__(self, model: PreTrainedModel, kv_pool: torch.Tensor, layout: KVLayout,
                 max_model_len: int = 0, cuda_graphs: bool = True, max_graph_batch: int = 256
                 ) -> None:
        self.model = model
        self.decoder = model.base_model  # the transformer without lm_head
        self.lm_head = model.get_output_embeddings()
        self.kv_pool = kv_pool
        self.layout = layout
        self.block_size = layout.block_size
        self.device = kv_pool.device
        self._staging: torch.Tensor | None = None  # pinned, on CUDA only
        # the torch kernels' path: the step's pool rows once, not per layer (attention.py);
        # quantized pools take the per-layer functions (docs/architecture.md, kernels)
        self.torch_rows = (not use_triton(kv_pool) and not layout.quantized
                           and kv_pool.is_contiguous() and kv_pool.dim() == 6)
        self.graphs: DecodeGraphs | None = None
        if cuda_graphs and self.device.type == "cuda" and max_model_len > 0:
            self.graphs = DecodeGraphs(self, -(-max_model_len // self.block_size), max_graph_batch)

    def prepare(self, chunks: list[Chunk]) -> StepInputs:
        bs = self.block_size
        batch = len(chunks)
        starts = np.fromiter((c.start for c in chunks), np.int64, batch)
        lengths = np.fromiter((c.length for c in chunks), np.int64, batch)
        samples = np.fromiter((c.samples for c in chunks), np.bool_, batch)
        ends = starts + lengths
        cu = np.zeros(batch + 1, dtype=np.int64)
        np.cumsum(lengths, out=cu[1:])
        total = int(cu[-1])
        if total == batch:  # decode: one token each
            ids = np.fromiter((c.seq.token_ids[c.start] for c in chunks), np.int64, batch)
            positions = starts
            token_row = np.arange(batch)
        else:
            ids = np.fromiter(itertools.chain.from_iterable(
                c.seq.token_ids[c.start : c.start + c.length] for c in chunks), np.int64, total)
            token_row = np.repeat(np.arange(batch), lengths)
            positions = np.arange(total) - (cu[:-1] - starts)[token_row]
        num_blocks = -(-ends // bs)
        width = int(num_blocks.max())
        tables = np.zeros((batch, width), dtype=np.int64)
        # each row's first pages, synced from its handle (``PageRow``), in one masked copy
        pages = [c.seq.pages.sync(_handle(c).block_table)[:n]
                 for c, n in zip(chunks, num_blocks.tolist(), strict=True)]
        tables[np.arange(width) < num_blocks[:, None]] = np.concatenate(pages)
        slots = tables[token_row, positions // bs] * bs + positions % bs
        rows = (cu[1:] - 1)[samples]
        # one buffer, one copy: ids, positions, slots | cu, seq_lens, rows | tables
        packed = np.concatenate([ids, positions, slots, cu, ends, rows, tables.ravel()])
        dev = self._to_device(packed)
        t, b = total, batch
        o = 3 * t
        ctx = AttentionContext(
            kv_pool=self.kv_pool,
            layout=self.layout,
            slot_mapping=dev[2 * t : o],
            block_tables=dev[o + 2 * b + 1 + len(rows) :].view(b, width).to(torch.int32),
            cu_seqlens_q=dev[o : o + b + 1].to(torch.int32),
            seq_lens=dev[o + b + 1 : o + 2 * b + 1].to(torch.int32),
            q_lens=lengths.tolist(),
            max_seqlen_q=int(lengths.max()),
            is_decode=total == batch,
            is_fresh=not starts.any(),
            max_seq_len=int(ends.max()),
        )
        if self.torch_rows:
            decode = total == batch
            ctx.rows = pool_rows(
                self.kv_pool, ctx.slot_mapping, ctx.block_tables if decode else None,
                ctx.seq_lens if decode else None, int(ends.min()), int(ends.max()))
            if not decode and not ctx.is_fresh:
                add_prefill_rows(ctx.rows, self.kv_pool, ctx.block_tables, cu.tolist(),
                                 ends.tolist())
        return StepInputs(dev[:t], dev[t : 2 * t], ctx,
                          dev[o + 2 * b + 1 : o + 2 * b + 1 + len(rows)], len(rows))

    def _to_device(self, packed: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(packed)
        if self.device.type != "cuda":
            return host.to(self.device)
        if self._staging is None or self._staging.numel() < host.numel():
            self._staging = torch.empty(max(host.numel(), 1 << 16), dtype=torch.int64,
                                        pin_memory=True)
        # The step before has synced (its sampled ids came back): the staging buffer is free.
        staged = self._staging[: host.numel()]
        staged.copy_(host)
        return staged.to(self.device, non_blocking=True)

    @torch.inference_mode()
    def run(self, chunks: list[Chunk]) -> torch.Tensor:
        """Logits ``[n, vocab]`` for the chunks that sample, in order, on the model's device
        in its dtype (the sampler reads them there)."""
        inputs = self.prepare(chunks)
        ctx = inputs.ctx
        every_token_samples = inputs.num_samples == inputs.ids.shape[0]
        if (self.graphs is not None and ctx.is_decode and every_token_samples
                and self.graphs.fits(len(chunks))):
            with contextlib.suppress(GraphUnavailable):  # it has turned itself off
                return self.graphs.run(inputs)
        with attention_context(ctx):
            hidden = self.decoder(input_ids=inputs.ids.unsqueeze(0),
                                  position_ids=inputs.positions.unsqueeze(0),
                                  use_cache=False).last_hidden_state
        if not inputs.num_samples:
            return torch.empty(0, self.lm_head.out_features, device=hidden.device)
        picked = hidden[0] if every_token_samples else hidden[0].index_select(0, inputs.sample_rows)
        logits: torch.Tensor = self.lm_head(picked)
        return logits
