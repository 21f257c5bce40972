"""Denoisers: the network call eps(x, t) on a batch of rows, each row at its own timestep.

``UNetDenoiser`` wraps a diffusers/pase UNet; classifier-free guidance doubles each row into a
(unconditional, conditional) pair inside one call, so a pair never straddles two devices.
``GaussianDenoiser`` is the exact epsilon-predictor for Gaussian data: an analytic model whose
samplers converge like a trained one, for tests that need no network.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from pase.errors import PaseError


class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Model output for rows ``x`` (R, C, H, W) at timesteps ``t`` (R,)."""


class UNetDenoiser:
    """A UNet as a denoiser; ``context`` (1, L, E) enables cross-attention models and, with
    ``guidance_scale`` > 1, classifier-free guidance against ``uncond_context`` (a negative prompt's embedding;
    default: an all-zero context). ``added`` (and ``uncond_added``): SDXL's ``added_cond_kwargs`` of each prompt,
    tensors of one row."""

    def __init__(self, model: nn.Module, context: torch.Tensor | None = None, guidance_scale: float = 1.0,
                 uncond_context: torch.Tensor | None = None, added: dict[str, torch.Tensor] | None = None,
                 uncond_added: dict[str, torch.Tensor] | None = None) -> None:
        self.model = model.eval()
        self.context = context
        self.guidance_scale = guidance_scale
        self.uncond_context = uncond_context
        self.added, self.uncond_added = added, uncond_added if uncond_added is not None else added
        if guidance_scale != 1.0 and context is None:
            raise PaseError("--guidance-scale needs a text-conditioned model (e.g. sd15-unet); this model has no "
                            "encoder_hidden_states input")

    @property
    def evals_per_row(self) -> int:
        return 2 if self.guided else 1

    @property
    def guided(self) -> bool:
        return self.context is not None and self.guidance_scale != 1.0

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:
            return torch.empty_like(x)
        if self.context is None:
            return _sample(self.model(x, t))
        rows = x.shape[0]
        if not self.guided:
            return _sample(self.model(x, t, encoder_hidden_states=self.context.expand(rows, -1, -1),
                                      **_added(rows, self.added)))
        uncond = torch.zeros_like(self.context) if self.uncond_context is None else self.uncond_context
        context = torch.cat([uncond.expand(rows, -1, -1), self.context.expand(rows, -1, -1)])
        out = _sample(self.model(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=context,
                                 **_added(rows, self.uncond_added, self.added)))
        uncond, cond = out.chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)


def _added(rows: int, *prompts: dict[str, torch.Tensor] | None) -> dict[str, dict[str, torch.Tensor]]:
    """``added_cond_kwargs`` for ``rows`` rows of each prompt in turn (none for a UNet without them)."""
    present = [prompt for prompt in prompts if prompt]
    if not present:
        return {}
    return {"added_cond_kwargs": {key: torch.cat([prompt[key].expand(rows, -1) for prompt in present])
                                  for key in present[0]}}


def _sample(output: object) -> torch.Tensor:
    return output.sample if hasattr(output, "sample") else output  # diffusers returns a dataclass


class GaussianDenoiser:
    """Exact eps-prediction for data x0 ~ N(mean, std^2 I) under alpha-bar table ``alphas_cumprod``:
    eps*(x, t) = sqrt(1 - a) (x - sqrt(a) mean) / (a std^2 + 1 - a). Nonlinear in t, linear in x."""

    evals_per_row = 1

    def __init__(self, alphas_cumprod: torch.Tensor, mean: torch.Tensor, std: float = 0.5) -> None:
        self.alphas_cumprod = alphas_cumprod.to(torch.float32)
        self.mean = mean
        self.std = std

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod[t.long()].reshape(-1, *([1] * (x.dim() - 1)))
        # a mild nonlinearity keeps Picard/Parareal from converging in one pass on a purely linear field
        return (1 - a) ** 0.5 * (x - a ** 0.5 * self.mean) / (a * self.std ** 2 + 1 - a) + 0.05 * torch.tanh(x)
