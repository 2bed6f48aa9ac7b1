"""One Transformer for every model in fewstep: bidirectional (DLM denoisers) or causal (AR), with optional time
conditioning by adaLN (DiT, Peebles & Xie 2023), rotary position embeddings (RoPE, Su et al. 2021) and PyTorch
scaled-dot-product attention (flash / memory-efficient kernels when available).

The adaLN modulation is zero-initialised around the identity (scale 1 + 0, shift 0, gate 1 + 0), so a
time-conditioned student initialised from a teacher without time conditioning computes exactly the teacher's
function at step 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fewstep.models.linear_nll import linear_nll


def rope_cache(length: int, head_dim: int, device, base: float = 10_000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)  # (L, Dh/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, L, Dh); cos/sin: (L, Dh/2). Rotates channel pairs (first half, second half)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.type_as(x)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000 as in DiT/MDLM). t: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class KVCache:
    """Keys/values for incremental causal decoding: k, v are lists of one (B, H, L_max, Dh) buffer per layer.

    Two modes. Dynamic (default): `pos` is a Python int and each call attends over the `pos` positions written.
    Static (`pos_t` set, a (1,) long tensor): one token is written at position pos_t and attention runs over the
    whole buffer with the mask `arange(L_max) <= pos_t`, so every decode step has the same shapes and kernels and
    can be captured once in a CUDA graph; the caller advances pos_t in place.

    `KVCache(k, v, pos_t)` wraps existing buffers without copying: a compiled decode step (fewstep.ar.decode_step)
    builds its cache from its tensor arguments, so dynamo guards on tensor shapes, not on a cache object that every
    generation creates anew. The layers' buffers are separate allocations, not views of one tensor: a compiled
    step then writes the new position in place (a write into a view of one graph input makes inductor copy the
    whole buffer on every step).
    """

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], pos_t: torch.Tensor | None = None):
        self.k, self.v = k, v
        self.pos = 0  # number of positions already written (dynamic mode)
        self.pos_t = pos_t  # (1,) position of the token being decoded (static mode)
        self.mask: torch.Tensor | None = None  # (1, 1, 1, L_max) bool: positions visible at pos_t (static mode)

    @classmethod
    def empty(cls, n_layers: int, batch: int, n_heads: int, max_len: int, head_dim: int, device, dtype) -> KVCache:
        shape = (batch, n_heads, max_len, head_dim)
        new = lambda: [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        return cls(new(), new())

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ck, cv = self.k[layer], self.v[layer]
        if self.pos_t is not None:
            ck.index_copy_(2, self.pos_t, k.to(ck.dtype))
            cv.index_copy_(2, self.pos_t, v.to(cv.dtype))
            return ck, cv
        end = self.pos + k.shape[2]
        ck[:, :, self.pos : end] = k
        cv[:, :, self.pos : end] = v
        return ck[:, :, :end], cv[:, :, :end]


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, causal: bool, dropout: float):
        super().__init__()
        self.n_heads, self.causal, self.dropout = n_heads, causal, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | None, layer: int) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)  # (B,H,L,Dh)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        is_causal, mask = self.causal, None
        if cache is not None:
            if (cache.pos > 0 or cache.pos_t is not None) and L > 1:
                raise ValueError("KV cache decodes one token at a time after the prefill")
            is_causal = self.causal and cache.pos == 0 and cache.pos_t is None
            k, v = cache.update(layer, k, v)
            mask = cache.mask if cache.pos_t is not None else None
            k, v = k.to(q.dtype), v.to(q.dtype)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, L, Dh)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    def __init__(self, d_model, n_heads, mlp_ratio, causal, dropout, cond_dim: int | None):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads, causal, dropout)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, mlp_ratio * d_model, bias=False),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_ratio * d_model, d_model, bias=False),
        )
        self.drop = nn.Dropout(dropout)
        # adaLN: (shift, scale, gate) for attention and MLP, zero-initialised around the identity (by Transformer,
        # after its own init of every Linear).
        self.ada = nn.Linear(cond_dim, 6 * d_model) if cond_dim else None

    def forward(self, x, c, cos, sin, cache, layer):
        if self.ada is None:
            x = x + self.drop(self.attn(self.norm1(x), cos, sin, cache, layer))
            return x + self.drop(self.mlp(self.norm2(x)))
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(F.silu(c))[:, None].chunk(6, dim=-1)  # each (B, 1, D)
        x = x + (1 + g1) * self.drop(self.attn(self.norm1(x) * (1 + sc1) + sh1, cos, sin, cache, layer))
        return x + (1 + g2) * self.drop(self.mlp(self.norm2(x) * (1 + sc2) + sh2))


class Transformer(nn.Module):
    """`forward(x: (B, L) long, t: (B,) float | None) -> logits (B, L, V)`.

    `forward` is `head(hidden(x, t))`: `hidden` runs everything before the vocabulary head (embedding, blocks, final
    norm and, when time-conditioned, its adaLN modulation) and returns (B, L, D), so a caller that needs logits at a
    few positions only (the MDLM loss: the masked ones) gathers those rows and applies `self.head` to them.
    `forward(x, targets=y)` -> (B, L) float32 -log softmax(logits)[y] through `linear_nll` (the head and the
    cross-entropy a chunk of rows at a time, no (B, L, V) tensor kept): the AR loss's path, a flag of forward so that
    whatever wraps the module's call (`Module.compile()`, FSDP2) wraps it too.
    """

    def __init__(self, vocab_size: int, seq_len: int, d_model: int = 128, n_layers: int = 4, n_heads: int = 4,
                 mlp_ratio: int = 4, causal: bool = False, time_cond: bool = False, dropout: float = 0.0):
        super().__init__()
        if d_model % n_heads or (d_model // n_heads) % 2:
            raise ValueError(f"d_model={d_model} must split into {n_heads} heads of even size")
        self.vocab_size, self.seq_len, self.causal, self.time_cond = vocab_size, seq_len, causal, time_cond
        self.n_layers, self.n_heads, self.head_dim = n_layers, n_heads, d_model // n_heads
        cond_dim = d_model if time_cond else None
        self.embed = nn.Embedding(vocab_size, d_model)
        self.t_mlp = (
            nn.Sequential(nn.Linear(d_model, d_model), nn.SiLU(), nn.Linear(d_model, d_model)) if time_cond else None
        )
        self.blocks = nn.ModuleList(
            Block(d_model, n_heads, mlp_ratio, causal, dropout, cond_dim) for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.ada_out = nn.Linear(d_model, 2 * d_model) if time_cond else None
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(self._init)
        for ada in [self.ada_out, *(block.ada for block in self.blocks)]:  # adaLN-zero: the identity at any t
            if ada is not None:
                nn.init.zeros_(ada.weight)
                nn.init.zeros_(ada.bias)
        for block in self.blocks:  # GPT-2 scaled init of residual projections
            for w in (block.attn.proj.weight, block.mlp[2].weight):
                nn.init.normal_(w, std=0.02 / math.sqrt(2 * n_layers))
        self._rope_len = 0

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def _rope(self, length: int, device):
        if self._rope_len < length or self._rope_cos.device != device:
            n = max(length, self.seq_len)
            cos, sin = rope_cache(n, self.head_dim, device)
            self._rope_cos, self._rope_sin, self._rope_len = cos, sin, n
        return self._rope_cos, self._rope_sin

    def rope_tables(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Build the RoPE tables for seq_len positions now, outside any compiled or captured region: built lazily
        in the first compiled forward, they made dynamo compile the whole model twice (its guard on the table
        length changed after the first call). Returns them (a CUDA graph keeps them alive)."""
        return self._rope(self.seq_len, device if device is not None else self.head.weight.device)

    def new_cache(self, batch: int, max_len: int, device=None, dtype=None) -> KVCache:
        p = self.head.weight
        cache = KVCache.empty(self.n_layers, batch, self.n_heads, max_len, self.head_dim, device or p.device,
                              dtype or p.dtype)
        self._rope(max_len, cache.k[0].device)  # RoPE tables for every position now, not inside a compiled step
        return cache

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None, cache: KVCache | None = None,
                targets: torch.Tensor | None = None):
        h = self.hidden(x, t, cache)  # (B, L, D)
        if targets is not None:
            return linear_nll(h.flatten(0, 1), self.head.weight, targets.flatten()).view(targets.shape)  # (B, L)
        return self.head(h)  # (B, L, V)

    def hidden(self, x: torch.Tensor, t: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Final hidden states before the head, (B, L, D): normalised and, when time-conditioned, adaLN-modulated.

        x: (B, L) token ids, or (B, L, D) input embeddings (e.g. soft tokens: probabilities @ embed.weight).
        """
        B, L = x.shape[:2]
        if cache is not None and cache.pos_t is not None:  # static decode step (CUDA-graph friendly)
            n_max = cache.max_len
            cos, sin = self._rope(n_max, x.device)
            cos, sin = cos.index_select(0, cache.pos_t), sin.index_select(0, cache.pos_t)  # (1, Dh/2)
            cache.mask = (torch.arange(n_max, device=x.device) <= cache.pos_t)[None, None, None]  # (1, 1, 1, L_max)
        else:
            start = cache.pos if cache is not None else 0
            cos, sin = self._rope(start + L, x.device)
            cos, sin = cos[start : start + L], sin[start : start + L]
        h = self.embed(x) if x.dim() == 2 else x  # (B, L, D)
        c = None
        if self.time_cond:
            if t is None:
                raise ValueError("this model is time-conditioned: pass t")
            c = self.t_mlp(timestep_embedding(t.expand(B) if t.dim() == 0 else t, h.shape[-1]).to(h.dtype))
        for i, block in enumerate(self.blocks):
            h = block(h, c, cos, sin, cache, i)
        h = self.norm(h)
        if self.ada_out is not None:
            shift, scale = self.ada_out(F.silu(c))[:, None].chunk(2, dim=-1)
            h = h * (1 + scale) + shift
        if cache is not None and cache.pos_t is None:
            cache.pos += L
        return h

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n
