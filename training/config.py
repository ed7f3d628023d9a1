"""The training configuration: a dataclass read from TOML, validated on load, written into outputs.

Example ``run.toml`` (every key has a default except the ones the mode needs)::

    mode = "motion_lora"
    name = "zoom_in"
    seed = 0

    [base]
    checkpoint = "v1-5-pruned-emaonly.safetensors"   # in models/checkpoints
    motion_model = "mm_sd15_v2.safetensors"          # in models/animatediff_models

    [data]
    folder = "/data/clips"        # videos (mp4/webm/gif/mov) or folders of frames, with .txt captions
    frames = 16
    stride = 4
    width = 256
    height = 256

    [train]
    steps = 300
    learning_rate = 5e-4
    rank = 32
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..motion_modules import MotionModelError

MODES = ("motion_module", "motion_lora", "domain_adapter", "motion_director", "semantic_motion_predictor")
LR_SCHEDULES = ("constant", "linear", "cosine")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
OPTIMIZERS = ("auto", "adamw", "adamw8bit")
NEW_MODULE_VERSIONS = ("auto", "v1", "v2", "v3", "sdxl_beta")


class ConfigError(MotionModelError):
    """A training configuration key is missing, unknown or out of range (the message names it)."""


@dataclass(frozen=True)
class BaseConfig:
    checkpoint: str = ""  # a name in models/checkpoints
    demo_seed: int = -1  # >= 0: the pack's tiny demo models (no download, for trying the trainer)
    motion_model: str = ""  # a name in models/animatediff_models; "" with mode motion_module: a new one
    new_motion_version: str = "auto"  # layout of a new zero-initialised module (auto: v2, SDXL: sdxl_beta)
    beta_schedule: str = "auto"  # as on Apply Motion Model; auto = the AnimateDiff schedule
    clip_vision: str = ""  # semantic_motion_predictor: the image encoder E, a name in models/clip_vision
    motion_predictor: str = ""  # semantic_motion_predictor: one to continue (models/animatediff_motion_predictor)


@dataclass(frozen=True)
class DataConfig:
    folder: str = ""  # videos or frame folders, each with a same-named .txt caption
    csv: str = ""  # alternatively a CSV of path,caption (paths relative to the CSV)
    frames: int = 16
    stride: int = 4
    width: int = 256
    height: int = 256
    flip: bool = True  # random horizontal flip
    caption_dropout: float = 0.1
    strict: bool = False  # fail on the first unusable file instead of skipping it
    buckets: bool = False  # train each clip at the size nearest its aspect ratio, of about width x height
    cache: bool = False  # keep VAE latents and text embeddings on disk (keyed by content, settings, weights)
    cache_folder: str = ""  # "" = output/animatediff_training/cache (shared by runs)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 1  # clips per step
    gradient_accumulation: int = 1
    learning_rate: float = 1e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    rank: int = 32  # LoRA modes
    gradient_checkpointing: bool = True
    precision: str = "auto"  # auto: fp32 on CPU, bf16 on a GPU that has it, else fp16
    spatial_learning_rate: float = 0.0  # motion_director: the spatial LoRA's (0 = learning_rate)
    debias_beta: float = 1.0  # motion_director: appearance-debiased loss (MotionDirector eq. 5)
    spatial_lora_dropout: float = 0.2  # motion_director: share of clips trained without the spatial LoRA
    max_nonfinite_steps: int = 5  # abort after this many non-finite losses in a row
    optimizer: str = "auto"  # auto: 8-bit AdamW (bitsandbytes) on a GPU when installed, else AdamW


@dataclass(frozen=True)
class PredictorConfig:
    """semantic_motion_predictor: the size of a new predictor (the paper's by default) and the loss."""

    hidden: int = 1024  # transformer width (paper: 1024)
    depth: int = 8  # transformer layers (paper: 8)
    heads: int = 16  # attention heads (paper: 12, which does not divide 1024; see motion_predictor.py)
    tokens: int = 4  # predictor tokens per frame in each cross-attention
    token_dim: int = 1024  # their width before each layer's own key/value projection
    embedding_loss: float = 0.0  # weight of MSE(P_i, E(frame i)) added to the diffusion loss (paper: 0)


@dataclass(frozen=True)
class OutputConfig:
    save_every: int = 100  # resumable checkpoint every N steps (and at the end / on interrupt)
    keep_last: int = 2  # resumable checkpoints kept
    log_every: int = 1
    tensorboard: bool = True  # also log to <run folder>/tensorboard when the tensorboard package is installed


@dataclass(frozen=True)
class ValidationConfig:
    every: int = 0  # sample a validation animation every N steps and after the last (0: never)
    prompt: str = ""  # "" = the first clip's caption
    negative: str = ""
    steps: int = 20
    cfg: float = 7.5
    sampler: str = "euler"  # a ComfyUI sampler name
    scheduler: str = "normal"  # a ComfyUI scheduler name
    seed: int = 0


@dataclass(frozen=True)
class Config:
    mode: str = "motion_lora"
    name: str = "animatediff_training"
    seed: int = 0
    base: BaseConfig = field(default_factory=BaseConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @property
    def animated(self) -> bool:
        """The mode trains on the animated model (a motion model in the UNet), trained or frozen."""
        return self.mode != "domain_adapter"


SECTIONS = {"base": BaseConfig, "data": DataConfig, "train": TrainConfig, "output": OutputConfig,
            "validation": ValidationConfig, "predictor": PredictorConfig}


def load_config(path: str) -> Config:
    """Read and validate a TOML file; errors name the file and the key."""
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except OSError as error:
        raise ConfigError(f"config {path!r}: cannot read it ({error.strerror})") from error
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config {path!r}: not valid TOML ({error})") from error
    return config_from_dict(raw, source=f"config {path!r}")


def config_from_dict(raw: Mapping[str, Any], source: str = "config", in_graph: bool = False) -> Config:
    """Build a Config from nested dicts (TOML tables), checking names, types and ranges.

    Args:
        in_graph: the models come from node inputs (no ``[base]`` checks), and the clips too unless
            ``[data] folder`` is set.
    """
    top = {f.name: f for f in dataclasses.fields(Config)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in top:
            raise ConfigError(f"{source}: unknown key {key!r}; expected one of {sorted(top)}")
        if key in SECTIONS:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: [{key}] must be a table, got {type(value).__name__}")
            values[key] = _section(SECTIONS[key], value, f"{source}: [{key}]")
        else:
            values[key] = _typed(top[key], value, f"{source}: {key}")
    config = Config(**values)
    check_config(config, source, in_graph)
    return config


def _section(cls, raw: Mapping[str, Any], where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {key!r}; expected one of {sorted(fields)}")
        values[key] = _typed(fields[key], value, f"{where} {key}")
    return cls(**values)


def _typed(spec: dataclasses.Field, value: Any, where: str):
    expected = {"int": int, "float": (int, float), "bool": bool, "str": str}.get(str(spec.type))
    if expected is None:
        raise ConfigError(f"{where}: must be a table")
    if isinstance(value, bool) and expected is not bool:
        raise ConfigError(f"{where}: expected {spec.type}, got a boolean")
    if not isinstance(value, expected):
        raise ConfigError(f"{where}: expected {spec.type}, got {type(value).__name__} {value!r}")
    return float(value) if spec.type == "float" else value


def _need(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{where}: {message}")


def check_config(config: Config, source: str = "config", in_graph: bool = False) -> None:
    """Ranges and combinations; raises ConfigError naming the key."""
    base, data, train, out = config.base, config.data, config.train, config.output
    _need(config.mode in MODES, f"{source}: mode", f"unknown mode {config.mode!r}; expected one of {list(MODES)}")
    _need(bool(config.name) and all(c.isalnum() or c in "-_." for c in config.name) and config.name[0] != ".",
          f"{source}: name", f"{config.name!r} must be a plain file-name stem (letters, digits, - _ .)")
    if not in_graph:
        _need((base.checkpoint != "") != (base.demo_seed >= 0), f"{source}: [base] checkpoint",
              "set exactly one of checkpoint (a file in models/checkpoints) and demo_seed")
        if config.mode in ("motion_lora", "motion_director"):
            _need(bool(base.motion_model) or base.demo_seed >= 0, f"{source}: [base] motion_model",
                  f"mode {config.mode!r} trains a LoRA of a motion model: name one in models/animatediff_models")
        if config.mode == "semantic_motion_predictor":
            _need(bool(base.motion_model) or base.demo_seed >= 0, f"{source}: [base] motion_model",
                  "mode 'semantic_motion_predictor' trains on an animated model (paper: AnimateDiff v2, frozen): "
                  "name a motion model in models/animatediff_models")
            _need(bool(base.clip_vision) or base.demo_seed >= 0, f"{source}: [base] clip_vision",
                  "mode 'semantic_motion_predictor' needs the image encoder E: name a CLIP vision model in "
                  "models/clip_vision (paper: OpenCLIP ViT-H-14)")
    if config.mode != "semantic_motion_predictor":
        for key in ("clip_vision", "motion_predictor"):
            _need(not getattr(base, key), f"{source}: [base] {key}",
                  f"only mode 'semantic_motion_predictor' uses it (mode is {config.mode!r})")
    _need(base.new_motion_version in NEW_MODULE_VERSIONS, f"{source}: [base] new_motion_version",
          f"{base.new_motion_version!r}; expected one of {list(NEW_MODULE_VERSIONS)}")
    if not in_graph or data.folder:
        _need(bool(data.folder) != bool(data.csv), f"{source}: [data] folder",
              "set exactly one of folder and csv (the training clips)")
    _need(1 <= data.frames <= 64, f"{source}: [data] frames", f"{data.frames} must be in 1..64")
    _need(data.stride >= 1, f"{source}: [data] stride", f"{data.stride} must be >= 1")
    for key in ("width", "height"):
        size = getattr(data, key)
        _need(64 <= size <= 2048 and size % 8 == 0, f"{source}: [data] {key}",
              f"{size} must be a multiple of 8 in 64..2048")
    _need(0.0 <= data.caption_dropout <= 1.0, f"{source}: [data] caption_dropout",
          f"{data.caption_dropout} must be in 0..1")
    for key in ("steps", "batch_size", "gradient_accumulation", "rank", "max_nonfinite_steps"):
        _need(getattr(train, key) >= 1, f"{source}: [train] {key}", f"{getattr(train, key)} must be >= 1")
    _need(train.learning_rate > 0, f"{source}: [train] learning_rate", f"{train.learning_rate} must be > 0")
    _need(train.spatial_learning_rate >= 0, f"{source}: [train] spatial_learning_rate", "must be >= 0")
    _need(0.0 <= train.spatial_lora_dropout <= 1.0, f"{source}: [train] spatial_lora_dropout",
          f"{train.spatial_lora_dropout} must be in 0..1")
    _need(train.warmup_steps >= 0, f"{source}: [train] warmup_steps", "must be >= 0")
    _need(train.weight_decay >= 0, f"{source}: [train] weight_decay", "must be >= 0")
    _need(train.max_grad_norm >= 0, f"{source}: [train] max_grad_norm", "must be >= 0 (0 = no clipping)")
    _need(train.lr_schedule in LR_SCHEDULES, f"{source}: [train] lr_schedule",
          f"{train.lr_schedule!r}; expected one of {list(LR_SCHEDULES)}")
    _need(train.precision in PRECISIONS, f"{source}: [train] precision",
          f"{train.precision!r}; expected one of {list(PRECISIONS)}")
    for key in ("save_every", "keep_last", "log_every"):
        _need(getattr(out, key) >= 1, f"{source}: [output] {key}", f"{getattr(out, key)} must be >= 1")
    _need(train.optimizer in OPTIMIZERS, f"{source}: [train] optimizer",
          f"{train.optimizer!r}; expected one of {list(OPTIMIZERS)}")
    check_validation(config.validation, f"{source}: [validation]")
    check_predictor(config.predictor, f"{source}: [predictor]")


def check_predictor(predictor: PredictorConfig, where: str) -> None:
    for key in ("hidden", "depth", "heads", "tokens", "token_dim"):
        _need(getattr(predictor, key) >= 1, f"{where} {key}", f"{getattr(predictor, key)} must be >= 1")
    _need(predictor.hidden % predictor.heads == 0, f"{where} heads",
          f"{predictor.heads} does not divide hidden {predictor.hidden}")
    _need(predictor.embedding_loss >= 0, f"{where} embedding_loss", f"{predictor.embedding_loss} must be >= 0")


def check_validation(validation: ValidationConfig, where: str) -> None:
    _need(validation.every >= 0, f"{where} every", f"{validation.every} must be >= 0 (0: no validation)")
    _need(1 <= validation.steps <= 1000, f"{where} steps", f"{validation.steps} must be in 1..1000")
    _need(0 < validation.cfg <= 100, f"{where} cfg", f"{validation.cfg} must be in (0, 100]")
    _need(validation.seed >= 0, f"{where} seed", f"{validation.seed} must be >= 0")
    try:  # the names ComfyUI offers (this module is also imported without ComfyUI, e.g. by a docs build)
        from .validation import check_sampler_names
    except ImportError:
        return
    check_sampler_names(validation.sampler, validation.scheduler, where)
