"""minidiff: diffusion models from scratch in plain PyTorch, at parity with diffusers."""

__version__ = "0.1.0"
