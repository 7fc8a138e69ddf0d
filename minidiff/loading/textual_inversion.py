"""Textual inversion (Gal et al. 2022): a new word whose embedding was learned, added to a loaded model.

load_textual_inversion reads the embedding files people share; add_token gives the tokenizer a new token and
the text encoder's embedding table its row; load_textual_inversion_into does both for a StableDiffusion.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from minidiff.loading.safetensors import load_file

if TYPE_CHECKING:
    from minidiff.pipelines.stable_diffusion import StableDiffusion


def load_textual_inversion(
    source: str | os.PathLike | Mapping | torch.Tensor, token: str | None = None
) -> dict[str, torch.Tensor]:
    """A textual-inversion embedding -> {token: (n_vectors, D) tensor}, from a file or an object already loaded.

    The formats diffusers' load_textual_inversion reads:
    - diffusers (learned_embeds.bin / .safetensors, sd-concepts-library): {token: (D,) or (n, D)};
    - Automatic1111 .pt: {"string_to_param": {"*": (n, D)}, "name": token, ...};
    - Automatic1111 .safetensors: {"emb_params": (n, D)}: the token is the file's name (diffusers would call
      it "emb_params" unless told);
    - a bare tensor: pass token.
    `token` replaces the name stored in the file. .bin/.pt files are read with torch.load(weights_only=True),
    which runs no pickled code. load_textual_inversion_into adds the result to a loaded model."""
    stem = None
    if isinstance(source, (str, os.PathLike)):
        path, stem = Path(source), Path(source).stem
        source = load_file(path) if path.suffix == ".safetensors" else torch.load(
            path, map_location="cpu", weights_only=True)
    if isinstance(source, torch.Tensor):
        name, vectors = token, source
    elif isinstance(source, Mapping) and "string_to_param" in source:
        name, vectors = source.get("name"), source["string_to_param"]["*"]
    elif isinstance(source, Mapping) and len(source) == 1:
        name, vectors = next(iter(source.items()))
        name = stem if name == "emb_params" else name
    else:
        keys = list(source) if isinstance(source, Mapping) else type(source).__name__
        raise ValueError(f"not a textual-inversion embedding: expected one {{token: tensor}} entry or an "
                         f"Automatic1111 'string_to_param' dict, got {keys}")
    name = token or name
    if not name:
        raise ValueError("the embedding does not name its token: pass token=")
    if not (isinstance(vectors, torch.Tensor) and vectors.is_floating_point() and vectors.ndim in (1, 2)):
        raise ValueError(f"the embedding of {name!r} is not a (D,) or (n_vectors, D) float tensor")
    return {name: vectors.reshape(-1, vectors.shape[-1])}


def add_token(sd: StableDiffusion, token: str, vector: torch.Tensor) -> int:
    """Teach `sd` a new word: `token` joins the tokenizer and `vector` (D,) the text encoder's token embedding
    table, under the same new id (returned). A ValueError, changing nothing, if the tokenizer already reads
    `token` as one token (a word of the vocabulary or an added token) or the vector does not fit."""
    tokenizer, text_encoder = sd.tokenizer, sd.text_encoder
    ids = tokenizer.encode(token)
    if len(ids) == 1:
        raise ValueError(f"{token!r} is already in the vocabulary (token id {ids[0]}): choose a string the tokenizer "
                         "does not know, e.g. '<my-concept>'")
    if len(tokenizer) != text_encoder.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the text encoder "
                         f"{text_encoder.config.vocab_size} embeddings: a new token would not get its own row")
    if vector.shape != (text_encoder.config.hidden_size,):
        raise ValueError(f"the embedding of {token!r} has shape {tuple(vector.shape)}; this text encoder's are "
                         f"({text_encoder.config.hidden_size},)")
    tokenizer.add_tokens([token])
    return text_encoder.add_token_embedding(vector)


def load_textual_inversion_into(sd: StableDiffusion, source: str | os.PathLike, token: str | None = None) -> list[str]:
    """Load a textual-inversion embedding (a learned_embeds.safetensors from train.py textual-inversion, or any
    format load_textual_inversion reads) into a loaded StableDiffusion; returns the words to write
    in prompts. `token` renames the concept. A concept of n vectors adds diffusers' names token, token_1, ...,
    token_{n-1}; write them all, in order, where the concept goes."""
    ((name, vectors),) = load_textual_inversion(source, token).items()
    names = [name] + [f"{name}_{i}" for i in range(1, len(vectors))]
    for word, vector in zip(names, vectors, strict=True):
        add_token(sd, word, vector)
    return names
