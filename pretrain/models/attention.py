"""Unpadded ("varlen") attention for encoders: the real tokens of a batch as one concatenated sequence.

A batch of rows [B, L] (padded, or packed with several samples per row) becomes T real tokens [T, ...] and
``cu_seqlens`` (where each sample starts in that sequence). Everything position-wise (embeddings, norms, MLPs,
projections) then runs on [T, H] with no work spent on padding; only attention needs to know the samples:

- on a CUDA device in fp16 / bf16, FlashAttention's varlen kernel (``torch.nn.attention.varlen.varlen_attn``)
  reads the concatenated sequence directly;
- elsewhere (CPU, fp32, attention dropout, an older GPU or torch) an exact fallback re-pads q/k/v per sample to
  [S, nh, max_seqlen, hs] and runs ``F.scaled_dot_product_attention`` with a key-padding (and window) mask;
  with a sliding window much shorter than the samples it runs the band only (``use_band``): blocks of
  ``2 * window`` queries, each against the ``4 * window`` keys its queries can reach, so a local layer's work
  grows with the length, not with its square (SDPA on CPU computes every masked-out score of a full mask).

``scores_computed`` counts the query-key scores each path computes (the benchmark's exact FLOP count).

Shapes: B rows, L row length, T real tokens, S samples, nh heads, hs head size, Lm = max_seqlen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F

try:  # torch >= 2.10; an older torch (kept on a GPU image) uses the fallback
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - depends on the installed torch
    varlen_attn = None


@dataclass
class Unpadded:
    """Where the real tokens of a [B, L] batch are, and how they split into samples (all on the batch's device)."""

    shape: tuple[int, int]  # (B, L) of the padded batch
    idx: torch.Tensor  # [T] flat position (row * L + column) of each real token, in row-major order
    cu_seqlens: torch.Tensor  # [S + 1] int32: sample s is tokens cu_seqlens[s] : cu_seqlens[s + 1]
    max_seqlen: int  # longest sample (a Python int: the kernel's grid size)
    seq_idx: torch.Tensor  # [T] sample of each token
    offset: torch.Tensor  # [T] index of each token within its sample (0, 1, ...)
    positions: torch.Tensor  # [T] rotary position of each token (= offset unless position_ids say otherwise)
    _masks: dict = field(default_factory=dict, repr=False)  # fallback masks / band layouts, built once per batch

    @property
    def num_samples(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def equal_lengths(self) -> bool:
        """Every sample has max_seqlen tokens (no padding at all): the fallback needs no re-padding."""
        return self.idx.numel() == self.num_samples * self.max_seqlen

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[T, ...] -> [B, L, ...], zeros at padding positions."""
        B, L = self.shape
        out = x.new_zeros(B * L, *x.shape[1:]).index_copy(0, self.idx, x)
        return out.view(B, L, *x.shape[1:])

    def select(self, x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """[T, ...] -> [K, ...] at flat positions ``flat`` [K] of the [B, L] batch (zeros where one is padding)."""
        B, L = self.shape
        out = x.new_zeros(B * L, *x.shape[1:]).index_copy(0, self.idx, x)
        return out.index_select(0, flat)

    def mask(self, window: int | None) -> torch.Tensor | None:
        """Boolean fallback mask [S, 1, Lm, Lm] (True = attend), or None where every key may be read: a key must be
        a real token of the query's sample and, with ``window``, at most ``window`` positions away. Each query also
        attends to itself, so a padding query's row is never empty (an all-masked row would give NaN)."""
        if window not in self._masks:
            Lm, dev = self.max_seqlen, self.idx.device
            pos = torch.arange(Lm, device=dev)
            band = None if window is None or window >= Lm - 1 else (pos[:, None] - pos[None, :]).abs() <= window
            if self.equal_lengths:
                m = None if band is None else band[None, None]  # [1, 1, Lm, Lm]: broadcasts over samples
            else:
                lengths = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()  # [S]
                m = (pos[None, :] < lengths[:, None])[:, None, :]  # [S, 1, Lm] real keys
                if band is not None:
                    m = m & band[None]  # [S, Lm, Lm]
                m = (m | torch.eye(Lm, dtype=torch.bool, device=dev)[None])[:, None]  # [S, 1, Lm, Lm]
            self._masks[window] = m
        return self._masks[window]

    def band(self, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The banded fallback's layout for ``window``, built once per batch: each sample cut into nc blocks of
        C = ``band_block(window)`` query slots, block c reading the K = C + 2 * window key slots from
        c * C - window on. Returns q_idx [S * nc * C] and k_idx [S * nc * K] (the token in each slot; 0 where the
        slot is outside its sample: any token will do, the mask hides it and no gradient reaches it), the mask
        [S * nc, 1, C, K] (True = attend: a key of the query's sample at most ``window`` positions away; a slot
        past the sample's end also reads itself, so no row is empty) and out_idx [T] (each token's query slot)."""
        key = ("band", window)
        if key not in self._masks:
            C = band_block(window)
            K, dev = C + 2 * window, self.idx.device
            S, nc = self.num_samples, -(-self.max_seqlen // C)
            start = self.cu_seqlens[:-1].long()  # [S]
            lengths = self.cu_seqlens[1:].long() - start  # [S]
            qpos = torch.arange(nc * C, device=dev)  # query slot within a sample
            q_idx = torch.where(qpos[None] < lengths[:, None], start[:, None] + qpos[None], 0).reshape(-1)
            kpos = torch.arange(nc, device=dev)[:, None] * C - window + torch.arange(K, device=dev)[None]  # [nc, K]
            k_ok = (kpos[None] >= 0) & (kpos[None] < lengths[:, None, None])  # [S, nc, K] a key of the sample
            k_idx = torch.where(k_ok, start[:, None, None] + kpos[None], 0).reshape(-1)
            d = torch.arange(K, device=dev)[None] - torch.arange(C, device=dev)[:, None]  # key - query + window
            within = (d >= 0) & (d <= 2 * window)  # [C, K]: |query - key| <= window
            mask = (within & k_ok[:, :, None]) | (d == window)  # [S, nc, C, K]
            out_idx = self.seq_idx * (nc * C) + self.offset  # [T]
            self._masks[key] = (q_idx, k_idx, mask.reshape(S * nc, 1, C, K), out_idx)
        return self._masks[key]


def band_block(window: int) -> int:
    """Query block of the banded fallback: 2 * window queries read 4 * window keys, twice the band's
    2 * window + 1 (smaller blocks waste fewer scores but make more, smaller GEMMs; 2 * window measured best on
    CPU, forward + backward, against window and 4 * window)."""
    return 2 * window


def use_band(window: int | None, max_seqlen: int) -> bool:
    """Whether the fallback runs the band only: where a sample is at least four blocks' keys long (measured on
    CPU, forward + backward: shorter, the gathers cost more than the masked-out scores they save)."""
    return window is not None and max_seqlen >= 4 * (band_block(window) + 2 * window)


def scores_computed(lengths: list[int], window: int | None, varlen: bool = False) -> int:
    """Query-key scores per head that ``attention`` computes for samples of these lengths: the SDPA fallback
    re-pads every sample to the longest, Lm, and computes S x Lm x Lm scores (masked-out ones included), or with
    the band S x ceil(Lm / C) x C x (C + 2 * window); the varlen kernel sum n x min(n, 2 * window + 1) (its
    skipping of the blocks outside the window counted as exact)."""
    if not lengths:
        return 0
    if varlen:
        return sum(n * (n if window is None else min(n, 2 * window + 1)) for n in lengths)
    S, Lm = len(lengths), max(lengths)
    if use_band(window, Lm):
        C = band_block(window)
        return S * -(-Lm // C) * C * (C + 2 * window)
    return S * Lm * Lm


def unpad(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None) -> Unpadded:
    """The real tokens of a batch, as BERT's forward reads it: ``attention_mask`` [B, L] is 1 (True) for real
    tokens, one sample per row; with ``position_ids`` given (packed rows) it holds each token's sample number
    within its row (1, 2, ...; 0 = padding), a sample being a run of equal numbers, and ``position_ids`` [B, L]
    are the rotary positions. No mask: every token is real, one sample per row."""
    B, L = input_ids.shape
    dev = input_ids.device
    if attention_mask is None:  # no padding: nothing to find, no host synchronisation
        idx = torch.arange(B * L, device=dev)
        cu_seqlens = torch.arange(0, B * L + 1, L, device=dev, dtype=torch.int32)
        offset = torch.arange(L, device=dev).repeat(B)
        seq_idx = torch.arange(B, device=dev).repeat_interleave(L)
        max_seqlen = L
    else:
        m = attention_mask.reshape(-1).long()
        idx = m.nonzero().squeeze(1)  # [T]
        T = idx.numel()
        if T == 0:
            raise ValueError("attention_mask marks no real token in the batch")
        row = idx // L
        seg = row if position_ids is None else row * (int(m.max()) + 1) + m[idx]  # (row, sample number) -> one id
        start = torch.ones(T, dtype=torch.bool, device=dev)
        start[1:] = seg[1:] != seg[:-1]  # a new sample wherever the id changes
        starts = start.nonzero().squeeze(1)  # [S]
        seq_idx = start.long().cumsum(0) - 1  # [T]
        offset = torch.arange(T, device=dev) - starts[seq_idx]
        cu_seqlens = torch.cat([starts, starts.new_tensor([T])]).to(torch.int32)
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    positions = offset if position_ids is None else position_ids.reshape(-1)[idx]
    return Unpadded((B, L), idx, cu_seqlens, max_seqlen, seq_idx, offset, positions)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables for positions [T]: cos, sin [T, hs] in fp32 (frequencies as Hugging Face computes them, so the
    fp32 results agree bit for bit; computed per batch, not a buffer that a ``.bfloat16()`` would round)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device) / head_dim))
    freqs = positions[:, None].float() * inv_freq  # [T, hs/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [T, hs]: the two halves rotate together (rotate_half layout)
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [T, nh, hs] by the tables [T, hs], in fp32 (as HF: bf16 rotations would lose position detail)."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


@lru_cache(maxsize=8)
def _flash_capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 0)  # FlashAttention 2 needs Ampere or newer


def varlen_usable(q: torch.Tensor, dropout_p: float) -> bool:
    """Whether FlashAttention's varlen kernel can run these [T, nh, hs] queries: CUDA, fp16/bf16, no attention
    dropout (the kernel's dropout is fixed at 0), a head size it supports, an Ampere or newer GPU."""
    return (
        varlen_attn is not None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and dropout_p == 0.0
        and q.size(-1) % 8 == 0
        and q.size(-1) <= 256
        and _flash_capable(q.device.index if q.device.index is not None else torch.cuda.current_device())
    )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: Unpadded,
    window: int | None = None,
    dropout_p: float = 0.0,
    use_varlen: bool | None = None,
) -> torch.Tensor:
    """Bidirectional attention inside each sample: q, k, v [T, nh, hs] -> [T, nh, hs]. ``window``: a query reads
    only keys at most ``window`` positions away (sliding window; None = the whole sample). ``use_varlen``: None =
    the varlen kernel where ``varlen_usable``, False = always the SDPA fallback (tests compare the two)."""
    if use_varlen is None:
        use_varlen = varlen_usable(q, dropout_p)
    if use_varlen:
        # (left, right) inclusive: key j is read by query i when i - left <= j <= i + right
        w = (-1, -1) if window is None else (window, window)
        cu, Lm = u.cu_seqlens, u.max_seqlen
        return varlen_attn(q, k, v.contiguous(), cu, cu, Lm, Lm, window_size=w)
    S, Lm = u.num_samples, u.max_seqlen
    nh, hs = q.shape[1:]
    if use_band(window, Lm):
        return banded(q, k, v, u, window, dropout_p)
    flat = None if u.equal_lengths else u.seq_idx * Lm + u.offset  # [T] slot of each token in the [S * Lm] layout

    def to_padded(x: torch.Tensor) -> torch.Tensor:  # [T, nh, hs] -> [S, nh, Lm, hs]
        if flat is not None:  # equal lengths: the concatenated sequence already is [S * Lm], a view suffices
            x = x.new_zeros(S * Lm, nh, hs).index_copy(0, flat, x)
        return x.reshape(S, Lm, nh, hs).transpose(1, 2)

    y = F.scaled_dot_product_attention(
        to_padded(q), to_padded(k), to_padded(v), attn_mask=u.mask(window), dropout_p=dropout_p
    )  # [S, nh, Lm, hs]
    y = y.transpose(1, 2).reshape(S * Lm, nh, hs)
    return y if flat is None else y.index_select(0, flat)  # [T, nh, hs]


def banded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, u: Unpadded, window: int, dropout_p: float = 0.0):
    """The fallback for a sliding window, on the band only: q, k, v [T, nh, hs] -> [T, nh, hs], the same result as
    the full masked SDPA (the scores left out are the masked-out ones), at C + 2 * window keys per query instead of
    Lm (``Unpadded.band``)."""
    q_idx, k_idx, mask, out_idx = u.band(window)
    nh, hs = q.shape[1:]
    n, C, K = mask.shape[0], mask.shape[2], mask.shape[3]

    def blocks(x: torch.Tensor, idx: torch.Tensor, width: int) -> torch.Tensor:  # -> [n, nh, width, hs]
        return x.index_select(0, idx).view(n, width, nh, hs).transpose(1, 2)

    y = F.scaled_dot_product_attention(blocks(q, q_idx, C), blocks(k, k_idx, K), blocks(v, k_idx, K),
                                       attn_mask=mask, dropout_p=dropout_p)  # fmt: skip
    return y.transpose(1, 2).reshape(n * C, nh, hs).index_select(0, out_idx)  # [T, nh, hs]
