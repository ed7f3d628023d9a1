"""Shared pieces of the training tests: synthetic clips in memory and files, configs, and a held-out
loss computed the test's own way (epsilon target written out, models built by the stock nodes)."""

from __future__ import annotations

import numpy as np
import torch

SIZE = 64
SMALL_PREDICTOR = {"hidden": 32, "depth": 2, "heads": 4, "tokens": 2, "token_dim": 16}
HELDOUT_STEPS = (150, 400, 650, 900)  # the noise levels of heldout_loss (indices into the model's sigmas)
# the model folders the training tests write to (besides ComfyUI's output directory)
MODEL_FOLDERS = ("animatediff_motion_lora", "animatediff_models", "loras", "animatediff_motion_predictor")


def point_folders(root: str) -> None:
    """ComfyUI's output directory and MODEL_FOLDERS under ``root``, for scripts outside pytest (the
    ``folders`` fixture does the same per test and restores them after)."""
    import os

    import folder_paths

    folder_paths.set_output_directory(os.path.join(root, "output"))
    for name in MODEL_FOLDERS:
        folder_paths.add_model_folder_path(name, os.path.join(root, name), is_default=True)
        folder_paths.filename_list_cache.pop(name, None)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``module``'s state dict, on the CPU."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def changed_keys(before: dict[str, torch.Tensor], module: torch.nn.Module) -> list[str]:
    """The keys whose values in ``module`` differ from the ``snapshot`` ``before`` (if the key sets
    differ: the keys only one of them has)."""
    after = module.state_dict()
    if before.keys() != after.keys():
        return sorted(before.keys() ^ after.keys())
    return [k for k in before if not torch.equal(before[k], after[k].detach().cpu())]


def tensors(value):
    """Every tensor in a nested state dict (dicts, lists and tuples)."""
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors(item)


def shape_clip(seed: int, frames: int = 12, size: int = SIZE) -> tuple[torch.Tensor, str]:
    """A coloured disc moving in a straight line (direction and colour from the seed), IMAGE + caption."""
    from animatediff_suite.training.synthetic import COLORS, DIRECTIONS, moving_shapes_clip

    rng = np.random.default_rng(seed)
    color = list(COLORS)[int(rng.integers(len(COLORS)))]
    direction = list(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
    dx, dy = DIRECTIONS[direction]
    travel = 3 * (frames - 1)
    start = (size / 2 - dx * travel / 2, size / 2 - dy * travel / 2)
    clip = moving_shapes_clip(frames, size, (3 * dx, 3 * dy), COLORS[color], start, radius=size / 6)
    return torch.from_numpy(clip).float() / 255, f"a {color} ball moving {direction}"


def config(mode: str, name: str = "run", steps: int = 4, sections: dict | None = None, **train):
    """A tiny in-graph config; ``sections`` adds or overrides keys of other tables (data, output, ...)."""
    from animatediff_suite.training.config import config_from_dict

    raw = {"mode": mode, "name": name, "seed": 3, "base": {"demo_seed": 0},
           "data": {"frames": 8, "stride": 1, "width": SIZE, "height": SIZE, "caption_dropout": 0.0},
           "train": {"steps": steps, "learning_rate": 1e-3, "rank": 4, **train}}
    if mode == "semantic_motion_predictor":  # a small predictor (the paper's size has 133 M parameters)
        sections = {"predictor": dict(SMALL_PREDICTOR), **(sections or {})}
    for table, values in (sections or {}).items():
        raw[table] = {**raw.get(table, {}), **values}
    return config_from_dict(raw, in_graph=True)


def base_models(mode: str):
    from animatediff_suite.nodes import demo
    from animatediff_suite.training.trainer import BaseModels

    animated = ("motion_lora", "motion_director", "motion_module", "semantic_motion_predictor")
    motion = demo.tiny_motion_patcher(0, "v2") if mode in animated else None
    vision = demo.tiny_clip_vision(0) if mode == "semantic_motion_predictor" else None
    return BaseModels(demo.tiny_model(0), demo.tiny_clip(0), demo.tiny_vae(0), motion, "demo 0", clip_vision=vision)


class _Probe:
    """A comfy Sampler that calls the guider once on the test's own x_t and sigmas."""

    def __new__(cls, xt, sigma):
        import comfy.samplers

        class Probe(comfy.samplers.Sampler):
            def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None,
                       denoise_mask=None, disable_pbar=False):
                self.denoised = model_wrap(xt, sigma, **extra_args)
                return torch.zeros_like(latent_image)

        return Probe()


def heldout_loss(model, clip, vae, clips, frames: int = 8, seed: int = 99) -> float:
    """Mean ||eps_pred - eps||^2 over ``clips`` at four fixed noise levels, through a CFGGuider (cfg 1).

    Written for epsilon models (the tiny SD1.5): x_t = x0 + sigma eps, eps_pred = (x_t - denoised) / sigma.
    """
    import comfy.samplers
    import nodes

    generator = torch.Generator().manual_seed(seed)
    sampling = model.get_model_object("model_sampling")
    losses = []
    for pixels, caption in clips:
        pixels = pixels[:frames]
        x0 = model.model.process_latent_in(vae.encode(pixels).float())
        positive = nodes.CLIPTextEncode().encode(clip, caption)[0]
        for index in HELDOUT_STEPS:
            sigma = sampling.sigmas[index].float().cpu().repeat(frames)
            eps = torch.randn(x0.shape, generator=generator)
            xt = x0 + sigma.view(-1, 1, 1, 1) * eps
            guider = comfy.samplers.CFGGuider(model)
            guider.inner_set_conds({"positive": positive})
            guider.set_cfg(1.0)
            probe = _Probe(xt.to(model.load_device), sigma.to(model.load_device))  # the GPU checks: on its device
            guider.sample(torch.zeros_like(x0), torch.zeros_like(x0), probe, torch.tensor([1.0, 0.0]), seed=0)
            eps_pred = (xt - probe.denoised.float().cpu()) / sigma.view(-1, 1, 1, 1)
            losses.append(float((eps_pred - eps).pow(2).mean()))
    return sum(losses) / len(losses)


def with_written_files(models, written: dict):
    """``models.model`` with a run's written files applied the way a user applies them: an SD LoRA through
    LoraLoader, a motion module (or the input motion model) through Load/Apply Motion Model with the
    MotionLoRA, if any, through Load MotionLoRA."""
    import os

    import nodes

    from animatediff_suite.nodes.motion_nodes import ApplyMotionModel, LoadMotionLora, LoadMotionModel

    model, motion, chain = models.model, models.motion, ()
    if "sd_lora" in written:
        model, _ = nodes.LoraLoader().load_lora(model, models.clip, os.path.basename(written["sd_lora"]), 1.0, 0.0)
    if "motion_module" in written:
        motion = LoadMotionModel.execute(os.path.basename(written["motion_module"])).result[0]
    if "motion_lora" in written:
        chain = LoadMotionLora.execute(os.path.basename(written["motion_lora"]), 1.0).result[0]
    return model if motion is None else ApplyMotionModel.execute(model, motion, motion_lora=chain).result[0]
