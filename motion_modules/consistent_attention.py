"""Consistent Self-Attention (StoryDiffusion, Zhou et al. 2024, sec. 3.1, eqs. 1-3).

Every image of a batch keeps its own self-attention queries; its keys and values are its own tokens
plus a random sample of the *reference* images' tokens (eq. 1: ``S_i = RandSample(I_1..I_{i-1},
I_{i+1}..I_B)``, eq. 2: ``P_i = [S_i, I_i]``, eq. 3: ``O_i = Attention(Q_i, K_{P_i}, V_{P_i})``).
Because keys and values are linear in the tokens, sampling the projected keys/values is the same
as projecting the sampled tokens, so the functions below take ``q, k, v`` already projected, all of
shape ``(b, d, (heads c))`` (b images, d tokens), for one cond/uncond chunk.

Two equal forms of the same draw:

- ``consistent_attention``: per image, index lists of the sampled tokens (the public code's
  memory-efficient form); images that attend to the same extra tokens share one attention call;
- ``consistent_attention_masked``: one attention over all ``b * d`` tokens with a boolean
  ``(b d) x (b d)`` mask, as the public code's original ``cal_attn_mask``.

The draw ``keep`` (``(b, d)`` booleans, Bernoulli(rate) per token) belongs to the *source* image:
every image that samples image ``j`` sees the same tokens of ``j`` in that step and layer, as in
the public code. A stored reference bank adds the same extra tokens to every image of a chunk.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention on ``(b, d, (heads c))`` tensors; ``mask`` (bool, True = attend) broadcasts
    over ``(b, heads, d_q, d_k)``."""
    b, dq, inner = q.shape
    split = [t.reshape(t.shape[0], t.shape[1], heads, inner // heads).transpose(1, 2) for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*split, attn_mask=mask)  # b heads d c
    return out.transpose(1, 2).reshape(b, dq, inner)


def draw_tokens(seed_parts: Sequence, tokens: int, rate: float) -> torch.Tensor:
    """A seeded Bernoulli(``rate``) draw over ``tokens`` tokens (CPU bool tensor).

    ``seed_parts`` (e.g. ``(seed, step, layer, image)``) seed the draw, so the same image of the same
    step and layer gets the same tokens in every UNet call, whatever the call's batch holds."""
    if rate <= 0:
        return torch.zeros(tokens, dtype=torch.bool)
    if rate >= 1:
        return torch.ones(tokens, dtype=torch.bool)
    generator = torch.Generator().manual_seed(stable_seed(*seed_parts))
    return torch.rand(tokens, generator=generator) < rate


def stable_seed(*parts) -> int:
    """A 63-bit seed from ``parts`` that is the same in every process (Python's ``hash`` is salted)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def reference_sources(images: int, references: int) -> list[tuple[int, ...]]:
    """Per image, the reference images (the first ``references``) it samples tokens from: all of them
    but itself (eq. 1)."""
    refs = range(min(references, images))
    return [tuple(j for j in refs if j != i) for i in range(images)]


def consistent_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, keep: torch.Tensor,
                         sources: Sequence[Sequence[int]], bank: tuple[torch.Tensor, torch.Tensor] | None = None,
                         attention: Attention = sdpa_attention) -> torch.Tensor:
    """Consistent self-attention of one chunk, in the index form (no ``(b d)^2`` mask).

    Args:
        q, k, v: ``(b, d, (heads c))`` projected queries, keys and values of the chunk's images.
        heads: attention heads.
        keep: ``(b, d)`` bool, the tokens of each image that other images may sample.
        sources: per image, the images whose kept tokens it also attends to (never itself).
        bank: ``(k, v)`` of shape ``(m, (heads c))`` that every image also attends to (stored references).
        attention: ``attention(q, k, v, heads)`` on batched ``(b, d, (heads c))`` tensors.
    """
    out = torch.empty_like(q)
    groups: dict[tuple[int, ...], list[int]] = {}
    for image, source in enumerate(sources):
        groups.setdefault(tuple(source), []).append(image)
    for source, images in groups.items():
        rows = torch.as_tensor(images, device=q.device)
        extra_k = [k[j][keep[j].to(k.device)] for j in source]
        extra_v = [v[j][keep[j].to(v.device)] for j in source]
        if bank is not None:
            extra_k.append(bank[0].to(k))
            extra_v.append(bank[1].to(v))
        if not extra_k or sum(t.shape[0] for t in extra_k) == 0:
            out[rows] = attention(q[rows], k[rows], v[rows], heads)
            continue
        shared_k, shared_v = torch.cat(extra_k), torch.cat(extra_v)
        n = len(images)
        keys = torch.cat([k[rows], shared_k.expand(n, *shared_k.shape)], dim=1)
        values = torch.cat([v[rows], shared_v.expand(n, *shared_v.shape)], dim=1)
        out[rows] = attention(q[rows], keys, values, heads)
    return out


def consistent_attention_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, keep: torch.Tensor,
                                sources: Sequence[Sequence[int]],
                                bank: tuple[torch.Tensor, torch.Tensor] | None = None,
                                attention_masked=sdpa_attention) -> torch.Tensor:
    """The same as ``consistent_attention``, as one attention over all tokens with a ``(b d) x (b d)``
    boolean mask (the public code's ``cal_attn_mask`` form; memory grows with ``(b d)^2``)."""
    b, d, inner = q.shape
    mask = torch.zeros(b, d, b, d, dtype=torch.bool, device=q.device)  # query image, token, key image, token
    for image, source in enumerate(sources):
        mask[image, :, image, :] = True
        for j in source:
            mask[image, :, j, :] = keep[j].to(q.device)
    mask = mask.reshape(b * d, b * d)
    keys, values = k.reshape(1, b * d, inner), v.reshape(1, b * d, inner)
    if bank is not None:
        keys = torch.cat([keys, bank[0].to(k)[None]], dim=1)
        values = torch.cat([values, bank[1].to(v)[None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(b * d, bank[0].shape[0])], dim=1)
    return attention_masked(q.reshape(1, b * d, inner), keys, values, heads, mask=mask).reshape(b, d, inner)


FORMS = {"indices": consistent_attention, "mask": consistent_attention_masked}


# --- when to attend consistently: schedules over the sampling steps --------------------------------

FULL, SAMPLED, PLAIN = "full", "sampled", "plain"


def _full_steps(steps: int) -> int:
    """The first steps attend to every token of the references: 5 of 50 in the public app."""
    return max(1, round(steps / 10))


def paper_schedule(step: int, steps: int, draw: float) -> str:
    """StoryDiffusion's app: full reference attention first, then consistent attention with probability
    0.7 before 40% of the steps (step 20 of 50) and 0.9 after, plain self-attention otherwise."""
    if step < _full_steps(steps):
        return FULL
    return SAMPLED if draw < (0.7 if step < 0.4 * steps else 0.9) else PLAIN


def deterministic_schedule(step: int, steps: int, draw: float) -> str:
    """Full reference attention first, then consistent attention on every step and layer."""
    return FULL if step < _full_steps(steps) else SAMPLED


def sampled_schedule(step: int, steps: int, draw: float) -> str:
    """Consistent attention at the sampling rate on every step (no full-attention start)."""
    return SAMPLED


SCHEDULES = {"paper": paper_schedule, "deterministic": deterministic_schedule, "sampled_only": sampled_schedule}


@dataclass(frozen=True)
class ConsistencyOptions:
    """Settings of Consistent Self-Attention (plain values: safe to deep-copy with ComfyUI's model options).

    Args:
        rate: share of a reference's tokens another image samples per step (the paper's 0.5).
        rate_by_scale: ``((downscale, rate), ...)`` overrides by the layer's downscale from the image
            (8, 16, 32, 64): the paper's ``sa32`` is downscale 32, ``sa64`` downscale 16 (at 1024^2).
        references: how many images of a batch are references (the paper's ``id_length``).
        schedule: a key of ``SCHEDULES``.
        seed: seeds the token draws and the schedule's per-layer coin.
        form: a key of ``FORMS``.
    """

    rate: float = 0.5
    rate_by_scale: tuple[tuple[int, float], ...] = ()
    references: int = 2
    schedule: str = "paper"
    seed: int = 0
    form: str = "indices"

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown consistency schedule {self.schedule!r}; expected one of {sorted(SCHEDULES)}")
        if self.form not in FORMS:
            raise ValueError(f"unknown consistent attention form {self.form!r}; expected one of {sorted(FORMS)}")
        for rate in (self.rate, *(r for _, r in self.rate_by_scale)):
            if not 0 <= rate <= 1 or math.isnan(rate):
                raise ValueError(f"sampling rate {rate} is not in [0, 1]")
        if self.references < 0:
            raise ValueError(f"references must be 0 or more, not {self.references}")

    def rate_at(self, downscale: int) -> float:
        return dict(self.rate_by_scale).get(downscale, self.rate)

    def mode(self, step: int, steps: int, layer) -> str:
        """FULL, SAMPLED or PLAIN for one layer at one step (the same in every call of that step)."""
        coin = torch.rand(1, generator=torch.Generator().manual_seed(stable_seed(self.seed, "mode", step, layer)))
        return SCHEDULES[self.schedule](step, steps, float(coin))

    def keep(self, step: int, layer, image_ids: Sequence, tokens: int, mode: str, downscale: int) -> torch.Tensor:
        """``(images, tokens)`` draws of the images ``image_ids`` (stable ids, e.g. panel numbers)."""
        rate = self.rate_at(downscale)
        if mode == FULL and rate > 0:  # rate 0 switches a resolution off, full-attention steps included
            rate = 1.0
        return torch.stack([draw_tokens((self.seed, step, layer, image), tokens, rate) for image in image_ids])


def parse_rates(text: str) -> tuple[tuple[int, float], ...]:
    """``"32: 0.5, 16: 0.6"`` -> ``((32, 0.5), (16, 0.6))``; errors name the bad item."""
    rates = {}
    for item in filter(None, (part.strip() for part in text.replace(";", ",").split(","))):
        scale, sep, rate = item.partition(":")
        try:
            scale_value, rate_value = int(scale), float(rate)
        except ValueError:
            scale_value = rate_value = None
        if not sep or scale_value not in (8, 16, 32, 64) or rate_value is None or not 0 <= rate_value <= 1:
            raise ValueError(f"sampling rate override {item!r} is not 'DOWNSCALE: RATE' with DOWNSCALE one of "
                             "8, 16, 32, 64 and RATE in [0, 1] (e.g. '32: 0.5, 16: 0.5')")
        rates[scale_value] = rate_value
    return tuple(sorted(rates.items()))


BLOCK_NAMES = ("input", "middle", "output")


def parse_blocks(text: str) -> tuple[tuple[str, tuple[int, ...] | None], ...]:
    """Which UNet blocks' self-attention to patch: ``"output"`` (the paper: the up blocks), ``"all"``, or
    a list such as ``"output 3-5, input 7, middle"`` -> ``(("output", (3, 4, 5)), ("input", (7,)),
    ("middle", None))`` (None: every block of that name). Errors name the bad item."""
    text = text.strip().lower()
    if text == "all":
        return tuple((name, None) for name in BLOCK_NAMES)
    selection: dict[str, set[int] | None] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, ids = item.partition(" ")
        if name not in BLOCK_NAMES:
            raise ValueError(f"block selection item {item!r}: {name!r} is not one of {list(BLOCK_NAMES)} "
                             "(write e.g. 'output', 'all', or 'output 3-5, input 7')")
        if not ids.strip():
            selection[name] = None
            continue
        low, dash, high = ids.replace(" ", "").partition("-")
        if not low.isdigit() or (dash and (not high.isdigit() or int(high) < int(low))):
            raise ValueError(f"block selection item {item!r}: {ids.strip()!r} is not a block number or "
                             "a range like '3-5'")
        numbers = set(range(int(low), int(high if dash else low) + 1))
        if selection.get(name, ()) is not None:
            selection[name] = selection.get(name, set()) | numbers
    if not selection:
        raise ValueError("block selection is empty; write 'output' (the paper's choice), 'all', or a list "
                         "such as 'output 3-5, input 7'")
    return tuple((name, None if ids is None else tuple(sorted(ids))) for name, ids in selection.items())


def selects(selection, block: str, number: int) -> bool:
    """Whether ``parse_blocks``' ``selection`` includes block ``(block, number)``."""
    return any(name == block and (ids is None or number in ids) for name, ids in selection)


# --- the reference bank: StoryDiffusion's write / read split --------------------------------------

class ReferenceBank:
    """Reference tokens stored per character, step and layer, for images sampled later (``read``).

    Reference images are sampled first (``write``): in each step and layer, the tokens they let
    others sample (only those: the draw at the sampling rate) are stored, keys and values, per
    cond/uncond chunk. Later images attend to them instead of to reference images in their batch, so
    memory does not grow with the number of images. Steps are keyed by sigma and read by the
    nearest stored sigma, so a reader may use another sampler or step count. Samplers that call the
    model twice at one sigma (heun's correction, then the next step) store one visit per call; a
    reader that counts its own visits (Story Sampler's passes) reads the matching one.

    ComfyUI deep-copies model options; a bank is shared on purpose (``__deepcopy__`` returns it).
    """

    def __init__(self, limit_bytes: int = 0, offload: bool = False):
        self.limit_bytes = limit_bytes
        self.offload = offload
        self.entries: dict[str, dict[float, dict]] = {}
        self.nbytes = 0
        self.frozen = False

    def __deepcopy__(self, memo):
        return self

    def __repr__(self) -> str:
        return (f"ReferenceBank(characters={sorted(self.entries)}, steps={len(self.sigmas())}, "
                f"{self.nbytes / 2 ** 20:.1f} MiB)")

    def sigmas(self) -> list[float]:
        return sorted({sigma for steps in self.entries.values() for sigma in steps})

    def store(self, character: str, sigma: float, layer, kind: int, kv: tuple[torch.Tensor, torch.Tensor] | None):
        """Keep ``kv`` (or None: that layer attended plainly at that step) for ``character``."""
        if self.frozen:
            raise ValueError("this reference bank is complete; sample new references to make another")
        if kv is not None:
            size = sum(t.numel() * t.element_size() for t in kv)
            if self.limit_bytes and self.nbytes + size > self.limit_bytes:
                raise MemoryError(f"the reference bank would grow past its cap of {self.limit_bytes / 2 ** 20:.0f} "
                                  f"MiB (holding {self.nbytes / 2 ** 20:.1f} MiB at sigma {sigma:.4g})")
            kv = tuple(t.detach().to("cpu", copy=True) if self.offload else t.detach().clone() for t in kv)
            self.nbytes += size
        visits = self.entries.setdefault(character, {}).setdefault(float(sigma), {}).setdefault(layer, {})
        visits.setdefault(kind, []).append(kv)

    def lookup(self, characters: Sequence[str], sigma: float, layer, kind: int, visit: int = 0):
        """The stored ``(k, v)`` of ``characters`` at the stored step nearest ``sigma`` (concatenated; its
        ``visit``-th call there, or the last), or None when that layer attended plainly there (or holds
        nothing for ``kind``)."""
        keys, values = [], []
        for character in characters:
            steps = self.entries.get(character)
            if not steps:
                raise KeyError(character)
            nearest = min(steps, key=lambda s: abs(math.log(max(s, 1e-8)) - math.log(max(sigma, 1e-8))))
            stored = steps[nearest].get(layer, {}).get(kind) or [None]
            kv = stored[min(visit, len(stored) - 1)]
            if kv is not None:
                keys.append(kv[0])
                values.append(kv[1])
        if not keys:
            return None
        return torch.cat(keys), torch.cat(values)
