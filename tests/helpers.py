"""What the parity tests share: seeded noise, a reference model and minidiff's copy of it, and the two ways of
comparing them (the largest difference; the same tensors, bit for bit)."""

from collections.abc import Callable

import torch
from torch import nn


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=seeded(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def output_diff(reference: nn.Module, ours: nn.Module, *inputs, **kwargs) -> float:
    """The largest difference between a diffusers model's `.sample` and minidiff's `.sample`."""
    with torch.no_grad():
        expected = reference(*inputs, **kwargs).sample
        got = ours(*inputs, **kwargs).sample
    assert got.shape == expected.shape
    return max_diff(got, expected)


def make_pair(reference_class: type[nn.Module], ours_class: type[nn.Module], read_config: Callable,
              convert: Callable, seed: int = 0, **config) -> tuple[nn.Module, nn.Module]:
    """A seeded reference model built from `config` and the minidiff model holding its converted weights:
    minidiff's config is read from the reference's own config dict, as from a config.json."""
    torch.manual_seed(seed)
    reference = reference_class(**config).eval()
    with torch.device("meta"):  # no init, no copy: the converted tensors become the parameters
        ours = ours_class(read_config(dict(reference.config))).eval()
    ours.load_state_dict(convert(reference.state_dict(), ours.config), assign=True)
    return reference, ours


def assert_same_tensors(got: dict, expected: dict) -> None:
    """The same names, and under each the same dtype, shape and bytes (NaN included)."""
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(as_bytes(got[name]), as_bytes(tensor)), name


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)
