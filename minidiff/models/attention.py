"""Multi-head scaled dot-product attention over token sequences: the one computation behind every attention here.

    q (B, N, heads*d), k, v (B, L, heads*d) -> split heads -> (B, heads, tokens, d)
        -> softmax(q k^T / sqrt(d)) v per head -> merge heads -> (B, N, heads*d)

Vaswani et al. 2017, "Attention Is All You Need", eq. 1 (scaled dot-product) and sec. 3.2.2 (multi-head). The
classes around it differ only in where q, k, v come from and what happens to the output: the pixel
self-attention (layers.Attention), the cross-attention to the text (transformer.CrossAttention) and CLIP's
causal self-attention (clip.CLIPAttention).
"""

import torch
import torch.nn.functional as F


def multi_head_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    *,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """q (B, N, heads*d), k and v (B, L, heads*d) -> (B, N, heads*d), the heads side by side.

    mask: None, or bool (B, 1, N, L), True where query i may attend to key j; is_causal: query i sees keys
    0..i only; scale: None for 1/sqrt(d). All three go to F.scaled_dot_product_attention as they are.
    """
    B, head_dim = q.shape[0], q.shape[-1] // heads
    q, k, v = (x.view(B, -1, heads, head_dim).transpose(1, 2) for x in (q, k, v))  # (B, heads, tokens, d)
    h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)
    return h.transpose(1, 2).reshape(B, -1, heads * head_dim)  # (B, heads, N, d) -> (B, N, heads*d)
