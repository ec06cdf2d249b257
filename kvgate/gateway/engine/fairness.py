"""Who runs next: a virtual token counter per tenant (the VTC rule of Sheng et al., OSDI'24),
with priority classes on top.

Every request belongs to an account (its tenant, or its cache namespace) whose counter
holds the service it has had: tokens weighted ``PREFILL``, ``DECODE`` or ``CACHED``,
divided by the account's ``scheduling_weight``, charged when the scheduler puts them in a
step. The smallest key runs first: ``(priority, counter, arrival)``. An account back from
idle is lifted to the smallest active counter. With every slot (or page) taken, the worst
running sequence is preempted for a waiting account that runs at least two fewer (or has a
better priority). With several accounts busy, steps are capped at
``contended_batch_tokens`` and a light newcomer gets a step of its own (never two in a
row). ``fair_scheduling=False``: first come, first served. The bound these rules give, and
why each is there: docs/architecture.md, "Engine".
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
