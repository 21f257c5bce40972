"""The built-in model zoo: diffusion UNets built from plain configs, never downloaded.

Each entry is a ``ModelSpec``: a config you can print, a builder, and named example
inputs with the shapes the model expects (``B`` is the batch). Models are built on whatever
device is current, so ``with torch.device("meta")`` builds SD-size UNets without allocating
their weights. ``resolve_model`` also accepts a diffusers pipeline or UNet folder and ``package.module:factory``
for a user's model.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pase import paths
from pase.errors import InputShapeError, UnknownModelError
from pase.models import folders
from pase.models.pase_unet import PaseUNet, PaseUNetConfig
from pase.models.user_code import call_factory, load_factory

BATCH = "B"
# axes of a UNet's inputs that take any size: the sample's height and width (the resolution), the prompt's tokens
FREE_AXES = {"sample": (2, 3), "encoder_hidden_states": (1,)}


@dataclass(frozen=True)
class InputSpec:
    """One named example input: its shape with ``"B"`` for the batch, and its dtype kind."""
    name: str
    shape: tuple[int | str, ...]
    kind: str = "float"  # "float" follows the capture dtype; "long" stays integer
    keyword: str | None = None  # nested keyword, e.g. SDXL's added_cond_kwargs["text_embeds"]

    def concrete(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == BATCH else int(d) for d in self.shape)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    family: str  # "diffusers.UNet2DModel", "diffusers.UNet2DConditionModel", "pase.PaseUNet", "user"
    config: dict[str, Any]
    inputs: tuple[InputSpec, ...]
    build_fn: Callable[[dict[str, Any]], nn.Module] = field(repr=False)
    default_batch: int = 8
    # pixels per cell of ``sample`` along each side: 8 for Stable Diffusion's latents, 1 for a pixel-space model,
    # None where unknown (a UNet folder without its pipeline's VAE)
    vae_factor: int | None = 1

    def build(self) -> nn.Module:
        """Build on the current device (use ``torch.device('meta')`` for large models)."""
        return self.build_fn(dict(self.config))

    def example_inputs(
        self,
        batch: int | None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "meta",
        shapes: dict[str, tuple[int, ...]] | None = None,
    ) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
        """Positional and keyword example inputs; ``shapes`` overrides are validated first.

        The batch follows the overrides when ``batch`` is None (``sample=4,3,32,32`` means batch 4
        for every input); overrides that disagree with each other or with ``batch`` are an error.
        """
        shapes = dict(shapes or {})
        unknown = set(shapes) - {spec.name for spec in self.inputs}
        if unknown:
            raise InputShapeError(
                f"model {self.name!r} has no input named {sorted(unknown)}; its inputs are "
                + ", ".join(f"{s.name} {_fmt_shape(s.shape)}" for s in self.inputs)
            )
        batch = self._batch_of(shapes, batch)
        args: list[torch.Tensor] = []
        kwargs: dict[str, Any] = {}
        for spec in self.inputs:
            shape = shapes.get(spec.name, spec.concrete(batch))
            self._check_shape(spec, tuple(shape), batch)
            if spec.kind == "long":
                tensor = torch.zeros(shape, dtype=torch.long, device=device)
            else:
                tensor = torch.zeros(shape, dtype=dtype, device=device)
            if spec.keyword is None and not kwargs:
                args.append(tensor)
            elif spec.keyword is None:
                kwargs[spec.name] = tensor
            else:
                kwargs.setdefault(spec.keyword, {})[spec.name] = tensor
        return tuple(args), kwargs

    def _batch_of(self, shapes: dict[str, tuple[int, ...]], batch: int | None) -> int:
        implied = {name: shape[0] for name, shape in shapes.items()
                   if shape and next(s for s in self.inputs if s.name == name).shape[:1] == (BATCH,)}
        sizes = set(implied.values()) | ({batch} if batch is not None else set())
        if len(sizes) > 1:
            given = ", ".join(f"{name} has batch {size}" for name, size in implied.items())
            raise InputShapeError(f"the batch sizes disagree: {given}" + (f", --batch is {batch}" if batch else "")
                                  + "; give every input the same batch (first dimension)")
        return sizes.pop() if sizes else self.default_batch

    def _check_shape(self, spec: InputSpec, shape: tuple[int, ...], batch: int) -> None:
        expected = spec.concrete(batch)
        free = FREE_AXES.get(spec.name, ()) if self.family != "user" else ()
        if len(shape) != len(expected) or any(
            want != BATCH and axis not in free and got != exp
            for axis, (got, exp, want) in enumerate(zip(shape, expected, spec.shape))
        ):
            raise InputShapeError(
                f"input {spec.name!r} of model {self.name!r} has shape {tuple(shape)}, but the model "
                f"expects {_fmt_shape(spec.shape)} (B = batch, any size). Fix the shape you passed "
                f"for {spec.name!r}, or pick a model whose config matches your data."
            )


def _fmt_shape(shape: tuple[int | str, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _unet2d(config: dict[str, Any]) -> nn.Module:
    from diffusers import UNet2DModel  # noqa: PLC0415 - diffusers takes 1-2 s to import; pase-unet and cached graphs never need it

    return UNet2DModel(**config)


def _unet2d_condition(config: dict[str, Any]) -> nn.Module:
    from diffusers import UNet2DConditionModel  # noqa: PLC0415 - as above

    return UNet2DConditionModel(**config)


def _pase_unet(config: dict[str, Any]) -> nn.Module:
    return PaseUNet(PaseUNetConfig(**config))


UNET_TINY = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
)
# google/ddpm-cifar10-32's config.json (Ho et al. 2020's CIFAR-10 model, 35.7M parameters).
DDPM_CIFAR10 = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    act_fn="silu", attention_head_dim=None, center_input_sample=False, downsample_padding=0,
    flip_sin_to_cos=False, freq_shift=1, mid_block_scale_factor=1, norm_eps=1e-6, norm_num_groups=32,
    time_embedding_type="positional",
)
# Stable Diffusion 1.5's unet/config.json (859.5M parameters).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, act_fn="silu", center_input_sample=False, downsample_padding=1,
    flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32,
)
# Stable Diffusion 2's unet/config.json (stabilityai/stable-diffusion-2, 768 px: 96x96 latents; 865.9M parameters):
# SD-1.5's blocks with 64-channel heads everywhere ("attention_head_dim" counts heads there), 1024-wide text
# embeddings (OpenCLIP ViT-H) and linear projections into and out of each transformer.
SD2_UNET = dict(
    sample_size=96, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, act_fn="silu",
    center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1,
    norm_eps=1e-5, norm_num_groups=32,
)
# Stable Diffusion XL base 1.0's unet/config.json (2.57B parameters).
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, act_fn="silu", center_input_sample=False, downsample_padding=1,
    flip_sin_to_cos=True, freq_shift=0, norm_eps=1e-5, norm_num_groups=32,
)

# the tiny text-conditioned UNet diffusers' own tests use: cross-attention transformer blocks (layer norms,
# GEGLU feed-forward) at unit-test size
SD_TINY = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
)


def _unconditional_inputs(channels: int, size: int) -> tuple[InputSpec, ...]:
    return InputSpec("sample", (BATCH, channels, size, size)), InputSpec("timestep", (BATCH,), kind="long")


ZOO: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("unet-tiny", "diffusers UNet2DModel, 2 levels, 0.70M params (tests)", "diffusers.UNet2DModel",
                  UNET_TINY, _unconditional_inputs(3, 32), _unet2d),
        ModelSpec("ddpm-cifar10", "diffusers UNet2DModel, DDPM CIFAR-10 config, 35.7M params", "diffusers.UNet2DModel",
                  DDPM_CIFAR10, _unconditional_inputs(3, 32), _unet2d),
        ModelSpec("sd15-unet", "diffusers UNet2DConditionModel, Stable Diffusion 1.5, 860M params",
                  "diffusers.UNet2DConditionModel", SD15_UNET,
                  (*_unconditional_inputs(4, 64), InputSpec("encoder_hidden_states", (BATCH, 77, 768))),
                  _unet2d_condition, vae_factor=8),
        ModelSpec("sd2-unet", "diffusers UNet2DConditionModel, Stable Diffusion 2 (768 px), 866M params",
                  "diffusers.UNet2DConditionModel", SD2_UNET,
                  (*_unconditional_inputs(4, 96), InputSpec("encoder_hidden_states", (BATCH, 77, 1024))),
                  _unet2d_condition, vae_factor=8),
        ModelSpec("sd-tiny", "diffusers UNet2DConditionModel, SD-shaped at test size (tests)",
                  "diffusers.UNet2DConditionModel", SD_TINY,
                  (*_unconditional_inputs(4, 16), InputSpec("encoder_hidden_states", (BATCH, 77, 32))),
                  _unet2d_condition, vae_factor=8),
        ModelSpec("sdxl-unet", "diffusers UNet2DConditionModel, Stable Diffusion XL base, 2.57B params",
                  "diffusers.UNet2DConditionModel", SDXL_UNET,
                  (*_unconditional_inputs(4, 128), InputSpec("encoder_hidden_states", (BATCH, 77, 2048)),
                   InputSpec("text_embeds", (BATCH, 1280), keyword="added_cond_kwargs"),
                   InputSpec("time_ids", (BATCH, 6), keyword="added_cond_kwargs")), _unet2d_condition, vae_factor=8),
        ModelSpec("pase-unet", "pase's plain-PyTorch UNet (symbolic_trace-able), 0.43M params", "pase.PaseUNet",
                  {}, _unconditional_inputs(3, 32), _pase_unet),
    )
}


def resolve_model(name: str, input_shapes: list[tuple[int, ...]] | None = None) -> ModelSpec:
    """A zoo entry by name, a diffusers folder (a pipeline's, or a UNet's: ``pase.models.folders``), or a user
    model from ``package.module:factory``.

    A user factory is called with no arguments and must return an ``nn.Module``; its inputs
    come from ``input_shapes`` (full shapes, batch first), passed positionally.
    """
    if name in ZOO:
        return ZOO[name]
    if folders.looks_like_folder(name):
        return folder_model(name)
    if ":" not in name:
        raise UnknownModelError(
            f"unknown model {name!r}. Built-in models: {', '.join(ZOO)}. Or give a diffusers pipeline or UNet "
            "folder (a path), or for your own model 'package.module:factory' with --input-shape."
        )
    factory = load_factory(name)
    if not input_shapes:
        raise InputShapeError(
            f"model {name!r} is not in the zoo, so pase does not know its inputs: pass one --input-shape "
            "per positional input, batch first (e.g. --input-shape 8,3,32,32 --input-shape 8)."
        )
    inputs = tuple(InputSpec(f"input{i}", tuple(shape)) for i, shape in enumerate(input_shapes))
    return ModelSpec(name, f"user model from {name}", "user", {}, inputs, lambda _cfg: call_factory(factory, name),
                     default_batch=input_shapes[0][0] if input_shapes[0] else 1)


def recorded_model(name: str) -> ModelSpec | None:
    """The model a plan records as ``name`` when pase can rebuild it from data alone: a zoo entry or a diffusers
    folder (None for a user's ``package.module:factory``: a plan never makes pase import code)."""
    if name in ZOO:
        return ZOO[name]
    if ":" not in name and folders.looks_like_folder(name):
        return folder_model(name)
    return None


def folder_model(name: str) -> ModelSpec:
    """The UNet of a diffusers folder as a ``ModelSpec`` named by the folder's absolute path (what a plan records,
    so that train and verify rebuild it from anywhere)."""
    unet, pipeline = folders.unet_folder(name)
    cls, config = folders.read_config(unet)
    size = config.get("sample_size") or 64
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    inputs = [InputSpec("sample", (BATCH, int(config.get("in_channels", 4)), height, width)),
              InputSpec("timestep", (BATCH,), kind="long")]
    conditioning = folders.conditioning_inputs(cls, config, folders.text_length(pipeline))
    inputs += [InputSpec(input_name, shape, keyword=keyword) for input_name, shape, keyword in conditioning]
    root = paths.expanded(name).resolve()
    factor = folders.vae_factor(pipeline) if pipeline is not None else None
    if factor is None and int(config.get("in_channels", 4)) == 3:  # a pixel-space UNet
        factor = 1
    return ModelSpec(str(root), f"diffusers {cls} from {root}", f"diffusers.{cls}", config, tuple(inputs),
                     lambda cfg: folders.build_from_folder(cls, cfg, unet), vae_factor=factor)


def resolution_inputs(spec: ModelSpec, batch: int, resolution: int | None = None,
                      text_length: int | None = None) -> dict[str, tuple[int, ...]]:
    """Input shapes (``name -> shape``, batch first) for images of ``resolution`` pixels a side (the sample's
    spatial size: pixels over the VAE factor) and prompts of ``text_length`` tokens; {} when both are None."""
    shapes: dict[str, tuple[int, ...]] = {}
    inputs = {spec_input.name: spec_input for spec_input in spec.inputs}
    if resolution is not None:
        sample = inputs.get("sample")
        if sample is None or len(sample.shape) != 4:
            raise InputShapeError(f"--resolution needs an image input named sample; {spec.name!r} has "
                                  f"{', '.join(inputs)}: use --input-shape")
        if spec.vae_factor is None:
            raise InputShapeError(f"--resolution: {spec.name!r} is a UNet folder without its pipeline's VAE, so its "
                                  "latent size per pixel is unknown; give the pipeline folder, or --input-shape "
                                  "sample=B,C,H,W in latent cells")
        levels = len(spec.config.get("block_out_channels") or [0]) - 1  # each level but the last halves the size
        step = spec.vae_factor * 2 ** max(levels, 0)
        if resolution % step:
            raise InputShapeError(f"--resolution {resolution}: {spec.name!r} needs a multiple of {step} pixels (VAE "
                                  f"factor {spec.vae_factor} x {2 ** max(levels, 0)} for its {levels} downsamplings); "
                                  f"e.g. {max(step, resolution // step * step)} or {(resolution // step + 1) * step}")
        cells = resolution // spec.vae_factor
        shapes["sample"] = (batch, int(sample.shape[1]), cells, cells)
    if text_length is not None:
        text = inputs.get("encoder_hidden_states")
        if text is None:
            raise InputShapeError(f"--text-length: {spec.name!r} takes no text (no encoder_hidden_states input)")
        shapes["encoder_hidden_states"] = (batch, text_length, int(text.shape[2]))
    return shapes
