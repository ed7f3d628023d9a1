"""ComfyUI tier, in-process: Consistent Self-Attention as a patch on real ComfyUI UNets (tiny models),
Story Sampler's bank against the in-batch patch, memory that stays flat as stories grow, clean removal.
"""

from __future__ import annotations

import math

import pytest
import torch

from comfy_helpers import apply, assert_counts_up, ksample, motion, progress_reports

pytestmark = pytest.mark.comfyui

STORY_CHARACTERS = "[Bob] a man with red hair\n[Ann] a woman with a yellow umbrella"


@pytest.fixture(scope="module")
def story(env):
    from animatediff_suite.nodes import story_nodes

    env["story_nodes"] = story_nodes
    return story_nodes


def patched(story, model, **kwargs):
    values = dict(id_length=2, sampling_rate=0.5, schedule="deterministic", blocks="output", seed=3)
    values.update(kwargs)
    return story.ConsistentSelfAttention.execute(model, **values).result[0]


def prompts(env, story, panels: str, id_length=2):
    out = story.StoryPrompts.execute(env["demo"].tiny_clip(0), STORY_CHARACTERS, panels, "ink", id_length).result
    return out[0], out[1]


def sample_panels(env, model, positive, panels, cfg=7.0, steps=3, seed=11, sampler="euler"):
    latent = {"samples": torch.zeros(panels, 4, 8, 8)}
    return env["nodes"].common_ksampler(model, seed, steps, cfg, sampler, "normal", positive, env["negative"],
                                        latent)[0]["samples"]


def story_sample(story, model, plot, positive, env, panels_per_batch=1, steps=3, seed=11, cfg=7.0, sampler="euler",
                 **kwargs):
    values = dict(seed=seed, steps=steps, cfg=cfg, sampler_name=sampler, scheduler="normal", denoise=1.0,
                  panels_per_batch=panels_per_batch, offload_bank=True, bank_limit_mb=0)
    values.update(kwargs)
    latent, bank = story.StorySampler.execute(model, plot, positive, env["negative"],
                                              {"samples": torch.zeros(1, 4, 8, 8)}, **values).result
    return latent["samples"], bank


def assert_same(got, expected, relative=1e-5):
    """Equal up to float32 rounding, which differs with the UNet's batch size (the latents here are ~100)."""
    torch.testing.assert_close(got, expected, atol=relative * float(expected.abs().max()), rtol=0)


FOUR_PANELS = "[Bob] wakes up\n[Bob] drinks tea\n[Bob] runs to the bus\n[Bob] reads a book"


@pytest.mark.parametrize("family", ["SD1.5", "SDXL"])
def test_rate_zero_is_bit_identical_to_the_plain_model(env, story, family):
    model = env["demo"].tiny_model(0, family)
    positive, _ = prompts(env, story, FOUR_PANELS)
    plain = sample_panels(env, model, positive, 4)
    assert torch.equal(sample_panels(env, patched(story, model, sampling_rate=0.0, blocks="all"), positive, 4), plain)
    consistent = sample_panels(env, patched(story, model, sampling_rate=0.5), positive, 4)
    assert (consistent - plain)[2:].abs().max() > 1e-3


def test_patch_call_equals_the_per_image_loop_and_keeps_cond_and_uncond_apart(env, story):
    """Call the registered attn1 replacement as ComfyUI does: 2 chunks (uncond, cond) of 3 panels."""
    from animatediff_suite.motion_modules.consistent_attention import SAMPLED, ConsistencyOptions

    model = patched(story, env["demo"].tiny_model(0), id_length=2, sampling_rate=0.5, schedule="sampled_only")
    replace = model.model_options["transformer_options"]["patches_replace"]["attn1"]
    layer = ("output", 4, 0)
    patch = replace[layer]
    heads, dim_head, tokens = 2, 8, 16
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, tokens, heads * dim_head, generator=gen, dtype=torch.float64) for _ in range(3))
    sigmas = torch.tensor([14.6, 7.0, 0.0])
    extra = {"n_heads": heads, "dim_head": dim_head, "cond_or_uncond": [1, 0], "sigmas": sigmas[1:2].expand(6),
             "sample_sigmas": sigmas, "block": layer[:2], "block_index": 0, "original_shape": [6, 4, 8, 8]}
    out = patch(q, k, v, extra)
    keep = ConsistencyOptions(rate=0.5, references=2, schedule="sampled_only", seed=3).keep(
        1, layer, [0, 1, 2], tokens, SAMPLED, 16)  # 16 tokens on an 8x8 latent: downscale 2 -> 1/16 of the image
    assert 0 < keep.sum() < keep.numel()
    for chunk in (0, 1):
        for i, sources in enumerate([(1,), (0,), (0, 1)]):
            row = chunk * 3 + i
            own = list(range(chunk * 3, chunk * 3 + 3))
            keys = torch.cat([k[row]] + [k[own[j]][keep[j]] for j in sources])
            values = torch.cat([v[row]] + [v[own[j]][keep[j]] for j in sources])
            for h in range(heads):
                cols = slice(h * dim_head, (h + 1) * dim_head)
                weights = torch.softmax(q[row][:, cols] @ keys[:, cols].T / math.sqrt(dim_head), dim=-1)
                torch.testing.assert_close(out[row][:, cols], weights @ values[:, cols], atol=1e-10, rtol=0)
    k2, v2 = k.clone(), v.clone()
    k2[:3] += 1.0
    v2[:3] *= 2.0  # change only the uncond chunk
    again = patch(q, k2, v2, extra)
    assert torch.equal(again[3:], out[3:])


def test_the_only_reference_is_unchanged_and_later_panels_never_influence_others(env, story):
    model = env["demo"].tiny_model(0)
    positive, _ = prompts(env, story, FOUR_PANELS)
    other, _ = prompts(env, story, "[Bob] wakes up\n[Bob] drinks tea\n[Bob] runs to the bus\n[Bob] climbs a tree")
    plain = sample_panels(env, model, positive, 4)
    one_reference = sample_panels(env, patched(story, model, id_length=1, sampling_rate=1.0), positive, 4)
    assert_same(one_reference[0], plain[0])
    assert (one_reference[1:] - plain[1:]).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    consistent = patched(story, model)
    first, second = sample_panels(env, consistent, positive, 4), sample_panels(env, consistent, other, 4)
    assert_same(second[:3], first[:3])
    assert (second[3] - first[3]).abs().max() > 1e-3


@pytest.mark.parametrize("through", ["KSampler", "Story Sampler"])
def test_the_patch_reads_the_sigma_and_step_once_per_unet_call_not_per_layer(env, story, through):
    """Every patched attention layer needs the call's sigma (the bank's key) and step (the schedule); each read
    of a GPU tensor's value waits for all queued work, and both were read in every layer before (2 x 16
    layers with blocks "all"). Now twice per UNet call, whatever the layers; counted on the CPU among the
    values that would be on the GPU (comfy_helpers.DeviceReads)."""
    from comfy_helpers import DeviceReads

    model = patched(story, env["demo"].tiny_model(0), blocks="all")
    reads = DeviceReads()
    reads.wrap(model)
    positive, plot = prompts(env, story, "[Bob] wakes up\n[Bob] drinks tea\n[Bob] runs to the bus")
    if through == "KSampler":
        sample_panels(env, model, positive, 3, steps=2)
    else:
        story_sample(story, model, plot, positive, env, steps=2)
    assert reads.calls >= 2 and reads.count == 2 * reads.calls, (reads.count, reads.calls)


@pytest.mark.parametrize("family, cfg, schedule, sampler", [
    ("SD1.5", 7.0, "paper", "euler"), ("SD1.5", 7.0, "deterministic", "heun"), ("SDXL", 1.0, "paper", "euler")])
def test_story_sampler_through_the_bank_equals_the_in_batch_patch(env, story, family, cfg, schedule, sampler):
    """References written to the bank and panels read against it give what one batch with the references
    in front gives (same draws, same keys in the same order), with cfg or without, with a two-call-per-step
    sampler, on SD1.5 and SDXL; batching the read panels changes nothing."""
    model = patched(story, env["demo"].tiny_model(0, family), schedule=schedule)
    panels = "[Bob] wakes up\n[Bob] drinks tea\n[Bob] runs to the bus\n[Bob] reads a book\n[Bob] sleeps"
    positive, plot = prompts(env, story, panels)
    in_batch = sample_panels(env, model, positive, 5, steps=10, cfg=cfg, sampler=sampler)
    one_by_one, bank = story_sample(story, model, plot, positive, env, steps=10, cfg=cfg, sampler=sampler)
    assert_same(one_by_one, in_batch)
    batched, _ = story_sample(story, model, plot, positive, env, panels_per_batch=3, steps=10, cfg=cfg,
                              sampler=sampler)
    assert_same(batched, one_by_one)
    assert sorted(bank.entries) == ["Bob"] and len(bank.sigmas()) >= 10 and bank.frozen
    plain = sample_panels(env, env["demo"].tiny_model(0, family), positive, 5, steps=10, cfg=cfg, sampler=sampler)
    assert (one_by_one - plain)[2:].abs().amax(dim=(1, 2, 3)).min() > 1e-3


def test_mask_form_equals_the_index_form_in_the_unet(env, story):
    model = env["demo"].tiny_model(0)
    positive, _ = prompts(env, story, FOUR_PANELS)
    indexed = sample_panels(env, patched(story, model, attention_form="indices", blocks="all"), positive, 4)
    masked = sample_panels(env, patched(story, model, attention_form="mask", blocks="all"), positive, 4)
    # the forms add up the same terms in another order; over the sampling steps that float32 difference
    # grows to ~2e-5 of the latents' size on one thread (1e-5 on two): a wrong mask is off by far more
    assert_same(masked, indexed, relative=1e-4)


class BatchSpy:
    """A DIFFUSION_MODEL wrapper recording the batch of every UNet call."""

    def __init__(self, model):
        import comfy.patcher_extension

        self.rows = []
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test.batch_spy", self)

    def __call__(self, executor, x, *args, **kwargs):
        self.rows.append(x.shape[0])
        return executor(x, *args, **kwargs)


def test_bank_and_unet_batch_stay_flat_as_the_story_grows(env, story):
    model = patched(story, env["demo"].tiny_model(0))
    sizes = {}
    for count in (4, 8):
        lines = "\n".join(["[Bob] wakes up", "[Bob] drinks tea"] + [f"[Bob] scene {i}" for i in range(count - 2)])
        positive, plot = prompts(env, story, lines)
        spied = model.clone()
        spy = BatchSpy(spied)
        _, bank = story_sample(story, spied, plot, positive, env, steps=3)
        sizes[count] = bank.nbytes, max(spy.rows), len(spy.rows)
    (bank4, rows4, calls4), (bank8, rows8, calls8) = sizes[4], sizes[8]
    assert bank4 == bank8 > 0
    assert rows4 == rows8 == 2 * 2  # cond + uncond of the 2 references; read passes carry 2 x 1 rows
    assert calls8 - calls4 == 4 * 3  # 4 more panels x 3 steps, one UNet call per step each


def test_each_character_keeps_its_bank_and_a_shared_panel_reads_both(env, story):
    model = patched(story, env["demo"].tiny_model(0))
    lines = "[Bob] wakes up\n[Ann] opens an umbrella\n[NC] a rainy street\n[Bob] meets [Ann]"
    positive, plot = prompts(env, story, lines, id_length=1)
    assert plot.references == (("Bob", (0,)), ("Ann", (1,)))
    both, bank = story_sample(story, model, plot, positive, env)
    assert sorted(bank.entries) == ["Ann", "Bob"]
    plain = sample_panels(env, env["demo"].tiny_model(0), positive, 4)
    # every panel alone: references have no other reference of their character, [NC] reads no bank
    for panel in (0, 1, 2):
        assert_same(both[panel], plain[panel])
    assert (both[3] - plain[3]).abs().max() > 1e-3
    layer, sigma = ("output", 4, 0), bank.sigmas()[-1]
    joined = bank.lookup(["Bob", "Ann"], sigma, layer, 0)[0]
    assert joined.shape[0] == bank.lookup(["Bob"], sigma, layer, 0)[0].shape[0] + \
        bank.lookup(["Ann"], sigma, layer, 0)[0].shape[0]


def test_bank_cap_and_unpatched_model_give_clear_errors(env, story):
    from animatediff_suite.motion_modules import MotionModelError

    base = env["demo"].tiny_model(0)
    positive, plot = prompts(env, story, FOUR_PANELS)
    with pytest.raises(MotionModelError, match="needs a model patched by Consistent Self-Attention"):
        story_sample(story, base, plot, positive, env)
    model = patched(story, base, sampling_rate=1.0)
    options_before = repr(model.model_options)
    with pytest.raises(MotionModelError, match=r"bank would grow past its cap of 1 MiB.*raise bank_limit_mb"):
        story_sample(story, model, plot, positive, env, bank_limit_mb=1, steps=200)
    assert repr(model.model_options) == options_before
    with pytest.raises(MotionModelError, match="batch of 3 but the story has 4 panels"):
        story.StorySampler.execute(model, plot, positive, env["negative"], {"samples": torch.zeros(3, 4, 8, 8)},
                                   seed=0, steps=1, cfg=1.0, sampler_name="euler", scheduler="normal", denoise=1.0,
                                   panels_per_batch=1, offload_bank=False, bank_limit_mb=0)


@pytest.mark.parametrize("panels_per_batch, passes", [(1, 3), (2, 2)])
def test_the_bar_counts_every_step_of_every_pass(env, story, panels_per_batch, passes):
    """FOUR_PANELS with two references: one write pass (panels 0 and 1), then panels 2 and 3 read one at a time
    (three passes) or together (two); two steps each. Previews are of the 8x8 latent."""
    positive, plot = prompts(env, story, FOUR_PANELS)
    with progress_reports() as reports:
        story_sample(story, patched(story, env["demo"].tiny_model(0)), plot, positive, env, panels_per_batch, steps=2)
    assert_counts_up(reports, 2 * passes, (8, 8))


def test_plain_model_is_bit_identical_after_runs_errors_and_interrupts(env, story):
    model = env["demo"].tiny_model(0)
    positive, plot = prompts(env, story, FOUR_PANELS)
    never_patched = sample_panels(env, model, positive, 4)
    consistent = patched(story, model)
    sample_panels(env, consistent, positive, 4)
    story_sample(story, consistent, plot, positive, env)
    assert torch.equal(sample_panels(env, model, positive, 4), never_patched)

    import comfy.utils

    def server_hook(value, total, preview, **_):  # what ComfyUI's server does on every progress update
        if value == 2:
            env["mm"].interrupt_current_processing(True)
        env["mm"].throw_exception_if_processing_interrupted()

    comfy.utils.set_progress_bar_global_hook(server_hook)
    try:
        with pytest.raises(env["mm"].InterruptProcessingException):
            story_sample(story, consistent, plot, positive, env)  # interrupted inside the first pass
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        env["mm"].interrupt_current_processing(False)
    with pytest.raises(Exception):
        story_sample(story, patched(story, model, sampling_rate=1.0), plot, positive, env, bank_limit_mb=1,
                     steps=200)
    assert torch.equal(sample_panels(env, model, positive, 4), never_patched)
    assert "patches_replace" not in model.model_options.get("transformer_options", {})


def test_frames_of_a_clip_and_context_windows(env, story):
    """In a clip the first frames are the references; context windows need the bank, which every
    window then reads."""
    from animatediff_suite.motion_modules import ContextOptions, MotionModelError

    model = env["demo"].tiny_model(0)
    loaded = motion(env, "v2")
    positive, plot = prompts(env, story, "[Bob] wakes up\n[Bob] drinks tea")
    _, bank = story_sample(story, patched(story, model), plot, positive, env, steps=2)
    windows = ContextOptions(context_length=8, context_overlap=4)
    animated = apply(env, patched(story, model), loaded, context=windows)
    with pytest.raises(MotionModelError, match="holds none of the reference frames"):
        ksample(env, animated)
    reading = patched(story, model, bank=bank, character="Bob")
    calls = []
    original = type(bank).lookup

    def counting(self, *args):
        calls.append(args[1])
        return original(self, *args)

    type(bank).lookup = counting
    try:
        clip = ksample(env, apply(env, reading, loaded, context=windows), steps=2)
    finally:
        type(bank).lookup = original
    without = ksample(env, apply(env, model, loaded, context=windows), steps=2)
    assert (clip - without).abs().max() > 1e-3
    layers = 9 * 1  # output blocks 3-11 of the tiny UNet, one transformer each
    windows_per_step = 3  # 16 frames in windows of 8 overlapping by 4
    assert len(calls) == 2 * windows_per_step * layers * 2  # steps x windows x layers x (cond, uncond)
    whole = ksample(env, apply(env, patched(story, model), loaded), steps=2)
    assert (whole - ksample(env, apply(env, model, loaded), steps=2))[2:].abs().max() > 1e-3


def test_queue_time_checks_name_the_value(story):
    check = story.ConsistentSelfAttention.validate_inputs
    assert "'up' is not one of" in check(blocks="up")
    assert "'40: 0.5' is not 'DOWNSCALE: RATE'" in check(blocks="output", rate_overrides="40: 0.5")
    assert "sampling_rate = 1.5 is above the maximum" in check(sampling_rate=1.5)
    prompts_check = story.StoryPrompts.validate_inputs
    message = prompts_check(characters="[Bob] a man", panels="[Bob] walks\n[Eve] waves", style="", id_length=1)
    assert "panel line 2: [Eve] is not a described character" in message
    assert prompts_check(characters="[Bob] a man", panels="[Bob] walks", style="", id_length=1) is True


def test_another_packs_attention_replacement_at_the_same_layer_is_kept_inside(env, story):
    """A replacement registered before ours (here a scaled attention, as another pack might add) still
    computes every attention of its layer, ours included; our rate 0 leaves its result unchanged."""
    import comfy.ldm.modules.attention as attention

    calls = []

    def sharper(q, k, v, extra_options):
        calls.append(k.shape[1])
        return attention.optimized_attention(q * 1.5, k, v, extra_options["n_heads"])

    model = env["demo"].tiny_model(0)
    theirs = model.clone()
    theirs.set_model_attn1_replace(sharper, "output", 4, 0)
    positive, _ = prompts(env, story, FOUR_PANELS)
    alone = sample_panels(env, theirs, positive, 4)
    own = calls[0]  # the layer's own tokens
    assert set(calls) == {own}
    calls.clear()
    assert torch.equal(sample_panels(env, patched(story, theirs, sampling_rate=0.0), positive, 4), alone)
    calls.clear()
    sample_panels(env, patched(story, theirs, sampling_rate=1.0, schedule="sampled_only"), positive, 4)
    assert max(calls) > own  # it attended over the references' tokens too
