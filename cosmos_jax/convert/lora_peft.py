"""LoRA adapters -> the PEFT/diffusers LoRA key layout, so `Cosmos3OmniTransformer.load_lora_adapter` reads them.

For an adapted kernel whose diffusers module is `layers.{i}.self_attn.add_q_proj`:
`transformer.layers.{i}.self_attn.add_q_proj.lora_A.weight` = a[i].T [r, in] and `...lora_B.weight` =
(scale * b[i]).T [out, r]. The scale is folded into lora_B and no alpha is written, so PEFT's own scaling
(lora_alpha / r, with lora_alpha defaulting to r) is 1 and `W x + B A x` is exactly this project's update. A
modality projection (e.g. `proj_in`, an nn.Linear there too) is one module, written once. The action projections
are refused: diffusers holds their per-domain kernels as an nn.Embedding row [domains, in*out], where PEFT's LoRA
is one low-rank update of that whole table, not one per domain.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from cosmos_jax.config import Cosmos3Config
from cosmos_jax.convert.keymap_transformer import DOMAIN, LINEAR, key_table
from cosmos_jax.convert.tree_paths import get_path

PREFIX = "transformer"
FILE_NAME = "pytorch_lora_weights.safetensors"


def peft_state(adapters: Mapping[str, Any], paths: list[tuple[str, ...]], scale: float,
               config: Cosmos3Config) -> dict[str, np.ndarray]:
    """The PEFT-layout state dict (fp32) of `adapters` at kernel `paths`."""
    table = key_table(config)
    modules = {e.path: e.torch_key.removesuffix(".weight") for e in table if e.transform == LINEAR}
    per_layer = {e.path for e in table if e.per_layer}
    domain = {e.path for e in table if e.transform == DOMAIN}
    state: dict[str, np.ndarray] = {}
    for path in paths:
        if path in domain:
            raise ValueError(f"{'/'.join(path)}: diffusers holds the per-domain action kernels in one nn.Embedding "
                             "table, which has no per-domain PEFT LoRA layout; train without the action_proj "
                             "targets to export, or use the adapters with this project (--lora / --merge-lora)")
        if path not in modules:
            raise ValueError(f"{'/'.join(path)} is not a linear of this config")
        node = get_path(adapters, path)
        a, b = (np.asarray(jax.device_get(node[k]), np.float32) for k in ("a", "b"))
        if path in per_layer:
            pairs = [(modules[path].format(i=i), a[i], b[i]) for i in range(config.num_hidden_layers)]
        else:
            pairs = [(modules[path], a, b)]
        for module, a_i, b_i in pairs:
            name = f"{PREFIX}.{module}"
            state[f"{name}.lora_A.weight"] = np.ascontiguousarray(a_i.T)
            state[f"{name}.lora_B.weight"] = np.ascontiguousarray((scale * b_i).T)
    return state
