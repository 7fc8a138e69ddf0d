"""Key maps for the Stable Diffusion UNet: diffusers and original single-file (LDM) checkpoints, strictly.

diffusers UNet2DConditionModel -> minidiff is the identity: minidiff's module names are diffusers' names.

An original SD checkpoint (sd-v1-5.ckpt, v2-1_768-ema-pruned.safetensors, ...) holds the whole LatentDiffusion
model; the UNet is everything under "model.diffusion_model.", laid out as LDM's openaimodel.py UNetModel:

    time_embed.0/2                 time_embedding.linear_1/2
    input_blocks.0.0               conv_in
    input_blocks.i.0 (ResBlock)    down_blocks.b.resnets.l      i = 1 + b * (layers + 1) + l
    input_blocks.i.0.op            down_blocks.b.downsamplers.0.conv   (l = layers: the block's last slot)
    input_blocks.i.1               down_blocks.b.attentions.l   (SpatialTransformer: same inner names)
    middle_block.0/1/2             mid_block.resnets.0, mid_block.attentions.0, mid_block.resnets.1
    output_blocks.i.0              up_blocks.b.resnets.l        i = b * (layers + 1) + l
    output_blocks.i.1              up_blocks.b.attentions.l, or the upsampler when the block has no attention
    output_blocks.i.2              up_blocks.b.upsamplers.0 (after an attention)
    out.0 / out.2                  conv_norm_out / conv_out

Every tensor has the same shape in both layouts (SD 2.x's Linear proj_in is a Linear in both), so this is a
pure rename. Reference: diffusers 0.42 loaders/single_file_utils.py (convert_ldm_unet_checkpoint,
create_unet_diffusers_config_from_ldm).

The rest of a single file is other converters' business (first_stage_model.*: the VAE, cond_stage_model.*: the
text encoder) or is dropped by name (LDM_BUFFERS: the training schedule and EMA bookkeeping).
"""

import re
from collections.abc import Mapping

import torch

from minidiff.loading.strict import check_state_dict, key_listing, rename_keys
from minidiff.models.unet_condition import UNet2DConditionConfig, UNet2DConditionModel

LDM_UNET_PREFIX = "model.diffusion_model."

# Non-weight tensors of an LDM single file, dropped by name: the training noise schedule that
# ldm/models/diffusion/ddpm.py DDPM.register_schedule stores (minidiff's schedulers rebuild it from
# scheduler_config.json), DDPM.logvar, and the step counters of the EMA (ldm/modules/ema.py LitEma).
LDM_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "model_ema.decay", "model_ema.num_updates",
)  # fmt: skip


def unet_condition_from_diffusers(
    state_dict: Mapping[str, torch.Tensor], config: UNet2DConditionConfig
) -> dict[str, torch.Tensor]:
    """A diffusers UNet2DConditionModel state dict -> minidiff keys (the identity), checked strictly."""
    converted = dict(state_dict)
    with torch.device("meta"):  # the model only for its key names and shapes: no memory, no init
        check_state_dict(UNet2DConditionModel(config), converted)
    return converted


def ema_key(key: str) -> str:
    """Where LitEma keeps the EMA copy of a weight: "model_ema." + the key with its dots removed, e.g.
    model.diffusion_model.out.2.bias -> model_ema.diffusion_modelout2bias (diffusers' extract_ema)."""
    return "model_ema." + key.removeprefix("model.").replace(".", "")


def ldm_unet_source_keys(checkpoint: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys of a single file that belong to the UNet: its weights and their EMA copies, if present. With
    the VAE's, the text encoder's and LDM_BUFFERS they should cover the whole file."""
    keys = [k for k in checkpoint if k.startswith(LDM_UNET_PREFIX)]
    return keys + [ema_key(k) for k in keys if ema_key(k) in checkpoint]


def _select_unet(checkpoint: Mapping[str, torch.Tensor], use_ema: bool) -> dict[str, torch.Tensor]:
    """The UNet's tensors of a single file, keyed without the prefix; the EMA copies if use_ema."""
    keys = [k for k in checkpoint if k.startswith(LDM_UNET_PREFIX)]
    if not keys:
        raise ValueError(f"no '{LDM_UNET_PREFIX}*' tensors: not an original Stable Diffusion checkpoint")
    if not use_ema:
        return {k.removeprefix(LDM_UNET_PREFIX): checkpoint[k] for k in keys}
    missing = [ema_key(k) for k in keys if ema_key(k) not in checkpoint]
    if missing:
        raise ValueError(f"use_ema: {len(missing)} of {len(keys)} UNet weights have no EMA copy (an '-emaonly' or "
                         f"pruned file already holds the EMA weights as its model weights): {key_listing(missing)}")
    return {k.removeprefix(LDM_UNET_PREFIX): checkpoint[ema_key(k)] for k in keys}


def _resnet_names(rest: str) -> str:
    """LDM ResBlock -> ResnetBlock names (the Sequential indices skip the weightless SiLU/Dropout)."""
    for old, new in (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
                     ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut")):
        rest = rest.replace(old, new)
    return rest


_MID_BLOCK = re.compile(r"middle_block\.(\d)\.(.+)")
_IN_OUT_BLOCK = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.(\d)\.(.+)")


def _ldm_unet_key(key: str, layers: int, up_has_attention: list[bool]) -> str:
    # Map the time embedding, the stem and the head
    for old, new in (("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
                     ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out.")):
        if key.startswith(old):
            return new + key.removeprefix(old)
    # Map the mid block: resnet, transformer, resnet
    if m := _MID_BLOCK.fullmatch(key):
        j, rest = int(m[1]), m[2]
        if j == 1:
            return f"mid_block.attentions.0.{rest}"
        if j in (0, 2):
            return f"mid_block.resnets.{j // 2}.{_resnet_names(rest)}"
    elif m := _IN_OUT_BLOCK.fullmatch(key):
        kind, i, j, rest = m[1], int(m[2]), int(m[3]), m[4]
        # Map the down blocks: slot 0 of input block i is a ResBlock or (a level's last) a Downsample's conv
        if kind == "input_blocks":
            b, l = divmod(i - 1, layers + 1)
            if j == 1:
                return f"down_blocks.{b}.attentions.{l}.{rest}"
            if j == 0 and rest.startswith("op."):
                return f"down_blocks.{b}.downsamplers.0.conv.{rest.removeprefix('op.')}"
            if j == 0:
                return f"down_blocks.{b}.resnets.{l}.{_resnet_names(rest)}"
        # Map the up blocks: ResBlock, SpatialTransformer (if the block has them), Upsample (in a level's last)
        else:
            b, l = divmod(i, layers + 1)
            if j == 0:
                return f"up_blocks.{b}.resnets.{l}.{_resnet_names(rest)}"
            if j == 1 and b < len(up_has_attention) and up_has_attention[b]:
                return f"up_blocks.{b}.attentions.{l}.{rest}"
            if j in (1, 2):
                return f"up_blocks.{b}.upsamplers.0.{rest}"  # rest is conv.weight / conv.bias
    return LDM_UNET_PREFIX + key  # unknown: reported under its own name by the strict check


def unet_condition_from_ldm(
    checkpoint: Mapping[str, torch.Tensor], config: UNet2DConditionConfig, use_ema: bool = False
) -> dict[str, torch.Tensor]:
    """An original single-file SD checkpoint (the whole of it) -> minidiff UNet2DConditionModel keys.

    Takes the "model.diffusion_model.*" tensors, or with use_ema=True their EMA copies ("model_ema.*", an error
    if any is missing), renames them and checks the result strictly against the model `config` builds. Other
    keys are left alone: see ldm_unet_source_keys and LDM_BUFFERS for the bookkeeping of the whole file.
    """
    up_has_attention = [kind == "CrossAttnUpBlock2D" for kind in config.up_block_types]
    converted = rename_keys(_select_unet(checkpoint, use_ema),
                            lambda k: _ldm_unet_key(k, config.layers_per_block, up_has_attention))
    with torch.device("meta"):
        check_state_dict(UNet2DConditionModel(config), converted)
    return converted


def ldm_unet_config(checkpoint: Mapping[str, torch.Tensor], **known) -> UNet2DConditionConfig:
    """The UNet2DConditionConfig of an original single-file SD checkpoint: what its weights tell, plus `known`.

    From the weights: in_channels, out_channels, block_out_channels (model_channels * channel_mult),
    layers_per_block (num_res_blocks), which blocks have attention, cross_attention_dim (the width of
    attn2.to_k), use_linear_projection (proj_in is a Linear, not a conv), transformer_layers_per_block.
    Not in the weights, so pass them: attention_head_dim (the head COUNT: 8 for SD 1.x, [5, 10, 20, 20] for
    SD 2.x), upcast_attention (True for SD 2.x 768-v), sample_size (64; 96 for 768-px models), ...
    A `known` value that contradicts the weights is an error.
    """
    if "attention_head_dim" not in known and "num_attention_heads" not in known:
        raise ValueError("the weights do not tell the number of attention heads: pass attention_head_dim=8 for "
                         "SD 1.x, attention_head_dim=[5, 10, 20, 20] for SD 2.x")
    shapes = {k: tuple(v.shape) for k, v in _select_unet(checkpoint, use_ema=False).items()}

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise ValueError(f"ldm_unet_config: the checkpoint has no {LDM_UNET_PREFIX}{key}: not an SD UNet")
        return shapes[key]

    in_channels, out_channels = shape("input_blocks.0.0.weight")[1], shape("out.2.weight")[0]
    downsample_at = sorted(int(k.split(".")[1]) for k in shapes if re.fullmatch(r"input_blocks\.\d+\.0\.op\.weight", k))
    n_input = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("input_blocks."))
    layers = (downsample_at[0] if downsample_at else n_input) - 1
    levels = len(downsample_at) + 1

    def depth(prefix: str) -> int:  # BasicTransformerBlocks in the SpatialTransformer at prefix (0: none)
        return len({k.split(".")[3] for k in shapes if k.startswith(prefix + ".transformer_blocks.")})

    first = [1 + b * (layers + 1) for b in range(levels)]  # input block of each level's first ResBlock
    down_depth = [depth(f"input_blocks.{i}.1") for i in first]
    up_depth = [depth(f"output_blocks.{b * (layers + 1)}.1") for b in range(levels)]
    mid_depth = depth("middle_block.1")
    to_k = [s for k, s in shapes.items() if k.endswith("attn2.to_k.weight")]
    proj_in = [s for k, s in shapes.items() if k.endswith(".proj_in.weight")]
    attention_depths = {d for d in down_depth + [mid_depth] if d}
    if len(attention_depths) <= 1:
        transformer_layers = attention_depths.pop() if attention_depths else 1
    else:  # per level; a level without attention takes the mid block's depth if it is the last one (diffusers)
        transformer_layers = [d or 1 for d in down_depth[:-1]] + [down_depth[-1] or mid_depth or 1]
    inferred = dict(
        in_channels=in_channels,
        out_channels=out_channels,
        block_out_channels=[shape(f"input_blocks.{i}.0.out_layers.3.weight")[0] for i in first],
        layers_per_block=layers,
        down_block_types=["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in down_depth],
        up_block_types=["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in up_depth],
        mid_block_type="UNetMidBlock2DCrossAttn" if any(k.startswith("middle_block.") for k in shapes) else None,
        transformer_layers_per_block=transformer_layers,
        use_linear_projection=bool(proj_in) and len(proj_in[0]) == 2,
    )
    if to_k:
        inferred["cross_attention_dim"] = to_k[0][1]
    clashes = [f"{k}: the weights say {v!r}, given {known[k]!r}" for k, v in inferred.items()
               if k in known and _plain(known[k]) != _plain(v)]
    if clashes:
        raise ValueError("ldm_unet_config: arguments contradict the checkpoint:" + key_listing(clashes))
    return UNet2DConditionConfig(**{**inferred, **known})


def _plain(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value
