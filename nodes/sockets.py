"""The pack's node category and its custom socket types, in one place (node API only)."""

from .comfy_compat import io

CATEGORY = "AnimateDiff Suite"
MOTION_MODEL = io.Custom("MOTION_MODEL")  # carries an injection.LoadedMotionModel
MOTION_LORA = io.Custom("MOTION_LORA")  # a tuple of injection.MotionLoraEntry
CONTEXT_OPTIONS = io.Custom("CONTEXT_OPTIONS")  # a motion_modules.ContextOptions
STORY = io.Custom("STORY")  # a motion_modules.story.Story
STORY_BANK = io.Custom("STORY_BANK")  # a motion_modules.consistent_attention.ReferenceBank
SPARSECTRL = io.Custom("SPARSECTRL")  # a sparsectrl.LoadedSparseCtrl
MOTION_PREDICTOR = io.Custom("MOTION_PREDICTOR")  # a motion_predictor_patch.LoadedPredictor
