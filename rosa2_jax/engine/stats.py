"""What an engine's decode batch did, for the progress line and the benchmarks."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class SchedulerStats:
    """occupancy = generated / row_steps: the share of the batch's row steps that sampled a wanted token."""

    generated: int = 0  # tokens sampled by running rows
    text_generated: int = 0  # of which text-model requests (Words critiques and instructions decoded in the rows)
    row_steps: int = 0  # decode steps x rows
    prefilled: int = 0  # prompt tokens computed (token engine)
    reused: int = 0  # prompt tokens taken from a session's kept cache (token engine)
    refreshed: int = 0  # of which the adapted layers were computed again after a Weights step
    text_reused: int = 0  # text prompts' tokens taken from the cache of an earlier text prompt (token engine)
    decode_s: float = 0.0  # the turn engine: its generate calls, prefill included
    prefill_s: float = 0.0
    update_s: float = 0.0
    updates: int = 0  # Weights buckets run
    programs_released: int = 0  # times the compiled programs were released (engine/host_memory.py)

    @property
    def occupancy(self) -> float:
        return self.generated / max(self.row_steps, 1)

    def __str__(self) -> str:
        return (f"decode {self.decode_s:.0f} s, {self.generated:,} tokens ({self.text_generated:,} for the text "
                f"model), occupancy {self.occupancy:.2f}; prefill {self.prefill_s:.0f} s, {self.prefilled:,} tokens "
                f"({self.reused:,} reused by sessions, {self.refreshed:,} of them in the adapted layers only, "
                f"{self.text_reused:,} by text prompts); {self.updates} Weights steps {self.update_s:.0f} s; "
                f"compiled programs released {self.programs_released} times")
