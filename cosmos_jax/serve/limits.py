"""What one request may ask for: body and upload sizes, image sizes, step, frame and chunk counts.

Checked before a request is prepared, so a request over a limit never reaches the model; every refusal names the
field (413 for sizes in bytes or pixels, 422 for counts).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cosmos_jax.serve.errors import bad_field, too_large


@dataclasses.dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 32 * 1024**2
    """A whole HTTP body or WebSocket message."""
    max_upload_bytes: int = 16 * 1024**2
    """One uploaded file (image, video, actions)."""
    max_image_side: int = 1280
    """The longer side of an image or a video frame, in pixels."""
    max_pixels: int = 1280 * 720
    """Height x width of a generated video."""
    max_frames: int = 189
    """Frames of a generated or uploaded video."""
    max_steps: int = 50
    """Denoising steps."""
    max_chunk: int = 64
    """Actions per chunk."""
    max_prompt_chars: int = 4000

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"limit {field.name} must be a positive int, got {value!r}")

    def upload(self, field: str, size: int) -> None:
        if size > self.max_upload_bytes:
            raise too_large(field, f"{size} bytes is over the upload limit of {self.max_upload_bytes} bytes")

    def body(self, size: int) -> None:
        if size > self.max_body_bytes:
            raise too_large("body", f"{size} bytes is over the request limit of {self.max_body_bytes} bytes")

    def frames(self, field: str, frames: np.ndarray) -> np.ndarray:
        """A uint8 [F, H, W, 3] video (or [H, W, 3] image when F is absent) within the size limits."""
        if frames.dtype != np.uint8 or frames.ndim not in (3, 4) or frames.shape[-1] != 3:
            raise bad_field(field, f"expected uint8 [H, W, 3] (image) or [F, H, W, 3] (video), got "
                                   f"{frames.dtype} {list(frames.shape)}")
        height, width = frames.shape[-3:-1]
        if min(height, width) < 1:
            raise bad_field(field, f"empty image {height}x{width}")
        if max(height, width) > self.max_image_side:
            raise too_large(field, f"{height}x{width} is over the limit of {self.max_image_side} px a side")
        if frames.ndim == 4 and not 1 <= frames.shape[0] <= self.max_frames:
            raise too_large(field, f"{frames.shape[0]} frames; between 1 and {self.max_frames} are accepted")
        return frames

    def count(self, field: str, value: int | None, limit: int) -> None:
        if value is not None and value > limit:
            raise bad_field(field, f"{value} is over the limit of {limit}")

    def geometry(self, num_frames: int | None, height: int | None, width: int | None) -> None:
        self.count("num_frames", num_frames, self.max_frames)
        if height is not None and width is not None and height * width > self.max_pixels:
            raise too_large("height", f"{height}x{width} is over the limit of {self.max_pixels} pixels")
        for name, side in (("height", height), ("width", width)):
            self.count(name, side, self.max_image_side)

    def prompt(self, field: str, text: str) -> None:
        if len(text) > self.max_prompt_chars:
            raise too_large(field, f"{len(text)} characters is over the limit of {self.max_prompt_chars}")
