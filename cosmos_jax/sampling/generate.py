"""The Cosmos 3 generation pipeline: every mode of `Cosmos3OmniPipeline`, with the denoising loop jitted.

Modes: text→image, text→video, image→video, video→video (clean leading latent frames), and the action modes
policy, forward_dynamics, inverse_dynamics; optional joint sound. The numbers follow the reference (docs/model.md, "Conditioning per mode"):
noise drawn vision → sound → action, starting latents `mask·x0 + (1−mask)·noise` (or the given ones, used as
is), velocities zero at clean frames/rows, classifier-free guidance `u + g·(c − u)` per modality, one UniPC
state per modality sharing the coefficients, action channels ≥ the raw width zeroed in the noise, the
velocities and after every step, latent (de)normalisation with the statistics rounded to the VAE dtype.

How it runs (differs from the reference, same numbers):
- every call runs a batch of samples (`run_batch`; `__call__` is a batch of one): both guidance branches of
  every sample are rows of one batch, different prompts right-padded and masked;
- the reasoner K/V are computed once per distinct prompt of a batch (`Cosmos3Transformer.encode_reasoner`),
  not at every step nor once per sample;
- sample k of a request with seed s draws its noise from `jax.random.fold_in(jax.random.key(s), k)`, so its
  outputs do not depend on the batch (`cosmos_jax.sampling.batch`);
- the whole loop is one jitted `jax.lax.scan` compiled ahead of time once per shape signature; with a progress
  bar, progress is reported by `jax.debug.callback` with the step index only (no latents leave the device until
  the end). JAX never writes a program with a host callback to the persistent compile cache, so only the loop
  without a bar (`progress=False`: sdg, `generate --no-progress`) is loaded from it by a later process;
- under `cosmos_jax.aot.compile_only()` every program is compiled and none runs (`generate`/`sdg --warm-only`);
- on a mesh (`on_mesh`, or `from_pretrained(mesh=...)`) the batch is sharded over the `data` axis (and the
  weights as the rules say); under jax.distributed every process gets the samples its devices hold.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cosmos_jax import aot
from cosmos_jax.config import Cosmos3Config
from cosmos_jax.convert.modelopt_fp8 import fallback_note, has_fp8_matmul, has_native_kernels, step_w8a8_groups
from cosmos_jax.modeling.audio_tokenizer import AudioTokenizer, AudioTokenizerConfig
from cosmos_jax.modeling.transformer import Cosmos3Transformer, Params
from cosmos_jax.modeling.wan_vae import WanVAE
from cosmos_jax.sampling import conditioning, offload, scheduler
from cosmos_jax.sampling.batch import (
    BatchShape,
    PreparedBatch,
    Sample,
    batch_denoiser,
    batch_rows,
    check_batch_size,
    common_shape,
    owned_rows,
    padded_size,
    group_batches,
    sample_key,
    sample_noise,
    step_models,
)
from cosmos_jax.sampling.prepared import PreparedRequest
from cosmos_jax.sampling.prompts import EMBODIMENT_DOMAINS, ChatTokenizer, build_prompt_pair, raw_action_dim
from cosmos_jax.sampling.request import TEMPORAL_COMPRESSION, GenerationRequest, is_path
from cosmos_jax.scheduler_config import SchedulerConfig
from cosmos_jax.sharding import BATCH, ActivationSharding, Rules, param_shardings, spec_for

DEFAULT_SPATIAL_COMPRESSION = 16


@dataclasses.dataclass
class GenerationResult:
    """What one sample produced (numpy, float32).

    seed and sample_index: the sample's noise key is fold_in(key(seed), sample_index);
    latents [1, 48, T, h, w] (final, normalised); video [F, H, W, 3] in [0, 1] (None for output_type="latent");
    sound_latents [64, Ts] and sound [channels, N] waveform at `sample_rate` (None without sound);
    actions [chunk, raw width] in model space (policy / inverse dynamics, else None);
    timings: seconds for "prepare", "compile" (0 when cached), "denoise", "decode".
    """

    mode: str
    fps: float
    latents: np.ndarray
    seed: int = 0
    sample_index: int = 0
    video: np.ndarray | None = None
    sound_latents: np.ndarray | None = None
    sound: np.ndarray | None = None
    sample_rate: int | None = None
    actions: np.ndarray | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)


class _ProgressSink:
    """Where the jitted loop's per-step callback lands: a tqdm bar while a call runs (advanced by `per_step`:
    1 on a bar of steps, samples/steps on a bar of samples), nothing otherwise."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.per_step = 1.0

    def tick(self, step: Any) -> None:
        if self.bar is not None:
            self.bar.update(self.per_step)


class Cosmos3Pipeline:
    """A loaded Cosmos 3 model ready to generate: transformer, VAE, sound tokenizer, scheduler, tokenizer.

    `vae`/`sound` may be None: then only `output_type="latent"` without clean vision frames (or with
    `init_noise`) works, respectively no sound. `cache_reasoner=False` runs the joint forward (both towers) at
    every step as the reference does: same numbers, slower; kept for measuring what the cache saves.
    `mesh` and `rules`: shard the parameters (placed here unless they already carry their shardings; quantized
    kernels as `cosmos_jax.sharding.param_logical_axes` names their values and scales) and every batch on that
    mesh; without a mesh everything runs on the default device. `offload_reasoner`: the weights rest in host
    memory between calls, each shard on its device's host (`cosmos_jax.sampling.offload`); each batch runs the
    reasoner pass with only its tower on the devices, then the loop with only the generator tower.
    """

    def __init__(
        self,
        model: Cosmos3Transformer,
        params: Params,
        tokenizer: ChatTokenizer,
        scheduler_config: SchedulerConfig,
        *,
        vae: WanVAE | None = None,
        vae_params: Params | None = None,
        sound: AudioTokenizer | None = None,
        sound_params: Params | None = None,
        use_system_prompt: bool = True,
        native_flow_schedule: bool = False,
        cache_reasoner: bool = True,
        offload_reasoner: bool = False,
        mesh: Mesh | None = None,
        rules: Rules | None = None,
    ) -> None:
        if (mesh is None) != (rules is None):
            raise ValueError("give both mesh and rules, or neither")
        if (vae is None) != (vae_params is None):
            raise ValueError("give both vae and vae_params, or neither")
        if (sound is None) != (sound_params is None):
            raise ValueError("give both sound and sound_params, or neither")
        if offload_reasoner and not cache_reasoner:
            raise ValueError("offload_reasoner needs cache_reasoner (the reasoner runs once, before the loop)")
        self.mesh, self.rules = mesh, rules
        if mesh is not None:
            model = dataclasses.replace(model, sharding=ActivationSharding(mesh, rules))
            params = jax.tree.map(_global_array_of, params, param_shardings(params, mesh, rules))
        self.model = model
        self.params = params
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler_config
        self.vae = vae
        self.vae_params = vae_params
        self.sound = sound
        self.sound_params = sound_params
        self.use_system_prompt = use_system_prompt
        self.native_flow_schedule = native_flow_schedule
        self.cache_reasoner = cache_reasoner
        self.offload_reasoner = offload_reasoner
        self._encode_reasoner = jax.jit(_reasoner_cache, static_argnums=0)
        if offload_reasoner:
            self.params = offload.to_memory(params, offload.HOST)
        self._progress = _ProgressSink()
        self._executables: dict[Any, Any] = {}
        self.fp8_revision = False  # set by from_pretrained for ModelOpt's FP8 revision
        self.fp8_policy: Any = None
        self.fp8_matmul: bool | None = None  # W8A8 steps: None = where the backend has fp8 matmuls; True/False

    @property
    def config(self) -> Cosmos3Config:
        return self.model.config

    def on_mesh(self, mesh: Mesh, rules: Rules) -> Cosmos3Pipeline:
        """The same pipeline with its parameters and batches sharded on `mesh` under `rules`."""
        return Cosmos3Pipeline(
            dataclasses.replace(self.model, sharding=None), self.params, self.tokenizer, self.scheduler_config,
            vae=self.vae, vae_params=self.vae_params, sound=self.sound, sound_params=self.sound_params,
            use_system_prompt=self.use_system_prompt, native_flow_schedule=self.native_flow_schedule,
            cache_reasoner=self.cache_reasoner, offload_reasoner=self.offload_reasoner, mesh=mesh, rules=rules,
        )

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, dtype: Any = jnp.bfloat16, attention: str = "auto",
        mesh: Mesh | None = None, rules: Rules | None = None, quantize: str | None = None,
        offload_reasoner: bool = False, fp8_matmul: bool | None = None,
    ) -> Cosmos3Pipeline:
        """Load a Hub-layout (or converted) folder through `cosmos_jax.convert.load.load`; with a mesh, every
        process reads only its devices' slices of the transformer. quantize: None, "int8" or "fp8" weight-only
        (see `cosmos_jax.convert.quantize`); offload_reasoner: the towers rest in host memory between calls (see
        `cosmos_jax.sampling.offload`). fp8_matmul (ModelOpt's FP8 revision): whether the step policy's W8A8
        steps run W8A8 (`cosmos_jax.modeling.linear`); None = where the backend has fp8 matmuls (CUDA compute
        capability >= 8.9, TPU), else they run W8A16 with a warning; True also on CPU (XLA upcasts the float8
        operands: the W8A8 numbers, not its speed)."""
        from cosmos_jax.convert.load import abstract_transformer, load, locate

        shardings = None
        if mesh is not None:
            config = Cosmos3Config.from_json(locate(path).transformer_dir / "config.json")
            shardings = param_shardings(abstract_transformer(config), mesh, rules)
        loaded = load(path, dtype=dtype, shardings=shardings, quantize=quantize)
        if loaded.tokenizer_dir is None:
            raise ValueError(f"{path}: no text_tokenizer/ folder; generation needs the prompt tokenizer")
        scheduler_config = loaded.scheduler_config or SchedulerConfig.cosmos3()
        model = Cosmos3Transformer(loaded.transformer_config, dtype=dtype, attention=attention)
        vae = sound = None
        if loaded.vae_params is not None:
            vae = WanVAE(loaded.vae_config, dtype=dtype)
        if loaded.sound_params is not None:
            sound = AudioTokenizer(loaded.sound_config, dtype=dtype)
        index = loaded.model_index or {}
        pipeline = cls(
            model,
            loaded.params,
            ChatTokenizer.from_dir(loaded.tokenizer_dir),
            scheduler_config,
            vae=vae,
            vae_params=loaded.vae_params if vae is not None else None,
            sound=sound,
            sound_params=loaded.sound_params if sound is not None else None,
            use_system_prompt=bool(index.get("default_use_system_prompt", True)),
            native_flow_schedule=bool(index.get("use_native_flow_schedule", False)),
            offload_reasoner=offload_reasoner,
            mesh=mesh, rules=rules,
        )
        pipeline.fp8_revision, pipeline.fp8_policy = loaded.fp8_revision, loaded.fp8_policy
        pipeline.fp8_matmul = fp8_matmul
        return pipeline

    # ------------------------------------------------------------------ validation and preparation

    def _spatial_compression(self) -> int:
        return self.vae.config.spatial_compression if self.vae is not None else DEFAULT_SPATIAL_COMPRESSION

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Check the request against this model and decide the layout; raises ValueError/FileNotFoundError
        before any compute (the VAE is needed to encode clean frames unless `request.init_noise` is given)."""
        image, video = request.image, request.video
        if is_path(image):
            image = conditioning.load_image(image)
        if is_path(video):
            video = conditioning.load_video(video)
        cfg = self.config
        if request.enable_sound:
            if not cfg.sound_gen:
                raise ValueError("enable_sound needs a transformer trained with sound_gen=True")
            if self.sound is None:
                raise ValueError("enable_sound needs a sound tokenizer (sound_tokenizer/ in the model folder)")
        if request.action_mode is not None:
            return self._prepare_action(request, image, video)
        num_frames = 189 if request.num_frames is None else request.num_frames
        height = 720 if request.height is None else request.height
        width = 1280 if request.width is None else request.width
        sf = self._spatial_compression()
        if not (isinstance(height, int) and isinstance(width, int)) or height < sf or width < sf \
                or height % sf or width % sf:
            raise ValueError(f"height and width must be positive multiples of {sf}, got {height}x{width}")
        latent_shape = ((num_frames - 1) // TEMPORAL_COMPRESSION + 1, height // sf, width // sf)
        if num_frames == 1:
            mode, clean, pixels = _prepare_text2image(image, video)
        elif video is not None:
            mode, clean, pixels = _prepare_video2video(request, video, latent_shape, num_frames, height, width)
        elif image is not None:
            mode, clean, pixels = "image2video", (0,), conditioning.conditioning_image(image, height, width)[:, None]
        else:
            mode, clean, pixels = "text2video", (), None
        if pixels is not None and request.init_noise is None and self.vae is None:
            raise ValueError(f"{mode} needs the VAE to encode the conditioning frames (or pass init_noise)")
        cond, uncond = build_prompt_pair(
            self.tokenizer, request.prompt, request.negative_prompt, num_frames=num_frames, height=height,
            width=width, fps=request.fps, use_system_prompt=self._use_system_prompt(request),
        )
        return PreparedRequest(
            mode=mode, num_frames=num_frames, height=height, width=width, fps=float(request.fps),
            latent_shape=latent_shape, clean_frames=clean, cond_ids=cond, uncond_ids=uncond,
            use_cfg=request.use_cfg, pixels=pixels, latent_crop=None,
            sound_len=self._sound_len(num_frames, request.fps) if request.enable_sound else 0,
            action_len=0, clean_action_rows=(), action_x0=None, raw_action_dim=None, domain_id=None,
        )

    def _prepare_action(self, request: GenerationRequest, image: Any, video: Any) -> PreparedRequest:
        """The prepared request of policy / forward_dynamics / inverse_dynamics: the clip from `chunk` and the tier."""
        cfg = self.config
        mode, domain, chunk = request.action_mode, request.domain, request.chunk
        if not cfg.action_gen:
            raise ValueError("action modes need a transformer trained with action_gen=True")
        raw_dim = raw_action_dim(domain)
        domain_id = EMBODIMENT_DOMAINS[domain]
        if domain_id >= cfg.num_embodiment_domains:
            raise ValueError(f"domain {domain!r} has id {domain_id}, but the model has only "
                             f"{cfg.num_embodiment_domains} embodiment domains")
        if raw_dim > cfg.action_dim:
            raise ValueError(f"domain {domain!r} has {raw_dim} action channels, more than the model's "
                             f"action_dim={cfg.action_dim}")
        action_x0 = np.zeros((chunk, cfg.action_dim), np.float32)
        clean_rows: tuple[int, ...] = ()
        if mode == "forward_dynamics":
            actions = request.actions
            if actions.shape[0] < chunk:
                actions = np.concatenate([actions, np.repeat(actions[-1:], chunk - actions.shape[0], 0)])
            action_x0[:, :raw_dim] = actions[:chunk]
            clean_rows = tuple(range(chunk))
        clip = [image] if image is not None else list(video)
        num_frames = chunk + 1
        pixels, (content_h, content_w) = conditioning.action_clip(clip, request.resolution_tier, num_frames)
        height, width = pixels.shape[-2:]
        sf = self._spatial_compression()
        latent_t = chunk // TEMPORAL_COMPRESSION + 1
        latent_shape = (latent_t, max(content_h // sf, 1), max(content_w // sf, 1))
        clean = tuple(range(latent_t)) if mode == "inverse_dynamics" else (0,)
        pixels = pixels[:, : max(clean) * TEMPORAL_COMPRESSION + 1]
        if request.init_noise is None and self.vae is None:
            raise ValueError(f"{mode} needs the VAE to encode the conditioning frames (or pass init_noise)")
        cond, uncond = build_prompt_pair(
            self.tokenizer, request.prompt, request.negative_prompt, num_frames=num_frames, height=height,
            width=width, fps=request.fps, use_system_prompt=self._use_system_prompt(request), action_mode=mode,
            view_point=request.view_point,
        )
        return PreparedRequest(
            mode=mode, num_frames=num_frames, height=height, width=width, fps=float(request.fps),
            latent_shape=latent_shape, clean_frames=clean, cond_ids=cond, uncond_ids=uncond,
            use_cfg=request.use_cfg, pixels=pixels, latent_crop=latent_shape[1:],
            sound_len=self._sound_len(num_frames, request.fps) if request.enable_sound else 0,
            action_len=chunk, clean_action_rows=clean_rows, action_x0=action_x0, raw_action_dim=raw_dim,
            domain_id=domain_id,
        )

    def _use_system_prompt(self, request: GenerationRequest) -> bool:
        return self.use_system_prompt if request.use_system_prompt is None else request.use_system_prompt

    def _sound_len(self, num_frames: int, fps: float) -> int:
        c: AudioTokenizerConfig = self.sound.config
        samples = int(num_frames / fps * c.sampling_rate)
        return -(-samples // c.hop_length)

    # ------------------------------------------------------------------ starting latents

    def _encode_clean(self, prep: PreparedRequest) -> np.ndarray:
        """[C, T, h, w] float32 normalised latents holding the clean frames (zeros elsewhere)."""
        t, h, w = prep.latent_shape
        x0 = np.zeros((self.config.latent_channel, t, h, w), np.float32)
        vae_dtype = self.vae.dtype
        pixels = jnp.asarray(prep.pixels[None], vae_dtype)
        mu = self.vae.encode(self.vae_params, pixels)
        z = np.asarray(self.vae.normalize(mu).astype(jnp.float32))[0]
        z = z[:, :, :h, :w]
        x0[:, : z.shape[1]] = z
        return x0

    def given_latents(
        self, prep: PreparedRequest, init_noise: Any, init_sound_noise: Any, init_action_noise: Any
    ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        """The caller's starting latents (arrays or .npy paths) as float32, each checked against the prep."""
        cfg = self.config
        v_shape = (1, cfg.latent_channel, *prep.latent_shape)
        s_shape = (cfg.sound_dim, prep.sound_len) if prep.sound_len else None
        a_shape = (prep.action_len, cfg.action_dim) if prep.action_len else None
        return (
            _checked_noise("init_noise", init_noise, v_shape),
            _checked_noise("init_sound_noise", init_sound_noise, s_shape),
            _checked_noise("init_action_noise", init_action_noise, a_shape),
        )

    def starting_latents(
        self, prep: PreparedRequest, key: jax.Array, given: tuple[np.ndarray | None, ...],
        clean: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(vision [1, C, T, h, w], sound [S, Ts] | None, action [chunk, A] | None) float32 of one sample: the
        given tensors as they are, else noise from the sample's `key` (vision → sound → action, see
        `cosmos_jax.sampling.batch.sample_noise`) with the clean frames/rows put in. `clean` is the prepared request.s
        encoded clean frames [C, T, h, w] when the caller already has them (encoded here otherwise)."""
        cfg = self.config
        v_shape = (1, cfg.latent_channel, *prep.latent_shape)
        s_shape = (cfg.sound_dim, prep.sound_len) if prep.sound_len else None
        a_shape = (prep.action_len, cfg.action_dim) if prep.action_len else None
        given_v, given_s, given_a = given
        vision, sound, action = sample_noise(key, v_shape, s_shape, a_shape)
        if given_v is not None:
            vision = given_v
        elif prep.clean_frames:
            mask = np.zeros((prep.latent_shape[0], 1, 1), bool)
            mask[list(prep.clean_frames)] = True
            clean = self._encode_clean(prep) if clean is None else clean
            vision = np.where(mask, clean[None], vision).astype(np.float32)
        if given_s is not None:
            sound = given_s
        if given_a is not None:
            action = given_a
        elif action is not None:
            rows = np.zeros((prep.action_len, 1), bool)
            rows[list(prep.clean_action_rows)] = True
            action = np.where(rows, prep.action_x0, action).astype(np.float32)
            action[:, prep.raw_action_dim :] = 0
        return vision, sound, action

    # ------------------------------------------------------------------ batches

    def prepare_batch(self, samples: Sequence[Sample]) -> PreparedBatch:
        """Plan the samples of one batch (each distinct request once) and check they share one shape."""
        samples = tuple(samples)
        preps: dict[int, PreparedRequest] = {}
        for sample in samples:
            if id(sample.request) not in preps:
                preps[id(sample.request)] = self._checked_prepare(sample.request)
        ordered = tuple(preps[id(s.request)] for s in samples)
        shape = common_shape([BatchShape.of(p, s.request.steps) for s, p in zip(samples, ordered)])
        return PreparedBatch(samples, ordered, shape)

    def prepare_batches(self, samples: Sequence[Sample], batch_size: int | None = None) -> list[PreparedBatch]:
        """Group samples into same-shape batches of at most `batch_size` (default: the mesh's data axis size;
        it must be a multiple of it). Every request is prepared (and checked) once, before any compute."""
        data = self.data_size
        batch_size = data if batch_size is None else batch_size
        check_batch_size(batch_size, data)
        preps: dict[int, PreparedRequest] = {}
        for sample in samples:
            if id(sample.request) not in preps:
                preps[id(sample.request)] = self._checked_prepare(sample.request)
        ordered = [preps[id(s.request)] for s in samples]
        shapes = [BatchShape.of(p, s.request.steps) for s, p in zip(samples, ordered)]
        return [PreparedBatch(tuple(samples[i] for i in group), tuple(ordered[i] for i in group), shapes[group[0]])
                for group in group_batches(shapes, batch_size, data)]

    def _checked_prepare(self, request: GenerationRequest) -> PreparedRequest:
        if request.output_type == "video" and self.vae is None:
            raise ValueError("output_type='video' needs a VAE; this pipeline has none (use output_type='latent')")
        if self.fp8_revision:
            note = fallback_note(self.fp8_policy, request.steps, self.fp8_matmul,
                                 native=has_native_kernels(self.params))
            if note is not None:
                warnings.warn(note, stacklevel=2)
        prep = self.prepare(request)
        self.given_latents(prep, request.init_noise, request.init_sound_noise, request.init_action_noise)
        return prep

    def step_w8a8(self, steps: int) -> tuple[frozenset[str], ...] | None:
        """Per denoising step, the FP8 linear groups that run W8A8 (None: not an FP8 revision)."""
        if not self.fp8_revision:
            return None
        enabled = has_fp8_matmul() if self.fp8_matmul is None else self.fp8_matmul
        return step_w8a8_groups(self.fp8_policy, steps, enabled)

    @property
    def data_size(self) -> int:
        """The size of the mesh's `data` axis (1 without a mesh): batches are padded to a multiple of it."""
        return 1 if self.mesh is None else int(self.mesh.shape["data"])

    def run_batch(self, batch: PreparedBatch | Sequence[Sample], *, progress: bool = True,
                  on_step: Callable[[float], None] | None = None) -> list[GenerationResult]:
        """Generate every sample of one same-shape batch in one jitted loop (see cosmos_jax.sampling.batch).

        The batch is padded to a multiple of the mesh's data axis (the padding repeats the last sample and is
        dropped). Returns the results of the samples this process owns, in batch order: all of them in a
        single process; under jax.distributed, each process gets the samples whose rows its devices hold.
        `progress` shows a bar of denoising steps; `on_step(fraction_done)` (instead of the bar) is called
        after every step with the fraction of the batch's steps done, for callers that report progress
        themselves (the server).
        """
        if on_step is not None:
            return self._run_batch(batch, _StepFraction(batch_steps(batch), on_step), 1.0)
        bar = _progress_bar(batch_steps(batch)) if progress else None
        try:
            return self._run_batch(batch, bar, 1.0, ticking=progress)
        finally:
            if bar is not None:
                bar.close()

    def generate_samples(
        self, requests: Sequence[GenerationRequest], *, num_samples: int = 1, batch_size: int | None = None,
        progress: bool = True,
    ) -> Iterator[GenerationResult]:
        """Samples 0..num_samples-1 of every request, in same-shape batches of at most `batch_size`, yielded
        batch by batch as they finish (host memory holds one batch). Everything is prepared and checked before
        any compute; one progress bar (samples/s) covers the run. Under jax.distributed every process yields
        the samples it owns (see `run_batch`)."""
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        samples = [Sample(r, k) for r in requests for k in range(num_samples)]
        batches = self.prepare_batches(samples, batch_size)
        show = progress and jax.process_index() == 0
        bar = _progress_bar(len(samples), unit="sample", desc="generating") if show else None
        try:
            for batch in batches:
                yield from self._run_batch(batch, bar, len(batch.samples) / batch.shape.steps, ticking=progress)
        finally:
            if bar is not None:
                bar.close()

    def _run_batch(self, batch: PreparedBatch | Sequence[Sample], bar: Any, per_step: float,
                   ticking: bool | None = None) -> list[GenerationResult]:
        """`ticking`: whether the loop reports its steps (to `bar`); default: when there is a bar. Give it
        explicitly under jax.distributed, where only one process has the bar but all run the same program."""
        start = time.perf_counter()
        ticking = bar is not None if ticking is None else ticking
        if not isinstance(batch, PreparedBatch):
            batch = self.prepare_batch(batch)
        shape = batch.shape
        count = padded_size(len(batch.samples), self.data_size)
        samples = batch.samples + (batch.samples[-1],) * (count - len(batch.samples))
        preps = batch.preps + (batch.preps[-1],) * (count - len(batch.preps))
        latents = self._batch_latents(samples, preps)
        rows = batch_rows(self.config, preps, [s.request.guidance for s in samples], self._pad_id())
        schedule = scheduler.make_schedule(self.scheduler_config, shape.steps, native_flow=self.native_flow_schedule)
        text = self._replicated(rows.text)
        params: Any = self.params
        cache: tuple = ()
        if self.offload_reasoner:
            models, _ = step_models(self.model, self.step_w8a8(shape.steps))
            reasoner_params = offload.reasoner_pass_params(self.params)
            cache = (tuple(aot.call(f"reasoner encode, {rows.distinct_prompts} prompts", self._encode_reasoner, m,
                                    reasoner_params, text) for m in models),)
            del reasoner_params
            params = offload.generator_params(self.params)
        args = (params, text, self._per_row(rows.static), self._per_row(latents),
                self._replicated(schedule.coefficients),
                self._replicated(np.asarray(schedule.timesteps, np.float32))) + cache
        del cache
        timings = {"prepare": time.perf_counter() - start}
        compiled, timings["compile"], cached = self._executable(shape, args, ticking)
        start = time.perf_counter()
        self._progress.bar, self._progress.per_step = bar, per_step
        try:
            label = f"denoising loop ({shape.describe()}), {count} samples, {rows.distinct_prompts} prompts"
            final = jax.block_until_ready(aot.execute(label, compiled, timings["compile"], cached, *args))
            jax.effects_barrier()
            del args, params  # with offload, the generator's device copy goes here
        finally:
            self._progress.bar = None
        timings["denoise"] = time.perf_counter() - start
        owned = {name: owned_rows(x) for name, x in final.items()}
        results = []
        for i, (sample, prep) in enumerate(zip(batch.samples, batch.preps)):
            if i in owned["vision"]:
                results.append(self._result(sample, prep, {name: rows[i] for name, rows in owned.items()},
                                            dict(timings)))
        return results

    def _batch_latents(self, samples: Sequence[Sample], preps: Sequence[PreparedRequest]) -> dict[str, np.ndarray]:
        """The stacked starting latents of a batch {"vision" [N, C, T, h, w], "sound" [N, S, Ts], "action"
        [N, chunk, A]}; clean frames are encoded once per distinct request."""
        clean: dict[int, np.ndarray] = {}
        given: dict[int, tuple] = {}
        stacks: dict[str, list[np.ndarray]] = {"vision": [], "sound": [], "action": []}
        for sample, prep in zip(samples, preps):
            request = sample.request
            if id(prep) not in given:
                given[id(prep)] = self.given_latents(prep, request.init_noise, request.init_sound_noise,
                                                     request.init_action_noise)
                if prep.clean_frames and given[id(prep)][0] is None:
                    clean[id(prep)] = self._encode_clean(prep)
            vision, sound, action = self.starting_latents(
                prep, sample_key(request.seed, sample.index), given[id(prep)], clean.get(id(prep)))
            for name, x in (("vision", vision[0]), ("sound", sound), ("action", action)):
                if x is not None:
                    stacks[name].append(x)
        return {name: np.stack(xs) for name, xs in stacks.items() if xs}

    def _result(self, sample: Sample, prep: PreparedRequest, final: dict[str, np.ndarray],
                timings: dict[str, float]) -> GenerationResult:
        """One sample's result from its rows of the final latents (decoded as its request asks)."""
        start = time.perf_counter()
        result = GenerationResult(mode=prep.mode, fps=prep.fps, latents=np.asarray(final["vision"])[None],
                                  seed=sample.seed, sample_index=sample.index)
        if sample.request.output_type == "video":
            result.video = self.decode_video(result.latents)
        if "sound" in final:
            result.sound_latents = np.asarray(final["sound"])
            result.sound = np.asarray(self.sound.decode(self.sound_params, jnp.asarray(final["sound"])), np.float32)
            result.sample_rate = self.sound.config.sampling_rate
        if prep.mode in ("policy", "inverse_dynamics"):
            result.actions = np.asarray(final["action"])[:, : prep.raw_action_dim]
        timings["decode"] = time.perf_counter() - start
        result.timings = timings
        return result

    def _pad_id(self) -> int:
        return self.tokenizer.tokenizer.token_to_id(self.tokenizer.special_tokens.get("pad_token", "")) or 0

    # ------------------------------------------------------------------ placement on the mesh

    def _replicated(self, tree: Any) -> Any:
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, tree)
        return jax.tree.map(lambda x: _global_array(np.asarray(x), NamedSharding(self.mesh, PartitionSpec())), tree)

    def _per_row(self, tree: Any) -> Any:
        """Arrays whose leading axis is the batch (rows or samples), sharded as the logical `batch` axis."""
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, tree)
        return jax.tree.map(lambda x: _global_array(np.asarray(x), self._batch_sharding(np.shape(x))), tree)

    def _batch_sharding(self, shape: tuple[int, ...]) -> NamedSharding:
        names = (BATCH,) + (None,) * (len(shape) - 1)
        return NamedSharding(self.mesh, spec_for(shape, names, self.rules, self.mesh))

    def _executable(self, shape: BatchShape, args: tuple, ticking: bool) -> tuple[Any, float, bool]:
        """The compiled loop for this shape signature (compiled once, then reused), the compile seconds (0 when
        reused) and whether the persistent compile cache had it. `ticking`: the loop reports its steps."""
        leaves, treedef = jax.tree_util.tree_flatten(args)
        signature = tuple((x.shape, jnp.result_type(x)) for x in leaves)
        step_w8a8 = self.step_w8a8(shape.steps)
        key = (shape.use_cfg, shape.steps_action, self.cache_reasoner, self.offload_reasoner, step_w8a8, ticking,
               treedef, signature)
        if key in self._executables:
            return self._executables[key], 0.0, True
        fn = batch_denoiser(self.model, shape, self.cache_reasoner, self._progress.tick if ticking else None,
                            given_cache=self.offload_reasoner, step_w8a8=step_w8a8)
        out_shardings = None
        if self.mesh is not None:
            out_shardings = jax.tree.map(lambda x: self._batch_sharding(x.shape), args[3])
        compiled, seconds, cached = aot.lower_and_compile(
            lambda: jax.jit(fn, out_shardings=out_shardings).lower(*args).compile())
        self._executables[key] = compiled
        return compiled, seconds, cached

    def __call__(self, request: GenerationRequest, *, progress: bool = True) -> GenerationResult | None:
        """Generate sample 0 of `request` (a batch of one; see the module docstring); `progress` shows a step
        bar. Under jax.distributed only the process that owns the sample gets it; the others get None."""
        results = self.run_batch([Sample(request, 0)], progress=progress)
        return results[0] if results else None

    def decode_video(self, latents: np.ndarray) -> np.ndarray:
        """Normalised latents [1, C, T, h, w] -> frames [F, H, W, 3] float32 in [0, 1]."""
        z = self.vae.denormalize(jnp.asarray(latents))
        pixels = self.vae.decode(self.vae_params, z).astype(jnp.float32)  # [1, 3, F, H, W] in [-1, 1]
        frames = jnp.clip(pixels[0] / 2 + 0.5, 0.0, 1.0)
        return np.asarray(jnp.transpose(frames, (1, 2, 3, 0)))


def _reasoner_cache(model: Cosmos3Transformer, params: Params, text: Any) -> Any:
    """The distinct prompts' reasoner K/V under `model` (jitted with the model static)."""
    return model.encode_reasoner(params, text)[0]


def batch_steps(batch: PreparedBatch | Sequence[Sample]) -> int:
    """The denoising steps of a batch (its first sample's)."""
    return batch.shape.steps if isinstance(batch, PreparedBatch) else batch[0].request.steps


def _global_array(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A (possibly multi-process) global array from a host array every process holds in full."""
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _prepare_text2image(image: Any, video: Any) -> tuple[str, tuple[int, ...], None]:
    """(mode, clean latent frames, pixels) of a one-frame request: nothing to condition on."""
    if image is not None or video is not None:
        raise ValueError("image/video conditioning needs num_frames > 1 (a video to continue)")
    return "text2image", (), None


def _prepare_video2video(
    request: GenerationRequest, video: Any, latent_shape: tuple[int, int, int], num_frames: int, height: int,
    width: int,
) -> tuple[str, tuple[int, ...], np.ndarray]:
    """(mode, clean latent frames, pixels [3, F', H, W]) of a video continuation: the leading frames of `video`
    that cover the clean latent frames, the last one repeated when the video is short."""
    clean = request.condition_frames
    if not clean or not all(isinstance(i, int) and i >= 0 for i in clean):
        raise ValueError(f"condition_frames must be non-empty non-negative ints, got {request.condition_frames!r}")
    if max(clean) >= latent_shape[0]:
        raise ValueError(f"condition_frames {clean} reach past the {latent_shape[0]} latent frames of "
                         f"a {num_frames}-frame video")
    keep = max(clean) * TEMPORAL_COMPRESSION + 1
    frames = conditioning.video_frames(list(video), height, width)[:, :keep]
    return "video2video", clean, _repeat_last_frame(frames, min(keep, num_frames))


def _repeat_last_frame(frames: np.ndarray, num_frames: int) -> np.ndarray:
    """[3, F, H, W] cut or padded (last frame repeated) to num_frames frames."""
    if frames.shape[1] >= num_frames:
        return frames[:, :num_frames]
    pad = np.repeat(frames[:, -1:], num_frames - frames.shape[1], axis=1)
    return np.concatenate([frames, pad], axis=1)


def _checked_noise(name: str, value: Any, shape: tuple[int, ...] | None) -> np.ndarray | None:
    """A given starting tensor as float32, after checking it belongs to this request and has `shape`."""
    if value is None:
        return None
    if shape is None:
        raise ValueError(f"{name} was given but this request has no such modality")
    if is_path(value):
        if not os.path.isfile(value):
            raise FileNotFoundError(f"{name} file not found: {value}")
        value = np.load(value)
    array = np.asarray(value, np.float32)
    if array.shape != shape:
        raise ValueError(f"{name} must have shape {list(shape)} for this request, got {list(array.shape)}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or Inf")
    return array


def _global_array_of(x: Any, sharding: NamedSharding) -> jax.Array:
    """A parameter placed with `sharding` (kept as is when it already has it)."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    return _global_array(np.asarray(x), sharding)


class _StepFraction:
    """Takes the denoising loop's per-step ticks (the progress bar's `update`) and reports the fraction done."""

    def __init__(self, steps: int, report: Callable[[float], None]) -> None:
        self.steps, self.done, self.report = max(steps, 1), 0.0, report

    def update(self, n: float) -> None:
        self.done += n
        self.report(min(self.done / self.steps, 1.0))


def _progress_bar(total: int, unit: str = "step", desc: str = "denoising") -> Any:
    from tqdm.auto import tqdm

    bar_format = "{l_bar}{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]"
    return tqdm(total=total, desc=desc, unit=unit, bar_format=bar_format)
