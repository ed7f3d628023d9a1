"""The example graphs (API format) and their conversion to and from ComfyUI's UI format.

    python tests/tools/workflows.py        # rewrites example_workflows/*.json from the graphs below

UI files are generated from the API graphs with the node definitions a running ComfyUI serves at
/object_info, so both formats always describe the same graph (a ComfyUI-tier test checks it).
"""

from __future__ import annotations

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
NEGATIVE = "worst quality, low quality, blurry, watermark, text"


def _save(prefix: str, images: str = "8") -> dict:
    return {
        "9": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": [images, 0], "filename_prefix": prefix, "fps": 8.0,
                                                           "lossless": False, "quality": 90, "method": "default"}},
        "10": {"class_type": "CreateVideo", "inputs": {"images": [images, 0], "fps": 8.0}},
        "11": {"class_type": "SaveVideo", "inputs": {"video": ["10", 0], "filename_prefix": prefix, "format": "mp4",
                                                     "codec": "h264"}},
    }


def _txt2vid(checkpoint: str, motion: str, prompt: str, prefix: str, size: int = 512, cfg: float = 8.0,
             apply_extra: dict | None = None, steps: int = 25) -> dict:
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "ADS_LoadMotionModel", "inputs": {"model_name": motion}},
        "3": {"class_type": "ADS_ApplyMotionModel", "inputs": {
            "model": ["1", 0], "motion_model": ["2", 0], "domain_adapter": "none", "domain_adapter_strength": 1.0,
            "motion_scale": 1.0, "start_percent": 0.0, "end_percent": 1.0, "beta_schedule": "auto",
            "frames_per_clip": 0, "norm_semantics": "original", **(apply_extra or {})}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["1", 1]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": ["1", 1]}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 16}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["3", 0], "seed": 42, "steps": steps, "cfg": cfg, "sampler_name": "ddim",
            "scheduler": "ddim_uniform", "positive": ["4", 0], "negative": ["5", 0], "latent_image": ["6", 0],
            "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
    }
    graph.update(_save(prefix))
    return graph


def _with_motion_lora() -> dict:
    graph = _txt2vid("v1-5-pruned-emaonly.safetensors", "mm_sd_v15_v2.ckpt",
                     "a lighthouse on a cliff at sunset, waves, masterpiece", "AnimateDiff/motionlora", cfg=7.5)
    graph["12"] = {"class_type": "ADS_LoadMotionLora", "inputs": {"lora_name": "v2_lora_ZoomIn.ckpt", "strength": 0.8}}
    graph["3"]["inputs"]["motion_lora"] = ["12", 0]
    return graph


def _img2vid() -> dict:
    graph = _txt2vid("v1-5-pruned-emaonly.safetensors", "v3_sd15_mm.ckpt",
                     "a gentle breeze, flowers swaying, high quality", "AnimateDiff/img2vid", cfg=7.5,
                     apply_extra={"domain_adapter": "v3_sd15_adapter.ckpt", "domain_adapter_strength": 0.8})
    graph["6"] = {"class_type": "LoadImage", "inputs": {"image": "example.png"}}
    graph["13"] = {"class_type": "ImageScale", "inputs": {"image": ["6", 0], "upscale_method": "bilinear",
                                                          "width": 512, "height": 512, "crop": "center"}}
    graph["14"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["13", 0], "vae": ["1", 2]}}
    graph["15"] = {"class_type": "RepeatLatentBatch", "inputs": {"samples": ["14", 0], "amount": 16}}
    graph["7"]["inputs"].update(latent_image=["15", 0], denoise=0.7)
    return graph


def _sparsectrl_transition() -> dict:
    graph = _txt2vid("v1-5-pruned-emaonly.safetensors", "v3_sd15_mm.ckpt",
                     "a cozy cottage in a meadow, soft light, masterpiece", "AnimateDiff/transition", cfg=7.5,
                     apply_extra={"domain_adapter": "v3_sd15_adapter.ckpt", "domain_adapter_strength": 0.6})
    for node_id, image in (("12", "example.png"), ("13", "example_end.png")):
        graph[node_id] = {"class_type": "LoadImage", "inputs": {"image": image}}
    for node_id, source in (("14", "12"), ("15", "13")):
        graph[node_id] = {"class_type": "ImageScale", "inputs": {"image": [source, 0], "upscale_method": "bilinear",
                                                                 "width": 512, "height": 512, "crop": "center"}}
    graph["16"] = {"class_type": "ImageBatch", "inputs": {"image1": ["14", 0], "image2": ["15", 0]}}
    graph["17"] = {"class_type": "ADS_LoadSparseCtrl", "inputs": {"sparsectrl_name": "v3_sd15_sparsectrl_rgb.ckpt"}}
    graph["18"] = {"class_type": "ADS_ApplySparseCtrl", "inputs": {
        "positive": ["4", 0], "negative": ["5", 0], "sparsectrl": ["17", 0], "images": ["16", 0],
        "keyframe_indexes": "0, -1", "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0, "vae": ["1", 2]}}
    graph["7"]["inputs"].update(positive=["18", 0], negative=["18", 1])
    return graph


def _long_loop() -> dict:
    graph = _txt2vid("v1-5-pruned-emaonly.safetensors", "mm_sd_v15_v2.ckpt", "", "AnimateDiff/long_loop", cfg=7.5)
    graph["16"] = {"class_type": "ADS_ContextOptions", "inputs": {
        "context_length": 16, "context_overlap": 4, "context_stride": 1, "closed_loop": True,
        "schedule": "looped_uniform", "fuse_method": "pyramid", "noise_type": "repeated_context",
        "scope": "whole_model", "stretch_pe": False, "window_batch": 1}}
    graph["3"]["inputs"]["context_options"] = ["16", 0]
    graph["4"] = {"class_type": "ADS_PromptTravel", "inputs": {
        "clip": ["1", 1], "frames": 64, "prefix": "masterpiece, best quality", "suffix": "", "interpolation": "slerp",
        "text": "0: a forest in spring, fresh green leaves\n16: a forest in summer, lush, sunlight\n"
                "32: a forest in autumn, orange leaves falling\n48: a forest in winter, snow\n"
                "63: a forest in spring, fresh green leaves"}}
    graph["6"]["inputs"]["batch_size"] = 64
    return graph


def _two_clips() -> dict:
    """Two 16-frame clips in one 32-latent batch (frames_per_clip 16), one prompt each, saved apart."""
    graph = _txt2vid("v1-5-pruned-emaonly.safetensors", "mm_sd_v15_v2.ckpt", "", "AnimateDiff/clip_a", cfg=7.5,
                     apply_extra={"frames_per_clip": 16})
    graph["4"] = {"class_type": "ADS_PromptTravel", "inputs": {
        "clip": ["1", 1], "frames": 32, "prefix": "masterpiece, best quality", "suffix": "", "interpolation": "linear",
        "text": "0: a red fox running through snow\n15: a red fox running through snow\n"
                "16: a sailing boat on a stormy sea\n31: a sailing boat on a stormy sea"}}
    graph["6"]["inputs"]["batch_size"] = 32
    graph["16"] = {"class_type": "ImageFromBatch", "inputs": {"image": ["8", 0], "batch_index": 0, "length": 16}}
    graph["17"] = {"class_type": "ImageFromBatch", "inputs": {"image": ["8", 0], "batch_index": 16, "length": 16}}
    graph.update(_save("AnimateDiff/clip_a", images="16"))
    second = _save("AnimateDiff/clip_b", images="17")
    graph["18"], graph["19"], graph["20"] = second["9"], second["10"], second["11"]
    graph["20"]["inputs"]["video"] = ["19", 0]
    return graph


def _free_init() -> dict:
    graph = _txt2vid("v1-5-pruned-emaonly.safetensors", "mm_sd_v15_v2.ckpt",
                     "a hot air balloon over green hills, clouds drifting, masterpiece", "AnimateDiff/freeinit")
    graph["12"] = {"class_type": "ADS_FreeInit", "inputs": {
        "model": ["3", 0], "iterations": 3, "filter": "butterworth", "spatial_stop": 0.25, "temporal_stop": 0.25,
        "butterworth_order": 4, "fast_sampling": True}}
    graph["7"]["inputs"]["model"] = ["12", 0]
    return graph


def _train_and_animate(source: dict, images: list, frames_per_clip, name: str, caption: str, prompt: str,
                       prefix: str) -> dict:
    """Train a MotionLoRA from ``images`` (nodes in ``source``), then txt2vid with it in the same prompt."""
    graph = _txt2vid("v1-5-pruned-emaonly.safetensors", "mm_sd_v15_v2.ckpt", prompt, prefix, cfg=7.5)
    graph.update(source)
    graph["22"] = {"class_type": "ADS_TrainMotionLora", "inputs": {
        "model": ["1", 0], "motion_model": ["2", 0], "clip": ["1", 1], "vae": ["1", 2], "images": images,
        "caption": caption, "frames_per_clip": frames_per_clip, "name": name, "steps": 300, "learning_rate": 0.0005,
        "rank": 32, "frames": 16, "stride": 1, "width": 256, "height": 256, "seed": 0,
        "gradient_checkpointing": True, "resume": True, "strength": 1.0}}
    graph["23"] = {"class_type": "PreviewImage", "inputs": {"images": ["22", 1]}}
    graph["3"]["inputs"]["motion_lora"] = ["22", 0]
    return graph


def _train_from_clip() -> dict:
    return _train_and_animate(
        {"20": {"class_type": "LoadImage", "inputs": {"image": "example_clip.webp"}}}, ["20", 0], 0,
        "my_motion", "a ball bouncing", "a red balloon bouncing in a park, masterpiece", "AnimateDiff/trained_motion")


def _camera_from_stills() -> dict:
    return _train_and_animate(
        {"20": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
         "21": {"class_type": "ADS_CameraMotionClips", "inputs": {
             "images": ["20", 0], "motion": "zoom_in", "frames": 16, "speed": 0.02, "easing": "linear",
             "width": 256, "height": 256, "speed_jitter": 0.0, "seed": 0}}},
        ["21", 0], ["21", 1], "camera_zoom_in", "the camera zooms in",
        "a castle on a hill at dawn, masterpiece", "AnimateDiff/camera_zoom")


STORY_CHARACTERS = "[Bob] a young man with short red hair, green jacket, white shirt"
STORY_PANELS = ("[Bob] wakes up in a small bedroom, morning light #Monday morning.\n"
                "[Bob] drinks coffee in a kitchen, steam rising\n"
                "[NC] a rainy city street, umbrellas, puddles\n"
                "[Bob] runs to catch a red bus in the rain\n"
                "[Bob] sits in the bus, looking out of the window\n"
                "[Bob] arrives at an office building, smiling #Just in time.")
STORY_STYLE = "comic book style, {prompt}, graphic illustration, clean ink lines, vibrant colors"


def _consistent(model: list, seed: int = 0, rates: str = "", bank: list | None = None, character: str = "") -> dict:
    inputs = {"model": model, "id_length": 2, "sampling_rate": 0.5, "schedule": "paper", "blocks": "output",
              "seed": seed, "rate_overrides": rates, "attention_form": "indices", "character": character}
    if bank is not None:
        inputs["bank"] = bank
    return {"class_type": "ADS_ConsistentSelfAttention", "inputs": inputs}


def _story_sampler(model: list, size_node: str, steps: int, cfg: float) -> dict:
    return {"class_type": "ADS_StorySampler", "inputs": {
        "model": model, "story": ["3", 1], "positive": ["3", 0], "negative": ["4", 0], "latent_image": [size_node, 0],
        "seed": 7, "steps": steps, "cfg": cfg, "sampler_name": "ddim", "scheduler": "ddim_uniform", "denoise": 1.0,
        "panels_per_batch": 1, "offload_bank": True, "bank_limit_mb": 4096}}


def _comic_story(checkpoint: str, size: int, prefix: str, rates: str = "") -> dict:
    """Six panels of one character (2 references), sampled as a story and laid out as a page."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": _consistent(["1", 0], rates=rates),
        "3": {"class_type": "ADS_StoryPrompts", "inputs": {
            "clip": ["1", 1], "characters": STORY_CHARACTERS, "panels": STORY_PANELS, "style": STORY_STYLE,
            "id_length": 2}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE + ", deformed, extra limbs", "clip": ["1", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "6": _story_sampler(["2", 0], "5", 30, 5.0),
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": f"{prefix}/panel"}},
        "9": {"class_type": "ADS_ComicPage", "inputs": {
            "images": ["7", 0], "captions": ["3", 2], "columns": 3, "margin": 16, "caption_size": 20,
            "reading_order": "left_to_right", "border": 2}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": f"{prefix}/page"}},
    }


def _story_to_video() -> dict:
    """Three panels of one character (Story Sampler), then Story To Video: SparseCtrl transitions between them,
    sampled by the v3 motion model on the model that reads the character's bank."""
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
        "2": _consistent(["1", 0]),
        "3": {"class_type": "ADS_StoryPrompts", "inputs": {
            "clip": ["1", 1], "characters": STORY_CHARACTERS, "style": "{prompt}, photo, detailed, soft light",
            "panels": "[Bob] stands at a bus stop in the rain\n[Bob] gets on a red bus\n"
                      "[Bob] sits in the bus, looking out of the window", "id_length": 2}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": ["1", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "6": _story_sampler(["2", 0], "5", 25, 7.5),
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "Story/video_panel"}},
        "12": _consistent(["1", 0], bank=["6", 1], character="Bob"),
        "13": {"class_type": "ADS_LoadMotionModel", "inputs": {"model_name": "v3_sd15_mm.ckpt"}},
        "14": {"class_type": "ADS_ApplyMotionModel", "inputs": {
            "model": ["12", 0], "motion_model": ["13", 0], "domain_adapter": "none", "domain_adapter_strength": 1.0,
            "motion_scale": 1.0, "start_percent": 0.0, "end_percent": 1.0, "beta_schedule": "auto",
            "frames_per_clip": 0, "norm_semantics": "original"}},
        "15": {"class_type": "ADS_LoadSparseCtrl", "inputs": {"sparsectrl_name": "v3_sd15_sparsectrl_rgb.ckpt"}},
        "16": {"class_type": "ADS_StoryToVideo", "inputs": {
            "model": ["14", 0], "vae": ["1", 2], "positive": ["3", 0], "negative": ["4", 0], "panels": ["7", 0],
            "transition": "sparsectrl", "frames_per_transition": 16, "seed": 3, "steps": 20, "cfg": 7.5,
            "sampler_name": "euler", "scheduler": "normal", "strength": 1.0, "sparsectrl": ["15", 0]}},
    }
    graph.update(_save("Story/video", images="16"))
    return graph


def _consistent_clips() -> dict:
    """Two references of a character sampled as images into a bank, then two AnimateDiff clips that read it."""
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
        "2": _consistent(["1", 0]),
        "3": {"class_type": "ADS_StoryPrompts", "inputs": {
            "clip": ["1", 1], "characters": STORY_CHARACTERS, "style": "{prompt}, photo, detailed, soft light",
            "panels": "[Bob] standing in a park, full body\n[Bob] portrait, smiling, looking at the camera",
            "id_length": 2}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": ["1", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "6": _story_sampler(["2", 0], "5", 25, 7.5),
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "Story/references"}},
        "9": _consistent(["1", 0], bank=["6", 1], character="Bob"),
        "10": {"class_type": "ADS_LoadMotionModel", "inputs": {"model_name": "mm_sd_v15_v2.ckpt"}},
        "11": {"class_type": "ADS_ApplyMotionModel", "inputs": {
            "model": ["9", 0], "motion_model": ["10", 0], "domain_adapter": "none", "domain_adapter_strength": 1.0,
            "motion_scale": 1.0, "start_percent": 0.0, "end_percent": 1.0, "beta_schedule": "auto",
            "frames_per_clip": 0, "norm_semantics": "original"}},
        "12": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 16}},
    }
    prompts = ("walking through a park in autumn, leaves falling", "riding a bicycle along a river, sunny day")
    for index, prompt in enumerate(prompts):
        base = 13 + 5 * index
        name = f"Story/clip_{'ab'[index]}"
        graph.update({
            str(base): {"class_type": "CLIPTextEncode", "inputs": {
                "text": f"a young man with short red hair, green jacket, white shirt, {prompt}, detailed",
                "clip": ["1", 1]}},
            str(base + 1): {"class_type": "KSampler", "inputs": {
                "model": ["11", 0], "seed": 42 + index, "steps": 25, "cfg": 7.5, "sampler_name": "ddim",
                "scheduler": "ddim_uniform", "positive": [str(base), 0], "negative": ["4", 0],
                "latent_image": ["12", 0], "denoise": 1.0}},
            str(base + 2): {"class_type": "VAEDecode", "inputs": {"samples": [str(base + 1), 0], "vae": ["1", 2]}},
            str(base + 3): {"class_type": "SaveAnimatedWEBP", "inputs": {
                "images": [str(base + 2), 0], "filename_prefix": name, "fps": 8.0, "lossless": False, "quality": 90,
                "method": "default"}},
            str(base + 4): {"class_type": "SaveImage", "inputs": {"images": [str(base + 2), 0],
                                                                  "filename_prefix": f"{name}/frame"}},
        })
    return graph


# name -> (API graph, the model files it expects, one line of description)
EXAMPLES = {
    "txt2vid_sd15": (
        _txt2vid("v1-5-pruned-emaonly.safetensors", "mm_sd_v15_v2.ckpt",
                 "a corgi running on a beach, golden hour, masterpiece, high quality", "AnimateDiff/txt2vid"),
        {"models/checkpoints": "v1-5-pruned-emaonly.safetensors (or any SD1.5 checkpoint)",
         "models/animatediff_models": "mm_sd_v15_v2.ckpt"},
        "Text to video, SD1.5, 16 frames at 512x512, AnimateDiff v2 (DDIM 25 steps, cfg 8 as the paper)."),
    "txt2vid_motionlora": (
        _with_motion_lora(),
        {"models/checkpoints": "v1-5-pruned-emaonly.safetensors (or any SD1.5 checkpoint)",
         "models/animatediff_models": "mm_sd_v15_v2.ckpt",
         "models/animatediff_motion_lora": "v2_lora_ZoomIn.ckpt"},
        "Text to video with a camera MotionLoRA (ZoomIn at 0.8) on the v2 motion model."),
    "txt2vid_v3_domain_adapter": (
        _txt2vid("v1-5-pruned-emaonly.safetensors", "v3_sd15_mm.ckpt",
                 "a koi pond in the rain, ripples, masterpiece", "AnimateDiff/v3", cfg=7.5,
                 apply_extra={"domain_adapter": "v3_sd15_adapter.ckpt", "domain_adapter_strength": 0.8}),
        {"models/checkpoints": "v1-5-pruned-emaonly.safetensors (or any SD1.5 checkpoint)",
         "models/animatediff_models": "v3_sd15_mm.ckpt", "models/loras": "v3_sd15_adapter.ckpt"},
        "Text to video with AnimateDiff v3 and its domain adapter at 0.8."),
    "img2vid_light": (
        _img2vid(),
        {"models/checkpoints": "v1-5-pruned-emaonly.safetensors (or any SD1.5 checkpoint)",
         "models/animatediff_models": "v3_sd15_mm.ckpt", "models/loras": "v3_sd15_adapter.ckpt",
         "input": "example.png (any image)"},
        "Image to video (light): the image is encoded, repeated as the 16-frame latent batch, denoise 0.7."),
    "transition_sparsectrl_sd15": (
        _sparsectrl_transition(),
        {"models/checkpoints": "v1-5-pruned-emaonly.safetensors (or any SD1.5 checkpoint)",
         "models/animatediff_models": "v3_sd15_mm.ckpt", "models/loras": "v3_sd15_adapter.ckpt",
         "models/controlnet": "v3_sd15_sparsectrl_rgb.ckpt",
         "input": "example.png and example_end.png (the first and the last frame)"},
        "A transition between two pictures: Apply SparseCtrl (RGB) puts them on the first and the last of 16 "
        "frames, the v3 motion model with its domain adapter at 0.6 animates between them."),
    "long_loop_sd15": (
        _long_loop(),
        {"models/checkpoints": "v1-5-pruned-emaonly.safetensors (or any SD1.5 checkpoint)",
         "models/animatediff_models": "mm_sd_v15_v2.ckpt"},
        "A 64-frame looping animation: looped context windows (16 frames, overlap 4, closed loop), "
        "FreeNoise repeated noise (every 16 frames start from the same noise, so the scene stays put) and "
        "prompt travel through the seasons, back to spring on the last frame."),
    "txt2vid_freeinit": (
        _free_init(),
        {"models/checkpoints": "v1-5-pruned-emaonly.safetensors (or any SD1.5 checkpoint)",
         "models/animatediff_models": "mm_sd_v15_v2.ckpt"},
        "Text to video with FreeInit: 3 sampling passes (coarse to fine: 8, 16, 25 steps), the low "
        "frequencies of each result seeding the next, for steadier subjects and motion."),
    "two_clips_sd15": (
        _two_clips(),
        {"models/checkpoints": "v1-5-pruned-emaonly.safetensors (or any SD1.5 checkpoint)",
         "models/animatediff_models": "mm_sd_v15_v2.ckpt"},
        "Two 16-frame clips sampled in one pass: a 32-latent batch with Apply Motion Model's frames_per_clip "
        "16, one prompt per clip (Prompt Travel holding each prompt over its clip), each clip saved on its own."),
    "train_motionlora_and_animate": (
        _train_from_clip(),
        {"models/checkpoints": "v1-5-pruned-emaonly.safetensors (or any SD1.5 checkpoint)",
         "models/animatediff_models": "mm_sd_v15_v2.ckpt",
         "input": "example_clip.webp (an animated WebP or GIF of the motion, 16+ frames)"},
        "Teach the motion model a motion from one clip (Train MotionLoRA: 300 steps at 256x256, saved to "
        "models/animatediff_motion_lora/my_motion.safetensors), then animate a new prompt with it in the "
        "same prompt. The loss curve shows in the preview. Run it again with more steps to continue."),
    "camera_motionlora_from_stills": (
        _camera_from_stills(),
        {"models/checkpoints": "v1-5-pruned-emaonly.safetensors (or any SD1.5 checkpoint)",
         "models/animatediff_models": "mm_sd_v15_v2.ckpt", "input": "example.png (any image; load several "
                                                                     "for a better LoRA)"},
        "A camera MotionLoRA made from stills, as the AnimateDiff paper made its own: Camera Motion Clips "
        "turns the image into a 16-frame zoom-in clip, Train MotionLoRA learns it, and the new LoRA animates "
        "a prompt with that camera move."),
    "txt2vid_sdxl": (
        _txt2vid("sd_xl_base_1.0.safetensors", "mm_sdxl_v10_beta.ckpt",
                 "a paper boat drifting down a stream, autumn leaves, detailed", "AnimateDiff/sdxl", size=1024,
                 cfg=7.5),
        {"models/checkpoints": "sd_xl_base_1.0.safetensors (or any SDXL checkpoint)",
         "models/animatediff_models": "mm_sdxl_v10_beta.ckpt"},
        "Text to video, SDXL, 16 frames at 1024x1024 with the AnimateDiff SDXL beta motion model."),
    "comic_story_sd15": (
        _comic_story("v1-5-pruned-emaonly.safetensors", 512, "Story/sd15"),
        {"models/checkpoints": "v1-5-pruned-emaonly.safetensors (or any SD1.5 checkpoint)"},
        "A six-panel comic of one character (StoryDiffusion): Story Prompts turns the character and panel lines "
        "into per-panel prompts, Consistent Self-Attention keeps the character, Story Sampler samples the 2 "
        "reference panels first and the others one at a time against their stored tokens, and Comic Page lays "
        "the panels out with their captions (DDIM 30 steps, cfg 5 as the paper's images)."),
    "comic_story_sdxl": (
        _comic_story("sd_xl_base_1.0.safetensors", 1024, "Story/sdxl", rates="32: 0.5, 16: 0.5"),
        {"models/checkpoints": "sd_xl_base_1.0.safetensors (or any SDXL checkpoint)"},
        "The six-panel comic on SDXL at 1024x1024, with the paper's per-resolution sampling rates (sa32 and "
        "sa64 = 0.5: rate_overrides '32: 0.5, 16: 0.5')."),
    "story_to_video_sd15": (
        _story_to_video(),
        {"models/checkpoints": "v1-5-pruned-emaonly.safetensors (or any SD1.5 checkpoint)",
         "models/animatediff_models": "v3_sd15_mm.ckpt", "models/controlnet": "v3_sd15_sparsectrl_rgb.ckpt"},
        "A story as one video (StoryDiffusion): Story Sampler makes three panels of one character, Story To Video "
        "animates a 16-frame transition between each neighbouring pair with the v3 motion model, the panels held "
        "as the first and last frames and SparseCtrl (RGB) on them; the prompts travel from panel to panel and "
        "Consistent Self-Attention reads the character's bank. 31 frames, the panels at 0, 15 and 30."),
    "consistent_character_clips_sd15": (
        _consistent_clips(),
        {"models/checkpoints": "v1-5-pruned-emaonly.safetensors (or any SD1.5 checkpoint)",
         "models/animatediff_models": "mm_sd_v15_v2.ckpt"},
        "One character across two separately sampled AnimateDiff clips: Story Sampler makes 2 reference images "
        "and their token bank, Consistent Self-Attention reads the bank in every frame of both clips (each "
        "KSampler its own prompt and seed), so the clips share the character."),
}


def _inputs(info: dict) -> list[tuple[str, list, bool]]:
    order = info.get("input_order") or {k: list(v) for k, v in info["input"].items()}
    return [(name, info["input"][section][name], section == "optional")
            for section in ("required", "optional") for name in order.get(section, [])]


def _kind(spec: list) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def _extra_widgets(spec: list) -> list:
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if _kind(spec) == "INT" and options.get("control_after_generate"):
        return ["fixed"]
    if options.get("image_upload"):
        return ["image"]
    return []


def _default(spec: list):
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in options:
        return options["default"]
    return spec[0][0] if isinstance(spec[0], list) else options.get("options", [None])[0]


def _height(info: dict, sockets: int, outputs: int) -> int:
    """A node's height in the editor: its socket rows, one row per widget, more for multiline text."""
    widgets = [spec for _, spec, _ in _inputs(info) if _kind(spec) in WIDGET_TYPES]
    multiline = sum(1 for spec in widgets if len(spec) > 1 and spec[1].get("multiline"))
    rows = max(sockets, outputs) + sum(1 + len(_extra_widgets(spec)) for spec in widgets) - multiline
    # what the web extension adds: the schedule preview (context_preview.js), the info of a run
    # (animatediff_suite.js: five lines on Load Motion Model and Load SparseCtrl, two on Apply Motion Model)
    extra = {"ADS_ContextOptions": 24 + 200, "ADS_ContextScheduleImage": 200, "ADS_LoadMotionModel": 90,
             "ADS_LoadSparseCtrl": 90, "ADS_ApplyMotionModel": 44}.get(info.get("name"), 0)
    return 40 + 24 * rows + 90 * multiline + extra


def api_to_ui(graph: dict, object_info: dict, note: str) -> dict:
    """An API-format graph as a UI-format workflow (what ComfyUI's editor saves)."""
    ids = {node_id: index + 1 for index, node_id in enumerate(graph)}
    depth = {}

    def level(node_id):
        if node_id not in depth:
            parents = [v[0] for v in graph[node_id]["inputs"].values() if isinstance(v, list)]
            depth[node_id] = 1 + max((level(p) for p in parents), default=-1)
        return depth[node_id]

    nodes, links, column = [], [], {}
    for node_id, node in graph.items():
        info = object_info[node["class_type"]]
        inputs, widgets = [], []
        for name, spec, _ in _inputs(info):
            value = node["inputs"].get(name)
            if _kind(spec) in WIDGET_TYPES:
                if isinstance(value, list):  # a widget fed by a link: an input socket marked as the widget's
                    link = len(links) + 1
                    links.append([link, ids[value[0]], value[1], ids[node_id], len(inputs), _kind(spec)])
                    inputs.append({"name": name, "type": _kind(spec), "link": link, "widget": {"name": name}})
                    value = None
                widgets += [_default(spec) if value is None else value, *_extra_widgets(spec)]
                continue
            link = None
            if isinstance(value, list):
                link = len(links) + 1
                links.append([link, ids[value[0]], value[1], ids[node_id], len(inputs), _kind(spec)])
            inputs.append({"name": name, "type": _kind(spec), "link": link})
        outputs = [{"name": out_name, "type": out_type, "slot_index": slot, "links": []}
                   for slot, (out_type, out_name) in enumerate(zip(info["output"], info["output_name"]))]
        x = level(node_id)
        y = column.get(x, 0)
        height = _height(info, len(inputs), len(outputs))
        column[x] = y + height + 40
        nodes.append({"id": ids[node_id], "type": node["class_type"], "pos": [60 + 380 * x, 60 + y],
                      "size": [340, height], "flags": {}, "order": 0, "mode": 0, "inputs": inputs, "outputs": outputs,
                      "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets,
                      **({"title": node["_meta"]["title"]} if node.get("_meta", {}).get("title") else {})})
    by_id = {n["id"]: n for n in nodes}
    for link_id, origin, slot, *_ in links:
        by_id[origin]["outputs"][slot]["links"].append(link_id)
    node_ids = {number: node_id for node_id, number in ids.items()}
    for order, node in enumerate(sorted(nodes, key=lambda n: depth[node_ids[n["id"]]])):
        node["order"] = order
    note_id = len(nodes) + 1
    nodes.append({"id": note_id, "type": "Note", "pos": [60, 60 + max(column.values(), default=0)],
                  "size": [520, 200], "flags": {}, "order": len(nodes), "mode": 0, "inputs": [], "outputs": [],
                  "properties": {}, "widgets_values": [note]})
    return {"last_node_id": note_id, "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {"ds": {"scale": 0.6, "offset": [0, 0]}}, "version": 0.4}


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The inverse of ``api_to_ui`` (virtual nodes such as Note are dropped)."""
    links = {link[0]: link for link in workflow["links"]}
    graph = {}
    for node in workflow["nodes"]:
        if node["type"] not in object_info:
            continue
        info = object_info[node["type"]]
        values = list(node.get("widgets_values") or [])
        sockets = {i["name"]: i for i in node.get("inputs", [])}
        inputs = {}
        for name, spec, _ in _inputs(info):
            if _kind(spec) in WIDGET_TYPES:
                inputs[name] = values.pop(0)
                del values[:len(_extra_widgets(spec))]
                if sockets.get(name, {}).get("link") is not None:  # converted to an input and linked
                    link = links[sockets[name]["link"]]
                    inputs[name] = [str(link[1]), link[2]]
            elif sockets.get(name, {}).get("link") is not None:
                link = links[sockets[name]["link"]]
                inputs[name] = [str(link[1]), link[2]]
        graph[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return graph


def normalised(graph: dict) -> dict:
    """API graph with ids renumbered 1..n in order and optional widget defaults left as given."""
    ids = {node_id: str(index + 1) for index, node_id in enumerate(graph)}
    out = {}
    for node_id, node in graph.items():
        inputs = {k: [ids[v[0]], v[1]] if isinstance(v, list) else v for k, v in node["inputs"].items()}
        out[ids[node_id]] = {"class_type": node["class_type"], "inputs": inputs}
    return out


def note_text(name: str) -> str:
    _, files, description = EXAMPLES[name]
    lines = [description, "", "Model files this workflow expects:"]
    lines += [f"- {folder}/{file}" for folder, file in files.items()]
    return "\n".join(lines)


def write_examples(object_info: dict) -> list[str]:
    written = []
    for name, (graph, _, _) in EXAMPLES.items():
        api_path = os.path.join(ROOT, "example_workflows", "api", f"{name}.json")
        ui_path = os.path.join(ROOT, "example_workflows", f"{name}.json")
        os.makedirs(os.path.dirname(api_path), exist_ok=True)
        for path, data in ((api_path, graph), (ui_path, api_to_ui(graph, object_info, note_text(name)))):
            with open(path, "w", encoding="utf-8") as handle:
                json.dump(data, handle, indent=1)
                handle.write("\n")
            written.append(path)
    return written


def main() -> None:
    import tempfile

    runner = _load_runner()
    with tempfile.TemporaryDirectory() as workdir:
        server = runner.ComfyServer.start(runner.find_comfyui(), workdir, ["--cpu"])
        try:
            object_info = server.get("/object_info")
        finally:
            server.stop()
    for path in write_examples(object_info):
        print(os.path.relpath(path, ROOT))


def _load_runner():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ads_runner", os.path.join(ROOT, "__main__.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    main()
