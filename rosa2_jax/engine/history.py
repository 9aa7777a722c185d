"""A turn's conversation: the history a session carries (x_1, y_1, x*_2, ..., y_{t-1}, x*_t), how it is cut to the
prompt budget, and how it is read back from a record. Pure: a render function (messages -> ids) is all it needs."""

from __future__ import annotations

from typing import Callable, Sequence

Message = dict[str, str]
Render = Callable[[list[Message]], list[int]]


def prompt_budget(max_context: int | None, max_position_embeddings: int, max_new_tokens: int) -> int:
    """Prompt ids a turn may have: the context (the model's whole window if None) less the answer's room."""
    return (max_context or max_position_embeddings) - max_new_tokens


def trim_oldest(messages: list[Message]) -> list[Message]:
    """One step of trimming a turn's history x_1, y_1, x*_2, ..., y_{t-1}, x*_t that is over the budget (spec:
    the oldest assistant turns go first): the oldest failed answer with the message after it; once only
    x_1, y_{t-1}, x*_t are left, the answer y_{t-1}, so that the turn still sees the message it answers (the Words
    stream's instruction); last x*_t, leaving x_1, which admission checked fits."""
    if len(messages) > 3:
        return messages[:1] + messages[3:]
    return [messages[0], messages[2]] if len(messages) == 3 else messages[:1]


def fit_prompt(render: Render, system_prompt: str, messages: Sequence[Message], max_prompt: int) -> list[int]:
    """The prompt of a turn: `messages` after the system prompt, trimmed (`trim_oldest`) until at most
    `max_prompt` ids or x_1 alone."""
    messages = list(messages)
    while True:
        ids = render([{"role": "system", "content": system_prompt}] + messages)
        if len(ids) <= max_prompt or len(messages) == 1:
            return ids
        messages = trim_oldest(messages)


def recorded_history(turns: Sequence, t: int, fresh: bool) -> list[Message]:
    """The whole history turn `t` (1-based) answered, rebuilt from a record's turns (`TurnRecord`s): every earlier
    message and answer, or for a method that answers afresh (`Method.fresh`) its message alone."""
    if fresh:
        return [{"role": "user", "content": turns[t - 1].user}]
    messages = []
    for turn in turns[: t - 1]:
        messages += [{"role": "user", "content": turn.user}, {"role": "assistant", "content": turn.response}]
    return messages + [{"role": "user", "content": turns[t - 1].user}]
