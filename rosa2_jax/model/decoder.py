"""The policy as pure functions of (params, tokens, adapters).

`decoder_hidden` runs the trunk (embedding, decoder layers, final norm) and returns hidden states;
`lm_logits` applies the LM head. Keeping the two apart lets callers project only the positions they
need (the last one during generation, chunks of the response in the ROSA update).

Shapes: B batch, T new tokens, S cache slots, L layers, d hidden, H query heads, K kv heads, D head_dim.
Layers are stacked along a leading L axis and run with `lax.scan`, so compile time does not grow
with depth.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jaxtyping import Array, Bool, Float, Int

from rosa2_jax.kernels.lora_matmul import lora_matmul, lora_matmul_reference
from rosa2_jax.model.config import ModelConfig
from rosa2_jax.model.lora import LoraAdapters
from rosa2_jax.model.params import Params

_MASKED = -1e30  # large finite negative: a fully masked (padding) query row stays finite.


@struct.dataclass
class KVCache:
    k: Float[Array, "L B K D S"]  # keys slot-minor: q @ k is a plain matmul per (row, kv head)
    v: Float[Array, "L B K S D"]
    valid: Bool[Array, "B S"]  # slot holds a real token

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, slots: int, dtype) -> "KVCache":
        k_shape = (cfg.num_layers, batch, cfg.num_kv_heads, cfg.head_dim, slots)
        v_shape = (cfg.num_layers, batch, cfg.num_kv_heads, slots, cfg.head_dim)
        return cls(jnp.zeros(k_shape, dtype), jnp.zeros(v_shape, dtype), jnp.zeros((batch, slots), bool))


def accumulation_dtype(dtype) -> jnp.dtype:
    """At least float32: bfloat16 accumulates in float32, float64 (x64 checks) stays float64."""
    return jnp.promote_types(dtype, jnp.float32)


def rms_norm(x: Float[Array, "... d"], weight: Float[Array, "d"], eps: float) -> Float[Array, "... d"]:
    xf = x.astype(accumulation_dtype(x.dtype))
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [D/2] (float32), with llama3 scaling when configured."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    inv = inv.astype(np.float32)
    rs = cfg.rope_scaling
    if rs is None:
        return inv
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(
    x: Float[Array, "B T N D"], positions: Int[Array, "B T"], inv_freq: np.ndarray
) -> Float[Array, "B T N D"]:
    freqs = positions[..., None].astype(accumulation_dtype(x.dtype)) * jnp.asarray(inv_freq)  # [B,T,D/2]
    cos = jnp.cos(jnp.concatenate([freqs, freqs], -1))[:, :, None, :].astype(x.dtype)
    sin = jnp.sin(jnp.concatenate([freqs, freqs], -1))[:, :, None, :].astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def attention(
    q: Float[Array, "B T H D"], k: Float[Array, "B S K D"], v: Float[Array, "B S K D"], mask: Bool[Array, "B T S"]
) -> Float[Array, "B T H*D"]:
    """Grouped-query attention; each group of H/K query heads shares one kv head."""
    B, T, H, D = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, H // K, D)
    acc = accumulation_dtype(q.dtype)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=acc) / math.sqrt(D)
    scores = jnp.where(mask[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(B, T, H * D)


def _linear(x, lp, la, name, scale, lora_kernel):
    if la is not None and name in la:
        matmul = lora_matmul if lora_kernel else lora_matmul_reference
        y = matmul(x, lp[name], *la[name], scale)
    else:
        y = x @ lp[name]
    if f"{name}_bias" in lp:
        y = y + lp[f"{name}_bias"]
    return y


def decode_attention(
    q: Float[Array, "B 1 H D"], k: Float[Array, "B 1 K D"], v: Float[Array, "B 1 K D"],
    cache_k: Float[Array, "B K D S"], cache_v: Float[Array, "B K S D"], cache_mask: Bool[Array, "B S"],
) -> Float[Array, "B 1 H*D"]:
    """One new token attending to the cached slots plus itself (the cache is read, never copied)."""
    B, _, H, D = q.shape
    K = k.shape[2]
    qg = q.reshape(B, K, H // K, D)
    acc = accumulation_dtype(q.dtype)
    s_cache = jnp.einsum("bkgd,bkds->bkgs", qg, cache_k, preferred_element_type=acc) / math.sqrt(D)
    s_cache = jnp.where(cache_mask[:, None, None, :], s_cache, _MASKED)
    s_self = jnp.einsum("bkgd,bkd->bkg", qg, k[:, 0], preferred_element_type=acc)[..., None] / math.sqrt(D)
    probs = jax.nn.softmax(jnp.concatenate([s_cache, s_self], -1), axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgs,bksd->bkgd", probs[..., :-1], cache_v) + probs[..., -1:] * v[:, 0, :, None, :]
    return out.reshape(B, 1, H * D)


def prefix_attention(
    q: Float[Array, "B T H D"], k: Float[Array, "B T K D"], v: Float[Array, "B T K D"],
    cache_k: Float[Array, "B K D S"], cache_v: Float[Array, "B K S D"], cache_mask: Bool[Array, "B S"],
    self_mask: Bool[Array, "B T T"],
) -> Float[Array, "B T H*D"]:
    """A chunk of new tokens attending to a cached prefix (the valid slots in `cache_mask`) and, causally, to
    itself: the prefill of a turn whose history is already in the cache."""
    B, T, H, D = q.shape
    K = k.shape[2]
    S = cache_k.shape[-1]
    qg = q.reshape(B, T, K, H // K, D)
    acc = accumulation_dtype(q.dtype)
    s_cache = jnp.einsum("btkgd,bkds->bkgts", qg, cache_k, preferred_element_type=acc) / math.sqrt(D)
    s_cache = jnp.where(cache_mask[:, None, None, None, :], s_cache, _MASKED)
    s_self = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=acc) / math.sqrt(D)
    s_self = jnp.where(self_mask[:, None, None], s_self, _MASKED)
    probs = jax.nn.softmax(jnp.concatenate([s_cache, s_self], -1), axis=-1).astype(v.dtype)
    out = (jnp.einsum("bkgts,bksd->btkgd", probs[..., :S], cache_v)
           + jnp.einsum("bkgts,bskd->btkgd", probs[..., S:], v))
    return out.reshape(B, T, H * D)


def decoder_hidden(
    params: Params,
    tokens: Int[Array, "B T"],
    positions: Int[Array, "B T"],
    valid: Bool[Array, "B T"],
    *,
    cfg: ModelConfig,
    cache: KVCache | None = None,
    cache_index: Int[Array, ""] | int = 0,
    adapters: LoraAdapters | None = None,
    remat: bool = False,
    lora_kernel: bool = False,
    layers: tuple[int, int] | None = None,
    inputs: Float[Array, "B T d"] | None = None,
    final_norm: bool = True,
    continue_prefix: bool = False,
) -> tuple[Float[Array, "B T d"], KVCache | None]:
    """Hidden states after the final norm (before it with `final_norm=False`).

    Without a cache: causal self-attention over `tokens` (teacher forcing).
    With a cache: the new tokens go to slots [cache_index, cache_index + T) (`cache_index` a scalar, or for
    a decode step one slot per row [B]). A chunk of T > 1 tokens
    is a prefill into an empty cache and attends to itself, or with `continue_prefix` it also attends
    to every valid slot before cache_index (a turn whose history is cached); a single token (a decode
    step) attends to every valid slot before it and to itself. Layers only emit their new k/v; the cache is
    written once after the layer scan, so a decode step never copies the cache.
    `valid` marks real tokens; padding is never attended to. `remat` recomputes each layer's
    activations when differentiating instead of storing them (used by the ROSA update). `lora_kernel`
    applies adapters with the Pallas kernel (forward only; GPU/TPU) instead of the jnp reference.
    `layers=(a, b)` runs only layers [a, b) (without a cache; `adapters` then cover those layers only),
    indexing the stacked weights in place rather than copying a slice of them; `inputs` replaces the
    embedding as the residual stream entering layer a. The ROSA update runs a trunk in two such parts.
    """
    B, T = tokens.shape
    inv_freq = rope_inv_freq(cfg)
    x = params["embed"][tokens] if inputs is None else inputs
    self_mask = jnp.tril(jnp.ones((T, T), bool))[None] & valid[:, None, :]
    decoding = cache is not None and T == 1
    extending = cache is not None and T > 1 and continue_prefix
    if decoding or extending:
        slots = jnp.arange(cache.valid.shape[1])
        old_mask = cache.valid & (slots[None, :] < jnp.reshape(cache_index, (-1, 1)))
    layer_adapters = adapters.per_layer() if adapters is not None else None
    scale = adapters.scale if adapters is not None else 1.0

    def layer(x, xs):
        lp, la, layer_cache = xs
        if layers is not None:  # lp is the layer's index into the stack
            lp = jax.tree.map(lambda w: w[lp], params["layers"])
        h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
        q = _linear(h, lp, la, "q", scale, lora_kernel).reshape(B, T, cfg.num_heads, cfg.head_dim)
        k = _linear(h, lp, la, "k", scale, lora_kernel).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
        v = _linear(h, lp, la, "v", scale, lora_kernel).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q = rms_norm(q, lp["q_norm"], cfg.rms_norm_eps)
            k = rms_norm(k, lp["k_norm"], cfg.rms_norm_eps)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        if decoding:
            o = decode_attention(q, k, v, *layer_cache, old_mask)
        elif extending:
            o = prefix_attention(q, k, v, *layer_cache, old_mask, self_mask)
        else:
            o = attention(q, k, v, self_mask)
        x = x + _linear(o, lp, la, "o", scale, lora_kernel)
        h = rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
        gated = jax.nn.silu(_linear(h, lp, la, "gate", scale, lora_kernel)) * _linear(h, lp, la, "up", scale, lora_kernel)
        x = x + _linear(gated, lp, la, "down", scale, lora_kernel)
        return x, ((k, v) if cache is not None else None)

    layer_caches = (cache.k, cache.v) if decoding or extending else None
    x, new_kv = jax.lax.scan(jax.checkpoint(layer) if remat else layer, x,
                             (params["layers"] if layers is None else jnp.arange(*layers), layer_adapters,
                              layer_caches))
    if final_norm:
        x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    if cache is None:
        return x, None
    new_k = jnp.transpose(new_kv[0], (0, 1, 3, 4, 2)).astype(cache.k.dtype)  # [L,B,T,K,D] -> [L,B,K,D,T]
    new_v = jnp.transpose(new_kv[1], (0, 1, 3, 2, 4)).astype(cache.v.dtype)  # -> [L,B,K,T,D]
    if jnp.ndim(cache_index) == 0:
        new_cache = KVCache(
            k=jax.lax.dynamic_update_slice(cache.k, new_k, (0, 0, 0, 0, cache_index)),
            v=jax.lax.dynamic_update_slice(cache.v, new_v, (0, 0, 0, cache_index, 0)),
            valid=jax.lax.dynamic_update_slice(cache.valid, valid, (0, cache_index)),
        )
    else:  # one token per row, each at its own slot (the token-level engine's rows are at different lengths)
        rows = jnp.arange(B)
        new_cache = KVCache(k=cache.k.at[:, rows, :, :, cache_index].set(jnp.moveaxis(new_k[..., 0], 1, 0)),
                            v=cache.v.at[:, rows, :, cache_index].set(jnp.moveaxis(new_v[..., 0, :], 1, 0)),
                            valid=cache.valid.at[rows, cache_index].set(valid[:, 0]))
    return x, new_cache


def head_weight(params: Params, cfg: ModelConfig) -> Float[Array, "d V"]:
    """The LM head as a (d, V) matrix (the transposed embedding when tied)."""
    return params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]


def lm_logits(params: Params, hidden: Float[Array, "... d"], cfg: ModelConfig) -> Float[Array, "... V"]:
    """LM head, accumulated in (at least) float32."""
    w = head_weight(params, cfg)
    return jnp.einsum("...d,dv->...v", hidden, w, preferred_element_type=accumulation_dtype(w.dtype))


def positions_from_valid(valid: Bool[Array, "B T"]) -> Int[Array, "B T"]:
    """RoPE positions for left-padded rows: 0 at each row's first real token."""
    return jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)


def forward(
    params: Params,
    tokens: Int[Array, "B T"],
    valid: Bool[Array, "B T"],
    *,
    cfg: ModelConfig,
    adapters: LoraAdapters | None = None,
) -> Float[Array, "B T V"]:
    """pi(x, theta): next-token logits at every position of left-padded rows."""
    hidden, _ = decoder_hidden(
        params, tokens, positions_from_valid(valid), valid, cfg=cfg, adapters=adapters
    )
    return lm_logits(params, hidden, cfg)
