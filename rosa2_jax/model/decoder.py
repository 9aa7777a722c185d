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
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec
from jaxtyping import Array, Bool, Float, Int

from rosa2_jax.kernels import amx_matmul, fma_matmul
from rosa2_jax.kernels.decode_attention import KERNEL_HEAD_DIM, buffered_decode_attention
from rosa2_jax.kernels.lora_matmul import lora_delta, lora_matmul, lora_matmul_reference
from rosa2_jax.model.config import ModelConfig
from rosa2_jax.model.lora import LoraAdapters
from rosa2_jax.model.narrow_matmul import weight_matmul
from rosa2_jax.model.params import Params

_MASKED = -1e30  # large finite negative: a fully masked (padding) query row stays finite.
# Query rows per block of attention over a chunk's own tokens (teacher forcing and prefill); on the 0.5B's fast
# Weights step at T = 1,024: one block 40 s, 128 rows 27-29 s, 64 rows 26 s with 1.5x the compile time
# (BUILD_NOTES.md, "The Weights step").
QUERY_BLOCK = 128
# Query rows per block of a prefill piece's attention over a cached prefix (`prefix_attention`); 512 queries over
# 2,048 slots on the 0.5B's shapes: blocks of 32 / 64 / 128 rows 50 / 47 / 61 ms a layer.
PREFIX_QUERY_BLOCK = 64


@struct.dataclass
class KVCache:
    """One array per layer rather than one stacked [L, ...] array: a layer reads and writes its own buffer, where
    slicing a stacked cache copies the layer's part on every step (XLA CPU)."""

    k: tuple[Float[Array, "B K D S"], ...]  # L layers; keys slot-minor: q @ k is a plain matmul per (row, kv head)
    v: tuple[Float[Array, "B K S D"], ...]
    valid: Bool[Array, "B S"]  # slot holds a real token

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, slots: int, dtype) -> "KVCache":
        k_shape = (batch, cfg.num_kv_heads, cfg.head_dim, slots)
        v_shape = (batch, cfg.num_kv_heads, slots, cfg.head_dim)
        return cls(tuple(jnp.zeros(k_shape, dtype) for _ in range(cfg.num_layers)),
                   tuple(jnp.zeros(v_shape, dtype) for _ in range(cfg.num_layers)), jnp.zeros((batch, slots), bool))

    def map(self, k_fn, v_fn, valid: Bool[Array, "B S"]) -> "KVCache":
        """Every layer's keys through `k_fn` and values through `v_fn`, with the new `valid`."""
        return KVCache(tuple(map(k_fn, self.k)), tuple(map(v_fn, self.v)), valid)


LINEARS = ("q", "k", "v", "o", "gate", "up", "down")


class Packing(NamedTuple):
    """A CPU matmul kernel's packing of a bfloat16 [out, in] weight: which weights it takes, how they are packed,
    x times the packed weight's transpose (float32), and what `generation.decode_path` records of it."""
    packable: Callable[[Array], bool]
    pack: Callable[[Array], Array]
    matmul: Callable[[Array, Array], Array]
    path: str


# decode_layout's packings, by the suffix a packed weight is kept under.
PACKINGS = {"tiles": Packing(amx_matmul.packable, amx_matmul.pack_tiles, amx_matmul.amx_matmul, "-amx"),
            "panels": Packing(fma_matmul.packable, fma_matmul.pack_panels, fma_matmul.fma_matmul, "-fma-matmul")}
LAYOUT_SUFFIXES = ("_t", *(f"_{packing}" for packing in PACKINGS))


def matmul_packing() -> str | None:
    """How `decode_layout` packs bfloat16 matmul weights on this CPU: "tiles" for the AMX kernel where it runs
    (`amx_matmul.amx_ready`), else "panels" for the FMA kernel (`fma_matmul.fma_matmul_simd`: AVX-512 or AVX2),
    else None (XLA's matmul)."""
    if amx_matmul.amx_ready():
        return "tiles"
    return "panels" if fma_matmul.fma_matmul_simd() else None


def linear_name(name: str) -> str:
    """A decode_layout weight's linear ("up" for "up_t", "up_tiles" or "up_panels")."""
    for suffix in LAYOUT_SUFFIXES:
        if name.endswith(suffix) and name.removesuffix(suffix) in LINEARS:
            return name.removesuffix(suffix)
    return name


def decode_layout(params: Params, dtype=None, *, out_in: bool | None = None, pack: str | None = "auto") -> Params:
    """The weights as generation runs fastest on them, measured on XLA CPU (BUILD_NOTES.md, "The decode step against its roofline"):

    - `layers` a tuple of per-layer dicts: slicing the stacked [L, ...] weights inside a decode step copies every
      layer's weights once per token (44% of a 0.5B step);
    - with `out_in` (default: on a CPU backend) each matmul weight stored transposed, [out, in], under `<name>_t`,
      and the LM head as `head_t` [V, d] (the embedding itself when tied): XLA CPU's small-batch matmul reads a
      weight 1.2x (float32) to 2x (bfloat16) faster in that layout;
    - matmul weights in `dtype` (default: as stored), multiplied with float32 accumulation while the residual
      stream, norms and embedding lookup keep the params' own dtype;
    - with `pack` ("auto": `matmul_packing()`) each bfloat16 [out, in] weight on one device packed once for a CPU
      matmul kernel, under `<name>_<pack>` and `head_<pack>`: "tiles", AMX tiles for `amx_matmul` (XLA's matmul
      repacks the weight at every call), or "panels" of 16 columns for `fma_matmul` (XLA runs small-row matmuls at
      a fraction of its rate where there is no AMX); None keeps XLA's matmul.

    On an accelerator the weights keep their [in, out] layout (the Pallas LoRA kernel takes it). The stacked
    layout stays the canonical one: checkpoints, sharding rules, LoRA factors and the ROSA update's scan.
    """
    if isinstance(params["layers"], tuple):
        return params
    out_in = jax.default_backend() == "cpu" if out_in is None else out_in
    if pack == "auto":
        pack = matmul_packing() if out_in else None
    if pack is not None and pack not in PACKINGS:
        raise ValueError(f"decode_layout: pack={pack!r} is not one of {(*PACKINGS, None)} or 'auto'")

    def one_device(w):
        sharding = getattr(w, "sharding", None)
        return sharding is None or len(sharding.device_set) == 1

    def transposed(name, w, like):  # [out, in] under `<name>_t`, or packed under `<name>_<pack>`
        if pack and w.dtype == jnp.bfloat16 and PACKINGS[pack].packable(w) and one_device(like):
            return {f"{name}_{pack}": PACKINGS[pack].pack(w)}
        return {f"{name}_t": w}

    def place(w, like, spec):  # keeps a sharded weight's layout under its new axes
        sharding = getattr(like, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return jax.device_put(w, NamedSharding(sharding.mesh, PartitionSpec(*spec(sharding.spec))))
        return w

    def matrix(w, i):
        w_i = w[i].astype(dtype or w.dtype)
        if out_in:
            return place(w_i.T.copy(), w, lambda spec: (spec[2], spec[1]) if len(spec) > 2 else ())
        return place(w_i, w, lambda spec: spec[1:])

    def layer(i):
        out = {}
        for name, w in params["layers"].items():
            if name in LINEARS and out_in:
                out.update(transposed(name, matrix(w, i), w))
            elif name in LINEARS:
                out[name] = matrix(w, i)
            else:
                out[name] = place(w[i], w, lambda spec: spec[1:])
        return out

    num_layers = next(iter(params["layers"].values())).shape[0]
    decoded = dict(params, layers=tuple(layer(i) for i in range(num_layers)))
    if out_in:
        head = params["lm_head"].T if "lm_head" in params else params["embed"]
        decoded.pop("lm_head", None)
        decoded.update(transposed("head", head.astype(dtype or head.dtype), head))
    elif dtype is not None and "lm_head" in params:
        decoded["lm_head"] = params["lm_head"].astype(dtype)
    return decoded


def narrow_trunk(params: Params, dtype) -> Params:
    """The stacked params with the layers' matmul weights in `dtype` (None: as stored): narrower than the
    activations, they are multiplied by `narrow_matmul` (operands in `dtype`, float32 sums, in the value, tangent
    and transpose alike). The embedding, the LM head, norms and biases keep their own dtype."""
    if dtype is None:
        return params
    layers = {name: w.astype(dtype) if name in LINEARS else w for name, w in params["layers"].items()}
    return dict(params, layers=layers)


def cache_dtype(params: Params) -> jnp.dtype:
    """The dtype of a decode cache for these weights: that of `decode_layout`'s matmul weights (bfloat16 decode
    weights keep bfloat16 keys/values, which halves what attention reads), else the params'."""
    layers = params["layers"]
    if isinstance(layers, tuple):
        return next(w.dtype for name, w in layers[0].items()
                    if linear_name(name) in LINEARS)
    return params["embed"].dtype


def cache_is_buffered(dtype) -> bool:
    """Whether a decode cache of `dtype` is only read inside a decode call, its new keys/values written once at the
    call's end (decode_rows.decode_chunk): XLA CPU writes one slot of an array narrower than float32 by converting
    all of it."""
    return jnp.dtype(dtype).itemsize < 4


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


def group_rows(q: Float[Array, "B T H D"], kv_heads: int) -> Float[Array, "B K G*T D"]:
    """The queries that share a kv head as the rows of one matrix, the group's heads one after another: a score dot
    is then one [G*T, D] x [D, S] product per (batch row, kv head). In [B, T, K, G, D] order XLA CPU broadcast every key
    over the G heads and transposed the [G, T, S] probabilities before the value dot (BUILD_NOTES.md,
    "Prefill in query rows")."""
    B, T, H, D = q.shape
    G = H // kv_heads
    return jnp.transpose(q.reshape(B, T, kv_heads, G, D), (0, 2, 3, 1, 4)).reshape(B, kv_heads, G * T, D)


def group_mask(mask: Bool[Array, "B T S"], groups: int) -> Bool[Array, "B 1 G*T S"]:
    """A [B, T, S] mask for the rows of `group_rows`."""
    B, T, S = mask.shape
    return jnp.broadcast_to(mask[:, None, None], (B, 1, groups, T, S)).reshape(B, 1, groups * T, S)


def ungroup_rows(out: Float[Array, "B K G*T D"], length: int) -> Float[Array, "B T H*D"]:
    """`group_rows`' rows back in [B, T, heads * D] order."""
    B, K, M, D = out.shape
    G = M // length
    return jnp.transpose(out.reshape(B, K, G, length, D), (0, 3, 1, 2, 4)).reshape(B, length, K * G * D)


def causal_attention(
    q: Float[Array, "B T H D"], k: Float[Array, "B T K D"], v: Float[Array, "B T K D"], mask: Bool[Array, "B T T"],
    query_block: int = QUERY_BLOCK,
) -> Float[Array, "B T H*D"]:
    """Grouped-query self-attention under a causal `mask` (a token sees none after it; padding masked too), each
    group of H/K query heads sharing one kv head: teacher forcing, whose scores the ROSA update linearizes and
    transposes in every adapted layer in every CG iteration (BUILD_NOTES.md, "The Weights step"), and a prefill
    into an empty cache (BUILD_NOTES.md, "The decode step against its roofline (issue 36)", "Prefill attention in
    query blocks"):

    - the queries run in blocks of `query_block` rows, each over the keys up to its last row only, so most of the
      masked upper triangle is never computed;
    - the queries sharing a kv head are the rows of one score matrix (`group_rows`), so that no [T, T] transpose
      follows the dot and no key is broadcast over the G query heads;
    - the mask is added as a bias, whose tangent is the identity, instead of a select that the JVP and VJP repeat."""
    B, T, H, D = q.shape
    if 0 < query_block < T:
        return jnp.concatenate([
            causal_attention(q[:, a:a + query_block], k[:, :a + query_block], v[:, :a + query_block],
                             mask[:, a:a + query_block, :a + query_block], 0)
            for a in range(0, T, query_block)], axis=1)
    K = k.shape[2]
    acc = accumulation_dtype(q.dtype)
    bias = jnp.where(group_mask(mask, H // K), 0.0, _MASKED).astype(acc)
    scores = jnp.einsum("bkmd,bskd->bkms", group_rows(q, K), k, preferred_element_type=acc) / math.sqrt(D) + bias
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkms,bskd->bkmd", probs, v, preferred_element_type=acc)
    return ungroup_rows(out.astype(v.dtype), T)


def _transposed_matmul(x: Float[Array, "... in"], lp: Params, name: str) -> Float[Array, "... out"]:
    """x times decode_layout's `<name>_<packing>` (a CPU matmul kernel) or `<name>_t` ([out, in], possibly in a
    narrower dtype), over x flattened to [rows, in]: with the decode step's [B, 1, in] XLA CPU turned every weight
    back to [in, out] (a copy of all of them per call) and ran the slower kernel for that layout."""
    x2 = x.reshape(-1, x.shape[-1])
    packing = next((p for p in PACKINGS if f"{name}_{p}" in lp), None)
    if packing is not None:
        y = PACKINGS[packing].matmul(x2, lp[f"{name}_{packing}"])
    else:
        w = lp[f"{name}_t"]
        y = jnp.einsum("ni,oi->no", x2.astype(w.dtype), w, preferred_element_type=accumulation_dtype(x.dtype))
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _linear(x, lp, la, name, scale, lora_kernel):
    if any(f"{name}{suffix}" in lp for suffix in LAYOUT_SUFFIXES):
        y = _transposed_matmul(x, lp, name).astype(x.dtype)
        if la is not None and name in la:
            y = y + lora_delta(x, *la[name], scale)
    elif la is not None and name in la:
        matmul = lora_matmul if lora_kernel else lora_matmul_reference
        y = matmul(x, lp[name], *la[name], scale)
    else:
        y = weight_matmul(x, lp[name])
    if f"{name}_bias" in lp:
        y = y + lp[f"{name}_bias"]
    return y


def _softmax_of_two(a: Float[Array, "... S"], b: Float[Array, "... T"]) -> tuple[Array, Array]:
    """softmax over the concatenation of a and b along the last axis, returned as its two parts, without the
    concatenation (a cache's scores and a piece's or a decode buffer's)."""
    top = jnp.maximum(jnp.max(a, -1, keepdims=True), jnp.max(b, -1, keepdims=True))
    a, b = jnp.exp(a - top), jnp.exp(b - top)
    total = jnp.sum(a, -1, keepdims=True) + jnp.sum(b, -1, keepdims=True)
    return a / total, b / total


def decode_attention(
    q: Float[Array, "B 1 H D"], cache_k: Float[Array, "B K D S"], cache_v: Float[Array, "B K S D"],
    mask: Bool[Array, "B S"], buffer: tuple[Array, Array, Array] | None = None, *, kernel: bool = False,
) -> Float[Array, "B 1 H*D"]:
    """One new token attending to the cached slots in `mask`, its own among them: the cache is written before it
    is read, so the write can update it in place (reading the old cache and writing after made XLA keep the old
    one alive by copying every layer's cache at every step).

    With `buffer` (keys [B, K, D, T], values [B, K, T, D], mask [B, T]: a decode call's tokens so far, its own
    among them) the token attends to the cache's slots in `mask` and to the buffer's in one softmax. A cache
    narrower than float32 is read in its own dtype, the query rounded to it, with float32 accumulation. With
    `kernel`, a bfloat16 cache with its buffer is attended by `kernels/decode_attention.py` (the same roundings,
    its float32 sums in another order; a row reads only its valid range) where D is a multiple of 16."""
    B, _, H, D = q.shape
    K = cache_k.shape[1]
    acc = accumulation_dtype(q.dtype)
    qg = q.reshape(B, K, H // K, D).astype(cache_k.dtype)
    if kernel and buffer is not None and cache_k.dtype == jnp.bfloat16 and D % KERNEL_HEAD_DIM == 0:
        out = buffered_decode_attention(qg, cache_k, cache_v, mask, *buffer)
        return out.astype(q.dtype).reshape(B, 1, H * D)

    def scores(keys, mask, spec):
        s = jnp.einsum(spec, qg, keys, preferred_element_type=acc) / math.sqrt(D)
        return jnp.where(mask[:, None, None, :], s, _MASKED)

    def weighted(probs, values, spec):
        return jnp.einsum(spec, probs.astype(values.dtype), values, preferred_element_type=acc)

    cached = scores(cache_k, mask, "bkgd,bkds->bkgs")
    if buffer is None:
        out = weighted(jax.nn.softmax(cached, axis=-1), cache_v, "bkgs,bksd->bkgd")
    else:  # one softmax over both, without concatenating them
        buffer_k, buffer_v, buffer_mask = buffer
        cached, new = _softmax_of_two(cached, scores(buffer_k, buffer_mask, "bkgd,bkdt->bkgt"))
        out = weighted(cached, cache_v, "bkgs,bksd->bkgd") + weighted(new, buffer_v, "bkgt,bktd->bkgd")
    return out.astype(q.dtype).reshape(B, 1, H * D)


def prefix_attention(
    q: Float[Array, "B T H D"], k: Float[Array, "B T K D"], v: Float[Array, "B T K D"],
    cache_k: Float[Array, "B K D S"], cache_v: Float[Array, "B K S D"], cache_mask: Bool[Array, "B S"],
    self_mask: Bool[Array, "B T T"], query_block: int = PREFIX_QUERY_BLOCK,
) -> Float[Array, "B T H*D"]:
    """A chunk of new tokens attending to a cached prefix (the valid slots in `cache_mask`) and, causally, to
    itself: the prefill of a turn whose history is already in the cache. One softmax over both parts
    (`_softmax_of_two`), the masks added as biases.

    The queries run in blocks of `query_block` rows one after another (`lax.map`), each over the whole cache and
    chunk: a block's [G * rows, S] scores stay in the CPU's caches while its softmax and value product run. Blocks
    unrolled side by side ran every block's score product first and their softmaxes after, over scores the size of
    all of them (BUILD_NOTES.md, "The decode step against its roofline (issue 36)", "Prefill attention in query
    blocks")."""
    B, T, H, D = q.shape
    if 0 < query_block < T:
        pad = -T % query_block
        blocks = (T + pad) // query_block
        q_blocks = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(B, blocks, query_block, H, D)
        mask_blocks = jnp.pad(self_mask, ((0, 0), (0, pad), (0, 0))).reshape(B, blocks, query_block, T)
        out = jax.lax.map(lambda x: prefix_attention(x[0], k, v, cache_k, cache_v, cache_mask, x[1], 0),
                          (q_blocks.swapaxes(0, 1), mask_blocks.swapaxes(0, 1)))
        return out.swapaxes(0, 1).reshape(B, T + pad, H * D)[:, :T]
    K = k.shape[2]
    rows = group_rows(q, K)
    acc = accumulation_dtype(q.dtype)
    s_cache = (jnp.einsum("bkmd,bkds->bkms", rows, cache_k, preferred_element_type=acc) / math.sqrt(D)
               + jnp.where(cache_mask, 0.0, _MASKED).astype(acc)[:, None, None, :])
    s_self = (jnp.einsum("bkmd,btkd->bkmt", rows, k, preferred_element_type=acc) / math.sqrt(D)
              + jnp.where(group_mask(self_mask, H // K), 0.0, _MASKED).astype(acc))
    p_cache, p_self = _softmax_of_two(s_cache, s_self)
    out = (jnp.einsum("bkms,bksd->bkmd", p_cache.astype(v.dtype), cache_v, preferred_element_type=acc)
           + jnp.einsum("bkmt,btkd->bkmd", p_self.astype(v.dtype), v, preferred_element_type=acc))
    return ungroup_rows(out.astype(v.dtype), T)


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
    attention_kernel: bool = False,
    layers: tuple[int, int] | None = None,
    inputs: Float[Array, "B T d"] | None = None,
    final_norm: bool = True,
    continue_prefix: bool = False,
    buffer: KVCache | None = None,
    buffer_index: Int[Array, ""] | int = 0,
) -> tuple[Float[Array, "B T d"], KVCache | None]:
    """Hidden states after the final norm (before it with `final_norm=False`).

    Without a cache: causal self-attention over `tokens` (teacher forcing).
    With a cache: the new tokens go to slots [cache_index, cache_index + T) (`cache_index` a scalar, or for
    a decode step one slot per row [B]). A chunk of T > 1 tokens
    is a prefill into an empty cache and attends to itself, or with `continue_prefix` it also attends
    to every valid slot before cache_index (a turn whose history is cached); a single token (a decode
    step) attends to every valid slot before it and to itself. A decode step writes each layer's new k/v into
    its cache and then attends over it, so the write updates the cache in place; a prefill writes after the
    layers ran. A decode step with a `buffer` (a decode call's new keys/values, `KVCache` of T slots) reads the
    cache's valid slots before `cache_index` without writing it, writes its keys/values into the buffer's slot
    `buffer_index` and attends to both; it returns the buffer (model/decode_rows.py merges it into the cache once
    per call: XLA CPU updates a bfloat16 array by converting all of it).
    `valid` marks real tokens; padding is never attended to. `remat` recomputes each layer's
    activations when differentiating instead of storing them (used by the ROSA update). `lora_kernel`
    applies adapters with the Pallas kernel (forward only; GPU/TPU) instead of the jnp reference;
    `attention_kernel` attends a buffered decode step with the CPU kernel (`decode_attention`).
    `layers=(a, b)` runs only layers [a, b) (`adapters` then cover those layers only); `inputs` replaces the
    embedding as the residual stream entering layer a. The ROSA update runs a trunk in two such parts; a prefill
    of layers [a, b) from `inputs` writes only their keys/values (the returned cache keeps the others as given).

    Stacked weights without a cache run as one `lax.scan` over layers (compile time does not grow with depth;
    the ROSA update's many tokens per weight read hide the per-layer slice). With a cache, or with weights from
    `decode_layout`, the layers run as a Python loop, each on its own arrays.
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
        # a decode step's token attends to itself at its slot (even on a row that is not running, as before)
        step_mask = old_mask | (slots[None, :] == jnp.reshape(cache_index, (-1, 1)))
    if buffer is not None:
        buffer_valid = jax.lax.dynamic_update_slice(buffer.valid, valid, (0, buffer_index))
        buffer_mask = buffer_valid | (jnp.arange(buffer.valid.shape[1]) == buffer_index)[None]
    layer_adapters = adapters.per_layer() if adapters is not None else None
    scale = adapters.scale if adapters is not None else 1.0

    def layer(x, xs):
        lp, la, layer_cache = xs
        if layers is not None and not isinstance(lp, dict):  # the scan's index into the stack
            lp = jax.tree.map(lambda w: w[lp], params["layers"])
        # The named scopes label the ops in a profile (experiments.profile_decode); they change no numerics.
        with jax.named_scope("qkv"):
            h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
            q = _linear(h, lp, la, "q", scale, lora_kernel).reshape(B, T, cfg.num_heads, cfg.head_dim)
            k = _linear(h, lp, la, "k", scale, lora_kernel).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
            v = _linear(h, lp, la, "v", scale, lora_kernel).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
            if cfg.qk_norm:
                q = rms_norm(q, lp["q_norm"], cfg.rms_norm_eps)
                k = rms_norm(k, lp["k_norm"], cfg.rms_norm_eps)
            q = apply_rope(q, positions, inv_freq)
            k = apply_rope(k, positions, inv_freq)
        with jax.named_scope("attention"):
            if decoding and buffer is not None:
                cache_k, cache_v, *layer_buffer = layer_cache
                with jax.named_scope("cache_write"):
                    layer_cache = _write_layer(*layer_buffer, k, v, buffer_index)
                o = decode_attention(q, cache_k, cache_v, old_mask, (*layer_cache, buffer_mask),
                                     kernel=attention_kernel)
            elif decoding:
                with jax.named_scope("cache_write"):
                    layer_cache = _write_layer(*layer_cache, k, v, cache_index)
                o = decode_attention(q, *layer_cache, step_mask)
            elif extending:
                o = prefix_attention(q, k, v, *layer_cache, old_mask, self_mask)
            else:
                o = causal_attention(q, k, v, self_mask)
        with jax.named_scope("out_proj"):
            x = x + _linear(o, lp, la, "o", scale, lora_kernel)
        with jax.named_scope("mlp"):
            h = rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
            gated = (jax.nn.silu(_linear(h, lp, la, "gate", scale, lora_kernel))
                     * _linear(h, lp, la, "up", scale, lora_kernel))
            x = x + _linear(gated, lp, la, "down", scale, lora_kernel)
        # a decode step returns the layer's written cache (or buffer), a prefill its new keys/values (written after
        # the layers)
        return x, (layer_cache if decoding else (k, v) if cache is not None else None)

    step = jax.checkpoint(layer) if remat else layer
    first, last = layers or (0, cfg.num_layers)
    if cache is None and not isinstance(params["layers"], tuple):
        x, _ = jax.lax.scan(step, x, (params["layers"] if layers is None else jnp.arange(first, last),
                                      layer_adapters, None))
    else:
        new_k, new_v = [], []
        for i in range(first, last):
            la = None if layer_adapters is None else jax.tree.map(lambda a: a[i - first], layer_adapters)
            layer_cache = (cache.k[i], cache.v[i]) if decoding or extending else None
            if buffer is not None:
                layer_cache += (buffer.k[i], buffer.v[i])
            x, out = step(x, (_layer_params(params, i), la, layer_cache))
            if cache is not None and not decoding:
                with jax.named_scope("cache_write"):
                    out = _write_layer(cache.k[i], cache.v[i], *out, cache_index)
            if cache is not None:
                new_k.append(out[0])
                new_v.append(out[1])
    if final_norm:
        x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    if cache is None:
        return x, None
    if cache is not None and (first, last) != (0, cfg.num_layers):  # the layers not run keep their arrays
        source = buffer if buffer is not None else cache
        new_k = [*source.k[:first], *new_k, *source.k[last:]]
        new_v = [*source.v[:first], *new_v, *source.v[last:]]
    if buffer is not None:
        return x, KVCache(tuple(new_k), tuple(new_v), buffer_valid)
    if jnp.ndim(cache_index) == 0:
        valid = jax.lax.dynamic_update_slice(cache.valid, valid, (0, cache_index))
    else:
        valid = cache.valid.at[jnp.arange(valid.shape[0]), cache_index].set(valid[:, 0])
    return x, KVCache(tuple(new_k), tuple(new_v), valid)


def _layer_params(params: Params, i: int) -> Params:
    layers = params["layers"]
    return layers[i] if isinstance(layers, tuple) else jax.tree.map(lambda w: w[i], layers)


def _write_layer(cache_k: Float[Array, "B K D S"], cache_v: Float[Array, "B K S D"], k: Float[Array, "B T K D"],
                 v: Float[Array, "B T K D"], cache_index) -> tuple[Array, Array]:
    """A layer's new keys/values written into its cache at `cache_index` (a scalar, or one slot per row [B] for a
    decode step)."""
    k = jnp.transpose(k, (0, 2, 3, 1)).astype(cache_k.dtype)  # -> [B, K, D, T]
    v = jnp.transpose(v, (0, 2, 1, 3)).astype(cache_v.dtype)  # -> [B, K, T, D]
    if jnp.ndim(cache_index) == 0:
        return (jax.lax.dynamic_update_slice(cache_k, k, (0, 0, 0, cache_index)),
                jax.lax.dynamic_update_slice(cache_v, v, (0, 0, cache_index, 0)))
    # one token per row, each at its own slot (the token-level engine's rows are at different lengths)
    rows = jnp.arange(k.shape[0])
    return cache_k.at[rows, :, :, cache_index].set(k[..., 0]), cache_v.at[rows, :, cache_index].set(v[:, :, 0])


def head_weight(params: Params, cfg: ModelConfig) -> Float[Array, "d V"]:
    """The LM head as a (d, V) matrix (the transposed embedding when tied)."""
    return params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]


def lm_logits(params: Params, hidden: Float[Array, "... d"], cfg: ModelConfig) -> Float[Array, "... V"]:
    """LM head, accumulated in (at least) float32."""
    if any(f"head_{packing}" in params for packing in PACKINGS):  # decode_layout's [V, d] head, packed
        return _transposed_matmul(hidden, params, "head")
    if "head_t" in params:  # decode_layout's [V, d] head
        w = params["head_t"]
        return jnp.einsum("...d,vd->...v", hidden.astype(w.dtype), w,
                          preferred_element_type=accumulation_dtype(hidden.dtype))
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
