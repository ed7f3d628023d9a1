"""``python <pack> train --config run.toml``: train headlessly with ComfyUI's Python, no server.

ComfyUI is imported in-process (``--comfyui``, ``$COMFYUI_PATH`` or the ComfyUI this pack is installed
in); model names resolve through its model folders (``extra_model_paths.yaml`` included), the run's
checkpoints and log go to ``output/animatediff_training/<name>/`` and the trained files to the model
folders of their kind (see export.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from ..motion_modules import MotionModelError
from .config import load_config

log = logging.getLogger(__name__)
EXIT_ERROR, EXIT_STOPPED = 2, 130


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python ComfyUI-AnimateDiff-Suite train",
        description="Train a motion module, MotionLoRA, domain adapter or MotionDirector LoRAs from a TOML "
                    "config (see README, Training).")
    parser.add_argument("--config", required=True, help="the run's TOML file")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run named in the config from its last saved state")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the config, models and data, print the plan and memory estimate, train nothing")
    parser.add_argument("--comfyui", help="ComfyUI folder (default: $COMFYUI_PATH or the one this pack is in)")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU (as ComfyUI's --cpu)")
    parser.add_argument("--base-directory", help="ComfyUI base directory for models/ and output/ (as ComfyUI's)")
    parser.add_argument("--output-directory", help="ComfyUI output directory (as ComfyUI's)")
    parser.add_argument("--extra-model-paths-config", action="append", default=[], metavar="YAML",
                        help="extra model folders, as ComfyUI's option of that name")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def find_comfyui(path: str | None) -> str:
    pack = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for candidate in (path, os.environ.get("COMFYUI_PATH"), os.path.join(pack, "..", "..")):
        if candidate and os.path.isfile(os.path.join(candidate, "main.py")):
            return os.path.abspath(candidate)
    raise MotionModelError("ComfyUI not found: pass --comfyui /path/to/ComfyUI, set COMFYUI_PATH, or install "
                           "this pack in ComfyUI/custom_nodes/")


def import_comfyui(args: argparse.Namespace) -> None:
    """Import ComfyUI in this process with the path options applied as its main.py applies them."""
    comfyui = find_comfyui(args.comfyui)
    from .distributed import pin_local_device

    pin_local_device()  # before ComfyUI picks its device
    if comfyui not in sys.path:
        sys.path.insert(0, comfyui)
    import comfy.cli_args

    comfy.cli_args.args.cpu = comfy.cli_args.args.cpu or args.cpu
    if args.base_directory:
        comfy.cli_args.args.base_directory = args.base_directory
    import folder_paths
    import utils.extra_config

    default_yaml = os.path.join(comfyui, "extra_model_paths.yaml")
    for yaml_path in ([default_yaml] if os.path.isfile(default_yaml) else []) + args.extra_model_paths_config:
        utils.extra_config.load_extra_path_config(yaml_path)
    if args.output_directory:
        folder_paths.set_output_directory(os.path.abspath(args.output_directory))
    from ..nodes.folders import register_folders

    register_folders()


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        config = load_config(args.config)
        import_comfyui(args)
        from .session import run_command_line

        return run_command_line(config, resume=args.resume, dry_run=args.dry_run)
    except MotionModelError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR


class StopRequest:
    """SIGTERM / first Ctrl-C: stop at the next step boundary (the state is saved); a second Ctrl-C
    interrupts the step (the state of the last finished step is saved)."""

    def __init__(self):
        self.signal: int | None = None

    def __call__(self) -> bool:
        return self.signal is not None

    def install(self):
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            if self.signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.signal = signum
            log.warning("stopping after the current step (%s); the state will be saved",
                        signal.Signals(signum).name)

        for s in previous:
            signal.signal(s, handler)
        return previous
