"""Parity with diffusers' AnimateDiff (the reference): single modules, full UNet, MotionLoRA via PEFT.

diffusers normalises across frames; the original SD1.5 modules normalise per frame. So we compare
(a) stock diffusers against our across-frame mode and (b) diffusers with every motion ``norm``
applied per frame against our per-frame mode (REFERENCE §1).
"""

import copy

import pytest
import torch
from einops import rearrange

from comfy_env import import_or_skip

diffusers = import_or_skip("diffusers")
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel  # noqa: E402

from ads_helpers import from_diffusers, motion_lora_state_dict  # noqa: E402
from animatediff_suite.motion_modules import (load_lora, load_motion_model, merged_parameters,  # noqa: E402
                                              motion_lora_deltas)

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}
LAYOUTS = {
    # name: (block channels, down types, up types, mid motion, PE length, expected version)
    "sd15_v2": ((32, 64, 64, 64), ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, True, 32, "v2"),
    "sd15_v1": ((32, 64, 64, 64), ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, False, 24, "v1"),
    "sd15_v3": ((32, 64, 64, 64), ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, False, 32, "v3"),
    "sdxl": ((32, 64, 64), ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), False, 32, "sdxl_beta"),
}


class PerFrameNorm(torch.nn.Module):
    """Wraps diffusers' motion GroupNorm (applied to b c f h w) so its statistics are per frame."""

    def __init__(self, norm):
        super().__init__()
        self.inner = norm

    def forward(self, x):
        frames = x.shape[2]
        y = self.inner(rearrange(x, "b c f h w -> (b f) c h w"))
        return rearrange(y, "(b f) c h w -> b c f h w", f=frames)


def randomize(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            elif p.ndim >= 2:
                p.copy_(noise / (p[0].numel() ** 0.5))
            else:
                p.copy_(0.1 * noise)


def build_unet(layout: str, dtype) -> UNetMotionModel:
    channels, down, up, mid, pe_length, _ = LAYOUTS[layout]
    unet2d = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=channels,
        down_block_types=down, up_block_types=up, cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=32)
    adapter = MotionAdapter(block_out_channels=channels, motion_layers_per_block=2,
                            motion_max_seq_length=pe_length, use_motion_mid_block=mid,
                            motion_num_attention_heads=8, motion_norm_num_groups=32)
    unet = UNetMotionModel.from_unet2d(unet2d, adapter)
    randomize(unet, seed=sum(map(ord, layout)))
    return unet.to(dtype).eval()


def motion_state_dict(unet) -> dict:
    return {k: v for k, v in unet.state_dict().items() if ".motion_modules." in k}


def per_frame_reference(unet):
    ref = copy.deepcopy(unet)
    for module in list(ref.modules()):
        if type(module).__name__ == "AnimateDiffTransformer3D":
            module.norm = PerFrameNorm(module.norm)
    return ref


class DiffusersSlot(torch.nn.Module):
    """Calls our module with diffusers' AnimateDiffTransformer3D signature."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, hidden_states, encoder_hidden_states=None, timestep=None, class_labels=None,
                num_frames=1, cross_attention_kwargs=None):
        return self.module(hidden_states, num_frames)


def with_our_modules(unet, ours):
    patched = copy.deepcopy(unet)
    for prefix, module in ours.named_temporal_modules():
        container, index = prefix.rsplit(".", 1)
        patched.get_submodule(container)[int(index)] = DiffusersSlot(module)
    return patched


def unet_inputs(dtype, frames=8, batch=2):
    gen = torch.Generator().manual_seed(7)
    sample = torch.randn(batch, 4, frames, 16, 16, generator=gen, dtype=torch.float64).to(dtype)
    context = torch.randn(batch, 5, 32, generator=gen, dtype=torch.float64).to(dtype)
    # diffusers 0.42's UNetMotionModel takes the text context already repeated per frame
    return sample, torch.tensor(500), context.repeat_interleave(frames, dim=0)


def run(unet, inputs):
    with torch.no_grad():
        return unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def layout(request):
    return request.param


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_loader_reads_diffusers_weights_with_right_spec(layout, dtype):
    unet = build_unet(layout, dtype)
    ours = load_motion_model(from_diffusers(motion_state_dict(unet)))
    direct = load_motion_model(motion_state_dict(unet))  # diffusers naming, loaded as is
    assert ours.spec.version == LAYOUTS[layout][5] == direct.spec.version
    assert ours.spec.has_mid_block == LAYOUTS[layout][3]
    for key, value in ours.state_dict().items():
        assert torch.equal(value, direct.state_dict()[key]), key


@pytest.mark.parametrize("norm_mode", ["across_frames", "per_frame"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_single_modules_match(layout, dtype, norm_mode):
    unet = build_unet(layout, dtype)
    reference = unet if norm_mode == "across_frames" else per_frame_reference(unet)
    ours = load_motion_model(from_diffusers(motion_state_dict(unet))).set_norm_mode(norm_mode)
    gen = torch.Generator().manual_seed(11)
    for prefix, module in ours.named_temporal_modules():
        channels = module.temporal_transformer.proj_in.in_features
        x = torch.randn(2 * 16, channels, 4, 4, generator=gen, dtype=torch.float64).to(dtype)
        with torch.no_grad():
            expected = reference.get_submodule(prefix)(x, num_frames=16)
            got = module(x, 16)
        torch.testing.assert_close(got, expected, atol=TOLERANCE[dtype], rtol=0, msg=prefix)


@pytest.mark.parametrize("norm_mode", ["across_frames", "per_frame"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_full_unet_with_motion_matches(layout, dtype, norm_mode):
    unet = build_unet(layout, dtype)
    reference = unet if norm_mode == "across_frames" else per_frame_reference(unet)
    ours = load_motion_model(from_diffusers(motion_state_dict(unet))).set_norm_mode(norm_mode)
    inputs = unet_inputs(dtype)
    expected = run(reference, inputs)
    got = run(with_our_modules(unet, ours), inputs)
    assert expected.abs().max() > 0.1  # a real signal, not a degenerate all-zero output
    torch.testing.assert_close(got, expected, atol=TOLERANCE[dtype], rtol=0)


def test_the_two_norm_modes_really_differ():
    unet = build_unet("sd15_v2", torch.float64)
    inputs = unet_inputs(torch.float64)
    assert (run(unet, inputs) - run(per_frame_reference(unet), inputs)).abs().max() > 1e-3


def to_peft(lora_sd: dict) -> dict:
    out = {}
    for key, value in lora_sd.items():
        key = (key.replace(".temporal_transformer", "").replace(".attention_blocks.0.processor", ".attn1")
               .replace(".attention_blocks.1.processor", ".attn2").replace("to_out_lora", "to_out.0_lora"))
        key = key.replace("_lora.down.weight", ".lora_A.weight").replace("_lora.up.weight", ".lora_B.weight")
        out[key] = value
    return out


def test_motion_lora_merge_equals_diffusers_peft_path():
    import_or_skip("peft")
    dtype = torch.float64
    unet = build_unet("sd15_v2", dtype)
    ours = load_motion_model(from_diffusers(motion_state_dict(unet)), dtype=dtype)
    ours.set_norm_mode("across_frames")
    lora_a = motion_lora_state_dict(ours.spec, rank=4, seed=1)
    lora_b = motion_lora_state_dict(ours.spec, rank=8, seed=2)
    strengths = [0.8, -0.5]
    before = {k: v.clone() for k, v in ours.state_dict().items()}

    deltas = motion_lora_deltas(ours, [(load_lora(lora_a), strengths[0]), (load_lora(lora_b), strengths[1])])
    merged = copy.deepcopy(ours)
    merged.load_state_dict(merged_parameters(ours, deltas), strict=False)
    for key, value in ours.state_dict().items():  # the loaded model itself is never changed
        assert torch.equal(value, before[key]), key

    reference = copy.deepcopy(unet)
    reference.load_lora_adapter({k: v.to(dtype) for k, v in to_peft(lora_a).items()}, prefix=None,
                                adapter_name="a")
    reference.load_lora_adapter({k: v.to(dtype) for k, v in to_peft(lora_b).items()}, prefix=None,
                                adapter_name="b")
    reference.set_adapters(["a", "b"], weights=strengths)
    inputs = unet_inputs(dtype)
    expected = run(reference, inputs)
    assert (expected - run(unet, inputs)).abs().max() > 1e-3  # the LoRAs really change the output
    torch.testing.assert_close(run(with_our_modules(unet, merged), inputs), expected, atol=1e-10, rtol=0)
