"""CUDA graphs of the decode step: the decoder and ``lm_head`` replayed, not dispatched.

A decode step of a small model is hundreds of small kernels; launched one by one from
Python (transformers' eager per-layer dispatch) the host, not the GPU, sets the pace. A
graph is captured per padded batch size (``SIZES``), lazily on first use, all in one
memory pool. It reads static buffers (ids, positions, slot mapping, KV lengths, block
tables of the model's full width); a replay copies the step's inputs into them, padding
rows with slot -1 (their K/V are not stored) and KV length 0 (the kernel gives them a zero
output), and replays. The Triton kernels size themselves to the block table's width when
no host-side maximum is given, so nothing in the graph depends on a value that changes
between replays. Without Triton the torch kernels sync on lengths: no graphs then.
"""

from __future__ import annotations

import bisect
import logging
from typing import Any, Protocol

import torch

from kvgate.gateway.engine.attention import AttentionContext, attention_context
from kvgate.kernels.dispatch import triton_available


class ModelRunner(Protocol):
    """What a graph needs of ``runner.ModelRunner`` (a protocol: no import of the layer
    that owns the graphs)."""

    device: torch.device
    decoder: Any
    lm_head: Any
    kv_pool: Any
    layout: Any


class StepInputs(Protocol):
    ids: torch.Tensor
    positions: torch.Tensor
    ctx: AttentionContext

log = logging.getLogger("kvgate.engine")

SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class GraphUnavailable(Exception):
    """The step could not be captured; run it eager."""


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, max_blocks: int, max_batch: int) -> None:
        self.runner = runner
        self.sizes = [s for s in SIZES if s < max_batch] + [max_batch]
        self.enabled = triton_available()
        if not self.enabled:
            log.warning("triton is not installed: decode steps run eager, without CUDA graphs")
        device = runner.device
        self.ids = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.slots = torch.full((max_batch,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self.tables = torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=device)
        self.cu = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool: Any = None  # the graphs' shared memory pool (an opaque handle)

    def fits(self, batch: int) -> bool:
        return self.enabled and batch <= self.sizes[-1]

    def run(self, inputs: StepInputs) -> torch.Tensor:
        """Logits ``[batch, vocab]``: views of the graph's output, valid until its next
        replay (the engine samples them before the next step)."""
        batch = inputs.ids.shape[0]
        size = self.sizes[bisect.bisect_left(self.sizes, batch)]
        ctx = inputs.ctx
        width = ctx.block_tables.shape[1]
        self.ids[:batch].copy_(inputs.ids)
        self.positions[:batch].copy_(inputs.positions)
        self.slots[:batch].copy_(ctx.slot_mapping)
        self.slots[batch:size].fill_(-1)
        self.seq_lens[:batch].copy_(ctx.seq_lens)
        self.seq_lens[batch:size].zero_()
        self.tables[:batch, :width].copy_(ctx.block_tables)
        entry = self.graphs.get(size)
        if entry is None:
            try:
                entry = self._capture(size)
            except Exception:
                # A model whose forward cannot be captured (a host sync somewhere in it)
                # must still serve: eager from now on, said once, loudly.
                log.exception("capturing the decode graph failed; decode steps run eager")
                self.enabled = False
                torch.cuda.synchronize(self.runner.device)
                raise GraphUnavailable from None
        graph, logits = entry
        graph.replay()
        return logits[:batch]

    def _forward(self, size: int) -> torch.Tensor:
        ctx = AttentionContext(
            kv_pool=self.runner.kv_pool, layout=self.runner.layout,
            slot_mapping=self.slots[:size],
            block_tables=self.tables[:size], cu_seqlens_q=self.cu[: size + 1],
            seq_lens=self.seq_lens[:size], q_lens=[1] * size, max_seqlen_q=1,
            is_decode=True, is_fresh=False, max_seq_len=None,
        )
        with attention_context(ctx):
            hidden = self.runner.decoder(input_ids=self.ids[:size].unsqueeze(0),
                                         position_ids=self.positions[:size].unsqueeze(0),
                                         use_cache=False).last_hidden_state
        logits: torch.Tensor = self.runner.lm_head(hidden[0])
        return logits

    def _capture(self, size: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # The step's real inputs sit in the buffers; warm-up and capture must not store
        # K/V from them (slot -1) nor read past anything (length 0). They are put back after.
        saved = (self.slots[:size].clone(), self.seq_lens[:size].clone())
        self.slots[:size].fill_(-1)
        self.seq_lens[:size].zero_()
        stream = torch.cuda.Stream(device=self.runner.device)
        stream.wait_stream(torch.cuda.current_stream(self.runner.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # lazy initialisation (autotuning, workspaces) outside capture
                self._forward(size)
        torch.cuda.current_stream(self.runner.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(size)
        self.pool = graph.pool()
        self.slots[:size].copy_(saved[0])
        self.seq_lens[:size].copy_(saved[1])
        self.graphs[size] = (graph, logits)
        log.info("captured the decode graph for batch %d", size)
        return graph, logits
