"""Core tier: Consistent Self-Attention maths, schedules, the reference bank, stories and comic pages.

Expected values come from a per-image loop written here (the paper's eqs. 1-3 read literally), from
hand-computed geometry, and from the draw itself, never from the functions under test.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from animatediff_suite.motion_modules.comic_page import comic_page, panel_origin
from animatediff_suite.motion_modules.consistent_attention import (
    FULL, PLAIN, SAMPLED, ConsistencyOptions, ReferenceBank, consistent_attention, consistent_attention_masked,
    draw_tokens, parse_blocks, parse_rates, reference_sources, sdpa_attention, selects, stable_seed)
from animatediff_suite.motion_modules.story import pad_tokens, parse_characters, parse_story


def naive(q, k, v, heads, keep, sources, bank=None):
    """Eqs. 1-3 per image and head: keys/values = own tokens + kept tokens of each source (+ bank)."""
    b, d, inner = q.shape
    c = inner // heads
    out = torch.zeros_like(q)
    for i in range(b):
        keys = torch.cat([k[i]] + [k[j][keep[j]] for j in sources[i]] + ([bank[0]] if bank else []))
        values = torch.cat([v[i]] + [v[j][keep[j]] for j in sources[i]] + ([bank[1]] if bank else []))
        for h in range(heads):
            cols = slice(h * c, (h + 1) * c)
            weights = torch.softmax(q[i][:, cols] @ keys[:, cols].T / math.sqrt(c), dim=-1)
            out[i][:, cols] = weights @ values[:, cols]
    return out


def qkv(b=4, d=12, inner=16, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, d, inner, generator=gen, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("references", [1, 2, 4])
@pytest.mark.parametrize("with_bank", [False, True])
def test_index_form_equals_the_per_image_loop(references, with_bank):
    q, k, v = qkv()
    keep = torch.rand(4, 12, generator=torch.Generator().manual_seed(1)) < 0.5
    sources = reference_sources(4, references)
    bank = tuple(torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)) \
        if with_bank else None
    expected = naive(q, k, v, 2, keep, sources, bank)
    assert torch.allclose(consistent_attention(q, k, v, 2, keep, sources, bank=bank), expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("with_bank", [False, True])
def test_mask_form_equals_the_index_form_for_the_same_draw(with_bank):
    q, k, v = qkv(b=5, d=9, seed=3)
    keep = torch.rand(5, 9, generator=torch.Generator().manual_seed(4)) < 0.4
    sources = reference_sources(5, 3)
    bank = (torch.randn(6, 16, dtype=torch.float64), torch.randn(6, 16, dtype=torch.float64)) if with_bank else None
    indexed = consistent_attention(q, k, v, 4, keep, sources, bank=bank)
    masked = consistent_attention_masked(q, k, v, 4, keep, sources, bank=bank)
    assert torch.allclose(masked, indexed, atol=1e-10, rtol=0)
    assert torch.allclose(masked, naive(q, k, v, 4, keep, sources, bank), atol=1e-10, rtol=0)


def test_rows_are_indexed_on_the_inputs_device_not_the_default_one():
    """CPU tensors under another default device (meta): the per-group row index follows q."""
    q, k, v = qkv()
    keep = torch.rand(4, 12, generator=torch.Generator().manual_seed(1)) < 0.5
    sources = reference_sources(4, 2)
    expected = naive(q, k, v, 2, keep, sources)
    with torch.device("meta"):
        out = consistent_attention(q, k, v, 2, keep, sources)
    assert torch.allclose(out, expected, atol=1e-10, rtol=0)


def test_rate_zero_is_plain_self_attention_bit_exact():
    q, k, v = qkv(dtype=torch.float32)
    keep = torch.stack([draw_tokens((0, 1, "layer", i), 12, 0.0) for i in range(4)])
    assert not keep.any()
    plain = sdpa_attention(q, k, v, 2)
    assert torch.equal(consistent_attention(q, k, v, 2, keep, reference_sources(4, 2)), plain)


def test_references_see_each_other_and_later_images_see_only_references():
    q, k, v = qkv()
    keep = torch.ones(4, 12, dtype=torch.bool)
    sources = reference_sources(4, 2)
    assert sources == [(1,), (0,), (0, 1), (0, 1)]
    out = consistent_attention(q, k, v, 2, keep, sources)
    # image 3's output must not depend on image 2 (not a reference): change image 2's keys and values
    k2, v2 = k.clone(), v.clone()
    k2[2] += 5
    v2[2] -= 3
    again = consistent_attention(q, k2, v2, 2, keep, sources)
    assert torch.equal(again[3], out[3]) and torch.equal(again[0], out[0])
    assert not torch.allclose(again[2], out[2])


def test_draws_are_seeded_by_their_parts_and_keep_about_rate_of_the_tokens():
    a = draw_tokens((7, 3, ("output", 3, 0), 1), 4096, 0.5)
    assert torch.equal(a, draw_tokens((7, 3, ("output", 3, 0), 1), 4096, 0.5))
    assert not torch.equal(a, draw_tokens((7, 3, ("output", 3, 0), 2), 4096, 0.5))
    assert abs(a.float().mean().item() - 0.5) < 0.03
    assert draw_tokens((1,), 64, 1.0).all() and not draw_tokens((1,), 64, 0.0).any()
    assert abs(draw_tokens((9,), 8192, 0.25).float().mean().item() - 0.25) < 0.02


def test_paper_schedule_full_first_then_seventy_and_ninety_percent():
    options = ConsistencyOptions(schedule="paper", seed=5)
    layers = [("output", n, i) for n in range(3, 12) for i in range(10)]
    assert all(options.mode(step, 50, layer) == FULL for step in range(5) for layer in layers)
    early = [options.mode(step, 50, layer) for step in range(5, 20) for layer in layers]
    late = [options.mode(step, 50, layer) for step in range(20, 50) for layer in layers]
    assert set(early) == set(late) == {SAMPLED, PLAIN}
    assert abs(early.count(SAMPLED) / len(early) - 0.7) < 0.05
    assert abs(late.count(SAMPLED) / len(late) - 0.9) < 0.04
    # the same layer at the same step decides the same way in every call
    assert [options.mode(9, 50, layer) for layer in layers] == [options.mode(9, 50, layer) for layer in layers]


def test_deterministic_schedule_and_full_steps_scale_with_the_step_count():
    options = ConsistencyOptions(schedule="deterministic")
    assert [options.mode(s, 20, "l") for s in range(4)] == [FULL, FULL, SAMPLED, SAMPLED]
    assert options.mode(0, 4, "l") == FULL and options.mode(1, 4, "l") == SAMPLED
    keep = options.keep(0, "l", [0, 1], 30, FULL, 8)
    assert keep.all()
    overridden = ConsistencyOptions(rate=0.5, rate_by_scale=((16, 0.0),))
    assert not overridden.keep(3, "l", [0], 50, SAMPLED, 16).any()
    assert overridden.keep(3, "l", [0], 50, SAMPLED, 32).any()


def test_options_refuse_bad_values():
    with pytest.raises(ValueError, match="unknown consistency schedule 'often'"):
        ConsistencyOptions(schedule="often")
    with pytest.raises(ValueError, match=r"sampling rate 1.5 is not in \[0, 1\]"):
        ConsistencyOptions(rate=1.5)
    with pytest.raises(ValueError, match="sampling rate 2.0 is not"):
        ConsistencyOptions(rate_by_scale=((32, 2.0),))


def test_block_and_rate_parsing():
    assert parse_blocks("output") == (("output", None),)
    assert parse_blocks("all") == (("input", None), ("middle", None), ("output", None))
    selection = parse_blocks("output 3-5, input 7, middle")
    assert selects(selection, "output", 4) and not selects(selection, "output", 6)
    assert selects(selection, "input", 7) and not selects(selection, "input", 8) and selects(selection, "middle", 0)
    with pytest.raises(ValueError, match="'up' is not one of"):
        parse_blocks("up")
    with pytest.raises(ValueError, match="'5-3' is not a block number"):
        parse_blocks("output 5-3")
    assert parse_rates("32: 0.5, 16:0.25") == ((16, 0.25), (32, 0.5))
    assert parse_rates("") == ()
    with pytest.raises(ValueError, match="'12: 0.5' is not 'DOWNSCALE: RATE'"):
        parse_rates("12: 0.5")


def test_bank_reads_the_nearest_step_joins_characters_and_honours_its_cap():
    bank = ReferenceBank()
    for sigma, value in ((14.6, 1.0), (2.0, 2.0), (0.1, 3.0)):
        bank.store("Bob", sigma, "l", 0, (torch.full((2, 4), value), torch.full((2, 4), -value)))
    bank.store("Bob", 14.6, "l", 1, None)
    bank.store("Ann", 2.0, "l", 0, (torch.full((3, 4), 9.0), torch.full((3, 4), 9.0)))
    assert bank.lookup(["Bob"], 1.5, "l", 0)[0][0, 0] == 2.0
    assert bank.lookup(["Bob"], 12.0, "l", 0)[1][0, 0] == -1.0
    assert bank.lookup(["Bob"], 14.6, "l", 1) is None
    joined = bank.lookup(["Bob", "Ann"], 2.0, "l", 0)[0]
    assert joined.shape == (5, 4) and joined[-1, 0] == 9.0
    assert bank.nbytes == 4 * (3 * 2 * 2 * 4) + 2 * 3 * 4 * 4
    with pytest.raises(KeyError):
        bank.lookup(["Eve"], 1.0, "l", 0)
    assert copy.deepcopy({"bank": bank})["bank"] is bank
    # a second call at a stored sigma (heun's correction, then the next step) is a second visit
    bank.store("Bob", 2.0, "l", 0, (torch.full((2, 4), 5.0), torch.full((2, 4), 5.0)))
    assert [bank.lookup(["Bob"], 2.0, "l", 0, visit)[0][0, 0].item() for visit in (0, 1, 7)] == [2.0, 5.0, 5.0]
    small = ReferenceBank(limit_bytes=100)
    small.store("Bob", 1.0, "l", 0, (torch.zeros(2, 4), torch.zeros(2, 4)))  # 64 bytes
    with pytest.raises(MemoryError, match="cap of 0 MiB"):
        small.store("Bob", 0.5, "l", 0, (torch.zeros(2, 4), torch.zeros(2, 4)))
    assert small.nbytes == 64


def test_story_prompts_tags_captions_and_references():
    story = parse_story("[Bob] a man with red hair\n[Ann] a woman, yellow umbrella",
                        "[Bob] wakes up #Monday.\n[Bob] reads the paper\n[NC] a rainy street\n"
                        "[Ann] waits at the stop\n[Bob] meets [Ann] at the bus stop",
                        style="comic style, {prompt}, ink", references=1)
    assert [p.characters for p in story.panels] == [("Bob",), ("Bob",), (), ("Ann",), ("Bob", "Ann")]
    assert story.panels[0].prompt == "comic style, a man with red hair wakes up, ink"
    assert story.panels[0].caption == "Monday."
    assert story.panels[4].caption == "Bob meets Ann at the bus stop"
    assert story.panels[2].prompt == "comic style, a rainy street, ink"
    assert story.references == (("Bob", (0,)), ("Ann", (3,)))
    assert parse_story("[Bob] x", "[Bob] a\n[Bob] b\n[Bob] c", "ink", references=2).panels[1].prompt == "x b, ink"


def test_story_errors_name_the_line():
    with pytest.raises(ValueError, match="character line 2: 'Ann a woman' is not"):
        parse_characters("[Bob] a man\nAnn a woman")
    with pytest.raises(ValueError, match=r"panel line 2: \[Carl\] is not a described character"):
        parse_story("[Bob] a man", "[Bob] walks\n[Carl] runs")
    with pytest.raises(ValueError, match=r"character \[Bob\] needs 2 panel\(s\) that show it alone"):
        parse_story("[Bob] a man", "[Bob] walks\n[NC] a street", references=2)
    with pytest.raises(ValueError, match="the story has no panels"):
        parse_story("[Bob] a man", "\n \n")


def _error(call, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as error:
        call(*args, **kwargs)
    return str(error.value)


def test_story_blank_and_comment_lines_defaults_and_captions_without_a_hash():
    """Blank and comment lines anywhere are skipped (the lines after them still count); the defaults are no
    style and 2 references; an [NC] panel's caption is its text without the tag."""
    assert parse_characters("[Bob] a man\n\n  # a note\n[Ann] a woman") == {"Bob": "a man", "Ann": "a woman"}
    story = parse_story("[Bob] a man", "[Bob] walks\n\n[Bob] runs\n[NC] a rainy street\n[Bob] sleeps")
    assert [p.prompt for p in story.panels] == ["a man walks", "a man runs", "a rainy street", "a man sleeps"]
    assert story.panels[2].caption == "a rainy street" and story.panels[2].characters == ()
    assert story.references == (("Bob", (0, 1)),)
    tidy = parse_story("[Bob] a man", "[Bob]   walks ,  slowly .  #  Late ,  again .\n[Bob] runs")
    assert (tidy.panels[0].prompt, tidy.panels[0].caption) == ("a man walks, slowly.", "Late, again.")
    ends = parse_story("[Rex] X-ray dog", "[NC] , XL box, #, Xmas tree X ,").panels[0]  # only spaces and commas go
    assert (ends.prompt, ends.caption) == ("XL box", "Xmas tree X")


def test_story_errors_are_whole_sentences():
    assert _error(parse_characters, "[Bob] a man\nAnn a woman") == (
        "character line 2: 'Ann a woman' is not '[Name] description' (e.g. '[Bob] a man with red hair, green jacket')")
    assert _error(parse_characters, "[NC] nobody") == (
        "character line 1: [NC] is reserved for panels without a character")
    assert _error(parse_characters, "[Bob] a\n[Bob] b") == "character line 2: [Bob] is described twice"
    assert _error(parse_story, "", "[Carl] runs") == (
        "panel line 1: [Carl] is not a described character (described: none, and [NC] for no character)")
    assert _error(parse_story, "[Bob] a\n[Ann] b", "[Bob] x\n[Carl] runs") == (
        "panel line 2: [Carl] is not a described character (described: [Bob], [Ann], and [NC] for no character)")
    assert _error(parse_story, "[Bob] a", "[NC] [Bob] walks") == (
        "panel line 1: [NC] cannot share a panel with a character")
    assert _error(parse_story, "[Bob] a", "[Bob] x\n[NC] #caption") == "panel line 2: '[NC] #caption' has no prompt text"
    assert _error(parse_story, "[Bob] a", " \n") == (
        "the story has no panels; write one line per panel, e.g. '[Bob] wakes up in the morning'")
    # Bob is in every panel but alone in one: 2 references are needed
    assert _error(parse_story, "[Bob] a", "[Bob] walks", references=2) == (
        "character [Bob] needs 2 panel(s) that show it alone to sample as references (it has 1); add panels, or "
        "lower id_length")
    assert _error(parse_story, "[Bob] a\n[Ann] b", "[Bob] meets [Ann]", references=1) == (
        "character [Bob] needs 1 panel(s) that show it alone to sample as references (it has 0); add panels, or "
        "lower id_length")


def test_pad_tokens_repeats_to_the_lcm_of_the_lengths():
    a, b = torch.arange(77.0).reshape(1, 77, 1), torch.arange(154.0).reshape(1, 154, 1)
    pa, pb = pad_tokens([a, b])
    assert pa.shape == pb.shape == (1, 154, 1)
    assert torch.equal(pa[0, 77:], a[0]) and torch.equal(pb, b)


def test_comic_page_geometry_and_pixels():
    panels = torch.stack([torch.full((20, 30, 3), value) for value in (0.2, 0.4, 0.6, 0.8, 1.0)])
    page = comic_page(panels, [], columns=2, margin=5, border=0)
    # 3 rows of 20 px, 2 columns of 30 px, margins of 5 px, no captions
    assert page.shape == (1, 3 * 20 + 4 * 5, 2 * 30 + 3 * 5, 3)
    for index, value in enumerate((0.2, 0.4, 0.6, 0.8, 1.0)):
        x, y = panel_origin(index, 2, 30, 20, 5, "left_to_right")
        assert (x, y) == (5 + (index % 2) * 35, 5 + (index // 2) * 25)
        assert torch.allclose(page[0, y:y + 20, x:x + 30], torch.tensor(round(value * 255) / 255), atol=1e-6)
    manga = comic_page(panels, [], columns=2, margin=5, border=0, order="right_to_left")
    assert torch.allclose(manga[0, 5:25, 40:70], torch.tensor(round(0.2 * 255) / 255), atol=1e-6)
    captioned = comic_page(panels[:2], ["one", "two words"], columns=2, margin=6, caption_size=10)
    # 'two words' wraps onto two lines of 12 px in a 30 px wide panel, plus half a margin above them
    assert captioned.shape[1] == 20 + 2 * int(10 * 1.25) + 3 + 2 * 6
    caption_band = captioned[0, 6 + 20 + 3:6 + 20 + 3 + 12, 6:36]
    assert (caption_band < 0.5).any(), "caption text is drawn in black under the panel"


def _dark_rows(region: torch.Tensor) -> list[int]:
    return sorted({int(r) for r in (region.min(-1).values < 0.5).nonzero()[:, 0]})


def test_comic_page_borders_margins_defaults_and_clamping_by_hand():
    """One 20 x 30 panel at the defaults (3 columns -> 1 used, margin 16, border 2, white page, caption
    size 20): the page is 30 + 2*16 wide; the border is the 2-pixel black ring just outside the panel
    (x, y = 16, 16: columns 14-15 and 46-47, rows 14-15 and 36-37), the pixel outside it and the margins
    white; values outside [0, 1] clamp to 0 and 255."""
    panel = torch.full((1, 20, 30, 3), 0.5)
    panel[0, 0, 0] = torch.tensor([1.5, -0.5, 1.0])
    page = comic_page(panel, [])[0]
    assert page.shape == (20 + 2 * 16, 30 + 2 * 16, 3)
    black, white = torch.zeros(3), torch.ones(3)
    ring = torch.zeros(page.shape[:2], dtype=torch.bool)
    ring[14:38, 14:48] = True
    ring[16:36, 16:46] = False
    assert torch.equal(page[ring], black.expand(int(ring.sum()), 3))
    outside = torch.ones(page.shape[:2], dtype=torch.bool)
    outside[14:38, 14:48] = False
    assert torch.equal(page[outside], white.expand(int(outside.sum()), 3))
    assert page[16, 16].tolist() == [1.0, 0.0, 1.0]  # clamped
    assert torch.allclose(page[17:36, 17:46], torch.tensor(128 / 255))
    assert comic_page(torch.zeros(0, 20, 30, 3), []).shape == (1, 16, 30 + 2 * 16, 3)  # no panels: a bare margin


def test_comic_page_caption_lines_font_size_and_colour_by_hand():
    """Caption size 20 (the default): lines 25 px apart starting half a margin (8 px) under the panel,
    drawn in pure black with the size-20 font (glyphs over 12 px tall; Pillow's size-10 default is not)."""
    from PIL import Image, ImageDraw, ImageFont

    panel = torch.full((1, 40, 80, 3), 0.5)
    font = ImageFont.load_default(size=20)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    assert probe.textlength("Hg Hg", font=font) <= 80 < probe.textlength("Hg Hg Hg", font=font)
    page = comic_page(panel, ["Hg Hg Hg"], border=0)[0]  # wraps after "Hg Hg" at size 20
    assert page.shape[0] == 16 + 40 + 2 * 25 + 8 + 16
    band = page[16 + 40:, 16:96]
    rows = _dark_rows(band)
    assert rows[0] >= 8 and rows[-1] < 8 + 2 * 25
    first = [r for r in rows if r < 8 + 25]
    second = [r for r in rows if r >= 8 + 25]
    assert first and second and first[-1] - first[0] > 12 and second[-1] - second[0] > 12
    assert float(band.min()) == 0.0 and all(float(band[..., c].min()) == 0.0 for c in range(3))


def test_wrap_fits_lines_to_the_width_by_pillows_measure():
    from PIL import Image, ImageDraw, ImageFont

    from animatediff_suite.motion_modules.comic_page import wrap

    font = ImageFont.load_default(size=20)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = probe.textlength("aa aa", font=font)  # exactly fits
    assert wrap("aa aa aa", font, width, probe) == ["aa aa", "aa"]
    assert wrap("aa aa aa", font, width - 1, probe) == ["aa", "aa", "aa"]
    assert wrap("ab cd ef gh", font, probe.textlength("ab cd ef gh", font=font), probe) == ["ab cd ef gh"]
    assert wrap("abcdefghijklmnop x", font, 10, probe) == ["abcdefghijklmnop", "x"]  # a long word alone


def test_right_to_left_mirrors_every_column():
    assert [panel_origin(i, 3, 30, 20, 5, "right_to_left") for i in range(4)] == [(75, 5), (40, 5), (5, 5), (75, 30)]
    with pytest.raises(ValueError, match=r"unknown reading order 'up'; expected one of \['left_to_right', "
                                         r"'right_to_left'\]"):
        panel_origin(0, 3, 30, 20, 5, "up")


def test_rate_and_block_parsers_edges_and_whole_error_sentences():
    assert parse_rates("32: 0.5; 16: 0.6") == ((16, 0.6), (32, 0.5))
    assert parse_rates("8: 0, 64: 1") == ((8, 0.0), (64, 1.0))
    assert _error(parse_rates, "32: 1.5") == (
        "sampling rate override '32: 1.5' is not 'DOWNSCALE: RATE' with DOWNSCALE one of 8, 16, 32, 64 and RATE in "
        "[0, 1] (e.g. '32: 0.5, 16: 0.5')")
    assert parse_blocks("output, input 3") == (("output", None), ("input", (3,)))
    assert parse_blocks("input 3 - 5") == (("input", (3, 4, 5)),)
    assert parse_blocks("input 4-4, middle") == (("input", (4,)), ("middle", None))
    assert parse_blocks("input 3, input 5") == (("input", (3, 5)),)
    assert parse_blocks("output, output 3") == (("output", None),)  # the whole block stays whole
    assert _error(parse_blocks, "outputs 3") == (
        "block selection item 'outputs 3': 'outputs' is not one of ['input', 'middle', 'output'] (write e.g. "
        "'output', 'all', or 'output 3-5, input 7')")
    assert _error(parse_blocks, "input 5-3") == (
        "block selection item 'input 5-3': '5-3' is not a block number or a range like '3-5'")
    assert _error(parse_blocks, " , ") == (
        "block selection is empty; write 'output' (the paper's choice), 'all', or a list such as 'output 3-5, input 7'")


def test_full_attention_steps_keep_every_token_unless_the_rate_is_zero():
    """keep(): in a FULL step every token of a reference is kept when its resolution's rate is above 0, none
    at rate 0; in a SAMPLED step the draw is the seeded Bernoulli(rate) draw itself."""
    options = ConsistencyOptions(rate=0.5, rate_by_scale=((32, 0.0),), seed=3)
    assert bool(options.keep(1, "l", [0, 1], 40, FULL, 16).all())
    assert not bool(options.keep(1, "l", [0, 1], 40, FULL, 32).any())
    sampled = options.keep(1, "l", [0, 1], 40, SAMPLED, 16)
    expected = torch.stack([torch.rand(40, generator=torch.Generator().manual_seed(stable_seed(3, 1, "l", image)))
                            < 0.5 for image in (0, 1)])
    assert torch.equal(sampled, expected) and 0 < int(sampled.sum()) < 80


def test_reference_bank_cap_copies_and_freezing():
    """A bank capped at exactly one entry's bytes takes it and refuses the next with the figures; stored
    tensors are copies (changing the caller's tensor later does not reach the bank), offloaded or not;
    a frozen bank refuses more."""
    kv = (torch.ones(2 ** 16), torch.ones(2 ** 16))  # 2 x 256 KiB = 0.5 MiB
    for offload in (False, True):
        bank = ReferenceBank(limit_bytes=2 ** 19, offload=offload)
        bank.store("Bob", 1.5, "l", 0, kv)
        kv[0].add_(1)
        assert float(bank.lookup(["Bob"], 1.5, "l", 0)[0].max()) == 1.0
        kv[0].sub_(1)
        with pytest.raises(MemoryError) as error:
            bank.store("Bob", 1.0, "l", 0, kv)
        assert str(error.value) == "the reference bank would grow past its cap of 0 MiB (holding 0.5 MiB at sigma 1)"
    big = ReferenceBank(limit_bytes=3 * 2 ** 20)
    for sigma in (3.0, 2.0):
        big.store("Bob", sigma, "l", 0, kv)
    with pytest.raises(MemoryError) as error:
        big.store("Bob", 1.25, "l", 0, (torch.ones(2 ** 19), torch.ones(2 ** 19)))
    assert str(error.value) == "the reference bank would grow past its cap of 3 MiB (holding 1.0 MiB at sigma 1.25)"
    big.frozen = True
    assert _error(big.store, "Bob", 0.5, "l", 0, None) == (
        "this reference bank is complete; sample new references to make another")


def test_reference_bank_lists_its_steps_and_describes_itself():
    bank = ReferenceBank()
    assert repr(bank) == "ReferenceBank(characters=[], steps=0, 0.0 MiB)"
    kv = (torch.ones(2 ** 16), torch.ones(2 ** 16))  # 0.5 MiB
    bank.store("Bob", 2.5, "l", 0, kv)
    bank.store("Ann", 0.5, "l", 0, kv)
    bank.store("Bob", 0.5, "l", 1, None)
    assert bank.sigmas() == [0.5, 2.5]
    assert repr(bank) == "ReferenceBank(characters=['Ann', 'Bob'], steps=2, 1.0 MiB)"


def test_schedule_boundaries_and_the_mode_coin_worked_by_hand():
    """Full attention for round(steps / 10) steps (at least 1): 15 steps -> 2, 25 -> 2 (2.5 rounds to even);
    then SAMPLED when the coin is below 0.7 before 40% of the steps and below 0.9 from there (step 4 of 10
    is not before 40%); the coin of (seed, step, layer) is torch.rand from stable_seed(seed, "mode", step,
    layer), so every step/layer's mode follows from it."""
    from animatediff_suite.motion_modules.consistent_attention import paper_schedule

    assert [paper_schedule(s, 15, 0.0) for s in range(3)] == [FULL, FULL, SAMPLED]
    assert [paper_schedule(s, 25, 0.0) for s in range(3)] == [FULL, FULL, SAMPLED]
    assert paper_schedule(3, 10, 0.8) == PLAIN and paper_schedule(4, 10, 0.8) == SAMPLED
    assert paper_schedule(3, 10, 0.7) == PLAIN and paper_schedule(9, 10, 0.9) == PLAIN
    options = ConsistencyOptions(seed=11)
    seen = set()
    for step in range(2, 20):
        for layer in ("input_4", "output_7"):
            coin = float(torch.rand(1, generator=torch.Generator().manual_seed(stable_seed(11, "mode", step, layer))))
            expected = SAMPLED if coin < (0.7 if step < 8 else 0.9) else PLAIN
            assert options.mode(step, 20, layer) == expected, (step, layer)
            seen.add(expected)
    assert seen == {SAMPLED, PLAIN}
    assert draw_tokens((1, 2), 5, 1.0).tolist() == [True] * 5 and draw_tokens((1, 2), 5, 0.0).tolist() == [False] * 5
    assert draw_tokens((1, 2), 5, 1.0).dtype == torch.bool
    # blake2b(repr(parts), 8 bytes), little-endian, >> 1 (computed outside this code): the same draws in every
    # process and release, so a saved workflow samples the same tokens
    assert stable_seed(0, "mode", 3, "output_7") == 4382819142421333131 and stable_seed(5) == 5588046532071376745
    with pytest.raises(ValueError) as error:
        ConsistencyOptions(references=-1)
    assert str(error.value) == "references must be 0 or more, not -1"
    assert ConsistencyOptions(references=0, rate=1.0).references == 0


def test_one_kept_token_is_attended_to():
    """A source that keeps a single token still adds it (the shortcut to plain attention is for none)."""
    q, k, v = qkv(b=3, d=6, seed=9)
    keep = torch.zeros(3, 6, dtype=torch.bool)
    keep[0, 4] = True
    sources = [[], [0], [0]]
    expected = naive(q, k, v, 2, keep, sources)
    for form in (consistent_attention, consistent_attention_masked):
        assert torch.allclose(form(q, k, v, 2, keep, sources), expected, atol=1e-10, rtol=0)
    assert not torch.allclose(expected[1], naive(q, k, v, 2, keep, [[], [], []])[1], atol=1e-3)


def test_both_forms_compute_on_the_inputs_device():
    """``meta`` stands in for a GPU: the draw's masks (made on the CPU) and a CPU bank follow q, k, v.
    Every token is kept, so boolean indexing on ``meta`` may take all of them as its shape."""
    import torch.fx.experimental._config as fx_config

    q, k, v = (torch.zeros(3, 6, 16, device="meta") for _ in range(3))
    keep = torch.ones(3, 6, dtype=torch.bool)
    bank = (torch.zeros(5, 16, dtype=torch.float64), torch.zeros(5, 16, dtype=torch.float64))
    with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        for form in (consistent_attention, consistent_attention_masked):
            for with_bank in (None, bank):
                out = form(q, k, v, 2, keep, [[], [0], [0, 1]], bank=with_bank)
                assert out.device.type == "meta" and out.dtype == torch.float32


def test_options_form_error_is_a_whole_sentence():
    with pytest.raises(ValueError) as error:
        ConsistencyOptions(form="grid")
    assert str(error.value) == "unknown consistent attention form 'grid'; expected one of ['indices', 'mask']"


def test_bank_keeps_tensors_on_their_device_unless_it_offloads():
    """By default a stored entry stays where it was computed (a copy); ``offload`` copies it to the CPU,
    which a ``meta`` tensor (standing in for a GPU one) cannot be."""
    kv = (torch.zeros(2, 4, device="meta"), torch.zeros(2, 4, device="meta"))
    bank = ReferenceBank()
    bank.store("Bob", 1.0, "l", 0, kv)
    assert [t.device.type for t in bank.lookup(["Bob"], 1.0, "l", 0)] == ["meta", "meta"]
    with pytest.raises(NotImplementedError):
        ReferenceBank(offload=True).store("Bob", 1.0, "l", 0, kv)


def test_bank_lookup_defaults_small_sigmas_and_missing_layers():
    bank = ReferenceBank()
    for sigma, value in ((0.5, 1.0), (0.1, 2.0), (0.0, 3.0)):
        bank.store("Bob", sigma, "l", 0, (torch.full((1, 2), value), torch.full((1, 2), value)))
    bank.store("Bob", 0.1, "l", 0, (torch.full((1, 2), 9.0), torch.full((1, 2), 9.0)))  # a second visit
    # nearest by log-sigma below 1 too, sigma 0 taken as 1e-8; the first visit unless told
    assert bank.lookup(["Bob"], 0.12, "l", 0)[0][0, 0].item() == 2.0
    assert bank.lookup(["Bob"], 0.4, "l", 0)[0][0, 0].item() == 1.0
    assert bank.lookup(["Bob"], 0.0, "l", 0)[0][0, 0].item() == 3.0
    assert bank.lookup(["Bob"], 1e-7, "l", 0)[0][0, 0].item() == 3.0  # log distance 2.3 to 1e-8, 13.8 to 0.1
    assert bank.lookup(["Bob"], 0.1, "other layer", 0) is None
    assert bank.lookup(["Bob"], 0.1, "l", 1) is None
    with pytest.raises(KeyError) as error:
        bank.lookup(["Bob", "Eve"], 0.1, "l", 0)
    assert error.value.args == ("Eve",)


def test_story_text_is_tidied_of_stray_spaces_and_commas():
    from animatediff_suite.motion_modules.story import _tidy

    assert _tidy(" , a  man ,  walks !  ,") == "a man, walks!"
    assert _tidy("rain ,") == "rain"


def test_comic_page_has_three_columns_unless_told():
    panels = torch.rand(4, 8, 8, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(comic_page(panels, []), comic_page(panels, [], columns=3))
    assert comic_page(panels, [], margin=4, border=0).shape == (1, 2 * 8 + 3 * 4, 3 * 8 + 4 * 4, 3)


def test_captions_start_half_a_margin_rounded_down_under_the_panel():
    """The caption's first line is drawn margin // 2 pixels under its panel: the same place for margins 14
    and 15 (7), one pixel lower for 16 (8), and at 5 for 11."""
    panel = torch.full((1, 40, 80, 3), 0.5)

    def ink_rows(margin):
        page = comic_page(panel, ["Hg"], margin=margin, border=0)[0]
        return [r for r in _dark_rows(page[margin + 40:, margin:margin + 80])]

    fourteen, fifteen, sixteen, eleven = (ink_rows(m) for m in (14, 15, 16, 11))
    assert fourteen and fifteen == fourteen
    assert sixteen == [r + 1 for r in fourteen] and eleven == [r - 2 for r in fourteen]
