"""Consistent Self-Attention on a ComfyUI model: attn1 replacement patches keyed per layer.

``patch_model`` registers one ``ConsistentAttentionPatch`` per selected self-attention layer in a
*clone*'s ``transformer_options["patches_replace"]["attn1"][(block, number, index)]`` (ComfyUI's
attention replacement: it passes the projected ``q, k, v`` and the call's options, and applies
``to_out`` to what the patch returns). Nothing of the model is modified; dropping the clone drops
the patch. The step is read from the call's sigma and the sampler's ``sample_sigmas``, so any
sampler, cfg 1, batched conds and memory splits see the same schedule.

Which rows of a call are which images:

- a Story Sampler pass sets a ``StoryRun`` (write: the reference panels of one character, stored in
  its bank; read: later panels, each with the characters whose bank it reads);
- a patch given a bank (Consistent Self-Attention's ``bank`` input) reads it for every row;
- otherwise the batch itself holds the references: per clip (Apply Motion Model's clip layout, or
  the whole batch), the images at positions below ``references``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

import comfy.ldm.modules.attention as comfy_attention

from ..motion_modules import MotionModelError
from ..motion_modules.consistent_attention import (FORMS, PLAIN, ConsistencyOptions, ReferenceBank, parse_blocks,
                                                   selects)
from .context_sampling import LAYOUT_KEY, step_index

log = logging.getLogger(__name__)
# (sigmas, sample_sigmas, sigma, step) of the latest UNet call: its attention layers read the sigma's value
# and step once per call, not once per layer (each read of a GPU tensor's value waits for all queued work).
# Keyed by the identity of the call's tensors, which the entry holds, so another call never matches it.
_latest_call: tuple | None = None
OPTIONS_KEY = "animatediff_suite.consistent"  # transformer_options entry: the patch's ConsistencyOptions
RUN_KEY = "animatediff_suite.story_run"  # transformer_options entry: the StoryRun of a Story Sampler pass


@dataclass(frozen=True)
class StoryRun:
    """What one Story Sampler pass tells the patch about the rows of each cond/uncond chunk (one object per
    pass, shared on purpose: ComfyUI deep-copies model options, and the visit counts must survive that)."""

    mode: str  # "write" (references of one character, stored) or "read" (panels against the bank)
    panels: tuple[int, ...]  # per row: its panel number (stable ids for the token draws)
    characters: tuple[tuple[str, ...], ...]  # per row: write: (the character,); read: the banks it reads
    bank: ReferenceBank
    visits: dict = field(default_factory=dict)  # read: calls so far per (sigma, layer, kind)

    def __deepcopy__(self, memo):
        return self

    def visit(self, sigma: float, layer, kind: int) -> int:
        """How many calls of this pass came before this one at ``sigma`` (heun calls twice at one sigma)."""
        key = (sigma, layer, kind)
        self.visits[key] = self.visits.get(key, 0) + 1
        return self.visits[key] - 1


@dataclass(frozen=True)
class ConsistentAttentionPatch:
    """The attn1 replacement of one layer (plain fields: ComfyUI deep-copies model options; the bank is shared)."""

    options: ConsistencyOptions
    bank: ReferenceBank | None = None
    characters: tuple[str, ...] = ()  # with a bank: the characters read ('' = every character in it)
    inner: object = None  # another pack's attn1 replacement at this layer: it computes the attention

    def __call__(self, q, k, v, extra_options):
        chunks = list(extra_options.get("cond_or_uncond") or [0])
        if q.shape[0] % len(chunks):
            raise MotionModelError(f"Consistent Self-Attention got {q.shape[0]} rows for {len(chunks)} cond/uncond "
                                   "chunks; another node changed the batch between the sampler and the UNet")
        rows = q.shape[0] // len(chunks)
        call = _Call(self, extra_options, rows, q.shape[1], k.shape[-1])
        plans = [call.plan(kind) for kind in chunks]
        if call.run is not None and call.run.mode == "write":
            call.store(k, v, chunks, rows)
        if all(plan is None for plan in plans):
            return call.attention(q, k, v, call.heads)
        out = torch.empty_like(q)
        for index, plan in enumerate(plans):
            part = slice(index * rows, (index + 1) * rows)
            out[part] = call.chunk(plan, q[part], k[part], v[part])
        return out


def _sigma_and_step(extra_options: dict) -> tuple[float, int]:
    """The running UNet call's sigma (its first value; 0.0 when unknown) and step index."""
    global _latest_call
    sigmas, sample_sigmas = extra_options.get("sigmas"), extra_options.get("sample_sigmas")
    latest = _latest_call
    if sigmas is not None and latest is not None and latest[0] is sigmas and latest[1] is sample_sigmas:
        return latest[2], latest[3]
    sigma = float(sigmas.reshape(-1)[0]) if sigmas is not None else 0.0
    step = step_index(extra_options, sigmas)
    if sigmas is not None:
        _latest_call = (sigmas, sample_sigmas, sigma, step)
    return sigma, step


class _Call:
    """One attention call's facts: step, layer, rows, and how to attend."""

    def __init__(self, patch: ConsistentAttentionPatch, extra_options: dict, rows: int, tokens: int, channels: int):
        self.patch, self.options, self.rows, self.tokens, self.channels = patch, patch.options, rows, tokens, channels
        self.extra = extra_options
        self.heads = extra_options["n_heads"]
        self.run: StoryRun | None = extra_options.get(RUN_KEY)
        self.drawn = None
        block = extra_options.get("block") or ("?", 0)
        self.layer = (block[0], block[1], extra_options.get("block_index", 0))
        sample_sigmas = extra_options.get("sample_sigmas")
        self.steps = max(1, sample_sigmas.shape[-1] - 1) if sample_sigmas is not None else 1
        self.sigma, self.step = _sigma_and_step(extra_options)
        shape = extra_options.get("original_shape")
        self.downscale = 8 * round(math.sqrt(shape[-2] * shape[-1] / tokens)) if shape else 8
        if self.run is not None and len(self.run.panels) != rows:
            raise MotionModelError(f"Story Sampler planned {len(self.run.panels)} panels for this pass but the UNet "
                                   f"got {rows} rows per chunk; another node changed the batch")

    def attention(self, q, k, v, heads):
        if self.patch.inner is not None:
            return self.patch.inner(q, k, v, self.extra)
        return comfy_attention.optimized_attention(q, k, v, heads, attn_precision=self.extra.get("attn_precision"),
                                                   transformer_options=self.extra)

    def attention_masked(self, q, k, v, heads, mask):
        # ComfyUI's attention functions add the mask to the scores (sub-quadratic attention adds a bool
        # mask as 0/1): pass 0 where a key is attended, -inf where it is not
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        return comfy_attention.optimized_attention_masked(q, k, v, heads, bias,
                                                          attn_precision=self.extra.get("attn_precision"),
                                                          transformer_options=self.extra)

    def plan(self, kind: int):
        """For one chunk: None (plain self-attention) or a list of (rows, keep, sources, bank) groups."""
        bank = self.run.bank if self.run is not None else self.patch.bank
        if self.run is not None and self.run.mode == "read" or self.run is None and bank is not None:
            return self._read_plan(bank, kind)
        keep, sources = self._draw()
        if keep is None or not any(sources):
            return None
        return [(list(range(self.rows)), keep, sources, None)]

    def _draw(self):
        """This step's token draw (None when the layer attends plainly) and each row's source rows."""
        if self.drawn is None:
            mode = self.options.mode(self.step, self.steps, self.layer)
            ids, sources = self._batch_images() if self.run is None else (self.run.panels, _all_others(self.rows))
            keep = None
            if mode != PLAIN:  # draw only for rows others sample (a write pass stores every row's draw)
                drawn = sorted(range(self.rows) if self.run is not None else {r for s in sources for r in s})
                keep = torch.zeros(self.rows, self.tokens, dtype=torch.bool)
                if drawn:
                    keep[drawn] = self.options.keep(self.step, self.layer, [ids[r] for r in drawn], self.tokens,
                                                    mode, self.downscale)
            self.drawn = keep, sources
        return self.drawn

    def _read_plan(self, bank: ReferenceBank, kind: int):
        groups: dict[tuple[str, ...], list[int]] = {}
        if self.run is None:  # a patch given a bank: every row reads the same characters
            groups[self.patch.characters or tuple(sorted(bank.entries))] = list(range(self.rows))
        else:
            for row in range(self.rows):
                groups.setdefault(tuple(self.run.characters[row]), []).append(row)
        plan = []
        visit = self.run.visit(self.sigma, self.layer, kind) if self.run is not None else 0
        for characters, rows in groups.items():
            if not characters:
                continue
            try:
                stored = bank.lookup(characters, self.sigma, self.layer, kind, visit)
            except KeyError as missing:
                raise MotionModelError(f"the reference bank has no character [{missing.args[0]}] (it holds "
                                       f"{sorted(bank.entries) or 'nothing'}); check Consistent Self-Attention's "
                                       "character, or sample that character's references first") from None
            if stored is not None and stored[0].shape[-1] != self.channels:
                raise MotionModelError(f"the reference bank's layer {self.layer} has {stored[0].shape[-1]} channels "
                                       f"but this model's has {self.channels}: the bank was made with another model")
            if stored is not None:
                plan.append((rows, None, [()] * len(rows), stored))
        return plan or None

    def _batch_images(self):
        """In-batch references: per row its image id (its row in the latent batch, so a panel draws the
        same tokens here as in a Story Sampler pass) and the reference rows it samples."""
        layout = self.extra.get(LAYOUT_KEY)
        if layout is None:
            images = [(0, row) for row in range(self.rows)]
            clip_frames = self.rows
        else:
            images = [(clip, position) for clip, positions in zip(layout.clip_ids, layout.positions)
                      for position in positions]
            clip_frames = layout.clip_frames
        first = {}
        for row, image in enumerate(images):
            if image[1] < self.options.references:
                first.setdefault(image, row)
        sources = [tuple(r for image, r in first.items() if image[0] == clip and image != (clip, pos))
                   for clip, pos in images]
        if layout is not None and layout.frames < layout.clip_frames and self.options.references:
            lacking = sorted({clip for clip, _ in images if not any(image[0] == clip for image in first)})
            if lacking:
                raise MotionModelError(
                    "Consistent Self-Attention: a context window of clip(s) "
                    f"{lacking} holds none of the reference frames (positions 0-{self.options.references - 1}), "
                    "so its frames would lose the character; with context windows, sample the references "
                    "first (Story Sampler) and connect its bank to Consistent Self-Attention")
        return [clip * clip_frames + position for clip, position in images], sources

    def chunk(self, plan, q, k, v):
        if plan is None:
            return self.attention(q, k, v, self.heads)
        out = torch.empty_like(q)
        covered = torch.zeros(q.shape[0], dtype=torch.bool)
        form = FORMS[self.options.form]
        for rows, keep, sources, bank in plan:
            index = torch.as_tensor(rows, device=q.device)
            if keep is None:
                keep = torch.zeros(len(rows), q.shape[1], dtype=torch.bool)
            extra = {"attention": self.attention} if form is FORMS["indices"] else \
                {"attention_masked": lambda *a, mask: self.attention_masked(*a, mask)}
            out[index] = form(q[index], k[index], v[index], self.heads, keep, sources, bank=bank, **extra)
            covered[rows] = True
        if not covered.all():
            rest = torch.nonzero(~covered).flatten().to(q.device)
            out[rest] = self.attention(q[rest], k[rest], v[rest], self.heads)
        return out

    def store(self, k, v, chunks, rows):
        """Write pass: keep each chunk's sampled reference tokens (or None: plain at this step)."""
        character = self.run.characters[0][0]
        keep, _ = self._draw()
        for index, kind in enumerate(chunks):
            kv = None
            if keep is not None:
                part = slice(index * rows, (index + 1) * rows)
                kv = tuple(torch.cat([t[part][r][keep[r].to(t.device)] for r in range(rows)]) for t in (k, v))
            try:
                self.run.bank.store(character, self.sigma, self.layer, kind, kv)
            except MemoryError as full:
                raise MotionModelError(f"Story Sampler: {full}; lower the sampling rate, id_length, steps or the "
                                       "resolution, patch fewer blocks, or raise bank_limit_mb") from None


def _all_others(rows: int) -> list[tuple[int, ...]]:
    return [tuple(j for j in range(rows) if j != i) for i in range(rows)]


def transformer_blocks(model) -> dict[tuple[str, int, int], torch.nn.Module]:
    """Every transformer block of the UNet as ComfyUI keys its attention layers: (block name, block number,
    index within the block), in order."""
    unet = model.get_model_object("diffusion_model")
    found = {}
    for name, blocks in (("input", unet.input_blocks), ("middle", [unet.middle_block]),
                         ("output", unet.output_blocks)):
        for number, block in enumerate(blocks):
            inner = [b for m in block.modules() if hasattr(m, "transformer_blocks") for b in m.transformer_blocks]
            found.update(((name, number, index), b) for index, b in enumerate(inner))
    return found


def attention_layers(model) -> list[tuple[str, int, int]]:
    """Every self-attention layer of the UNet as ComfyUI keys them: (block name, block number, index)."""
    return list(transformer_blocks(model))


def patch_model(model, options: ConsistencyOptions, blocks: str, bank: ReferenceBank | None = None,
                characters: tuple[str, ...] = ()):
    """A clone of ``model`` whose selected self-attention layers attend consistently; the input is untouched."""
    selection = parse_blocks(blocks)
    layers = [layer for layer in attention_layers(model) if selects(selection, layer[0], layer[1])]
    if not layers:
        raise MotionModelError(f"Consistent Self-Attention: blocks {blocks!r} select no self-attention layer of "
                               "this model (SD1.5 has attention in input 1-8, middle, output 3-11; SDXL in input "
                               "4-8, middle, output 0-5)")
    patched = model.clone()
    existing = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
    for layer in layers:
        inner = existing.get(layer) or existing.get(layer[:2])
        if isinstance(inner, ConsistentAttentionPatch):
            inner = inner.inner
        patched.set_model_attn1_replace(ConsistentAttentionPatch(options, bank, characters, inner), *layer)
    patched.model_options["transformer_options"][OPTIONS_KEY] = options
    log.debug("Consistent Self-Attention on %d layers", len(layers))
    return patched
