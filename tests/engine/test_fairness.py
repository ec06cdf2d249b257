"""Tenant-fair scheduling: who runs next, step by step, on the demo model.

The engine is driven by hand here (``_handle`` then ``step``, no thread), so every
assertion is about steps and order, never about time.
"""

from __future__ import annotations

from typing import Any

import pytest

from kvgate.gateway.engine import EngineConfig, FinishEvent, GenerateRequest, TokenEvent
from kvgate.gateway.engine.commands import Add, Cancel
from kvgate.gateway.engine.engine import Engine
from kvgate.gateway.engine.fairness import DECODE, PREFILL
from kvgate.gateway.engine.sequence import Sequence, Status

from .conftest import assert_store_consistent, greedy


class Client:
    """One request as its listener sees it: the events, and whether it reads them."""

    def __init__(self, engine: Engine, rid: str, tenant: str, prompt: list[int],
                 max_tokens: int, reads: bool = True, **fields: Any) -> None:
        req = GenerateRequest(rid, f"ns:{tenant}", prompt, greedy(max_tokens), tenant=tenant,
                              **fields)
        self.seq = Sequence(req, engine.tokenizer)
        self.events: list[Any] = []
        self.reads = reads
        self.seq.emit = self._emit
        engine._handle(Add(self.seq))

    def _emit(self, ev: Any) -> None:
        self.events.append(ev)
        if isinstance(ev, TokenEvent) and self.reads:
            self.seq.flow.consumed += 1

    def read_all(self) -> None:
        self.reads = True
        self.seq.flow.consumed = self.seq.flow.emitted

    @property
    def tokens(self) -> list[int]:
        return [t for ev in self.events if isinstance(ev, TokenEvent) for t in ev.token_ids]

    @property
    def started(self) -> bool:
        return any(isinstance(ev, TokenEvent) for ev in self.events)

    @property
    def done(self) -> bool:
        return any(isinstance(ev, FinishEvent) for ev in self.events)


def make(demo_loaded: Any, **overrides: Any) -> Engine:
    cfg: dict[str, Any] = dict(device_cache_bytes=16 << 20, host_cache_bytes=16 << 20,
                               max_batch_tokens=64, max_running=4)
    cfg.update(overrides)
    return Engine(EngineConfig(**cfg), loaded=demo_loaded)


def prompt(i: int, n: int) -> list[int]:
    return [(11 * i + 3 * j) % 200 + 32 for j in range(n)]


def steps_until(engine: Engine, done: Any, limit: int = 400) -> int:
    for n in range(1, limit + 1):
        engine.step()
        if done():
            return n
    raise AssertionError(f"not done after {limit} steps")


def run_out(engine: Engine) -> None:
    for _ in range(2000):
        if not (engine.scheduler.has_work() or engine.scheduler.parked):
            return
        engine.step()
    raise AssertionError("the engine never ran out of work")


def flood_then_victim(engine: Engine) -> tuple[list[Client], Client, int]:
    flood = [Client(engine, f"f{i}", "flood", prompt(i, 96), 24) for i in range(12)]
    steps_until(engine, lambda: len(engine.scheduler.running) == engine.config.max_running)
    victim = Client(engine, "v", "victim", prompt(99, 8), 2)
    return flood, victim, steps_until(engine, lambda: victim.started)


@pytest.mark.parametrize("fair", [True, False])
def test_a_newcomer_runs_past_a_flood_only_when_fair(demo_loaded, fair):
    engine = make(demo_loaded, fair_scheduling=fair)
    flood, victim, steps = flood_then_victim(engine)
    if fair:
        # Every slot was the flood's: one is taken back, and the victim's prompt goes
        # before the flood's chunks, so its first token comes with the next step.
        assert steps == 1
        assert engine.scheduler.fairness.preemptions == 1
    else:  # first come, first served: behind all twelve
        assert steps > 24
        assert sum(c.done for c in flood) >= 8
    run_out(engine)
    assert all(c.done for c in flood) and victim.done
    assert_store_consistent(engine.store)


def test_two_backlogged_tenants_share_slots_and_stay_within_the_bound(demo_loaded):
    engine = make(demo_loaded)
    a = [Client(engine, f"a{i}", "a", prompt(i, 40), 16) for i in range(10)]
    b = [Client(engine, f"b{i}", "b", prompt(50 + i, 40), 16) for i in range(10)]
    fairness = engine.scheduler.fairness
    cfg = engine.config
    bound = 2 * max(cfg.max_batch_tokens * PREFILL, cfg.max_running * DECODE)
    slots = {"a": 0, "b": 0}
    for _ in range(40):
        engine.step()
        acct_a, acct_b = fairness.accounts["a"], fairness.accounts["b"]
        slots["a"] += acct_a.running
        slots["b"] += acct_b.running
        assert abs(acct_a.counter - acct_b.counter) <= bound
    assert abs(slots["a"] - slots["b"]) <= 0.2 * max(slots.values())
    run_out(engine)
    assert all(c.done for c in a + b)


def test_weights_split_the_service(demo_loaded):
    """Weight 3 against weight 1, both backlogged: the heavier gets about three times the
    tokens while both wait (within the bound's slack)."""
    engine = make(demo_loaded)
    heavy = [Client(engine, f"h{i}", "heavy", prompt(i, 24), 12, weight=3.0) for i in range(16)]
    light = [Client(engine, f"l{i}", "light", prompt(40 + i, 24), 12) for i in range(16)]
    fairness = engine.scheduler.fairness
    for _ in range(60):
        engine.step()
    served_h = fairness.accounts["heavy"].served
    served_l = fairness.accounts["light"].served
    assert 2.0 < served_h / served_l < 4.5
    run_out(engine)
    assert all(c.done for c in heavy + light)


def test_an_idle_tenant_banks_no_credit(demo_loaded):
    engine = make(demo_loaded)
    busy = [Client(engine, f"b{i}", "busy", prompt(i, 48), 40) for i in range(6)]
    for _ in range(10):
        engine.step()
    floor = engine.scheduler.fairness.accounts["busy"].counter
    assert floor > 0 and engine.scheduler.fairness.accounts["busy"].active
    late = Client(engine, "late", "late", prompt(70, 8), 2)
    assert engine.scheduler.fairness.accounts["late"].counter == floor
    run_out(engine)
    assert late.done and all(c.done for c in busy)


def test_priority_goes_first_and_takes_a_slot(demo_loaded):
    engine = make(demo_loaded, max_running=2)
    low = [Client(engine, f"n{i}", "t", prompt(i, 32), 20) for i in range(4)]
    engine.step()
    urgent = Client(engine, "u", "other", prompt(80, 8), 2, priority=-5)
    engine.step()
    assert urgent.started  # a slot taken from a priority-0 sequence at once
    late = Client(engine, "late0", "t", prompt(90, 8), 2)
    urgent2 = Client(engine, "u2", "t", prompt(91, 8), 2, priority=-1)
    steps_until(engine, lambda: urgent2.started or late.started)
    assert urgent2.started and not late.started  # within a tenant, priority before arrival
    run_out(engine)
    assert all(c.done for c in low) and urgent.done and late.done


def test_a_tenant_cap_on_running_sequences(demo_loaded):
    engine = make(demo_loaded, max_running=8)
    capped = [Client(engine, f"c{i}", "capped", prompt(i, 16), 10, max_running=2)
              for i in range(6)]
    other = [Client(engine, f"o{i}", "other", prompt(30 + i, 16), 10) for i in range(3)]
    for _ in range(60):
        engine.step()
        assert engine.scheduler.fairness.accounts["capped"].running <= 2
    run_out(engine)
    assert all(c.done for c in capped + other)


def test_a_client_that_stops_reading_is_parked_and_resumes_with_the_same_tokens(
        demo_loaded, oracle):
    engine = make(demo_loaded, max_unread_tokens=6)
    p = prompt(5, 20)
    stalled = Client(engine, "s", "t", p, 30, reads=False)
    other = Client(engine, "o", "u", prompt(6, 20), 30)
    steps_until(engine, lambda: stalled.seq.status is Status.PARKED)
    assert stalled.seq.handle is None and stalled.seq not in engine.scheduler.running
    assert engine.scheduler.num_parked == 1
    for _ in range(10):  # it makes nothing while parked; the other goes on
        engine.step()
    assert len(stalled.tokens) == 6
    steps_until(engine, lambda: other.done)
    stalled.read_all()
    run_out(engine)
    assert stalled.done and stalled.tokens == oracle(p, 30)
    assert_store_consistent(engine.store)


def test_a_parked_request_can_be_cancelled(demo_loaded):
    engine = make(demo_loaded, max_unread_tokens=4)
    stalled = Client(engine, "s", "t", prompt(1, 20), 30, reads=False)
    steps_until(engine, lambda: stalled.seq.status is Status.PARKED)
    engine._handle(Cancel("s"))
    fin = [ev for ev in stalled.events if isinstance(ev, FinishEvent)]
    assert fin and fin[0].finish_reason == "cancelled" and fin[0].usage.completion_tokens == 4
    assert not engine.scheduler.parked and not engine.scheduler.fairness.accounts["t"].active
    assert_store_consistent(engine.store)


def test_requests_that_do_not_stream_are_never_parked(demo_loaded):
    engine = make(demo_loaded, max_unread_tokens=2)
    req = GenerateRequest("w", "ns:t", prompt(2, 12), greedy(12), tenant="t", stream=False)
    seq = Sequence(req, engine.tokenizer)
    events: list[Any] = []
    seq.emit = events.append
    engine._handle(Add(seq))
    run_out(engine)
    assert engine.scheduler.num_parked == 0
    assert isinstance(events[-1], FinishEvent) and events[-1].usage.completion_tokens == 12


def test_steps_are_short_while_tenants_compete(demo_loaded):
    engine = make(demo_loaded, max_batch_tokens=256, contended_batch_tokens=48, max_running=8)
    sizes: list[tuple[int, int]] = []
    plan = engine.scheduler.schedule

    def recorded() -> Any:
        out = plan()
        sizes.append((engine.scheduler.fairness.busy, out.num_tokens))
        return out

    engine.scheduler.schedule = recorded  # type: ignore[method-assign]
    alone = [Client(engine, f"a{i}", "a", prompt(i, 200), 4) for i in range(2)]
    engine.step()
    assert sizes[-1] == (1, 256)  # alone: the whole budget
    other = [Client(engine, f"b{i}", "b", prompt(20 + i, 200), 4) for i in range(2)]
    run_out(engine)
    contended = [n for busy, n in sizes if busy > 1]
    assert contended and max(contended) <= 48
    assert all(c.done for c in alone + other)


def test_the_slot_comes_from_the_tenant_that_holds_most(demo_loaded):
    """The account with the largest counter holds one slot, a lighter one holds three: a
    newcomer takes its slot from the one holding three."""
    engine = make(demo_loaded, max_running=4)
    fairness = engine.scheduler.fairness
    many = [Client(engine, f"m{i}", "many", prompt(10 + i, 16), 40) for i in range(3)]
    steps_until(engine, lambda: all(c.started for c in many))
    heavy = Client(engine, "h", "heavy", prompt(1, 160), 40)
    steps_until(engine, lambda: heavy.started)
    assert fairness.accounts["heavy"].counter > fairness.accounts["many"].counter
    newcomer = Client(engine, "n", "new", prompt(50, 8), 2)
    engine.step()
    assert newcomer.started
    assert fairness.accounts["heavy"].running == 1 and fairness.accounts["many"].running == 2
    run_out(engine)
    assert heavy.done and newcomer.done and all(c.done for c in many)


def test_a_light_newcomer_gets_a_step_of_its_own_never_two_in_a_row(demo_loaded):
    engine = make(demo_loaded, max_running=8, max_batch_tokens=256)
    plans: list[list[str]] = []
    plan = engine.scheduler.schedule

    def recorded() -> Any:
        out = plan()
        plans.append([c.seq.request_id for c in out.chunks])
        return out

    engine.scheduler.schedule = recorded  # type: ignore[method-assign]
    flood = [Client(engine, f"f{i}", "flood", prompt(i, 64), 30) for i in range(6)]
    steps_until(engine, lambda: all(c.started for c in flood))
    first = Client(engine, "v1", "v1", prompt(40, 8), 2)
    second = Client(engine, "v2", "v2", prompt(41, 8), 2)
    engine.step()
    assert plans[-1] == ["v1", "v2"]  # both newcomers, nothing else in that step
    assert first.started and second.started
    late = Client(engine, "v3", "v3", prompt(42, 8), 2)
    engine.step()  # not a second one in a row: the flood decodes, the newcomer joins them
    assert "v3" in plans[-1] and any(r.startswith("f") for r in plans[-1])
    run_out(engine)
    assert all(c.done for c in [*flood, first, second, late])


@pytest.mark.parametrize("held", ["parked", "low_priority"])
def test_credit_cannot_be_banked_behind_work_that_does_not_run(demo_loaded, held):
    """A tenant keeps one request that does not run (a parked stream, or one of a far
    worse priority class) while another is served for a long time; its flood afterwards
    gets no more than the bound's slack ahead, and the other keeps being served."""
    engine = make(demo_loaded, max_running=4, max_batch_tokens=64, max_unread_tokens=4)
    fairness = engine.scheduler.fairness
    if held == "parked":
        Client(engine, "hold", "attacker", prompt(0, 8), 400, reads=False)
    else:
        Client(engine, "hold", "attacker", prompt(0, 8), 400, priority=1000)
    victim: list[Client] = []
    for step in range(300):  # the victim alone, its four slots always busy
        victim = [c for c in victim if not c.done]
        while len(victim) < 5:
            victim.append(Client(engine, f"v{step}-{len(victim)}", "victim",
                                 prompt(step, 16), 12))
        engine.step()
    flood = [Client(engine, f"a{i}", "attacker", prompt(100 + i, 16), 40) for i in range(8)]
    for _ in range(5):
        engine.step()
    slack = max(64, 2 * 4 * 2)
    assert fairness.accounts["attacker"].counter >= fairness.accounts["victim"].counter - slack - 64
    before = fairness.accounts["victim"].served
    for step in range(100):
        victim = [c for c in victim if not c.done]
        while len(victim) < 5:
            victim.append(Client(engine, f"w{step}-{len(victim)}", "victim", prompt(step, 16), 12))
        engine.step()
    assert fairness.accounts["victim"].served - before > 100  # still served beside the flood
    del flood


def test_the_running_cap_holds_for_n_choices(demo_loaded):
    engine = make(demo_loaded, max_running=16)
    req = GenerateRequest("n8", "ns:c", prompt(3, 16), greedy(20, n=8), tenant="c",
                          max_running=2)
    seq = Sequence(req, engine.tokenizer)
    events: list[Any] = []
    seq.emit = events.append
    engine._handle(Add(seq))
    peak = 0
    for _ in range(400):
        if not engine.scheduler.has_work():
            break
        engine.step()
        peak = max(peak, engine.scheduler.fairness.accounts["c"].running)
    assert peak == 2
    assert sum(isinstance(ev, FinishEvent) for ev in events) == 8
