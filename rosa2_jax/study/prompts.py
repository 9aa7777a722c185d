"""Which turns of a sweep saw their history trimmed to the prompt budget, read from its records.

Each turn's whole history is rebuilt from the record (`engine.history.recorded_history`) and rendered: over the
budget, the turn was trimmed. The recorded prompt length is checked against the prompt the engine's rule cuts from
that history (`fit_prompt`): a turn where they differ was not rendered from the history its record holds (other
code, another template), and is listed rather than counted.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

from rosa2_jax.engine.history import Render, fit_prompt, recorded_history
from rosa2_jax.engine.methods import METHODS
from rosa2_jax.study.metrics import Record, as_records


def trimmed_turns(records: Iterable[Record], render: Render, max_prompt: int) -> dict[str, dict]:
    """Per method: `turns` (every turn of every record), `trimmed` (turns whose whole history is over
    `max_prompt`), `trimmed_by_turn` ({turn: count}), `longest_history` (ids of the longest whole history) and
    `mismatched` ([problem id, turn, recorded prompt ids, the rule's] of the turns whose prompt is not the one
    their history and the rule give)."""
    out: dict[str, dict] = defaultdict(lambda: {"turns": 0, "trimmed": 0, "trimmed_by_turn": {}, "longest_history": 0,
                                                "mismatched": []})
    for r in as_records(records):
        fresh = METHODS[r.method].fresh
        m = out[r.method]
        for turn in r.turns:
            history = recorded_history(r.turns, turn.turn, fresh)
            whole = len(render([{"role": "system", "content": turn.system_prompt}] + history))
            fitted = whole if whole <= max_prompt else len(fit_prompt(render, turn.system_prompt, history, max_prompt))
            m["turns"] += 1
            m["longest_history"] = max(m["longest_history"], whole)
            if fitted != turn.prompt_tokens:
                m["mismatched"].append([r.problem_id, turn.turn, turn.prompt_tokens, fitted])
            elif whole > max_prompt:
                m["trimmed"] += 1
                m["trimmed_by_turn"][turn.turn] = m["trimmed_by_turn"].get(turn.turn, 0) + 1
    return dict(sorted(out.items()))
