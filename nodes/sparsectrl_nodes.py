"""Load SparseCtrl and Apply SparseCtrl: forms over the core (motion_modules/sparsectrl*.py) and sparsectrl.py."""

from __future__ import annotations

import folder_paths
from .comfy_compat import io

from ..motion_modules import MotionModelError
from .folders import file_fingerprint, full_path, sha256_prefix
from .motion_nodes import check_listed
from .sockets import CATEGORY, SPARSECTRL
from .sparsectrl import apply_sparsectrl, load_sparsectrl_patcher, parse_indexes
from .validation import check_widgets

FOLDER = "controlnet"


class LoadSparseCtrl(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ADS_LoadSparseCtrl",
            display_name="Load SparseCtrl (AnimateDiff)",
            category=CATEGORY,
            description="Load an AnimateDiff v3 SparseCtrl encoder (v3_sd15_sparsectrl_rgb or _scribble, or a "
                        "diffusers SparseControlNetModel file) from models/controlnet.",
            inputs=[io.Combo.Input("sparsectrl_name", options=folder_paths.get_filename_list(FOLDER),
                                   tooltip="SparseCtrl file in models/controlnet. RGB or scribble is read from its "
                                           "weights.")],
            outputs=[SPARSECTRL.Output(display_name="SPARSECTRL", tooltip="For Apply SparseCtrl."),
                     io.String.Output(display_name="info", tooltip="What was loaded: rgb or scribble, block "
                                                                    "widths, text width, frames per pass, and "
                                                                    "the first 10 hex digits of the file's SHA-256.")],
        )

    @classmethod
    def validate_inputs(cls, sparsectrl_name: str) -> bool | str:
        return check_listed(FOLDER, sparsectrl_name, "SparseCtrl")

    @classmethod
    def fingerprint_inputs(cls, sparsectrl_name: str):
        return file_fingerprint(FOLDER, sparsectrl_name)

    @classmethod
    def execute(cls, sparsectrl_name: str) -> io.NodeOutput:
        path = full_path(FOLDER, sparsectrl_name)
        loaded = load_sparsectrl_patcher(path, sparsectrl_name)
        info = f"{sparsectrl_name}: {loaded.spec.describe()}, sha256 {sha256_prefix(path)}"
        return io.NodeOutput(loaded, info, ui={"text": [info]})


class ApplySparseCtrl(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ADS_ApplySparseCtrl",
            display_name="Apply SparseCtrl (AnimateDiff)",
            category=CATEGORY,
            description="Guide an animation by a few keyframes: each image is put on one frame of the clip "
                        "(e.g. the first and the last for a transition) and SparseCtrl steers the frames around "
                        "it. Use with an animated MODEL (Apply Motion Model, v3 motion model) and the stock KSampler.",
            inputs=[
                io.Conditioning.Input("positive", tooltip="Positive conditioning to attach SparseCtrl to."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning to attach SparseCtrl to (as the "
                                                          "original pipeline, both get the keyframes)."),
                SPARSECTRL.Input("sparsectrl", tooltip="From Load SparseCtrl."),
                io.Image.Input("images", tooltip="The keyframes, one image per keyframe. RGB SparseCtrl: pictures; "
                                                 "scribble SparseCtrl: white lines on black. Resized to the latent's "
                                                 "size x 8 (bilinear, centre crop)."),
                io.String.Input("keyframe_indexes", default="", optional=True,
                                tooltip="The frame of each image, comma-separated, negative from the end: '0, -1' "
                                        "puts two images on the first and last frame. Empty spreads the images "
                                        "evenly from the first to the last frame (one image: frame 0)."),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01, optional=True,
                               tooltip="Multiplier of SparseCtrl's residuals (0 leaves the conditioning as it is)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001, optional=True,
                               tooltip="Fraction of sampling after which SparseCtrl starts to act."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001, optional=True,
                               tooltip="Fraction of sampling after which SparseCtrl stops acting."),
                io.Vae.Input("vae", optional=True, tooltip="Required for an RGB SparseCtrl: encodes the keyframes."),
            ],
            outputs=[io.Conditioning.Output(display_name="positive", tooltip="positive with SparseCtrl attached."),
                     io.Conditioning.Output(display_name="negative", tooltip="negative with SparseCtrl attached.")],
        )

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        widgets = check_widgets(cls, values)
        if widgets is not True:
            return widgets
        if isinstance(values.get("keyframe_indexes"), str):
            try:
                parse_indexes(values["keyframe_indexes"])
            except MotionModelError as exc:
                return str(exc)
        start, end = values.get("start_percent"), values.get("end_percent")
        if start is not None and end is not None and start > end:
            return f"start_percent ({start}) must not be greater than end_percent ({end})"
        return True

    @classmethod
    def execute(cls, positive, negative, sparsectrl, images, keyframe_indexes="", strength=1.0, start_percent=0.0,
                end_percent=1.0, vae=None) -> io.NodeOutput:
        if strength == 0:
            return io.NodeOutput(positive, negative)
        return io.NodeOutput(*apply_sparsectrl(positive, negative, sparsectrl, images, parse_indexes(keyframe_indexes),
                                               strength, start_percent, end_percent, vae))


NODES = [LoadSparseCtrl, ApplySparseCtrl]
