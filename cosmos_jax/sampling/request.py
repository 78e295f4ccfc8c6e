"""`GenerationRequest`: everything one call of `Cosmos3Pipeline` is asked to do, checked when it is built.

A request is frozen and independent of any model: the checks that need no model (types, ranges, which fields
go with which mode) run in `__post_init__` and raise a one-line `ValueError` naming the field. The checks that
need the loaded model (sound or action heads, the VAE's spatial compression, the number of embodiment domains)
run when the pipeline prepares the request (`Cosmos3Pipeline.prepare`). Image and video paths are read at preparation
time too, so building a request does no I/O.

    request = GenerationRequest("A robot arm picks up a cube.", num_frames=9, height=64, width=64, steps=4)
    result = pipeline(request)
    again = dataclasses.replace(request, seed=1)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Literal

import numpy as np

from cosmos_jax.sampling.prompts import ACTION_MODES, EMBODIMENT_DOMAINS, VIEWPOINT_SENTENCES, raw_action_dim

OutputType = Literal["video", "latent"]
TEMPORAL_COMPRESSION = 4


@dataclasses.dataclass(frozen=True, eq=False)
class GenerationRequest:
    """One generation request (compared by identity: it may hold arrays and images).

    Vision modes (no `action_mode`): text→image when `num_frames == 1`, image→video with `image`, video→video
    with `video`, else text→video. Action modes (`action_mode` set): the clip geometry comes from `chunk` and
    `resolution_tier`, so `num_frames`, `height` and `width` stay None.
    """

    prompt: str
    """The text prompt (the conditional guidance branch)."""
    negative_prompt: str | None = None
    """The unconditional branch's prompt; None uses the model's default negative prompt."""
    image: Any = None
    """Conditioning image: a PIL image, a uint8 [H, W, 3] array or a file path (image→video, action modes)."""
    video: Any = None
    """Conditioning video: a sequence of frames (PIL or uint8 [H, W, 3]) or a file path (video→video, action
    modes). At most one of `image` and `video`."""
    action_mode: str | None = None
    """None for the vision modes, else one of "policy", "forward_dynamics", "inverse_dynamics"."""
    domain: str | None = None
    """Embodiment domain name (action modes only, required there), e.g. "av" or "bridge_orig_lerobot"."""
    actions: np.ndarray | None = None
    """forward_dynamics only: the given actions [T >= 1, raw width of `domain`] (float32 after building); rows
    past T are the last row repeated up to `chunk`."""
    chunk: int = 16
    """Action modes: actions per clip, a positive multiple of 4 (the clip has chunk + 1 frames)."""
    resolution_tier: int = 480
    """Action modes: the resolution tier the conditioning clip is resized to (its short side)."""
    view_point: str | None = "ego_view"
    """Action modes: the camera viewpoint named in the prompt's caption (None leaves it out)."""
    condition_frames: tuple[int, ...] = (0, 1)
    """video→video: the latent frames kept clean (taken from `video`), non-negative ints."""
    num_frames: int | None = None
    """Vision modes: frames to generate, 1 + 4k (None: 189)."""
    height: int | None = None
    """Vision modes: pixel height, a multiple of the VAE's spatial compression (None: 720)."""
    width: int | None = None
    """Vision modes: pixel width, a multiple of the VAE's spatial compression (None: 1280)."""
    fps: float = 24.0
    """Frames per second (enters the prompt, the position ids and the sound length)."""
    steps: int = 35
    """Denoising steps, a positive int."""
    guidance: float = 6.0
    """Classifier-free guidance scale, finite and >= 1; exactly 1 runs the conditional branch only."""
    seed: int = 0
    """Seed of the starting noise (drawn vision → sound → action)."""
    enable_sound: bool = False
    """Also generate sound (needs a sound-trained transformer and a sound tokenizer)."""
    init_noise: Any = None
    """Starting vision latents [1, C, T, h, w] (array or .npy path) used as given; None draws noise. Given, the
    VAE is not needed to encode clean frames."""
    init_sound_noise: Any = None
    """Starting sound latents [sound_dim, Ts] (array or .npy path); None draws noise."""
    init_action_noise: Any = None
    """Starting action latents [chunk, action_dim] (array or .npy path); None draws noise."""
    output_type: OutputType = "video"
    """"video" decodes frames with the VAE; "latent" returns the final latents only."""
    use_system_prompt: bool | None = None
    """Prepend the system prompt; None uses the model folder's default."""

    def __post_init__(self) -> None:
        _check(self.output_type in ("video", "latent"),
               f"output_type must be 'video' or 'latent', got {self.output_type!r}")
        _check(isinstance(self.steps, int) and not isinstance(self.steps, bool) and self.steps >= 1,
               f"steps must be a positive int, got {self.steps!r}")
        _check(isinstance(self.prompt, str), f"prompt must be a string, got {type(self.prompt).__name__}")
        _check(self.negative_prompt is None or isinstance(self.negative_prompt, str),
               f"negative_prompt must be a string or None, got {type(self.negative_prompt).__name__}")
        _check(_finite_number(self.guidance) and self.guidance >= 1.0,
               f"guidance must be a finite number >= 1 (1 disables guidance), got {self.guidance!r}")
        _check(_finite_number(self.fps) and self.fps > 0, f"fps must be a positive number, got {self.fps!r}")
        _check(self.image is None or self.video is None,
               "give either image (image→video / action image) or video, not both")
        object.__setattr__(self, "condition_frames", tuple(self.condition_frames))
        if self.action_mode is None:
            self._check_vision()
        else:
            self._check_action()

    @property
    def use_cfg(self) -> bool:
        """Whether classifier-free guidance runs (both branches)."""
        return float(self.guidance) != 1.0

    def _check_vision(self) -> None:
        _check(self.domain is None and self.actions is None, "domain and actions are only used with an action_mode")
        n = self.num_frames
        if n is not None:
            _check(isinstance(n, int) and n >= 1 and not (n - 1) % TEMPORAL_COMPRESSION,
                   f"num_frames must be 1 + 4k (1, 5, 9, ...), got {n!r}")

    def _check_action(self) -> None:
        mode = self.action_mode
        _check(mode in ACTION_MODES, f"unknown action_mode {mode!r}; expected one of {list(ACTION_MODES)}")
        _check(self.num_frames is None and self.height is None and self.width is None,
               "in action modes num_frames/height/width come from chunk and the resolution tier; leave them unset")
        _check(self.domain is not None,
               f"action_mode {mode!r} needs a domain; one of {sorted(EMBODIMENT_DOMAINS)}")
        raw_dim = raw_action_dim(self.domain)
        _check(self.view_point is None or self.view_point in VIEWPOINT_SENTENCES,
               f"unknown view_point {self.view_point!r}; expected one of {sorted(VIEWPOINT_SENTENCES)}")
        _check(isinstance(self.chunk, int) and self.chunk >= 1 and not self.chunk % TEMPORAL_COMPRESSION,
               f"chunk must be a positive multiple of 4 (the clip has chunk+1 = 1+4k frames), got {self.chunk!r}")
        _check(self.image is not None or self.video is not None,
               f"action_mode {mode!r} needs a conditioning image or video")
        _check(mode != "inverse_dynamics" or self.video is not None,
               "inverse_dynamics needs a conditioning video (the frames to explain)")
        if mode != "forward_dynamics":
            _check(self.actions is None, f"actions are only read in forward_dynamics, not in {mode}")
            return
        _check(self.actions is not None, "forward_dynamics needs actions [T, raw width]")
        actions = np.asarray(self.actions, np.float32)
        _check(actions.ndim == 2 and actions.shape[0] >= 1,
               f"actions must be [T >= 1, {raw_dim}], got shape {actions.shape}")
        _check(actions.shape[1] == raw_dim,
               f"actions have {actions.shape[1]} channels but domain {self.domain!r} needs {raw_dim}")
        _check(bool(np.all(np.isfinite(actions))), "actions contain NaN or Inf")
        object.__setattr__(self, "actions", actions)


def is_path(x: Any) -> bool:
    """Whether a request field holds a file path (rather than in-memory data)."""
    return isinstance(x, (str, os.PathLike))


def _finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and bool(np.isfinite(x))


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
