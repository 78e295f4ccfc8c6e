"""Per-step training metrics, written one step late so the host never waits on the devices.

Format: TensorBoard event files (`events.out.tfevents.*`, scalar summaries), written by the tiny writer below,
plus the same scalars as `metrics.jsonl`. The writer is hand-written because neither tensorboard, tensorboardX
nor tensorflow is a dependency of this package and a scalar event is ~40 bytes of protobuf: an Event
{wall_time: double (1), step: int64 (2), file_version: string (3) | summary: Summary (5)} with
Summary.value {tag: string (1), simple_value: float (2)}, framed as TFRecords (length, masked CRC32C of the
length, payload, masked CRC32C of the payload).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from cosmos_jax.config import Cosmos3Config

# Peak dense bf16 FLOP/s per device, for the MFU estimate (None: unknown, MFU not reported).
PEAK_BF16_FLOPS = {"NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12,
                   "TPU v6 lite": 918e12, "TPU v4": 275e12}


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of data."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(payload: bytes) -> bytes:
    """One TFRecord frame around payload."""
    length = struct.pack("<Q", len(payload))
    return length + struct.pack("<I", masked_crc32c(length)) + payload + struct.pack("<I", masked_crc32c(payload))


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _field_bytes(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def scalar_event(step: int, wall_time: float, scalars: Mapping[str, float]) -> bytes:
    """An Event proto with one simple_value per tag."""
    summary = b"".join(
        _field_bytes(1, _field_bytes(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", value))
        for tag, value in scalars.items()
    )
    header = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3) + _varint(step)
    return header + _field_bytes(5, summary)


def version_event(wall_time: float) -> bytes:
    return _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _field_bytes(3, b"brain.Event:2")


def train_flops_per_step(config: Cosmos3Config, batch: int, text_len: int, gen_len: int,
                         freeze_reasoner: bool) -> float:
    """Model FLOPs of one step: matmuls (2 per weight per token forward, 4 more backward) and attention scores
    and values (generator queries see text + generator keys; reasoner queries see text keys). A frozen
    reasoner runs forward only."""
    d, hd, layers = config.hidden_size, config.head_dim, config.num_hidden_layers
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    per_layer = d * (q + 2 * kv) + q * d + 3 * d * config.intermediate_size
    tower = layers * per_layer
    head = config.patch_latent_dim * d * 2
    reasoner_fwd = 2 * batch * text_len * tower + 4 * batch * layers * q * text_len * text_len
    generator_fwd = 2 * batch * gen_len * (tower + head) + 4 * batch * layers * q * gen_len * (text_len + gen_len)
    reasoner_mult = 1 if freeze_reasoner else 3
    return float(reasoner_mult * reasoner_fwd + 3 * generator_fwd)


def peak_flops() -> float | None:
    """Aggregate peak bf16 FLOP/s of the local devices, or None when unknown (e.g. CPU)."""
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_BF16_FLOPS.items():
        if kind.startswith(name):
            return flops * jax.local_device_count()
    return None


class MetricsWriter:
    """Holds each step's device metrics until the next step is dispatched, then fetches and writes them.

    `push(step, metrics, step_time, tokens)` records step N and writes step N−1; `close()` writes the last.
    """

    def __init__(self, directory: str, flops_per_step: float | None = None, peak: float | None = None) -> None:
        os.makedirs(directory, exist_ok=True)
        now = time.time()
        name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}"
        self._events = open(os.path.join(directory, name), "ab")
        self._events.write(tfrecord(version_event(now)))
        self._jsonl = open(os.path.join(directory, "metrics.jsonl"), "a", encoding="utf-8")
        self._flops, self._peak = flops_per_step, peak
        self._pending: tuple[int, Any, float, int] | None = None
        self.last: dict[str, float] = {}

    def push(self, step: int, metrics: Mapping[str, jax.Array], step_time: float, tokens: int) -> dict[str, float]:
        """Queue this step's metrics; write and return the previous step's (empty dict on the first call)."""
        previous, self._pending = self._pending, (step, metrics, step_time, tokens)
        return {} if previous is None else self._write(*previous)

    def _write(self, step: int, metrics: Mapping[str, jax.Array], step_time: float, tokens: int) -> dict[str, float]:
        scalars = {k: float(np.asarray(v)) for k, v in jax.device_get(dict(metrics)).items()}
        scalars["perf/step_time_s"] = step_time
        scalars["perf/tokens_per_s"] = tokens / step_time if step_time > 0 else 0.0
        if self._flops is not None and self._peak and step_time > 0:
            scalars["perf/mfu"] = self._flops / step_time / self._peak
        now = time.time()
        self._events.write(tfrecord(scalar_event(step, now, scalars)))
        self._events.flush()
        self._jsonl.write(json.dumps({"step": step, "time": now, **scalars}) + "\n")
        self._jsonl.flush()
        self.last = scalars
        return scalars

    def close(self) -> dict[str, float]:
        """Write the pending step and close the files; returns the last scalars written."""
        if self._pending is not None:
            self._write(*self._pending)
            self._pending = None
        self._events.close()
        self._jsonl.close()
        return self.last


def read_events(path: str) -> list[tuple[int, dict[str, float]]]:
    """Parse an event file written by MetricsWriter back to [(step, {tag: value})], checking every CRC."""
    out = []
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        (length_crc,) = struct.unpack_from("<I", data, pos + 8)
        payload = data[pos + 12 : pos + 12 + length]
        (payload_crc,) = struct.unpack_from("<I", data, pos + 12 + length)
        if length_crc != masked_crc32c(data[pos : pos + 8]) or payload_crc != masked_crc32c(payload):
            raise ValueError(f"{path}: CRC mismatch in the record at byte {pos}")
        pos += 16 + length
        event = _parse_message(payload)
        if 5 in event:
            summary = _parse_message(event[5][0])
            values = {}
            for value in summary.get(1, []):
                fields = _parse_message(value)
                values[fields[1][0].decode()] = struct.unpack("<f", fields[2][0])[0]
            out.append((event[2][0], values))
    return out


def _parse_message(data: bytes) -> dict[int, list[Any]]:
    """Minimal protobuf wire parser: field number -> values (varints as int, others as raw bytes)."""
    fields: dict[int, list[Any]] = {}
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        elif wire == 2:
            length, pos = _read_varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        fields.setdefault(number, []).append(value)
    return fields


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, pos
