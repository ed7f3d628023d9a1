"""AnimateDiff-Evolved workflows written from ADE's published node names and inputs (its
``NODE_CLASS_MAPPINGS`` and ``INPUT_TYPES``), and what the importer must make of them, written
out by hand: the tests' independent expected values."""

from __future__ import annotations

# ---------------------------------------------------------------- gen2 (API format)
GEN2_API = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "dreamshaper_8.safetensors"}},
    "2": {"class_type": "ADE_LoadAnimateDiffModel", "inputs": {"model_name": "mm_sd_v15_v2.ckpt"}},
    "3": {"class_type": "ADE_AnimateDiffLoRALoader", "inputs": {"name": "v2_lora_ZoomIn.ckpt", "strength": 0.8}},
    "4": {"class_type": "ADE_MultivalDynamic", "inputs": {"float_val": 1.2}},
    "5": {"class_type": "ADE_ApplyAnimateDiffModel", "inputs": {
        "motion_model": ["2", 0], "start_percent": 0.0, "end_percent": 0.9, "motion_lora": ["3", 0],
        "scale_multival": ["4", 0]}},
    "6": {"class_type": "ADE_StandardUniformContextOptions", "inputs": {
        "context_length": 16, "context_stride": 1, "context_overlap": 4, "fuse_method": "pyramid",
        "use_on_equal_length": False, "start_percent": 0.0, "guarantee_steps": 1}},
    "7": {"class_type": "ADE_IterationOptsFreeInit", "inputs": {
        "iterations": 2, "filter": "butterworth", "d_s": 0.25, "d_t": 0.25, "n_butterworth": 4, "sigma_step": 999,
        "apply_to_1st_iter": False, "init_type": "FreeInit [model sigma]", "iter_batch_offset": 0,
        "iter_seed_offset": 1}},
    "8": {"class_type": "ADE_AnimateDiffSamplingSettings", "inputs": {
        "batch_offset": 0, "noise_type": "FreeNoise", "seed_gen": "comfy", "seed_offset": 0,
        "adapt_denoise_steps": False, "iteration_opts": ["7", 0]}},
    "9": {"class_type": "ADE_UseEvolvedSampling", "inputs": {
        "model": ["1", 0], "beta_schedule": "autoselect", "m_models": ["5", 0], "context_options": ["6", 0],
        "sample_settings": ["8", 0]}},
    "10": {"class_type": "ADE_PromptScheduling", "inputs": {
        "prompts": '"0": "a fox in snow",\n"16": "a fox \\"running\\""', "clip": ["1", 1], "print_schedule": False,
        "max_length": 20, "tensor_interp": "slerp"}},
    "11": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
    "12": {"class_type": "ADE_EmptyLatentImageLarge", "inputs": {"width": 512, "height": 512, "batch_size": 20}},
    "13": {"class_type": "KSampler", "inputs": {
        "model": ["9", 0], "seed": 1, "steps": 20, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal",
        "denoise": 1.0, "positive": ["10", 0], "negative": ["11", 0], "latent_image": ["12", 0]}},
    "14": {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["1", 2]}},
    "15": {"class_type": "SaveAnimatedWEBP", "inputs": {
        "images": ["14", 0], "filename_prefix": "ade_gen2", "fps": 8.0, "lossless": False, "quality": 80,
        "method": "default"}},
}

# ids 16 and 17 are the first free ids: the context options are made first (while FreeInit's
# settings are read), then the Apply node that FreeInit (in node 9's place) samples with.
GEN2_EXPECTED = {
    "1": GEN2_API["1"], "11": GEN2_API["11"], "13": GEN2_API["13"], "14": GEN2_API["14"], "15": GEN2_API["15"],
    "2": {"class_type": "ADS_LoadMotionModel", "inputs": {"model_name": "mm_sd_v15_v2.ckpt"}},
    "3": {"class_type": "ADS_LoadMotionLora", "inputs": {"lora_name": "v2_lora_ZoomIn.ckpt", "strength": 0.8}},
    "9": {"class_type": "ADS_FreeInit", "inputs": {
        "model": ["17", 0], "iterations": 2, "filter": "butterworth", "spatial_stop": 0.25, "temporal_stop": 0.25,
        "butterworth_order": 4, "fast_sampling": False}},
    "10": {"class_type": "ADS_PromptTravel", "inputs": {
        "clip": ["1", 1], "text": '0: a fox in snow\n16: a fox "running"', "frames": 20, "prefix": "",
        "suffix": "", "interpolation": "slerp"}},
    "12": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 20}},
    "16": {"class_type": "ADS_ContextOptions", "inputs": {
        "context_length": 16, "context_overlap": 4, "context_stride": 1, "closed_loop": False,
        "schedule": "standard_uniform", "fuse_method": "pyramid", "noise_type": "shuffle_context",
        "scope": "whole_model", "stretch_pe": False, "window_batch": 1}},
    "17": {"class_type": "ADS_ApplyMotionModel", "inputs": {
        "model": ["1", 0], "motion_model": ["2", 0], "motion_lora": ["3", 0], "context_options": ["16", 0],
        "domain_adapter": "none", "domain_adapter_strength": 1.0, "motion_scale": 1.2, "start_percent": 0.0,
        "end_percent": 0.9, "beta_schedule": "auto", "frames_per_clip": 0,
        "norm_semantics": "AnimateDiff-Evolved"}},
}
GEN2_REPORT_KINDS = [("approximate", "8"), ("approximate", "7")]

# ---------------------------------------------------------------- gen1 loader (API format)
GEN1_API = {
    "1": {"class_type": "CheckpointLoaderSimpleWithNoiseSelect", "inputs": {
        "ckpt_name": "dreamshaper_8.safetensors", "beta_schedule": "use existing",
        "use_custom_scale_factor": False, "scale_factor": 0.18215}},
    "2": {"class_type": "ADE_LoopedUniformContextOptions", "inputs": {
        "context_length": 16, "context_stride": 2, "context_overlap": 4, "closed_loop": True, "fuse_method": "flat",
        "use_on_equal_length": False, "start_percent": 0.0, "guarantee_steps": 1}},
    "3": {"class_type": "ADE_AnimateDiffLoaderGen1", "inputs": {
        "model": ["1", 0], "model_name": "mm_sd_v15_v2.ckpt", "beta_schedule": "sqrt_linear (AnimateDiff)",
        "context_options": ["2", 0], "sample_settings": ["4", 0]}},
    "4": {"class_type": "ADE_AnimateDiffSamplingSettings", "inputs": {
        "batch_offset": 0, "noise_type": "repeated_context", "seed_gen": "comfy", "seed_offset": 0}},
    "5": {"class_type": "ADE_AnimateDiffUnload", "inputs": {"model": ["3", 0]}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse, waves", "clip": ["1", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
    "8": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 24}},
    "9": {"class_type": "KSampler", "inputs": {
        "model": ["5", 0], "seed": 3, "steps": 20, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
        "denoise": 1.0, "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["8", 0]}},
    "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["1", 2]}},
    "11": {"class_type": "SaveAnimatedWEBP", "inputs": {
        "images": ["10", 0], "filename_prefix": "ade_gen1", "fps": 8.0, "lossless": False, "quality": 80,
        "method": "default"}},
}
GEN1_EXPECTED = {
    **{k: GEN1_API[k] for k in ("6", "7", "8", "10", "11")},
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "dreamshaper_8.safetensors"}},
    "3": {"class_type": "ADS_ApplyMotionModel", "inputs": {
        "model": ["1", 0], "motion_model": ["12", 0], "context_options": ["13", 0], "domain_adapter": "none",
        "domain_adapter_strength": 1.0, "motion_scale": 1.0, "start_percent": 0.0, "end_percent": 1.0,
        "beta_schedule": "sqrt_linear (AnimateDiff)", "frames_per_clip": 0,
        "norm_semantics": "AnimateDiff-Evolved"}},
    "9": {"class_type": "KSampler", "inputs": {**GEN1_API["9"]["inputs"], "model": ["3", 0]}},  # Unload passed
    "12": {"class_type": "ADS_LoadMotionModel", "inputs": {"model_name": "mm_sd_v15_v2.ckpt"}},
    "13": {"class_type": "ADS_ContextOptions", "inputs": {
        "context_length": 16, "context_overlap": 4, "context_stride": 2, "closed_loop": True,
        "schedule": "looped_uniform", "fuse_method": "flat", "noise_type": "repeated_context",
        "scope": "whole_model", "stretch_pe": False, "window_batch": 1}},
}

# ---------------------------------------------------------------- legacy loader (editor format)
# An older ADE release saved two widgets on "AnimateDiff Loader [Legacy]"; the legacy uniform
# context options save a trailing "" for their deprecation-warning widget. A reroute carries the
# context options; a primitive node drives context_length (its value is saved on the target too).
LEGACY_UI = {
    "last_node_id": 12, "last_link_id": 14, "groups": [], "config": {}, "extra": {}, "version": 0.4,
    "nodes": [
        {"id": 1, "type": "CheckpointLoaderSimple", "pos": [0, 0], "size": [300, 100], "flags": {}, "order": 0,
         "mode": 0, "inputs": [], "outputs": [
             {"name": "MODEL", "type": "MODEL", "links": [1], "slot_index": 0},
             {"name": "CLIP", "type": "CLIP", "links": [2, 3], "slot_index": 1},
             {"name": "VAE", "type": "VAE", "links": [4], "slot_index": 2}],
         "properties": {}, "widgets_values": ["dreamshaper_8.safetensors"]},
        {"id": 2, "type": "ADE_AnimateDiffUniformContextOptions", "pos": [0, 200], "size": [300, 250], "flags": {},
         "order": 1, "mode": 0,
         "inputs": [{"name": "prev_context", "type": "CONTEXT_OPTIONS", "link": None},
                    {"name": "view_opts", "type": "VIEW_OPTS", "link": None},
                    {"name": "context_length", "type": "INT", "link": 13, "widget": {"name": "context_length"}}],
         "outputs": [{"name": "CONTEXT_OPTIONS", "type": "CONTEXT_OPTIONS", "links": [5], "slot_index": 0}],
         "properties": {}, "widgets_values": [16, 1, 4, "uniform", False, "flat", False, 0, 1, ""]},
        {"id": 3, "type": "Reroute", "pos": [320, 200], "size": [75, 26], "flags": {}, "order": 2, "mode": 0,
         "inputs": [{"name": "", "type": "*", "link": 5}],
         "outputs": [{"name": "", "type": "CONTEXT_OPTIONS", "links": [6], "slot_index": 0}],
         "properties": {"showOutputText": False, "horizontal": False}},
        {"id": 4, "type": "ADE_AnimateDiffLoaderWithContext", "pos": [420, 0], "size": [315, 230], "flags": {},
         "order": 3, "mode": 0,
         "inputs": [{"name": "model", "type": "MODEL", "link": 1},
                    {"name": "context_options", "type": "CONTEXT_OPTIONS", "link": 6},
                    {"name": "motion_lora", "type": "MOTION_LORA", "link": 12}],
         "outputs": [{"name": "MODEL", "type": "MODEL", "links": [7], "slot_index": 0, "shape": 3}],
         "properties": {"Node name for S&R": "ADE_AnimateDiffLoaderWithContext"},
         "widgets_values": ["mm_sd_v15_v2.ckpt", "sqrt_linear (AnimateDiff)"]},
        {"id": 5, "type": "CLIPTextEncode", "pos": [420, 300], "size": [300, 100], "flags": {}, "order": 4,
         "mode": 0, "inputs": [{"name": "clip", "type": "CLIP", "link": 2}],
         "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING", "links": [8], "slot_index": 0}],
         "properties": {}, "widgets_values": ["a lighthouse, waves"]},
        {"id": 6, "type": "CLIPTextEncode", "pos": [420, 450], "size": [300, 100], "flags": {}, "order": 5,
         "mode": 0, "inputs": [{"name": "clip", "type": "CLIP", "link": 3}],
         "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING", "links": [9], "slot_index": 0}],
         "properties": {}, "widgets_values": ["blurry"]},
        {"id": 7, "type": "EmptyLatentImage", "pos": [420, 600], "size": [300, 100], "flags": {}, "order": 6,
         "mode": 0, "inputs": [],
         "outputs": [{"name": "LATENT", "type": "LATENT", "links": [10], "slot_index": 0}],
         "properties": {}, "widgets_values": [512, 512, 20]},
        {"id": 8, "type": "KSampler", "pos": [800, 0], "size": [300, 260], "flags": {}, "order": 8, "mode": 0,
         "inputs": [{"name": "model", "type": "MODEL", "link": 7},
                    {"name": "positive", "type": "CONDITIONING", "link": 8},
                    {"name": "negative", "type": "CONDITIONING", "link": 9},
                    {"name": "latent_image", "type": "LATENT", "link": 10}],
         "outputs": [{"name": "LATENT", "type": "LATENT", "links": [11], "slot_index": 0}],
         "properties": {}, "widgets_values": [5, "fixed", 20, 7.0, "euler", "normal", 1.0]},
        {"id": 9, "type": "VAEDecode", "pos": [1150, 0], "size": [200, 50], "flags": {}, "order": 9, "mode": 0,
         "inputs": [{"name": "samples", "type": "LATENT", "link": 11}, {"name": "vae", "type": "VAE", "link": 4}],
         "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [14], "slot_index": 0}],
         "properties": {}},
        {"id": 10, "type": "ADE_AnimateDiffLoRALoader", "pos": [0, 500], "size": [300, 100], "flags": {},
         "order": 2, "mode": 0, "inputs": [{"name": "prev_motion_lora", "type": "MOTION_LORA", "link": None}],
         "outputs": [{"name": "MOTION_LORA", "type": "MOTION_LORA", "links": [12], "slot_index": 0}],
         "properties": {}, "widgets_values": ["v2_lora_ZoomIn.ckpt", 0.6]},
        {"id": 11, "type": "PrimitiveNode", "pos": [-300, 200], "size": [210, 82], "flags": {}, "order": 0,
         "mode": 0, "inputs": [],
         "outputs": [{"name": "INT", "type": "INT", "links": [13], "slot_index": 0,
                      "widget": {"name": "context_length"}}],
         "properties": {"Run widget replace on values": False}, "widgets_values": [16, "fixed"]},
        {"id": 12, "type": "SaveAnimatedWEBP", "pos": [1400, 0], "size": [300, 300], "flags": {}, "order": 10,
         "mode": 0, "inputs": [{"name": "images", "type": "IMAGE", "link": 14}], "outputs": [],
         "properties": {}, "widgets_values": ["ade_legacy", 8.0, False, 80, "default"]},
    ],
    "links": [[1, 1, 0, 4, 0, "MODEL"], [2, 1, 1, 5, 0, "CLIP"], [3, 1, 1, 6, 0, "CLIP"], [4, 1, 2, 9, 1, "VAE"],
              [5, 2, 0, 3, 0, "CONTEXT_OPTIONS"], [6, 3, 0, 4, 1, "CONTEXT_OPTIONS"], [7, 4, 0, 8, 0, "MODEL"],
              [8, 5, 0, 8, 1, "CONDITIONING"], [9, 6, 0, 8, 2, "CONDITIONING"], [10, 7, 0, 8, 3, "LATENT"],
              [11, 8, 0, 9, 0, "LATENT"], [12, 10, 0, 4, 2, "MOTION_LORA"], [13, 11, 0, 2, 2, "INT"],
              [14, 9, 0, 12, 0, "IMAGE"]],
}
# The same graph as API format (what ComfyUI would queue), nodes in editor order, new ids 13 (the
# motion model loader) and 14 (the context options).
LEGACY_EXPECTED_API = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "dreamshaper_8.safetensors"}},
    "4": {"class_type": "ADS_ApplyMotionModel", "inputs": {
        "model": ["1", 0], "motion_model": ["13", 0], "motion_lora": ["10", 0], "context_options": ["14", 0],
        "domain_adapter": "none", "domain_adapter_strength": 1.0, "motion_scale": 1.0, "start_percent": 0.0,
        "end_percent": 1.0, "beta_schedule": "sqrt_linear (AnimateDiff)", "frames_per_clip": 0,
        "norm_semantics": "AnimateDiff-Evolved"}},
    "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse, waves", "clip": ["1", 1]}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
    "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 20}},
    "8": {"class_type": "KSampler", "inputs": {
        "seed": 5, "steps": 20, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
        "model": ["4", 0], "positive": ["5", 0], "negative": ["6", 0], "latent_image": ["7", 0]}},
    "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
    "10": {"class_type": "ADS_LoadMotionLora", "inputs": {"lora_name": "v2_lora_ZoomIn.ckpt", "strength": 0.6}},
    "12": {"class_type": "SaveAnimatedWEBP", "inputs": {
        "images": ["9", 0], "filename_prefix": "ade_legacy", "fps": 8.0, "lossless": False, "quality": 80,
        "method": "default"}},
    "13": {"class_type": "ADS_LoadMotionModel", "inputs": {"model_name": "mm_sd_v15_v2.ckpt"}},
    "14": {"class_type": "ADS_ContextOptions", "inputs": {
        "context_length": 16, "context_overlap": 4, "context_stride": 1, "closed_loop": False,
        "schedule": "looped_uniform", "fuse_method": "flat", "noise_type": "default", "scope": "whole_model",
        "stretch_pe": False, "window_batch": 1}},
}

# ---------------------------------------------------------------- what cannot be mapped (API format)
UNMAPPED_API = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "dreamshaper_8.safetensors"}},
    "2": {"class_type": "ADE_LoadAnimateDiffModel", "inputs": {"model_name": "mm_sd_v15_v2.ckpt"}},
    "3": {"class_type": "ADE_MultivalDynamic", "inputs": {"float_val": 0.5}},
    "4": {"class_type": "ADE_AnimateDiffKeyframe", "inputs": {"start_percent": 0.5, "inherit_missing": True,
                                                              "guarantee_steps": 1}},
    "5": {"class_type": "ADE_ApplyAnimateDiffModelSimple", "inputs": {
        "motion_model": ["2", 0], "effect_multival": ["3", 0], "ad_keyframes": ["4", 0]}},
    "6": {"class_type": "ADE_StandardStaticContextOptions", "inputs": {
        "context_length": 16, "context_overlap": 4, "fuse_method": "🔬gauss-sigma", "use_on_equal_length": True,
        "start_percent": 0.5, "guarantee_steps": 1}},
    "7": {"class_type": "ADE_IterationOptsFreeInit", "inputs": {
        "iterations": 3, "filter": "gaussian", "d_s": 0.3, "d_t": 0.2, "n_butterworth": 4, "sigma_step": 800,
        "apply_to_1st_iter": False, "init_type": "DinkInit_v1", "iter_batch_offset": 0, "iter_seed_offset": 1}},
    "8": {"class_type": "ADE_CustomCFGSimple", "inputs": {"cfg_multival": ["3", 0], "cfg_extras": None}},
    "9": {"class_type": "ADE_AnimateDiffSamplingSettings", "inputs": {
        "batch_offset": 0, "noise_type": "constant", "seed_gen": "auto1111", "seed_offset": 0,
        "iteration_opts": ["7", 0], "custom_cfg": ["8", 0]}},
    "10": {"class_type": "ADE_UseEvolvedSampling", "inputs": {
        "model": ["1", 0], "beta_schedule": "lcm[100_ots]", "m_models": ["5", 0], "context_options": ["6", 0],
        "sample_settings": ["9", 0]}},
    "11": {"class_type": "ADE_VisualizeContextOptionsK", "inputs": {
        "model": ["1", 0], "sampler_name": "euler", "scheduler": "normal", "context_opts": ["6", 0],
        "visual_width": 1440, "latents_length": 32, "steps": 20, "denoise": 1.0}},
    "12": {"class_type": "ADE_UseEvolvedSampling", "inputs": {"model": ["1", 0], "beta_schedule": "autoselect",
                                                             "context_options": ["6", 0]}},
    "13": {"class_type": "ADE_PromptScheduling", "inputs": {"prompts": '"0": "a", "-1": "b"', "clip": ["1", 1],
                                                           "print_schedule": False, "max_length": 0,
                                                           "tensor_interp": "lerp"}},
}
# (kind, node id, words the line must contain); one line each, nothing else.
UNMAPPED_REPORT = [
    ("option not mapped", "5", "effect_multival"),
    ("option not mapped", "5", "ad_keyframes"),
    ("option not mapped", "9", "noise_type 'constant'"),
    ("option not mapped", "9", "seed_gen = 'auto1111'"),
    ("option not mapped", "9", "custom_cfg"),
    ("option not mapped", "7", "sigma_step = 800"),
    ("option not mapped", "7", "DinkInit_v1"),
    ("approximate", "7", "FreeInit"),
    ("option not mapped", "10", "beta_schedule 'lcm[100_ots]'"),
    ("option not mapped", "6", "start_percent 0.5"),
    ("option not mapped", "6", "use_on_equal_length"),
    ("option not mapped", "6", "fuse_method '🔬gauss-sigma'"),
    ("node not mapped", "12", "no motion model"),
    ("node not mapped", "13", "ADE-only syntax"),
    ("node not mapped", "11", "Context Schedule Preview"),
    ("node not mapped", "6", "feeds a node that was not mapped"),
]

# ---------------------------------------------------------------- views only (API format)
VIEWS_API = {
    **GEN1_API,
    "2": {"class_type": "ADE_ViewsOnlyContextOptions", "inputs": {
        "view_opts_req": ["20", 0], "start_percent": 0.0, "guarantee_steps": 1}},
    "20": {"class_type": "ADE_StandardStaticViewOptions", "inputs": {
        "view_length": 16, "view_overlap": 4, "fuse_method": "flat"}},
}
VIEWS_EXPECTED = {
    **{k: v for k, v in GEN1_EXPECTED.items() if k not in ("3", "12", "13")},
    "3": {"class_type": "ADS_ApplyMotionModel", "inputs": {
        **GEN1_EXPECTED["3"]["inputs"], "motion_model": ["21", 0], "context_options": ["22", 0]}},
    "21": GEN1_EXPECTED["12"],
    "22": {"class_type": "ADS_ContextOptions", "inputs": {
        "context_length": 16, "context_overlap": 4, "context_stride": 1, "closed_loop": False,
        "schedule": "standard_static", "fuse_method": "flat", "noise_type": "repeated_context",
        "scope": "motion_attention", "stretch_pe": False, "window_batch": 1}},
}
