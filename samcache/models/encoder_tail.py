"""Encoder tails: the image encoder's last K blocks and its neck, run from cached tokens, and LoRA.

The cache boundary can sit inside the encoder: `samcache embed --tail-blocks K` stores, beside the
final embedding, the hidden state before the encoder's last K blocks ("tail tokens"). Training
then runs only those K blocks and the neck on the cached tokens, so the encoder's tail adapts to
the domain while its first N - K blocks (most of the cost) still run once per image.

    image --patch embed, + pos_embed--> blocks[0 : N-K] --> tail tokens (cached, fp16)
          --blocks[N-K : N]--> neck --> embedding (cached too: decoder-only runs read it)

For SAM's ViT the tokens are (64, 64, C) after block N-K, absolute positions already added (they
are added once, before the first block) and each block's relative-position terms inside the
block itself, so running the very same block modules on the tokens is the encoder's computation
exactly. The cache stores the tokens channels first, (C, 64, 64), as every other map. For the
tiny (a convolutional network) the tokens are its stride-16 stage's features before its last K
blocks.

The tail modules here hold the encoder's own block and neck modules (no copies), so weights a
run trains are the encoder's, under the encoder's state-dict keys, and an export is the official
layout with no conversion. LoRA (`add_lora`) wraps the blocks' attention and MLP projections
with low-rank adapters whose update B @ A starts at zero; `merge_lora` folds them back into
plain layers, the base layout again.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import nn

from samcache.models.decoder import DecoderOutput, PromptDecoder
from samcache.models.prompts import PromptBatch
from samcache.models.vit_attention import vit_attention_in_chunks


class EncoderTail(nn.Module):
    """An encoder's last `blocks` blocks of one stage, and its neck, shared with the encoder.

    Arguments:
      encoder: the image encoder (its modules are shared, not copied).
      stage: the attribute of its blocks ("blocks" for SAM's ViT, "stage2" for the tiny).
      blocks: K, how many of the stage's last blocks run here.
    """

    def __init__(self, *, encoder: nn.Module, stage: str, blocks: int):
        super().__init__()
        every = list(getattr(encoder, stage))
        _check_depth(blocks, len(every))
        self.stage, self.first = stage, len(every) - blocks
        self.blocks = nn.ModuleList(every[self.first :])
        self.neck = encoder.neck

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        # Blocks that do not train need no graph (`--train neck`): only the neck's is kept.
        trains = torch.is_grad_enabled() and any(p.requires_grad for p in self.blocks.parameters())
        # On a CPU SAM's ViT attention runs in chunks (vit_attention.py): the same values and gradients,
        # faster (vit_b's last block: a bf16 training step 1.10-1.19x, a forward alone 1.3-1.5x) and in bf16 a
        # third of the stock block's stored probabilities. Not measured on GPUs, where the stock one runs.
        chunked = vit_attention_in_chunks(self.blocks) if x.device.type == "cpu" else nullcontext()
        with torch.set_grad_enabled(trains), chunked:
            for block in self.blocks:
                x = block(x)
        return x

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The tail's tensors under the encoder's own keys ("blocks.11.attn.qkv.weight", "neck.0.weight")."""
        out = {}
        for j, block in enumerate(self.blocks):
            out.update({f"{self.stage}.{self.first + j}.{k}": v for k, v in block.state_dict().items()})
        out.update({f"neck.{k}": v for k, v in self.neck.state_dict().items()})
        return out

    def load_encoder_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        """Loads `encoder_state_dict`'s form (strict: every key, no other)."""
        expected = set(self.encoder_state_dict())
        if set(weights) != expected:
            missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
            raise KeyError(f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        for j, block in enumerate(self.blocks):
            prefix = f"{self.stage}.{self.first + j}."
            block.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})
        self.neck.load_state_dict({k[5:]: v for k, v in weights.items() if k.startswith("neck.")})


class ViTTail(EncoderTail):
    """SAM's ViT from its tail tokens: the last `blocks` blocks and the neck.

    Arguments:
      encoder: segment_anything's ImageEncoderViT.
      blocks: K.
    """

    def __init__(self, *, encoder: nn.Module, blocks: int):
        super().__init__(encoder=encoder, stage="blocks", blocks=blocks)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, C, 64, 64) tail tokens -> (B, 256, 64, 64) embedding."""
        # Channels last in memory, as the blocks expect: on the permuted view every norm, residual add and
        # cast of the block strides through memory (90 ms of a 1.05 s bf16 step of vit_b's last block).
        x = self.run_blocks(tokens.permute(0, 2, 3, 1).contiguous())
        return self.neck(x.permute(0, 3, 1, 2))


class SplitViT(nn.Module):
    """SAM's ViT that also returns its tail tokens: (B, 256 + C, 64, 64), the embedding and the
    tokens before its last `tail_blocks` blocks stacked along the channels (what `embed` stores)."""

    def __init__(self, *, encoder: nn.Module, tail_blocks: int):
        super().__init__()
        _check_depth(tail_blocks, len(encoder.blocks))
        self.encoder, self.split = encoder, len(encoder.blocks) - tail_blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.encoder
        x = e.patch_embed(x)
        if e.pos_embed is not None:
            x = x + e.pos_embed
        for block in e.blocks[: self.split]:
            x = block(x)
        tokens = x
        for block in e.blocks[self.split :]:
            x = block(x)
        embedding = e.neck(x.permute(0, 3, 1, 2))
        return torch.cat([embedding, tokens.permute(0, 3, 1, 2).to(embedding.dtype)], dim=1)


class ConvTail(EncoderTail):
    """The tiny's convolutional encoder from its tail tokens: the last `blocks` blocks of its
    stride-16 stage, and the neck.

    Arguments:
      encoder: tiny_encoder.ConvImageEncoder.
      blocks: K.
    """

    def __init__(self, *, encoder: nn.Module, blocks: int):
        super().__init__(encoder=encoder, stage="stage2", blocks=blocks)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, C, 64, 64) tail tokens -> (B, 256, 64, 64) embedding."""
        return self.neck(self.run_blocks(tokens))


class SplitConvEncoder(nn.Module):
    """The tiny's encoder that also returns its tail tokens, stacked after the embedding as SplitViT's."""

    def __init__(self, *, encoder: nn.Module, tail_blocks: int):
        super().__init__()
        _check_depth(tail_blocks, len(encoder.stage2))
        self.encoder, self.split = encoder, len(encoder.stage2) - tail_blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.encoder
        x = e.down2(e.stage1(e.down1(e.stem(x))))
        for block in e.stage2[: self.split]:
            x = block(x)
        tokens = x
        for block in e.stage2[self.split :]:
            x = block(x)
        embedding = e.neck(x)
        return torch.cat([embedding, tokens.to(embedding.dtype)], dim=1)


def _check_depth(blocks: int, depth: int) -> None:
    if not 1 <= blocks <= depth:
        raise ValueError(f"a tail of {blocks} blocks; the encoder has {depth}")


# ----------------------------------------------------------------------------------------- LoRA
class LoraLinear(nn.Module):
    """A frozen linear layer (or 1x1 convolution) plus a trainable low-rank update:
    y = base(x) + (alpha / rank) * B(A(x)), B zero at the start so the layer begins as `base`.

    Arguments:
      base: the nn.Linear or 1x1 nn.Conv2d to adapt (kept, frozen).
      rank: r, the update's rank.
      alpha: the update's scale numerator (alpha / rank, as LoRA's paper and peft).
      generator: draws A's initial values (add_lora seeds it, so two runs start from the same A).
    """

    def __init__(self, *, base: nn.Module, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        conv = isinstance(base, nn.Conv2d)
        if conv and (base.kernel_size != (1, 1) or base.groups != 1):
            raise ValueError("LoRA adapts linear layers and 1x1 convolutions only")
        n_in, n_out = (base.in_channels, base.out_channels) if conv else (base.in_features, base.out_features)
        self.base, self.rank, self.scale, self.conv = base, rank, alpha / rank, conv
        self.base.requires_grad_(False)
        # A as nn.Linear's own initialisation (Kaiming uniform), B zero: peft's and the paper's choice.
        # Drawn on the CPU: the generator is a CPU one, and the values are then the same on any device.
        lora_a = nn.init.kaiming_uniform_(torch.empty(rank, n_in), a=math.sqrt(5), generator=generator)
        self.lora_a = nn.Parameter(lora_a.to(base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(n_out, rank, device=base.weight.device))

    def delta(self) -> torch.Tensor:
        """The update of the base weight, (out, in)."""
        return (self.lora_b @ self.lora_a) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv:
            update = torch.einsum("bihw,ri,or->bohw", x, self.lora_a.to(x.dtype), self.lora_b.to(x.dtype))
        else:
            update = (x @ self.lora_a.t().to(x.dtype)) @ self.lora_b.t().to(x.dtype)
        return self.base(x) + update * self.scale

    def merged(self) -> nn.Module:
        """`base` with the update folded into its weight (a plain layer again)."""
        with torch.no_grad():
            delta = self.delta().to(self.base.weight.dtype)
            self.base.weight += delta.view_as(self.base.weight) if self.conv else delta
        return self.base


LORA_TARGETS = ("qkv", "proj", "lin1", "lin2", "pwconv1", "pwconv2")
"""The projections LoRA adapts, by attribute name: ViT attention (qkv, proj) and MLP (lin1, lin2);
the tiny's pointwise MLP convolutions (pwconv1, pwconv2)."""


def add_lora(blocks: nn.Module, *, rank: int, alpha: float, seed: int = 0) -> list[nn.Parameter]:
    """Wraps every LORA_TARGETS layer inside `blocks` with LoraLinear; returns the adapters' parameters
    (the only trainable ones of the wrapped layers). The A matrices are drawn from a generator of `seed`,
    not the global random state, so the same command trains the same run (and a resumed run equals an
    uninterrupted one)."""
    generator = torch.Generator().manual_seed(seed)
    parameters = []
    for parent in list(blocks.modules()):
        for name, child in list(parent.named_children()):
            if name in LORA_TARGETS and isinstance(child, (nn.Linear, nn.Conv2d)):
                adapted = LoraLinear(base=child, rank=rank, alpha=alpha, generator=generator)
                setattr(parent, name, adapted)
                parameters += [adapted.lora_a, adapted.lora_b]
    if not parameters:
        raise ValueError("no layer to adapt with LoRA")
    return parameters


def merge_lora(module: nn.Module) -> int:
    """Folds every LoraLinear inside `module` into its base layer, in place; returns how many."""
    merged = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoraLinear):
                setattr(parent, name, child.merged())
                merged += 1
    return merged


def has_lora(module: nn.Module) -> bool:
    return any(isinstance(m, LoraLinear) for m in module.modules())


# ------------------------------------------------------------------------------ training and use
def tail_parameters(tail: nn.Module, part: str) -> list[nn.Parameter]:
    """What `--train PART` trains of a tail: "tail" its blocks (their LoRA adapters when it has them,
    else every weight) and its neck; "neck" the neck alone."""
    if part == "neck":
        return list(tail.neck.parameters())
    if has_lora(tail.blocks):
        blocks = [p for m in tail.blocks.modules() if isinstance(m, LoraLinear) for p in (m.lora_a, m.lora_b)]
    else:
        blocks = list(tail.blocks.parameters())
    return blocks + list(tail.neck.parameters())



class TailedDecoder(PromptDecoder):
    """A PromptDecoder that reads tail tokens: the tail makes the embedding, the decoder decodes it.
    What training, validation, eval and predict use in place of the decoder when a run trains a tail,
    so each of them runs unchanged on the cache's `tail_tokens`.

    Arguments:
      decoder: the model's PromptDecoder (families.ModelFamily.decoder).
      tail: the encoder's tail (ViTTail, ConvTail) of the same model.
    """

    reads = "tail_tokens"

    def __init__(self, decoder: PromptDecoder, tail: EncoderTail):
        super().__init__(decoder.prompt_encoder, decoder.mask_decoder, family=decoder.family,
                         model_type=decoder.model_type)
        self.decoder, self.tail = decoder, tail

    def forward(self, features: torch.Tensor, prompts: PromptBatch, *, outputs: str = "all") -> DecoderOutput:
        return self.decoder(self.tail(features), prompts, outputs=outputs)

    def upscale(self, logits, input_size, original_size):
        return self.decoder.upscale(logits, input_size, original_size)

    def loss(self, output, targets, multimask, kind):
        return self.decoder.loss(output, targets, multimask, kind)
