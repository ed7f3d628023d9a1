"""Mutation score of the test suite (mutmut): small deliberate bugs are put into the product code one
at a time and the tests run after each; a mutant the tests do not fail on "survived".

mutmut keys mutants by the module path it sees from the file path, and the tests import this checkout
as the package ``animatediff_suite`` (tests/ads_package.py), so the tool stages a copy of the tracked
files as ``<stage>/animatediff_suite/`` and runs mutmut there. It prints the score per module (killed
and timed-out mutants over all, less the mutants listed as equivalent in
``tests/mutation_equivalent.txt`` with the reason) and every other surviving mutant with its diff.

    .venv/bin/pip install mutmut   # not a test requirement: a report, not part of CI
    python tests/tools/mutation.py motion_modules/context.py motion_modules/prompt_travel.py \\
        --tests tests/test_context.py tests/test_prompt_travel.py [--stage /tmp/ads_mutation] [--jobs 2]
    python tests/tools/mutation.py motion_modules/*.py            # every core module, the core tests
    COMFYUI_PATH=... python tests/tools/mutation.py nodes/context_sampling.py --tests tests/test_comfy_windows.py

Runs take long (every mutant runs the selected tests): pick the tests that cover the modules.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PACKAGE = "animatediff_suite"
EQUIVALENT = os.path.join(ROOT, "tests", "mutation_equivalent.txt")
CORE_TESTS = ["tests/test_context.py", "tests/test_temporal.py", "tests/test_formats.py", "tests/test_lora.py",
              "tests/test_freenoise_freeinit.py", "tests/test_prompt_travel.py", "tests/test_frame_layout.py",
              "tests/test_consistent_attention.py", "tests/test_parity_diffusers.py", "tests/test_bad_files.py",
              "tests/test_motion_predictor.py", "tests/test_sparsectrl.py", "tests/test_memory_estimate.py"]
KILLED = {"killed", "timeout"}


def stage(stage_dir: str, paths: list[str], tests: list[str], jobs: int) -> None:
    """A copy of the tracked files as ``stage_dir/animatediff_suite`` and mutmut's configuration."""
    package = os.path.join(stage_dir, PACKAGE)
    if os.path.exists(stage_dir):
        shutil.rmtree(stage_dir)
    os.makedirs(package)
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in files.decode().split("\0"):
        if name and os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(os.path.dirname(os.path.join(package, name)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), os.path.join(package, name))
    quoted = lambda items: ", ".join(f'"{PACKAGE}/{item}"' for item in items)  # noqa: E731
    with open(os.path.join(stage_dir, "pyproject.toml"), "w", encoding="utf-8") as handle:
        handle.write(f"[tool.mutmut]\npaths_to_mutate = [{quoted(paths)}]\ntests_dir = [{quoted(tests)}]\n"
                     f'also_copy = ["{PACKAGE}"]\n'
                     'pytest_add_cli_args = ["-p", "no:cacheprovider", "--import-mode=importlib", "-x", "-q"]\n')


def results(stage_dir: str, mutmut: str) -> dict[str, str]:
    """{mutant name: status} of every mutant."""
    out = subprocess.run([mutmut, "results", "--all", "true"], cwd=stage_dir, capture_output=True, text=True)
    found = {}
    for line in out.stdout.splitlines():
        match = re.match(r"\s*(\S+__mutmut_\d+): (.+)$", line)
        if match:
            found[match[1]] = match[2].strip()
    return found


def equivalents() -> dict[str, str]:
    """{mutant name: why it is equivalent} from tests/mutation_equivalent.txt (``name  # reason`` lines)."""
    listed = {}
    if os.path.exists(EQUIVALENT):
        with open(EQUIVALENT, encoding="utf-8") as handle:
            for line in handle:
                name, _, reason = line.partition("#")
                if name.strip():
                    listed[name.strip()] = reason.strip()
    return listed


def module_of(mutant: str) -> str:
    """``animatediff_suite.motion_modules.context.x_f__mutmut_3`` (functions) or ``...context.xǁClassǁm__mutmut_3``
    (methods) -> ``motion_modules.context``."""
    return re.split(r"\.x(?:_|ǁ)", mutant, maxsplit=1)[0].removeprefix(f"{PACKAGE}.")


def report(found: dict[str, str], stage_dir: str, mutmut: str, show_diffs: bool) -> list[str]:
    """Print the score per module and the surviving mutants; returns the survivors not listed as equivalent."""
    listed = equivalents()
    per_module = collections.defaultdict(collections.Counter)
    survivors = []
    for name, status in sorted(found.items()):
        counted = "equivalent" if name in listed and status not in KILLED else status
        per_module[module_of(name)][counted] += 1
        if status not in KILLED and name not in listed:
            survivors.append(name)
    columns = ("killed", "timeout", "equivalent", "survived", "no tests")
    print(f"{'module':<36} {'mutants':>8} " + " ".join(f"{c:>10}" for c in (*columns, "other")) + f" {'score':>7}")
    for module, counts in sorted(per_module.items()):
        total = sum(counts.values()) - counts["equivalent"]
        score = (counts["killed"] + counts["timeout"]) / total if total else 1.0
        other = sum(counts.values()) - sum(counts[c] for c in columns)  # not checked, suspicious, ...
        print(f"{module:<36} {sum(counts.values()):>8} " + " ".join(f"{counts[c]:>10}" for c in columns)
              + f" {other:>10} {score:>7.1%}")
    for name in survivors:
        print(f"survived: {name} ({found[name]})")
        if show_diffs:
            diff = subprocess.run([mutmut, "show", name], cwd=stage_dir, capture_output=True, text=True).stdout
            print("\n".join("    " + line for line in diff.splitlines()[-12:]))
    return survivors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="product files to mutate, relative to the repository")
    parser.add_argument("--tests", nargs="+", default=CORE_TESTS, help="test files to run against each mutant")
    parser.add_argument("--stage", default=os.path.join(ROOT, ".mutation"), help="work folder (replaced)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--diffs", action="store_true", help="show each survivor's diff")
    parser.add_argument("--report-only", action="store_true", help="report the last run in --stage")
    args = parser.parse_args()
    mutmut = shutil.which("mutmut") or os.path.join(os.path.dirname(sys.executable), "mutmut")
    if not os.path.exists(mutmut):
        print("mutmut is not installed: pip install mutmut", file=sys.stderr)
        return 2
    started = time.monotonic()
    if not args.report_only:
        stage(args.stage, args.paths, args.tests, args.jobs)
        # mutmut forks a child per mutant from a process that has run torch; an OpenMP thread pool does
        # not survive fork (the child hangs in its first parallel op until mutmut's timeout, which would
        # count the mutant as killed), so every process computes on one thread
        single = {name: "1" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
        subprocess.run([mutmut, "run", "--max-children", str(args.jobs)], cwd=args.stage,
                       stdout=subprocess.DEVNULL, check=False, env={**os.environ, **single})
    found = results(args.stage, mutmut)
    if not found:
        print(f"no mutants found in {args.stage}: did mutmut run?", file=sys.stderr)
        return 2
    report(found, args.stage, mutmut, args.diffs)
    print(f"run time {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
