"""The model behind the server: preps one request (every model-side check, before it is queued) and runs a
list of prepared same-shape requests as one batch of `Cosmos3Pipeline` (one jitted loop per compiled shape)."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cosmos_jax.sampling.batch import BatchShape, PreparedBatch, Sample, padded_size
from cosmos_jax.sampling.generate import Cosmos3Pipeline, GenerationResult
from cosmos_jax.sampling.prompts import ACTION_MODES, EMBODIMENT_DOMAINS, RAW_ACTION_DIM
from cosmos_jax.sampling.request import GenerationRequest
from cosmos_jax.serve.errors import ServeError
from cosmos_jax.serve.fields import PolicyDefaults, prepare_error


@dataclasses.dataclass(frozen=True, eq=False)
class Prepared:
    """A request prepared against the model: sample 0 of it as a batch of one."""

    request: GenerationRequest
    batch: PreparedBatch

    @property
    def shape(self) -> BatchShape:
        return self.batch.shape

    @property
    def prompts(self) -> tuple[tuple[int, ...], ...]:
        """The token sequences this request adds to a batch (both guidance branches under guidance)."""
        prep = self.batch.preps[0]
        return (tuple(prep.cond_ids), tuple(prep.uncond_ids)) if prep.use_cfg else (tuple(prep.cond_ids),)


class Engine:
    """`Cosmos3Pipeline` as the server uses it; `run` is called from one worker thread at a time."""

    def __init__(self, pipeline: Cosmos3Pipeline, model_name: str, defaults: PolicyDefaults,
                 model_options: Mapping[str, Any] | None = None) -> None:
        """model_options: how the model was loaded (quantize, lora, merge_lora, offload_reasoner), as reported."""
        self.pipeline, self.model_name, self.defaults = pipeline, model_name, defaults
        self.model_options = dict(model_options or {})
        self._compiled: set[Any] = set()
        self._lock = threading.Lock()

    def prepare(self, request: GenerationRequest) -> Prepared:
        """Plan a request (reads nothing but its own fields); a 422 naming the field when the model refuses it."""
        try:
            return Prepared(request, self.pipeline.prepare_batch([Sample(request, 0)]))
        except (ValueError, FileNotFoundError) as e:
            raise prepare_error(e) from None

    def signature(self, items: Sequence[Prepared]) -> tuple:
        """What decides whether a batch needs a compile: its shape, padded size, distinct prompts and their
        longest length (the loop is compiled once per signature, then cached)."""
        prompts = {p for item in items for p in item.prompts}
        size = padded_size(len(items), self.pipeline.data_size)
        return items[0].shape, size, len(prompts), max(len(p) for p in prompts)

    def is_compiled(self, items: Sequence[Prepared]) -> bool:
        with self._lock:
            return self.signature(items) in self._compiled

    def run(self, items: Sequence[Prepared], progress: Callable[[float], None] | None = None) -> list[GenerationResult]:
        """One batched call for same-shape prepared requests; results in the same order."""
        shape = items[0].shape
        for item in items[1:]:
            if item.shape != shape:
                raise ServeError(500, "internal: a batch was gathered from different shapes")
        batch = PreparedBatch(tuple(s for item in items for s in item.batch.samples),
                             tuple(p for item in items for p in item.batch.preps), shape)
        results = self.pipeline.run_batch(batch, progress=False, on_step=progress)
        with self._lock:
            self._compiled.add(self.signature(items))
        return results

    def metadata(self, max_batch: int, max_image_side: int) -> dict[str, Any]:
        """The policy endpoint's first frame: what this server serves."""
        config = self.pipeline.config
        domains = {}
        if config.action_gen:
            domains = {name: RAW_ACTION_DIM[name] for name, index in EMBODIMENT_DOMAINS.items()
                       if name in RAW_ACTION_DIM and index < config.num_embodiment_domains
                       and RAW_ACTION_DIM[name] <= config.action_dim}
        d = self.defaults
        return {
            "model": self.model_name,
            "model_options": self.model_options,
            "protocol": "openpi",
            "modes": list(ACTION_MODES) if config.action_gen else [],
            "domains": domains,
            "domain": d.domain,
            "chunk": d.chunk,
            "action_dim": RAW_ACTION_DIM.get(d.domain) if d.domain else None,
            "resolution_tier": d.resolution_tier,
            "image_size": {"max_side": max_image_side, "resized_to_tier": d.resolution_tier},
            "steps": d.steps,
            "returns_video": False,
            "video_on_request": "set return_video=True in the observation (always on for forward_dynamics)",
            "state_used": False,
            "max_batch": max_batch,
        }
