"""Survivors of a lost rank regroup themselves (ma_sep's in-job recovery, `ma.failover`).

The store: the rendezvous TCPStore is hosted by the process that launched the ranks (the
launcher, or a test's parent), never by a rank, so it outlives any of them: whichever rank dies,
the survivors can still meet there. (torch's default, rank 0 hosting it, would make rank 0
unrecoverable.)

Liveness: every rank bumps `hb/<rank>` every `beat_s` from a daemon thread. A rank whose counter
has not moved for `stale_s` is taken for lost (a SIGKILL, or a SIGSTOP: a stopped process beats
no more either).

Generation g -> g + 1 (`Membership.regroup`), on a survivor that saw a communication error or a
wait past `parallel.timeout_s`:
0. it marks `gen<g+1>/begun`: a rank waiting on it (polling its transfers, `comm.set_wait_watch`,
   on gloo) stops waiting and regroups too, instead of sitting out its timeout;
1. it registers `gen<g+1>/alive/<rank>` = the optimizer steps it completed;
2. it waits until every member of g either registered or is stale;
3. the first `compare_set` of `gen<g+1>/members` fixes the member list (later callers read it),
   so every survivor builds the same groups; a rank left out of it leaves (`LeftOut`).
Nothing is called on the broken groups: the new ones are created with `dist.new_group` (gloo
group creation needs only the store and the member ranks; its name, counted alike on every
member as all create the same groups in the same order, is the new store prefix).
"""
from __future__ import annotations

import json
import threading
import time
from typing import Optional

import torch.distributed as dist

from masep.parallel.comm import set_wait_watch



class LeftOut(RuntimeError):
    """This rank was not counted among the survivors of a regroup."""


class Membership:
    def __init__(self, store, rank: int, world: int, stale_s: float = 1.0, beat_s: float = 0.1):
        self.store, self.rank = store, rank
        self.members, self.generation = list(range(world)), 0
        self.stale_s, self.beat_s = stale_s, beat_s
        self._stop = threading.Event()
        threading.Thread(target=self._beat, name="masep-membership-beat", daemon=True).start()

    def _beat(self) -> None:
        while not self._stop.is_set():
            try:
                self.store.add(f"hb/{self.rank}", 1)
            except Exception:  # noqa: BLE001 - the store is gone: the job is ending
                return
            self._stop.wait(self.beat_s)

    def stop(self) -> None:
        self._stop.set()

    def begin(self) -> None:
        """Tell the others that the next regroup has begun (`begun`)."""
        self.store.set(f"gen{self.generation + 1}/begun", str(self.rank))

    def begun(self) -> Optional[str]:
        """Why to stop waiting on peers: another rank began the next regroup."""
        if self.store.check([f"gen{self.generation + 1}/begun"]):
            return f"rank {self.rank}: rank {self.store.get(f'gen{self.generation + 1}/begun').decode()} lost a peer and regroups"
        return None

    def regroup(self, steps_done: int) -> tuple[list[int], dict[int, int]]:
        """Register in the next generation and agree on its members: (members, steps each
        member completed). Raises `LeftOut` if the list was fixed without this rank."""
        g = self.generation + 1
        alive = lambda r: f"gen{g}/alive/{r}"  # noqa: E731
        self.begin()
        self.store.set(alive(self.rank), str(steps_done))
        last_seen = {r: (self.store.add(f"hb/{r}", 0), time.monotonic()) for r in self.members}
        while True:
            missing = [r for r in self.members if not self.store.check([alive(r)])]
            now, lost = time.monotonic(), []
            for r in missing:
                beats = self.store.add(f"hb/{r}", 0)
                if beats != last_seen[r][0]:
                    last_seen[r] = (beats, now)
                elif now - last_seen[r][1] >= self.stale_s:
                    lost.append(r)
            if len(lost) == len(missing):
                break
            time.sleep(0.01)
        proposal = json.dumps([r for r in self.members if r not in lost]).encode()
        members = json.loads(self.store.compare_set(f"gen{g}/members", b"", proposal))
        if self.rank not in members:
            raise LeftOut(f"rank {self.rank}: the survivors regrouped as {members} without this rank "
                          f"(it answered after their {self.stale_s}s window): it leaves the job")
        steps = {r: int(self.store.get(alive(r))) for r in members}
        self.members, self.generation = members, g
        return members, steps



class Failover:
    """One rank's side of ma_sep's in-job recovery: on a communication error it drops the
    strategy's groups, regroups with the survivors and has the strategy rebuild its groups
    among them and take over what the lost ranks held (`MASepRank.regroup`, with the optimizer
    `opt`); one row per event in `events`."""

    def __init__(self, strategy, opt, rank: int, world: int, stale_s: float):
        self.strategy, self.opt, self.rank = strategy, opt, rank
        self.membership = Membership(dist.distributed_c10d._get_default_store(), rank, world, stale_s)
        self.events: list[dict] = []
        if dist.get_backend() == "gloo":  # NCCL's waits do not block the host: nothing to poll
            set_wait_watch(self.membership.begun)

    def recover(self, error: RuntimeError, step: int, completed: bool, attempt_s: float) -> None:
        """Recover from `error`, seen `attempt_s` into step `step` (`completed`: after its
        optimizer step). Re-raises it when no rank was lost; raises when the loss cannot be
        recovered in the job."""
        t0, detected_at = time.perf_counter(), time.time()
        before = self.membership.members
        self.membership.begin()  # first: dropping the groups may wait for their pending transfers
        self.strategy.drop_groups()
        members, steps = self.membership.regroup(step + completed)
        lost = sorted(set(before) - set(members))
        if not lost:
            raise error  # nobody is gone: a real error, not a lost peer
        if len(set(steps.values())) > 1:
            raise RuntimeError(f"rank {self.rank}: lost rank(s) {lost} during step {step}'s optimizer step: "
                               f"the survivors disagree on the steps done ({steps}); restart from the last checkpoint")
        what = self.strategy.regroup(members, step + completed, completed, self.opt)
        regroup_s = time.perf_counter() - t0
        self.events.append({"event": len(self.events), "rank": self.rank, "rank_lost": lost, "step": step,
                            "detect_s": attempt_s, "detected_unix_s": detected_at, "regroup_s": regroup_s,
                            "steps_redone": int(not completed), "survivors": members})
        print(f"rank {self.rank}: lost rank(s) {lost} in step {step} ({str(error).splitlines()[0][:200]}); "
              f"regrouped with ranks {members} in {regroup_s:.2f}s: {what}; step {step} "
              f"{'was complete' if completed else 'is redone on the same batch'}", flush=True)

    def stop(self) -> None:
        set_wait_watch(None)
        self.membership.stop()
