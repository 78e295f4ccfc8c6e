"""Video<->action consistency of an episode, measured with the same weights that made it.

Action read-back (episodes whose actions were given or generated with the video: policy, forward dynamics):
the generated clip goes through inverse dynamics and the recovered actions are compared with the episode's,
in the model's action space (each channel already scaled by the domain's normalisation, so the error is a
normalised MSE):

    action_nmse[c] = mean_t (recovered[t, c] − actions[t, c])²      per channel c of the domain's raw width
    action_nmse    = mean_c action_nmse[c]

Latent re-render (episodes labelled by inverse dynamics): the labels drive forward dynamics from the clip's
first frame and the re-rendered latents are compared with the episode's over the latent frames that forward
dynamics generates (all but the first, which it is given); the latents are VAE-normalised (unit scale):

    latent_mse = mean over channels, frames 1.., height, width of (rerendered − episode)²

The score `consistency = exp(−error)` lies in (0, 1]; 1 means the video and the actions agree exactly.
"""

from __future__ import annotations

import numpy as np


def action_nmse(recovered: np.ndarray, actions: np.ndarray) -> tuple[float, list[float]]:
    """(overall, per channel) normalised MSE of recovered [T, A] against actions [T, A] (model space)."""
    recovered, actions = np.asarray(recovered, np.float64), np.asarray(actions, np.float64)
    if recovered.shape != actions.shape or recovered.ndim != 2:
        raise ValueError(f"recovered actions {list(recovered.shape)} and actions {list(actions.shape)} must be "
                         "the same [T, A]")
    per_channel = np.mean((recovered - actions) ** 2, axis=0)
    return float(per_channel.mean()), [float(x) for x in per_channel]


def latent_mse(rerendered: np.ndarray, latents: np.ndarray) -> float:
    """MSE of re-rendered latents [1, C, T, h, w] against the episode's over frames 1.. (frame 0 is given)."""
    rerendered, latents = np.asarray(rerendered, np.float64), np.asarray(latents, np.float64)
    if rerendered.shape != latents.shape or rerendered.ndim != 5 or rerendered.shape[2] < 2:
        raise ValueError(f"re-rendered latents {list(rerendered.shape)} and episode latents {list(latents.shape)} "
                         "must be the same [1, C, T >= 2, h, w]")
    return float(np.mean((rerendered[:, :, 1:] - latents[:, :, 1:]) ** 2))


def score(error: float | None) -> float | None:
    """consistency = exp(−error), in (0, 1]; None stays None."""
    return None if error is None else float(np.exp(-error))
