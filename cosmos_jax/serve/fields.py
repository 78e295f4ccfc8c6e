"""Request fields -> a checked `GenerationRequest`: the openpi observation of the policy endpoint, and the fields
of a /v1/videos job (JSON values or multipart form strings and uploads).

Every refusal is a `ServeError` naming the field; nothing here touches the model. Limits (`Limits`) are applied
before the request is built, the request's own checks (`GenerationRequest`) after.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from cosmos_jax.sampling.prompts import ACTION_MODES
from cosmos_jax.sampling.request import GenerationRequest
from cosmos_jax.serve.errors import ServeError, bad_field, too_large
from cosmos_jax.serve.limits import Limits

_INTS = ("num_frames", "height", "width", "steps", "seed", "chunk", "resolution_tier")
_FLOATS = ("fps", "guidance")
_STRINGS = ("prompt", "negative_prompt", "action_mode", "domain", "view_point", "model")
_BOOLS = ("sound", "return_video")
_MEDIA = ("image", "video", "actions")
VIDEO_JOB_FIELDS = frozenset(_INTS + _FLOATS + _STRINGS + _BOOLS + _MEDIA + ("size", "input_reference",
                                                                             "condition_frames"))
"""The fields POST /v1/videos accepts (`input_reference` is OpenAI's name for the conditioning image, `size`
its "WIDTHxHEIGHT")."""


@dataclasses.dataclass(frozen=True)
class PolicyDefaults:
    """What a policy request gets for the fields it leaves out (the server's flags)."""

    domain: str | None = None
    chunk: int = 16
    steps: int = 35
    resolution_tier: int = 480
    guidance: float = 1.0
    view_point: str = "ego_view"


@dataclasses.dataclass(frozen=True)
class ParsedRequest:
    request: GenerationRequest
    return_video: bool


# ------------------------------------------------------------------------------------------- scalar fields


def typed(field: str, value: Any, from_text: bool = False) -> Any:
    """A scalar field's value as its Python type; form fields arrive as text (`from_text`)."""
    if value is None:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if field in _INTS:
        if from_text and isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise bad_field(field, f"expected an integer, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad_field(field, f"expected an integer, got {type(value).__name__} {value!r}")
        return value
    if field in _FLOATS:
        if from_text and isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise bad_field(field, f"expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise bad_field(field, f"expected a finite number, got {value!r}")
        return float(value)
    if field in _BOOLS:
        if from_text and isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
            return value.strip().lower() in ("true", "1")
        if not isinstance(value, bool):
            raise bad_field(field, f"expected true or false, got {value!r}")
        return value
    if not isinstance(value, str):
        raise bad_field(field, f"expected a string, got {type(value).__name__}")
    return value


def _size(value: str) -> tuple[int, int]:
    """OpenAI's "WIDTHxHEIGHT" -> (height, width)."""
    try:
        width, height = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise bad_field("size", f"expected WIDTHxHEIGHT such as 1280x720, got {value!r}") from None
    return height, width


def _condition_frames(value: Any, from_text: bool) -> tuple[int, ...]:
    if from_text and isinstance(value, str):
        value = value.replace(",", " ").split()
        try:
            value = [int(v) for v in value]
        except ValueError:
            raise bad_field("condition_frames", "expected integers such as 0,1") from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                       for v in value):
        raise bad_field("condition_frames", f"expected a list of integers, got {value!r}")
    return tuple(value)


# ------------------------------------------------------------------------------------------------- media


def decode_image(field: str, data: bytes, limits: Limits) -> np.ndarray:
    """An encoded image file (png, jpeg, ...) -> uint8 [H, W, 3], its size checked before decoding."""
    limits.upload(field, len(data))
    try:
        with Image.open(io.BytesIO(data)) as image:
            if max(image.size) > limits.max_image_side:
                raise too_large(field, f"{image.height}x{image.width} is over the limit of "
                                       f"{limits.max_image_side} px a side")
            return limits.frames(field, np.asarray(image.convert("RGB")))
    except ServeError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise bad_field(field, f"not a readable image ({e})") from None


def decode_video(field: str, data: bytes, limits: Limits) -> np.ndarray:
    """An encoded video file (mp4, ...) -> uint8 [F, H, W, 3], stopping past the frame limit."""
    import imageio.v3 as iio

    limits.upload(field, len(data))
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "upload.mp4")
        with open(path, "wb") as f:
            f.write(data)
        frames = []
        try:
            for frame in iio.imiter(path):
                frames.append(limits.frames(field, np.asarray(frame)[..., :3].astype(np.uint8)))
                if len(frames) > limits.max_frames:
                    break
        except ServeError:
            raise
        except (OSError, ValueError, RuntimeError) as e:
            raise bad_field(field, f"not a readable video ({e})") from None
    if not frames:
        raise bad_field(field, "the video has no frames")
    return limits.frames(field, np.stack(frames))


def decode_actions(field: str, value: Any, limits: Limits) -> np.ndarray:
    """Actions as a nested list, an array, or .npy / JSON file bytes -> float32 [T, width] (no pickle)."""
    if isinstance(value, bytes):
        limits.upload(field, len(value))
        try:
            value = np.load(io.BytesIO(value), allow_pickle=False)
        except ValueError:
            try:
                value = json.loads(value)
            except ValueError:
                raise bad_field(field, "expected a .npy file or a JSON list of rows") from None
    if isinstance(value, Mapping) and "actions" in value:
        value = value["actions"]
    try:
        actions = np.asarray(value, np.float32)
    except (TypeError, ValueError):
        raise bad_field(field, "expected numbers [T, width]") from None
    if actions.ndim != 2 or actions.shape[0] < 1:
        raise bad_field(field, f"expected [T >= 1, width], got shape {list(actions.shape)}")
    if not np.all(np.isfinite(actions)):
        raise bad_field(field, "contains NaN or Inf")
    limits.count(field, actions.shape[0], limits.max_chunk)
    return actions


def _base64(field: str, value: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise bad_field(field, "expected base64-encoded file bytes") from None


# ------------------------------------------------------------------------------------------------ requests


def build_request(fields: dict[str, Any], limits: Limits) -> GenerationRequest:
    """A checked request from typed fields (names as GenerationRequest's, `sound` for enable_sound)."""
    prompt = fields.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise bad_field("prompt", "a non-empty prompt is required")
    for name in ("prompt", "negative_prompt"):
        if fields.get(name) is not None:
            limits.prompt(name, fields[name])
    limits.count("steps", fields.get("steps"), limits.max_steps)
    limits.count("chunk", fields.get("chunk"), limits.max_chunk)
    limits.geometry(fields.get("num_frames"), fields.get("height"), fields.get("width"))
    mode = fields.get("action_mode")
    if mode is not None and mode not in ACTION_MODES:
        raise bad_field("action_mode", f"unknown mode {mode!r}; expected one of {list(ACTION_MODES)}")
    kwargs = {k: v for k, v in fields.items() if v is not None and k not in ("sound", "return_video", "model")}
    if kwargs.get("action_mode") is not None:
        kwargs.setdefault("guidance", 1.0)
    kwargs["enable_sound"] = bool(fields.get("sound", False))
    try:
        return GenerationRequest(**kwargs)
    except ValueError as e:
        raise _request_error(str(e)) from None


def _request_error(message: str) -> ServeError:
    """A GenerationRequest or preparation ValueError as a 422 naming the field its message starts with."""
    known = set(f.name for f in dataclasses.fields(GenerationRequest)) | {"enable_sound"}
    words = message.replace("/", " ").replace(",", " ").split()
    field = next((w for w in words[:4] if w in known), "request")
    return ServeError(422, message if field == "request" else f"{field}: {message}", field)


def prepare_error(error: Exception) -> ServeError:
    """A refusal of the model's preparation step (`Cosmos3Pipeline.prepare`) as a 422 naming the field."""
    return _request_error(str(error))


def video_job_request(form: Mapping[str, Any], limits: Limits, from_text: bool) -> ParsedRequest:
    """POST /v1/videos fields (JSON values, or form text with uploads as bytes) -> a checked request."""
    unknown = sorted(set(form) - VIDEO_JOB_FIELDS)
    if unknown:
        raise bad_field(unknown[0], f"unknown field; accepted: {', '.join(sorted(VIDEO_JOB_FIELDS))}")
    fields: dict[str, Any] = {}
    for name, value in form.items():
        if name in _MEDIA or name in ("input_reference", "size", "condition_frames"):
            continue
        fields[name] = typed(name, value, from_text)
    if form.get("size") is not None:
        fields["height"], fields["width"] = _size(typed("size", form["size"], from_text))
    if form.get("condition_frames") is not None:
        fields["condition_frames"] = _condition_frames(form["condition_frames"], from_text)
    for name, target in (("input_reference", "image"), ("image", "image")):
        if form.get(name) is not None:
            if "image" in fields:
                raise bad_field(name, "give the image once (image or input_reference)")
            data = form[name] if isinstance(form[name], bytes) else _base64(name, typed(name, form[name]))
            fields[target] = decode_image(name, data, limits)
    if form.get("video") is not None:
        data = form["video"] if isinstance(form["video"], bytes) else _base64("video", typed("video", form["video"]))
        fields["video"] = list(decode_video("video", data, limits))
    if form.get("actions") is not None:
        value = form["actions"]
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise bad_field("actions", "expected a JSON list of rows") from None
        fields["actions"] = decode_actions("actions", value, limits)
    return ParsedRequest(build_request(fields, limits), bool(fields.get("return_video", True)))


def policy_request(obs: Any, defaults: PolicyDefaults, limits: Limits) -> ParsedRequest:
    """An openpi observation -> a checked action-mode request.

    Images: uint8 [H, W, 3] under any key containing "image" (flat "observation/image" or nested "images"); the
    one named by `camera`, else the first. State-like entries ("state", other "observation/..." keys) are
    checked to be finite numbers and not used (the model conditions on the image and the prompt). `actions`
    [T, width] makes it forward dynamics (the reply has the predicted `video`), `video` [F, H, W, 3] inverse
    dynamics; else policy. `domain`, `chunk`, `seed`, `steps`, `guidance`, `resolution_tier`, `return_video`
    are optional.
    """
    if not isinstance(obs, Mapping):
        raise bad_field("observation", f"expected a dict, got {type(obs).__name__}")
    images: dict[str, np.ndarray] = {}
    fields: dict[str, Any] = {}
    camera = None
    for key, value in obs.items():
        if not isinstance(key, str):
            raise bad_field(str(key), "keys must be strings")
        if key == "images" and isinstance(value, Mapping):
            for name, image in value.items():
                images[f"images/{name}"] = _array_image(f"images/{name}", image, limits)
        elif key == "camera":
            camera = typed("camera", value)
        elif "image" in key and key != "return_video":
            images[key] = _array_image(key, value, limits)
        elif key in ("prompt", "domain", "chunk", "seed", "steps", "guidance", "resolution_tier", "return_video",
                     "negative_prompt", "view_point"):
            fields[key] = typed(key, value)
        elif key == "actions":
            fields["actions"] = decode_actions("actions", value, limits)
        elif key == "video":
            video = limits.frames("video", _array("video", value))
            if video.ndim != 4:
                raise bad_field("video", f"expected uint8 [F, H, W, 3], got {list(video.shape)}")
            fields["video"] = list(video)
        elif key in ("state", "mode") or key.startswith("observation"):
            if key == "mode":
                fields["action_mode"] = typed("action_mode", value)
            else:
                _check_state(key, value)
        else:
            raise bad_field(key, "unknown field")
    return_video = bool(fields.pop("return_video", False))
    mode = fields.get("action_mode") or ("forward_dynamics" if "actions" in fields
                                         else "inverse_dynamics" if "video" in fields else "policy")
    fields["action_mode"] = mode
    if "video" not in fields:
        if not images:
            raise bad_field("image", "the observation has no image (uint8 [H, W, 3] under a key with 'image')")
        if camera is not None and camera not in images:
            raise bad_field("camera", f"no image {camera!r}; the observation has {sorted(images)}")
        fields["image"] = images[camera] if camera is not None else next(iter(images.values()))
    for name in ("domain", "chunk", "steps", "resolution_tier", "guidance", "view_point"):
        if fields.get(name) is None:
            fields[name] = getattr(defaults, name)
    if fields["domain"] is None:
        raise bad_field("domain", "this server has no default domain (--domain); name one in the request")
    return_video = return_video or mode == "forward_dynamics"
    fields["output_type"] = "video" if return_video else "latent"
    return ParsedRequest(build_request(fields, limits), return_video)


def _array(field: str, value: Any) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise bad_field(field, f"expected a numpy array, got {type(value).__name__}")
    return value


def _array_image(field: str, value: Any, limits: Limits) -> np.ndarray:
    image = limits.frames(field, _array(field, value))
    if image.ndim != 3:
        raise bad_field(field, f"expected one uint8 [H, W, 3] image, got {list(image.shape)}")
    return image


def _check_state(field: str, value: Any) -> None:
    try:
        state = np.asarray(value, np.float64)
    except (TypeError, ValueError):
        raise bad_field(field, "expected numbers") from None
    if not np.all(np.isfinite(state)):
        raise bad_field(field, "contains NaN or Inf")
