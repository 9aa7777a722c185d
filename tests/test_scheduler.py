"""The token-level engine (engine/token.py) against the turn-synchronous one, and its prefix reuse
against a full prefill."""

import functools
import json
import re
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_chat_model
from rosa2_jax.engine import streams
from rosa2_jax.adapt.rosa import RosaConfig, rosa_update
from rosa2_jax.adapt.text_models import make_text_model
from rosa2_jax.checkpoint import load_model
from rosa2_jax.engine import METHODS, SCHEDULERS, EngineConfig, Session, TokenEngine, TurnEngine
from rosa2_jax.engine import host_memory
from rosa2_jax.engine.host_memory import HostMemory, programs_held
from rosa2_jax.engine.rows import TEXT_CACHES, DecodeBatch
from rosa2_jax.engine.stats import SchedulerStats
from rosa2_jax.kernels.decode_attention import attention_kernel_supported
from rosa2_jax.model.decode_rows import decode_chunk, empty_rows, prefill_row, row_cache
from rosa2_jax.model.decoder import cache_dtype, decode_layout, decoder_hidden, forward
from rosa2_jax.model.generation import SamplingConfig, bucket_length, generate
from rosa2_jax.model.lora import LoraConfig, init_adapters, parse_layers
from rosa2_jax.study.prompts import trimmed_turns
from rosa2_jax.tasks.problem import Problem


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(str(tiny_chat_model(tmp_path_factory.mktemp("scheduler") / "model")))


PROBLEMS = [Problem(f"p{i}", f"Which is right? (A) {i} (B) {i + 1}", "B", "choice") for i in range(5)]


def make_engine(model, scheduler: str, method: str, rows: int = 2, sessions: int = 3, critic=None,
                sampling=SamplingConfig(max_new_tokens=10), adapter_cache=None, rosa=RosaConfig(), max_programs=0,
                lora=LoraConfig(), adapter="lora", max_context=512):
    # 2 rows, 3 sessions in the pool, 5 tokens per decode call: rows stop mid-call and sessions change rows.
    # The critic is the policy itself unless another loaded model is given.
    cfg = EngineConfig(method=method, max_turns=3, rows=rows, sampling=sampling, max_context=max_context,
                       critic_tokens=12, rewrite_tokens=8, sessions=sessions, decode_steps=5, switch_turn=2, rosa=rosa,
                       max_programs=max_programs, lora=lora, adapter=adapter)
    return SCHEDULERS[scheduler](model, cfg, make_text_model("local", model=critic or model), adapter_cache)


def run(model, scheduler: str, method: str, rows: int = 2, sessions: int = 3, critic=None, problems=PROBLEMS,
        sampling=SamplingConfig(max_new_tokens=10), rosa=RosaConfig(), max_programs=0, lora=LoraConfig(),
        adapter="lora", max_context=512):
    engine = make_engine(model, scheduler, method, rows, sessions, critic, sampling, rosa=rosa,
                         max_programs=max_programs, lora=lora, adapter=adapter, max_context=max_context)
    finished = []
    try:
        engine.run(problems, finished.append)
    finally:
        engine.close()
    records = sorted((s.record("toy") for s in finished), key=lambda r: (r.method, r.problem_id))
    return records, engine


def trajectory(records):
    return [(r.problem_id, r.solved_at, [(t.user, t.system_prompt, t.response, t.finish_reason, t.prompt_tokens,
                                          t.step_norm_sq is None) for t in r.turns]) for r in records]


def step_norms(records):
    return [t.step_norm_sq for r in records for t in r.turns if t.step_norm_sq is not None]


# switch runs both streams in the default run; the other adapting methods in `pytest -m slow`.
SLOW_EQUALITY = ("rosa", "words", "rosa2", "words-ref", "rosa2-ref")


@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.slow) if m in SLOW_EQUALITY else m
                                    for m in METHODS])
def test_greedy_records_equal_the_turn_engines(model, method):
    turn, _ = run(model, "turn", method)
    token, engine = run(model, "token", method)
    assert trajectory(token) == trajectory(turn)
    # ||Δθ||² to 5 significant digits. A session's update bucket (and so its padded shape) depends on when
    # its Words job finished, so the float32 sums may differ in the last bits; the steps are the same.
    np.testing.assert_allclose(step_norms(token), step_norms(turn), rtol=1e-5)
    assert sum(len(r.turns) > 1 for r in token) >= 2, "the tiny model should fail some first turns"
    stats = engine.stats
    assert 0 < stats.generated <= stats.row_steps
    weights = any(k.changes_weights for t in range(1, 4) for k in METHODS[method].streams_at(t, engine.cfg))
    if not weights:  # later turns reuse the session's cache instead of prefilling its history again
        assert stats.reused > 0
    if method in ("rosa", "rosa2"):
        assert stats.updates > 0 and stats.reused == 0
        assert any(t.step_norm_sq for r in token for t in r.turns)
    words = any(k.needs_text_model for k in METHODS[method].all_streams(engine.cfg))
    # The policy's own critic decodes in the rows, beside the turns (12 critic tokens: longer than a turn); its
    # prompts open with their system messages, which later prompts take from the kept text caches.
    assert (stats.text_generated > 0) == (stats.text_reused > 0) == words


@pytest.mark.parametrize("method", ["rosa", pytest.param("rosa2", marks=pytest.mark.slow)])
@pytest.mark.parametrize("adapter", list(streams.ADAPTERS))
def test_a_weights_step_keeps_the_cache_of_the_layers_it_leaves(model, method, adapter):
    """An adapter on the last layer only leaves the layers below as they were: the token engine keeps a failed
    session's cache and computes the last layer's keys/values again from the inputs the Weights step computed
    (a hidden-state offset changes no layer: the cache is kept whole). The records are the turn engine's, which
    prefills every turn from scratch."""
    lora = LoraConfig(targets=("q", "v"), layers=parse_layers("last:1", model.cfg.num_layers))
    turn, _ = run(model, "turn", method, lora=lora, adapter=adapter)
    token, engine = run(model, "token", method, lora=lora, adapter=adapter)
    assert trajectory(token) == trajectory(turn)
    np.testing.assert_allclose(step_norms(token), step_norms(turn), rtol=1e-5)
    stats = engine.stats
    assert stats.updates > 0 and stats.reused > 0
    assert (stats.refreshed > 0) == (adapter == "lora") and stats.refreshed <= stats.reused


@pytest.mark.parametrize("temperature", [pytest.param(0.0, marks=pytest.mark.slow), 0.7])
def test_one_engine_running_every_method_writes_each_methods_records(model, temperature):
    """Sessions of all methods share the rows and the pool (a slot goes from a rosa session to a baseline one,
    whose adapter must be reset), yet each writes the records of its method's run alone; sampled ones too,
    since a session's draws depend only on its seed and its own logits."""
    sampling = SamplingConfig(max_new_tokens=10, temperature=temperature, top_p=0.8)
    alone = {m: run(model, "token", m, sampling=sampling)[0] for m in METHODS}
    problems = [(m, p) for p in PROBLEMS for m in METHODS]  # interleaved: every row and slot sees every method
    together, engine = run(model, "token", "baseline", problems=problems, sampling=sampling)
    for m in METHODS:
        mine = [r for r in together if r.method == m]
        assert trajectory(mine) == trajectory(alone[m]), m
        np.testing.assert_allclose(step_norms(mine), step_norms(alone[m]), rtol=1e-5)
    assert engine.stats.updates > 0 and engine.stats.text_generated > 0


class _Stopped(Exception):
    """Ends a run from inside, as a kill would."""


@pytest.mark.parametrize("scheduler,cached", [("turn", False), ("token", True)])
def test_a_run_stopped_anywhere_goes_on_from_its_sessions_snapshots(model, scheduler, cached, tmp_path):
    """A run stopped mid-way, its sessions in flight restored from their last snapshots (JSON, with no adapter)
    and its problems never admitted run next: each session writes the records of a run never stopped, sampled
    ones too, and no restored turn is generated again. The adapters come back by running the Weights steps
    again, or, with an adapter cache, from the files saved after them (a torn file: replayed instead)."""
    sampling = SamplingConfig(max_new_tokens=10, temperature=0.7, top_p=0.8)
    cache = tmp_path / "adapters" if cached else None
    # Every kind of stream: Words, Weights, the system prompt's, and both at once or by turn.
    problems = [(m, p) for p in PROBLEMS[:3] for m in ("textgrad", "rosa2", "switch")]
    whole, _ = run(model, scheduler, "baseline", problems=problems, sampling=sampling)

    engine = make_engine(model, scheduler, "baseline", sampling=sampling, adapter_cache=cache)
    finished, snapshots = [], {}

    def ready(s):
        snapshots[s.method, s.problem.id] = json.loads(json.dumps(s.snapshot()))
        if len(snapshots) >= 3 and any("update" in t for t in snapshots[s.method, s.problem.id]["turns"]):
            raise _Stopped  # a session with a Weights step behind it is in flight

    with pytest.raises(_Stopped):
        try:
            engine.run(problems, finished.append, ready)
        finally:
            engine.close()
    queued, first = list(engine.queue), len(finished)
    in_flight = [row for key, row in snapshots.items() if key not in {(s.method, s.problem.id) for s in finished}]
    adapted = [row for row in in_flight if any("update" in t for t in row["turns"])]
    assert adapted and queued
    tampered = None
    if not cached:
        # One snapshot's answer tokens are tampered with: its replayed Weights step no longer gives its record's
        # ||Δθ||², so that session starts again from turn 1 (with a warning), not from a wrong adapter.
        tampered = adapted[0]
        tampered["response_ids"] = [ids[::-1] for ids in tampered["response_ids"]]
    else:  # every adapted session's adapter is saved; one file is torn, so that session replays instead
        assert len(list(cache.glob("*.npz"))) == len(adapted)
        torn = adapted[0]
        (cache / f"{torn['method']}--{torn['problem_id']}.npz").write_bytes(b"PK torn")
    by_id = {p.id: p for p in PROBLEMS}
    restored = [Session.from_snapshot(row, by_id[row["problem_id"]]) for row in in_flight]

    engine = make_engine(model, scheduler, "baseline", sampling=sampling, adapter_cache=cache)
    judged, replayed = [], []
    judge, failure_at = engine.life.judge, engine.life.restore.failure_at
    engine.life.judge = lambda slots, *a: judged.extend(slots.values()) or judge(slots, *a)
    engine.life.restore.failure_at = lambda s, t: replayed.append(s.problem.id) or failure_at(s, t)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine.run(restored + queued, finished.append)
    finally:
        engine.close()
    starts_over = [str(w.message) for w in caught if str(w.message).startswith("restoring")]
    if cached:  # the other adapters loaded, not replayed; a finished session's file is removed
        assert set(replayed) == {torn["problem_id"]} and starts_over == [] and list(cache.glob("*.npz")) == []
    else:
        assert replayed and len(starts_over) == 1
        assert re.fullmatch(rf"restoring {tampered['method']} on {tampered['problem_id']}: turn \d's Weights step "
                            r"gives .* starts again from turn 1", starts_over[0])
    records = sorted((s.record("toy") for s in finished), key=lambda r: (r.method, r.problem_id))
    assert trajectory(records) == trajectory(whole)
    np.testing.assert_allclose(step_norms(records), step_norms(whole), rtol=1e-5)
    # The second run judged every turn of the sessions it finished, but for the turns restored.
    kept_turns = sum(row["turn"] for row in in_flight if row is not tampered)
    assert len(judged) == sum(len(s.turns) for s in finished[first:]) - kept_turns


@pytest.mark.parametrize("adapter", list(streams.ADAPTERS))
def test_a_sessions_adapter_state_goes_to_another_slot_and_nowhere_else(model, adapter):
    """What the adapter cache saves and loads: one slot's adapter, every other slot untouched; a state of
    another shape is refused instead of broadcast."""
    layers = parse_layers("last:1", model.cfg.num_layers)  # the layers below stay zero and are not saved
    engine = TurnEngine(model, EngineConfig(method="rosa", adapter=adapter, rows=3,
                                            lora=LoraConfig(targets=("q", "v"), layers=layers)))
    stream = engine.life.weights()
    rng = np.random.default_rng(0)
    moved = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in stream.state(2).items()}
    before = [stream.state(i) for i in range(3)]
    stream.load_state(0, moved)
    after = [stream.state(i) for i in range(3)]
    for k in moved:
        np.testing.assert_array_equal(after[0][k], moved[k])
        for i in (1, 2):
            np.testing.assert_array_equal(after[i][k], before[i][k])
    if adapter == "lora":
        assert all(v.shape[0] == 1 for v in moved.values())  # the adapted layer only
    k = next(iter(moved))
    with pytest.raises(ValueError, match="shape"):
        stream.load_state(1, moved | {k: moved[k][..., :1]})
    engine.close()


@pytest.fixture(scope="module")
def critic(tmp_path_factory):
    """Another model as critic (--text_model=local:<spec>): it generates on its own, not in the rows."""
    return load_model(str(tiny_chat_model(tmp_path_factory.mktemp("critic") / "model", seed=1)))


def test_words_jobs_run_one_at_a_time_and_take_every_failure_queued_meanwhile(model, critic, monkeypatch):
    """With a text model apart from the policy and slow, failures pile up while a Words job runs: the next
    job takes them all (one batched generation instead of one after another), and the records stay the turn
    engine's."""
    jobs, sizes = [], []
    start = streams.Words.start
    refine = streams.Words.refine

    def slow_refine(*args, **kw):
        time.sleep(0.5)
        return refine(*args, **kw)

    def watched_start(self, failed):
        assert all(job.done() for job in jobs), "a second Words job started while one was in flight"
        jobs.append(start(self, failed))
        sizes.append(len(failed))
        return jobs[-1]

    monkeypatch.setattr(streams.Words, "refine", staticmethod(slow_refine))
    monkeypatch.setattr(streams.Words, "start", watched_start)
    token, engine = run(model, "token", "words", rows=4, sessions=5, critic=critic)
    monkeypatch.undo()
    turn, _ = run(model, "turn", "words", rows=4, sessions=5, critic=critic)
    assert max(sizes) > 1, sizes
    assert engine.stats.text_generated == 0
    assert trajectory(token) == trajectory(turn)


def test_the_policys_own_critic_starts_every_failures_words_job_at_once(model, monkeypatch):
    """When the critic is the policy, its requests decode in the rows: a failure's Words job starts as soon as
    the turn is judged, beside jobs still in flight, and a critique of one session shares decode calls with
    other sessions' turns. Records stay the turn engine's."""
    in_flight, overlapped = [], []
    start = streams.Words.start

    def watched_start(self, failed):
        overlapped.append(any(not job.done() for job in in_flight))
        in_flight.append(start(self, failed))
        return in_flight[-1]

    monkeypatch.setattr(streams.Words, "start", watched_start)
    token, engine = run(model, "token", "words", rows=4, sessions=5)
    monkeypatch.undo()
    turn, _ = run(model, "turn", "words", rows=4, sessions=5)
    assert any(overlapped), "no Words job started while another was in flight"
    assert engine.stats.text_generated > 0
    assert engine.stats.generated > engine.stats.text_generated  # the turns shared the rows
    assert trajectory(token) == trajectory(turn)


def test_a_failed_run_refuses_its_pending_text_requests(model):
    """A worker thread waiting on a text request is never left hanging when the run stops."""
    cfg = EngineConfig(method="words", max_turns=2, rows=2, sampling=SamplingConfig(max_new_tokens=10),
                       max_context=512, critic_tokens=12, rewrite_tokens=8)
    engine = TokenEngine(model, cfg, make_text_model("local", model=model))
    ask = engine.life.ctx.submit(engine.life.ctx.text_model.complete, [[{"role": "user", "content": "hi"}]], max_tokens=4,
                             temperature=0.0)
    too_long = Problem("p0", "Which? " * 200 + "(A) 1 (B) 2", "B", "choice")  # refused at admission
    with pytest.raises(ZeroDivisionError):
        engine.run([too_long], lambda s: 1 / 0)
    with pytest.raises(RuntimeError, match="engine stopped"):
        ask.result(timeout=60)
    engine.close()


def test_a_weights_step_runs_only_as_many_rows_as_its_failures_need(model, monkeypatch):
    """Inactive rows cost as much as active ones inside the vmapped step, so a bucket of n failed sessions
    is n rounded up to a power of two, not every slot."""
    calls = []

    def counting_update(params, adapters, batch, **kw):
        calls.append((batch.tokens.shape[0], int(batch.active.sum())))
        return rosa_update(params, adapters, batch, **kw)

    monkeypatch.setattr(streams, "rosa_update", counting_update)
    run(model, "token", "rosa", rows=16, sessions=16)
    assert calls, "the tiny model should fail some turns"
    assert all(rows == 1 << (active - 1).bit_length() for rows, active in calls), calls
    assert any(rows < 16 for rows, _ in calls), calls


@pytest.mark.slow
def test_passes_of_one_step_each_session_alone_at_its_own_length(model, monkeypatch):
    """With --update_batch=1 every failed session is its own step, its row padded to its own length only (and to
    the window's), with no inactive rows; the records are those of the bucketed steps (‖Δθ‖² to rounding)."""
    calls = []

    def counting_update(params, adapters, batch, **kw):
        calls.append((*batch.tokens.shape, int(batch.valid.sum()), int(batch.active.sum()), batch.window))
        return rosa_update(params, adapters, batch, **kw)

    monkeypatch.setattr(streams, "rosa_update", counting_update)
    bucketed, _ = run(model, "token", "rosa", rows=4, sessions=4)
    assert any(rows > 1 for rows, *_ in calls), "some bucket should hold several sessions"
    calls.clear()
    alone, _ = run(model, "token", "rosa", rows=4, sessions=4, rosa=RosaConfig(session_batch=1))
    assert calls and all(rows == active == 1 for rows, _, _, active, _ in calls), calls
    assert all(length == bucket_length(max(held, window + 1)) for _, length, held, _, window in calls), calls
    assert trajectory(alone) == trajectory(bucketed)
    np.testing.assert_allclose(step_norms(alone), step_norms(bucketed), rtol=1e-3)


@pytest.mark.parametrize("failed,rows,data,bucket", [(1, 8, 1, 1), (3, 16, 1, 4), (5, 8, 1, 8), (9, 12, 1, 12),
                                                      (3, 16, 2, 4), (1, 16, 4, 4), (5, 16, 2, 8)])
def test_update_bucket_sizes(failed, rows, data, bucket):
    assert streams.update_bucket(failed, rows, data) == bucket


def test_a_turn_prefilled_after_its_kept_prefix_equals_a_full_prefill(model):
    """A session's cache, moved out of its row and back into another, then extended by the next turn's
    tokens, gives the logits a full prefill of the whole prompt gives (and the same greedy continuation)."""
    cfg, params = model.cfg, model.params
    rng = np.random.default_rng(0)
    history = rng.integers(3, cfg.vocab_size, 37).tolist()
    turn = history + rng.integers(3, cfg.vocab_size, 21).tolist()
    key = jax.random.key(0)
    rows = empty_rows(cfg, 3, 256, 8, params["embed"].dtype, 0)
    prefill = functools.partial(prefill_row, params, key=key, cfg=cfg, pad_id=0)

    rows = prefill(rows, 0, turn)  # the reference: the whole prompt in row 0
    rows = prefill(rows, 1, history)  # the kept prefix, in row 1 ...
    saved = row_cache(rows, jnp.int32(1))
    rows = prefill(rows, 1, rng.integers(3, cfg.vocab_size, 50).tolist())  # ... which another session takes
    rows = prefill(rows, 2, turn, prefix=saved, reuse=len(history))  # the session comes back in row 2
    np.testing.assert_allclose(np.asarray(rows.logits[2]), np.asarray(rows.logits[0]), atol=1e-5, rtol=1e-5)
    assert int(rows.length[2]) == int(rows.length[0]) == len(turn)

    rows = rows.replace(done=rows.done.at[1].set(True))
    rows, generated, steps = decode_chunk(params, rows, None, None, jnp.zeros(3, jnp.int32), cfg=cfg,
                                          sampling=SamplingConfig(max_new_tokens=8), stop_ids=(2,), pad_id=0, steps=8)
    out = np.asarray(rows.out)
    assert out[0, : int(rows.count[0])].tolist() == out[2, : int(rows.count[2])].tolist()
    reference = generate(params, cfg, [turn], SamplingConfig(max_new_tokens=8), stop_token_ids=(2,), pad_id=0)[0]
    assert out[0, : int(rows.count[0])].tolist() == reference.tokens


def test_a_text_prompt_takes_the_kept_text_cache_sharing_its_longest_prefix(model):
    """A finished text request's cache serves a later prompt that shares its prefix (a writer's retry, a system
    message): only the rest is prefilled, and the greedy answer is a fresh prefill's. At most TEXT_CACHES kept."""
    cfg = EngineConfig(method="words", rows=2, sessions=2, decode_steps=5, max_context=512,
                       sampling=SamplingConfig(max_new_tokens=6))
    stats = SchedulerStats()
    batch = DecodeBatch(model, cfg, max_new=6, lora_kernel=False, stats=stats)
    rng = np.random.default_rng(5)
    words = lambda n: rng.integers(3, model.cfg.vocab_size, n).tolist()  # noqa: E731
    system, question = words(30), words(12)
    first, retry, other = system + question + words(9), system + question + words(4), system[:10] + words(25)

    def answer(row, prompt):
        before = stats.text_reused
        batch.prefill(row, 2, prompt, jax.random.key(0), {}, greedy=True, text=True)
        batch.text[row] = "request"
        while not (stopped := batch.stopped()):
            batch.decode({}, base_slot=2)
        [(_, tokens, _)] = stopped
        batch.text[row] = None
        batch.keep_text(row, prompt)
        reference = generate(model.params, model.cfg, [prompt], SamplingConfig(max_new_tokens=6),
                             stop_token_ids=model.sampler.stop_ids, pad_id=model.sampler.pad_id)[0]
        assert tokens == reference.tokens
        return stats.text_reused - before

    assert answer(0, first) == 0
    assert answer(1, other) == 10  # the system message's first 10 tokens
    assert answer(0, retry) == 42  # the system message and the question, from `first` (not `other`)
    for _ in range(TEXT_CACHES):
        answer(1, words(8))
    assert len(batch.text_kept) == TEXT_CACHES and answer(0, retry) == 0  # the oldest were evicted


def test_the_rows_cache_grows_with_its_row_and_shrinks_when_it_leaves(model):
    """The cache holds what the next decode call can fill (the row's tokens + 5 steps + 1, at most its prompt + limit
    + 1), bucketed: 64 slots while a 20-token prompt's row holds under 59 tokens, 128 after, 64 again once the row
    is free. Resized mid-turn, the row decodes the tokens one `generate` call over a fixed cache decodes."""
    cfg = EngineConfig(method="baseline", rows=2, sessions=2, decode_steps=5, max_context=512,
                       sampling=SamplingConfig(max_new_tokens=60))
    batch = DecodeBatch(model, cfg, max_new=60, lora_kernel=False, stats=SchedulerStats())
    prompt = np.random.default_rng(3).integers(3, model.cfg.vocab_size, 20).tolist()
    batch.prefill(0, 0, prompt, jax.random.key(0), {}, greedy=True)
    batch.slot[0] = 0
    capacities = []
    while not (stopped := batch.stopped()):
        batch.decode({}, base_slot=1)
        capacities.append(batch.device.capacity)
    [(row, tokens, reason)] = stopped
    assert (row, reason, len(tokens)) == (0, "length", 60)
    assert capacities == [64] * 8 + [128] * 4
    batch.slot[0] = None
    batch.fit()
    assert batch.device.capacity == 64
    reference = generate(model.params, model.cfg, [prompt], SamplingConfig(max_new_tokens=60),
                         stop_token_ids=model.sampler.stop_ids, pad_id=model.sampler.pad_id)[0]
    assert tokens == reference.tokens


def _two_rows(model, params, limits, prompt=20):
    """Rows 0 and 1 prefilled with `prompt`-token prompts, each with its token limit."""
    cfg = model.cfg
    rng = np.random.default_rng(1)
    rows = empty_rows(cfg, 2, 256, max(limits), cache_dtype(params), 0)
    for row in range(2):
        rows = prefill_row(params, rows, row, rng.integers(3, cfg.vocab_size, prompt).tolist(), jax.random.key(row),
                           cfg=cfg, pad_id=0, limit=limits[row])
    return rows


def test_a_decode_call_over_a_float32_cache_returns_in_the_step_a_row_stops(model):
    """A row that stops ends the call (so that it is refilled at once), and the rows still running continue
    in the next call with the tokens one uninterrupted call gives them."""
    params = model.params
    decode = functools.partial(decode_chunk, params, adapters=None, offsets=None, sessions=jnp.zeros(2, jnp.int32),
                               cfg=model.cfg, sampling=SamplingConfig(max_new_tokens=12), stop_ids=(), pad_id=0,
                               steps=12)
    reference, *_ = decode(_two_rows(model, params, (12, 12)))
    rows, generated, steps = decode(_two_rows(model, params, (3, 12)))  # row 0 stops after 3 tokens
    assert int(steps) == 3 and int(generated) == 6
    assert np.asarray(rows.done).tolist() == [True, False]
    rows, generated, steps = decode(rows)
    assert int(steps) == 9 and int(generated) == 9
    np.testing.assert_array_equal(np.asarray(rows.out[1]), np.asarray(reference.out[1]))


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """Wider than `model` (8 query heads over 2 kv heads, 128 wide), so that its bfloat16 decoding rounds a sum
    taken in another order into a different token within 40 steps."""
    folder = tmp_path_factory.mktemp("wide") / "model"
    return load_model(str(tiny_chat_model(folder, hidden_size=128, intermediate_size=256, num_attention_heads=8)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_prefill_after_a_held_prefix_does_not_depend_on_the_rows_capacity(wide_model, dtype):
    """A turn prefilled after its held prefix (in 64-token pieces) is computed on a cache of its own extent, so its
    logits and keys/values are, bit for bit, the same in rows of 384, 512 or 1,024 slots, a capacity its batch-mates
    set (computed over the rows' slots, as before, the float32 logits at 384 and 512 slots differed)."""
    cfg = wide_model.cfg
    params = wide_model.params if dtype == jnp.float32 else decode_layout(wide_model.params, dtype)
    prompt = np.random.default_rng(0).integers(3, cfg.vocab_size, 300).tolist()
    prefill = functools.partial(prefill_row, params, key=jax.random.key(0), cfg=cfg, pad_id=0)
    results = []
    for capacity in (384, 512, 1024):
        rows = prefill(empty_rows(cfg, 2, capacity, 8, cache_dtype(params), 0), 0, prompt[:200])
        held = row_cache(rows, jnp.int32(0))
        rows = prefill(rows, 1, prompt, prefix=held, reuse=200, chunk=64)
        cache = row_cache(rows, jnp.int32(1))
        assert int(rows.length[1]) == 300 and int(cache.valid.sum()) == 300
        results.append([rows.logits[1]] + [k[..., :300] for k in cache.k] + [v[:, :300] for v in cache.v])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    with pytest.raises(ValueError, match="300-token prompt does not fit rows of 256 cache slots"):
        prefill(empty_rows(cfg, 2, 256, 8, cache_dtype(params), 0), 1, prompt)


def test_a_prompt_prefilled_in_pieces_gives_the_forward_passs_logits(wide_model):
    """Each piece attends over the slots up to its own end (a span that grows with the pieces), within a cache of the
    prompt's whole extent: 700 tokens in pieces of 64 and 512 give the next-token logits of the forward pass."""
    cfg, params = wide_model.cfg, wide_model.params
    prompt = np.random.default_rng(2).integers(3, cfg.vocab_size, 700).tolist()
    reference = forward(params, jnp.asarray(prompt)[None], jnp.ones((1, 700), bool), cfg=cfg)[0, -1]
    for chunk in (64, 512):
        rows = prefill_row(params, empty_rows(cfg, 1, 1024, 8, cache_dtype(params), 0), 0, prompt, jax.random.key(0),
                           cfg=cfg, pad_id=0, chunk=chunk)
        np.testing.assert_allclose(rows.logits[0], reference, atol=1e-4)
        assert int(rows.cache.valid[0].sum()) == 700


def test_a_held_prefix_refreshed_in_its_adapted_layers_is_a_prefill_with_the_new_adapter(wide_model):
    """After a Weights step on the last layer, a held 200-token prefix has that layer computed again (in 64-token
    pieces) from the residual stream entering it: the logits and every layer's keys/values are those of the whole
    prompt prefilled with the new adapter, and the layers below are the held ones, bit for bit. Reused as held, the
    stale last layer moves the logits."""
    cfg, params = wide_model.cfg, wide_model.params
    first = cfg.num_layers - 1
    old = init_adapters(cfg, LoraConfig(targets=("q", "v"), layers=(first,)), 1, jax.random.key(0))
    rng = np.random.default_rng(0)
    new = old.replace(factors={t: (a, b + 0.3 * rng.normal(size=b.shape).astype(np.float32) * (
        np.arange(cfg.num_layers) == first)[None, :, None, None]) for t, (a, b) in old.factors.items()})
    prompt = rng.integers(3, cfg.vocab_size, 300).tolist()
    prefill = functools.partial(prefill_row, params, key=jax.random.key(0), cfg=cfg, pad_id=0)

    def second_turn(**kwargs):
        rows = prefill(empty_rows(cfg, 2, 512, 8, cache_dtype(params), 0), 1, prompt, adapters=new, **kwargs)
        return rows.logits[1], row_cache(rows, jnp.int32(1))

    held = row_cache(prefill(empty_rows(cfg, 2, 512, 8, cache_dtype(params), 0), 0, prompt[:200], adapters=old),
                     jnp.int32(0))
    # the residual stream entering the adapted layer, as the Weights step computes it
    inputs, _ = decoder_hidden(params, jnp.asarray(prompt[:200])[None], jnp.arange(200)[None],
                               jnp.ones((1, 200), bool), cfg=cfg, layers=(0, first), final_norm=False)
    whole, whole_cache = second_turn()
    refreshed, cache = second_turn(prefix=held, reuse=200, chunk=64, refresh=inputs[0], first_layer=first)
    np.testing.assert_allclose(refreshed, whole, atol=2e-5)
    assert int(cache.valid.sum()) == int(whole_cache.valid.sum()) == 300
    for k, v, whole_k, whole_v in zip(cache.k, cache.v, whole_cache.k, whole_cache.v):
        np.testing.assert_allclose(k[..., :300], whole_k[..., :300], atol=2e-5)
        np.testing.assert_allclose(v[:, :300], whole_v[:, :300], atol=2e-5)
    for layer in range(first):
        np.testing.assert_array_equal(cache.k[layer][..., :200], held.k[layer][..., :200])
        np.testing.assert_array_equal(cache.v[layer][:, :200], held.v[layer][:, :200])
    stale, _ = second_turn(prefix=held, reuse=200, chunk=64)
    assert np.abs(np.asarray(stale) - np.asarray(whole)).max() > 1e-3
    with pytest.raises(ValueError, match="cannot cover 200 reused tokens"):
        second_turn(prefix=held, reuse=200, refresh=inputs[0, :100], first_layer=first)


@pytest.mark.parametrize("attention_kernel", [False, pytest.param(True, marks=pytest.mark.skipif(
    not attention_kernel_supported(), reason="this CPU has no AVX2 (or no C++ compiler)"))])
def test_a_rows_bfloat16_decoding_does_not_depend_on_when_its_batch_mates_stop(wide_model, attention_kernel):
    """Over a bfloat16 cache a row attends to the cache and the call's buffer as two sums, so a call runs all its
    steps while a row runs: a row's 40 tokens beside one that stops every 3 (refilled at once) have, bit for bit,
    the logits and draws (T = 0.7) they have beside one that never stops (with early returns, a draw differs)."""
    params = decode_layout(wide_model.params, jnp.bfloat16)
    sampling = SamplingConfig(max_new_tokens=40, temperature=0.7, top_p=0.8)
    decode = functools.partial(decode_chunk, params, adapters=None, offsets=None, sessions=jnp.zeros(2, jnp.int32),
                               cfg=wide_model.cfg, sampling=sampling, stop_ids=(), pad_id=0, steps=8,
                               attention_kernel=attention_kernel)

    def first_tokens(rows):
        logits = {}
        while int(rows.count[0]) < 40:
            rows, *_ = decode(rows)
            logits[int(rows.count[0])] = np.asarray(rows.logits[0])
            if rows.done[1]:  # the stopped row's next turn
                rows = rows.replace(done=rows.done.at[1].set(False), count=rows.count.at[1].set(0))
        return np.asarray(rows.out[0]), logits

    tokens, logits = first_tokens(_two_rows(wide_model, params, (40, 40), prompt=100))
    tokens_beside_stops, logits_beside_stops = first_tokens(_two_rows(wide_model, params, (40, 3), prompt=100))
    assert sorted(logits_beside_stops) == sorted(logits) == [8, 16, 24, 32, 40]
    np.testing.assert_array_equal(tokens_beside_stops, tokens)
    for count in logits:
        np.testing.assert_array_equal(logits_beside_stops[count], logits[count])


def test_a_bfloat16_cache_is_written_once_per_call_as_one_step_calls_write_it(model):
    """bfloat16 decode weights keep a bfloat16 cache, which a decode call only reads: its new keys/values go to a
    buffer attended beside the cache and merged into it at the call's end. Rows of three lengths decoded in calls of
    12 steps give the tokens, logits and cache of one-step calls (each merging at once), and the last logits stay
    within bfloat16's error of the float32 forward over the prompt and the decoded tokens."""
    cfg = model.cfg
    params = decode_layout(model.params, jnp.bfloat16)
    assert cache_dtype(params) == jnp.bfloat16
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (10, 17, 24)]
    rows = empty_rows(cfg, 3, 128, 40, cache_dtype(params), 0)
    for row, prompt in enumerate(prompts):
        rows = prefill_row(params, rows, row, prompt, jax.random.key(row), cfg=cfg, pad_id=0)
    decode = functools.partial(decode_chunk, params, adapters=None, offsets=None, sessions=jnp.zeros(3, jnp.int32),
                               cfg=cfg, sampling=SamplingConfig(max_new_tokens=40), stop_ids=(), pad_id=0)
    calls, steps = jax.tree.map(jnp.copy, rows), rows
    for _ in range(3):
        calls, *_ = decode(calls, steps=12)
    for _ in range(36):
        steps, *_ = decode(steps, steps=1)
    assert calls.cache.k[0].dtype == jnp.bfloat16 and np.asarray(calls.length).tolist() == [46, 53, 60]
    for a, b in zip(jax.tree.leaves((calls.out, calls.logits, calls.cache)), jax.tree.leaves((steps.out, steps.logits,
                                                                                             steps.cache))):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=1e-5, rtol=0)
    for row, prompt in enumerate(prompts):
        sequence = jnp.asarray([prompt + np.asarray(calls.out[row, :36]).tolist()], jnp.int32)
        reference = forward(model.params, sequence, jnp.ones(sequence.shape, bool), cfg=cfg)[0, -1]
        error = np.abs(np.asarray(calls.logits[row] - reference)).max()
        assert error < 0.02 * np.abs(np.asarray(reference)).max()


def test_a_greedy_row_beside_sampled_rows_decodes_its_argmax_and_stops_at_its_own_limit(model):
    """A text request's row (greedy, 5 tokens) decoded beside sampled policy rows (T = 0.7, top-p 0.8):
    it gives `generate`'s greedy continuation, and the sampled rows draw the tokens they draw with no
    greedy row beside them."""
    cfg, params = model.cfg, model.params
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (20, 13, 27)]
    sampled = SamplingConfig(max_new_tokens=12, temperature=0.7, top_p=0.8)

    def decode(greedy_row: int | None):
        rows = empty_rows(cfg, 3, 256, 12, params["embed"].dtype, 0)
        for row, prompt in enumerate(prompts):
            text = row == greedy_row
            rows = prefill_row(params, rows, row, prompt, jax.random.key(row), cfg=cfg, pad_id=0,
                               limit=5 if text else 12, greedy=text)
        while not bool(jnp.all(rows.done)):
            rows, *_ = decode_chunk(params, rows, None, None, jnp.zeros(3, jnp.int32), cfg=cfg, sampling=sampled,
                                    stop_ids=(), pad_id=0, steps=4)
        return [np.asarray(rows.out[r, : int(rows.count[r])]).tolist() for r in range(3)]

    alone, beside = decode(None), decode(1)
    greedy = generate(params, cfg, [prompts[1]], SamplingConfig(max_new_tokens=5), stop_token_ids=(), pad_id=0)[0]
    assert beside[1] == greedy.tokens and len(beside[1]) == 5
    assert beside[1] != alone[1][:5], "the sampled draw of row 1 should differ from its argmax here"
    assert [beside[0], beside[2]] == [alone[0], alone[2]] and len(alone[0]) == 12


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_stop_admitting_finishes_the_sessions_in_flight_and_admits_no_more(model, scheduler):
    cfg = EngineConfig(method="baseline", max_turns=2, rows=2, sessions=3, sampling=SamplingConfig(max_new_tokens=10),
                       max_context=512, decode_steps=5)
    engine = SCHEDULERS[scheduler](model, cfg)
    in_flight = 3 if scheduler == "token" else 2  # the pool, or the rows of the turn engine
    finished = []

    def finish(session):
        finished.append(session)
        if len(finished) == 1:
            engine.stop_admitting()

    try:
        engine.run(PROBLEMS, finish)
    finally:
        engine.close()
    assert [p.id for _, p in engine.queue] == [p.id for p in PROBLEMS[in_flight:]]
    assert sorted(s.problem.id for s in finished) == [p.id for p in PROBLEMS[:in_flight]]
    assert all(s.error is None for s in finished)


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_a_stop_before_the_run_starts_admits_nothing(model, scheduler):
    # A signal can land after the handler is installed and before `run` takes its work.
    cfg = EngineConfig(method="baseline", max_turns=2, rows=2, sessions=3, sampling=SamplingConfig(max_new_tokens=10),
                       max_context=512)
    engine = SCHEDULERS[scheduler](model, cfg)
    engine.stop_admitting()
    finished = []
    try:
        engine.run(PROBLEMS, finished.append)
    finally:
        engine.close()
    assert finished == [] and [p.id for _, p in engine.queue] == [p.id for p in PROBLEMS]


def test_a_history_over_the_budget_loses_its_oldest_answers_first_and_keeps_the_message_it_answers(model):
    """The spec's rule (the oldest assistant turns go first) on x_1, y_1, x*_2, y_2, x*_3 at every budget: the
    turn keeps x*_3, the Words stream's instruction, while x_1 and it fit."""
    x1 = {"role": "user", "content": PROBLEMS[0].question}
    long_answer = [{"role": "assistant", "content": f"answer {k}: " + "so the total is 7, " * 12} for k in (1, 2)]
    messages = [x1, long_answer[0], {"role": "user", "content": "Check step 2."}, long_answer[1],
                {"role": "user", "content": "Add the two numbers."}]
    system = {"role": "system", "content": "Think step by step."}
    kept = [messages, [x1] + messages[3:], [x1, messages[4]], [x1]]
    sizes = [len(model.sampler.render([system] + m)) for m in kept]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4
    engine = make_engine(model, "turn", "baseline")
    session = Session(PROBLEMS[0], "baseline", system["content"], messages)
    try:
        for want, size in zip(kept, sizes):
            for budget in (size, size + 1):
                engine.life.max_prompt = budget
                assert engine.life.prompt_ids(session) == model.sampler.render([system] + want)
        engine.life.max_prompt = sizes[-1] - 1  # x_1 alone over the budget: admission refuses such a problem
        assert engine.life.prompt_ids(session) == model.sampler.render([system, x1])
    finally:
        engine.close()


def test_the_trimmed_turns_are_read_back_from_the_records_and_every_recorded_prompt_is_the_rules(model):
    """`study.prompts.trimmed_turns` rebuilds each turn's history from the engine's records: at a budget that holds
    every history nothing is trimmed, at one that holds only the first turns the later ones are, and either way each
    recorded prompt length is the one the rule cuts from the rebuilt history (a record altered by one id is not)."""
    sampling = SamplingConfig(max_new_tokens=10, temperature=0.7, top_p=0.8)
    whole, engine = run(model, "token", "baseline", sampling=sampling, max_context=1024)
    fresh, _ = run(model, "token", "resample", sampling=sampling, max_context=1024)
    budget = engine.life.max_prompt
    third = [r.turns[2].prompt_tokens for r in whole if len(r.turns) == 3]
    assert third and max(t.prompt_tokens for r in whole for t in r.turns) == max(third)
    counts = trimmed_turns(whole + fresh, model.sampler.render, budget)
    assert counts["baseline"] == {"turns": sum(len(r.turns) for r in whole), "trimmed": 0, "trimmed_by_turn": {},
                                  "longest_history": max(third), "mismatched": []}
    assert counts["resample"]["trimmed"] == 0 and counts["resample"]["mismatched"] == []

    tight = min(third) - 1  # every third turn over it, the second turns under it
    trimmed, engine = run(model, "token", "baseline", sampling=sampling,
                          max_context=tight + sampling.max_new_tokens)
    assert engine.life.max_prompt == tight
    later = [t.prompt_tokens for r in trimmed for t in r.turns[1:2]]
    assert later and max(later) <= tight
    counts = trimmed_turns(trimmed, model.sampler.render, tight)["baseline"]
    assert counts["mismatched"] == [] and counts["trimmed_by_turn"] == {3: len(third)}

    altered = trimmed[0].to_json()
    altered["turns"][0]["prompt_tokens"] += 1
    assert trimmed_turns([altered], model.sampler.render, tight)["baseline"]["mismatched"] == [
        [trimmed[0].problem_id, 1, altered["turns"][0]["prompt_tokens"], altered["turns"][0]["prompt_tokens"] - 1]]


def test_pool_smaller_than_the_decode_batch_is_refused(model):
    with pytest.raises(ValueError, match=r"sessions=2 must be at least the decode rows \(4"):
        TokenEngine(model, EngineConfig(method="baseline", rows=4, sessions=2))


def test_host_memory_releases_every_compiled_program_past_the_budget_and_trims_the_heap(model, monkeypatch):
    trims = []
    monkeypatch.setattr(host_memory, "trim_heap", lambda: trims.append(1))
    cfg, params = model.cfg, model.sampler.decode_params
    rows = empty_rows(cfg, 2, 64, 8, cache_dtype(params), pad_id=0)
    rows = prefill_row(params, rows, 0, [1] * 8, jax.random.key(0), cfg=cfg, pad_id=0)  # two programs: piece, write
    held = programs_held()
    assert held >= 2
    assert not HostMemory(0, trim_every_s=1e9).tend() and not HostMemory(held, trim_every_s=1e9).tend()
    assert trims == []
    assert not HostMemory(held, trim_every_s=0).tend() and len(trims) == 1  # a trim due, nothing to release
    assert HostMemory(held - 1, trim_every_s=1e9).tend() and programs_held() == 0 and len(trims) == 2


@pytest.mark.slow
def test_releasing_the_compiled_programs_changes_no_record(model):
    """A budget of six programs releases them all during the run: the programs compiled again are the same, so the
    sampled records are those of a run that keeps its programs. (Last in the module: a release makes every later
    test compile again.)"""
    sampling = SamplingConfig(max_new_tokens=10, temperature=0.7, top_p=0.8)
    kept, _ = run(model, "token", "rosa", sampling=sampling)
    released, engine = run(model, "token", "rosa", sampling=sampling, max_programs=6)
    assert trajectory(released) == trajectory(kept)
    np.testing.assert_allclose(step_norms(released), step_norms(kept), rtol=1e-5)
    assert engine.stats.programs_released >= 2 and engine.stats.updates > 0
