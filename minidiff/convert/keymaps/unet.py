"""Key maps: other libraries' state dicts to minidiff's module names, strictly.

Each converter takes a source state dict and the minidiff config, returns a new dict {minidiff key: tensor}
(the tensors themselves are not copied), and checks the result against the model that config builds: every
source tensor is used or deliberately dropped by name, every target parameter is filled, every shape
matches. Anything else is one ValueError that lists the keys.

diffusers UNet2DModel -> minidiff UNet2DModel is the identity on modern keys; the one special case is the
attention naming of old hub checkpoints (google/ddpm-*, anything saved before diffusers 0.14):

    attentions.N.query      -> attentions.N.to_q         attentions.N.value     -> attentions.N.to_v
    attentions.N.key        -> attentions.N.to_k         attentions.N.proj_attn -> attentions.N.to_out.0
    attentions.N.group_norm    unchanged

(diffusers does this on load in ModelMixin._fix_state_dict_keys_on_load). The shapes are the same: the old
AttentionBlock already used nn.Linear(C, C) for all four. Only LDM-format checkpoints store them as 1x1
convs; their converter squeezes them.
"""

import re
from collections.abc import Mapping

import torch

from minidiff.loading.strict import check_state_dict, rename_keys
from minidiff.models.class_conditioned import ClassConditionedConfig, ClassConditionedUNet
from minidiff.models.unet import UNet2DConfig, UNet2DModel

_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_ATTENTION_KEY = re.compile(r"(\battentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")


def _diffusers_unet2d_key(key: str) -> str:
    return _LEGACY_ATTENTION_KEY.sub(lambda m: f"{m[1]}.{_LEGACY_ATTENTION[m[2]]}.{m[3]}", key)


def unet2d_from_diffusers(state_dict: Mapping[str, torch.Tensor], config: UNet2DConfig) -> dict[str, torch.Tensor]:
    """A diffusers UNet2DModel state dict (modern or legacy attention names) -> minidiff UNet2DModel keys."""
    converted = rename_keys(state_dict, _diffusers_unet2d_key)
    with torch.device("meta"):  # the model only for its key names and shapes: no memory, no init
        check_state_dict(UNet2DModel(config), converted)
    return converted


def class_conditioned_from_course(
    state_dict: Mapping[str, torch.Tensor], config: ClassConditionedConfig
) -> dict[str, torch.Tensor]:
    """The course notebook's ClassConditionedUnet state dict (class_emb.*, model.* = a diffusers
    UNet2DModel) -> minidiff ClassConditionedUNet keys (class_emb.*, unet.*)."""

    def rename(key: str) -> str:
        if key.startswith("model."):
            return "unet." + _diffusers_unet2d_key(key.removeprefix("model."))
        return key

    converted = rename_keys(state_dict, rename)
    with torch.device("meta"):
        check_state_dict(ClassConditionedUNet(config), converted)
    return converted
