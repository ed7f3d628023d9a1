"""Shared pieces of the in-process ComfyUI tests: the tiny models and conditioning, sampling helpers,
and the block-by-block reference forward built from the core."""

from __future__ import annotations

import asyncio
import contextlib

import torch
import torch.nn.functional as F
from einops import rearrange

FRAMES = 16


def make_env() -> dict:
    """Modules and tiny models shared by the tests of one file (needs ComfyUI imported)."""
    import comfy.model_management as mm
    import comfy.sample
    import nodes

    from animatediff_suite.nodes import beta_schedules, demo, injection, motion_nodes

    clip = demo.tiny_clip(0)
    cond = nodes.CLIPTextEncode().encode(clip, "a cat walking")[0]
    negative = nodes.CLIPTextEncode().encode(clip, "blurry")[0]
    return dict(mm=mm, nodes=nodes, sample=comfy.sample, demo=demo, injection=injection, beta_schedules=beta_schedules,
                motion_nodes=motion_nodes, cond=cond, negative=negative)


def ksample(env, model, cfg=7.0, steps=2, seed=5, frames=FRAMES, sampler="euler", callback=None,
            positive=None):
    latent = {"samples": torch.zeros(frames, 4, 8, 8)}
    if callback is None:
        return env["nodes"].common_ksampler(model, seed, steps, cfg, sampler, "normal", positive or env["cond"],
                                            env["negative"], latent)[0]["samples"]
    noise = env["sample"].prepare_noise(latent["samples"], seed)
    return env["sample"].sample(model, noise, steps, cfg, sampler, "normal", positive or env["cond"],
                                env["negative"], latent["samples"], callback=callback, disable_pbar=True, seed=seed)


def motion(env, version="v3", seed=0, zero_proj_out=False):
    loaded = env["demo"].tiny_motion_patcher(seed, version)
    if zero_proj_out:
        for _, module in loaded.patcher.model.named_temporal_modules():
            torch.nn.init.zeros_(module.temporal_transformer.proj_out.weight)
            torch.nn.init.zeros_(module.temporal_transformer.proj_out.bias)
    return loaded


def apply(env, model, loaded, schedule="use existing", **kwargs):
    schedule = env["beta_schedules"].resolve_schedule(schedule, loaded.spec)
    return env["injection"].apply_motion(model, loaded, schedule=schedule, **kwargs)


def reference_unet(unet, motion_model, x, timesteps, context, frames, spanning=False, y=None, windows=None,
                   control=None):
    """UNet forward walked block by block, calling the core's temporal modules where the original
    AnimateDiff puts them (REFERENCE §1): after each down/up layer, before Upsample, mid after attn.
    ``control``: (skip residuals, first to last; mid residual), added as diffusers' UNet adds a
    ControlNet's ``down_block_additional_residuals`` and ``mid_block_additional_residual``."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import Upsample, forward_timestep_embed
    from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

    modules = {name: (lambda h, frames, m=m: m(h, frames, 1.0, windows))
               for name, m in motion_model.named_temporal_modules()}
    layers = 2
    emb = unet.time_embed(timestep_embedding(timesteps, unet.model_channels).to(x.dtype))
    if y is not None:
        emb = emb + unet.label_emb(y)

    def run(seq, h, output_shape=None):
        return forward_timestep_embed(list(seq), h, emb, context, {}, output_shape)

    with frame_spanning_resnet_norms(unet, frames) if spanning else contextlib.nullcontext():
        h, skips = x, []
        for index, block in enumerate(unet.input_blocks):
            h = run(block, h)
            level, j = divmod(index - 1, layers + 1)
            if index and j < layers:
                h = modules[f"down_blocks.{level}.motion_modules.{j}"](h, frames)
            skips.append(h)
        mid = list(unet.middle_block)
        h = run(mid[:-1], h)
        if "mid_block.motion_modules.0" in modules:
            h = modules["mid_block.motion_modules.0"](h, frames)
        h = run(mid[-1:], h)
        if control is not None:
            h = h + control[1]
            skips = [skip + residual for skip, residual in zip(skips, control[0], strict=True)]
        for index, block in enumerate(unet.output_blocks):
            h = torch.cat([h, skips.pop()], dim=1)
            shape = skips[-1].shape if skips else None
            level, j = divmod(index, layers + 1)
            module = modules[f"up_blocks.{level}.motion_modules.{j}"]
            seq = list(block)
            if isinstance(seq[-1], Upsample):
                h = run(seq[-1:], module(run(seq[:-1], h), frames), shape)
            else:
                h = module(run(seq, h), frames)
        return unet.out(h)


@contextlib.contextmanager
def frame_spanning_resnet_norms(unet, frames):
    """Temporarily give every ResBlock GroupNorm and out.0 statistics over (c/g, f, h, w): the
    original v1 semantics, written directly as a 5D group norm."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    norms = [m.in_layers[0] for m in unet.modules() if isinstance(m, ResBlock)]
    norms += [m.out_layers[0] for m in unet.modules() if isinstance(m, ResBlock)] + [unet.out[0]]

    def spanning(norm):
        def forward(x):
            y = F.group_norm(rearrange(x, "(b f) c h w -> b c f h w", f=frames), norm.num_groups,
                             norm.weight, norm.bias, norm.eps)
            return rearrange(y, "b c f h w -> (b f) c h w")
        return forward

    for norm in norms:
        norm.forward = spanning(norm)
    try:
        yield
    finally:
        for norm in norms:
            del norm.forward


def sample_with_noise(env, model, noise, positive, negative, cfg=7.0, steps=1):
    latent = torch.zeros_like(noise)
    return env["sample"].sample(model, noise, steps, cfg, "euler", "normal", positive, negative, latent,
                                disable_pbar=True)


def eps_of(model, noise):
    """The UNet output behind a one-step euler result from ``noise`` at sigma_max: (x - x0) / sigma.
    Comparing these keeps tolerances on the UNet's scale whatever sigma_max is."""
    sampling = model.get_model_object("model_sampling")
    sigma, scale = sampling.sigma_max, model.model.latent_format.scale_factor
    x = sampling.noise_scaling(sigma, noise, torch.zeros_like(noise), max_denoise=True)
    return lambda out: (x - out * scale) / sigma


class SamplerSpy:
    """A SAMPLER_SAMPLE wrapper recording each pass's noise and sigmas, and its result (in the model's
    latent space, before process_latent_out)."""

    def __init__(self, model):
        import comfy.patcher_extension

        self.passes, self.outputs = [], []
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, "test.spy", self)

    def __call__(self, executor, guider, sigmas, extra_args, callback, noise, *args, **kwargs):
        self.passes.append((noise.clone(), sigmas.clone()))
        result = executor(guider, sigmas, extra_args, callback, noise, *args, **kwargs)
        self.outputs.append(result.clone())
        return result


# comfy_extras image nodes the examples use, written out (importing comfy_extras in this process pulls in
# ComfyUI's server module, whose `utils` import the in-process path setup shadows with comfy/utils.py)
EXTRA_IMAGE_NODES = {
    "ImageFromBatch": lambda image, batch_index, length: (image[batch_index:batch_index + length].clone(),),
    "RepeatImageBatch": lambda image, amount: (image.repeat((amount, 1, 1, 1)),),
}


def run_in_process(graph: dict, node_id: str, output: int = 0):
    """Output ``output`` of node ``node_id`` of an API-format graph, computed in this process by calling
    the node classes (the pack's and ComfyUI's stock ones; EXTRA_IMAGE_NODES) on their inputs in dependency
    order, under ``torch.inference_mode`` as ComfyUI's executor runs them; no executor, server or cache."""
    import nodes
    from comfy_api.latest import io

    from animatediff_suite.nodes import AnimateDiffSuiteExtension

    classes = dict(nodes.NODE_CLASS_MAPPINGS)
    classes.update({node.define_schema().node_id: node
                    for node in asyncio.run(AnimateDiffSuiteExtension().get_node_list())})
    values: dict[str, tuple] = {}

    def value(key: str) -> tuple:
        if key not in values:
            node = graph[key]
            inputs = {name: value(link[0])[link[1]] if isinstance(link, list) else link
                      for name, link in node["inputs"].items()}
            if node["class_type"] in EXTRA_IMAGE_NODES:
                values[key] = EXTRA_IMAGE_NODES[node["class_type"]](**inputs)
                return values[key]
            cls = classes[node["class_type"]]
            if issubclass(cls, io.ComfyNode):
                values[key] = tuple(cls.execute(**inputs).result)
            else:
                values[key] = tuple(getattr(cls(), cls.FUNCTION)(**inputs))
        return values[key]

    with torch.inference_mode():
        return value(node_id)[output]


@contextlib.contextmanager
def progress_reports():
    """Every ComfyUI progress update as (value, total, preview), with Latent2RGB previews switched on."""
    import comfy.utils
    from comfy.cli_args import LatentPreviewMethod, args

    reports = []
    hook, method = comfy.utils.PROGRESS_BAR_HOOK, args.preview_method
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None:
                                             reports.append((value, total, preview)))
    args.preview_method = LatentPreviewMethod.Latent2RGB
    try:
        yield reports
    finally:
        comfy.utils.set_progress_bar_global_hook(hook)
        args.preview_method = method


def assert_counts_up(reports, total: int, preview_size: tuple[int, int] | None = None):
    """One update per step, 1..total out of ``total``, each with a JPEG preview of ``preview_size`` when given;
    where ComfyUI throttles updates (newer releases), a rising bar that ends full."""
    from animatediff_suite.nodes import comfy_compat

    values = [(value, of) for value, of, _ in reports]
    if comfy_compat.progress_is_throttled():
        assert [v for v, _ in values] == sorted(v for v, _ in values) and values[-1] == (total, total), values
    else:
        assert values == [(value, total) for value in range(1, total + 1)]
    for _, _, preview in reports if preview_size else ():
        assert preview[0] == "JPEG" and preview[1].size == preview_size, preview


class ValueReads:
    """Counts reads of a tensor's value into Python (``aten._local_scalar_dense``: ``float()``, ``bool()``,
    ``item()``...) while ``mode`` is entered, calling ``on_read`` at each; on a GPU each read waits for all
    the work queued before it."""

    def __init__(self, on_read=None):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default:
                    counter.count += 1
                    if on_read is not None:
                        on_read()
                return func(*args, **(kwargs or {}))

        self.count, self.mode = 0, Mode()


def reads_per_step(run) -> float:
    """Value reads per sampling step of ``run(steps)``: (reads of 4 steps - reads of 2) / 2, so what happens
    once per sampling (input checks) cancels."""
    counts = []
    for steps in (4, 2):
        counter = ValueReads()
        with counter.mode:
            run(steps)
        counts.append(counter.count)
    return (counts[0] - counts[1]) / 2


class DeviceReads:
    """Counts reads into Python of values that would live on the GPU, on the CPU: the inputs of each UNet
    call (latents, timesteps, conditioning, the call's ``sigmas`` and ``sample_sigmas``) are marked when the
    call starts, and so is every tensor an op makes from a marked one; a read (``aten._local_scalar_dense``)
    of a marked tensor counts. Reads of tensors built on the host (masks from Python lists, generator draws)
    do not. Install with ``wrap(patcher)`` (a DIFFUSION_MODEL wrapper); ``calls`` counts the UNet calls."""

    def __init__(self):
        import weakref

        from torch.utils import _pytree
        from torch.utils._python_dispatch import TorchDispatchMode

        self.count, self.calls, self.marked = 0, 0, {}
        counter = self

        def tensors(tree):
            return [t for t in _pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]

        def mark(tensor):
            counter.marked[id(tensor)] = weakref.ref(tensor)

        def is_marked(tensor):
            ref = counter.marked.get(id(tensor))
            return ref is not None and ref() is tensor

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                derived = any(is_marked(t) for t in tensors((args, kwargs)))
                if derived and func is torch.ops.aten._local_scalar_dense.default:
                    counter.count += 1
                out = func(*args, **kwargs)
                if derived:
                    for tensor in tensors(out):
                        mark(tensor)
                return out

        self._mark, self._mode = mark, Mode

    def wrap(self, patcher) -> None:
        import comfy.patcher_extension

        def wrapper(executor, x, timesteps, context, *args, **kwargs):
            options = kwargs.get("transformer_options") or (args[2] if len(args) > 2 else {})
            for value in (x, timesteps, context, options.get("sigmas"), options.get("sample_sigmas")):
                if isinstance(value, torch.Tensor):
                    self._mark(value)
            self.calls += 1
            with self._mode():
                return executor(x, timesteps, context, *args, **kwargs)

        patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test.device_reads", wrapper)
