"""ComfyUI tier, in-process: Story To Video on the tiny models. Each transition is what the stock KSampler
gives on a latent whose first and last frames are the encoded panels held by a noise mask (built here),
with the prompts travelling from panel to panel (formula written here); the keyframes of the joined video
are the panels through the VAE; bad inputs are refused by name."""

from __future__ import annotations

import pytest
import torch

from ads_helpers import raised_message
from comfy_helpers import apply, assert_counts_up, motion, progress_reports

pytestmark = pytest.mark.comfyui
FRAMES = 6


@pytest.fixture(scope="module")
def story(env):
    from animatediff_suite.nodes import sparsectrl
    from animatediff_suite.nodes.story_nodes import StoryToVideo

    gen = torch.Generator().manual_seed(21)
    panels = torch.rand(3, 64, 64, 3, generator=gen)
    model = apply(env, env["demo"].tiny_model(0), motion(env, "v3", seed=1))
    clip = env["demo"].tiny_clip(0)
    prompts = [env["nodes"].CLIPTextEncode().encode(clip, text)[0] for text in ("a cat", "a cat jumping", "a dog")]
    per_panel = [[torch.cat([p[0][0] for p in prompts]),
                  {"pooled_output": torch.cat([p[0][1]["pooled_output"] for p in prompts])}]]
    return dict(node=StoryToVideo, panels=panels, model=model, vae=env["demo"].tiny_vae(0), per_panel=per_panel,
                prompts=prompts, sparsectrl=sparsectrl.wrap_sparsectrl(env["demo"].tiny_sparsectrl(3, "rgb"), "rgb"),
                apply_sparsectrl=sparsectrl.apply_sparsectrl)


def run(story, transition="keyframes_only", positive=None, panels=None, **extra):
    out = story["node"].execute(story["model"], story["vae"], positive or story["per_panel"], story["negative"],
                                story["panels"] if panels is None else panels, transition, FRAMES, 7, 3, 6.0, "euler",
                                "normal", 1.0, **extra)
    return out.result


@pytest.fixture(autouse=True)
def negative(env, story):
    story["negative"] = env["negative"]


def stock_transition(env, story, pair: int, positive) -> torch.Tensor:
    """Transition ``pair`` the stock way: VAEEncode, a latent with the two panels on its ends, SetLatentNoiseMask
    (0 on the ends), KSampler with seed 7 + pair, VAEDecode."""
    nodes = env["nodes"]
    encoded = nodes.VAEEncode().encode(story["vae"], story["panels"][pair:pair + 2])[0]["samples"]
    latent = torch.zeros(FRAMES, *encoded.shape[1:])
    latent[0], latent[-1] = encoded[0], encoded[1]
    mask = torch.ones(FRAMES, 64, 64)
    mask[0] = mask[-1] = 0
    masked = nodes.SetLatentNoiseMask().set_mask({"samples": latent}, mask)[0]
    samples = nodes.common_ksampler(story["model"], 7 + pair, 3, 6.0, "euler", "normal", positive, story["negative"],
                                    masked)[0]
    return nodes.VAEDecode().decode(story["vae"], samples)[0]


def travelled(story, pair: int):
    """Per-frame prompts of transition ``pair``: (1 - w) panel pair + w panel pair + 1, w = f / (FRAMES - 1)."""
    (a, b) = story["prompts"][pair][0], story["prompts"][pair + 1][0]
    w = torch.arange(FRAMES, dtype=torch.float32).view(-1, 1, 1) / (FRAMES - 1)
    return [[a[0] * (1 - w) + b[0] * w, {"pooled_output": a[1]["pooled_output"] * (1 - w[:, 0]) +
                                         b[1]["pooled_output"] * w[:, 0]}]]


def test_each_transition_is_the_stock_masked_ksampler_and_keyframes_are_the_panels(env, story):
    video, keyframes = run(story)
    assert keyframes == "0, 5, 10" and video.shape == (2 * (FRAMES - 1) + 1, 64, 64, 3)
    expected = torch.cat([stock_transition(env, story, 0, travelled(story, 0)),
                          stock_transition(env, story, 1, travelled(story, 1))[1:]])
    # measured 8.5e-5: the travel weights' rounding (linspace there, arange / 5 here) through 3 steps at cfg 6
    torch.testing.assert_close(video, expected, atol=2e-4, rtol=0)
    # the keyframes are the panels through the VAE (encode, decode), whatever was sampled around them
    round_trip = env["nodes"].VAEDecode().decode(story["vae"], env["nodes"].VAEEncode().encode(story["vae"],
                                                                                            story["panels"])[0])[0]
    torch.testing.assert_close(video[[0, 5, 10]], round_trip, atol=1e-5, rtol=0)
    assert (video[1:5] - round_trip[0]).abs().max() > 1e-2  # the frames between are sampled, not copies


def test_one_prompt_for_all_and_sparsectrl_on_the_two_panels(env, story):
    """A single prompt is used as it is; SparseCtrl sits on frames 0 and FRAMES - 1 with the pair's panels."""
    video, _ = run(story, "sparsectrl", positive=env["cond"], sparsectrl=story["sparsectrl"])
    parts = []
    for pair in range(2):
        positive, negative = story["apply_sparsectrl"](env["cond"], story["negative"], story["sparsectrl"],
                                                       story["panels"][pair:pair + 2], (0, FRAMES - 1), 1.0, 0.0, 1.0,
                                                       story["vae"])
        saved, story["negative"] = story["negative"], negative
        try:
            parts.append(stock_transition(env, story, pair, positive)[pair > 0:])
        finally:
            story["negative"] = saved
    # pixels in [0, 1]: float32 rounding of the two batchings (up to 1.3e-5 measured on an AMD EPYC), far below
    # one 8-bit level (3.9e-3)
    torch.testing.assert_close(video, torch.cat(parts), atol=1e-4, rtol=0)
    plain, _ = run(story, positive=env["cond"])
    assert (video - plain).abs().max() > 1e-3  # SparseCtrl changed the in-between frames


def test_the_bar_counts_every_step_of_every_transition(env, story):
    """Three panels: two transitions of three steps each. Previews are of the 8x8 latent."""
    with progress_reports() as reports:
        run(story)
    assert_counts_up(reports, 2 * 3, (8, 8))


def test_bad_inputs_are_refused_by_name(env, story):
    def message(**kwargs):
        return raised_message(lambda: run(story, **kwargs))

    _, height, width, channels = story["panels"].shape
    assert message(panels=story["panels"][:1]) == (
        "Story To Video: panels should be an IMAGE batch of at least 2 panels in story order; got shape "
        f"(1, {height}, {width}, {channels})")
    assert message(panels=story["panels"][:, :, :60]) == (
        f"Story To Video: the panels are 60x{height}; the video is made at the panels' size, which must be a "
        "multiple of 8 on both sides (Story Sampler's panels are); scale them")
    assert message(transition="sparsectrl") == (
        "Story To Video: transition 'sparsectrl' needs a SparseCtrl: connect Load SparseCtrl to the sparsectrl input")
    assert message(transition="semantic_motion_predictor") == (
        "Story To Video: transition 'semantic_motion_predictor' needs motion_predictor (Load Semantic Motion "
        "Predictor) and clip_vision (the encoder it was trained with)")


def test_predictor_transition_is_apply_semantic_motion_predictor_on_the_pair(env, story):
    from animatediff_suite.motion_modules.motion_predictor import MotionPredictor, PredictorSpec
    from animatediff_suite.nodes import motion_predictor_patch as patch
    from animatediff_suite.nodes.motion_predictor_nodes import ApplyMotionPredictor

    layers = tuple(sorted(patch.cross_attention_layers(story["model"]).items()))
    predictor = MotionPredictor(PredictorSpec(24, layers, hidden=16, depth=1, heads=4, tokens=2, token_dim=8))
    env["demo"].seeded_fill_(predictor, 9, gain=0.5)
    loaded, vision = patch.wrap_predictor(predictor.eval().requires_grad_(False), "tiny"), env["demo"].tiny_clip_vision()
    video, _ = run(story, "semantic_motion_predictor", positive=env["cond"], motion_predictor=loaded,
                   clip_vision=vision)
    parts, model = [], story["model"]
    for pair in range(2):
        story["model"] = ApplyMotionPredictor.execute(model, loaded, vision, story["panels"][pair:pair + 1],
                                                      story["panels"][pair + 1:pair + 2], 1.0).result[0]
        try:
            parts.append(stock_transition(env, story, pair, env["cond"])[pair > 0:])
        finally:
            story["model"] = model
    # measured 1.8e-5: the node encodes the 3 panels in one VAE batch, the reference 2 (batch-dependent rounding)
    torch.testing.assert_close(video, torch.cat(parts), atol=1e-4, rtol=0)
