"""CLIP: the text transformer that conditions Stable Diffusion, and the vision transformer used for guidance.

    ids (B, L) -> token + position embeddings -> N pre-LN transformer layers (causal) -> final LayerNorm
               -> last_hidden_state (B, L, D): the UNet's cross-attention context;
                  pooler_output = the state at the end-of-text token, (B, D)
    pixels (B, 3, 224, 224) -> 14x14 (or 32x32) patches as tokens, a class token in front -> LayerNorm ->
               N layers (not causal) -> pooler_output = LayerNorm(state of the class token), (B, D)

Both towers project their pooled vector into one shared space, where CLIPModel scores an image against a text
by cosine similarity (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision", fig. 3). Each layer is x + attn(LN1 x), then x + MLP(LN2 x) (pre-LN, Radford et al. 2019).

The course's Stable Diffusion Deep Dive, step by step, with transformers' names: text_encoder.text_model
.embeddings.token_embedding / .position_embedding / .position_ids; text_model.encoder(inputs_embeds=...,
causal_attention_mask=causal_attention_mask(B, L)) then text_model.final_layer_norm (its get_output_embeds;
.encode() does both); get_input_embeddings() and resize_token_embeddings() for textual inversion;
blend_embeddings() mixes two prompts; .add_token_embedding() adds a new word
(minidiff/loading/textual_inversion.py).

Reference: transformers 5.23 models/clip/modeling_clip.py and configuration_clip.py, and CLIPImageProcessor's
PIL backend for preprocess_images. Module names are transformers' (`pre_layrnorm` is their spelling), so their
state dicts load by identity; minidiff/convert/keymaps/clip.py handles prefixes, open_clip and SD checkpoints.
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minidiff.config import SIDE, WIDTH, from_json_dict, require, setting, validate
from minidiff.models.attention import multi_head_attention
from minidiff.models.outputs import CLIPOutput, CLIPTextOutput, CLIPVisionOutput, EncoderOutput
from minidiff.models.pretrained import PretrainedModel


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x), the sigmoid approximation of GELU (Hendrycks & Gimpel 2016) that OpenAI CLIP uses."""
    return x * torch.sigmoid(1.702 * x)


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of GELU, in transformers' operation order (GPT-2's "gelu_new")."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


HIDDEN_ACTS = {  # transformers' hidden_act names
    "quick_gelu": quick_gelu,  # OpenAI CLIP ViT-L/14 = the SD 1.x text encoder
    "gelu": F.gelu,  # exact (erf) GELU: open_clip ViT-H = the SD 2.x text encoder
    "gelu_new": gelu_new,
}
LAYERS = 128  # bound on transformer layers: ViT-L/14 has 12 (text) and 24 (vision), ViT-bigG 32 and 48
POSITIONS = 65_536  # bound on tokens: 77 (text), 257 (ViT-L/14's vision tower; 577 at 336 px)


@dataclass
class CLIPTextConfig:
    """Field names and defaults are those of transformers' CLIPTextConfig (config.json)."""

    vocab_size: int = setting(49408, min=1, max=1_000_000)  # bound: 4x the largest LLM vocabularies (~256k)
    hidden_size: int = setting(512, min=1, max=WIDTH)  # D, the width of every token's state
    intermediate_size: int = setting(2048, min=1, max=4 * WIDTH)  # the MLP's hidden width
    projection_dim: int = setting(512, min=1, max=WIDTH)  # CLIPTextModelWithProjection's output width
    num_hidden_layers: int = setting(12, min=1, max=LAYERS)
    num_attention_heads: int = setting(8, min=1, max=WIDTH)
    max_position_embeddings: int = setting(77, min=1, max=POSITIONS)  # the longest sequence (BOS + 75 tokens + EOS)
    hidden_act: str = setting("quick_gelu", choices=HIDDEN_ACTS)
    layer_norm_eps: float = setting(1e-5, above=0)
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int = 49407  # 2 in the legacy SD configs, which changes how pooler_output finds the EOS

    def __post_init__(self):
        validate(self)
        require(self, self.hidden_size % self.num_attention_heads == 0, f"hidden_size {self.hidden_size} is not a "
                f"multiple of num_attention_heads {self.num_attention_heads}")

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPTextConfig":
        """From a CLIPTextModel config.json as it is, or the text section of a CLIPModel config.json."""
        return CLIPConfig.from_dict(d).text_config if _CLIP_MODEL_KEYS & d.keys() else _read_config(cls, d)


@dataclass
class CLIPVisionConfig:
    """Field names and defaults are those of transformers' CLIPVisionConfig (config.json)."""

    hidden_size: int = setting(768, min=1, max=WIDTH)
    intermediate_size: int = setting(3072, min=1, max=4 * WIDTH)
    projection_dim: int = setting(512, min=1, max=WIDTH)  # CLIPVisionModelWithProjection's output width
    num_hidden_layers: int = setting(12, min=1, max=LAYERS)
    num_attention_heads: int = setting(12, min=1, max=WIDTH)
    num_channels: int = setting(3, min=1, max=WIDTH)
    image_size: int = setting(224, min=1, max=SIDE)  # square input images of this side
    patch_size: int = setting(32, min=1, max=SIDE)  # one token per patch_size x patch_size patch
    hidden_act: str = setting("quick_gelu", choices=HIDDEN_ACTS)
    layer_norm_eps: float = setting(1e-5, above=0)

    def __post_init__(self):
        validate(self)
        require(self, self.hidden_size % self.num_attention_heads == 0, f"hidden_size {self.hidden_size} is not a "
                f"multiple of num_attention_heads {self.num_attention_heads}")
        patches = (self.image_size // self.patch_size) ** 2
        require(self, 1 <= patches < POSITIONS, f"image_size {self.image_size} / patch_size {self.patch_size} gives "
                f"{patches} patches; need 1 to {POSITIONS - 1}")

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPVisionConfig":
        """From a CLIPVisionModel config.json as it is, or the vision section of a CLIPModel config.json."""
        return CLIPConfig.from_dict(d).vision_config if _CLIP_MODEL_KEYS & d.keys() else _read_config(cls, d)


_CLIP_MODEL_KEYS = {"text_config", "vision_config", "text_config_dict", "vision_config_dict"}  # a CLIPModel config


@dataclass
class CLIPConfig:
    """transformers' CLIPConfig: both towers, the width of the shared space and the initial logit scale."""

    text_config: CLIPTextConfig
    vision_config: CLIPVisionConfig
    projection_dim: int = setting(512, min=1, max=WIDTH)
    logit_scale_init_value: float = 2.6592  # log(1 / 0.07), the CLIP paper's initial temperature

    def __post_init__(self):
        validate(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPConfig":
        """From a CLIPModel config.json as it is. Like transformers, a text_config_dict / vision_config_dict (old
        hub files: openai/clip-vit-large-patch14) overrides its section as a full config, defaults included: so
        that model's text tower has eos_token_id 49407, not the 2 its text_config says."""
        d = dict(d)
        for name, config_cls in (("text_config", CLIPTextConfig), ("vision_config", CLIPVisionConfig)):
            section = dict(d.get(name) or {})
            if f"{name}_dict" in d:
                section.update(asdict(_read_config(config_cls, d.pop(f"{name}_dict"))))
            d[name] = _read_config(config_cls, section)
        return _read_config(cls, d)


# transformers' generic PreTrainedConfig fields (bookkeeping, training, text generation): no effect on a forward
# pass, so from_dict skips them without a warning. Dropout is not implemented (the reference configs set it to 0).
_GENERIC_KEYS = frozenset("""
    architectures model_type torch_dtype dtype transformers_version initializer_range initializer_factor dropout
    attention_dropout id2label label2id problem_type finetuning_task tokenizer_class prefix task_specific_params
    return_dict output_hidden_states output_attentions torchscript use_bfloat16 pruned_heads tie_word_embeddings
    chunk_size_feed_forward is_decoder is_encoder_decoder add_cross_attention cross_attention_hidden_size
    tie_encoder_decoder decoder_start_token_id sep_token_id bos_token_id eos_token_id pad_token_id max_length
    min_length do_sample early_stopping num_beams num_beam_groups top_k top_p diversity_penalty temperature
    repetition_penalty length_penalty no_repeat_ngram_size encoder_no_repeat_ngram_size bad_words_ids
    num_return_sequences output_scores return_dict_in_generate forced_bos_token_id forced_eos_token_id
    remove_invalid_values""".split())


def _read_config(cls, d: dict):
    """A config dataclass from a transformers config dict; transformers' generic keys are skipped silently."""
    return from_json_dict(cls, d, ignore=_GENERIC_KEYS)


class CLIPAttention(nn.Module):
    """Multi-head self-attention, (B, L, D) -> (B, L, D); heads = num_attention_heads, scale head_dim ** -0.5."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.heads, self.head_dim = num_heads, hidden_size // num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """mask: None, bool (B, 1, L, L) with True where query i may attend to key j, or a float one added to the
        scores (0 or very negative, as transformers 4.25 built them)."""
        h = multi_head_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, mask=mask,
                                 is_causal=is_causal, scale=self.head_dim**-0.5)  # transformers passes the scale
        return self.out_proj(h)


class CLIPMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.act = HIDDEN_ACTS[act]
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer layer: x + attn(LN1 x), then x + MLP(LN2 x)."""

    def __init__(self, config: CLIPTextConfig | CLIPVisionConfig):
        super().__init__()
        self.self_attn = CLIPAttention(config.hidden_size, config.num_attention_heads)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask, is_causal)
        return x + self.mlp(self.layer_norm2(x))


def causal_attention_mask(batch: int, length: int, dtype: torch.dtype = torch.float32,
                          device: torch.device | str | None = None) -> torch.Tensor:
    """(B, 1, L, L), added to the attention scores: 0 where query i may see key j <= i, the dtype's most negative
    number above the diagonal, so later tokens get no weight (transformers 4.25's _build_causal_attention_mask)."""
    mask = torch.full((batch, length, length), torch.finfo(dtype).min, dtype=dtype, device=device)
    return mask.triu(1)[:, None]


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True = may attend) as the float mask that is added to the scores."""
    if mask.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, -torch.inf)


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig | CLIPVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                causal_attention_mask: torch.Tensor | None = None, output_attentions: None = None,
                output_hidden_states: bool | None = False, return_dict: bool | None = True, *,
                is_causal: bool = False) -> EncoderOutput | tuple:
        """The N layers on (B, L, D) embeddings. The masks, if given, are combined (see CLIPAttention);
        is_causal: the causal mask without materialising it. transformers 4.25's arguments, so the Deep Dive's
        `text_model.encoder(inputs_embeds=..., attention_mask=None, causal_attention_mask=...,
        output_attentions=None, output_hidden_states=True, return_dict=None)[0]` runs as it is."""
        if output_attentions:
            raise ValueError("minidiff's CLIP does not return attention weights")
        masks = [m for m in (attention_mask, causal_attention_mask) if m is not None]
        mask = masks[0] if len(masks) == 1 else sum(_additive(m, inputs_embeds.dtype) for m in masks) if masks else None
        h, states = inputs_embeds, [inputs_embeds]
        for layer in self.layers:
            h = layer(h, mask, is_causal)
            states.append(h)
        out = EncoderOutput(h, tuple(states) if output_hidden_states else None)
        return out if return_dict is not False else out.to_tuple()


class CLIPTextEmbeddings(nn.Module):
    """One learned row per token id, and one per position: input_ids (B, L) -> (B, L, D), their sum."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    @property
    def position_ids(self) -> torch.Tensor:
        """(1, max_position_embeddings) int64: 0, 1, 2, ... (a buffer in transformers)."""
        table = self.position_embedding
        return torch.arange(table.num_embeddings, device=table.weight.device)[None]

    def forward(self, input_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.token_embedding(input_ids)
        if position_ids is None:
            position_ids = self.position_ids[:, : inputs_embeds.shape[1]]
        return inputs_embeds + self.position_embedding(position_ids)


class CLIPTextModel(PretrainedModel, nn.Module):
    """The CLIP text transformer (transformers' CLIPTextModel); the Stable Diffusion text encoder."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    @property
    def text_model(self) -> "CLIPTextModel":
        """The model itself: transformers nests the same parts one level down (text_encoder.text_model.encoder);
        minidiff keeps them at the top, and this name lets course code reach them the transformers way."""
        return self

    def _build_causal_attention_mask(self, bsz: int, seq_len: int, dtype: torch.dtype) -> torch.Tensor:
        """transformers 4.25's name, which the Deep Dive calls: see causal_attention_mask."""
        return causal_attention_mask(bsz, seq_len, dtype)

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding table (vocab_size, D), as transformers names it."""
        return self.embeddings.token_embedding

    def set_input_embeddings(self, table: nn.Embedding) -> None:
        self.embeddings.token_embedding = table
        self.config.vocab_size = table.num_embeddings

    def resize_token_embeddings(self, new_num_tokens: int) -> nn.Embedding:
        """Grow (or cut) the token table to new_num_tokens rows, e.g. len(tokenizer) after add_tokens. The new
        rows start at the mean of the old ones (transformers samples them around that mean); textual inversion
        then writes its learned vectors there. Returns the new table."""
        table = self.get_input_embeddings()
        old = table.weight.detach()
        rows = old[:new_num_tokens]
        if new_num_tokens > len(old):
            rows = torch.cat([old, old.mean(dim=0, keepdim=True).expand(new_num_tokens - len(old), -1)])
        new_table = nn.Embedding(new_num_tokens, table.embedding_dim, device="meta")
        new_table.weight = nn.Parameter(rows.clone(), table.weight.requires_grad)
        self.set_input_embeddings(new_table)
        return new_table

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
                inputs_embeds: torch.Tensor | None = None, output_hidden_states: bool = False,
                return_dict: bool = True) -> CLIPTextOutput | tuple:
        """input_ids (B, L) int, or inputs_embeds (B, L, D): token embeddings to use instead of looking the ids
        up (positions are added here, as in transformers). With inputs_embeds, input_ids are optional and only
        locate the EOS for pooler_output (None without them). attention_mask (B, L): 1 = token, 0 = padding,
        which no later token attends to (SD pipelines pass none: every position, pads included, is used).

        Clip skip k (skip the last k layers): final_layer_norm(out.hidden_states[-(k + 1)]).
        -> out.last_hidden_state = out[0], out.pooler_output = out[1]; return_dict=False: that tuple."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("CLIPTextModel: pass input_ids or inputs_embeds")
            inputs_embeds = self.token_embeddings(input_ids)
        out = self.encode(inputs_embeds + self.position_embeddings(inputs_embeds.shape[1]), attention_mask,
                          output_hidden_states=output_hidden_states)
        if input_ids is not None:
            ids = input_ids.to(torch.int)
            if self.config.eos_token_id == 2:  # legacy configs: EOS (49407) is the largest id; the first max wins
                eos = ids.argmax(dim=-1)
            else:  # the first position holding the EOS id (padding may repeat it)
                eos = (ids == self.config.eos_token_id).int().argmax(dim=-1)
            out.pooler_output = out.last_hidden_state[torch.arange(ids.shape[0], device=eos.device), eos]
        return out if return_dict else out.to_tuple()

    def encode(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
               output_hidden_states: bool = False) -> CLIPTextOutput:
        """The transformer and final LayerNorm on embeddings that already hold their positions, (B, L, D) ->
        CLIPTextOutput without pooler_output (the Deep Dive's get_output_embeds)."""
        L = hidden_states.shape[1]
        mask = None
        if attention_mask is not None and not attention_mask.bool().all():
            # Like transformers: a materialised mask only when a token is masked, else SDPA's own causal mask. A
            # query that sees no key (left padding) comes out of SDPA as zeros, in transformers too.
            causal = torch.ones(L, L, dtype=torch.bool, device=hidden_states.device).tril()
            mask = causal & attention_mask.to(hidden_states.device, torch.bool)[:, None, None, :]  # (B, 1, L, L)
        out = self.encoder(hidden_states, mask, is_causal=mask is None, output_hidden_states=output_hidden_states)
        return CLIPTextOutput(self.final_layer_norm(out.last_hidden_state), hidden_states=out.hidden_states)

    def token_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L, D): the rows of the token embedding table."""
        return self.embeddings.token_embedding(input_ids)

    def position_embeddings(self, length: int | None = None) -> torch.Tensor:
        """(1, length, D): the learned embedding of each position 0 .. length-1 (default all of them)."""
        most = self.config.max_position_embeddings
        if (length := most if length is None else length) > most:
            raise ValueError(f"a sequence of {length} tokens is longer than max_position_embeddings {most}")
        return self.embeddings.position_embedding.weight[None, :length]

    def set_token_embedding(self, token_id: int, vector: torch.Tensor) -> None:
        """Replace the embedding row of token_id with vector (D,): every prompt using that token changes."""
        with torch.no_grad():
            self.embeddings.token_embedding.weight[token_id] = vector

    def add_token_embedding(self, vector: torch.Tensor) -> int:
        """Append vector (D,) as a new row of the token embedding table (a new word, e.g. a textual-inversion
        concept) and return its id, vocab_size before the call. The tokenizer must map the new word to it. A
        multi-vector concept adds one row per vector (diffusers names them token, token_1, token_2, ...).

        Mind the legacy eos_token_id == 2: pooler_output then takes the largest id as the EOS, which an added
        id beats (the SD pipelines use last_hidden_state only, so they are not affected)."""
        table = self.embeddings.token_embedding
        row = vector.detach().to(table.weight).reshape(1, -1)
        if row.shape[1] != table.embedding_dim:
            raise ValueError(f"the new embedding has {row.shape[1]} values; this model's are {table.embedding_dim}")
        new_table = nn.Embedding(table.num_embeddings + 1, table.embedding_dim, device="meta")
        new_table.weight = nn.Parameter(torch.cat([table.weight.detach(), row]), table.weight.requires_grad)
        self.set_input_embeddings(new_table)
        return new_table.num_embeddings - 1


class CLIPTextModelWithProjection(CLIPTextModel):
    """CLIPTextModel plus text_projection (no bias): out.text_embeds = text_projection(pooler_output)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__(config)
        self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(self, *args, **kwargs) -> CLIPTextOutput:
        out = super().forward(*args, **kwargs)
        out.text_embeds = None if out.pooler_output is None else self.text_projection(out.pooler_output)
        return out


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.randn(config.hidden_size))  # the learned [CLS] token
        # A conv with kernel = stride = patch_size is a linear map applied to each patch.
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size,
                                         stride=config.patch_size, bias=False)
        num_positions = (config.image_size // config.patch_size) ** 2 + 1
        self.position_embedding = nn.Embedding(num_positions, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1 + patches, D)."""
        B = pixel_values.shape[0]
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, D, H/p, W/p)
        patches = patches.flatten(2).transpose(1, 2)  # (B, D, H/p * W/p) -> (B, patches, D)
        h = torch.cat([self.class_embedding.expand(B, 1, -1), patches], dim=1)
        return h + self.position_embedding.weight[None]


class CLIPVisionModel(PretrainedModel, nn.Module):
    """The CLIP vision transformer (ViT, Dosovitskiy et al. 2020) as transformers' CLIPVisionModel."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, *, output_hidden_states: bool = False) -> CLIPVisionOutput:
        """pixel_values (B, 3, image_size, image_size), normalized (preprocess_images / preprocess_tensor)."""
        size = self.config.image_size
        if tuple(pixel_values.shape[-2:]) != (size, size):
            raise ValueError(f"CLIPVisionModel takes {size}x{size} images, got {tuple(pixel_values.shape[-2:])}: "
                             "use preprocess_images or preprocess_tensor")
        h = self.pre_layrnorm(self.embeddings(pixel_values))
        out = self.encoder(h, output_hidden_states=output_hidden_states)
        h = out.last_hidden_state
        return CLIPVisionOutput(h, pooler_output=self.post_layernorm(h[:, 0]), hidden_states=out.hidden_states)


class CLIPVisionModelWithProjection(CLIPVisionModel):
    """CLIPVisionModel plus visual_projection (no bias): out.image_embeds = visual_projection(pooler_output)."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__(config)
        self.visual_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(self, *args, **kwargs) -> CLIPVisionOutput:
        out = super().forward(*args, **kwargs)
        out.image_embeds = self.visual_projection(out.pooler_output)
        return out


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.pow(torch.sum(torch.pow(x, 2), dim=-1, keepdim=True), 0.5)  # transformers' exact operations


class CLIPModel(PretrainedModel, nn.Module):
    """Both towers, their projections into the shared space and the learned temperature (logit_scale)."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextModel(config.text_config)
        self.vision_model = CLIPVisionModel(config.vision_config)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) ids -> (B, projection_dim), not normalized (a tensor, as in transformers 4.x)."""
        return self.text_projection(self.text_model(input_ids, attention_mask).pooler_output)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalized pixels -> (B, projection_dim), not normalized."""
        return self.visual_projection(self.vision_model(pixel_values).pooler_output)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> CLIPOutput:
        """Score every image against every text: cosine similarity times logit_scale.exp() (CLIP fig. 3)."""
        image_embeds = _unit(self.get_image_features(pixel_values))
        text_embeds = _unit(self.get_text_features(input_ids, attention_mask))
        logits_per_text = torch.matmul(text_embeds, image_embeds.t()) * self.logit_scale.exp()
        return CLIPOutput(logits_per_text.t(), logits_per_text, text_embeds, image_embeds)


def blend_embeddings(a: torch.Tensor, b: torch.Tensor, mix_factor: float) -> torch.Tensor:
    """mix_factor * a + (1 - mix_factor) * b: e.g. two prompts' last_hidden_state (B, 77, D), giving the
    UNet a context between "a mouse" and "a leopard" (the Deep Dive's mixed_embeddings, same operations)."""
    return a * mix_factor + b * (1 - mix_factor)
