"""The Cosmos 3 generation pipeline: every mode of `Cosmos3OmniPipeline`, with the denoising loop jitted.

Modes: text→image, text→video, image→video, video→video (clean leading latent frames), and the action modes
policy, forward_dynamics, inverse_dynamics; optional joint sound. The numbers follow the reference (docs/model.md, "Conditioning per mode"):
noise drawn vision → sound → action, starting latents `mask·x0 + (1−mask)·noise` (or the given ones, used as
is), velocities zero at clean frames/rows, classifier-free guidance `u + g·(c − u)` per modality, one UniPC
state per modality sharing the coefficients, action channels ≥ the raw width zeroed in the noise, the
velocities and after every step, latent (de)normalisation with the statistics rounded to the VAE dtype.

How it runs (differs from the reference, same numbers):
- both guidance branches are rows of one batch (the two prompts right-padded and masked);
- the reasoner K/V are computed once per call (`Cosmos3Transformer.encode_reasoner`), not at every step;
- the whole loop is one jitted `jax.lax.scan` compiled ahead of time once per shape signature; progress is
  reported by `jax.debug.callback` with the step index only (no latents leave the device until the end).
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cosmos_jax.config import Cosmos3Config
from cosmos_jax.convert.modelopt_fp8 import fallback_note
from cosmos_jax.modeling.audio_tokenizer import AudioTokenizer, AudioTokenizerConfig
from cosmos_jax.modeling.inputs import GeneratorInputs, TextInputs
from cosmos_jax.modeling.transformer import Cosmos3Transformer, Params
from cosmos_jax.modeling.wan_vae import WanVAE
from cosmos_jax.packing import batch_generator_positions, batch_text, layout_sequence
from cosmos_jax.sampling import conditioning, offload, scheduler
from cosmos_jax.sampling.prompts import EMBODIMENT_DOMAINS, ChatTokenizer, build_prompt_pair, raw_action_dim
from cosmos_jax.sampling.request import TEMPORAL_COMPRESSION, GenerationRequest, is_path
from cosmos_jax.scheduler_config import SchedulerConfig

DEFAULT_SPATIAL_COMPRESSION = 16


@dataclasses.dataclass
class GenerationResult:
    """What one call produced (numpy, float32).

    latents [1, 48, T, h, w] (final, normalised); video [F, H, W, 3] in [0, 1] (None for output_type="latent");
    sound_latents [64, Ts] and sound [channels, N] waveform at `sample_rate` (None without sound);
    actions [chunk, raw width] in model space (policy / inverse dynamics, else None);
    timings: seconds for "prepare", "compile" (0 when cached), "denoise", "decode".
    """

    mode: str
    fps: float
    latents: np.ndarray
    video: np.ndarray | None = None
    sound_latents: np.ndarray | None = None
    sound: np.ndarray | None = None
    sample_rate: int | None = None
    actions: np.ndarray | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class GenerationPlan:
    """Everything decided host-side before any compute: mode, geometry, latent layout, prompt ids, the
    pixels to encode for clean frames, the action rows (forward dynamics' given actions) and domain."""

    mode: str
    num_frames: int
    height: int
    width: int
    fps: float
    latent_shape: tuple[int, int, int]
    clean_frames: tuple[int, ...]
    cond_ids: list[int]
    uncond_ids: list[int]
    use_cfg: bool
    pixels: np.ndarray | None  # [3, F', H, W] frames to encode for the clean latent frames
    latent_crop: tuple[int, int] | None  # action canvas: keep latent [:h, :w]
    sound_len: int
    action_len: int
    clean_action_rows: tuple[int, ...]
    action_x0: np.ndarray | None  # [chunk, action_dim]
    raw_action_dim: int | None
    domain_id: int | None


class _ProgressSink:
    """Where the jitted loop's per-step callback lands: a tqdm bar while a call runs, nothing otherwise."""

    def __init__(self) -> None:
        self.bar: Any = None

    def tick(self, step: Any) -> None:
        if self.bar is not None:
            self.bar.update(1)


class Cosmos3Pipeline:
    """A loaded Cosmos 3 model ready to generate: transformer, VAE, sound tokenizer, scheduler, tokenizer.

    `vae`/`sound` may be None: then only `output_type="latent"` without clean vision frames (or with
    `init_noise`) works, respectively no sound. `cache_reasoner=False` runs the joint forward (both towers) at
    every step as the reference does: same numbers, slower; kept for measuring what the cache saves.
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
    ) -> None:
        if (vae is None) != (vae_params is None):
            raise ValueError("give both vae and vae_params, or neither")
        if (sound is None) != (sound_params is None):
            raise ValueError("give both sound and sound_params, or neither")
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
        if offload_reasoner and not cache_reasoner:
            raise ValueError("offload_reasoner needs cache_reasoner (the reasoner runs once, before the loop)")
        self.offload_reasoner = offload_reasoner
        self._encode_reasoner = jax.jit(lambda p, t: model.encode_reasoner(p, t)[0])
        if offload_reasoner:
            self.params = offload.to_memory(params, offload.HOST)
        self._progress = _ProgressSink()
        self._executables: dict[Any, Any] = {}
        self.fp8_revision = False  # set by from_pretrained for ModelOpt's FP8 revision
        self.fp8_policy: Any = None

    @property
    def config(self) -> Cosmos3Config:
        return self.model.config

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, dtype: Any = jnp.bfloat16, attention: str = "auto",
        quantize: str | None = None, offload_reasoner: bool = False,
    ) -> Cosmos3Pipeline:
        """Load a Hub-layout (or converted) folder through `cosmos_jax.convert.load.load` (quantize: None, "int8"
        or "fp8" weight-only, see `cosmos_jax.convert.quantize`)."""
        from cosmos_jax.convert.load import load

        loaded = load(path, dtype=dtype, quantize=quantize)
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
        )
        pipeline.fp8_revision, pipeline.fp8_policy = loaded.fp8_revision, loaded.fp8_policy
        return pipeline

    # ------------------------------------------------------------------ validation and planning

    def _spatial_compression(self) -> int:
        return self.vae.config.spatial_compression if self.vae is not None else DEFAULT_SPATIAL_COMPRESSION

    def plan(self, request: GenerationRequest) -> GenerationPlan:
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
            return self._plan_action(request, image, video)
        num_frames = 189 if request.num_frames is None else request.num_frames
        height = 720 if request.height is None else request.height
        width = 1280 if request.width is None else request.width
        sf = self._spatial_compression()
        if not (isinstance(height, int) and isinstance(width, int)) or height < sf or width < sf \
                or height % sf or width % sf:
            raise ValueError(f"height and width must be positive multiples of {sf}, got {height}x{width}")
        latent_shape = ((num_frames - 1) // TEMPORAL_COMPRESSION + 1, height // sf, width // sf)
        if num_frames == 1:
            mode, clean, pixels = _plan_text2image(image, video)
        elif video is not None:
            mode, clean, pixels = _plan_video2video(request, video, latent_shape, num_frames, height, width)
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
        return GenerationPlan(
            mode=mode, num_frames=num_frames, height=height, width=width, fps=float(request.fps),
            latent_shape=latent_shape, clean_frames=clean, cond_ids=cond, uncond_ids=uncond,
            use_cfg=request.use_cfg, pixels=pixels, latent_crop=None,
            sound_len=self._sound_len(num_frames, request.fps) if request.enable_sound else 0,
            action_len=0, clean_action_rows=(), action_x0=None, raw_action_dim=None, domain_id=None,
        )

    def _plan_action(self, request: GenerationRequest, image: Any, video: Any) -> GenerationPlan:
        """The plan of policy / forward_dynamics / inverse_dynamics: the clip from `chunk` and the tier."""
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
        return GenerationPlan(
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

    def _encode_clean(self, plan: GenerationPlan) -> np.ndarray:
        """[C, T, h, w] float32 normalised latents holding the clean frames (zeros elsewhere)."""
        t, h, w = plan.latent_shape
        x0 = np.zeros((self.config.latent_channel, t, h, w), np.float32)
        vae_dtype = self.vae.dtype
        pixels = jnp.asarray(plan.pixels[None], vae_dtype)
        mu = self.vae.encode(self.vae_params, pixels)
        z = np.asarray(self.vae.normalize(mu).astype(jnp.float32))[0]
        z = z[:, :, :h, :w]
        x0[:, : z.shape[1]] = z
        return x0

    def given_latents(
        self, plan: GenerationPlan, init_noise: Any, init_sound_noise: Any, init_action_noise: Any
    ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        """The caller's starting latents (arrays or .npy paths) as float32, each checked against the plan."""
        cfg = self.config
        v_shape = (1, cfg.latent_channel, *plan.latent_shape)
        s_shape = (cfg.sound_dim, plan.sound_len) if plan.sound_len else None
        a_shape = (plan.action_len, cfg.action_dim) if plan.action_len else None
        return (
            _checked_noise("init_noise", init_noise, v_shape),
            _checked_noise("init_sound_noise", init_sound_noise, s_shape),
            _checked_noise("init_action_noise", init_action_noise, a_shape),
        )

    def _starting_latents(
        self, plan: GenerationPlan, seed: int, given_v: np.ndarray | None, given_s: np.ndarray | None,
        given_a: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(vision [1, C, T, h, w], sound [S, Ts] | None, action [chunk, A] | None) in float32: the given
        tensors as they are, else noise (vision → sound → action) with the clean frames/rows put in."""
        cfg = self.config
        v_shape = (1, cfg.latent_channel, *plan.latent_shape)
        s_shape = (cfg.sound_dim, plan.sound_len) if plan.sound_len else None
        a_shape = (plan.action_len, cfg.action_dim) if plan.action_len else None
        key_v, key_s, key_a = jax.random.split(jax.random.key(seed), 3)
        if given_v is not None:
            vision = given_v
        else:
            vision = np.asarray(jax.random.normal(key_v, v_shape, jnp.float32))
            if plan.clean_frames:
                mask = np.zeros((plan.latent_shape[0], 1, 1), bool)
                mask[list(plan.clean_frames)] = True
                vision = np.where(mask, self._encode_clean(plan)[None], vision).astype(np.float32)
        sound = None
        if s_shape is not None:
            sound = given_s if given_s is not None else np.asarray(jax.random.normal(key_s, s_shape, jnp.float32))
        action = None
        if a_shape is not None:
            if given_a is not None:
                action = given_a
            else:
                action = np.asarray(jax.random.normal(key_a, a_shape, jnp.float32))
                rows = np.zeros((plan.action_len, 1), bool)
                rows[list(plan.clean_action_rows)] = True
                action = np.where(rows, plan.action_x0, action).astype(np.float32)
                action[:, plan.raw_action_dim :] = 0
        return vision, sound, action

    # ------------------------------------------------------------------ the jitted loop

    def _model_inputs(self, plan: GenerationPlan) -> tuple[TextInputs, dict[str, Any]]:
        """Batched text (cond row, then uncond row when guiding) and the static generator fields."""
        ids = [plan.cond_ids, plan.uncond_ids] if plan.use_cfg else [plan.cond_ids]
        layouts = [
            layout_sequence(
                self.config, len(row), plan.latent_shape, fps=plan.fps, clean_vision_frames=plan.clean_frames,
                sound_len=plan.sound_len, action_len=plan.action_len, clean_action_rows=plan.clean_action_rows,
                vae_temporal_compression=TEMPORAL_COMPRESSION,
            )
            for row in ids
        ]
        pad_id = self.tokenizer.tokenizer.token_to_id(self.tokenizer.special_tokens.get("pad_token", "")) or 0
        text = jax.tree.map(jnp.asarray, batch_text(ids, layouts, pad_id=pad_id))
        b = len(ids)
        static: dict[str, Any] = {
            "position_ids": jnp.asarray(batch_generator_positions(layouts)),
            "vision_noisy": jnp.asarray(np.stack([lay.vision_noisy for lay in layouts])),
        }
        if plan.sound_len:
            static["sound_noisy"] = jnp.ones((b, plan.sound_len), bool)
        if plan.action_len:
            static["action_noisy"] = jnp.asarray(np.stack([lay.action_noisy for lay in layouts]))
            static["action_domain"] = jnp.full((b,), plan.domain_id, jnp.int32)
            static["action_channels"] = jnp.arange(self.config.action_dim) < plan.raw_action_dim
        return text, static

    def _executable(self, plan: GenerationPlan, args: tuple) -> tuple[Any, float]:
        """The compiled loop for this shape signature (compiled once, then reused) and the compile seconds."""
        leaves, treedef = jax.tree_util.tree_flatten(args)
        step_action = bool(plan.action_len) and len(plan.clean_action_rows) < plan.action_len
        shapes = tuple((x.shape, jnp.result_type(x)) for x in leaves)
        key = (plan.use_cfg, step_action, self.cache_reasoner, self.offload_reasoner, treedef, shapes)
        if key in self._executables:
            return self._executables[key], 0.0
        fn = _denoiser(self.model, plan.use_cfg, step_action, self.cache_reasoner, self._progress.tick,
                       given_cache=self.offload_reasoner)
        start = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()
        self._executables[key] = compiled
        return compiled, time.perf_counter() - start

    def __call__(self, request: GenerationRequest, *, progress: bool = True) -> GenerationResult:
        """Generate what `request` asks for (see the module docstring); `progress` shows a step bar."""
        start = time.perf_counter()
        if request.output_type == "video" and self.vae is None:
            raise ValueError("output_type='video' needs a VAE; this pipeline has none (use output_type='latent')")
        steps = request.steps
        if self.fp8_revision:
            note = fallback_note(self.fp8_policy, steps)
            if note is not None:
                warnings.warn(note, stacklevel=2)
        plan = self.plan(request)
        given = self.given_latents(plan, request.init_noise, request.init_sound_noise, request.init_action_noise)
        vision, sound, action = self._starting_latents(plan, request.seed, *given)
        schedule = scheduler.make_schedule(self.scheduler_config, steps, native_flow=self.native_flow_schedule)
        text, static = self._model_inputs(plan)
        coefficients = jax.tree.map(jnp.asarray, schedule.coefficients)
        latents = {"vision": jnp.asarray(vision)}
        if sound is not None:
            latents["sound"] = jnp.asarray(sound)
        if action is not None:
            latents["action"] = jnp.asarray(action)
        params: Any = self.params
        if self.offload_reasoner:
            cache = self._encode_reasoner(offload.reasoner_pass_params(self.params), text)
            params = offload.generator_params(self.params)
        args = (params, text, static, latents, coefficients,
                jnp.asarray(schedule.timesteps.astype(np.float32)), jnp.float32(request.guidance))
        if self.offload_reasoner:
            args += (cache,)
            del cache
        timings = {"prepare": time.perf_counter() - start}
        compiled, timings["compile"] = self._executable(plan, args)
        start = time.perf_counter()
        self._progress.bar = _progress_bar(steps) if progress else None
        try:
            final = jax.block_until_ready(compiled(*args))
            jax.effects_barrier()
            del args, params  # with offload, the generator's device copy goes here
        finally:
            if self._progress.bar is not None:
                self._progress.bar.close()
            self._progress.bar = None
        timings["denoise"] = time.perf_counter() - start
        start = time.perf_counter()
        result = GenerationResult(mode=plan.mode, fps=plan.fps, latents=np.asarray(final["vision"]))
        if request.output_type == "video":
            result.video = self.decode_video(result.latents)
        if sound is not None:
            result.sound_latents = np.asarray(final["sound"])
            result.sound = np.asarray(self.sound.decode(self.sound_params, final["sound"]), np.float32)
            result.sample_rate = self.sound.config.sampling_rate
        if plan.mode in ("policy", "inverse_dynamics"):
            result.actions = np.asarray(final["action"])[:, : plan.raw_action_dim]
        timings["decode"] = time.perf_counter() - start
        result.timings = timings
        return result

    def decode_video(self, latents: np.ndarray) -> np.ndarray:
        """Normalised latents [1, C, T, h, w] -> frames [F, H, W, 3] float32 in [0, 1]."""
        z = self.vae.denormalize(jnp.asarray(latents))
        pixels = self.vae.decode(self.vae_params, z).astype(jnp.float32)  # [1, 3, F, H, W] in [-1, 1]
        frames = jnp.clip(pixels[0] / 2 + 0.5, 0.0, 1.0)
        return np.asarray(jnp.transpose(frames, (1, 2, 3, 0)))


def _denoiser(
    model: Cosmos3Transformer, use_cfg: bool, step_action: bool, cache_reasoner: bool, tick: Callable[[Any], None],
    given_cache: bool = False,
) -> Callable:
    """The whole sampling loop as one pure function: reasoner K/V once, then a scan of generator steps
    (with `cache_reasoner=False`, the joint forward of both towers at every step; with `given_cache`, the cache
    is a last argument computed beforehand and `params` need only the generator tree)."""

    def run(params, text, static, latents, coefficients, timesteps, guidance, cache=None):
        if not given_cache:
            cache = model.encode_reasoner(params, text)[0] if cache_reasoner else None
        rows = text.und_len.shape[0]

        def batch(x: jax.Array) -> jax.Array:
            return jnp.broadcast_to(x[None], (rows, *x.shape)).astype(model.dtype)

        def combine(v: jax.Array) -> jax.Array:
            v = v.astype(jnp.float32)
            return v[1] + guidance * (v[0] - v[1]) if use_cfg else v[0]

        def body(carry, i):
            x, states = carry
            t = jnp.full((rows,), timesteps[i], jnp.float32)
            gen = GeneratorInputs(
                position_ids=static["position_ids"],
                vision=batch(x["vision"][0]), vision_noisy=static["vision_noisy"], vision_t=t,
                sound=batch(x["sound"]) if "sound" in x else None,
                sound_noisy=static.get("sound_noisy"), sound_t=t if "sound" in x else None,
                action=batch(x["action"]) if "action" in x else None,
                action_noisy=static.get("action_noisy"), action_t=t if "action" in x else None,
                action_domain=static.get("action_domain"),
            )
            out = model.denoise_step(params, cache, gen) if cache_reasoner else model(params, text, gen)
            new_x, new_states = dict(x), dict(states)
            new_x["vision"], new_states["vision"] = scheduler.step(
                coefficients, states["vision"], combine(out.vision)[None], x["vision"])
            if "sound" in x:
                new_x["sound"], new_states["sound"] = scheduler.step(
                    coefficients, states["sound"], combine(out.sound), x["sound"])
            if "action" in x and step_action:
                channels = static["action_channels"]
                velocity = jnp.where(channels, combine(out.action), 0.0)
                stepped, new_states["action"] = scheduler.step(coefficients, states["action"], velocity, x["action"])
                new_x["action"] = jnp.where(channels, stepped, 0.0)
            jax.debug.callback(tick, i)
            return (new_x, new_states), None

        states = {name: scheduler.init_state(x.shape) for name, x in latents.items()}
        (final, _), _ = jax.lax.scan(body, (latents, states), jnp.arange(timesteps.shape[0]))
        return final

    return run


def _plan_text2image(image: Any, video: Any) -> tuple[str, tuple[int, ...], None]:
    """(mode, clean latent frames, pixels) of a one-frame request: nothing to condition on."""
    if image is not None or video is not None:
        raise ValueError("image/video conditioning needs num_frames > 1 (a video to continue)")
    return "text2image", (), None


def _plan_video2video(
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


def _progress_bar(total: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="denoising", unit="step")
