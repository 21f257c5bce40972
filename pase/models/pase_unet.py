"""A plain-PyTorch diffusion UNet that ``torch.fx.symbolic_trace`` accepts.

diffusers' UNets defeat symbolic tracing (``len()`` on proxies, iteration over shapes), so
this model exists to exercise pase's second capture path on a real diffusion architecture:
sinusoidal timestep embedding + MLP, ResBlocks (GroupNorm, SiLU, conv, timestep add, 1x1
skip), strided-conv downsampling, multi-head self-attention written as matmul-softmax-matmul,
nearest upsampling and skip concatenation. Its forward avoids Python control flow on tensor
values and on shapes, which is what keeps it traceable.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class PaseUNetConfig:
    """Plain config, printable and saveable (diffusers' ``from_config`` style)."""

    in_channels: int = 3
    out_channels: int = 3
    sample_size: int = 32
    channels: tuple[int, ...] = (32, 64)
    attention_levels: tuple[bool, ...] = (False, True)
    num_heads: int = 4
    norm_groups: int = 8
    time_embed_dim: int = 128
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def sinusoidal_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """DDPM's sinusoidal timestep embedding; shape (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=timesteps.device) / half)
    angles = timesteps.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions, as explicit matmul-softmax-matmul."""

    def __init__(self, ch: int, heads: int, groups: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Linear(ch, 3 * ch)
        self.proj = nn.Linear(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.qkv(tokens).reshape(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        scores = torch.matmul(q, k.transpose(-1, -2)) * (c // self.heads) ** -0.5
        out = torch.matmul(torch.softmax(scores, dim=-1), v)  # (B, heads, HW, d)
        out = self.proj(out.transpose(1, 2).reshape(b, h * w, c))
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class Level(nn.Module):
    """One resolution level of the encoder or decoder: a ResBlock and optional attention."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, groups: int, attention: bool, heads: int) -> None:
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, temb_dim, groups)
        self.attn = SelfAttention(out_ch, heads, groups) if attention else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:  # decoder levels: the encoder's skip tensor joins along channels
            x = torch.cat([x, skip], dim=1)
        return self.attn(self.res(x, temb))


class PaseUNet(nn.Module):
    """Encoder levels with strided-conv downsampling, a middle block, decoder levels fed by skip concat."""

    def __init__(self, config: PaseUNetConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or PaseUNetConfig()
        if len(cfg.channels) != len(cfg.attention_levels):
            raise ValueError("PaseUNetConfig: channels and attention_levels need one entry per level")
        temb = cfg.time_embed_dim
        self.time_mlp = nn.Sequential(nn.Linear(cfg.channels[0], temb), nn.SiLU(), nn.Linear(temb, temb))
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.channels[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        ch = cfg.channels[0]
        for i, (out_ch, attn) in enumerate(zip(cfg.channels, cfg.attention_levels)):
            self.down.append(Level(ch, out_ch, temb, cfg.norm_groups, attn, cfg.num_heads))
            last = i == len(cfg.channels) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(out_ch, out_ch, 3, stride=2, padding=1))
            ch = out_ch
        self.mid = Level(ch, ch, temb, cfg.norm_groups, True, cfg.num_heads)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, (out_ch, attn) in reversed(list(enumerate(zip(cfg.channels, cfg.attention_levels)))):
            self.up.append(Level(ch + out_ch, out_ch, temb, cfg.norm_groups, attn, cfg.num_heads))
            first = i == 0
            self.upsample.append(nn.Identity() if first else nn.Upsample(scale_factor=2.0, mode="nearest"))
            ch = out_ch
        self.norm_out = nn.GroupNorm(cfg.norm_groups, ch)
        self.conv_out = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        temb = self.time_mlp(sinusoidal_embedding(timestep, self.config.channels[0]))
        h = self.conv_in(sample)
        skips = []
        for level, down in zip(self.down, self.downsample):
            h = level(h, temb)
            skips.append(h)
            h = down(h)
        h = self.mid(h, temb)
        for level, up, skip in zip(self.up, self.upsample, reversed(skips)):
            h = level(h, temb, skip)
            h = up(h)
        return self.conv_out(F.silu(self.norm_out(h)))
