"""The training input pipeline (grain): on-disk samples -> packed fixed-shape `TrainBatch`es.

On-disk format (a directory; no pickle anywhere, arrays are read with `np.load(allow_pickle=False)`):

    meta.json     {"format": "cosmos-jax-latents/1",
                   "latent_shape": [C, T, H, W],       every sample's latent video shape
                   "fps": 24.0,                        frame rate of the clips (mRoPE fps modulation)
                   "action_chunk": N | null,           action rows per sample (null: no actions)
                   "action_width": A | null}           raw action width (<= the model's action_dim)
    index.jsonl   one JSON object per line: {"id": "<sample id>", "file": "<path relative to the directory>"}
    <file>.npz    latents     float [C, T, H, W]  (VAE latents, or any encoder's latent video)
                  caption_ids int   [L], 1 <= L <= max_text_len (tokenized caption)
                  actions     float [N, A]        (only when meta has actions)
                  domain      int   []            embodiment domain id (only when meta has actions)
    action_stats.json  (optional) per-channel stats of the raw actions (`cosmos_jax.datasets.normalization`):
                  when present the actions are mapped to the model's space as they are loaded

Each sample is given a conditioning *task* drawn per sample from `task_weights` (seeded, so replayable):
  with actions: 'joint' (video and actions generated), 'forward' (frame 0 and actions given, video generated),
                'inverse' (video given, actions generated), 'policy' (frame 0 given, video and actions generated);
  without:      't2v' (all frames generated), 'i2v' (frame 0 given).
Bad samples (unreadable file, missing/empty/over-long caption, wrong latent shape, wrong action width, bad
domain) raise `BadSample` naming the sample id, or, with `skip_bad=True`, are logged, counted in
`BadSampleLog` and dropped. Sharding across hosts is grain's `ShardByJaxProcess`; the iterator state is a JSON
string (`iterator_state` / `restore_iterator`) saved with the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import grain.python as grain
import numpy as np

from cosmos_jax.config import Cosmos3Config
from cosmos_jax.datasets.normalization import STATS_FILE, ActionNormalizer, read_normalizer
from cosmos_jax.modeling.inputs import GeneratorInputs, TextInputs
from cosmos_jax.packing import layout_sequence
from cosmos_jax.training.losses import TrainBatch

FORMAT = "cosmos-jax-latents/1"
ACTION_TASKS = ("joint", "forward", "inverse", "policy")
VIDEO_TASKS = ("t2v", "i2v")
log = logging.getLogger(__name__)


class BadSample(ValueError):
    """A sample that cannot be trained on; the message names its id."""

    def __init__(self, sample_id: str, reason: str) -> None:
        super().__init__(f"bad sample {sample_id!r}: {reason}")
        self.sample_id = sample_id
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class DatasetMeta:
    """meta.json: latent_shape (C, T, H, W), fps, and the action chunk/width (None when the data has no actions)."""

    latent_shape: tuple[int, int, int, int]
    fps: float
    action_chunk: int | None = None
    action_width: int | None = None

    @property
    def has_actions(self) -> bool:
        return self.action_chunk is not None

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "latent_shape": list(self.latent_shape), "fps": self.fps,
                "action_chunk": self.action_chunk, "action_width": self.action_width}


def read_meta(root: str) -> DatasetMeta:
    path = os.path.join(root, "meta.json")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{root} is not a training dataset: {path} is missing") from None
    if raw.get("format") != FORMAT:
        raise ValueError(f"{path}: format must be {FORMAT!r}, got {raw.get('format')!r}")
    chunk, width = raw.get("action_chunk"), raw.get("action_width")
    if (chunk is None) != (width is None):
        raise ValueError(f"{path}: action_chunk and action_width must both be set or both null")
    return DatasetMeta(tuple(int(x) for x in raw["latent_shape"]), float(raw["fps"]),
                       None if chunk is None else int(chunk), None if width is None else int(width))


def read_index(root: str) -> list[dict[str, str]]:
    """index.jsonl -> [{'id', 'file'}]; a malformed line is an error naming its line number."""
    entries = []
    with open(os.path.join(root, "index.jsonl"), encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                entries.append({"id": str(entry["id"]), "file": str(entry["file"])})
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{root}/index.jsonl line {number}: not an {{'id', 'file'}} object ({e})") from None
    if not entries:
        raise ValueError(f"{root}/index.jsonl lists no samples")
    return entries


def write_sample(root: str, sample_id: str, latents: np.ndarray, caption_ids: np.ndarray,
                 actions: np.ndarray | None = None, domain: int | None = None) -> dict[str, str]:
    """Write samples/<id>.npz under root and return its index entry (append it to index.jsonl)."""
    arrays: dict[str, np.ndarray] = {"latents": latents, "caption_ids": np.asarray(caption_ids, np.int32)}
    if actions is not None:
        arrays.update(actions=np.asarray(actions, np.float32), domain=np.asarray(domain, np.int32))
    rel = os.path.join("samples", f"{sample_id}.npz")
    os.makedirs(os.path.join(root, "samples"), exist_ok=True)
    np.savez(os.path.join(root, rel), **arrays)
    return {"id": sample_id, "file": rel}


def write_dataset(root: str, meta: DatasetMeta, entries: list[dict[str, str]]) -> None:
    """meta.json and index.jsonl for samples already written with `write_sample`."""
    with open(os.path.join(root, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta.to_json(), f, indent=2)
    with open(os.path.join(root, "index.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(e) + "\n" for e in entries)


class SampleSource(grain.RandomAccessDataSource):
    """index entry i -> {'id', 'path'} (files are opened by `LoadSample`, so a bad one can be reported)."""

    def __init__(self, root: str) -> None:
        self._root = root
        self._entries = read_index(root)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:  # grain checks it on restore, so it must be stable across processes
        return f"SampleSource({os.path.abspath(self._root)!r}, {len(self._entries)} samples)"

    def __getitem__(self, index: int) -> dict[str, str]:
        entry = self._entries[index]
        return {"id": entry["id"], "path": os.path.join(self._root, entry["file"])}


class BadSampleLog:
    """Ids and reasons of the samples skipped by this process."""

    def __init__(self) -> None:
        self.skipped: list[tuple[str, str]] = []

    def record(self, error: BadSample) -> None:
        log.warning("skipping %s", error)
        self.skipped.append((error.sample_id, error.reason))


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    batch_size: int
    max_text_len: int
    seed: int = 0
    skip_bad: bool = False
    task_weights: Mapping[str, float] | None = None
    worker_count: int = 0


def load_sample(record: dict[str, str], meta: DatasetMeta, model: Cosmos3Config, max_text_len: int,
                normalizer: ActionNormalizer | None = None) -> dict[str, Any]:
    """Read and validate one sample (actions mapped raw -> model space by `normalizer`, when given); raises
    BadSample naming its id."""
    sid = record["id"]
    try:
        with np.load(record["path"], allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # any unreadable file (missing, truncated, not a zip, object arrays) is bad data
        raise BadSample(sid, f"cannot read {record['path']}: {type(e).__name__}: {e}") from None
    if "latents" not in arrays:
        raise BadSample(sid, "no 'latents' array")
    latents = arrays["latents"]
    if latents.shape != meta.latent_shape or latents.dtype.kind != "f":
        raise BadSample(sid, f"latents {latents.dtype}{list(latents.shape)}, expected float{list(meta.latent_shape)}")
    if not np.all(np.isfinite(latents)):
        raise BadSample(sid, "latents contain NaN or inf")
    caption = arrays.get("caption_ids")
    if caption is None or caption.ndim != 1 or caption.size == 0:
        raise BadSample(sid, "missing or empty caption ('caption_ids')")
    if caption.size > max_text_len:
        raise BadSample(sid, f"caption has {caption.size} tokens, more than max_text_len={max_text_len}")
    if caption.min() < 0 or caption.max() >= model.vocab_size:
        raise BadSample(sid, f"caption token ids outside [0, {model.vocab_size})")
    sample = {"id": sid, "latents": latents.astype(np.float32), "caption_ids": caption.astype(np.int32)}
    if meta.has_actions:
        actions, domain = arrays.get("actions"), arrays.get("domain")
        if actions is None or actions.shape != (meta.action_chunk, meta.action_width):
            shape = None if actions is None else list(actions.shape)
            raise BadSample(sid, f"actions {shape}, expected [{meta.action_chunk}, {meta.action_width}] "
                                 "(wrong action width or chunk)")
        if domain is None or domain.shape != () or not 0 <= int(domain) < model.num_embodiment_domains:
            raise BadSample(sid, f"embodiment domain must be an int in [0, {model.num_embodiment_domains})")
        if normalizer is not None:
            actions = normalizer.to_model(actions)
        sample.update(actions=actions.astype(np.float32), domain=np.int32(domain))
    return sample


class LoadSample(grain.MapTransform):
    """record -> validated sample, or None (logged and counted) when skip_bad."""

    def __init__(self, meta: DatasetMeta, model: Cosmos3Config, max_text_len: int, skip_bad: bool,
                 bad_log: BadSampleLog, normalizer: ActionNormalizer | None = None) -> None:
        self._args = (meta, model, max_text_len, normalizer)
        self._skip_bad = skip_bad
        self._bad_log = bad_log

    def map(self, record: dict[str, str]) -> dict[str, Any] | None:
        try:
            return load_sample(record, *self._args)
        except BadSample as e:
            if not self._skip_bad:
                raise
            self._bad_log.record(e)
            return None


class DropBad(grain.FilterTransform):
    def filter(self, element: Any) -> bool:
        return element is not None


class PackSample(grain.RandomMapTransform):
    """sample -> fixed-shape packed arrays for one row (task drawn from the per-record rng)."""

    def __init__(self, meta: DatasetMeta, model: Cosmos3Config, max_text_len: int,
                 task_weights: Mapping[str, float]) -> None:
        self._meta, self._model, self._max_text_len = meta, model, max_text_len
        self._tasks = list(task_weights)
        weights = np.array([task_weights[t] for t in self._tasks], np.float64)
        self._probs = weights / weights.sum()

    def random_map(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        return pack_sample(sample, self._meta, self._model, self._max_text_len,
                           self._tasks[rng.choice(len(self._tasks), p=self._probs)])


def pack_sample(sample: dict[str, Any], meta: DatasetMeta, model: Cosmos3Config, max_text_len: int,
                task: str) -> dict[str, np.ndarray]:
    """One row of a TrainBatch under a conditioning task (text padded to max_text_len, actions to action_dim)."""
    _, t, h, w = meta.latent_shape
    chunk = meta.action_chunk or 0
    clean_frames = {"joint": [], "t2v": [], "forward": [0], "i2v": [0], "policy": [0], "inverse": list(range(t))}[task]
    clean_rows = list(range(chunk)) if task == "forward" else []
    und_len = int(sample["caption_ids"].size)
    layout = layout_sequence(model, und_len, (t, h, w), fps=meta.fps, clean_vision_frames=clean_frames,
                             action_len=chunk, clean_action_rows=clean_rows)
    input_ids = np.zeros(max_text_len, np.int32)
    input_ids[:und_len] = sample["caption_ids"]
    text_pos = np.zeros((3, max_text_len), np.float32)
    text_pos[:, :und_len] = layout.position_ids[:, :und_len]
    row = {"input_ids": input_ids, "und_len": np.int32(und_len), "text_pos": text_pos,
           "gen_pos": layout.position_ids[:, und_len:], "vision": sample["latents"],
           "vision_noisy": layout.vision_noisy}
    if chunk:
        actions = np.zeros((chunk, model.action_dim), np.float32)
        actions[:, : meta.action_width] = sample["actions"]
        row.update(action=actions, action_noisy=layout.action_noisy, action_domain=sample["domain"],
                   action_width=np.int32(meta.action_width))
    return row


def to_train_batch(rows: Mapping[str, np.ndarray]) -> TrainBatch:
    """grain's stacked rows -> TrainBatch (numpy leaves)."""
    b = rows["vision"].shape[0]
    zeros = np.zeros(b, np.float32)
    has_action = "action" in rows
    gen = GeneratorInputs(
        position_ids=rows["gen_pos"], vision=rows["vision"], vision_noisy=rows["vision_noisy"], vision_t=zeros,
        action=rows.get("action"), action_noisy=rows.get("action_noisy"), action_t=zeros if has_action else None,
        action_domain=rows.get("action_domain"),
    )
    text = TextInputs(input_ids=rows["input_ids"], und_len=rows["und_len"], position_ids=rows["text_pos"])
    return TrainBatch(text=text, gen=gen, action_width=rows.get("action_width"))


def default_task_weights(meta: DatasetMeta) -> dict[str, float]:
    return dict.fromkeys(ACTION_TASKS if meta.has_actions else VIDEO_TASKS, 1.0)


def make_loader(root: str, model: Cosmos3Config, config: PipelineConfig,
                shard: grain.ShardOptions | None = None) -> tuple[grain.DataLoader, DatasetMeta, BadSampleLog]:
    """An endless, shuffled, per-host-sharded loader of packed batches (`config.batch_size` rows per host)."""
    meta = read_meta(root)
    if meta.has_actions and (not model.action_gen or meta.action_width > model.action_dim):
        raise ValueError(f"{root}: actions of width {meta.action_width} need a model with action_gen and "
                         f"action_dim >= {meta.action_width} (got action_gen={model.action_gen}, "
                         f"action_dim={model.action_dim})")
    normalizer = None
    if meta.has_actions and os.path.isfile(os.path.join(root, STATS_FILE)):
        normalizer = read_normalizer(os.path.join(root, STATS_FILE))
        if normalizer.width != meta.action_width:
            raise ValueError(f"{os.path.join(root, STATS_FILE)}: stats for {normalizer.width} action channels, "
                             f"the samples have {meta.action_width}")
    weights = dict(config.task_weights or default_task_weights(meta))
    allowed = ACTION_TASKS if meta.has_actions else VIDEO_TASKS
    if set(weights) - set(allowed) or not weights or min(weights.values()) < 0 or sum(weights.values()) <= 0:
        raise ValueError(f"task_weights {weights} must be non-negative weights over {allowed} with a positive sum")
    source = SampleSource(root)
    bad_log = BadSampleLog()
    sampler = grain.IndexSampler(
        num_records=len(source),
        shard_options=shard or grain.ShardByJaxProcess(drop_remainder=True),
        shuffle=True,
        num_epochs=None,
        seed=config.seed,
    )
    operations = [
        LoadSample(meta, model, config.max_text_len, config.skip_bad, bad_log, normalizer),
        DropBad(),
        PackSample(meta, model, config.max_text_len, weights),
        grain.Batch(config.batch_size, drop_remainder=True),
    ]
    loader = grain.DataLoader(data_source=source, sampler=sampler, operations=operations,
                              worker_count=config.worker_count)
    return loader, meta, bad_log


def iterator_state(iterator: Any) -> str:
    """The grain iterator's position as a JSON string (saved with the checkpoint)."""
    state = iterator.get_state()
    return state.decode() if isinstance(state, bytes) else json.dumps(state)


def restore_iterator(iterator: Any, state: str) -> None:
    iterator.set_state(state.encode())
