"""Who runs next: a virtual token counter per tenant, with priority classes on top.

Every request belongs to an account (its tenant; ``GenerateRequest.tenant``, or its cache
namespace). Each account has a counter of the service it has had, in weighted tokens
divided by the account's weight (its plan's ``scheduling_weight``):

- a prompt token computed costs ``PREFILL`` (1), an output token ``DECODE`` (2: on an
  accelerator a decode token occupies the step far longer than a prefill token), a prompt
  token read from the cache ``CACHED`` (0.1, charged once, at the first admission);
- tokens are charged when the scheduler puts them in a step, so a decision later in the
  same step already sees them.

The scheduler always serves the smallest key first: ``(priority, counter, arrival)``.
Lower ``priority`` values run first (vLLM's convention); within a priority class the
account that has had least service goes first; within an account, requests run in
arrival order. An account that was idle (nothing waiting, running or parked) is lifted on
its return to the smallest counter among the accounts active at that moment, so idle time
is not banked as credit to be spent in a burst later (the VTC rule). Nor behind work that
does not run: an account given new work is lifted to at most U (below) behind the least
served account running at that moment.

The bound (as in "Fairness in Serving Large Language Models", Sheng et al., OSDI'24): take
two accounts f and g of one priority class, both backlogged (something waiting) over an
interval. Whenever new work is given to f, f's counter was at most g's (f was the smallest
key, or g had nothing it could run). After that, f's counter grows by at most what one
scheduling decision can charge it before the next comparison: one prefill chunk
(``max_batch_tokens`` x PREFILL), or the decode tokens of the sequences it already runs
(the slot rule below keeps those within one of each other's share). So over the interval
the weighted service the two received differs by at most 2 x U / w, with
``U = max(max_batch_tokens x PREFILL, max_running x DECODE)`` and w the smaller weight:
a constant, however long the interval. Without a slot rule a flood holding every running
slot could keep a newcomer waiting for as long as its sequences take to finish.

Slots: when every running slot is taken (or the pages run out) and the best waiting
request belongs to an account that holds at least two fewer running sequences than the
worst running one's account (or is of a better priority class), that worst sequence is
preempted (its full blocks stay cached, so it resumes mostly from the cache). The
two-sequence margin means a preemption never reverses the one before it: no thrashing.
Short steps while tenants compete: a request's first token waits for the step in progress
and then its own. With two or more accounts busy, a step computes at most
``EngineConfig.contended_batch_tokens`` tokens (decodes first, then at least a quarter of
that for prompts), so the step in progress is not a long prefill of another tenant's. And
a newcomer of a light account (nothing running, a counter and priority class no worse
than any running account's) is admitted in a step of its own, without the others' decodes
and chunks: its first token costs its own prefill, not the batch's. Never two such steps
in a row, so running sequences lose at most every other step to newcomers.

``EngineConfig.fair_scheduling = False`` restores first come, first served (the baseline
``bench.fairness`` compares against); priorities are honoured in both modes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvgate.gateway.engine.sequence import Sequence

PREFILL = 1.0
DECODE = 2.0
CACHED = 0.1


@dataclass
class Account:
    name: str
    weight: float = 1.0
    counter: float = 0.0
    running: int = 0  # sequences running now
    active: int = 0  # sequences waiting, running or parked
    served: float = 0.0  # weighted tokens, unscaled by the weight (for the stats)


class Fairness:
    def __init__(self, fair: bool = True) -> None:
        self.fair = fair
        self.accounts: dict[str, Account] = {}
        self.preemptions = 0  # running sequences preempted to give another account a slot
        self.busy = 0  # accounts with work (waiting, running or parked)

    def account(self, seq: Sequence) -> Account:
        req = seq.request
        name = req.tenant or req.namespace
        acct = self.accounts.get(name)
        if acct is None:
            acct = self.accounts[name] = Account(name)
        acct.weight = max(float(req.weight), 1e-3)
        return acct

    def arrive(self, seq: Sequence) -> None:
        """A sequence joins (queued, forked): an idle account is lifted to the others' floor."""
        acct = self.account(seq)
        if acct.active == 0:
            floor = min((a.counter for a in self.accounts.values() if a.active), default=None)
            if floor is not None and floor > acct.counter:
                acct.counter = floor
            self.busy += 1
        acct.active += 1

    def admitted(self, seq: Sequence, slack: float) -> None:
        """``seq`` is given work: its account may be at most ``slack`` behind the least
        served account being served now. Credit cannot be banked behind work that does
        not run (a request of a far worse priority class, a parked stream): the arrival
        lift alone would not see such an account as idle."""
        acct = self.account(seq)
        others = [a for a in list(self.accounts.values()) if a is not acct and a.active]
        floor = min((a.counter for a in others if a.running),  # served now, else waiting
                    default=min((a.counter for a in others), default=None))
        if floor is not None and acct.counter < floor - slack:
            acct.counter = floor - slack

    def leave(self, seq: Sequence) -> None:
        acct = self.account(seq)
        acct.active -= 1
        if acct.active <= 0:
            acct.active = 0
            self.busy -= 1
            if len(self.accounts) > 1024:  # forget idle accounts; their lift restores them
                self.accounts.pop(acct.name, None)

    def charge(self, seq: Sequence, *, prefill: int = 0, decode: int = 0,
               cached: int = 0) -> None:
        cost = PREFILL * prefill + DECODE * decode + CACHED * cached
        if cost:
            acct = self.account(seq)
            acct.served += cost
            acct.counter += cost / acct.weight

    def key(self, seq: Sequence) -> tuple[int, float, int]:
        """Smaller runs first: (priority class, the account's counter, arrival)."""
        counter = self.account(seq).counter if self.fair else 0.0
        return (seq.request.priority, counter, seq.order)

    def may_displace(self, cand: Sequence, victim: Sequence) -> bool:
        """Whether ``cand`` (waiting) may preempt ``victim`` (running) for a slot or pages."""
        if cand.request.priority != victim.request.priority:
            return cand.request.priority < victim.request.priority
        if not self.fair:
            return False
        a, b = self.account(cand), self.account(victim)
        # counters alone (a tie goes to the one holding fewer slots, not to arrival order)
        return (a is not b and b.running >= a.running + 2
                and self.key(victim)[:2] >= self.key(cand)[:2])

    def snapshot(self) -> dict[str, dict[str, float]]:
        return {a.name: {"counter": round(a.counter, 1), "weight": a.weight,
                         "running": a.running, "active": a.active,
                         "served_tokens": round(a.served, 1)}
                for a in list(self.accounts.values())}
