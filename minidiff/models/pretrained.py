"""from_pretrained and save_pretrained on every model class, as diffusers and transformers have them:
`UNet2DModel.from_pretrained("google/ddpm-celebahq-256")`, `AutoencoderKL.from_pretrained(id, subfolder="vae")`,
`CLIPTextModel.from_pretrained("openai/clip-vit-large-patch14")`, `unet.save_pretrained(folder)`.

The models themselves know no file format. Reading a minidiff folder, a diffusers or transformers folder (converted
in memory), an original single file or the local Hugging Face cache is minidiff/convert/pretrained.py's job;
these two methods are the one call up to it (tests/test_layout.py allows exactly these).
"""

from __future__ import annotations

import os

import torch


class PretrainedModel:
    """Mixed into the model classes (before nn.Module), for their from_pretrained / save_pretrained."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None,
                        torch_dtype: torch.dtype | None = None, revision: str | None = None,
                        variant: str | None = None):
        """This class's model from a folder, a single file or a hub id already in the local Hugging Face cache
        (never downloading), in eval mode and trainable (requires_grad on, as in diffusers); torch_dtype casts."""
        from minidiff.convert.pretrained import load_model

        return load_model(cls.__name__, pretrained_model_name_or_path, subfolder=subfolder, torch_dtype=torch_dtype,
                          revision=revision, variant=variant)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write this model as a minidiff folder (which must not exist yet) that from_pretrained reads back."""
        from minidiff.convert.pretrained import save_model

        save_model(self, save_directory)
