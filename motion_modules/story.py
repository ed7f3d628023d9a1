"""Stories for Consistent Self-Attention: characters, panels, reference panels, and comic pages.

Text format (StoryDiffusion's app)::

    characters:  [Bob] a man with red hair, green jacket
                 [Ann] a woman with a yellow umbrella
    panels:      [Bob] wakes up in the morning #Monday.
                 [Bob] reads the newspaper at breakfast
                 [NC] a rainy street, no people
                 [Bob] meets [Ann] at the bus stop #They meet.

A ``[Name]`` tag becomes the character's description in the prompt; ``[NC]`` marks a panel without a
character; text after ``#`` is the caption only (it is not in the prompt). A character's references
are its first ``references`` panels that show it alone.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

_TAG = re.compile(r"\[([^\[\]]+)\]")
NO_CHARACTER = "NC"


@dataclass(frozen=True)
class Panel:
    prompt: str
    caption: str
    characters: tuple[str, ...]


@dataclass(frozen=True)
class Story:
    """Panels in reading order; ``references[name]`` are the panel numbers sampled first for ``name``."""

    panels: tuple[Panel, ...]
    references: tuple[tuple[str, tuple[int, ...]], ...]

    def reference_panels(self) -> set[int]:
        return {panel for _, panels in self.references for panel in panels}


def parse_characters(text: str) -> dict[str, str]:
    """``"[Bob] a man ..."`` lines -> ``{"Bob": "a man ..."}``; errors name the line."""
    characters: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"\[([^\[\]]+)\]\s*(.*)", line)
        if match is None or not match[2].strip():
            raise ValueError(f"character line {number}: {line!r} is not '[Name] description' "
                             "(e.g. '[Bob] a man with red hair, green jacket')")
        name = match[1].strip()
        if name == NO_CHARACTER:
            raise ValueError(f"character line {number}: [{NO_CHARACTER}] is reserved for panels without a character")
        if name in characters:
            raise ValueError(f"character line {number}: [{name}] is described twice")
        characters[name] = match[2].strip()
    return characters


def parse_story(characters_text: str, panels_text: str, style: str = "", references: int = 2) -> Story:
    """Parse the character and panel texts (the module docstring's format) into a ``Story``.

    Args:
        style: shared style text; ``{prompt}`` in it is replaced by the panel's prompt, otherwise it
            is appended after a comma.
        references: reference panels per character (its first panels that show it alone).
    """
    characters = parse_characters(characters_text)
    panels = []
    for number, line in enumerate(panels_text.splitlines(), start=1):
        if not line.strip():
            continue
        panels.append(_panel(line.strip(), number, characters, style))
    if not panels:
        raise ValueError("the story has no panels; write one line per panel, e.g. '[Bob] wakes up in the morning'")
    refs = []
    for name in characters:
        alone = [i for i, panel in enumerate(panels) if panel.characters == (name,)]
        if any(name in panel.characters for panel in panels) and len(alone) < max(1, references):
            raise ValueError(f"character [{name}] needs {max(1, references)} panel(s) that show it alone to sample "
                             f"as references (it has {len(alone)}); add panels, or lower id_length")
        if alone:
            refs.append((name, tuple(alone[:references])))
    return Story(tuple(panels), tuple(refs))


def _panel(line: str, number: int, characters: dict[str, str], style: str) -> Panel:
    text, _, caption = line.partition("#")
    names, tags = [], [tag.strip() for tag in _TAG.findall(text)]
    for tag in tags:
        if tag != NO_CHARACTER and tag not in characters:
            known = ", ".join(f"[{n}]" for n in characters) or "none"
            raise ValueError(f"panel line {number}: [{tag}] is not a described character (described: {known}, "
                             f"and [{NO_CHARACTER}] for no character)")
        if tag != NO_CHARACTER and tag not in names:
            names.append(tag)
    if NO_CHARACTER in tags and names:
        raise ValueError(f"panel line {number}: [{NO_CHARACTER}] cannot share a panel with a character")

    def describe(match):
        tag = match[1].strip()
        return "" if tag == NO_CHARACTER else f"{characters[tag]}"

    def name_only(match):
        tag = match[1].strip()
        return "" if tag == NO_CHARACTER else tag

    prompt = _tidy(_TAG.sub(describe, text))
    if not prompt:
        raise ValueError(f"panel line {number}: {line!r} has no prompt text")
    if style.strip():
        prompt = style.replace("{prompt}", prompt) if "{prompt}" in style else f"{prompt}, {style.strip()}"
    shown = _tidy(caption) if caption.strip() else _tidy(_TAG.sub(name_only, text))
    return Panel(prompt, shown, tuple(names))


def _tidy(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r"\s+([,.;:!?])", r"\1", text).strip(" ,")


def pad_tokens(embeddings: list[torch.Tensor]) -> list[torch.Tensor]:
    """Bring ``(1, tokens, c)`` text embeddings to one length by repeating each to the lcm of the
    lengths (what ComfyUI does when it batches conditionings of different lengths)."""
    lengths = {e.shape[1] for e in embeddings}
    target = math.lcm(*lengths)
    return [e.repeat(1, target // e.shape[1], 1) for e in embeddings]
