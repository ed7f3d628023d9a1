"""Load / Apply Semantic Motion Predictor: forms over the core (motion_modules/motion_predictor.py) and
motion_predictor_patch.py."""

from __future__ import annotations

import folder_paths
from .comfy_compat import io

from .folders import MOTION_PREDICTORS, file_fingerprint, full_path, sha256_prefix
from .motion_nodes import check_listed
from .motion_predictor_patch import image_embedding, load_predictor_patcher, patch_model
from .sockets import CATEGORY, MOTION_PREDICTOR
from .validation import check_widgets

STORY = f"{CATEGORY}/story"


class LoadMotionPredictor(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ADS_LoadMotionPredictor",
            display_name="Load Semantic Motion Predictor (StoryDiffusion)",
            category=STORY,
            description="Load a Semantic Motion Predictor trained with this pack (mode semantic_motion_predictor) "
                        "from models/animatediff_motion_predictor. No weights were published with the paper.",
            inputs=[io.Combo.Input("predictor_name", options=folder_paths.get_filename_list(MOTION_PREDICTORS),
                                   tooltip="Predictor file in models/animatediff_motion_predictor (written by the "
                                           "semantic_motion_predictor training).")],
            outputs=[MOTION_PREDICTOR.Output(display_name="MOTION_PREDICTOR",
                                             tooltip="For Apply Semantic Motion Predictor."),
                     io.String.Output(display_name="info", tooltip="Its size, image-embedding width, tokens per "
                                                                    "frame, layers fed, and the file's SHA-256 prefix.")],
        )

    @classmethod
    def validate_inputs(cls, predictor_name: str) -> bool | str:
        return check_listed(MOTION_PREDICTORS, predictor_name, "motion predictor")

    @classmethod
    def fingerprint_inputs(cls, predictor_name: str):
        return file_fingerprint(MOTION_PREDICTORS, predictor_name)

    @classmethod
    def execute(cls, predictor_name: str) -> io.NodeOutput:
        path = full_path(MOTION_PREDICTORS, predictor_name)
        loaded = load_predictor_patcher(path, predictor_name)
        info = f"{predictor_name}: {loaded.spec.describe()}, sha256 {sha256_prefix(path)}"
        return io.NodeOutput(loaded, info, ui={"text": [info]})


class ApplyMotionPredictor(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ADS_ApplyMotionPredictor",
            display_name="Apply Semantic Motion Predictor (StoryDiffusion)",
            category=STORY,
            description="Condition every frame's cross-attention on the predicted transition from a start image "
                        "to an end image (StoryDiffusion's Semantic Motion Predictor, paper eq. 6). Use with an "
                        "animated MODEL; the clip's length is the latent batch.",
            inputs=[
                io.Model.Input("model", tooltip="The (animated) model to condition."),
                MOTION_PREDICTOR.Input("motion_predictor", tooltip="From Load Semantic Motion Predictor."),
                io.ClipVision.Input("clip_vision", tooltip="The image encoder the predictor was trained with "
                                                           "(Load CLIP Vision; the paper: OpenCLIP ViT-H-14)."),
                io.Image.Input("start_image", tooltip="The first frame of the transition (the first image of a batch)."),
                io.Image.Input("end_image", tooltip="The last frame of the transition (the first image of a batch)."),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01, optional=True,
                               tooltip="Weight of the predictor tokens in the cross-attention: 1 as trained (paper "
                                       "eq. 6), 0 as if the predictor were not there."),
            ],
            outputs=[io.Model.Output(tooltip="A copy of MODEL whose cross-attention reads the predicted motion; "
                                             "the input MODEL is unchanged.")],
        )

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        return check_widgets(cls, values)

    @classmethod
    def execute(cls, model, motion_predictor, clip_vision, start_image, end_image, strength=1.0) -> io.NodeOutput:
        where = f"Apply Semantic Motion Predictor ('{motion_predictor.name}')"
        start = image_embedding(clip_vision, start_image, f"{where}: start_image")
        end = image_embedding(clip_vision, end_image, f"{where}: end_image")
        return io.NodeOutput(patch_model(model, motion_predictor, start, end, float(strength)))


NODES = [LoadMotionPredictor, ApplyMotionPredictor]
