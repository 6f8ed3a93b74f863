"""A run's result: the committed round whose adapter did best on the coordinator's public server
evaluation, or the base model when no round beat it. Choosing among DP releases by public data
is post-processing, so it costs no privacy; it is how a private run never hands out an adapter
that is worse than the model it started from."""

from __future__ import annotations

from dataclasses import dataclass

from fedmoe.coordinator.db import Round


@dataclass(frozen=True)
class Outcome:
    base_loss: float
    best_round: int | None  # None: no round beat the base model
    best_loss: float
    last_loss: float

    @property
    def gain(self) -> float:
        """How much lower the result's loss is than the base model's, as a share of it."""
        return (self.base_loss - self.best_loss) / self.base_loss

    def describe(self) -> str:
        if self.best_round is None:
            return (
                f"no round beat the base model on the public evaluation (base {self.base_loss:.4f}, "
                f"best round {self.best_loss:.4f}): the run's result is the base model"
            )
        return (
            f"result: round {self.best_round}, server eval {self.best_loss:.4f} vs base "
            f"{self.base_loss:.4f} ({self.gain:.1%} lower)"
        )


def outcome(rounds: list[Round], base_loss: float | None) -> Outcome | None:
    """None when the run has no public evaluation or no evaluated round yet."""
    scored = [
        (r.server_eval_loss, r.number)
        for r in rounds
        if r.status == "completed" and r.server_eval_loss is not None and r.checkpoint_path
    ]
    if base_loss is None or not scored:
        return None
    best_loss, number = min(scored)
    last_loss = max(scored, key=lambda s: s[1])[0]
    if not best_loss < base_loss:
        return Outcome(base_loss, None, best_loss, last_loss)
    return Outcome(base_loss, number, best_loss, last_loss)
