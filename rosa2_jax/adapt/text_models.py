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
import re
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


class TextModel(Protocol):
    name: str

    def complete(self, conversations: Sequence[Sequence[Message]], *, max_tokens: int,
                 temperature: float) -> list[Completion]:
        """One completion per conversation; failures are reported per item, never raised."""


class LocalTextModel:
    """The policy's own base weights as critic and rewriter (spec 6 item 13).

    Greedy requests go to `rows` when it is set: a function (prompts, max_tokens) -> generations that
    decodes them elsewhere, e.g. in the token engine's decode rows beside the policy's turns
    (`scheduler.TokenEngine`). Otherwise, and for sampled requests, they run as one `generate` call."""

    def __init__(self, model, *, seed: int = 0, max_prompt_tokens: int | None = None,
                 rows: Callable[[list[list[int]], int], list] | None = None):
        self.model = model
        self.seed = seed
        self.max_prompt_tokens = max_prompt_tokens
        self.rows = rows
        self.name = f"local:{model.source}"

    def in_rows(self, rows: Callable[[list[list[int]], int], list]) -> "LocalTextModel":
        """The same text model, its greedy requests decoded by `rows`."""
        return LocalTextModel(self.model, seed=self.seed, max_prompt_tokens=self.max_prompt_tokens, rows=rows)

    def complete(self, conversations, *, max_tokens: int, temperature: float) -> list[Completion]:
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
            if temperature == 0 and self.rows is not None:
                gens = self.rows(prompts, max_tokens)
            else:
                sampling = SamplingConfig(max_new_tokens=max_tokens, temperature=temperature,
                                          top_p=0.8 if temperature > 0 else 1.0)
                gens = sampler.generate(prompts, sampling, seeds=[self.seed + i for i in index])
            for i, g in zip(index, gens):
                results[i] = Completion(sampler.decode(g.tokens).strip())
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

    def _one(self, conversation, max_tokens: int, temperature: float) -> Completion:
        try:
            reply = self._client.chat.completions.create(
                model=self.model, messages=[dict(m) for m in conversation], max_tokens=max_tokens,
                temperature=temperature)
            text = reply.choices[0].message.content
            if not isinstance(text, str):
                return Completion(None, "reply has no message content")
            return Completion(text)
        except Exception as e:  # noqa: BLE001 - every failure becomes a per-item error and a fallback
            return Completion(None, self._scrub(f"{type(e).__name__}: {e}")[:500])

    def complete(self, conversations, *, max_tokens: int, temperature: float) -> list[Completion]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(lambda c: self._one(c, max_tokens, temperature), conversations))

    def check(self) -> None:
        """Fail fast, with the fix, when the server cannot be reached at all."""
        reply = self._one([{"role": "user", "content": "ping"}], max_tokens=1, temperature=0.0)
        if reply.error and any(k in reply.error for k in ("Connection", "Timeout", "connect")):
            raise TextModelUnreachableError(
                f"the text model at {self.base_url} is unreachable ({reply.error}). Start the server, fix "
                "--text_model_url, or use --text_model=local / rule."
            )


class RuleBasedTextModel:
    """Deterministic critic and rewriter: recognises the refinement prompts by their tags."""

    name = "rule-based"

    def complete(self, conversations, *, max_tokens: int, temperature: float) -> list[Completion]:
        return [self._answer(conv) for conv in conversations]

    @staticmethod
    def _tag(text: str, tag: str) -> str:
        m = re.search(rf"<{tag}>(.*?)</{tag}>", text, flags=re.S)
        return m.group(1).strip() if m else ""

    def _answer(self, conversation) -> Completion:
        user = conversation[-1]["content"]
        if "<EVALUATION>" in user:  # critique
            evaluation = self._tag(user, "EVALUATION")
            return Completion(
                f"- {evaluation}\n- Re-read the problem and list every given quantity and condition.\n"
                "- Recheck each arithmetic step; look for a misread condition or a missed case.\n"
                "- Verify the final result against the question actually asked.")
        if "<VARIABLE>" in user:  # rewrite
            role = self._tag(user, "ROLE")
            if "system prompt" in role:
                text = ("You are a careful math assistant. Read the problem twice, list the given quantities, "
                        "solve step by step, verify each calculation, and put the final answer within \\boxed{}.")
            else:
                text = ("Your previous answer was judged incorrect. Re-read the problem carefully, list every "
                        "given quantity and condition, check each calculation, and solve it again from scratch "
                        "step by step. Put your final answer within \\boxed{}.")
            return Completion(f"<IMPROVED_VARIABLE>{text}</IMPROVED_VARIABLE>")
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
