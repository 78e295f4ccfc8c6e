"""LoRA adapters -> the PEFT/diffusers LoRA key layout, so `Cosmos3OmniTransformer.load_lora_adapter` reads them.

For an adapted kernel whose diffusers module is `layers.{i}.self_attn.add_q_proj`:
`transformer.layers.{i}.self_attn.add_q_proj.lora_A.weight` = a[i].T [r, in] and `...lora_B.weight` =
(scale * b[i]).T [out, r]. The scale is folded into lora_B and no alpha is written, so PEFT's own scaling
(lora_alpha / r, with lora_alpha defaulting to r) is 1 and `W x + B A x` is exactly this project's update.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from cosmos_jax.config import Cosmos3Config
from cosmos_jax.convert.keymap_transformer import LINEAR, key_table
from cosmos_jax.convert.tree_paths import get_path

PREFIX = "transformer"
FILE_NAME = "pytorch_lora_weights.safetensors"


def peft_state(adapters: Mapping[str, Any], paths: list[tuple[str, ...]], scale: float,
               config: Cosmos3Config) -> dict[str, np.ndarray]:
    """The PEFT-layout state dict (fp32) of `adapters` at kernel `paths`."""
    modules = {e.path: e.torch_key.removesuffix(".weight") for e in key_table(config)
               if e.transform == LINEAR and e.per_layer}
    state: dict[str, np.ndarray] = {}
    for path in paths:
        if path not in modules:
            raise ValueError(f"{'/'.join(path)} is not a layer linear of this config")
        node = get_path(adapters, path)
        a, b = (np.asarray(jax.device_get(node[k]), np.float32) for k in ("a", "b"))
        for i in range(config.num_hidden_layers):
            name = f"{PREFIX}.{modules[path].format(i=i)}"
            state[f"{name}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
            state[f"{name}.lora_B.weight"] = np.ascontiguousarray((scale * b[i]).T)
    return state
