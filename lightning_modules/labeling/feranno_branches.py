"""FERAnno's parts around the frozen UNet: the two read-outs (decoder features, text cross-attention maps), the
tokens made from them and the ways to fuse the tokens.

- **features**: forward hooks on chosen ``unet.up_blocks`` keep each block's output (``FeatureTap``); the teacher
  pools each map to ``pool_size``² and projects it to one token per scale.
- **attention**: every chosen text cross-attention layer (``attn2``) gets an ``AttentionProbe`` processor that
  stores the head-averaged attention probabilities between image positions and text tokens and then runs the
  layer's own processor unchanged (the AU adapter's decoupled processor included), so the UNet's output does not
  change. ``AttentionTokens`` turns the maps into one token per caption token (words + end token; the start token
  is left out: it takes most of the probability mass in every position and carries no caption content).
- **fusion**: ``bidirectional`` (feature tokens attend to attention tokens and vice versa, ``BidirectionalFusion``),
  ``concat`` (mean token of each branch, concatenated) or ``self`` (one transformer encoder over a CLS token and
  all tokens; with the features branch alone this is the single-branch FERAnno).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_modules.run.runtime import ConfigError

BRANCHES = ("features", "attention")
FUSIONS = ("bidirectional", "concat", "self")


def check_design(branches: Any, fusion: Any, attention_layers: Any, key: str) -> tuple[list[str], str]:
    """Validated (branches, fusion); a ``ConfigError`` naming ``<key>.branches|fusion|attention_layers``."""
    if isinstance(branches, str) or not isinstance(branches, Sequence) or not branches:
        raise ConfigError(f"{key}.branches", f"must be a non-empty list drawn from {list(BRANCHES)}, got {branches!r}")
    branches = [str(b) for b in branches]
    unknown = [b for b in branches if b not in BRANCHES]
    if unknown or len(set(branches)) != len(branches):
        raise ConfigError(f"{key}.branches", f"must be distinct entries of {list(BRANCHES)}, got {branches}")
    if fusion not in FUSIONS:
        raise ConfigError(f"{key}.fusion", f"must be one of {list(FUSIONS)}, got {fusion!r}")
    if fusion == "bidirectional" and len(branches) != 2:
        raise ConfigError(f"{key}.fusion", f"bidirectional cross-attention fuses two branches, but "
                                           f"{key}.branches={branches}: use fusion=concat or fusion=self")
    if attention_layers is not None:
        ok = (not isinstance(attention_layers, str) and isinstance(attention_layers, Sequence) and attention_layers
              and all(isinstance(p, str) and p for p in attention_layers))
        if not ok:
            raise ConfigError(f"{key}.attention_layers", f"must be null (every text cross-attention layer) or a "
                              f"non-empty list of layer-name prefixes, got {attention_layers!r}")
    return branches, str(fusion)


# ---------------------------------------------------------------------- features branch
class FeatureTap:
    """Forward hooks on chosen blocks that keep each block's latest output; ``remove()`` detaches them."""

    def __init__(self, blocks: dict[int, nn.Module]):
        self.indices = list(blocks)
        self.features: dict[int, torch.Tensor] = {}
        self.handles = [block.register_forward_hook(functools.partial(self._store, i)) for i, block in blocks.items()]

    def _store(self, index: int, module: nn.Module, args, output) -> None:
        self.features[index] = output[0] if isinstance(output, (tuple, list)) else output

    @property
    def active(self) -> bool:
        return bool(self.handles)

    def clear(self) -> None:
        self.features = {}

    def collect(self) -> list[torch.Tensor]:
        missing = [i for i in self.indices if i not in self.features]
        if missing:
            raise RuntimeError(f"UNet up_blocks {missing} produced no features (hooks removed?)")
        out = [self.features[i] for i in self.indices]
        self.clear()
        return out

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.clear()


class FeatureNorm(nn.BatchNorm1d):
    """Per-feature standardisation across the data (BatchNorm1d). Frozen UNet features share a large
    dataset-wide component; without it the head learns several times slower (measured on the toy faces). A
    training batch of one sample uses the running statistics instead of failing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


# ---------------------------------------------------------------------- attention branch
def text_attention_probs(attn: nn.Module, hidden_states: torch.Tensor, text: torch.Tensor,
                         attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(Q Kᵀ · scale) of a diffusers ``Attention`` layer between image positions and text tokens, averaged
    over heads: (N, H·W, L). Computed from the layer's own projections, as its processor does."""
    if hidden_states.ndim == 4:
        n, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(n, c, h * w).transpose(1, 2)
    if getattr(attn, "group_norm", None) is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    if attn.norm_cross:
        text = attn.norm_encoder_hidden_states(text)
    n, length = hidden_states.shape[0], text.shape[1]
    query = attn.head_to_batch_dim(attn.to_q(hidden_states))
    key = attn.head_to_batch_dim(attn.to_k(text))
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, length, n)
    probs = attn.get_attention_scores(query, key, attention_mask)
    return probs.view(n, attn.heads, probs.shape[1], length).mean(1)


class AttentionProbe(nn.Module):
    """A cross-attention processor that records the text attention maps of its layer in ``store[name]`` and then
    calls the layer's previous processor (``inner``, e.g. the AU adapter's) with the same arguments. A tuple
    ``(text, [extra tokens])`` condition is read for its text part only."""

    def __init__(self, inner, store: dict, name: str):
        super().__init__()
        self.inner, self.store, self.name = inner, store, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        text = encoder_hidden_states[0] if isinstance(encoder_hidden_states, tuple) else encoder_hidden_states
        if text is not None:
            with torch.no_grad():
                self.store[self.name] = text_attention_probs(attn, hidden_states, text, attention_mask)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


class AttentionTap:
    """``AttentionProbe`` on every text cross-attention layer of ``unet`` whose name starts with one of
    ``prefixes`` (None: all); ``remove()`` puts the previous processors back."""

    def __init__(self, unet: nn.Module, prefixes: Optional[Sequence[str]] = None, key: str = "attention_layers"):
        from lightning_modules.generator.conditioning import cross_attention_layers

        layers = list(cross_attention_layers(unet))
        chosen = layers if prefixes is None else [n for n in layers if any(n.startswith(p) for p in prefixes)]
        if not chosen:
            raise ConfigError(key, f"no text cross-attention layer (attn2) of the UNet matches {list(prefixes or [])}"
                                   f"; its layers: {[n.removesuffix('.processor') for n in layers] or 'none'}")
        self.unet, self.names = unet, chosen
        self.maps: dict[str, torch.Tensor] = {}
        self.previous = dict(unet.attn_processors)
        unet.set_attn_processor({name: AttentionProbe(proc, self.maps, name) if name in chosen else proc
                                 for name, proc in self.previous.items()})

    @property
    def active(self) -> bool:
        return self.previous is not None

    def clear(self) -> None:
        self.maps.clear()

    def collect(self) -> list[torch.Tensor]:
        """One (N, H·W, L) map per probed layer, in UNet order."""
        missing = [n for n in self.names if n not in self.maps]
        if missing:
            raise RuntimeError(f"cross-attention layers {missing[:3]} recorded no attention maps (probes removed?)")
        out = [self.maps[n] for n in self.names]
        self.clear()
        return out

    def remove(self) -> None:
        if self.previous is not None:
            self.unet.set_attn_processor(self.previous)
        self.previous = None
        self.clear()


class AttentionTokens(nn.Module):
    """Cross-attention maps -> one token per chosen text token: that token's map in every probed layer, pooled to
    ``pool_size``², flattened, standardised and projected to ``dim``, plus a learned embedding of its position."""

    def __init__(self, token_ids: Sequence[int], num_layers: int, pool_size: int, dim: int):
        super().__init__()
        self.pool_size = pool_size
        self.register_buffer("token_ids", torch.as_tensor(list(token_ids), dtype=torch.long), persistent=False)
        width = num_layers * pool_size * pool_size
        self.norm = FeatureNorm(width)
        self.proj = nn.Linear(width, dim)
        self.embed = nn.Parameter(torch.zeros(1, len(token_ids), dim))
        nn.init.trunc_normal_(self.embed, std=0.02)

    def pooled_maps(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """(N, T, layers, P, P): each chosen token's map in each layer, average-pooled to P x P."""
        out = []
        for m in maps:
            n, positions, _ = m.shape
            side = math.isqrt(positions)
            if side * side != positions:
                raise RuntimeError(f"cross-attention map over {positions} positions is not square")
            m = m.float()[:, :, self.token_ids].transpose(1, 2).reshape(n, -1, side, side)
            out.append(F.adaptive_avg_pool2d(m, self.pool_size))
        return torch.stack(out, dim=2)

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.pooled_maps(maps)
        n, t = x.shape[:2]
        x = self.norm(x.reshape(n * t, -1)).view(n, t, -1)
        return self.proj(x) + self.embed


# ---------------------------------------------------------------------- fusion
class BidirectionalBlock(nn.Module):
    """Feature tokens attend to attention tokens and attention tokens to feature tokens (both from the block's
    input), each followed by an MLP; pre-norm residuals."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm_f, self.norm_a = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.f_from_a = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.a_from_f = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.mlp_f, self.mlp_a = _mlp(dim, dropout), _mlp(dim, dropout)

    def forward(self, f: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nf, na = self.norm_f(f), self.norm_a(a)
        f = f + self.f_from_a(nf, na, na, need_weights=False)[0]
        a = a + self.a_from_f(na, nf, nf, need_weights=False)[0]
        return f + self.mlp_f(f), a + self.mlp_a(a)


class BidirectionalFusion(nn.Module):
    """``layers`` bidirectional blocks; output: the mean feature token and the mean attention token, concatenated
    (N, 2·dim)."""

    def __init__(self, dim: int, heads: int, layers: int, dropout: float):
        super().__init__()
        self.blocks = nn.ModuleList([BidirectionalBlock(dim, heads, dropout) for _ in range(layers)])

    def forward(self, f: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            f, a = block(f, a)
        return torch.cat([f.mean(1), a.mean(1)], dim=1)


def _mlp(dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(2 * dim, dim), nn.Dropout(dropout))


def caption_token_ids(tokenizer, caption: str) -> list[int]:
    """Positions of the caption's word tokens and its end token in the padded text sequence (start token left out)."""
    ids = tokenizer(caption, truncation=True, max_length=tokenizer.model_max_length).input_ids
    return list(range(1, len(ids)))
