"""Beta schedules for animated models: the noise schedule a motion model was trained with, as an
object patch of ``model_sampling`` (REFERENCE §3)."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import comfy.model_sampling

from ..motion_modules import MotionModelError

@dataclass(frozen=True)
class BetaSchedule:
    """A named noise schedule: ComfyUI beta-schedule name and range, optionally LCM sampling."""

    beta_schedule: str
    linear_start: float
    linear_end: float
    lcm: bool = False

    def __call__(self, model):
        current = model.get_model_object("model_sampling")
        if self.lcm:
            base, kind = _lcm_sampling()
        else:
            base, kind = comfy.model_sampling.ModelSamplingDiscrete, _prediction_type(current)
        sampling_class = type(f"AnimateDiffSuite{kind.__name__}Sampling", (base, kind), {})
        settings = {"beta_schedule": self.beta_schedule, "linear_start": self.linear_start,
                    "linear_end": self.linear_end}
        return sampling_class(SimpleNamespace(sampling_settings=settings))


def _prediction_type(sampling) -> type:
    for kind in (comfy.model_sampling.V_PREDICTION, comfy.model_sampling.EPS):
        if isinstance(sampling, kind):
            return kind
    raise MotionModelError(f"beta schedules apply to EPS or v-prediction models; this model samples with "
                           f"{type(sampling).__name__}")


def _lcm_sampling() -> tuple[type, type]:
    """ComfyUI's LCM sampling classes (feature-detected: they live in comfy_extras in v0.3.x)."""
    places = [comfy.model_sampling]
    try:
        import comfy_extras.nodes_model_advanced as advanced
        places.append(advanced)
    except ImportError:
        pass
    base = next((p.ModelSamplingDiscreteDistilled for p in places if hasattr(p, "ModelSamplingDiscreteDistilled")), None)
    kind = next((p.LCM for p in places if hasattr(p, "LCM")), None)
    if base is None or kind is None:
        raise MotionModelError("the lcm schedule needs ComfyUI's LCM sampling classes, which this "
                               "ComfyUI version does not provide; pick another beta_schedule")
    return base, kind


# Named schedules; keys are the combo options (REFERENCE §3).
BETA_SCHEDULES = {
    "sqrt_linear (AnimateDiff)": BetaSchedule("sqrt_linear", 0.00085, 0.012),
    "linear (SD default)": BetaSchedule("linear", 0.00085, 0.012),
    "linear (AnimateDiff SDXL beta)": BetaSchedule("linear", 0.00085, 0.020),
    "lcm (AnimateLCM)": BetaSchedule("sqrt_linear", 0.00085, 0.012, lcm=True),
}
AUTO_SCHEDULE = {
    "v1": "sqrt_linear (AnimateDiff)", "v2": "sqrt_linear (AnimateDiff)", "v3": "sqrt_linear (AnimateDiff)",
    "sdxl_beta": "linear (AnimateDiff SDXL beta)", "hotshotxl": "linear (SD default)",
    "animatelcm": "lcm (AnimateLCM)",
}
SCHEDULE_OPTIONS = ["auto", "use existing", *BETA_SCHEDULES]


def schedule_name(name: str, spec) -> str:
    """The option ``name`` stands for with this motion model: ``auto`` resolved, others as they are."""
    name = AUTO_SCHEDULE[spec.version] if name == "auto" else name
    if name != "use existing" and name not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta schedule {name!r}; expected one of {sorted(SCHEDULE_OPTIONS)}")
    return name


def resolve_schedule(name: str, spec) -> BetaSchedule | None:
    name = schedule_name(name, spec)
    return None if name == "use existing" else BETA_SCHEDULES[name]
