"""ComfyUI nodes of AnimateDiff Suite (V3 schema, ids prefixed ``ADS_``)."""

from .comfy_compat import ComfyExtension, io

from .ade_routes import register_routes
from .animated_preview import register_routes as register_preview_routes
from .context_nodes import NODES as CONTEXT_NODES
from .demo import NODES as DEMO_NODES
from .folders import register_folders
from .motion_nodes import NODES as MOTION_NODES
from .motion_predictor_nodes import NODES as PREDICTOR_NODES
from .prompt_nodes import NODES as PROMPT_NODES
from .sparsectrl_nodes import NODES as SPARSECTRL_NODES
from .story_nodes import NODES as STORY_NODES
from .train_nodes import NODES as TRAIN_NODES

register_folders()
register_routes()
register_preview_routes()


class AnimateDiffSuiteExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*MOTION_NODES, *CONTEXT_NODES, *PROMPT_NODES, *SPARSECTRL_NODES, *STORY_NODES, *PREDICTOR_NODES, *TRAIN_NODES, *DEMO_NODES]
