"""Key maps for the VAE: diffusers and original LDM / Stable Diffusion checkpoints -> minidiff AutoencoderKL.

Like minidiff/convert/keymaps/unet.py: each function takes a source state dict and the minidiff config,
returns a new dict {minidiff key: tensor} (tensors are not copied; 1x1 conv weights become views), and checks it
strictly against the model the config builds, raising one ValueError that lists missing, unexpected and mis-shaped keys.

diffusers -> minidiff is the identity, except that VAEs saved before diffusers 0.14 (the SD 1.x hub files
among them) name the mid-block attention query/key/value/proj_attn instead of to_q/to_k/to_v/to_out.0, with
the same shapes (diffusers renames them on load: ModelMixin._fix_state_dict_keys_on_load).

LDM (CompVis' ldm/modules/diffusionmodules/model.py) -> minidiff, after the prefix is removed:

    encoder.down.{i}.block.{j}.*          -> encoder.down_blocks.{i}.resnets.{j}.*   (nin_shortcut -> conv_shortcut)
    encoder.down.{i}.downsample.conv.*    -> encoder.down_blocks.{i}.downsamplers.0.conv.*
    {en,de}coder.mid.block_1 / block_2.*  -> {en,de}coder.mid_block.resnets.0 / 1.*
    {en,de}coder.mid.attn_1.{norm,q,k,v,proj_out}.*
                                          -> {en,de}coder.mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}.*
    {en,de}coder.norm_out.*               -> {en,de}coder.conv_norm_out.*
    decoder.up.{N-1-i}.block.{j}.*        -> decoder.up_blocks.{i}.resnets.{j}.*     (LDM counts up from the image)
    decoder.up.{N-1-i}.upsample.conv.*    -> decoder.up_blocks.{i}.upsamplers.0.conv.*
    conv_in, conv_out, quant_conv, post_quant_conv: unchanged

LDM's attention projections are 1x1 convs, (C, C, 1, 1); minidiff's are nn.Linear, (C, C). Reference:
diffusers 0.42 loaders/single_file_utils.py, convert_ldm_vae_checkpoint (the tests check this map against it).
"""

import re
from collections.abc import Callable, Mapping

import torch

from minidiff.convert.keymaps.unet import _diffusers_unet2d_key
from minidiff.loading.strict import check_state_dict, rename_keys
from minidiff.models.vae import AutoencoderKL, AutoencoderKLConfig

# Where the VAE lives in a single-file checkpoint; a bare VAE checkpoint (e.g. the original
# vae-ft-mse-840000-ema-pruned.ckpt) has no prefix: its keys start with encoder., decoder., ...
LDM_VAE_PREFIXES = ("first_stage_model.", "vae.")

# Tensors of a VAE training run that the model does not use, dropped by name.
LDM_VAE_TRAINING_ONLY = (
    "loss.",  # LPIPSWithDiscriminator: the learned logvar, the LPIPS network and the patch discriminator
    "model_ema.",  # LitEma shadow weights and counters (an "-ema" checkpoint already holds them as weights)
)

_LDM_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def vae_from_diffusers(state_dict: Mapping[str, torch.Tensor], config: AutoencoderKLConfig) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict (modern or pre-0.14 attention names) -> minidiff AutoencoderKL keys."""
    converted = rename_keys(state_dict, _diffusers_unet2d_key)  # the same legacy attention names as UNet2DModel
    with torch.device("meta"):  # the model only for its key names and shapes: no memory, no init
        check_state_dict(AutoencoderKL(config), converted)
    return converted


def _ldm_vae_key(key: str, num_blocks: int) -> str:
    # Map the encoder's down blocks
    key = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", key)
    key = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", key)

    # Map the decoder's up blocks, which LDM numbers from the image up: its up.{N-1} is up_blocks.0
    def up(part: str) -> Callable[[re.Match], str]:
        return lambda m: f"decoder.up_blocks.{num_blocks - 1 - int(m[1])}.{part}."

    key = re.sub(r"^decoder\.up\.(\d+)\.block\.", up("resnets"), key)
    key = re.sub(r"^decoder\.up\.(\d+)\.upsample\.", up("upsamplers.0"), key)

    # Map the mid blocks: block_1, attn_1, block_2
    key = re.sub(r"^(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0.", key)
    key = re.sub(r"^(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1.", key)
    key = re.sub(r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.",
                 lambda m: f"{m[1]}.mid_block.attentions.0.{_LDM_ATTENTION[m[2]]}.", key)

    # The resnets' 1x1 shortcut and the output norm
    key = re.sub(r"\.resnets\.(\d+)\.nin_shortcut\.", r".resnets.\1.conv_shortcut.", key)
    return re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", key)


def vae_from_ldm(state_dict: Mapping[str, torch.Tensor], config: AutoencoderKLConfig) -> dict[str, torch.Tensor]:
    """The VAE of an original single-file SD checkpoint (keys under "first_stage_model." or "vae."; the other
    components' keys are left to their own converters) or a bare LDM VAE checkpoint -> minidiff keys."""
    prefix = next((p for p in LDM_VAE_PREFIXES if any(k.startswith(p) for k in state_dict)), "")
    vae = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
    vae = {k: v for k, v in vae.items() if not k.startswith(LDM_VAE_TRAINING_ONLY)}
    converted = rename_keys(vae, lambda key: _ldm_vae_key(key, len(config.block_out_channels)))

    # Squeeze the attention's 1x1 conv weights (C, C, 1, 1) to linear (C, C); other shapes are left for the check
    for key, tensor in converted.items():
        if re.search(r"\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", key) and tensor.shape[2:] == (1, 1):
            converted[key] = tensor[:, :, 0, 0]

    with torch.device("meta"):
        check_state_dict(AutoencoderKL(config), converted)
    return converted
