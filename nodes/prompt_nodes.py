"""Prompt Travel: keyframed prompts -> per-frame CONDITIONING (parsing and blending live in the core)."""

from __future__ import annotations

from .comfy_compat import io

from ..motion_modules.prompt_travel import INTERPOLATIONS, parse_keyframes, travel
from .motion_nodes import CATEGORY
from .validation import check_widgets


class PromptTravel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ADS_PromptTravel",
            display_name="Prompt Travel (AnimateDiff)",
            category=CATEGORY,
            description="One prompt per keyframe ('0: a cat sitting', '24: a cat jumping'); frames in "
                        "between blend the neighbouring prompts. Works with context windows.",
            inputs=[
                io.Clip.Input("clip", tooltip="The text encoder of your checkpoint."),
                io.String.Input("text", multiline=True, default="0: a cat sitting\n16: a cat jumping",
                                tooltip="One 'FRAME: prompt' per line (frames from 0); '#' starts a comment."),
                io.Int.Input("frames", default=16, min=1, max=4096,
                             tooltip="Number of frames (the latent batch size) to make conditioning for."),
                io.String.Input("prefix", default="", optional=True,
                                tooltip="Text put before every keyframe prompt (e.g. style words)."),
                io.String.Input("suffix", default="", optional=True,
                                tooltip="Text put after every keyframe prompt (e.g. quality tags)."),
                io.Combo.Input("interpolation", options=sorted(INTERPOLATIONS), default="linear", optional=True,
                               tooltip="How embeddings blend between keyframes: linear, or slerp per token."),
            ],
            outputs=[io.Conditioning.Output(tooltip="Conditioning with one entry per frame.")],
        )

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        widgets = check_widgets(cls, values)
        if widgets is not True or values.get("text") is None:
            return widgets
        try:
            parse_keyframes(values["text"])
        except ValueError as exc:
            return str(exc)
        return True

    @classmethod
    def execute(cls, clip, text: str, frames: int, prefix: str = "", suffix: str = "",
                interpolation: str = "linear") -> io.NodeOutput:
        keyframes = parse_keyframes(text)
        conds, pooled = [], []
        for _, prompt in keyframes:
            full = ", ".join(part for part in (prefix.strip(), prompt, suffix.strip()) if part)
            cond, pool = clip.encode_from_tokens(clip.tokenize(full), return_pooled=True)
            conds.append(cond)
            pooled.append(pool)
        frame_numbers = [frame for frame, _ in keyframes]
        conditioning = [[travel(conds, frame_numbers, frames, interpolation),
                         {"pooled_output": travel(pooled, frame_numbers, frames, interpolation)}]]
        return io.NodeOutput(conditioning)


NODES = [PromptTravel]
