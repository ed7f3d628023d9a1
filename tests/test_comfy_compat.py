"""ComfyUI tier, in-process: the newer-ComfyUI shims of nodes/comfy_compat.py on v0.3.64, with the newer
behaviour simulated where it can be (a dynamic-VRAM patcher class, MultiGPU clones, a core context
handler, extra outer_sample keywords, throttled progress)."""

from __future__ import annotations

import importlib
import sys
import time
import types

import pytest
import torch

from ads_helpers import raised_message
from comfy_helpers import apply, ksample, motion
from server_helpers import write_motion_model

pytestmark = pytest.mark.comfyui


@pytest.fixture
def dynamic_patchers(comfyui, monkeypatch):
    """Core loaders' patcher class set to one shaped like newer releases' ModelPatcherDynamic (on a
    CPU that class behaves as the plain patcher, which is what ComfyUI reroutes it to there)."""
    import comfy.model_patcher

    class DynamicLike(comfy.model_patcher.ModelPatcher):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.cached_patcher_init = None

        def is_dynamic(self):
            return True

    monkeypatch.setattr(comfy.model_patcher, "CoreModelPatcher", DynamicLike, raising=False)
    return DynamicLike


def test_nodes_use_the_newest_versioned_comfy_api(comfyui, monkeypatch):
    import comfy_api.latest
    import comfy_api.version_list

    from animatediff_suite.nodes import comfy_compat

    assert comfy_compat.api.__name__ == "comfy_api.v0_0_2"  # v0.3.64: v0_0_2, v0_0_1, latest; none stable
    assert comfy_compat.io is comfy_api.latest.io
    stable = types.ModuleType("fake_comfy_api_v0_0_1")
    stable.io, stable.ComfyExtension = object(), object()
    monkeypatch.setitem(sys.modules, stable.__name__, stable)
    newer_unstable = type("V9", (), {"VERSION": "0.0.9", "STABLE": False, "__module__": "comfy_api.v0_0_2"})
    older_stable = type("V1", (), {"VERSION": "0.0.1", "STABLE": True, "__module__": stable.__name__})
    monkeypatch.setattr(comfy_api.version_list, "supported_versions", [newer_unstable, older_stable])
    assert comfy_compat._api_module() is stable  # a stable version first
    monkeypatch.setattr(comfy_api.version_list, "supported_versions", [])
    assert comfy_compat._api_module() is comfy_api.latest


def test_motion_patcher_is_of_the_kind_core_loaders_make_and_can_be_rebuilt(env, dynamic_patchers, tmp_path):
    import comfy.model_patcher

    from animatediff_suite.nodes import injection

    path = tmp_path / "v2.ckpt"
    write_motion_model(path, "v2", seed=7)
    loaded = injection.load_motion_patcher(str(path), "v2.ckpt")
    assert type(loaded.patcher) is dynamic_patchers
    factory, args = loaded.patcher.cached_patcher_init
    rebuilt, plain = factory(*args), factory(*args, disable_dynamic=True)
    assert type(rebuilt) is dynamic_patchers and type(plain) is comfy.model_patcher.ModelPatcher
    for other in (rebuilt, plain):
        assert other.model is not loaded.patcher.model
        state, fresh = loaded.patcher.model.state_dict(), other.model.state_dict()
        assert state.keys() == fresh.keys() and all(torch.equal(state[k], fresh[k]) for k in state)


def test_sampling_with_dynamic_shaped_patchers_equals_plain_patchers(env, dynamic_patchers, monkeypatch):
    import comfy.model_patcher

    from animatediff_suite.nodes.context_sampling import KEY

    model, loaded = env["demo"].tiny_model(0), motion(env, "v1")
    animated = apply(env, model, loaded)
    assert type(model) is dynamic_patchers
    assert type(animated.get_additional_models_with_key(KEY)[0]) is dynamic_patchers
    dynamic = ksample(env, animated)
    monkeypatch.setattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
    plain = ksample(env, apply(env, env["demo"].tiny_model(0), motion(env, "v1")))
    assert torch.equal(dynamic, plain)


def test_the_injection_places_the_motion_model_registered_on_the_injected_patcher(env):
    """A per-device clone (MultiGPU's deep clone) carries its own motion model: the injection uses it."""
    from animatediff_suite.nodes.context_sampling import KEY

    model = env["demo"].tiny_model(0)
    first, second = motion(env, "v2", seed=1), motion(env, "v2", seed=2)
    swapped = apply(env, model, first)
    swapped.set_additional_models(KEY, [second.patcher.clone()])
    expected = ksample(env, apply(env, model, second))
    assert torch.equal(ksample(env, swapped), expected)
    assert not torch.equal(ksample(env, apply(env, model, first)), expected)


def test_multigpu_clones_are_refused_at_apply_and_at_sampling(env):
    model, loaded = env["demo"].tiny_model(0), motion(env, "v2")
    before = ksample(env, model)
    split = model.clone()
    split.set_additional_models("multigpu", [model.clone()])
    sentence = ("{}: this MODEL is split across several GPUs (ComfyUI's MultiGPU); AnimateDiff Suite's motion "
                "modules run on one device. Sample without the MultiGPU node")
    assert raised_message(lambda: apply(env, split, loaded)) == sentence.format("Apply Motion Model")
    animated = apply(env, model, loaded)
    animated.set_additional_models("multigpu", [animated.clone()])
    assert raised_message(lambda: ksample(env, animated)) == sentence.format("sampling an animated MODEL")
    assert torch.equal(ksample(env, model), before)


def test_core_context_windows_and_ours_are_refused_together(env):
    from comfy_extras.nodes_context_windows import ContextWindowsManualNode

    from animatediff_suite.motion_modules import ContextOptions

    model, loaded = env["demo"].tiny_model(0), motion(env, "v2")
    before = ksample(env, model)

    def core_windows(m):
        return ContextWindowsManualNode.execute(m, 16, 4, "standard_static", 1, False, "pyramid", 0).result[0]

    sentence = ("{}: this MODEL also has ComfyUI's own context windows (IndexListContextHandler, from a 'Context "
                "Windows' core node). They run outside this pack's windows and motion modules, so the two would "
                "window the clip twice; use only Context Options (AnimateDiff), which also gives FreeNoise, and "
                "remove the core Context Windows node")
    assert (raised_message(lambda: apply(env, core_windows(model), loaded, context=ContextOptions(16, 4)))
            == sentence.format("Apply Motion Model"))
    assert (raised_message(lambda: ksample(env, core_windows(apply(env, model, loaded)), frames=24))
            == sentence.format("sampling an animated MODEL"))
    assert torch.equal(ksample(env, model), before)


def test_extra_outer_sample_keywords_reach_the_sampler_through_our_wrapper(env):
    """Newer ComfyUI calls OUTER_SAMPLE wrappers with more keywords (latent_shapes): ours passes them on,
    also through FreeInit's passes."""
    import comfy.patcher_extension

    from animatediff_suite.nodes.context_nodes import FreeInitNode

    outer_kind = comfy.patcher_extension.WrappersMP.OUTER_SAMPLE
    received = []

    def newer_caller(executor, *args, **kwargs):  # as newer CFGGuider.sample calls the wrappers
        return executor(*args, latent_shapes=[tuple(args[0].shape)], **kwargs)

    def newer_outer_sample(executor, *args, latent_shapes=None, **kwargs):  # as newer outer_sample takes it
        received.append(latent_shapes)
        return executor(*args, **kwargs)

    loaded = motion(env, "v2")
    for free_init in (False, True):
        base = env["demo"].tiny_model(0)
        base.add_wrapper_with_key(outer_kind, "test.newer_caller", newer_caller)
        animated = apply(env, base, loaded)
        if free_init:
            animated = FreeInitNode.execute(animated, 2, "butterworth", 0.25, 0.25, 4, False).result[0]
        animated.add_wrapper_with_key(outer_kind, "test.newer_outer_sample", newer_outer_sample)
        received.clear()
        out = ksample(env, animated)
        assert received == [[(16, 4, 8, 8)]] * (2 if free_init else 1)
        plain = apply(env, env["demo"].tiny_model(0), loaded)
        if free_init:
            plain = FreeInitNode.execute(plain, 2, "butterworth", 0.25, 0.25, 4, False).result[0]
        assert torch.equal(out, ksample(env, plain))


def test_window_progress_under_throttled_updates_is_monotonic_and_ends_at_the_total(env, monkeypatch):
    """Newer ComfyUI drops progress updates closer than PROGRESS_THROTTLE_MIN_INTERVAL (except a bar's
    first and last): simulated here, the client still sees a rising bar that ends full."""
    import comfy.utils

    from animatediff_suite.motion_modules import ContextOptions, context_windows

    def throttled(self, value, total=None, preview=None):  # newer comfy.utils.ProgressBar.update_absolute
        self.total = total if total is not None else self.total
        value = min(value, self.total)
        self.current = value
        now, last = time.perf_counter(), getattr(self, "_last_time", None)
        if last is None or value >= self.total or now - last >= 0.1:
            self._last_time = now
            if self.hook is not None:
                self.hook(self.current, self.total, preview)

    monkeypatch.setattr(comfy.utils.ProgressBar, "update_absolute", throttled)
    reports = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK",
                        lambda value, total, preview, node_id=None: reports.append((value, total)))
    model = apply(env, env["demo"].tiny_model(0), motion(env, "v2"), context=ContextOptions(16, 4))
    ksample(env, model, steps=3, frames=40, callback=lambda *a: None)
    total = 3 * len(context_windows(40, ContextOptions(16, 4)))
    values = [value for value, _ in reports]
    assert values == sorted(values) and reports[-1] == (total, total)
    assert {t for _, t in reports} == {total}


def test_compat_module_is_the_only_node_module_naming_newer_comfyui_features():
    """Feature detection lives in one place: no other node module reads these names."""
    import os

    from ads_package import ROOT

    names = ("CoreModelPatcher", "cached_patcher_init", "is_dynamic", "context_handler", "\"multigpu\"",
             "PROGRESS_THROTTLE", "comfy_api.latest", "version_list")
    folder = os.path.join(ROOT, "nodes")
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py") and name != "comfy_compat.py":
            with open(os.path.join(folder, name), encoding="utf-8") as handle:
                text = handle.read()
            assert not [n for n in names if n in text], name
    importlib.import_module("animatediff_suite.nodes.comfy_compat")
