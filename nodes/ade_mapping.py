"""The rules of the ADE importer: which of this pack's nodes replace each ADE node, option by option.

``Importer`` works on a graph read by ``ade_import`` (``{id: Node}``; inputs are literals or
``Link``s) and changes it in place, collecting a report line for everything it cannot map exactly.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .ade_tables import (ABSORBED, ADE_DEFAULTS, ADE_WIDGETS, APPLY, ADE_BETA_SCHEDULES, ADE_CONTEXT_SCHEDULES,
                         ADE_FUSE_METHODS, ADE_NOISE_TYPES, NOT_COVERED)


class WorkflowError(ValueError):
    """The input is not a ComfyUI workflow the importer can read."""


@dataclass(frozen=True)
class Link:
    node: str
    slot: int


@dataclass
class Node:
    id: str
    type: str
    inputs: dict  # name -> literal or Link
    raw: dict | None = None  # the node as read (a kept node is written back from it)
    origin: str | None = None  # the ADE node it replaces (its place in the editor)
    mode: int = 0


def is_ade(node_type: str) -> bool:
    return node_type.startswith("ADE_") or node_type in ADE_WIDGETS or node_type == "AnimateDiffLoaderV1"


def not_covered_reason(node_type: str) -> str:
    for prefix, reason in NOT_COVERED.items():
        if node_type.startswith(prefix):
            return reason
    return "no equivalent in this pack"


class Importer:
    """One conversion: ``nodes`` is changed in place; ``report`` collects what was not mapped."""

    def __init__(self, nodes: dict, report: list):
        self.nodes, self.report = nodes, report
        self.redirect: dict = {}
        self.contexts: dict = {}
        self.kept: set = set()  # ADE nodes reported as not mapped
        self.read: set = set()  # nodes whose outputs mapped nodes read (helpers dropped once unused)
        self.ade_ids = [i for i, n in nodes.items() if is_ade(n.type)]
        self.used_before = self._consumed()
        self.mapped = 0
        self._next = max((int(i) for i in nodes if str(i).isdigit()), default=0) + 1

    # helpers
    def note(self, node: Node, kind: str, text: str) -> None:
        line = f"{kind}: node {node.id} ({node.type}): {text}"
        if kind == "node not mapped":
            self.kept.add(node.id)
        if line not in self.report:
            self.report.append(line)

    def fresh(self, node_type: str, inputs: dict, origin: str) -> Node:
        node = Node(str(self._next), node_type, inputs, origin=origin)
        self._next += 1
        self.nodes[node.id] = node
        return node

    def replace(self, old: Node, node_type: str, inputs: dict) -> Node:
        node = Node(old.id, node_type, inputs, origin=old.id)
        self.nodes[old.id] = node
        return node

    def value(self, node: Node, name: str):
        return node.inputs.get(name, ADE_DEFAULTS.get(name))

    def source(self, link) -> Node | None:
        """The node a link comes from, through editor reroutes."""
        seen = set()
        while isinstance(link, Link) and link.node in self.nodes and link.node not in seen:
            seen.add(link.node)
            node = self.nodes[link.node]
            self.read.add(node.id)
            if node.type != "Reroute":
                return node
            link = next(iter(node.inputs.values()), None)
        return None

    def dropped(self, node: Node, names) -> None:
        for name in names:
            if isinstance(node.inputs.get(name), Link):
                self.source(node.inputs[name])
                self.note(node, "option not mapped", f"{name} is connected but has no equivalent; left out "
                                                     "(with the ADE nodes that only fed it)")

    def defaults_only(self, node: Node, options) -> None:
        """Report each ``(name, default)`` option set to anything but the default (this pack has only that)."""
        for name, default in options:
            if self.value(node, name) != default:
                self.note(node, "option not mapped", f"{name} = {self.value(node, name)!r} has no equivalent; "
                                                     f"{default!r} used")

    def constant(self, node: Node, name: str, default: float):
        link = node.inputs.get(name)
        if link is None:
            return default
        source = self.source(link)
        if (source is not None and source.type == "ADE_MultivalDynamic"
                and not isinstance(source.inputs.get("mask_optional"), Link)
                and isinstance(self.value(source, "float_val"), (int, float))):
            return float(self.value(source, "float_val"))
        self.note(node, "option not mapped", f"{name} is not a constant Multival (a mask or a schedule); "
                                             f"{default} used")
        return default

    # nodes
    def run(self) -> None:
        handlers = {
            "ADE_LoadAnimateDiffModel": self.load_model, "ADE_AnimateDiffLoRALoader": self.motion_lora,
            "ADE_UseEvolvedSampling": self.evolved_sampling, "ADE_AnimateDiffLoaderGen1": self.gen1_loader,
            "ADE_AnimateDiffLoaderWithContext": self.gen1_loader, "ADE_PromptScheduling": self.prompts,
            "ADE_PromptSchedulingLatents": self.prompts, "ADE_EmptyLatentImageLarge": self.empty_latent,
            "CheckpointLoaderSimpleWithNoiseSelect": self.checkpoint, "ADE_AnimateDiffUnload": self.unload,
        }
        for node in list(self.nodes.values()):
            handler = handlers.get(node.type)
            if handler is None:
                continue
            if node.mode != 0:
                self.note(node, "node not mapped", "muted or bypassed in the editor; left as it is")
                continue
            handler(node)
        self.follow_redirects()
        self.collect_unused()
        for node in self.nodes.values():
            if is_ade(node.type) and node.id not in self.kept:
                reason = ("it feeds a node that was not mapped" if node.type in ABSORBED and node.id in self.read
                          else not_covered_reason(node.type))
                self.note(node, "node not mapped", reason)
        self.mapped = sum(1 for i in self.ade_ids if i not in self.nodes or not is_ade(self.nodes[i].type))

    def load_model(self, node: Node) -> None:
        self.dropped(node, ["ad_settings"])
        self.replace(node, "ADS_LoadMotionModel", {"model_name": self.value(node, "model_name")})

    def motion_lora(self, node: Node) -> None:
        inputs = {"lora_name": node.inputs.get("name", node.inputs.get("lora_name")),
                  "strength": self.value(node, "strength")}
        if isinstance(node.inputs.get("prev_motion_lora"), Link):
            inputs["prev_motion_lora"] = node.inputs["prev_motion_lora"]
        self.replace(node, "ADS_LoadMotionLora", inputs)

    def evolved_sampling(self, node: Node) -> None:
        apply = self.source(node.inputs.get("m_models"))
        if apply is None or apply.type not in ("ADE_ApplyAnimateDiffModel", "ADE_ApplyAnimateDiffModelSimple"):
            what = "no motion model is connected" if apply is None else f"m_models comes from {apply.type}"
            self.note(node, "node not mapped", f"{what}; this pack's context windows and beta schedules come "
                                               "with Apply Motion Model")
            return
        if isinstance(apply.inputs.get("prev_m_models"), Link):
            self.note(node, "node not mapped", "several motion models at once (prev_m_models) are not supported")
            return
        self.dropped(apply, ["effect_multival", "ad_keyframes", "per_block"])
        loader = self.source(apply.inputs.get("motion_model"))
        settings = {"motion_model": apply.inputs.get("motion_model"), "motion_lora": apply.inputs.get("motion_lora"),
                    "motion_scale": self.constant(apply, "scale_multival", 1.0),
                    "start_percent": self.value(apply, "start_percent"),
                    "end_percent": self.value(apply, "end_percent")}
        name = loader.inputs.get("model_name") if loader is not None else None
        self.animate(node, settings, name)

    def gen1_loader(self, node: Node) -> None:
        legacy = node.type == "ADE_AnimateDiffLoaderWithContext"
        self.dropped(node, ["ad_settings", "ad_keyframes", "effect_multival", "per_block"])
        if legacy and self.value(node, "apply_v2_models_properly") is False:
            self.note(node, "option not mapped", "apply_v2_models_properly = false (v2 models run as v1) has no "
                                                 "equivalent; v2 models run properly")
        load = self.fresh("ADS_LoadMotionModel", {"model_name": self.value(node, "model_name")}, node.id)
        scale = self.value(node, "motion_scale") if legacy else self.constant(node, "scale_multival", 1.0)
        settings = {"motion_model": Link(load.id, 0), "motion_lora": node.inputs.get("motion_lora"),
                    "motion_scale": scale, "start_percent": 0.0, "end_percent": 1.0}
        self.animate(node, settings, self.value(node, "model_name"))

    def animate(self, node: Node, settings: dict, model_name) -> None:
        """Apply Motion Model (and FreeInit) in place of an ADE node whose MODEL output is the animated model."""
        noise_type, free_init = self.sample_settings(node)
        inputs = {"model": node.inputs.get("model"), "motion_model": settings["motion_model"],
                  "domain_adapter": "none", "domain_adapter_strength": 1.0,
                  "motion_scale": settings["motion_scale"], "start_percent": settings["start_percent"],
                  "end_percent": settings["end_percent"],
                  "beta_schedule": self.beta_schedule(node, model_name), "frames_per_clip": 0,
                  "norm_semantics": "AnimateDiff-Evolved"}
        for name, value in (("motion_lora", settings.get("motion_lora")),
                            ("context_options", self.context(node, noise_type))):
            if isinstance(value, Link):
                inputs[name] = value
        if free_init is None:
            self.replace(node, APPLY, inputs)
            return
        apply = self.fresh(APPLY, inputs, node.id)
        self.replace(node, "ADS_FreeInit", {"model": Link(apply.id, 0), **free_init})

    def beta_schedule(self, node: Node, model_name) -> str:
        name = self.value(node, "beta_schedule")
        if name not in ADE_BETA_SCHEDULES:
            self.note(node, "option not mapped", f"beta_schedule {name!r} has no equivalent; 'auto' used")
            return "auto"
        if name == "autoselect" and isinstance(model_name, str) and "lcm" in model_name.lower():
            self.note(node, "approximate", "for AnimateLCM, ADE's autoselect picks 'lcm' (linear betas); 'auto' "
                                           "here picks 'lcm (AnimateLCM)' (sqrt_linear betas)")
        return ADE_BETA_SCHEDULES[name]

    def sample_settings(self, node: Node):
        """(noise type, FreeInit inputs or None) from the node's sample_settings."""
        link = node.inputs.get("sample_settings")
        if link is None:
            return "default", None
        settings = self.source(link)
        if settings is None or settings.type != "ADE_AnimateDiffSamplingSettings":
            self.note(node, "option not mapped", "sample_settings does not come from Sample Settings; left out")
            return "default", None
        noise_type = self.value(settings, "noise_type")
        if noise_type not in ADE_NOISE_TYPES:
            self.note(settings, "option not mapped", f"noise_type {noise_type!r} has no equivalent; 'default' used")
        elif noise_type == "FreeNoise":
            self.note(settings, "approximate", "noise_type FreeNoise -> shuffle_context: the same FreeNoise "
                                               "shuffling, with permutations from another generator")
        self.defaults_only(settings, (("batch_offset", 0), ("seed_gen", "comfy"), ("seed_offset", 0),
                                      ("adapt_denoise_steps", False)))
        self.dropped(settings, ["noise_layers", "seed_override", "custom_cfg", "sigma_schedule", "image_inject",
                                "ancestral_opts"])
        return ADE_NOISE_TYPES.get(noise_type, "default"), self.free_init(settings)

    def free_init(self, settings: Node):
        options = self.source(settings.inputs.get("iteration_opts"))
        if options is None:
            return None
        if options.type != "ADE_IterationOptsFreeInit":
            if options.type != "ADE_IterationOptsDefault" or self.value(options, "iterations") != 1:
                self.note(options, "option not mapped", "repeated sampling without FreeInit has no equivalent")
            return None
        iterations = self.value(options, "iterations")
        if isinstance(iterations, int) and iterations <= 1:
            return None
        if isinstance(iterations, int) and iterations > 10:
            self.note(options, "option not mapped", f"iterations {iterations} is above this pack's 10; 10 used")
            iterations = 10
        self.defaults_only(options, (("sigma_step", 999), ("apply_to_1st_iter", False), ("iter_batch_offset", 0)))
        if str(self.value(options, "init_type")).startswith("DinkInit"):
            self.note(options, "option not mapped", "init_type DinkInit_v1 has no equivalent; FreeInit used")
        self.note(options, "approximate", "FreeInit: the same filters and passes; the fresh noise of later passes "
                                          "is drawn from other seeds than ADE's seed + iter_seed_offset")
        return {"iterations": iterations, "filter": self.value(options, "filter"),
                "spatial_stop": self.value(options, "d_s"), "temporal_stop": self.value(options, "d_t"),
                "butterworth_order": self.value(options, "n_butterworth"), "fast_sampling": False}

    def context(self, node: Node, noise_type: str):
        link = node.inputs.get("context_options")
        if link is None:
            return None  # ADE's noise types change nothing without windows, as here
        options = self.source(link)
        key = (options.id if options else None, noise_type)
        if key not in self.contexts:
            self.contexts[key] = self._context(node, options, noise_type)
        return self.contexts[key]

    def _context(self, consumer: Node, options: Node | None, noise_type: str):
        scope = "whole_model"
        if options is not None and options.type == "ADE_ViewsOnlyContextOptions":
            self.dropped(options, ["prev_context"])
            scope, owner, options = "motion_attention", options, self.source(options.inputs.get("view_opts_req"))
            self._check_step_range(owner)
            self.note(owner, "approximate", "views -> scope motion_attention: windows over the motion modules "
                                            "while the UNet sees every frame, as ADE's views; not compared with ADE")
        elif options is not None:
            self.dropped(options, ["prev_context", "view_opts"])
            self._check_step_range(options)
        if options is None or options.type not in ADE_CONTEXT_SCHEDULES:
            what = options.type if options is not None else "nothing"
            self.note(consumer, "option not mapped", f"context_options from {what} has no equivalent; left out")
            return None
        prefix = "view" if "ViewOptions" in options.type else "context"
        length = self.value(options, f"{prefix}_length")
        overlap = 0 if options.type == "ADE_BatchedContextOptions" else self.value(options, f"{prefix}_overlap")
        stride = self.value(options, f"{prefix}_stride")
        if options.type == "ADE_AnimateDiffUniformContextOptions" and self.value(options, "context_schedule") != "uniform":
            self.note(options, "option not mapped", f"context_schedule {self.value(options, 'context_schedule')!r}; "
                                                    "looped_uniform used")
        if self.value(options, "use_on_equal_length") is True:
            self.note(options, "option not mapped", "use_on_equal_length: a clip as long as one window is sampled "
                                                    "without windows here")
        inputs = {"context_length": length, "context_overlap": overlap, "context_stride": stride,
                  "closed_loop": self.value(options, "closed_loop"), "schedule": ADE_CONTEXT_SCHEDULES[options.type],
                  "fuse_method": self.fuse_method(options, length), "noise_type": noise_type, "scope": scope,
                  "stretch_pe": False, "window_batch": 1}
        if isinstance(stride, int) and stride > 8:
            self.note(options, "option not mapped", f"{prefix}_stride {stride} is above this pack's 8; 8 used")
            inputs["context_stride"] = 8
        return Link(self.fresh("ADS_ContextOptions", inputs, options.id).id, 0)

    def _check_step_range(self, options: Node) -> None:
        if self.value(options, "start_percent") != 0:
            self.note(options, "option not mapped", f"start_percent {self.value(options, 'start_percent')} "
                                                    "(windows from part-way through sampling); windows used throughout")

    def fuse_method(self, options: Node, length) -> str:
        ade = self.value(options, "fuse_method")
        if options.type == "ADE_BatchedContextOptions":
            return "flat"
        name = str(ade).removeprefix("🔬")
        if name not in ADE_FUSE_METHODS:
            self.note(options, "option not mapped", f"fuse_method {ade!r} has no equivalent; 'pyramid' used")
            return "pyramid"
        if name == "overlap-linear":
            self.note(options, "approximate", "overlap-linear: ramps k/(overlap+1) here, ADE's run from ~0 to 1")
        if name == "delayed reverse sawtooth" and isinstance(length, int) and length % 2:
            self.note(options, "approximate", "delayed reverse sawtooth at an odd length: ADE's weights have one "
                                              "entry too many there; this pack's are the even-length rule")
        return ADE_FUSE_METHODS[name]

    def prompts(self, node: Node) -> None:
        text = self.value(node, "prompts")
        keyframes = parse_ade_prompts(text) if isinstance(text, str) else None
        if keyframes is None:
            self.note(node, "node not mapped", "prompts use ADE-only syntax (negative, fractional or ranged frames, "
                                               "holds, or `value` keys); only 'N': \"prompt\" keyframes map")
            return
        if isinstance(node.inputs.get("values_replace"), Link):
            self.note(node, "node not mapped", "values_replace has no equivalent")
            return
        frames = keyframes[-1][0] + 1
        if node.type == "ADE_PromptSchedulingLatents":
            latent = self.source(node.inputs.get("latent"))
            size = latent.inputs.get("batch_size") if latent is not None else None
            if latent is None or latent.type not in ("EmptyLatentImage", "ADE_EmptyLatentImageLarge") \
                    or not isinstance(size, int):
                self.note(node, "node not mapped", "the frame count comes from a latent this importer cannot "
                                                   "read (not an Empty Latent Image with a fixed batch size)")
                return
            frames = size
            self.redirect[(node.id, 1)] = node.inputs.get("latent")
        elif isinstance(self.value(node, "max_length"), int) and self.value(node, "max_length") > 0:
            frames = self.value(node, "max_length")
        if self.value(node, "print_schedule") is True:
            self.note(node, "option not mapped", "print_schedule (a console listing) has no equivalent")
        inputs = {"clip": node.inputs.get("clip"), "text": "\n".join(f"{f}: {p}" for f, p in keyframes),
                  "frames": frames, "prefix": node.inputs.get("prepend_text", ""),
                  "suffix": node.inputs.get("append_text", ""),
                  "interpolation": "slerp" if self.value(node, "tensor_interp") == "slerp" else "linear"}
        self.replace(node, "ADS_PromptTravel", inputs)

    def empty_latent(self, node: Node) -> None:
        size = self.value(node, "batch_size")
        if isinstance(size, int) and size > 4096:
            self.note(node, "node not mapped", f"batch_size {size} is above Empty Latent Image's 4096")
            return
        self.replace(node, "EmptyLatentImage", {k: self.value(node, k) for k in ("width", "height", "batch_size")})

    def checkpoint(self, node: Node) -> None:
        if self.value(node, "beta_schedule") not in ("use existing", "autoselect"):
            self.note(node, "option not mapped", f"beta_schedule {self.value(node, 'beta_schedule')!r} on the "
                                                 "checkpoint loader; set beta_schedule on Apply Motion Model")
        if self.value(node, "use_custom_scale_factor") is True:
            self.note(node, "option not mapped", "use_custom_scale_factor has no equivalent")
        self.replace(node, "CheckpointLoaderSimple", {"ckpt_name": self.value(node, "ckpt_name")})

    def unload(self, node: Node) -> None:
        self.redirect[(node.id, 0)] = node.inputs.get("model")
        del self.nodes[node.id]

    # graph upkeep
    def follow_redirects(self) -> None:
        def final(link):
            seen = set()
            while isinstance(link, Link) and (link.node, link.slot) in self.redirect and link not in seen:
                seen.add(link)
                link = self.redirect[(link.node, link.slot)]
            return link

        for node in self.nodes.values():
            node.inputs = {k: final(v) if isinstance(v, Link) else v for k, v in node.inputs.items()}
            node.inputs = {k: v for k, v in node.inputs.items() if v is not None}

    def collect_unused(self) -> None:
        """Drop ADE nodes (and editor reroutes) that only mapped nodes read: nothing reads them any more."""
        while True:
            used = self._consumed()
            unused = [i for i, n in self.nodes.items() if (is_ade(n.type) or n.type == "Reroute")
                      and i in self.used_before and i not in used and n.mode == 0]
            if not unused:
                return
            for node_id in unused:
                del self.nodes[node_id]

    def _consumed(self) -> set:
        return {v.node for node in self.nodes.values() for v in node.inputs.values() if isinstance(v, Link)}


def parse_ade_prompts(text: str):
    """ADE's prompt schedule ('"0": "a cat",' or '0 = "a cat",') as [(frame, prompt)], or None if it uses
    syntax this pack does not have."""
    body = text.strip().strip(",")
    if not body:
        return None
    pattern = re.compile(r'\s*"?([^"=:\s]+)"?\s*[:=]\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')
    keyframes, position = {}, 0
    while position < len(body):
        match = pattern.match(body, position)
        if match is None or not match.group(1).isdigit() or "`" in match.group(2):
            return None
        try:
            prompt = json.loads(f'"{match.group(2)}"', strict=False)
        except ValueError:
            return None
        keyframes[int(match.group(1))] = " ".join(prompt.split())
        position = match.end()
    return sorted(keyframes.items())
