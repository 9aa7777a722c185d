"""The ROSA weights update (spec 1.2, 1.6): one damped Gauss-Newton step toward pi* ∝ pi · exp(r/β).

Rows of the Jacobian are the next-token distributions p_i = softmax(W_U h_i) at the response positions,
teacher-forced on the full history; columns are the session's adapter parameters. With J_h = ∂h/∂θ and
A_i = diag(p_i) - p_i p_iᵀ:

    J v  = [A_i W_U (J_h v)_i]_i          Jᵀ u = J_hᵀ [W_Uᵀ A_i u_i]_i

so the solve only ever needs J_h through `jax.linearize` / `jax.linear_transpose` and a d x d "head
metric" W_Uᵀ A_i² W_U applied in hidden space. The vocabulary is streamed through the head in chunks of
positions: no [T, V] tensor of a whole response is ever held.

`rosa_update` is jit-compiled and vmapped over sessions; sessions that are inactive (r = +1, finished)
or whose step is not finite keep their adapter bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Bool, Float, Int
from optax.tree_utils import tree_add_scale, tree_vdot, tree_zeros_like

from rosa2_jax.model.config import ModelConfig
from rosa2_jax.model.decoder import (Params, accumulation_dtype, decoder_hidden, head_weight, narrow_trunk,
                                    positions_from_valid)
from rosa2_jax.model.lora import LoraAdapters

TILTS = ("token", "suffix")  # spec Option B (default), Option A
RESIDUALS = ("prob", "logit")
TRUNK_DTYPES = ("bfloat16",)  # besides None, the params' own dtype


@dataclasses.dataclass(frozen=True)
class RosaConfig:
    beta: float = 1.0  # KL temperature; r = -1 tilts the sampled token by exp(-1/β)
    tilt: str = "token"  # "token": every sampled token tilted by exp(r/β); "suffix": exact sequence marginal
    residual: str = "prob"  # "prob": R = p* - p (ROSA2 Eq. 11); "logit": centred log-prob residual
    damping: float = 1e-4  # λ = damping · mean diag(JᵀJ) ("relative") or λ = damping ("fixed")
    damping_mode: str = "relative"
    cg_iters: int = 10
    cg_tol: float = 1e-3  # stop when ||b - A x|| <= cg_tol · ||b||
    step_scale: float = 1.0  # η
    max_step_norm: float = 1.0  # trust region on ||Δθ||
    position_chunk: int = 64  # positions per pass through the LM head
    remat: bool = True  # recompute layer activations in the JVP/VJP instead of storing them
    store_up_to: int = 0  # with remat, still store them in a pass of at most this many tokens (sessions x row)
    head_top_k: int = 0  # head metric inside CG on each row's top-k tokens + its sampled one (0 = exact)
    backtrack: int = 0  # halve a step that raises KL(p*||p) up to this many times, else keep the adapter
    session_batch: int = 0  # sessions solved together in one vmap, chunks one after another (0 = all at once)
    trunk_dtype: str | None = None  # the layers' matmul weights: None as stored, "bfloat16" by narrow_matmul

    def __post_init__(self):
        if self.tilt not in TILTS or self.residual not in RESIDUALS:
            raise ValueError(f"tilt must be one of {TILTS} and residual one of {RESIDUALS}; got {self}")
        if self.damping_mode not in ("relative", "fixed") or self.beta <= 0:
            raise ValueError(f"damping_mode must be relative|fixed and beta > 0; got {self}")
        if self.trunk_dtype not in (None, *TRUNK_DTYPES):
            raise ValueError(f"trunk_dtype must be None or one of {TRUNK_DTYPES}; got {self.trunk_dtype!r}")
        if min(self.head_top_k, self.backtrack, self.session_batch, self.store_up_to) < 0 or self.cg_iters < 1:
            raise ValueError("head_top_k, backtrack, session_batch and store_up_to must be >= 0 and cg_iters >= 1; "
                             f"got {self}")

    def for_pass(self, sessions: int, tokens: int) -> "RosaConfig":
        """This config for a batch of `sessions` rows of `tokens`: remat decided for one pass (session_batch
        rows at a time)."""
        rows = self.session_batch if 0 < self.session_batch < sessions else sessions
        return dataclasses.replace(self, remat=self.remat and rows * tokens > self.store_up_to)


@struct.dataclass
class UpdateBatch:
    """One row per session: left-padded [history ; response] tokens.

    The response is the last `response_len[s]` tokens of row s; `window` (static, >= every
    response_len, a multiple of RosaConfig.position_chunk) is how many trailing tokens are rows of J.
    """

    tokens: Int[Array, "S T"]
    valid: Bool[Array, "S T"]
    response_len: Int[Array, "S"]
    reward: Float[Array, "S"]
    active: Bool[Array, "S"]
    window: int = struct.field(pytree_node=False)


@struct.dataclass
class UpdateStats:
    step_norm_sq: Float[Array, "S"]  # ||Δθ||² of the applied step (0 where not updated)
    residual_norm: Float[Array, "S"]  # ||R|| over response positions
    cg_iters: Int[Array, "S"]
    cg_rel_residual: Float[Array, "S"]  # ||JᵀR - (JᵀJ + λ)Δθ|| / ||JᵀR|| at exit
    kl_before: Float[Array, "S"]  # mean over response positions of KL(p*_i || p_i(θ))
    kl_after: Float[Array, "S"]  # ... of KL(p*_i || p_i(θ + ηΔθ))
    logp_before: Float[Array, "S"]  # mean log p_i(y_i) of the judged response under θ
    logp_after: Float[Array, "S"]  # ... under the adapter kept
    damping: Float[Array, "S"]
    backtracks: Int[Array, "S"]  # halvings applied to the step (RosaConfig.backtrack)
    rejected: Bool[Array, "S"]  # every tried step raised KL; the adapter was kept
    nonfinite: Bool[Array, "S"]  # the step was not finite; the adapter was kept
    updated: Bool[Array, "S"]


# ---------------------------------------------------------------- the solver
def conjugate_gradient(matvec, b, maxiter: int, tol: float):
    """CG from x0 = 0 (iterates stay in range(Jᵀ)). Returns (x, iterations, relative residual)."""
    b_norm = jnp.sqrt(tree_vdot(b, b))
    x0 = tree_zeros_like(b)
    rs0 = tree_vdot(b, b)

    def cond(state):
        i, _, _, _, rs = state
        return (i < maxiter) & (jnp.sqrt(rs) > tol * b_norm)

    def body(state):
        i, x, r, p, rs = state
        ap = matvec(p)
        alpha = rs / tree_vdot(p, ap)
        x = tree_add_scale(x, alpha, p)
        r = tree_add_scale(r, -alpha, ap)
        rs_new = tree_vdot(r, r)
        p = tree_add_scale(r, rs_new / rs, p)
        return i + 1, x, r, p, rs_new

    i, x, _, _, rs = jax.lax.while_loop(cond, body, (jnp.int32(0), x0, b, b, rs0))
    return x, i, jnp.where(b_norm > 0, jnp.sqrt(rs) / jnp.where(b_norm > 0, b_norm, 1.0), 0.0)


# ---------------------------------------------------------------- head geometry (vocabulary side)
def _map_chunks(fn, chunk: int, *arrays):
    """fn over consecutive position chunks of [W, ...] arrays; outputs stacked on a leading chunk axis."""
    return jax.lax.map(lambda xs: fn(*xs), tuple(a.reshape((-1, chunk) + a.shape[1:]) for a in arrays))


def _chunked(fn, chunk: int, *arrays):
    """Apply fn to consecutive position chunks of [W, ...] arrays and concatenate the results."""
    return jax.tree.map(lambda o: o.reshape((-1,) + o.shape[2:]), _map_chunks(fn, chunk, *arrays))


def _softmax_lse_chunk(h, w):
    """(softmax, log-sum-exp) of one chunk's logits; the softmax as `jax.nn.softmax` computes it."""
    logits = jnp.dot(h, w, preferred_element_type=w.dtype)
    top = jnp.max(logits, axis=-1, keepdims=True)
    unnormalized = jnp.exp(logits - top)
    total = jnp.sum(unnormalized, axis=-1, keepdims=True)
    return unnormalized / total, (top + jnp.log(total))[:, 0]


def _softmax_chunk(h, w):
    return _softmax_lse_chunk(h, w)[0]


def _target_prob(p, y):
    return jnp.take_along_axis(p, y[:, None], axis=-1)[:, 0]


def suffix_tilt_log_weights(logp_y: Float[Array, "W"], row_mask: Bool[Array, "W"], reward, rosa: RosaConfig):
    """log w_i, the factor multiplying p_i[y_i] in the target p*_i, of the suffix tilt (spec Option A)."""
    lp = jnp.where(row_mask, logp_y, 0.0)
    suffix = jnp.cumsum(lp[::-1])[::-1] - lp  # Σ_{j>i} log p_j[y_j]
    return jnp.log1p(-jnp.exp(suffix) * (1.0 - jnp.exp(reward / rosa.beta)))


def _tilted_residual(p, y, log_w):
    """(R = p* - p, log Z, p_y) for one chunk; p*_i ∝ p_i with p_i[y_i] multiplied by w_i."""
    w = jnp.exp(log_w)
    p_y = _target_prob(p, y)
    z = 1.0 + p_y * (w - 1.0)
    onehot = jax.nn.one_hot(y, p.shape[-1], dtype=p.dtype)
    resid = p * (1.0 / z - 1.0)[:, None] + onehot * (p_y * (w - 1.0) / z)[:, None]
    return resid, jnp.log(z), p_y


def _softmax_jacobian(p, u):
    """A u with A = diag(p) - p pᵀ, without forming A."""
    return p * (u - jnp.sum(p * u, axis=-1, keepdims=True))


def vocab_support(p: Float[Array, "C V"], y: Int[Array, "C"], top_k: int) -> Int[Array, "C k"]:
    """Each row's top-k tokens plus its sampled one (all V tokens when top_k >= V - 1)."""
    k = min(top_k + 1, p.shape[-1])
    boosted = p.at[jnp.arange(p.shape[0]), y].set(2.0)  # probabilities are <= 1: the sampled token comes first
    return jax.lax.top_k(boosted, k)[1]


class HeadTerms(NamedTuple):
    """What the vocabulary side contributes, per row, in hidden space."""

    rhs_rows: Float[Array, "W d"]  # W_Uᵀ A_i R_i (prob) or the centred-logit equivalent
    residual_sq: Float[Array, "W"]
    kl: Float[Array, "W"]  # KL(p*_i || p_i)
    log_w: Float[Array, "W"]
    logp_y: Float[Array, "W"]  # log p_i[y_i]
    metric: Callable[[Array], Array]  # g [W, d] -> per-row W_Uᵀ A_i² W_U g_i (masked)
    target_mean: Float[Array, "W d"]  # W_U p*_i: the target's expected unembedding, for a tried step's KL
    log_normalizer: Float[Array, "W"]  # log Σ_v exp(W_U h_i)_v at θ


def centred_head_gram(w_head: Float[Array, "d V"]) -> Float[Array, "d d"]:
    """W_Uᵀ (I - 11ᵀ/V) W_U: the metric of centred logits (the same for every row)."""
    w_mean = jnp.mean(w_head, axis=1)
    return w_head @ w_head.T - w_head.shape[1] * jnp.outer(w_mean, w_mean)


def head_terms(h, targets, row_mask, reward, w_head, rosa: RosaConfig) -> HeadTerms:
    """Exact full-vocabulary right-hand side, residual and KL; the metric exact or on a top-k support."""
    C = rosa.position_chunk
    # Pass 1, for the suffix tilt only: it needs every log p_i[y_i] before any residual.
    if rosa.tilt == "token":
        log_w = jnp.full(targets.shape, reward / rosa.beta, h.dtype)
    else:
        logp_y = _chunked(lambda hc, yc: jnp.log(_target_prob(_softmax_chunk(hc, w_head), yc)), C, h, targets)
        log_w = suffix_tilt_log_weights(logp_y, row_mask > 0, reward, rosa)
    truncated = rosa.residual == "prob" and rosa.head_top_k > 0

    # Pass 2: the right-hand side in hidden space, ||R_i||², KL(p*_i || p_i) and the metric's support.
    def rhs_chunk(hc, yc, lwc, mask):
        p, lse = _softmax_lse_chunk(hc, w_head)
        resid, log_z, p_y = _tilted_residual(p, yc, lwc)
        kl = -log_z + p_y * jnp.exp(lwc - log_z) * lwc
        if rosa.residual == "prob":
            # one product for both: XLA CPU contracts over the vocabulary faster with more rows
            both = jnp.dot(jnp.concatenate([_softmax_jacobian(p, resid), p + resid]), w_head.T)
            rhs, target_mean = both[:hc.shape[0]] * mask[:, None], both[hc.shape[0]:]
            r2 = jnp.sum(resid * resid, -1)
        else:  # centred log-prob residual log w_i (e_y - 1/V): Jᵀ R = log w_i (W_U[y] - mean_v W_U[v])
            rhs = lwc[:, None] * (w_head.T[yc] - jnp.mean(w_head, axis=1)) * mask[:, None]
            target_mean = jnp.dot(p + resid, w_head.T)
            r2 = lwc**2 * (1.0 - 1.0 / p.shape[-1])
        terms = (rhs, r2 * mask, kl * mask, jnp.log(p_y), target_mean, lse)
        if not truncated:
            return terms
        support = vocab_support(p, yc, rosa.head_top_k)
        return terms + (support, jnp.take_along_axis(p, support, -1))

    rhs_rows, r2, kl, logp_y, target_mean, lse, *support_terms = _chunked(rhs_chunk, C, h, targets, log_w, row_mask)

    if truncated:  # computed once per update: each CG product is then O(W k d), not O(W V d)
        support, p_support = support_terms
        w_support = jnp.take(w_head.T, support, axis=0)  # [W, k, d]

        def metric(g):
            u = jnp.einsum("wkd,wd->wk", w_support, g)
            a = _softmax_jacobian(p_support, _softmax_jacobian(p_support, u))
            return jnp.einsum("wk,wkd->wd", a, w_support) * row_mask[:, None]
    elif rosa.residual == "prob":
        def metric(g):  # W_Uᵀ A_i² W_U g_i per row, chunked over positions
            def chunk(hc, gc, mask):
                p = _softmax_chunk(hc, w_head)
                a = _softmax_jacobian(p, _softmax_jacobian(p, jnp.dot(gc, w_head)))
                return jnp.dot(a, w_head.T) * mask[:, None]
            return _chunked(chunk, C, h, g, row_mask)
    else:
        centred = centred_head_gram(w_head)

        def metric(g):
            return (g @ centred) * row_mask[:, None]

    return HeadTerms(rhs_rows, r2, kl, log_w, logp_y, metric, target_mean, lse)


# ---------------------------------------------------------------- one session
class ResponseWindow(NamedTuple):
    """The rows of J: the last `window` positions of one session's [history ; response] row."""

    hidden: Callable[[Any], Array]  # adapters (or None) -> hidden rows [W, d] in the accumulation dtype
    targets: Int[Array, "W"]  # row i predicts targets[i]
    row_mask: Float[Array, "W"]  # 1 on response tokens
    w_head: Float[Array, "d V"]
    inputs: Float[Array, "T d"] | None  # the residual stream entering the first adapted layer (None: layer 0)


def response_window(params, tokens, valid, response_len, *, cfg: ModelConfig, window: int, remat: bool,
                    first_layer: int = 0) -> ResponseWindow:
    """`hidden(θ)` (θ: one session's LoraAdapters, or None) runs layers [first_layer, L) only: the layers
    below hold no adapter, so they run once here, without tangents or remat, and every JVP/VJP starts
    from their output."""
    T, W = tokens.shape[0], window
    positions = positions_from_valid(valid[None])
    acc = accumulation_dtype(params["embed"].dtype)  # float32 (float64 in x64 checks)
    inputs, upper = None, None
    if first_layer > 0:
        inputs, _ = decoder_hidden(params, tokens[None], positions, valid[None], cfg=cfg, layers=(0, first_layer),
                                   final_norm=False)
        upper = (first_layer, cfg.num_layers)

    def hidden(th):
        adapters = None if th is None else LoraAdapters(jax.tree.map(lambda x: x[None], th.factors),
                                                        th.scale).from_layer(first_layer)
        h, _ = decoder_hidden(params, tokens[None], positions, valid[None], cfg=cfg, adapters=adapters, remat=remat,
                              layers=upper, inputs=inputs)
        return h[0, T - W - 1: T - 1].astype(acc)  # row i predicts tokens[T - W + i]

    return ResponseWindow(hidden, tokens[T - W:], (jnp.arange(W) >= W - response_len).astype(acc),
                          head_weight(params, cfg).astype(acc), None if inputs is None else inputs[0])


class GaussNewtonSystem(NamedTuple):
    """The damped normal equations of one session, matrix-free: (gram + damping·I) Δθ = rhs, rhs = JᵀR,
    gram(v) = JᵀJ v, with the response window and head terms they were built from."""

    rhs: Any  # pytree like theta
    gram: Callable[[Any], Any]
    damping: Array
    window: ResponseWindow
    hidden: Float[Array, "W d"]  # at the current θ
    head: HeadTerms


def gauss_newton_system(params, theta: LoraAdapters, tokens, valid, response_len, reward, *, cfg: ModelConfig,
                        rosa: RosaConfig, window: int) -> GaussNewtonSystem:
    win = response_window(params, tokens, valid, response_len, cfg=cfg, window=window, remat=rosa.remat,
                          first_layer=theta.first_layer)
    h, jvp = jax.linearize(win.hidden, theta)
    vjp = jax.linear_transpose(jvp, theta)

    head = head_terms(h, win.targets, win.row_mask, reward, win.w_head, rosa)

    def gram(v):
        (out,) = vjp(head.metric(jvp(v)))
        return out

    (rhs,) = vjp(head.rhs_rows)
    if rosa.damping_mode == "relative":  # Hutchinson: E[zᵀ JᵀJ z] = trace(JᵀJ) for Rademacher z
        leaves, treedef = jax.tree.flatten(theta)
        keys = jax.random.split(jax.random.key(0), len(leaves))
        z = jax.tree.unflatten(treedef, [jax.random.rademacher(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
        gz = jvp(z)
        n_params = sum(x.size for x in leaves)
        damping = rosa.damping * jnp.sum(gz * head.metric(gz)) / n_params + 1e-12
    else:
        damping = jnp.asarray(rosa.damping, h.dtype)
    return GaussNewtonSystem(rhs, gram, damping, win, h, head)


def kl_to_target(head: HeadTerms, hidden_old, hidden_new, targets, row_mask, w_head, chunk: int):
    """(KL(p*_i || p_i(θ')), log p_i(θ')[y_i]) per row, p* the target `head` was built for at `hidden_old`.
    Exact over the full vocabulary from the new logits alone: with z = W_U h and Σ_v p*_v = 1,

        KL(p* || p(θ')) = KL(p* || p(θ)) + (lse(z') - lse(z)) - (h' - h) · W_U p*,

    which needs neither the old softmax again nor a difference of two full-vocabulary sums."""
    def one(hc, hnc, yc, mean, lse_old, kl_old, mask):
        logits = jnp.dot(hnc, w_head, preferred_element_type=w_head.dtype)
        lse = jax.nn.logsumexp(logits, axis=-1)
        kl = kl_old + (lse - lse_old) - jnp.sum((hnc - hc) * mean, -1)
        return kl * mask, (_target_prob(logits, yc) - lse) * mask

    return _chunked(one, chunk, hidden_old, hidden_new, targets, head.target_mean, head.log_normalizer, head.kl,
                    row_mask)


def _finish(theta, delta, iters, rel, active, system: GaussNewtonSystem, hidden_at: Callable[[Any], Array],
            rosa: RosaConfig):
    """Trust region, step with backtracking, non-finite guard and stats; shared by both adapter kinds.

    `hidden_at(θ')` gives the response window's hidden rows under θ'. With rosa.backtrack > 0 a step that
    does not lower the mean KL(p*||p) is halved up to that many times; if none does, the adapter is kept.
    """
    head, row_mask = system.head, system.window.row_mask

    def evaluate(new_theta):
        return kl_to_target(head, system.hidden, hidden_at(new_theta), system.window.targets, row_mask,
                            system.window.w_head, rosa.position_chunk)

    norm = jnp.sqrt(tree_vdot(delta, delta))
    shrink = jnp.minimum(1.0, rosa.max_step_norm / jnp.maximum(norm, 1e-30))  # trust region
    step = jax.tree.map(lambda d: rosa.step_scale * shrink * d, delta)
    n_rows = jnp.maximum(jnp.sum(row_mask), 1.0)
    kl_before = jnp.sum(head.kl) / n_rows
    logp_before = jnp.sum(head.logp_y * row_mask) / n_rows

    def try_step(halvings):
        kl_rows, logp_rows = evaluate(tree_add_scale(theta, 0.5 ** halvings, step))
        return jnp.sum(kl_rows) / n_rows, jnp.sum(logp_rows) / n_rows

    kl_new, logp_new = try_step(0)
    halvings = jnp.int32(0)
    improved = jnp.bool_(True)
    if rosa.backtrack > 0:
        def cond(state):
            j, kl, _ = state
            return (j < rosa.backtrack) & ~(kl <= kl_before)

        def body(state):
            j = state[0] + 1
            return (j, *try_step(j.astype(kl_before.dtype)))

        halvings, kl_new, logp_new = jax.lax.while_loop(cond, body, (halvings, kl_new, logp_new))
        improved = kl_new <= kl_before
    factor = 0.5 ** halvings.astype(kl_before.dtype)
    step = jax.tree.map(lambda d: factor * d, step)
    new_theta = jax.tree.map(jnp.add, theta, step)
    step_norm_sq = tree_vdot(step, step)
    finite = jnp.isfinite(step_norm_sq) & jnp.isfinite(kl_new) & jnp.isfinite(rel)
    updated = active & finite & improved
    stats = UpdateStats(
        step_norm_sq=jnp.where(updated, step_norm_sq, 0.0),
        residual_norm=jnp.sqrt(jnp.sum(head.residual_sq)),
        cg_iters=jnp.asarray(iters, jnp.int32),
        cg_rel_residual=rel,
        kl_before=kl_before,
        kl_after=jnp.where(updated, kl_new, kl_before),
        logp_before=logp_before,
        logp_after=jnp.where(updated, logp_new, logp_before),
        damping=system.damping,
        backtracks=jnp.where(active & finite, halvings, 0),
        rejected=active & finite & ~improved,
        nonfinite=active & ~finite,
        updated=updated,
    )
    # where(False, new, old) returns old exactly: inactive, rejected and non-finite sessions keep their bits.
    return jax.tree.map(lambda new, old: jnp.where(updated, new, old), new_theta, theta), stats


def _session_update(params, theta: LoraAdapters, tokens, valid, response_len, reward, active, *, cfg: ModelConfig,
                    rosa: RosaConfig, window: int):
    system = gauss_newton_system(params, theta, tokens, valid, response_len, reward, cfg=cfg, rosa=rosa,
                                 window=window)
    delta, iters, rel = conjugate_gradient(lambda v: tree_add_scale(system.gram(v), system.damping, v), system.rhs,
                                           rosa.cg_iters, rosa.cg_tol)
    return (*_finish(theta, delta, iters, rel, active, system, system.window.hidden, rosa), system.window.inputs)


def _over_sessions(session_fn, params, theta, batch: UpdateBatch, rosa: RosaConfig):
    """vmap a one-session update over the batch's sessions (params shared), `rosa.session_batch` sessions at a
    time (`lax.map`): a session's update is big matmuls over its whole history, so on a CPU the chunks cost
    what one vmap does, and only one chunk's activations are alive at once (which lets them be stored)."""
    if batch.window % rosa.position_chunk:
        raise ValueError(f"window {batch.window} must be a multiple of position_chunk {rosa.position_chunk}")
    xs = (theta, batch.tokens, batch.valid, batch.response_len, batch.reward, batch.active)
    one = functools.partial(session_fn, narrow_trunk(params, rosa.trunk_dtype))
    if 0 < rosa.session_batch < batch.tokens.shape[0]:
        return jax.lax.map(lambda x: one(*x), xs, batch_size=rosa.session_batch)
    return jax.vmap(one)(*xs)


@functools.partial(jax.jit, static_argnames=("cfg", "rosa", "layer_inputs"))
def rosa_update(params: Params, adapters: LoraAdapters, batch: UpdateBatch, *, cfg: ModelConfig,
                rosa: RosaConfig, layer_inputs: bool = False):
    """One ROSA step for every session (vmapped); only active sessions change. Returns (adapters, stats), and
    with `layer_inputs` also the residual stream entering `adapters.first_layer` at every token of the batch
    [S, T, d] (the frozen layers' output, which the step computes anyway; None when every layer is adapted): the
    token engine recomputes a session's cached keys/values from it in the adapted layers only."""
    rosa = rosa.for_pass(*batch.tokens.shape)
    fn = functools.partial(_session_update, cfg=cfg, rosa=rosa, window=batch.window)
    new, stats, inputs = _over_sessions(fn, params, adapters, batch, rosa)
    return (new, stats, inputs) if layer_inputs else (new, stats)


# ---------------------------------------------------------------- hidden-state offset variant ("HS")
def support_gram(h, targets, row_mask, w_head, top_k: int, chunk: int) -> Float[Array, "d d"]:
    """Σ_i W_Uᵀ A_i² W_U with A_i restricted to row i's top-k tokens plus its sampled token.

    Exact when top_k >= V - 1; otherwise the truncation the spec allows (k >= 64) to form a d x d matrix.
    """
    def one(hc, yc, mask):
        p = _softmax_chunk(hc, w_head)
        idx = vocab_support(p, yc, top_k)
        pk = jnp.take_along_axis(p, idx, -1)
        a = jax.vmap(jnp.diag)(pk) - pk[:, :, None] * pk[:, None, :]  # A_i on the support [C, k, k]
        m = jnp.einsum("cjk,ckd->cjd", a, w_head.T[idx])  # A_i W_Kᵀ [C, k, d]
        return jnp.einsum("cjd,cje,c->de", m, m, mask)

    return jnp.sum(_map_chunks(one, chunk, h, targets, row_mask), axis=0)


def _offset_session_update(params, delta, tokens, valid, response_len, reward, active, *, cfg: ModelConfig,
                           rosa: RosaConfig, window: int, top_k: int):
    win = response_window(params, tokens, valid, response_len, cfg=cfg, window=window, remat=False)
    h0 = win.hidden(None)
    acc = h0.dtype
    head = head_terms(h0 + delta, win.targets, win.row_mask, reward, win.w_head, rosa)  # J_h = I: θ is the offset
    rhs = jnp.sum(head.rhs_rows, axis=0)
    if rosa.residual == "prob":
        gram = support_gram(h0 + delta, win.targets, win.row_mask, win.w_head, top_k, rosa.position_chunk)
    else:
        gram = jnp.sum(win.row_mask) * centred_head_gram(win.w_head)
    d = gram.shape[0]
    damping = (rosa.damping * jnp.trace(gram) / d + 1e-12 if rosa.damping_mode == "relative"
               else jnp.asarray(rosa.damping, acc))
    system = gram + damping * jnp.eye(d, dtype=acc)
    step = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(system), rhs)
    rel = jnp.linalg.norm(rhs - system @ step) / jnp.maximum(jnp.linalg.norm(rhs), 1e-30)

    solved = GaussNewtonSystem(rhs, lambda v: gram @ v, damping, win, h0 + delta, head)
    return _finish(delta, step, 0, rel, active, solved, lambda new_delta: h0 + new_delta, rosa)


@functools.partial(jax.jit, static_argnames=("cfg", "rosa", "top_k"))
def hidden_offset_update(params: Params, offsets: Float[Array, "S d"], batch: UpdateBatch, *, cfg: ModelConfig,
                         rosa: RosaConfig, top_k: int = 64) -> tuple[Float[Array, "S d"], UpdateStats]:
    """ROSA with θ = an offset added to the final hidden state (before the LM head) on response positions.

    J_h = I, so JᵀJ = Σ_i W_Uᵀ A_i² W_U is d x d: formed on a top-k support and solved by Cholesky.
    """
    fn = functools.partial(_offset_session_update, cfg=cfg, rosa=rosa, window=batch.window, top_k=top_k)
    return _over_sessions(fn, params, offsets, batch, rosa)
