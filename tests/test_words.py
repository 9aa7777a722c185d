"""Words stream: refinement over real HTTP (with failures), the leakage guard, the local backend."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rosa2_jax.adapt.leakage import leaks_answer
from rosa2_jax.adapt.text_models import OpenAICompatibleTextModel, RuleBasedTextModel, TextModelUnreachableError
from rosa2_jax.adapt.words import (
    FEEDBACK_TEMPLATE,
    RefineRequest,
    parse_improved,
    refine_feedback,
    refine_system_prompt,
)

SECRET = "sk-test-secret-0123456789"


class ChatServer(BaseHTTPRequestHandler):
    """Speaks /v1/chat/completions; the requested model name picks the behaviour."""

    calls: dict = {}
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def _reply(self, status: int, body: bytes, content_type: str = "application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        mode = request["model"]
        user = request["messages"][-1]["content"]
        with self.lock:
            key = (mode, user)
            self.calls[key] = self.calls.get(key, 0) + 1
            attempt = self.calls[key]
        if mode == "flaky" and attempt == 1:
            return self._reply(500, b'{"error": {"message": "overloaded"}}')
        if mode == "slow":
            time.sleep(2.0)
        if mode == "malformed":
            return self._reply(200, b'{"choices": [{"message": {"content": "trunc')
        if mode == "auth":
            body = json.dumps({"error": {"message": f"bad key {self.headers.get('Authorization')}"}})
            return self._reply(401, body.encode())
        if "<EVALUATION>" in user:
            content = "- The multiplication in step 2 is wrong.\n- Recheck the units."
        elif mode == "untagged":
            content = "Please try the problem again, carefully."
        elif mode == "leaky":
            content = "<IMPROVED_VARIABLE>Hint: the result is forty-two. Show steps in \\boxed{}.</IMPROVED_VARIABLE>"
        else:
            content = ("<IMPROVED_VARIABLE>Your last answer was wrong: redo the multiplication in step 2 and check "
                       "the units, then solve again step by step with the answer in \\boxed{}.</IMPROVED_VARIABLE>")
        body = {"id": "x", "object": "chat.completion", "created": 0, "model": mode,
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        self._reply(200, json.dumps(body).encode())


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # clients that timed out close their socket mid-reply; that is the point of the test


@pytest.fixture(scope="module")
def server():
    httpd = QuietServer(("127.0.0.1", 0), ChatServer)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


def requests(n=3):
    return [RefineRequest(problem=f"A box holds {6 + i} rows of 7 eggs. How many eggs?", attempt=f"... \\boxed{{{40 + i}}}",
                          extracted_answer=str(40 + i), current=None, ground_truth=str(42 + 7 * i)) for i in range(n)]


def client(url, model, monkeypatch, **kw):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    return OpenAICompatibleTextModel(url, model, **{"timeout": 5.0, "max_retries": 2, **kw})


def test_refines_over_http(server, monkeypatch):
    out = refine_feedback(client(server, "ok", monkeypatch), requests())
    assert [r.status for r in out] == ["refined"] * 3
    assert all("step 2" in r.message and "\\boxed{}" in r.message for r in out)
    assert all(r.critique.startswith("- The multiplication") for r in out)
    assert all(0 < r.semantic_shift <= 1 for r in out)


def test_http_500_is_retried(server, monkeypatch):
    ChatServer.calls.clear()
    out = refine_feedback(client(server, "flaky", monkeypatch), requests(2))
    assert [r.status for r in out] == ["refined"] * 2
    assert all(count == 2 for (mode, _), count in ChatServer.calls.items() if mode == "flaky")


def test_slow_replies_time_out_and_fall_back(server, monkeypatch):
    start = time.perf_counter()
    out = refine_feedback(client(server, "slow", monkeypatch, timeout=0.3, max_retries=1), requests(2))
    assert [r.status for r in out] == ["fallback:error"] * 2
    assert all(r.message == FEEDBACK_TEMPLATE for r in out)
    assert time.perf_counter() - start < 15


def test_malformed_json_falls_back(server, monkeypatch):
    out = refine_feedback(client(server, "malformed", monkeypatch, max_retries=0), requests(2))
    assert [r.status for r in out] == ["fallback:error"] * 2
    assert all(r.message == FEEDBACK_TEMPLATE for r in out)


def test_untagged_reply_falls_back_to_the_raw_feedback(server, monkeypatch):
    reqs = [RefineRequest("p", "a", "1", current="Try once more.", ground_truth="2")]
    out = refine_feedback(client(server, "untagged", monkeypatch), reqs)
    assert out[0].status == "fallback:untagged" and out[0].message == "Try once more."


def test_leaking_rewrite_is_rejected(server, monkeypatch):
    out = refine_feedback(client(server, "leaky", monkeypatch), requests(1))
    assert out[0].status == "fallback:leak" and out[0].message == FEEDBACK_TEMPLATE


def test_api_key_never_reaches_results(server, monkeypatch):
    tm = client(server, "auth", monkeypatch, max_retries=0)
    out = refine_feedback(tm, requests(1))
    assert out[0].status == "fallback:error"
    assert SECRET not in repr(tm)
    assert all(SECRET not in str(getattr(r, f)) for r in out for f in ("message", "critique", "status"))
    errors = tm.complete([[{"role": "user", "content": "x"}]], max_tokens=4, temperature=0.0)
    assert errors[0].text is None and SECRET not in errors[0].error and "***" in errors[0].error


def test_unreachable_server_is_a_clear_error(monkeypatch):
    tm = client("http://127.0.0.1:9/v1", "any", monkeypatch, max_retries=0, timeout=2.0)
    with pytest.raises(TextModelUnreachableError, match="unreachable.*--text_model"):
        tm.check()


def test_system_prompt_baseline_keeps_prompt_on_failure():
    out = refine_system_prompt(RuleBasedTextModel(), [RefineRequest("p", "a", "3", current="Be concise.",
                                                                    ground_truth="4")])
    assert out[0].status == "refined" and "\\boxed{}" in out[0].message and out[0].message != "Be concise."


def test_tag_parsing():
    assert parse_improved("x <IMPROVED_VARIABLE> hi </IMPROVED_VARIABLE> y") == "hi"
    assert parse_improved("<IMPROVED_VARIABLE>unclosed") == "unclosed"
    assert parse_improved("no tags") is None


PROBLEM = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."
LEAKING = [  # (rewrite, ground truth)
    ("Check again: the total should be 72.", "72"),
    ("Hint: you should get seventy-two clips.", "72"),
    ("The answer is \\boxed{72}.", "72"),
    ("Recompute; 72 clips is what a careful count gives.", "72"),
    ("Is it 72.0? Solve again.", "72"),
    ("Your sum must be $72$.", "72"),
    ("It equals 1,000 in total.", "1000"),
    ("You should obtain 1000 dollars.", "\\$1000"),
    ("The result is one thousand.", "1000"),
    ("Try \\frac{3}{4} as the ratio, then box it.", "\\frac{3}{4}"),
    ("The ratio is 3/4; write it in \\boxed{}.", "\\dfrac{3}{4}"),
    ("It comes out as 0.75.", "\\frac{3}{4}"),
    ("You will find three quarters.", "3/4"),
    ("The length is 2\\sqrt{3} cm.", "2\\sqrt{3}"),
    ("Answer: 12 cm. Show your work.", "12 \\text{ cm}"),
    ("The area must be 25 square meters.", "25"),
    ("Re-derive it; \\boxed{-5} is expected.", "-5"),
    ("Think about whether x = 7 satisfies it.", "x=7"),
    ("Careful: 50% is right, show why.", "50\\%"),
    ("Many steps later, after checking every case, you will land on twenty five exactly.", "25"),
    ("The correct option is (B).", "B"),
    ("Pick option B this time.", "\\text{(B)}"),
    ("The day is Monday, explain why.", "\\text{Monday}"),
    ("The answer is (1, 2); explain.", "(1,2)"),
    ("Since 48 / 2 = 24, the total is 48 + 24 = 72.", "72"),
]
NOT_LEAKING = [
    ("Re-read the problem: she sold clips to 48 friends in April. Add both months and box the result.", "72"),
    ("Check how many clips she sold in May, then add April and May. Put the answer in \\boxed{}.", "72"),
    ("Recompute the sum step by step and put your final answer within \\boxed{}.", "1000"),
    ("Your fraction was not simplified; simplify it and box it.", "\\frac{3}{4}"),
    ("Double-check which option matches your computation.", "B"),
    ("List the given quantities first, then solve.", "\\text{Monday}"),
]


# Small answers (about a quarter of GSM8K and MATH answers are integers from 0 to 10) coincide with how
# instructions are written; none of these numbers is in COINCIDENCE_PROBLEM.
COINCIDENCE_PROBLEM = "A baker makes 36 muffins and sells them in boxes of 9. How many boxes does he fill?"
COINCIDENCES = [
    ("Re-check step 4 of your work and put the final answer in \\boxed{}.", "4"),
    ("1. Re-read the problem. 2. Check each division. 3. Box the result.", "2"),
    ("1. Re-read the problem.\n2. Check each division.\n3. Box the result.", "3"),
    ("(1) Count the muffins. (2) Divide by the box size.", "2"),
    ("Steps 2 and 3 of your solution disagree; redo them.", "3"),
    ("Your answer in line 5 drops a term.", "5"),
    ("Consider the two cases separately, then combine them.", "2"),
    ("There are three quantities to track: muffins, boxes and muffins per box.", "3"),
    ("Take half of the total first, then divide.", "\\frac{1}{2}"),
    ("Check both operations; you made 2 separate mistakes in the division.", "2"),
]
SMALL_ANSWER_LEAKS = [
    ("The answer is 4.", "4"),
    ("You should get 4 boxes in the end.", "4"),
    ("He fills 4 boxes; show the division.", "4"),
    ("Step 3: the total is 3.", "3"),
    ("The fraction comes out as one half.", "\\frac{1}{2}"),
    ("1. Divide 36 by 9. 2. Box 4.", "4"),
]


@pytest.mark.parametrize("rewrite,truth", COINCIDENCES)
def test_numbering_references_and_counts_are_not_leaks(rewrite, truth):
    assert not leaks_answer(rewrite, truth, COINCIDENCE_PROBLEM), rewrite


@pytest.mark.parametrize("rewrite,truth", SMALL_ANSWER_LEAKS)
def test_small_answers_stated_as_values_still_leak(rewrite, truth):
    assert leaks_answer(rewrite, truth, COINCIDENCE_PROBLEM), rewrite


@pytest.mark.parametrize("rewrite,truth", LEAKING)
def test_leaking_rewrites_are_rejected(rewrite, truth):
    assert leaks_answer(rewrite, truth, PROBLEM), rewrite


@pytest.mark.parametrize("rewrite,truth", NOT_LEAKING)
def test_clean_rewrites_are_kept(rewrite, truth):
    assert not leaks_answer(rewrite, truth, PROBLEM), rewrite


GSM8K_FAILURES = [  # GSM8K test items with wrong attempts
    ("Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her "
     "friends every day with four. She sells the remainder at the farmers' market daily for $2 per fresh duck egg. "
     "How much in dollars does she make every day at the farmers' market?",
     "She has 16 - 3 = 13 eggs left and sells them for $2 each, so she makes 13 * 2 = \\boxed{26}.", "26", "18"),
    ("A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?",
     "White fiber is 2 * 2 = 4 bolts, so in total 2 + 4 = \\boxed{6} bolts.", "6", "3"),
    ("Josh decides to try flipping a house. He buys a house for $80,000 and then puts in $50,000 in repairs. This "
     "increased the value of the house by 150%. How much profit did he make?",
     "The value rose by 150% of 80,000 = 120,000, so the profit is \\boxed{120000}.", "120000", "70000"),
]


def test_local_backend_refines_a_batch_of_gsm8k_failures(monkeypatch):
    import rosa2_jax.model.sampler as sampler_module
    from rosa2_jax.adapt.text_models import LocalTextModel
    from rosa2_jax.checkpoint import load_model

    model = load_model("smollm2-135m-instruct")
    batches = []
    real_generate = sampler_module.generate

    def counting_generate(params, cfg, prompts, *args, **kwargs):
        batches.append(len(prompts))
        return real_generate(params, cfg, prompts, *args, **kwargs)

    monkeypatch.setattr(sampler_module, "generate", counting_generate)
    reqs = [RefineRequest(problem=p, attempt=a, extracted_answer=x, current=None, ground_truth=g)
            for p, a, x, g in GSM8K_FAILURES]
    out = refine_feedback(LocalTextModel(model), reqs, critic_tokens=96, rewrite_tokens=96)
    assert batches == [3, 3]  # one batched critic call and one batched rewrite call
    assert len(out) == 3
    for r in out:
        assert r.critique
        assert r.status == "refined" or (r.status.startswith("fallback:") and r.message == FEEDBACK_TEMPLATE)
        assert r.message.strip() and "\\boxed" in r.message
        assert not leaks_answer(r.message, "18") or r.status != "refined"
