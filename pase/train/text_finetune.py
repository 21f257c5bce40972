"""What DeMe and TuneQDM need beyond ``pase.train.text_jobs`` to fine-tune a text-to-image pipeline folder.

- A held-out part of the captioned data (or cache), kept out of training: DeMe scores its task-vector merge on
  it. It is at most ``HELD_OUT_CAP`` items (10% of the data below that), so that encoding it on rank 0 stays
  small whatever the data set's size.
- ``latent_score``: the prediction loss of a candidate UNet on those items, with latents, noise and timesteps
  drawn once from a fixed seed, so every merge candidate is judged on the same draws (no SNR weighting or noise
  offset: the score compares candidates; it is not the training loss).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, default_collate

from pase.train.data import DataError
from pase.train.loop import model_output
from pase.train.streaming import Transform
from pase.train.text_to_image import SDXL_INPUTS, LatentLoss

HELD_OUT_FRACTION = 0.1
HELD_OUT_CAP = 64


class DataPart(Dataset):
    """Some items of a data set, by index; random crops and flips (``sample(index, seed)``) pass through."""
    def __init__(self, dataset: Any, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.dataset[self.indices[index]]

    def sample(self, index: int, seed: int | None) -> dict[str, torch.Tensor]:
        sample = getattr(self.dataset, "sample", None)
        return sample(self.indices[index], seed) if sample is not None else self.dataset[self.indices[index]]


def split_held_out(dataset: Any, seed: int) -> tuple[DataPart, DataPart]:
    """A seeded (train, held-out) split of a map-style data set; the held-out part has 1 to HELD_OUT_CAP items.
    Images and a cache of them split alike (the same items, in the same order)."""
    count = len(dataset)
    if count < 2:
        raise DataError(f"the data has {count} item(s); DeMe needs at least 2, to hold some out for its merge")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    held = min(HELD_OUT_CAP, max(1, int(count * HELD_OUT_FRACTION)))
    return DataPart(dataset, order[held:]), DataPart(dataset, order[:held])


@torch.no_grad()
def encode_held_out(part: Dataset, encode: Transform | None, batch: int) -> dict[str, torch.Tensor]:
    """The held-out items as the UNet's inputs (latent distribution, text embeddings, SDXL's pooled embeddings and
    time ids), on the CPU."""
    pieces: list[dict[str, torch.Tensor]] = []
    for start in range(0, len(part), batch):  # type: ignore[arg-type]
        collated = default_collate([part[i] for i in range(start, min(start + batch, len(part)))])  # type: ignore[arg-type]
        encoded = encode(collated) if encode is not None else collated
        pieces.append({key: value.detach().cpu() for key, value in encoded.items() if isinstance(value, torch.Tensor)})
    return {key: torch.cat([piece[key] for piece in pieces]) for key in pieces[0]}


def latent_score(model: nn.Module, held_out: dict[str, torch.Tensor], scheduler: Any, loss: LatentLoss,
                 batch: int = 8, seed: int = 1234, device: torch.device | str = "cpu",
                 ) -> Callable[[dict[str, torch.Tensor]], float]:
    """A DeMe merge score: the mean squared error of the weights' prediction (epsilon or v, as trained) on the
    held-out latents, with fixed draws."""
    generator = torch.Generator().manual_seed(seed)
    mean, std = held_out["latent_mean"], held_out["latent_std"]
    latents = mean + std * torch.randn(mean.shape, generator=generator)
    noise = torch.randn(mean.shape, generator=generator)
    t = torch.randint(0, int(scheduler.config.num_train_timesteps), (len(mean),), generator=generator)
    noisy = scheduler.add_noise(latents, noise, t)
    target = noise if loss.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
    added = [key for key in SDXL_INPUTS if key in held_out]

    @torch.no_grad()
    def score(state: dict[str, torch.Tensor]) -> float:
        model.load_state_dict(state)
        model.eval()
        total = 0.0
        for start in range(0, len(mean), batch):
            part = slice(start, start + batch)
            kwargs = {"added_cond_kwargs": {key: held_out[key][part].to(device) for key in added}} if added else {}
            prediction = model_output(model(noisy[part].to(device), t[part].to(device),
                                            encoder_hidden_states=held_out["encoder_hidden_states"][part].to(device),
                                            **kwargs))
            total += F.mse_loss(prediction.float(), target[part].to(device), reduction="sum").item()
        return total / target.numel()

    return score


__all__ = ["HELD_OUT_CAP", "DataPart", "encode_held_out", "latent_score", "split_held_out"]
