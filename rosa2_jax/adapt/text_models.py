"""Text models for the Words stream: batched chat completion behind one small interface.

Backends:
- `LocalTextModel`: the JAX policy itself (base weights, no adapter), batched through `generate`;
  the default, so no external model is needed and no outside capability leaks into results.
- `OpenAICompatibleTextModel`: any chat-completions server (vLLM, llama.cpp server, a hosted API),
  through the `openai` client: concurrency, timeouts, retries with exponential backoff; the API key is
  read from the environment and never logged or written to results.
- `RuleBasedTextModel`: deterministic answers to the refinement prompts, for tests and runs without
  a text model.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Protocol, Sequence

from rosa2_jax.errors import Rosa2Error
from rosa2_jax.model.tokenizer import Message


class TextModelUnreachableError(Rosa2Error, ConnectionError):
    """The text model server cannot be reached."""


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str | None  # None when the call failed
    error: str | None = None
    tokens: int = 0  # generated, where the backend reports it


class TextModel(Protocol):
    name: str

    def complete(self, conversations: Sequence[Sequence[Message]], *, max_tokens: int, temperature: float,
                 seeds: Sequence[int] | None = None) -> list[Completion]:
        """One completion per conversation (conversation i sampled with seeds[i] when temperature > 0);
        failures are reported per item, never raised."""


class LocalTextModel:
    """The policy's own base weights as critic and rewriter (spec 6 item 13).

    Requests go to `rows` when it is set: a function (prompts, max_tokens, seeds) -> generations that decodes
    them elsewhere, e.g. in the token engine's decode rows beside the policy's turns (`scheduler.TokenEngine`):
    greedily when seeds is None, else sampled with the rows' sampling config (the policy's). Otherwise they run
    as one `generate` call; sampled ones draw with `sampling` when it is set (the engines set the policy's, so
    that both engines sample alike), else at the requested temperature with top-p 0.8."""

    def __init__(self, model, *, seed: int = 0, max_prompt_tokens: int | None = None,
                 rows: Callable[[list[list[int]], int, list[int] | None], list] | None = None, sampling=None):
        self.model = model
        self.seed = seed
        self.max_prompt_tokens = max_prompt_tokens
        self.rows = rows
        self.sampling = sampling
        self.name = f"local:{model.source}"

    def replace(self, **changes) -> "LocalTextModel":
        """The same text model with `rows` or `sampling` changed."""
        fields = {"seed": self.seed, "max_prompt_tokens": self.max_prompt_tokens, "rows": self.rows,
                  "sampling": self.sampling}
        return LocalTextModel(self.model, **(fields | changes))

    def complete(self, conversations, *, max_tokens: int, temperature: float, seeds=None) -> list[Completion]:
        from rosa2_jax.model.generation import SamplingConfig

        if not conversations:
            return []
        sampler = self.model.sampler
        limit = self.max_prompt_tokens or sampler.cfg.max_position_embeddings - max_tokens
        prompts, results = [], [None] * len(conversations)
        index = []
        for i, conv in enumerate(conversations):
            ids = sampler.render(conv)
            if len(ids) > limit:
                results[i] = Completion(None, f"prompt of {len(ids)} tokens exceeds the {limit}-token budget")
            else:
                prompts.append(ids)
                index.append(i)
        if prompts:
            draws = [self.seed + (seeds[i] if seeds is not None else i) for i in index]
            if self.rows is not None:
                gens = self.rows(prompts, max_tokens, draws if temperature > 0 else None)
            else:
                sampling = SamplingConfig(max_new_tokens=max_tokens, temperature=temperature,
                                          top_p=0.8 if temperature > 0 else 1.0)
                if temperature > 0 and self.sampling is not None:
                    sampling = dataclasses.replace(self.sampling, max_new_tokens=max_tokens)
                gens = sampler.generate(prompts, sampling, seeds=draws)
            for i, g in zip(index, gens):
                results[i] = Completion(sampler.decode(g.tokens).strip(), tokens=len(g.tokens))
        return results


class OpenAICompatibleTextModel:
    """Chat completions over HTTP with the `openai` client (retries 408/409/429/5xx and timeouts)."""

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0,
                 max_retries: int = 3, concurrency: int = 8):
        from openai import OpenAI

        self.base_url = base_url
        self.model = model
        self.concurrency = concurrency
        self.name = f"openai-compatible:{model}@{base_url}"
        self._key = os.environ.get(api_key_env) or "EMPTY"  # local servers accept any key
        self._client = OpenAI(base_url=base_url, api_key=self._key, timeout=timeout, max_retries=max_retries)

    def __repr__(self) -> str:  # never show the key
        return f"OpenAICompatibleTextModel({self.base_url!r}, {self.model!r})"

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key != "EMPTY" else text

    def _one(self, conversation, max_tokens: int, temperature: float, seed: int | None = None) -> Completion:
        try:
            reply = self._client.chat.completions.create(
                model=self.model, messages=[dict(m) for m in conversation], max_tokens=max_tokens,
                temperature=temperature, **({"seed": seed} if seed is not None else {}))
            text = reply.choices[0].message.content
            if not isinstance(text, str):
                return Completion(None, "reply has no message content")
            usage = getattr(reply, "usage", None)
            return Completion(text, tokens=getattr(usage, "completion_tokens", 0) or 0)
        except Exception as e:  # noqa: BLE001 - every failure becomes a per-item error and a fallback
            return Completion(None, self._scrub(f"{type(e).__name__}: {e}")[:500])

    def complete(self, conversations, *, max_tokens: int, temperature: float, seeds=None) -> list[Completion]:
        seeds = list(seeds) if seeds is not None and temperature > 0 else [None] * len(conversations)
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(lambda c, s: self._one(c, max_tokens, temperature, s), conversations, seeds))

    def check(self) -> None:
        """Fail fast, with the fix, when the server cannot be reached at all."""
        reply = self._one([{"role": "user", "content": "ping"}], max_tokens=1, temperature=0.0)
        if reply.error and any(k in reply.error for k in ("Connection", "Timeout", "connect")):
            raise TextModelUnreachableError(
                f"the text model at {self.base_url} is unreachable ({reply.error}). Start the server, fix "
                "--text_model_url, or use --text_model=local / rule."
            )


class RuleBasedTextModel:
    """Deterministic critic and instruction writer: recognises the Words stream's prompts by their requests."""

    name = "rule-based"

    def complete(self, conversations, *, max_tokens: int, temperature: float, seeds=None) -> list[Completion]:
        return [self._answer(conv) for conv in conversations]

    def _answer(self, conversation) -> Completion:
        user = conversation[-1]["content"]
        if "Reply in exactly two lines" in user:  # critique
            return Completion("Step: the step that combines the given quantities\nMistake: misread condition",
                              tokens=16)
        if "Current system prompt:" in user:
            return Completion("You are a careful math assistant. Read the problem twice, list the given quantities, "
                              "reason step by step, verify each calculation, and put the final answer within "
                              "\\boxed{}.", tokens=36)
        if "next instruction" in user:
            return Completion("Re-read the problem, list every given quantity and condition, and check that each "
                              "step of your solution uses them as stated.", tokens=28)
        return Completion(None, "the rule-based model only answers refinement prompts")


def make_text_model(kind: str, *, model=None, url: str | None = None, name: str | None = None,
                    timeout: float = 60.0, max_retries: int = 3, concurrency: int = 8) -> TextModel:
    """`kind`: local | openai | rule."""
    if kind == "local":
        if model is None:
            raise ValueError("the local text model needs the loaded policy model")
        return LocalTextModel(model)
    if kind == "rule":
        return RuleBasedTextModel()
    if kind == "openai":
        if not url or not name:
            raise ValueError("--text_model=openai needs --text_model_url and --text_model_name")
        tm = OpenAICompatibleTextModel(url, name, timeout=timeout, max_retries=max_retries, concurrency=concurrency)
        tm.check()
        return tm
    raise ValueError(f"unknown text model {kind!r}; choose local, openai or rule")
