"""The disk tier under the store, on real files: write-through, a restarted store warm from
the directory alone, verification (corruption, truncation, another layout or model, another
tenant), TTLs across restarts, capacity, flush, the directory lock, and file-system errors
that must be misses with a count, never an exception."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from kvgate.cachestore import CacheStore
from kvgate.cachestore.disk_tier import DiskTier, DiskTierConfig, DiskTierUnavailable
from kvgate.cachestore.hashing import chain_hashes, token_bytes
from kvgate.kernels.layout import KVLayout

BLOCK = 4
PROMPT = list(range(100, 113))  # 3 full blocks and one token


class Wall:
    """The tier's wall clock, moved by hand."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_layout(dtype: torch.dtype = torch.float32, heads: int = 1) -> KVLayout:
    return KVLayout(num_layers=2, num_kv_heads=heads, head_dim=2, block_size=BLOCK, dtype=dtype)


@pytest.fixture
def layout() -> KVLayout:
    return make_layout()


Replica = Callable[..., tuple[CacheStore, DiskTier]]


@pytest.fixture
def replica(tmp_path: Path) -> Iterator[Replica]:
    """A store with a disk tier on ``tmp_path/disk`` (cost model off); each call is a new
    replica (close the previous one first: the directory is locked)."""
    tiers: list[DiskTier] = []

    def make(layout: KVLayout | None = None, device_pages: int = 16, host_pages: int = 0,
             ttl_s: float = 300.0, model_id: str = "demo", wall: Wall | None = None,
             path: Path | None = None, **config: Any) -> tuple[CacheStore, DiskTier]:
        layout = layout or make_layout()
        pb = layout.page_bytes
        store = CacheStore(layout, device_pages * pb, host_pages * pb, default_ttl_s=ttl_s,
                           model_id=model_id)
        cfg = DiskTierConfig(path=str(path or tmp_path / "disk"),
                             **{"capacity_bytes": 1 << 20, **config})
        tier = DiskTier(cfg, layout, model_id, **({"wall_clock": wall} if wall else {}))
        tiers.append(tier)
        store.attach_tier(tier, None)
        return store, tier

    yield make
    for tier in tiers:
        tier.close(drain_s=0)


def kv_of(namespace: str, position: int, tokens: list[int], layout: KVLayout) -> torch.Tensor:
    """What 'computing' block ``position`` writes: a page determined by its whole prefix."""
    seed = hash((namespace, tuple(tokens[: (position + 1) * BLOCK]))) % (2**31)
    return torch.randn(layout.page_shape, generator=torch.Generator().manual_seed(seed)).to(
        layout.dtype)


def serve(store: CacheStore, namespace: str, tokens: list[int]) -> tuple[int, list[str]]:
    """One request as the engine runs it: fetch (off the engine thread), adopt, match,
    compute what missed, commit, release. → (blocks found, where each was found)."""
    fetched = store.fetch_remote(namespace, tokens)
    seq = store.open(f"s{time.monotonic_ns()}", namespace)
    if fetched is not None:
        store.adopt_remote(seq, tokens, fetched)
    match = store.match(seq, tokens)
    assert store.allocate(seq, len(tokens))
    for i in range(match.num_blocks, len(tokens) // BLOCK):
        store.device.tensor[seq.block_table[i]] = kv_of(namespace, i, tokens, store.layout)
    for i in range(match.num_blocks):  # what the cache gave is what was computed
        assert torch.equal(store.device.tensor[seq.block_table[i]],
                           kv_of(namespace, i, tokens, store.layout))
    store.commit(seq, tokens)
    store.release(seq)
    return match.num_blocks, [tier for _, tier in match.blocks]


def files(tier: DiskTier) -> list[Path]:
    return sorted(p for p in (tier.root / "kv").rglob("*") if p.is_file())


def written(store: CacheStore, tier: DiskTier, namespace: str = "t") -> int:
    """Serve PROMPT once (nothing cached) and wait for its blocks to reach the disk."""
    assert serve(store, namespace, PROMPT)[0] == 0
    assert tier.drain()
    return len(files(tier))


def test_blocks_written_through_are_read_back_by_a_restarted_replica(replica: Replica) -> None:
    store, tier = replica()
    assert written(store, tier) == 3
    assert tier.stats().writes == 3
    tier.close()
    fresh, fresh_tier = replica()  # nothing in memory: only the directory
    assert fresh_tier.stats().files == 3
    found, where = serve(fresh, "t", PROMPT)
    assert found == 3 and where == ["disk"] * 3
    s = fresh_tier.stats()
    assert s.hits == 3 and s.hit_bytes == 3 * fresh.layout.page_bytes and s.errors == 0
    assert serve(fresh, "t", PROMPT) == (3, ["device"] * 3)  # now a device hit
    disk = fresh.stats().as_dict()["disk"]
    assert isinstance(disk, dict) and disk["hits"] == 3


def test_quantized_pages_round_trip_as_bytes(replica: Replica) -> None:
    layout = make_layout(torch.int8)
    store, tier = replica(layout)
    tokens = PROMPT
    seq = store.open("q", "t")
    store.match(seq, tokens)
    assert store.allocate(seq, len(tokens))
    pages = [torch.randint(0, 256, (layout.page_bytes,), dtype=torch.uint8) for _ in range(3)]
    for i, page in enumerate(pages):
        store.device.tensor[seq.block_table[i]] = page
    store.commit(seq, tokens)
    store.release(seq)
    assert tier.drain()
    tier.close()
    fresh, _ = replica(layout)
    fetched = fresh.fetch_remote("t", tokens)
    assert fetched is not None and len(fetched.blocks) == 3
    for fb, page in zip(fetched.blocks, pages, strict=True):
        assert fb.page.dtype == torch.uint8 and torch.equal(fb.page, page)


def test_files_are_private_and_the_directory_is_locked(replica: Replica, tmp_path: Path) -> None:
    store, tier = replica()
    written(store, tier)
    assert stat.S_IMODE(tier.root.stat().st_mode) == 0o700
    for f in [*files(tier), tier.root / "lock"]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    with pytest.raises(DiskTierUnavailable, match="in use by another kvgate process"):
        DiskTier(DiskTierConfig(path=str(tier.root), capacity_bytes=1 << 20), store.layout,
                 "demo")
    tier.close()
    _, again = replica()  # released on close
    assert again.stats().files == 3


def test_a_directory_that_cannot_be_made_refuses_to_start(tmp_path: Path,
                                                          layout: KVLayout) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(DiskTierUnavailable, match="cannot use it"):
        DiskTier(DiskTierConfig(path=str(blocker / "disk"), capacity_bytes=1 << 20), layout,
                 "demo")


def test_ttl_is_kept_across_restarts_and_a_hit_extends_it(replica: Replica) -> None:
    wall = Wall()
    store, tier = replica(ttl_s=60.0, wall=wall)
    written(store, tier)
    tier.close()
    wall.now += 50  # within the TTL: read, and the hit moves the expiry to now + 60
    fresh, fresh_tier = replica(ttl_s=60.0, wall=wall)
    assert serve(fresh, "t", PROMPT)[0] == 3
    fresh_tier.close()
    wall.now += 50  # 100 s after writing, 50 after the hit: still there
    again, again_tier = replica(ttl_s=60.0, wall=wall)
    assert again_tier.stats().files == 3
    fetched = again.fetch_remote("t", PROMPT)
    assert fetched is not None and len(fetched.blocks) == 3
    again_tier.close()
    wall.now += 61  # past it: deleted at start, a miss
    late, late_tier = replica(ttl_s=60.0, wall=wall)
    assert late_tier.stats().files == 0 and files(late_tier) == []
    assert late.fetch_remote("t", PROMPT) is None


def test_an_expired_record_is_a_miss_and_its_space_is_reclaimed(replica: Replica) -> None:
    wall = Wall()
    store, tier = replica(ttl_s=10.0, wall=wall)
    written(store, tier)
    record_bytes = tier.stats().used_bytes // 3
    tier.close()
    fresh, fresh_tier = replica(ttl_s=10.0, wall=wall)
    wall.now += 11  # expires while the replica runs
    assert fresh.fetch_remote("t", PROMPT) is None
    s = fresh_tier.stats()
    assert s.expired == 1 and s.misses == 1
    assert len(files(fresh_tier)) == 2 and s.used_bytes == 2 * record_bytes


def test_capacity_evicts_the_least_recently_used(replica: Replica, layout: KVLayout) -> None:
    probe, probe_tier = replica()
    written(probe, probe_tier, "probe")
    record_bytes = probe_tier.stats().used_bytes // 3
    probe_tier.close()
    shutil.rmtree(probe_tier.root)
    store, tier = replica(capacity_bytes=4 * record_bytes, writers=1)  # in queue order
    first = list(range(1, 13))  # 3 blocks
    second = list(range(50, 62))
    serve(store, "t", [*first, 0])
    assert tier.drain()
    assert store.fetch_remote("other", first) is None  # (another namespace: nothing)
    serve(store, "t", [*second, 0])
    assert tier.drain()
    s = tier.stats()
    assert s.files == 4 and s.used_bytes <= 4 * record_bytes and s.evicted == 2
    assert len(files(tier)) == 4
    tier.close()
    fresh, _ = replica(capacity_bytes=4 * record_bytes)
    # the first prompt lost its last two blocks (children go before their parents)
    kept = fresh.fetch_remote("t", [*first, 0])
    assert kept is not None and len(kept.blocks) == 1
    fetched = fresh.fetch_remote("t", [*second, 0])
    assert fetched is not None and len(fetched.blocks) == 3


def test_a_lower_capacity_on_restart_evicts_the_oldest(replica: Replica) -> None:
    store, tier = replica()
    written(store, tier)
    record_bytes = tier.stats().used_bytes // 3
    tier.close()
    _, small = replica(capacity_bytes=2 * record_bytes)
    assert small.stats().files == 2 and len(files(small)) == 2


@pytest.mark.parametrize("damage", ["flip_page", "flip_tokens", "truncate", "garbage", "empty"])
def test_a_damaged_record_is_never_adopted(replica: Replica, damage: str) -> None:
    store, tier = replica()
    written(store, tier)
    tier.close()
    hashes = chain_hashes(store.root_of("t"), token_bytes(PROMPT), BLOCK, store.hash_fn)
    target = tier.root / "kv" / hashes[1].hex()[:2] / hashes[1].hex()
    data = bytearray(target.read_bytes())
    if damage == "flip_page":
        data[-40] ^= 0x01
    elif damage == "flip_tokens":
        data[100] ^= 0x01
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytearray(os.urandom(len(data)))
    else:
        data = bytearray()
    fresh, fresh_tier = replica()
    target.write_bytes(bytes(data))  # damaged under the running replica
    found, where = serve(fresh, "t", PROMPT)
    assert found == 1 and where == ["disk"]  # block 0 only: the chain stops at the damage
    s = fresh_tier.stats()
    assert s.rejected == 1 and s.hits == 1
    assert fresh_tier.drain()  # deleted, and written again from the recomputed page
    assert fresh_tier.stats().files == 3
    fresh_tier.close()
    again, _ = replica()
    assert serve(again, "t", PROMPT)[0] == 3


def test_a_damaged_record_found_at_start_is_deleted(replica: Replica) -> None:
    store, tier = replica()
    written(store, tier)
    tier.close()
    victim = files(tier)[0]
    victim.write_bytes(victim.read_bytes()[:10])
    (tier.root / "tmp" / f"{'ab' * 16}.12345").write_bytes(b"half a write")
    (tier.root / "tmp" / "epochs").write_bytes(b"{")
    (tier.root / "tmp" / "leftover").write_text("not ours")  # not a name we give
    (tier.root / "kv" / "zz").mkdir()
    (tier.root / "kv" / "zz" / "README").write_text("not ours")
    _, fresh = replica()
    assert fresh.stats().files == 2 and not victim.exists()
    assert [p.name for p in (fresh.root / "tmp").iterdir()] == ["leftover"]
    assert (fresh.root / "kv" / "zz" / "README").exists()


@pytest.mark.parametrize("change", ["dtype", "shape", "model"])
def test_another_layout_or_model_misses(replica: Replica, change: str) -> None:
    store, tier = replica()
    written(store, tier)
    tier.close()
    if change == "dtype":  # a replica restarted with another KV dtype
        fresh, fresh_tier = replica(make_layout(torch.bfloat16))
    elif change == "shape":
        fresh, fresh_tier = replica(make_layout(heads=2))
    else:  # the same token ids under another model id: hashed apart, and signed apart
        fresh, fresh_tier = replica(model_id="other")
    assert fresh.fetch_remote("t", PROMPT) is None
    assert fresh_tier.stats().hits == 0


def test_a_record_copied_under_another_tenants_hash_is_rejected(replica: Replica) -> None:
    store, tier = replica()
    written(store, tier, "a")
    tier.close()
    hashes_a = chain_hashes(store.root_of("a"), token_bytes(PROMPT), BLOCK, store.hash_fn)
    hashes_b = chain_hashes(store.root_of("b"), token_bytes(PROMPT), BLOCK, store.hash_fn)
    for ha, hb in zip(hashes_a, hashes_b, strict=True):
        dst = tier.root / "kv" / hb.hex()[:2] / hb.hex()
        dst.parent.mkdir(exist_ok=True)
        shutil.copy(tier.root / "kv" / ha.hex()[:2] / ha.hex(), dst)
    fresh, fresh_tier = replica()
    assert fresh.fetch_remote("b", PROMPT) is None
    assert fresh_tier.stats().rejected == 1
    fetched = fresh.fetch_remote("a", PROMPT)  # the owner still reads its own
    assert fetched is not None and len(fetched.blocks) == 3


def test_flush_makes_a_tenants_blocks_unreadable_now_and_after_restart(
        replica: Replica) -> None:
    store, tier = replica()
    written(store, tier, "a")
    assert serve(store, "b", PROMPT)[0] == 0
    assert tier.drain()
    store.flush("a")
    assert store.fetch_remote("a", PROMPT) is None  # at once, before any file is deleted
    assert tier.drain()
    assert tier.stats().files == 3  # b's
    tier.close()
    fresh, fresh_tier = replica()
    assert fresh.fetch_remote("a", PROMPT) is None
    fetched = fresh.fetch_remote("b", PROMPT)
    assert fetched is not None and len(fetched.blocks) == 3
    assert serve(fresh, "a", PROMPT)[0] == 0  # computed again, written under the new epoch
    assert fresh_tier.drain()
    fresh_tier.close()
    _, last = replica()
    assert last.stats().files == 6


def test_a_flushed_record_put_back_is_not_read(replica: Replica) -> None:
    """A file restored from a backup taken before the flush carries the old epoch."""
    store, tier = replica()
    written(store, tier, "a")
    saved = {f: f.read_bytes() for f in files(tier)}
    store.flush("a")
    assert tier.drain()
    for f, data in saved.items():
        f.write_bytes(data)
    tier.close()
    fresh, fresh_tier = replica()
    assert fresh.fetch_remote("a", PROMPT) is None
    assert fresh_tier.stats().files == 0  # deleted at start


def test_an_unreadable_epochs_file_discards_everything(replica: Replica) -> None:
    store, tier = replica()
    written(store, tier, "a")
    store.flush("b")  # writes the epochs file
    assert tier.drain()
    tier.close()
    (tier.root / "epochs").write_text("{not json")
    fresh, fresh_tier = replica()
    assert fresh_tier.stats().files == 0 and fresh.fetch_remote("a", PROMPT) is None


def test_the_directory_vanishing_is_a_miss_and_a_count(replica: Replica) -> None:
    first, first_tier = replica()
    written(first, first_tier)
    first_tier.close()
    store, tier = replica()
    assert tier.stats().files == 3
    shutil.rmtree(tier.root)
    assert store.fetch_remote("t", PROMPT) is None
    s = tier.stats()
    assert s.errors == 1 and s.misses == 1 and not s.available
    assert s.files == 0 and s.used_bytes == 0  # kv/ is gone: so is every record it held
    other = list(range(300, 313))
    assert serve(store, "t2", other)[0] == 0  # writes fail: dropped and counted
    assert tier.drain()
    s = tier.stats()
    assert s.dropped == 3 and s.errors >= 2 and not tier.root.exists()


def test_a_file_deleted_under_it_is_a_miss_and_a_count(replica: Replica) -> None:
    store, tier = replica()
    written(store, tier)
    tier.close()
    fresh, fresh_tier = replica()
    for f in files(fresh_tier):
        f.unlink()
    assert fresh.fetch_remote("t", PROMPT) is None
    s = fresh_tier.stats()
    assert s.errors == 1 and s.misses == 1 and s.files == 2


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO, errno.EACCES])
def test_write_errors_drop_the_block_and_count(replica: Replica, code: int,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    store, tier = replica()

    def refuse(path: Path, data: bytes) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(tier, "_write_file", refuse)
    assert serve(store, "t", PROMPT)[0] == 0  # the request itself is untouched
    assert tier.drain()
    s = tier.stats()
    assert s.dropped == 3 and s.errors == 3 and s.writes == 0 and s.used_bytes == 0
    assert list((tier.root / "tmp").iterdir()) == []


@pytest.mark.parametrize("code", [errno.EIO, errno.EACCES])
def test_read_errors_are_misses(replica: Replica, code: int,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    store, tier = replica()
    written(store, tier)
    tier.close()
    fresh, fresh_tier = replica()

    def refuse(path: Path) -> int:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fresh_tier, "_open_record", refuse)
    assert serve(fresh, "t", PROMPT)[0] == 0
    s = fresh_tier.stats()
    assert s.errors >= 1 and s.hits == 0


def test_a_full_queue_drops_blocks_instead_of_waiting(replica: Replica,
                                                      layout: KVLayout) -> None:
    store, tier = replica(queue_bytes=layout.page_bytes, write_bytes_per_s=1)
    assert serve(store, "t", PROMPT)[0] == 0
    s = tier.stats()
    assert s.dropped >= 2  # one taken, the rest dropped at once (the writer is slow)


def test_demoted_blocks_not_taken_are_offered_again(replica: Replica, layout: KVLayout) -> None:
    store, tier = replica(device_pages=4, host_pages=8, queue_bytes=0)
    assert serve(store, "t", PROMPT)[0] == 0
    assert tier.stats().dropped == 3  # no room: nothing taken at commit
    object.__setattr__(tier.config, "queue_bytes", 1 << 20)
    other = list(range(300, 313))
    serve(store, "t", other)  # evicts the first prompt's blocks to the host: offered again
    assert tier.drain()
    assert tier.stats().writes >= 3


def test_record_size_is_what_a_block_takes(replica: Replica, layout: KVLayout) -> None:
    from kvgate.cachestore.disk_tier import record_size

    store, tier = replica()
    written(store, tier)
    assert all(f.stat().st_size == record_size(layout, "t", 4 * BLOCK) for f in files(tier))
    assert tier.stats().used_bytes == 3 * record_size(layout, "t", 4 * BLOCK)


def crash(tier: DiskTier) -> None:
    """The process dies here: the writer threads stop where they are (what they had not
    started is never done) and the directory's lock is released, nothing else."""
    for _ in tier._writers:
        tier._queue.put(None)
    for t in tier._writers:
        t.join()
    os.close(tier._lock_fd)
    tier._lock_fd = -1


def test_a_flush_holds_after_a_crash_right_after_it(replica: Replica) -> None:
    store, tier = replica()
    written(store, tier, "a")
    assert serve(store, "b", PROMPT)[0] == 0
    assert tier.drain()
    for _ in tier._writers:  # the writers are busy: nothing queued after the flush runs
        tier._queue.put(None)
    for t in tier._writers:
        t.join()
    store.flush("a")
    assert len(files(tier)) == 6  # its files are still there (deleted behind the queue)
    crash(tier)
    fresh, fresh_tier = replica()
    assert fresh.fetch_remote("a", PROMPT) is None  # the epoch was saved before returning
    assert fresh_tier.stats().files == 3
    fetched = fresh.fetch_remote("b", PROMPT)
    assert fetched is not None and len(fetched.blocks) == 3


def test_a_flush_whose_epoch_cannot_be_saved_still_holds(
        replica: Replica, monkeypatch: pytest.MonkeyPatch) -> None:
    store, tier = replica()
    written(store, tier, "a")
    assert serve(store, "b", PROMPT)[0] == 0
    assert tier.drain()

    def full(epochs: dict[str, int]) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tier, "_save_epochs", full)
    store.flush("a")
    assert store.fetch_remote("a", PROMPT) is None
    assert len(files(tier)) == 3  # a's deleted at once, not behind the queue
    assert (tier.root / "wipe").exists() and tier.stats().errors >= 1
    hashes = chain_hashes(store.root_of("a"), token_bytes(PROMPT), BLOCK, store.hash_fn)
    saved = tier.root / "kv" / hashes[0].hex()[:2] / hashes[0].hex()
    crash(tier)
    saved.parent.mkdir(exist_ok=True)  # even one a failed deletion would have left
    saved.write_bytes(b"x" * 10)
    fresh, fresh_tier = replica()
    assert fresh_tier.stats().files == 0 and files(fresh_tier) == []  # everything went
    assert not (fresh_tier.root / "wipe").exists()
    assert fresh.fetch_remote("a", PROMPT) is None and fresh.fetch_remote("b", PROMPT) is None


def test_the_wipe_mark_goes_once_a_later_flush_is_saved(
        replica: Replica, monkeypatch: pytest.MonkeyPatch) -> None:
    store, tier = replica()
    written(store, tier, "a")
    written(store, tier, "b")
    with monkeypatch.context() as m:
        m.setattr(tier, "_save_epochs", lambda epochs: (_ for _ in ()).throw(OSError(errno.EIO,
                                                                                      "EIO")))
        store.flush("a")
    assert (tier.root / "wipe").exists()
    store.flush("c")  # saved: a's epoch with it
    assert not (tier.root / "wipe").exists()
    assert tier.drain()
    crash(tier)
    fresh, _ = replica()
    assert fresh.fetch_remote("a", PROMPT) is None
    fetched = fresh.fetch_remote("b", PROMPT)
    assert fetched is not None and len(fetched.blocks) == 3


def test_a_non_empty_directory_it_did_not_make_is_refused(tmp_path: Path,
                                                           layout: KVLayout) -> None:
    home = tmp_path / "home"
    (home / "tmp").mkdir(parents=True)
    (home / "tmp" / f"{'ab' * 16}.1").write_text("precious")  # even a name it would give
    (home / "lock").write_text("precious")
    os.chmod(home, 0o755)
    with pytest.raises(DiskTierUnavailable, match="is not empty and holds no kvgate-disk-tier"):
        DiskTier(DiskTierConfig(path=str(home), capacity_bytes=1 << 20), layout, "demo")
    assert (home / "tmp" / f"{'ab' * 16}.1").read_text() == "precious"
    assert (home / "lock").read_text() == "precious"
    assert stat.S_IMODE(home.stat().st_mode) == 0o755
    assert sorted(p.name for p in home.iterdir()) == ["lock", "tmp"]


def test_an_empty_directory_is_marked_and_made_private(tmp_path: Path,
                                                        layout: KVLayout) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "lost+found").mkdir()  # a volume's root: still empty
    os.chmod(empty, 0o777)  # (a Kubernetes emptyDir)
    tier = DiskTier(DiskTierConfig(path=str(empty), capacity_bytes=1 << 20), layout, "demo")
    tier.close()
    assert stat.S_IMODE(empty.stat().st_mode) == 0o700  # given to it empty: now its own
    marker = empty / "kvgate-disk-tier"
    assert marker.read_bytes() == b"kvgate disk tier 1\n"
    assert stat.S_IMODE(marker.stat().st_mode) == 0o600
    os.chmod(empty, 0o750)  # the operator's choice, once it is marked
    DiskTier(DiskTierConfig(path=str(empty), capacity_bytes=1 << 20), layout, "demo").close()
    assert stat.S_IMODE(empty.stat().st_mode) == 0o750
    marker.write_bytes(b"kvgate disk tier 9\n")  # another format
    with pytest.raises(DiskTierUnavailable, match="not this version's"):
        DiskTier(DiskTierConfig(path=str(empty), capacity_bytes=1 << 20), layout, "demo")


@pytest.mark.parametrize("name", ["lock", "epochs", "kvgate-disk-tier", "kv", "tmp"])
def test_a_link_in_its_directory_is_never_followed(replica: Replica, tmp_path: Path,
                                                   name: str) -> None:
    store, tier = replica()
    written(store, tier)
    tier.close()
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "ab").mkdir()
    (victim / "ab" / "notes").write_text("important")
    target = victim / "ab" / "notes" if name in ("lock", "epochs", "kvgate-disk-tier") \
        else victim
    link = tier.root / name
    if link.is_dir():
        shutil.rmtree(link)
    elif link.exists():
        link.unlink()
    os.symlink(target, link)
    with pytest.raises(DiskTierUnavailable):
        replica()
    assert (victim / "ab" / "notes").read_text() == "important"
    assert sorted(p.name for p in victim.rglob("*")) == ["ab", "notes"]


def test_wiping_deletes_only_records_and_follows_no_link(replica: Replica,
                                                         tmp_path: Path) -> None:
    store, tier = replica()
    written(store, tier)
    tier.close()
    record = files(tier)[0]
    sub = record.parent
    (sub / "README").write_text("not ours")
    (sub / record.name.upper()).write_text("not a name it gives")
    other = tmp_path / "other"
    other.mkdir()
    (other / ("cd" * 16)).write_text("not ours either")
    if (tier.root / "kv" / "cd").exists():
        shutil.rmtree(tier.root / "kv" / "cd")
    os.symlink(other, tier.root / "kv" / "cd")
    (tier.root / "epochs").write_text("{not json")  # every record goes
    _, fresh = replica()
    assert fresh.stats().files == 0
    assert set(files(fresh)) == {sub / "README", sub / record.name.upper()}
    assert (other / ("cd" * 16)).read_text() == "not ours either"
    assert not (fresh.root / "kv" / "cd").exists()  # the link itself was removed


def test_a_fifo_named_as_a_record_is_skipped_not_waited_on(replica: Replica) -> None:
    store, tier = replica()
    written(store, tier)
    tier.close()
    fifo = tier.root / "kv" / "ab" / ("ab" * 16)
    fifo.parent.mkdir(exist_ok=True)
    os.mkfifo(fifo)
    made: list[tuple[CacheStore, DiskTier]] = []
    start = threading.Thread(target=lambda: made.append(replica()), daemon=True)
    start.start()
    start.join(60)  # a bound for a hang, not a timing: the start reads no FIFO
    assert made, "the start waited on a FIFO"
    fresh, fresh_tier = made[0]
    assert fresh_tier.stats().files == 3 and stat.S_ISFIFO(fifo.lstat().st_mode)
    # one put in place of an indexed record under the running replica: a miss, not a wait
    hashes = chain_hashes(fresh.root_of("t"), token_bytes(PROMPT), BLOCK, fresh.hash_fn)
    record = fresh_tier.root / "kv" / hashes[1].hex()[:2] / hashes[1].hex()
    record.unlink()
    os.mkfifo(record)
    got: list[Any] = []
    fetch = threading.Thread(target=lambda: got.append(fresh.fetch_remote("t", PROMPT)),
                             daemon=True)
    fetch.start()
    fetch.join(60)
    assert got and got[0] is not None and len(got[0].blocks) == 1
    assert fresh_tier.stats().files == 2 and stat.S_ISFIFO(record.lstat().st_mode)


def test_a_write_cut_short_leaves_a_prefix_a_restart_can_use(replica: Replica) -> None:
    store, tier = replica(writers=1)
    waiting = threading.Event()
    take = tier._bucket.take
    calls = 0

    def slow_disk(n: int) -> None:  # the third block waits for the disk until the stop
        nonlocal calls
        calls += 1
        if calls == 3:
            waiting.set()
            tier._stop.wait()
        take(n)

    tier._bucket.take = slow_disk  # type: ignore[method-assign]
    assert serve(store, "t", PROMPT)[0] == 0
    assert waiting.wait(60)
    tier.close(drain_s=0)  # a stop before the queue is drained: the rest is dropped
    assert tier.stats().writes == 2 and tier.stats().dropped == 1
    fresh, fresh_tier = replica()
    found, where = serve(fresh, "t", PROMPT)
    assert found == 2 and where == ["disk"] * 2  # the first two blocks: parents first
    assert fresh_tier.stats().hits == 2


def test_a_restart_over_capacity_evicts_chains_from_their_end(replica: Replica) -> None:
    store, tier = replica()
    written(store, tier)
    record_bytes = tier.stats().used_bytes // 3
    tier.close()
    hashes = chain_hashes(store.root_of("t"), token_bytes(PROMPT), BLOCK, store.hash_fn)
    for i, h in enumerate(hashes):  # written (or hit) parents first: the first is oldest
        os.utime(tier.root / "kv" / h.hex()[:2] / h.hex(), (1_000_000 + i, 1_000_000 + i))
    fresh, fresh_tier = replica(capacity_bytes=2 * record_bytes)
    assert fresh_tier.stats().files == 2
    fetched = fresh.fetch_remote("t", PROMPT)
    assert fetched is not None and len(fetched.blocks) == 2


def test_an_earlier_block_is_kept_over_its_descendants(replica: Replica) -> None:
    """A fetch that starts after blocks the device still holds does not read their disk
    copies, which become the least recently used: still, the chain goes from its end
    (evicting its first block would leave the others unreachable after a restart)."""
    probe, probe_tier = replica()
    written(probe, probe_tier, "probe")
    record_bytes = probe_tier.stats().used_bytes // 3
    probe_tier.close()
    shutil.rmtree(probe_tier.root)
    store, tier = replica(capacity_bytes=4 * record_bytes, writers=1)
    long = list(range(1, 13))  # 3 blocks
    serve(store, "t", [*long, 0])
    assert tier.drain()
    hashes = chain_hashes(store.root_of("t"), token_bytes(long), BLOCK, store.hash_fn)
    # the device holds block 0; the disk is asked for blocks 1 and 2
    fetched = tier.fetch("t", hashes[0], hashes[1:], [token_bytes(long[4:8]),
                                                     token_bytes(long[8:12])])
    assert len(fetched) == 2
    serve(store, "t", [*range(50, 58), 0])  # 2 more blocks: one of the first goes
    assert tier.drain()
    tier.close()
    fresh, _ = replica(capacity_bytes=4 * record_bytes)
    kept = fresh.fetch_remote("t", [*long, 0])
    assert kept is not None and len(kept.blocks) == 2  # block 0 kept, its last block went
