"""Sampling: the pixel and Stable Diffusion loops, loss and CLIP guidance."""
