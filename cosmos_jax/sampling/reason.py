"""Autoregressive text generation with the reasoner (`cosmos_jax.modeling.reasoner`): prefill, then a jitted
decode loop over a preallocated K/V cache.

Shapes are fixed by (batch, prompt length P, max_new_tokens): one compilation per shape, none per token.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from cosmos_jax import aot
from cosmos_jax.modeling.reasoner import KVCache, Params, PromptBatch, Reasoner


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy; top_k 0 and top_p 1 = off; presence_penalty is subtracted from the logits of
    every token already generated (prompt tokens are not penalised)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    presence_penalty: float = 0.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_tokens(logits: jax.Array, generated: jax.Array, rng: jax.Array, sampling: SamplingParams) -> jax.Array:
    """logits [B, V] f32, generated [B, V] bool (tokens already produced) -> next tokens [B] int32."""
    logits = logits - sampling.presence_penalty * generated.astype(logits.dtype)
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    keep = jnp.ones_like(sorted_logits, bool)
    if sampling.top_k:
        keep &= jnp.arange(logits.shape[-1]) < sampling.top_k
    if sampling.top_p < 1:
        probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep &= mass_before < sampling.top_p
    choice = jax.random.categorical(rng, jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


@flax.struct.dataclass
class _DecodeState:
    step: jax.Array
    tokens: jax.Array  # [B, max_new]
    logits: jax.Array  # [B, V]
    cache: KVCache
    done: jax.Array  # [B] bool
    generated: jax.Array  # [B, V] bool
    rng: jax.Array


def _advance(model: Reasoner, params: Params, prompt_len: int, state: _DecodeState, next_position: jax.Array,
             eos_ids: jax.Array, pad_id: int, sampling: SamplingParams) -> _DecodeState:
    """Sample one token per row from state.logits, record it, and run it through the model."""
    rng, key = jax.random.split(state.rng)
    token = sample_tokens(state.logits, state.generated, key, sampling)
    token = jnp.where(state.done, pad_id, token)
    done = state.done | jnp.isin(token, eos_ids)
    rows = jnp.arange(token.shape[0])
    generated = state.generated.at[rows, token].set(True)
    tokens = jax.lax.dynamic_update_index_in_dim(state.tokens, token, state.step, axis=1)
    logits, cache = model.decode_step(params, token, next_position + state.step, state.cache, prompt_len + state.step)
    return _DecodeState(state.step + 1, tokens, logits, cache, done, generated, rng)


def _start(model: Reasoner, params: Params, prompt: PromptBatch, max_new_tokens: int, rng: jax.Array,
           pad_id: int) -> _DecodeState:
    batch, length = prompt.input_ids.shape
    logits, cache = model.prefill(params, prompt, length + max_new_tokens)
    return _DecodeState(
        step=jnp.zeros((), jnp.int32),
        tokens=jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
        logits=logits,
        cache=cache,
        done=jnp.zeros((batch,), bool),
        generated=jnp.zeros((batch, logits.shape[-1]), bool),
        rng=rng,
    )


def _check_lengths(model: Reasoner, prompt: PromptBatch, max_new_tokens: int) -> None:
    length = prompt.input_ids.shape[1]
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    limit = model.config.max_position_embeddings
    if length + max_new_tokens > limit:
        raise ValueError(f"prompt of {length} tokens (text + vision placeholders) plus max_new_tokens "
                         f"{max_new_tokens} exceeds the model's context of {limit} tokens")


def generate(
    model: Reasoner,
    params: Params,
    prompt: PromptBatch,
    *,
    max_new_tokens: int,
    eos_ids: tuple[int, ...],
    sampling: SamplingParams = SamplingParams(),
    rng: jax.Array | None = None,
    pad_id: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Prefill + a `lax.while_loop` decode, all in one jit. Returns (tokens [B, max_new_tokens] int32, with
    `pad_id` after a row's end, lengths [B]: tokens up to and including the first eos)."""
    _check_lengths(model, prompt, max_new_tokens)
    rng = jax.random.key(0) if rng is None else rng
    tokens, done_at = aot.call(f"reasoner answer, prompt {list(prompt.input_ids.shape)}, {max_new_tokens} new tokens",
                               _generate_jit, model, params, prompt, rng, max_new_tokens, tuple(eos_ids), sampling,
                               pad_id)
    return np.asarray(tokens), np.asarray(done_at)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7))
def _generate_jit(model, params, prompt, rng, max_new_tokens, eos_ids, sampling, pad_id):
    eos = jnp.asarray(eos_ids, jnp.int32)
    length = prompt.input_ids.shape[1]
    state = _start(model, params, prompt, max_new_tokens, rng, pad_id)

    def cond(s: _DecodeState) -> jax.Array:
        return (s.step < max_new_tokens) & ~jnp.all(s.done)

    def body(s: _DecodeState) -> _DecodeState:
        return _advance(model, params, length, s, prompt.next_position, eos, pad_id, sampling)

    state = jax.lax.while_loop(cond, body, state)
    is_eos = jnp.isin(state.tokens, eos)
    first_eos = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1) + 1, state.step)
    return state.tokens, first_eos


def stream(
    model: Reasoner,
    params: Params,
    prompt: PromptBatch,
    *,
    max_new_tokens: int,
    eos_ids: tuple[int, ...],
    sampling: SamplingParams = SamplingParams(),
    rng: jax.Array | None = None,
    pad_id: int = 0,
) -> Iterator[np.ndarray]:
    """The same decode as `generate`, one jitted step per token, yielding each step's tokens [B] as they come
    (rows already finished yield `pad_id`). Stops when every row has produced an eos."""
    _check_lengths(model, prompt, max_new_tokens)
    rng = jax.random.key(0) if rng is None else rng
    eos = tuple(eos_ids)
    state = _start_jit(model, params, prompt, max_new_tokens, rng, pad_id)
    for _ in range(max_new_tokens):
        state = _advance_jit(model, params, prompt.input_ids.shape[1], state, prompt.next_position, eos, pad_id,
                             sampling)
        yield np.asarray(state.tokens[:, int(state.step) - 1])
        if bool(jnp.all(state.done)):
            return


_start_jit = jax.jit(_start, static_argnums=(0, 3, 5))


@functools.partial(jax.jit, static_argnums=(0, 2, 5, 6, 7))
def _advance_jit(model, params, prompt_len, state, next_position, eos_ids, pad_id, sampling):
    return _advance(model, params, prompt_len, state, next_position, jnp.asarray(eos_ids, jnp.int32), pad_id,
                    sampling)
