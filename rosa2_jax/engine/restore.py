"""Sessions restored from their snapshots get their adapters back before their next turn.

A snapshot holds no adapter: the Weights steps are run again from the judged tokens it keeps (`replay`), which
costs a step each instead of megabytes of LoRA factors per session. With an adapter cache (a folder of this
machine) each session's adapter is also saved after its Weights steps, and a restore on the same machine loads
it instead of replaying.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rosa2_jax.engine.session import Failure, Session
from rosa2_jax.engine.streams import Weights
from rosa2_jax.tasks.records import TurnRecord

if TYPE_CHECKING:  # the lifecycle owns its Restore
    from rosa2_jax.engine.lifecycle import Lifecycle


class Restore:
    def __init__(self, life: Lifecycle, cache: Path | None):
        self.life = life
        self.cache = cache  # where each session's adapter is saved after its Weights steps
        self.pending: dict[int, Session] = {}  # restored sessions admitted since the last `replay`, by slot

    def failure_at(self, s: Session, record: TurnRecord) -> Failure | None:
        """`s`'s failed turn `record.turn` as its Weights step saw it: the prompt rendered again from the history
        up to that turn (the same ids: the same messages through the same template), the judged tokens as kept.
        None if the prompt does not render to its record's length."""
        t = record.turn
        prompt = self.life.prompt_ids(dataclasses.replace(s, messages=s.messages[: 2 * t - 1],
                                                          system_prompt=record.system_prompt))
        if len(prompt) != record.prompt_tokens or len(s.response_ids) < t:
            return None
        return Failure(s, prompt, s.response_ids[t - 1], record.response, None)

    def replay(self) -> None:
        """Rebuild the adapters of the sessions restored since the last call: their Weights steps again, in turn
        order (round k runs every session's k-th step, in buckets of `slots`). Each step is checked against its
        record (its prompt's length, ‖Δθ‖² to 1%): a session whose snapshot does not replay here (other code,
        another machine's rounding in a step's safeguard) starts again from turn 1 with a warning, so that no
        session goes on from a wrong adapter."""
        if not self.pending:
            return
        restored, self.pending = self.pending, {}
        stream = self.life.weights()
        restored = {i: s for i, s in restored.items() if stream is None or not self.load(stream, i, s)}
        steps = {i: [t for t in s.turns if t.update is not None] for i, s in restored.items()}
        for k in range(max(map(len, steps.values()), default=0)):
            due = {i: (steps[i][k], self.failure_at(restored[i], steps[i][k])) for i in steps if len(steps[i]) > k}
            for i in [i for i, (t, f) in due.items() if f is None]:
                self.start_over(i, restored[i], f"turn {due.pop(i)[0].turn}'s prompt renders to another length")
                del steps[i]
            items = list(due.items())
            for start in range(0, len(items), self.life.cfg.rows):
                bucket = dict(items[start: start + self.life.cfg.rows])
                results, _ = stream.start({i: f for i, (_, f) in bucket.items()}).result()
                for i, (t, _) in bucket.items():
                    again, then = results[i]["step_norm_sq"], t.update["step_norm_sq"]
                    if not np.isclose(again, then, rtol=1e-2, atol=1e-8):
                        self.start_over(i, restored[i], f"turn {t.turn}'s Weights step gives ||Δθ||² {again:.4g} "
                                                        f"again, {then:.4g} in its record")
                        del steps[i]

    def start_over(self, slot: int, s: Session, why: str) -> None:
        """Put restored session `s` back to its first turn, in place (the engine holds it by slot)."""
        warnings.warn(f"restoring {s.method} on {s.problem.id}: {why}; the session starts again from turn 1",
                      RuntimeWarning, stacklevel=2)
        fresh = self.life.new_session(s.method, s.problem)
        for field in dataclasses.fields(Session):
            setattr(s, field.name, getattr(fresh, field.name))
        for stream in self.life.streams.values():
            stream.reset(slot, s)

    # ------------------------------------------------------------------ the adapter cache
    def path(self, s: Session) -> Path | None:
        if self.cache is None:
            return None
        return self.cache / re.sub(r"[^\w.-]", "_", f"{s.method}--{s.problem.id}.npz")

    def save(self, slot: int, s: Session) -> None:
        """Save `s`'s adapter if a Weights step just moved it, with the ||Δθ||² of every step so far (which a
        restore checks against the snapshot)."""
        path = self.path(s)
        if path is not None and s.turns[-1].update is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(path.name + ".partial.npz")
            np.savez(partial, **self.life.weights().state(slot), step_norms_sq=s.step_norms())
            os.replace(partial, path)

    def drop(self, s: Session) -> None:
        """`s` ended: its saved adapter is no longer needed."""
        if (path := self.path(s)) is not None:
            path.unlink(missing_ok=True)

    def load(self, stream: Weights, slot: int, s: Session) -> bool:
        """Put restored session `s`'s saved adapter into `slot`, if one was saved after the same steps."""
        path = self.path(s)
        if path is None or not path.exists() or not any(t.update is not None for t in s.turns):
            return False
        try:
            with np.load(path) as saved:
                state = {k: saved[k] for k in saved.files}
            if not np.array_equal(state.pop("step_norms_sq"), s.step_norms()):
                return False
            stream.load_state(slot, state)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # a torn or foreign file: replay instead
            return False
        return True
