"""Words stream: refinement over real HTTP (with failures), the leakage guard, the local backend."""

import dataclasses
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rosa2_jax.adapt.leakage import leaks_answer
from rosa2_jax.adapt.text_models import OpenAICompatibleTextModel, TextModelUnreachableError
from rosa2_jax.adapt.instructions import (CATEGORIES, clean_instruction, departure_step, instruction_problems,
                                          system_prompt_problems)
from rosa2_jax.adapt.text_models import Completion
from rosa2_jax.adapt.words import (FEEDBACK_TEMPLATE, REQUEST, RETRIES, RETRY_TEMPERATURE, STATUSES, VERDICT,
                                   RefineRequest, assemble_message, refine_feedback, refine_system_prompt)

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
        if "Reply in exactly two lines" in user:
            content = "Step: multiplies the rows by the wrong number\nMistake: arithmetic slip"
        else:
            content = "Instruction: Redo the multiplication of the rows by the eggs in each row."
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
                          extracted_answer=str(40 + i), current=FEEDBACK_TEMPLATE, ground_truth=str(42 + 7 * i))
            for i in range(n)]


def client(url, model, monkeypatch, **kw):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    return OpenAICompatibleTextModel(url, model, **{"timeout": 5.0, "max_retries": 2, **kw})


def test_refines_over_http(server, monkeypatch):
    out = refine_feedback(client(server, "ok", monkeypatch), requests())
    assert [r.status for r in out] == ["refined"] * 3
    assert all(r.message == assemble_message("Redo the multiplication of the rows by the eggs in each row.")
               for r in out)
    assert all(r.critique.startswith("Step: multiplies") and r.category == "arithmetic slip" for r in out)
    assert all(0 < r.semantic_shift <= 1 for r in out)


def test_http_500_is_retried(server, monkeypatch):
    ChatServer.calls.clear()
    out = refine_feedback(client(server, "flaky", monkeypatch), requests(2))
    assert [r.status for r in out] == ["refined"] * 2
    assert all(count == 2 for (mode, _), count in ChatServer.calls.items() if mode == "flaky")


def test_slow_replies_time_out_and_fall_back(server, monkeypatch):
    start = time.perf_counter()
    out = refine_feedback(client(server, "slow", monkeypatch, timeout=0.3, max_retries=1), requests(2))
    assert [r.status for r in out] == ["fallback:raw"] * 2
    assert all(r.message == FEEDBACK_TEMPLATE and "Timeout" in r.critique for r in out)
    assert time.perf_counter() - start < 15


def test_malformed_json_falls_back(server, monkeypatch):
    out = refine_feedback(client(server, "malformed", monkeypatch, max_retries=0), requests(2))
    assert [r.status for r in out] == ["fallback:raw"] * 2
    assert all(r.message == FEEDBACK_TEMPLATE for r in out)


def test_api_key_never_reaches_results(server, monkeypatch):
    tm = client(server, "auth", monkeypatch, max_retries=0)
    out = refine_feedback(tm, requests(1))
    assert out[0].status == "fallback:raw"
    assert SECRET not in repr(tm)
    assert all(SECRET not in str(getattr(r, f)) for r in out for f in ("message", "critique", "status", "candidates"))
    errors = tm.complete([[{"role": "user", "content": "x"}]], max_tokens=4, temperature=0.0)
    assert errors[0].text is None and SECRET not in errors[0].error and "***" in errors[0].error


def test_unreachable_server_is_a_clear_error(monkeypatch):
    tm = client("http://127.0.0.1:9/v1", "any", monkeypatch, max_retries=0, timeout=2.0)
    with pytest.raises(TextModelUnreachableError, match="unreachable.*--text_model"):
        tm.check()


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


@pytest.mark.slow
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
    reqs = [RefineRequest(problem=p, attempt=a, extracted_answer=x, current=FEEDBACK_TEMPLATE, ground_truth=g)
            for p, a, x, g in GSM8K_FAILURES]
    out = refine_feedback(LocalTextModel(model), reqs)
    assert batches[:2] == [3, 3]  # one batched critic call and one batched instruction call
    assert len(batches) <= 2 + RETRIES and all(b <= 3 for b in batches[2:])  # retries only for the refused
    for r, (problem, _, failed, truth) in zip(out, GSM8K_FAILURES):
        assert r.critique and r.status in STATUSES and 1 <= len(r.candidates) <= 1 + RETRIES
        assert not leaks_answer(r.message, truth, problem)
        if r.status == "fallback:raw":
            assert r.message == FEEDBACK_TEMPLATE
        else:
            assert r.message == assemble_message(r.instruction) and not instruction_problems(r.instruction, problem,
                                                                                             failed)


TOM = "Tom has 5 apples and buys 3 more, then he eats 3 of them. How many apples does Tom have now?"


class Scripted:
    """A text model that answers the critic with `critique` and the k-th instruction request of a problem with
    `candidates[k]` (or, from a dict, the list under the key the problem contains); it records every request's
    temperature and seed."""

    name = "scripted"

    def __init__(self, critique, candidates):
        self.critique, self.candidates, self.calls, self.writes = critique, candidates, [], {}

    def complete(self, conversations, *, max_tokens, temperature, seeds=None):
        out = []
        for i, conv in enumerate(conversations):
            user = conv[-1]["content"]
            self.calls.append((user, temperature, None if seeds is None else seeds[i]))
            if "Reply in exactly two lines" in user:
                out.append(Completion(self.critique, tokens=10) if self.critique else Completion(None, "down"))
            else:
                problem = user.split("\n")[0]
                k = self.writes[problem] = self.writes.get(problem, -1) + 1
                script = self.candidates if isinstance(self.candidates, list) else next(
                    texts for key, texts in self.candidates.items() if key in problem)
                out.append(Completion(script[k], tokens=12))
        return out


def tom(**kw):
    return RefineRequest(TOM, "5 + 3 + 3 = 11, so \\boxed{11}.", "11", FEEDBACK_TEMPLATE, ground_truth="5", seed=7,
                         **kw)


GOOD = "Re-read what Tom does with the 3 apples he eats: does it add to his apples or take from them?"


def test_a_valid_first_candidate_is_used_as_it_is():
    tm = Scripted("Step: adds the eaten apples\nMistake: wrong operation", [GOOD])
    (r,) = refine_feedback(tm, [tom()])
    assert r.status == "refined" and r.instruction == GOOD and r.message == assemble_message(GOOD)
    assert r.message.startswith(VERDICT) and r.message.endswith(REQUEST) and "\\boxed{}" in r.message
    assert r.candidates == ({"text": GOOD, "reasons": []},) and r.tokens == 22
    assert [t for _, t, _ in tm.calls] == [0.0, 0.0]


def test_a_refused_candidate_is_sampled_again_with_the_reason():
    tm = Scripted("Step: adds the eaten apples\nMistake: wrong operation", ["The answer is 5.", GOOD])
    (r,) = refine_feedback(tm, [tom()])
    assert r.status == "retried" and r.instruction == GOOD
    assert [c["reasons"] for c in r.candidates] == [["bare", "answer statement", "no action"], []]
    (_, t0, _), _, (retry, t1, seed) = tm.calls
    assert t0 == 0.0 and t1 == RETRY_TEMPERATURE and seed is not None
    assert ("refused because it was not a sentence; it stated what the answer is; it did not tell the student what "
            "to do") in retry


def test_the_critique_category_is_the_fallback_after_every_retry():
    bad = ["11", "After eating, you should get 11 apples; check it.", "Eat 4 apples and check."]
    (r,) = refine_feedback(Scripted("Step: adds 3\nMistake: wrong operation", bad), [tom()])
    assert r.status == "fallback:category" and r.category == "wrong operation"
    assert r.message == assemble_message(CATEGORIES["wrong operation"])
    assert [c["reasons"] for c in r.candidates] == [["bare", "failed answer", "new number", "no action"],
                                                    ["answer statement", "failed answer", "new number"], ["new number"]]


def test_without_a_category_the_raw_feedback_is_sent():
    (r,) = refine_feedback(Scripted("Step: somewhere\nMistake: unclear", ["11"] * 3), [tom()])
    assert r.status == "fallback:raw" and r.message == FEEDBACK_TEMPLATE and r.instruction is None
    assert len(r.candidates) == 3


def test_a_failed_critic_sends_the_raw_feedback():
    (r,) = refine_feedback(Scripted(None, [GOOD]), [tom()])
    assert r.status == "fallback:raw" and r.message == FEEDBACK_TEMPLATE and r.candidates == ()


def test_a_leak_goes_to_the_fallback_without_a_retry():
    leak = "Check your sum again: the total is the 5 apples he started with."
    tm = Scripted("Step: adds 3\nMistake: wrong operation", [leak, GOOD])
    (r,) = refine_feedback(tm, [tom()])
    assert r.status == "fallback:category" and [c["reasons"] for c in r.candidates] == [["leak"]]
    assert len(tm.calls) == 2


def test_retries_of_a_batch_go_only_to_the_refused():
    other = RefineRequest("Ann has 4 pens and 2 pencils. How many things does she have?", "\\boxed{8}", "8",
                          FEEDBACK_TEMPLATE, ground_truth="6")
    tm = Scripted("Step: adds 3\nMistake: wrong operation",
                  {"Tom": ["11", GOOD], "Ann": ["Count the pencils again and add them to the pens she has."]})
    out = refine_feedback(tm, [tom(), other])
    assert [r.status for r in out] == ["retried", "refined"]
    assert [len(r.candidates) for r in out] == [2, 1] and len(tm.calls) == 5


@pytest.mark.parametrize("text,reasons", [
    ("", ["empty"]),
    ("5 apples", ["bare", "copy of problem", "no action"]),
    ("Check \\boxed{5} against the problem statement again.", ["filled box"]),
    ("Check again: your final answer should be 5 apples.", ["answer statement"]),
    ("Work it out so that 5 + 3 - 3 = 5 holds for the apples.", ["answer statement"]),
    ("Re-check how you got 11 apples from the apples Tom has.", ["failed answer", "new number"]),
    ("Check whether Tom eats 4 of the apples or fewer.", ["new number"]),
    ("Tom has 5 apples and buys 3 more, then he eats 3 of them.", ["copy of problem", "no action"]),
    ("The apples Tom eats are the key part here, surely.", ["no action"]),
    (" ".join(["Check the apples."] * 25), ["too long"]),
    ("Re-read what happens to the 3 apples he eats: are they added or taken away?", []),
    ("Check step 2 of your work: the two quantities are combined the wrong way.", []),
])
def test_each_reason_an_instruction_is_refused(text, reasons):
    assert instruction_problems(text, TOM, "11") == reasons


def test_textgrad_refuses_a_numeric_or_stripped_system_prompt():
    bad = ["11", "You are careful. Tom has 5 apples; reason step by step and box the answer in \\boxed{}.",
           "Be careful with signs."]
    tm = Scripted("Step: adds 3\nMistake: wrong operation", bad)
    current = "Please reason step by step, and put your final answer within \\boxed{}."
    (r,) = refine_system_prompt(tm, [dataclasses.replace(tom(), current=current)])
    assert r.status == "fallback:raw" and r.message == current
    assert [c["reasons"] for c in r.candidates] == [
        ["bare", "drops step-by-step", "drops the box instruction", "number"], ["number"],
        ["bare", "drops step-by-step", "drops the box instruction"]]
    assert system_prompt_problems("Check units; reason step by step and put the final answer within \\boxed{}.",
                                  None) == []


def test_message_assembly_keeps_the_verdict_and_the_request():
    message = assemble_message("Look again at the apples Tom eats.")
    assert message == (f"{VERDICT} Look again at the apples Tom eats. {REQUEST}")
    assert clean_instruction('Instruction: "Your answer is incorrect. Look again at the apples Tom eats. '
                             'Put your final answer within \\boxed{}."') == "Look again at the apples Tom eats."


@pytest.mark.parametrize("message,truth,problem", [
    ("5 Put your final answer within \\boxed{}.", "5", "Tom has 5 apples and buys 3 more."),
    ("5.", "5", "Tom has 5 apples."),
    ("You will find four of them.", "4", COINCIDENCE_PROBLEM),
    ("The side comes out as 2 sqrt(5) in the end.", "2\\sqrt{5}", "A square has area 20."),
    ("It is 2*sqrt(5).", "2\\sqrt{5}", "A square has area 20."),
])
def test_the_guard_holes_are_closed(message, truth, problem):
    assert leaks_answer(message, truth, problem)


def test_departure_step_finds_the_first_missing_result():
    solution = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")
    assert departure_step(solution, "She sold 48 and then 96 in May.") == "Natalia sold 48/2 = [?] clips in May."
    assert departure_step(solution, "May: 24 clips, so 48 + 24 = 70.") == (
        "Natalia sold 48+24 = [?] clips altogether in April and May.")
    assert departure_step(solution, "24 in May, 72 in all") is None
    assert departure_step("No marked steps here.", "x") is None


def test_a_reference_aware_critic_sees_the_reference_and_its_echo_is_refused():
    """The critic is shown the answer key and the first missed step; when its notes repeat the truth, the
    instruction written from them is refused and the message sent still passes the guard."""
    solution = "Tom has 5 + 3 = <<5+3=8>>8 apples.\nAfter eating he has 8 - 3 = <<8-3=5>>5 apples.\n#### 5"
    tm = Scripted("Step: the eating step; the answer key gives 5\nMistake: wrong operation",
                  ["After eating, Tom is left with 5 apples.", "Tom ends with 5.", "So 5."])
    request = dataclasses.replace(tom(reference=solution, reference_kind="solution"),
                                  attempt="Tom has 5 + 3 = 8 apples, then 8 + 3 = 11, so \\boxed{11}.")
    (r,) = refine_feedback(tm, [request])
    critic_user = tm.calls[0][0]
    assert "Answer key" in critic_user and "After eating he has 8 - 3 = [?] apples." in critic_user
    writer_user = tm.calls[1][0]
    assert "(its value hidden): After eating he has 8 - 3 = [?] apples." in writer_user
    assert "11" not in writer_user  # the failed answer is masked
    assert r.status == "fallback:category" and not leaks_answer(r.message, "5", TOM)
