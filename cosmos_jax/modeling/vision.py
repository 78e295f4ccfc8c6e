"""The Qwen3-VL vision encoder of the Cosmos 3 reasoner (docs/model.md, "The reasoner on its own"): patch embedding, interpolated learned positions,
2D axial rotary, per-frame attention, deepstack mergers and the final patch merger.

Patches arrive flattened as (C, t, h, w) rows in 2x2 block-major order (what `reasoner_inputs` produces, equal to
the Qwen-VL processors). Everything that depends only on the grid sizes (position-table taps, rotary positions,
frame segments) is computed host-side by `vision_grid`, so the jitted encoder sees static shapes.

    params["reasoner"]["vision"] = {"patch_embed", "pos_embed", "blocks" (stacked, leading depth axis),
                                    "merger", "deepstack_merger_list" (stacked, leading deepstack axis)}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from cosmos_jax.modeling.rope import inverse_frequencies

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Qwen3-VL vision tower; field names are the `vision_config` keys of the reasoner's config.json."""

    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 4096
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    rope_theta: float = 10000.0
    hidden_act: str = "gelu_pytorch_tanh"

    def __post_init__(self) -> None:
        object.__setattr__(self, "deepstack_visual_indexes", tuple(int(i) for i in self.deepstack_visual_indexes))
        problems = []
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            problems.append(f"hidden_size {self.hidden_size} / num_heads {self.num_heads} must be a multiple of 4")
        side = int(round(self.num_position_embeddings**0.5))
        if side * side != self.num_position_embeddings:
            problems.append(f"num_position_embeddings {self.num_position_embeddings} must be a square")
        if list(self.deepstack_visual_indexes) != sorted(set(self.deepstack_visual_indexes)) or any(
            not 0 <= i < self.depth for i in self.deepstack_visual_indexes
        ):
            problems.append(f"deepstack_visual_indexes {list(self.deepstack_visual_indexes)} must be increasing "
                            f"block indexes below depth {self.depth}")
        if self.hidden_act != "gelu_pytorch_tanh":
            problems.append(f"hidden_act must be 'gelu_pytorch_tanh', got {self.hidden_act!r}")
        if problems:
            raise ValueError("invalid vision config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_side(self) -> int:
        return int(round(self.num_position_embeddings**0.5))

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "VisionConfig":
        """From a `vision_config` dict (unknown keys ignored; rope theta read from `rope_parameters`)."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in known}
        rope = raw.get("rope_parameters") or {}
        if "rope_theta" in rope:
            kwargs["rope_theta"] = float(rope["rope_theta"])
        return cls(**kwargs)


@flax.struct.dataclass
class VisionGrid:
    """Host-side layout of N patches (all images/videos of one call, concatenated).

    taps [N, 4] int32 and tap_weights [N, 4] float32: bilinear (align_corners) gather into the position table;
    rope_positions [N, 2] float32: (row, col) of each patch; segments [N] int32: attention group (one per frame).
    segment_length (static): the common length of every segment, or 0 when they differ. With a common length,
    attention runs per segment ([S, L, L] scores) instead of over one masked [N, N] matrix.
    """

    taps: jax.Array
    tap_weights: jax.Array
    rope_positions: jax.Array
    segments: jax.Array
    segment_length: int = flax.struct.field(pytree_node=False, default=0)


def _block_major_rows_cols(h: int, w: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of each of h*w patches listed in merge x merge block-major order."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // merge, merge, w // merge, merge)
    return rows.reshape(shape).transpose(0, 2, 1, 3).ravel(), cols.reshape(shape).transpose(0, 2, 1, 3).ravel()


def _axis_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Two bilinear taps on a `side` table for target positions `index` on an axis of `size` (align_corners)."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    raw = floor.astype(np.int64)[:, None] + np.arange(2)
    weights = np.clip(1 - np.abs(src[:, None] - floor[:, None] - np.arange(2, dtype=np.float32)), 0, None)
    return np.clip(raw, 0, side - 1), weights.astype(np.float32)


def vision_grid(grid_thw: Sequence[Sequence[int]], config: VisionConfig) -> VisionGrid:
    """The layout arrays for patches of items with (t, h, w) patch grids, in order."""
    merge, side = config.spatial_merge_size, config.grid_side
    taps, weights, positions, segments = [], [], [], []
    segment = 0
    for t, h, w in grid_thw:
        if h % merge or w % merge:
            raise ValueError(f"patch grid {h}x{w} is not divisible by spatial_merge_size {merge}")
        rows, cols = _block_major_rows_cols(h, w, merge)
        h_taps, h_w = _axis_taps(rows, h, side)
        w_taps, w_w = _axis_taps(cols, w, side)
        frame_taps = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
        frame_weights = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)
        for _ in range(t):
            taps.append(frame_taps)
            weights.append(frame_weights)
            positions.append(np.stack([rows, cols], -1))
            segments.append(np.full(h * w, segment))
            segment += 1
    lengths = {len(s) for s in segments}
    return VisionGrid(
        taps=jnp.asarray(np.concatenate(taps).astype(np.int32)),
        tap_weights=jnp.asarray(np.concatenate(weights).astype(np.float32)),
        rope_positions=jnp.asarray(np.concatenate(positions).astype(np.float32)),
        segments=jnp.asarray(np.concatenate(segments).astype(np.int32)),
        segment_length=lengths.pop() if len(lengths) == 1 else 0,
    )


def vision_rotary(rope_positions: jax.Array, config: VisionConfig) -> tuple[jax.Array, jax.Array]:
    """rope_positions [N, 2] -> f32 cos, sin [N, head_dim]: cat(freq(row), freq(col)) duplicated."""
    inv_freq = jnp.asarray(inverse_frequencies(config.head_dim // 2, config.rope_theta))
    freqs = rope_positions.astype(jnp.float32)[..., None] * inv_freq  # [N, 2, hd/4]
    freqs = freqs.reshape(freqs.shape[0], -1)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotary on x [N, H, hd] in f32, result in x's dtype."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[:, None, :] + rotated * sin[:, None, :]).astype(x.dtype)


def segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array,
                      segment_length: int) -> jax.Array:
    """Non-causal attention within segments: q, k, v [N, H, hd] -> [N, H, hd]; softmax in f32.

    segment_length > 0: every segment has that length (attention per segment); 0: one masked [N, N] matrix.
    Einsum letters as in `cosmos_jax.modeling.attention` (n segment, q/s query/key position, h head, d head dim).
    """
    n, heads, dim = q.shape
    scale = dim**-0.5
    if segment_length:
        shape = (n // segment_length, segment_length, heads, dim)
        q, k, v = q.reshape(shape), k.reshape(shape), v.reshape(shape)
        logits = jnp.einsum("nqhd,nshd->nhqs", q, k, preferred_element_type=jnp.float32) * scale
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.einsum("nhqs,nshd->nqhd", probs, v).reshape(n, heads, dim)
    logits = jnp.einsum("qhd,shd->hqs", q, k, preferred_element_type=jnp.float32) * scale
    same = segments[:, None] == segments[None, :]
    probs = jax.nn.softmax(jnp.where(same, logits, jnp.finfo(jnp.float32).min), axis=-1).astype(v.dtype)
    return jnp.einsum("hqs,shd->qhd", probs, v)


def _layer_norm(features_name: str, dtype: jnp.dtype, param_dtype: jnp.dtype) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-6, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
                        name=features_name)


class VisionBlock(nn.Module):
    """x += attn(LN1(x)); x += mlp(LN2(x)). Attention is non-causal within each segment. x [N, D]."""

    config: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segments: jax.Array,
                 segment_length: int = 0) -> jax.Array:
        cfg = self.config
        dense = lambda features, name: nn.Dense(  # noqa: E731
            features, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        n = x.shape[0]
        h = _layer_norm("norm1", self.dtype, self.param_dtype)(x)
        qkv = dense(3 * cfg.hidden_size, "qkv")(h).reshape(n, 3, cfg.num_heads, cfg.head_dim)
        q, k, v = _rotate(qkv[:, 0], cos, sin), _rotate(qkv[:, 1], cos, sin), qkv[:, 2]
        attn = segment_attention(q, k, v, segments, segment_length).reshape(n, cfg.hidden_size)
        x = x + dense(cfg.hidden_size, "proj")(attn)
        h = _layer_norm("norm2", self.dtype, self.param_dtype)(x)
        h = dense(cfg.hidden_size, "linear_fc2")(
            nn.gelu(dense(cfg.intermediate_size, "linear_fc1")(h), approximate=True)
        )
        return x + h


class PatchMerger(nn.Module):
    """Groups merge^2 consecutive patches: LayerNorm (per patch, or over the group when `postshuffle`),
    Linear, GELU (erf), Linear -> out_hidden_size. x [N, D] -> [N / merge^2, out]."""

    config: VisionConfig
    postshuffle: bool
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        group = cfg.hidden_size * cfg.spatial_merge_size**2
        norm = _layer_norm("norm", self.dtype, self.param_dtype)
        x = norm(x.reshape(-1, group)) if self.postshuffle else norm(x).reshape(-1, group)
        x = nn.Dense(group, dtype=self.dtype, param_dtype=self.param_dtype, name="linear_fc1")(x)
        x = nn.gelu(x, approximate=False)
        return nn.Dense(cfg.out_hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name="linear_fc2")(x)


class VisionEmbed(nn.Module):
    """patch_embed (Linear over (C, t, h, w)-flattened patches) + interpolated learned positions."""

    config: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, pixels: jax.Array, taps: jax.Array, tap_weights: jax.Array) -> jax.Array:
        """pixels [N, patch_dim], taps/tap_weights [N, 4] -> [N, D]."""
        cfg = self.config
        x = nn.Dense(cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name="patch_embed")(
            pixels.astype(self.dtype)
        )
        table = self.param("pos_embed", nn.initializers.normal(0.02), (cfg.num_position_embeddings, cfg.hidden_size),
                           self.param_dtype)
        pos = jnp.sum(jnp.take(table, taps, axis=0).astype(jnp.float32) * tap_weights[..., None], axis=1)
        return x + pos.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class VisionEncoder:
    """The configured encoder (hashable; pure init/apply over an explicit params dict)."""

    config: VisionConfig
    dtype: Any = jnp.bfloat16
    param_dtype: Any = None

    @property
    def _param_dtype(self) -> Any:
        return self.dtype if self.param_dtype is None else self.param_dtype

    def _embed(self) -> VisionEmbed:
        return VisionEmbed(self.config, self.dtype, self._param_dtype)

    def _block(self) -> VisionBlock:
        return VisionBlock(self.config, self.dtype, self._param_dtype)

    def _merger(self, postshuffle: bool) -> PatchMerger:
        return PatchMerger(self.config, postshuffle, self.dtype, self._param_dtype)

    def init(self, rng: jax.Array) -> Params:
        """Random parameters: {"patch_embed", "pos_embed", "blocks", "merger", "deepstack_merger_list"}."""
        cfg = self.config
        group = cfg.spatial_merge_size**2
        k_embed, k_blocks, k_merger, k_deep = jax.random.split(rng, 4)
        x = jnp.zeros((group, cfg.hidden_size), self.dtype)
        embed = self._embed().init(k_embed, jnp.zeros((1, cfg.patch_dim), self.dtype),
                                   jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 4), jnp.float32))["params"]
        rope = jnp.zeros((group, cfg.head_dim), jnp.float32)
        seg = jnp.zeros((group,), jnp.int32)
        blocks = jax.vmap(lambda k: self._block().init(k, x, rope, rope, seg)["params"])(
            jax.random.split(k_blocks, cfg.depth)
        )
        deep = jax.vmap(lambda k: self._merger(True).init(k, x)["params"])(
            jax.random.split(k_deep, len(cfg.deepstack_visual_indexes))
        )
        return {
            "patch_embed": embed["patch_embed"],
            "pos_embed": {"embedding": embed["pos_embed"]},
            "blocks": blocks,
            "merger": self._merger(False).init(k_merger, x)["params"],
            "deepstack_merger_list": deep,
        }

    def __call__(self, params: Params, pixels: jax.Array, grid: VisionGrid) -> tuple[jax.Array, jax.Array]:
        """pixels [N, patch_dim] -> (merged embeddings [N/4, out], deepstack features [n_deep, N/4, out])."""
        cfg = self.config
        if pixels.ndim != 2 or pixels.shape[1] != cfg.patch_dim:
            raise ValueError(f"pixels must be [N, {cfg.patch_dim}], got {tuple(pixels.shape)}")
        if pixels.shape[0] != grid.segments.shape[0]:
            raise ValueError(f"{pixels.shape[0]} patches but the grid describes {grid.segments.shape[0]}")
        embed_params = {"patch_embed": params["patch_embed"], "pos_embed": params["pos_embed"]["embedding"]}
        x = self._embed().apply({"params": embed_params}, pixels, grid.taps, grid.tap_weights)
        cos, sin = vision_rotary(grid.rope_positions, cfg)
        block = self._block()

        def body(h, block_params):
            return block.apply({"params": block_params}, h, cos, sin, grid.segments, grid.segment_length), None

        deep_merger = self._merger(True)
        features = []
        start = 0
        for k, index in enumerate(cfg.deepstack_visual_indexes):
            x, _ = jax.lax.scan(body, x, jax.tree.map(lambda p: p[start:index + 1], params["blocks"]))
            merger_params = jax.tree.map(lambda p: p[k], params["deepstack_merger_list"])
            features.append(deep_merger.apply({"params": merger_params}, x))
            start = index + 1
        if start < cfg.depth:
            x, _ = jax.lax.scan(body, x, jax.tree.map(lambda p: p[start:], params["blocks"]))
        merged = self._merger(False).apply({"params": params["merger"]}, x)
        deep = jnp.stack(features) if features else jnp.zeros((0, *merged.shape), merged.dtype)
        return merged, deep
