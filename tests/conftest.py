"""Import the repository root as the package ``animatediff_suite``, whatever the checkout is called.

pytest runs with ``--import-mode=importlib`` (pyproject.toml) and .ci/run uses ``python -P``, so the
repository root is never on sys.path: our ``nodes/`` package must not shadow ComfyUI's ``nodes``.
"""

import os
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)  # for ads_package / ads_helpers

import ads_package  # noqa: E402

ads_package.register()


import pytest  # noqa: E402

import comfy_env  # noqa: E402

if os.environ.get("ADS_IMPORT_NODES_FIRST") == "1":
    # tests/tools/mutation.py over nodes/: this pack's nodes are imported (with ComfyUI) before any test
    # module, so the importer tests get nodes/ade_import.py under its own module name (__main__.ade_importer),
    # the name mutmut traces and switches mutants by
    import importlib

    path = comfy_env.comfyui_path()
    if path is None:
        raise RuntimeError(f"ADS_IMPORT_NODES_FIRST=1 needs a ComfyUI: {comfy_env.SKIP_REASON}")
    comfy_env.import_comfyui(path)
    importlib.import_module(f"{ads_package.PACKAGE}.nodes")


@pytest.fixture(scope="session")
def comfyui():
    """Path of a real ComfyUI, imported in-process on the CPU; skips the test when there is none."""
    path = comfy_env.comfyui_path()
    if path is None:
        comfy_env.skip_or_fail(comfy_env.SKIP_REASON)
    comfy_env.import_comfyui(path)
    return path


@pytest.fixture(scope="module")
def env(comfyui):
    """The tiny models, conditioning and modules of the in-process ComfyUI tests (comfy_helpers.make_env),
    built once per test module."""
    from comfy_helpers import make_env

    return make_env()


@pytest.fixture
def folders(comfyui, tmp_path):
    """ComfyUI's output and model folders pointed at tmp_path for one test, restored after it."""
    import copy

    import folder_paths
    from training_helpers import point_folders

    saved = copy.deepcopy(folder_paths.folder_names_and_paths), folder_paths.get_output_directory()
    point_folders(str(tmp_path))
    try:
        yield tmp_path
    finally:
        folder_paths.folder_names_and_paths.clear()
        folder_paths.folder_names_and_paths.update(saved[0])
        folder_paths.set_output_directory(saved[1])
        folder_paths.filename_list_cache.clear()


# The test files that take longest (about 70-470 s each on a 2-core machine, `--durations`), run first:
# .ci/run gives whole files to two workers (pytest-xdist, --dist loadfile), and long files left for the
# end would keep one worker busy while the other idles.
SLOW_FILES = ("test_training_modes.py", "test_training_cli.py", "test_soak.py", "test_frontend.py",
              "test_comfy_server.py", "test_training_extras.py", "test_bad_inputs.py", "test_training_predictor.py")


def pytest_collection_modifyitems(config, items):
    """Slowest files first (SLOW_FILES), every other test in its usual order."""
    rank = {name: place for place, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))  # stable: order within a file kept
    durations = _mutmut_durations()
    if durations:
        # a mutant's run (tests/tools/mutation.py) stops at the first failing test (-x), but mutmut passes the
        # covering tests in set order: fastest first, so a killed mutant costs its cheapest failing test
        items.sort(key=lambda item: durations.get(item.nodeid, 0.0))


def _mutmut_durations():
    """{test id: seconds} that mutmut measured, when these tests run inside a mutmut process; else None."""
    state = sys.modules.get("mutmut.state")
    return dict(state.state().duration_by_test) if state is not None else None
