"""Turbo's S3Gen: the distilled meanflow decoder (``s3gen_meanflow.safetensors``).

Upstream builds it as ``S3Gen(meanflow=True)``: the same network as the Original's S3Gen except
that the flow estimator (``ConditionalDecoder``) embeds two times, the step's start ``t`` and
end ``r``, each through the shared sinusoidal embedding and ``time_mlp``, and mixes them with
``time_embed_mixer`` (Linear 2 x 1024 -> 1024, no bias; IntMeanFlow). The solver takes plain
Euler steps on a linear schedule (2 by default) with no classifier-free guidance.

chatterbox-vllm's S3Gen has no meanflow option, so we load its S3Gen, give the estimator the
mixer (under upstream's key, so the checkpoint loads strictly) and replace its ``time_mlp`` with
:class:`MeanflowTime`: the estimator is then called with ``t`` and ``r`` stacked into one
``2B`` time vector and returns what upstream's meanflow estimator returns. The estimator is
marked ``meanflow = True``, which tells :class:`~..s3gen.stream.S3GenStreamDecoder` to solve
without guidance on a linear schedule.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from loguru import logger
from torch import nn

from chatterbox_sidecar.engines.chatterbox.s3gen.loader import load_s3gen_state

S3GEN_MEANFLOW_FILE = "s3gen_meanflow.safetensors"
MIXER_KEY = "flow.decoder.estimator.time_embed_mixer.weight"


class MeanflowTime(nn.Module):
    """``time_mlp`` for a meanflow estimator: embeds ``[t; r]`` (2B rows), mixes to B rows.

    Args:
        time_mlp: The estimator's own time MLP (shared by ``t`` and ``r``).
        mixer: The ``time_embed_mixer`` linear layer.
    """

    def __init__(self, time_mlp: nn.Module, mixer: nn.Module):
        super().__init__()
        self.time_mlp = time_mlp
        self.mixer = mixer

    def forward(self, embedded: torch.Tensor) -> torch.Tensor:
        """Mix the embeddings of ``t`` (first half of the rows) and ``r`` (second half)."""
        b = embedded.shape[0] // 2
        h = self.time_mlp(embedded)
        return self.mixer(torch.cat([h[:b], h[b:]], dim=1))


def load_meanflow_s3gen(path: Path, device: str | torch.device = "cpu", dtype=torch.float32):
    """Build Turbo's S3Gen and load ``s3gen_meanflow.safetensors``.

    Args:
        path: The checkpoint.
        device: Device to run on.
        dtype: Floating dtype (upstream runs S3Gen in float32).

    Returns:
        The model (a ``chatterbox_vllm.models.s3gen.S3Gen`` whose estimator is meanflow), in
        eval mode.

    Raises:
        ValueError: If the checkpoint is not a meanflow S3Gen (an Original ``s3gen.safetensors``
            lacks the time mixer).
    """
    from chatterbox_vllm.models.s3gen import S3Gen
    from safetensors.torch import load_file

    started = time.monotonic()
    model = S3Gen()
    estimator = model.flow.decoder.estimator
    dim = estimator.time_mlp.linear_2.out_features
    estimator.time_embed_mixer = nn.Linear(2 * dim, dim, bias=False)
    state = load_file(str(path))
    if MIXER_KEY not in state:
        raise ValueError(f"{path}: not a meanflow S3Gen checkpoint (no {MIXER_KEY})")
    load_s3gen_state(model, state, path, "a meanflow S3Gen")
    estimator.time_mlp = MeanflowTime(estimator.time_mlp, estimator.time_embed_mixer)
    estimator.meanflow = True
    model = model.to(device=device, dtype=dtype).eval()
    logger.info(f"Meanflow S3Gen loaded from {path} in {time.monotonic() - started:.1f} s")
    return model
