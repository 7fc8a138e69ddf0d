"""Gaussian noise drawn exactly as diffusers draws it, so a seed a user knows gives the same image.

diffusers' `randn_tensor` rules, which matter for bit-identical noise:
- a CPU generator always draws on the CPU, and the result is then moved to the target device;
- a list of generators draws one (1, ...) slice per sample and concatenates them;
- CPU randn depends on the total size (randn(8) != randn(32)[:8]), so shapes and call order must match.
"""

from __future__ import annotations

import torch

Generator = torch.Generator | list[torch.Generator] | None


def randn_tensor(
    shape: tuple[int, ...] | torch.Size,
    generator: Generator = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Standard normal noise of `shape` on `device`, drawn from `generator` (one per sample if a list)."""
    shape = tuple(shape)
    device = torch.device(device or "cpu")
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    first = generator[0] if isinstance(generator, list) else generator
    draw_device = device
    if first is not None and first.device.type != device.type:
        if first.device.type != "cpu":
            raise ValueError(f"cannot draw a {device} tensor from a {first.device} generator")
        draw_device = torch.device("cpu")

    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}: pass one per sample")
        per_sample = (1, *shape[1:])
        slices = [torch.randn(per_sample, generator=g, device=draw_device, dtype=dtype) for g in generator]
        return torch.cat(slices, dim=0).to(device)
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)
