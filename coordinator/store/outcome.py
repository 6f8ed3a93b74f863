"""A run's result: the committed round whose adapter did best on the evaluation the run has, or
the base model when no round beat it. The evaluation is the coordinator's public server
evaluation when the run has one; otherwise the enterprises' own held-out loss (their federated
evaluation, in public runs), base model against round, enterprise by enterprise. Choosing among
DP releases by public data is post-processing, so it costs no privacy; it is how a run never
hands out an adapter that is worse than the model it started from. A run with neither (a private
run on the enterprises' own data without `evaluation.server_data`) has no outcome: its result
is its last committed round, and it says so."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from fedmoe.coordinator.store.db import Round

SERVER = "server eval"
ENTERPRISES = "enterprises' held-out loss"
NO_EVALUATION = (
    "no evaluation to choose a round by (a private run on the enterprises' own data without "
    "evaluation.server_data): the result is the last committed round"
)


@dataclass(frozen=True)
class Outcome:
    base_loss: float
    best_round: int | None  # None: no round beat the base model
    best_loss: float
    last_loss: float
    basis: str = SERVER

    @property
    def gain(self) -> float:
        """How much lower the result's loss is than the base model's, as a share of it."""
        return (self.base_loss - self.best_loss) / self.base_loss

    def describe(self) -> str:
        if self.best_round is None:
            return (
                f"no round beat the base model on the {self.basis} (base {self.base_loss:.4f}, "
                f"best round {self.best_loss:.4f}): the run's result is the base model"
            )
        return (
            f"result: round {self.best_round}, {self.basis} {self.best_loss:.4f} vs base "
            f"{self.base_loss:.4f} ({self.gain:.1%} lower)"
        )


def outcome(rounds: list[Round], base_loss: float | None) -> Outcome | None:
    """None when the run has no evaluation or no evaluated round yet."""
    committed = [r for r in rounds if r.status == "completed" and r.checkpoint_path]
    if base_loss is not None:
        scored = [
            (r.server_eval_loss, r.number) for r in committed if r.server_eval_loss is not None
        ]
        if scored:
            return _best(scored, base_loss, SERVER)
    return _by_enterprises(committed)


def _by_enterprises(rounds: list[Round]) -> Outcome | None:
    """Each enterprise's held-out loss of the base (measured in the first round) against the
    same enterprises' losses after a round: a round counts only if all of them evaluated it."""
    base = {}
    for r in rounds:
        base = {
            p.enterprise: p.heldout_loss_before
            for p in r.participations
            if p.enterprise and p.heldout_loss_before is not None
        }
        if base:
            break
    if not base:
        return None
    scored = []
    for r in rounds:
        after = {p.enterprise: p.eval_loss for p in r.participations if p.eval_loss is not None}
        if base.keys() <= after.keys():
            scored.append((statistics.fmean(after[e] for e in base), r.number))
    if not scored:
        return None
    return _best(scored, statistics.fmean(base.values()), ENTERPRISES)


def _best(scored: list[tuple[float, int]], base_loss: float, basis: str) -> Outcome:
    best_loss, number = min(scored)
    last_loss = max(scored, key=lambda s: s[1])[0]
    return Outcome(
        base_loss, number if best_loss < base_loss else None, best_loss, last_loss, basis
    )
