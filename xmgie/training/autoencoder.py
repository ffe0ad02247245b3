"""The autoencoder stage of a recipe: fit a model directory's VAE to the training images.

MGIE's objective never trains the VAE (it is Stable Diffusion's, frozen); a preset built from scratch needs
one first. The loss is L1 + MSE of the reconstruction from a posterior sample plus a small KL term
(Stable Diffusion's autoencoder recipe without its perceptual and adversarial terms), on the sources and
targets of a paired folder. Afterwards the latent scaling factor is set to 1/std of the training latents,
as Stable Diffusion's 0.18215 was chosen.

A fresh ``AutoencoderKL``'s posterior has a standard deviation near 1, so its decoder first learns from latents
drowned in sampling noise until the encoder learns to shrink it; Stable Diffusion's autoencoder trains long enough
not to care, a stage of minutes does not. The stage therefore starts the posterior narrow
(``initial_log_variance``: the log-variance channels constant at that value), and the KL term and the
reconstruction move it from there.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from xmgie.editing.images import load_image
from xmgie.training.data import read_pairs


@dataclass
class AutoencoderConfig:
    """One autoencoder stage."""

    steps: int = 1000
    batch_size: int = 16
    learning_rate: float = 1e-3
    kl_weight: float = 1e-6
    initial_log_variance: float | None = -8.0
    """Start value of the posterior's log-variance (``None``: as the architecture initialises it)."""
    seed: int = 0
    progress: bool = True


def start_posterior_narrow(vae, log_variance: float) -> None:
    """Make ``vae``'s posterior log-variance the constant ``log_variance``: zero weights and that bias on the
    log-variance half of the layer that produces the posterior's moments."""
    layer = vae.quant_conv if getattr(vae, "quant_conv", None) is not None else vae.encoder.conv_out
    channels = vae.config.latent_channels
    with torch.no_grad():
        layer.weight[channels:].zero_()
        layer.bias[channels:].fill_(log_variance)


def _training_pixels(data: str | Path, resolution: int) -> torch.Tensor:
    """Every source and target image of the paired folder, resized to ``resolution``, in [-1, 1]."""
    folder = Path(data)
    arrays = []
    for pair in read_pairs(folder):
        for path in (pair.source_path, pair.target_path):
            image = load_image(path).resize((resolution, resolution))
            arrays.append(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def train_autoencoder(vae, data: str | Path, resolution: int, config: AutoencoderConfig, log: Path | None = None):
    """Train ``vae`` in place on ``data``'s images; return the per-step losses. Flips augment the images."""
    pixels = _training_pixels(data, resolution)
    generator = torch.Generator().manual_seed(config.seed)
    if config.initial_log_variance is not None:
        start_posterior_narrow(vae, config.initial_log_variance)
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.learning_rate, weight_decay=0.0)
    warmup = max(1, config.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(1.0, step / config.steps))),
    )
    bar = None
    if config.progress:
        from tqdm import tqdm

        bar = tqdm(total=config.steps, desc="autoencoder", unit="step", file=sys.stderr, dynamic_ncols=True)
    history = []
    handle = log.open("w", encoding="utf-8") if log is not None else None
    for step in range(1, config.steps + 1):
        index = torch.randint(0, len(pixels), (config.batch_size,), generator=generator)
        batch = pixels[index]
        flip = torch.rand(config.batch_size, generator=generator) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
        posterior = vae.encode(batch).latent_dist
        sample = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(sample).sample
        l1 = F.l1_loss(reconstruction, batch)
        loss = l1 + F.mse_loss(reconstruction, batch) + config.kl_weight * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        row = {"step": step, "loss": loss.item(), "l1": l1.item()}
        history.append(row)
        if handle is not None:
            handle.write(json.dumps(row) + "\n")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(l1=f"{row['l1']:.4f}")
    if bar is not None:
        bar.close()
    if handle is not None:
        handle.close()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(pixels[i : i + 64]).latent_dist.mean for i in range(0, len(pixels), 64)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return history
