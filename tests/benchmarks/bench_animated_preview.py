"""Cost of the animated sampling preview: time per step without it and with it, side by side in one run.

In-process ComfyUI on the CPU: the tiny demo UNet + v2 motion model, 16 frames, cfg 7, euler, Latent2RGB
previews (what ``--preview-method latent2rgb`` gives). "stock" is ComfyUI's own per-step callback
(``latent_preview.prepare_callback``: one still per step); "animated" adds this pack's player, whose
frames are encoded the way the server encodes them (scaled to ``--preview-size`` 512, JPEG q95), at
8 and 30 frames per second. Runs alternate (stock, animated, ...) so drift hits both alike.

    COMFYUI_PATH=/path/to/ComfyUI python tests/benchmarks/bench_animated_preview.py [--steps 6 --repeats 3]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default="64,256", help="image sides (latents are 1/8)")
    args = parser.parse_args()

    import ads_package
    import comfy_env

    ads_package.register()
    comfy_env.import_comfyui(comfy_env.comfyui_path())
    import torch
    from PIL import ImageOps

    import comfy.sample
    import latent_preview
    import nodes
    from comfy.cli_args import LatentPreviewMethod
    from comfy.cli_args import args as comfy_args

    from animatediff_suite.nodes import animated_preview, beta_schedules, demo, injection
    from animatediff_suite.nodes.comfy_compat import PreviewSender

    comfy_args.preview_method = LatentPreviewMethod.Latent2RGB
    sent = []

    def encode(image):  # what PromptServer.send_image_with_metadata does with each frame
        buffer = io.BytesIO()
        ImageOps.contain(image, (512, 512)).save(buffer, format="JPEG", quality=95)
        sent.append(len(buffer.getvalue()))

    animated_preview.preview_sender = lambda max_size: PreviewSender("bench", encode)
    clip = demo.tiny_clip(0)
    positive = nodes.CLIPTextEncode().encode(clip, "a fox running")[0]
    negative = nodes.CLIPTextEncode().encode(clip, "blurry")[0]
    loaded = demo.tiny_motion_patcher(0, "v2")
    model = injection.apply_motion(demo.tiny_model(0), loaded,
                                   schedule=beta_schedules.resolve_schedule("auto", loaded.spec))

    def run(side: int, fps: int | None) -> float:
        """Seconds per step of one sampling; fps None: the stock callback only."""
        if fps is None:
            animated_preview.SETTINGS.set("bench", animated_preview.PreviewSetting(enabled=False))
        else:
            animated_preview.SETTINGS.set("bench", animated_preview.PreviewSetting(True, fps))
        latent = torch.zeros(16, 4, side // 8, side // 8)
        noise = comfy.sample.prepare_noise(latent, 1)
        callback = latent_preview.prepare_callback(model, args.steps)
        started = time.perf_counter()
        comfy.sample.sample(model, noise, args.steps, 7.0, "euler", "normal", positive, negative, latent,
                            callback=callback, disable_pbar=True, seed=1)
        return (time.perf_counter() - started) / args.steps

    modes = [("stock", None), ("animated 8 fps", 8), ("animated 30 fps", 30)]
    print(f"{'image':>7} {'mode':<16} {'ms/step':>9} {'vs stock':>9} {'frames sent/step':>17}")
    for side in (int(s) for s in args.sizes.split(",")):
        run(side, None)  # warm-up
        times = {name: [] for name, _ in modes}
        frames = {name: 0 for name, _ in modes}
        for _ in range(args.repeats):
            for name, fps in modes:
                before = len(sent)
                times[name].append(run(side, fps))
                frames[name] += len(sent) - before
        stock = statistics.median(times["stock"])
        for name, _ in modes:
            per_step = statistics.median(times[name])
            print(f"{side:>5}px {name:<16} {per_step * 1000:>9.1f} {per_step / stock:>8.2f}x "
                  f"{frames[name] / (args.repeats * args.steps):>17.1f}")


if __name__ == "__main__":
    main()
