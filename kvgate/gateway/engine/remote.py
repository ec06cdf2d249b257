"""The engine's side of the tiers below the host (the local disk, then the remote (Valkey) tier
tier): attach them to the store, fetch before admission.

The fetch runs on the asyncio side when a request arrives (a small thread pool of its own,
so a slow disk or Valkey never holds the default executor), bounded by the tiers' timeouts
(the disk's deadline, then twice Valkey's). What it
brought is handed to the engine thread as a call queued just before the request itself:
the blocks are indexed as cached device blocks (``CacheStore.adopt_remote``), so the
request's admission matches them like any other hit and bills them as cache reads. The
fetched pages live only from the fetch to that call, so their memory is bounded by the
fetch pool's width times ``max_fetch_blocks`` pages. Any error or timeout is a miss: the
request is computed as if there were no such tier.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable

import torch
import xxhash
from transformers import PreTrainedModel

from kvgate.cachestore import CacheStore
from kvgate.cachestore.disk_tier import DiskTier, DiskTierConfig
from kvgate.cachestore.remote_tier import CostModel, ModelShape, RemoteTier, RemoteTierConfig
from kvgate.gateway.engine.loader import head_dim_of
from kvgate.gateway.engine.request import GenerateRequest
from kvgate.kernels.layout import KVLayout

log = logging.getLogger("kvgate.engine")

CUDA_FLOPS = 2e14  # prefill FLOP/s assumed on a GPU when --shared-tier-compute-flops is 0
CPU_FLOPS = 5e10


def model_shape(model: PreTrainedModel) -> ModelShape:
    """Weights used per token (the input embedding is a lookup, not a matmul, unless it
    is tied to the output head) and the attention's shape, from a transformers model."""
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()  # type: ignore[operator]
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    return ModelShape(params=total if tied else total - embedding,
                      num_layers=int(cfg.num_hidden_layers),
                      num_q_heads=int(cfg.num_attention_heads), head_dim=head_dim_of(cfg))


def weights_fingerprint(model: torch.nn.Module, sample: int = 4096) -> str:
    """A digest of a model's weights: every tensor's name, shape and dtype, and ``sample``
    values taken at an even stride through it (a fine-tune or another checkpoint changes
    them all; reading every byte of a large model would slow the start for nothing)."""
    digest = xxhash.xxh3_128()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            flat = tensor.detach().reshape(-1)
            picked = flat[::max(1, flat.numel() // sample)][:sample]
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
            digest.update(picked.float().cpu().numpy().tobytes())
    return digest.hexdigest()


class RemoteTierClient:
    """One replica's tiers below the host: attached to its store; fetches for its requests.
    ``disk`` (first) and ``tier`` (Valkey) are each None when not configured."""

    def __init__(self, config: RemoteTierConfig | None, store: CacheStore, layout: KVLayout,
                 model: PreTrainedModel, model_id: str, device: torch.device,
                 disk: DiskTierConfig | None = None, compute_flops: float = 0.0) -> None:
        self.config = config
        self.store = store
        shape = model_shape(model)
        flops = compute_flops or (config.compute_flops if config is not None else 0.0) or \
            (CUDA_FLOPS if device.type == "cuda" else CPU_FLOPS)
        self.disk: DiskTier | None = None
        self.tier: RemoteTier | None = None
        self.deadline_s = 0.0
        # what the tiers' records are signed with: the name and the weights themselves, so
        # other weights served under the same name (a checkpoint replaced in place, two
        # fine-tunes in directories of one name) never read each other's pages
        model_id = f"{model_id}@{weights_fingerprint(model)}"
        if disk is not None:
            self.disk = DiskTier(disk, layout, model_id)  # DiskTierUnavailable: refuse to start
            disk_cost = CostModel(layout, shape, disk.read_bytes_per_s, disk.read_latency_s,
                                  flops)
            store.attach_tier(self.disk, disk_cost)
            self.deadline_s += 2 * disk.timeout_ms / 1000
            log.info("disk tier on (%s, %d bytes): a block costs %.3f ms to read and %.3f ms "
                     "to compute (at the prompt's start), so it is read when the first is "
                     "smaller (--disk-cache-read-bandwidth-bytes, --shared-tier-compute-flops)",
                     disk.path, disk.capacity_bytes, disk_cost.fetch_s(1) * 1e3,
                     disk_cost.compute_s(0, 1) * 1e3)
        if config is not None:
            try:
                self.tier = RemoteTier(config, layout, model_id)
            except BaseException:
                if self.disk is not None:
                    self.disk.close()
                raise
            self.cost = CostModel(layout, shape, config.bandwidth_bytes, config.rtt_s, flops)
            store.attach_tier(self.tier, self.cost)
            self.deadline_s += 2 * config.timeout_ms / 1000
            log.info("shared tier on: a block costs %.3f ms to fetch and %.3f ms to compute "
                     "(at the prompt's start), so it is fetched when the first is smaller "
                     "(--shared-tier-bandwidth-bytes, --shared-tier-compute-flops)",
                     self.cost.fetch_s(1) * 1e3, self.cost.compute_s(0, 1) * 1e3)
        self._pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="kvgate-shared")

    async def prefetch(self, request: GenerateRequest) -> Callable[[], int] | None:
        """Fetch the prompt's blocks after the local prefix (all but the last token, as
        the scheduler matches); → the call that adopts them on the engine thread, or None.
        Never raises; never waits past the tiers' deadlines."""
        prompt = request.prompt_token_ids[:-1]
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._pool, self.store.fetch_remote, request.namespace,
                                      prompt)
        try:
            fetched = await asyncio.wait_for(future, self.deadline_s)
        except Exception as exc:  # a timeout or a bug here is a miss, never a failed request
            log.warning("fetch from the tiers below the host abandoned: %r", exc)
            return None
        if fetched is None:
            return None
        # the request's TTLs: adopted blocks expire as the request's own writes would
        seq = self.store.open(f"remote:{request.request_id}", request.namespace,
                              list(request.ttl_segments), request.default_ttl_s)
        return lambda: self.store.adopt_remote(seq, prompt, fetched)

    def drain(self, timeout_s: float = 10.0) -> bool:
        """Wait until every tier's write-behind queue is empty (tests, benchmarks)."""
        return all(t.drain(timeout_s) for t in (self.disk, self.tier) if t is not None)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.tier is not None:
            self.tier.close()
        if self.disk is not None:
            self.disk.close()
