"""Training on the pack's own primitives: motion modules, MotionLoRAs, domain adapters, MotionDirector.

``config`` (TOML -> dataclass), ``data`` (videos, frame folders, CSV, in-memory clips), ``synthetic``
(test clips and camera-motion clips from stills), ``adapters`` (LoRAs as ComfyUI weight wrappers),
``trainer`` (the loop, through ComfyUI's guider), ``checkpoints`` (resumable state), ``export``
(files other tools load), ``session`` (one run, command line or node), ``cli`` (``python <pack> train``).
Nothing here is imported when ComfyUI loads the nodes, except by the training nodes.
"""
