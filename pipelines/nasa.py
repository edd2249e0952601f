"""NASA, negative-away steer attention: a negative prompt that works at one step (SNOOPI, Nguyen et al.,
arXiv 2412.02687, v3 section 5.1, Eq. 7-9).

Classifier-free guidance pushes a sampler away from the negative prompt by extrapolating between two
predictions, which only pays off over many steps; at one step it blends two images. NASA moves the
push inside the single forward pass instead. In every cross-attention layer the image tokens Z ask the
same query of both prompts, through the layer's own key/value projections (no new weights), and the
negative prompt's answer is taken away before the output projection:

    Q = Z W_q,   K+ = c+ W_k,   V+ = c+ W_v,   K- = c- W_k,   V- = c- W_v
    out = to_out( softmax(Q K+^T / sqrt(d)) V+  -  alpha softmax(Q K-^T / sqrt(d)) V- )

The subtraction is on the heads-concatenated attention output, so the output bias is added once
(this is not `to_out(Z+) - alpha to_out(Z-)`). The cost is one more key/value projection of the
negative tokens and one more attention per cross-attention layer (the paper counts +1.89% FLOPs),
against a second full denoiser pass for CFG. Paper defaults for alpha: 0.1 on SD1.5 students, 0.2 on
SD2.1, 0.5 on PixArt; larger values let the negative take over the picture.

A choice the paper leaves open, made per model (`nasa_words_only` in the registry, on for shapes-64): which
of the negative's tokens the second softmax runs over. The paper uses all of them. But a causal text
encoder gives the start token the same state for every prompt, and it draws much of the attention, so
at a large alpha the subtraction is mostly a constant that has nothing to do with the negative. With
`words_mask` the negative branch attends only to the negative's own words and end token. On shapes-64's
student (`python -m bench.nasa`) this took removal of a bare color from 0.54 (the paper's form at its best
alpha) to 0.96 at alpha 10, with no loss of ShapeEval; hub models keep the paper's form until it is
measured on them.

`applied(model, negative_embeds, alpha)` swaps these processors into a UNet's cross-attention layers
for the length of a `with` block and puts the previous ones back afterwards, also on error. The
processors live on the model object, so two threads must not sample one model at the same time with
different settings (the app runs all model work in one concurrency group).
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

MAX_ALPHA = 16.0  # the largest alpha accepted (shapes-64's slider goes this far: bench.nasa, worded negative, 0.84 at 10)
MASK_BIAS = -10000.0  # what diffusers adds to the logits of masked-out text tokens


def check_alpha(alpha) -> float:
    """The alpha as a float, or a one-line ValueError saying what is allowed. A 0-d tensor (a graph input
    of the ONNX export, checked where its value is chosen) passes through as it is."""
    if isinstance(alpha, torch.Tensor) and alpha.ndim == 0:
        return alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"NASA alpha must be a number from 0 to {MAX_ALPHA:g}, got {str(alpha)[:40]!r}")
    if not 0 <= alpha <= MAX_ALPHA:
        raise ValueError(f"NASA alpha {alpha:g} is out of range; allowed: 0 to {MAX_ALPHA:g}")
    return float(alpha)


def cross_attention_layers(model: torch.nn.Module) -> list[Attention]:
    """The diffusers Attention modules of `model` that attend to text (`attn2` of SD/SDXL UNets)."""
    return [m for m in model.modules() if isinstance(m, Attention) and m.is_cross_attention]


class NASAAttnProcessor:
    """Cross-attention with the negative prompt's attention output subtracted before `to_out`.

    `negative_embeds` is (1 or batch, tokens, dim): one negative broadcasts over the whole batch.
    `negative_mask` (1 or batch, tokens; 1 = attend) masks the negative prompt's padding; the positive
    prompt keeps the mask the model passes in, so the two prompts never share a mask. At alpha 0 the
    negative branch is skipped and the result is bit-for-bit diffusers' AttnProcessor2_0."""

    def __init__(self, negative_embeds: torch.Tensor, alpha: float, negative_mask: torch.Tensor | None = None):
        self.negative_embeds = negative_embeds
        self.alpha = check_alpha(alpha)
        self.negative_mask = negative_mask

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        # The positive branch follows AttnProcessor2_0 operation for operation, so that alpha 0 (and the
        # positive half of alpha > 0) reproduces the stock layer exactly.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            context = hidden_states
        else:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        head_dim = query.shape[-1] // attn.heads  # queries and keys share the inner width
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)

        out = self._attend(attn, query, context, attention_mask, head_dim)
        # without text there is no positive prompt to steer away from (a self-attention call)
        if self.alpha != 0 and encoder_hidden_states is not None:
            negative = self.negative_embeds.to(device=context.device, dtype=encoder_hidden_states.dtype)
            if negative.shape[0] not in (1, batch_size):
                raise ValueError(f"negative prompt batch {negative.shape[0]} does not match the image batch "
                                 f"{batch_size}; allowed: 1 or {batch_size}")
            if attn.norm_cross:
                negative = attn.norm_encoder_hidden_states(negative)
            out = out - self.alpha * self._attend(attn, query, negative, self._negative_bias(query, batch_size),
                                                  head_dim)

        hidden_states = attn.to_out[0](out)  # output projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    @staticmethod
    def _attend(attn: Attention, query: torch.Tensor, context: torch.Tensor, mask, head_dim: int) -> torch.Tensor:
        """softmax(Q K^T / sqrt(d)) V with the layer's projections, heads concatenated: (batch, queries, inner)."""
        batch = query.shape[0]
        key = attn.to_k(context).view(context.shape[0], -1, attn.heads, head_dim).transpose(1, 2)
        value = attn.to_v(context).view(context.shape[0], -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if key.shape[0] != batch:  # one negative prompt for the whole batch: a view, no copy
            key, value = key.expand(batch, -1, -1, -1), value.expand(batch, -1, -1, -1)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
        return out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)

    def _negative_bias(self, query: torch.Tensor, batch_size: int) -> torch.Tensor | None:
        """The negative prompt's own mask as an additive logit bias, (1 or batch, 1, 1, tokens)."""
        if self.negative_mask is None:
            return None
        mask = self.negative_mask.to(query.device)
        if mask.ndim != 2 or mask.shape[0] not in (1, batch_size):
            raise ValueError(f"negative attention mask has shape {tuple(mask.shape)}; allowed: (1 or {batch_size}, "
                             "tokens)")
        return ((1 - mask.to(query.dtype)) * MASK_BIAS)[:, None, None, :]


def words_mask(tokenizer, text: str) -> torch.Tensor:
    """(1, tokens) attention mask of a negative prompt that keeps only its own tokens: not the start token
    (a causal text encoder gives it the same state for every prompt, so subtracting its attention output
    subtracts no concept, only a constant) nor the padding after the end token. For models whose registry
    entry sets `nasa_words_only`."""
    mask = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").attention_mask.float()
    mask[:, 0] = 0
    return mask


@contextmanager
def applied(model: torch.nn.Module, negative_embeds: torch.Tensor, alpha: float,
            negative_mask: torch.Tensor | None = None):
    """Run NASA with `negative_embeds` in every cross-attention layer of `model` inside the block.

    At alpha 0 nothing is installed, so the block computes exactly what it would without NASA. The
    previous processors are restored when the block ends, whether it returns or raises."""
    alpha = check_alpha(alpha)
    if alpha == 0:
        yield []
        return
    layers = cross_attention_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no cross-attention layers; NASA needs a text-conditioned UNet")
    if negative_embeds.ndim != 3 or negative_embeds.shape[-1] != layers[0].to_k.in_features:
        raise ValueError(f"negative prompt embeddings have shape {tuple(negative_embeds.shape)}; expected "
                         f"(batch, tokens, {layers[0].to_k.in_features}) for this model")
    previous = [layer.processor for layer in layers]
    processor = NASAAttnProcessor(negative_embeds, alpha, negative_mask)  # stateless: one serves every layer
    try:
        for layer in layers:
            layer.set_processor(processor)
        yield layers
    finally:
        for layer, old in zip(layers, previous):
            layer.set_processor(old)
