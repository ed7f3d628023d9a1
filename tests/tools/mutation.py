"""Mutation score of the test suite (mutmut): small deliberate bugs are put into the product code one
at a time and the tests run after each; a mutant the tests do not fail on "survived".

mutmut keys mutants by the module path it sees from the file path, and the tests import this checkout
as the package ``animatediff_suite`` (tests/ads_package.py), so the tool stages a copy of the tracked
files as ``<stage>/animatediff_suite/`` and runs mutmut there. It prints the score per module (killed
and timed-out mutants over the mutants checked, less those listed as equivalent in
``tests/mutation_equivalent.txt`` with the reason) and every other surviving mutant with its diff.

    .venv/bin/pip install mutmut   # not a test requirement: a report, not part of CI
    python tests/tools/mutation.py motion_modules/context.py motion_modules/prompt_travel.py \\
        --tests tests/test_context.py tests/test_prompt_travel.py [--stage /tmp/ads_mutation] [--jobs 2]
    python tests/tools/mutation.py motion_modules/*.py            # every core module, the core tests
    COMFYUI_PATH=... python tests/tools/mutation.py nodes/*.py --tests tests/test_comfy_windows.py ... --sample 200
    python tests/tools/mutation.py motion_modules/*.py --stage /tmp/m --resume --recheck   # after new tests

Runs take long (every mutant runs the selected tests): pick the tests that cover the modules.
``--resume`` continues a run in ``--stage`` with the files as they are now: the mutants not checked yet run
(also those of functions changed since; mutmut keeps the results of unchanged functions), then the
survivors again. ``--sample N`` (fresh, or with ``--resume`` after a stopped run) checks a seeded random
sample of N of the mutants not checked yet instead of all of them, and the report estimates the score over
all mutants from it (mutants checked outside the sample count as themselves). ``--recheck`` (with
``--resume``) runs each survivor against only the tests added since that cover its function, which kills
what a full rerun would (it passed every older test already) in a fraction of the time. A resume also runs the
mutants no test covered again; ``--restat FILE...`` makes mutmut trace those test files again first (it traces
only tests it has not seen, so a test that now reaches more code, or was changed, needs this; with
``--recheck`` the survivors run against those tests too).

An entry of the equivalent list carries the hash of its function's code when the mutant was checked (mutmut
numbers mutants per function, so a changed function may give the name to another mutation); a stale entry is
reported and not counted as equivalent, and ``--rehash NAME...`` writes the current hash once the mutant has
been checked again.

Over ``nodes/`` the tests import the pack's nodes (with ComfyUI) before any test module (ADS_IMPORT_NODES_FIRST,
tests/conftest.py), so the ADE importer's tests run ``nodes/ade_import.py`` under the module name mutmut traces.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import os
import random
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
UNCHECKED = "not checked"
# mutmut forks a child per mutant from a process that has run torch; an OpenMP thread pool does not survive
# fork (the child hangs in its first parallel op until mutmut's timeout, which would count the mutant as
# killed), so every process computes on one thread
ONE_THREAD = {name: "1" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
NO_SUCH_MUTANT = "no_such_mutant__mutmut_0"  # a name that matches nothing: mutmut generates and collects, then stops


def copy_tracked(package: str) -> None:
    """Copy the repository's tracked files into ``package`` (times kept: mutmut compares them)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in files.decode().split("\0"):
        if name and os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(os.path.dirname(os.path.join(package, name)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), os.path.join(package, name))


def stage(stage_dir: str, paths: list[str], tests: list[str], jobs: int) -> None:
    """A copy of the tracked files as ``stage_dir/animatediff_suite`` and mutmut's configuration."""
    package = os.path.join(stage_dir, PACKAGE)
    if os.path.exists(stage_dir):
        shutil.rmtree(stage_dir)
    os.makedirs(package)
    copy_tracked(package)
    quoted = lambda items: ", ".join(f'"{PACKAGE}/{item}"' for item in items)  # noqa: E731
    with open(os.path.join(stage_dir, "pyproject.toml"), "w", encoding="utf-8") as handle:
        handle.write(f"[tool.mutmut]\npaths_to_mutate = [{quoted(paths)}]\ntests_dir = [{quoted(tests)}]\n"
                     f'also_copy = ["{PACKAGE}"]\n'
                     'pytest_add_cli_args = ["-p", "no:cacheprovider", "--import-mode=importlib", "-x", "-q"]\n')


def refresh(stage_dir: str) -> None:
    """Bring the staged files up to date for ``--resume``. mutmut keeps the results of functions whose
    code is unchanged and checks the mutants of changed functions afresh."""
    if not os.path.isdir(os.path.join(stage_dir, "mutants")):
        raise SystemExit(f"--resume: {stage_dir} holds no mutmut run; run once without --resume")
    copy_tracked(os.path.join(stage_dir, PACKAGE))


def draw_sample(stage_dir: str, found: dict[str, str], size: int, seed: int) -> None:
    """Draw ``size`` of the mutants not checked yet (all of them in a fresh stage), seeded, and record the
    draw and the number it was drawn from in ``sample.txt``: the score of the unchecked rest is then
    estimated from the sample's."""
    unchecked = sorted(name for name, status in found.items() if status == UNCHECKED)
    names = random.Random(seed).sample(unchecked, min(size, len(unchecked)))
    with open(os.path.join(stage_dir, "sample.txt"), "w", encoding="utf-8") as handle:
        handle.write(f"# {len(names)} drawn from {len(unchecked)} unchecked mutants, seed {seed}\n")
        handle.write("\n".join(names) + "\n")
    print(f"sample: {len(names)} of the {len(unchecked)} unchecked mutants (seed {seed})")


def read_sample(stage_dir: str) -> tuple[int, set[str]] | None:
    """(population the sample was drawn from, names drawn), or None without a sample."""
    path = os.path.join(stage_dir, "sample.txt")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        header, *names = handle.read().split("\n")
    return int(re.search(r"drawn from (\d+)", header)[1]), {name for name in names if name}


def recorded_tests(stage_dir: str) -> set[str]:
    """The test ids mutmut has collected stats for in ``stage_dir``."""
    path = os.path.join(stage_dir, "mutants", "mutmut-stats.json")
    if not os.path.exists(path):
        return set()
    with open(path, encoding="utf-8") as handle:
        return set(json.load(handle)["duration_by_test"])


def forget_stats(stage_dir: str, files: list[str]) -> set[str]:
    """Drop the stats mutmut recorded for the tests of ``files`` (test files, relative to the repository), so
    the next run collects them again: mutmut collects stats only for tests it has none for, and a test that
    now reaches code it did not before (a fixture changed, not the test) would stay blind to it."""
    path = os.path.join(stage_dir, "mutants", "mutmut-stats.json")
    with open(path, encoding="utf-8") as handle:
        stats = json.load(handle)
    prefixes = tuple(f"{PACKAGE}/{name}::" for name in files)
    gone = {test for test in stats["duration_by_test"] if test.startswith(prefixes)}
    stats["duration_by_test"] = {t: d for t, d in stats["duration_by_test"].items() if t not in gone}
    stats["tests_by_mangled_function_name"] = {
        f: [t for t in tests if t not in gone] for f, tests in stats["tests_by_mangled_function_name"].items()}
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(stats, handle)
    os.replace(path + ".tmp", path)
    return gone


def _pytest(stage_dir: str, mutant: str, tests: list[str], limit: float) -> int:
    """Run ``tests`` in mutmut's mutated tree with ``mutant`` active (``""``: none); 124 on a timeout."""
    env = {**os.environ, **ONE_THREAD, "MUTANT_UNDER_TEST": mutant}
    try:
        return subprocess.run([sys.executable, "-P", "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                              cwd=os.path.join(stage_dir, "mutants"), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=limit).returncode
    except subprocess.TimeoutExpired:
        return 124


def _record_kill(stage_dir: str, name: str) -> None:
    """Mark ``name`` killed in mutmut's results (the .meta file of its module)."""
    path = os.path.join(stage_dir, "mutants", PACKAGE, *module_of(name).split(".")) + ".py.meta"
    with open(path, encoding="utf-8") as handle:
        meta = json.load(handle)
    meta["exit_code_by_key"][name] = 1
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(meta, handle)
    os.replace(path + ".tmp", path)


def recheck(stage_dir: str, found: dict[str, str], listed: dict[str, str], before: set[str], jobs: int,
            extra: list[str]) -> None:
    """Run every surviving mutant against only the tests added since its run (those mutmut had no stats
    for before this resume) that cover its function, and record the ones they kill. A survivor has
    already passed every older test, so this gives what a full rerun would, in a fraction of the time.
    ``extra``: test files outside the stage's selection, run against every survivor."""
    with open(os.path.join(stage_dir, "mutants", "mutmut-stats.json"), encoding="utf-8") as handle:
        stats = json.load(handle)
    durations = stats["duration_by_test"]
    new = set(durations) - before
    extra = [f"{PACKAGE}/{path}" for path in extra]
    durations.update({path: 30.0 for path in extra})  # not timed by mutmut: a generous guess
    survivors = [n for n, status in found.items() if status == "survived" and n not in listed]
    plan = {}
    for name in survivors:
        covering = set(stats["tests_by_mangled_function_name"].get(name.rsplit("__mutmut_", 1)[0], ())) & new
        if covering or extra:
            plan[name] = sorted(covering, key=durations.get) + extra
    print(f"recheck: {len(new)} new tests, covering {len(plan)} of {len(survivors)} survivors")
    if not plan:
        return
    every = sorted({t for tests in plan.values() for t in tests}, key=durations.get)
    if _pytest(stage_dir, "", every, 600 + 20 * sum(durations[t] for t in every)) != 0:
        raise SystemExit("--recheck: the new tests fail on the unmutated code in the stage; fix them first")

    def check(name):
        tests = plan[name]
        return name, _pytest(stage_dir, name, tests, 300 + 20 * sum(durations[t] for t in tests))

    killed, timeouts = [], 0
    cheapest_first = sorted(plan, key=lambda n: sum(durations[t] for t in plan[n]))
    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
        for name, code in pool.map(check, cheapest_first):
            if code == 124:  # not counted as a kill: a slow machine is no evidence
                timeouts += 1
            elif code not in (0, 5):  # 5: nothing collected, which cannot kill anything
                killed.append(name)
                _record_kill(stage_dir, name)  # as they come, so a stopped recheck keeps what it found
    if timeouts:
        print(f"recheck: {timeouts} timed out and stay survivors")
    print(f"recheck: {len(killed)} of {len(plan)} killed by the new tests")


def run_mutmut(stage_dir: str, mutmut: str, jobs: int, names: list[str]) -> None:
    """``mutmut run`` (all mutants not checked yet, or the named ones)."""
    subprocess.run([mutmut, "run", "--max-children", str(jobs), *names], cwd=stage_dir,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL if names == [NO_SUCH_MUTANT] else None,
                   check=False, env={**os.environ, **ONE_THREAD})


def results(stage_dir: str, mutmut: str) -> dict[str, str]:
    """{mutant name: status} of every mutant."""
    out = subprocess.run([mutmut, "results", "--all", "true"], cwd=stage_dir, capture_output=True, text=True)
    found = {}
    for line in out.stdout.splitlines():
        match = re.match(r"\s*(\S+__mutmut_\d+): (.+)$", line)
        if match:
            found[match[1]] = match[2].strip()
    return found


def function_hashes(path: str) -> dict[str, str]:
    """{mutmut's name of each function in the file (``x_f``, ``xǁClassǁm``): a hash of its syntax tree}. mutmut
    numbers a function's mutants in the order it finds them in that function, so while the hash holds, a mutant's
    name means the same mutation (for the same mutmut release)."""
    import ast
    import hashlib

    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    hashes = {}

    def visit(body, owner=None):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                key = f"xǁ{owner}ǁ{node.name}" if owner else f"x_{node.name}"
                hashes[key] = hashlib.sha256(ast.dump(node, annotate_fields=False).encode()).hexdigest()[:12]
            elif isinstance(node, ast.ClassDef):
                visit(node.body, f"{owner}.{node.name}" if owner else node.name)

    visit(tree.body)
    return hashes


def _entries() -> list[tuple[str, str, str]]:
    """(name, function hash or "", reason) of each line of tests/mutation_equivalent.txt."""
    rows = []
    with open(EQUIVALENT, encoding="utf-8") as handle:
        for line in handle:
            name, _, comment = line.partition("#")
            if name.strip():
                match = re.match(r"\s*@([0-9a-f]{12})\s+(.*)$", comment.strip())
                rows.append((name.strip(), *(match.groups() if match else ("", comment.strip()))))
    return rows


def _function_of(name: str) -> tuple[str, str]:
    """``animatediff_suite.nodes.x.xǁCǁm__mutmut_3`` -> (``nodes/x.py``, ``xǁCǁm``)."""
    module = module_of(name)
    function = name[len(PACKAGE) + len(module) + 2:].rsplit("__mutmut_", 1)[0]
    return module.replace(".", "/") + ".py", function


def stale_equivalents() -> list[str]:
    """The entries that no longer name the mutant that was checked, each with why: the function's code has
    changed since (or is gone), or the entry has no hash. Re-check the mutant (``mutmut show NAME`` in the
    stage) and, if it is still equivalent, ``--rehash NAME``."""
    stale, hashes = [], {}
    for name, digest, _ in _entries():
        path, function = _function_of(name)
        if path not in hashes:
            full = os.path.join(ROOT, path)
            hashes[path] = function_hashes(full) if os.path.isfile(full) else {}
        now = hashes[path].get(function)
        if now is None:
            stale.append(f"{name}: {path} has no function {function} now")
        elif not digest:
            stale.append(f"{name}: no @hash of its function")
        elif now != digest:
            stale.append(f"{name}: {function} in {path} changed since it was checked (@{digest}, now @{now})")
    return stale


def rehash(names: list[str]) -> None:
    """Write the current hash of each named entry's function into tests/mutation_equivalent.txt (after
    checking that the mutant under that name is still the one its reason describes)."""
    with open(EQUIVALENT, encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    wanted, done = set(names), set()
    for i, line in enumerate(lines):
        name, _, comment = line.partition("#")
        if name.strip() in wanted:
            path, function = _function_of(name.strip())
            digest = function_hashes(os.path.join(ROOT, path))[function]
            reason = re.sub(r"^\s*@[0-9a-f]{12}\s+", "", comment.strip())
            lines[i] = f"{name.strip()}  # @{digest} {reason}"
            done.add(name.strip())
    if wanted - done:
        raise SystemExit(f"--rehash: not in {EQUIVALENT}: {', '.join(sorted(wanted - done))}")
    with open(EQUIVALENT, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines))


def equivalents(stale: list[str] | None = None) -> dict[str, str]:
    """{mutant name: why it is equivalent} from tests/mutation_equivalent.txt (``name  # @hash reason`` lines),
    less the stale entries (``stale_equivalents()``, or the list given), which count as what mutmut found."""
    names = {line.split(":", 1)[0] for line in (stale_equivalents() if stale is None else stale)}
    return {name: reason for name, _, reason in _entries() if name not in names}


def module_of(mutant: str) -> str:
    """``animatediff_suite.motion_modules.context.x_f__mutmut_3`` (functions) or ``...context.xǁClassǁm__mutmut_3``
    (methods) -> ``motion_modules.context``."""
    return re.split(r"\.x(?:_|ǁ)", mutant, maxsplit=1)[0].removeprefix(f"{PACKAGE}.")


def report(found: dict[str, str], stage_dir: str, mutmut: str, show_diffs: bool) -> list[str]:
    """Print the score per module and the surviving mutants; returns the survivors not listed as equivalent."""
    stale = stale_equivalents()
    listed = equivalents(stale)
    for line in stale:
        print(f"stale equivalent, counted as mutmut found it: {line}")
    per_module = collections.defaultdict(collections.Counter)
    survivors = []
    for name, status in sorted(found.items()):
        counted = "equivalent" if name in listed and status not in KILLED else status
        per_module[module_of(name)][counted] += 1
        if status not in KILLED and name not in listed:
            survivors.append(name)
    columns = ("killed", "timeout", "equivalent", "survived", "no tests", UNCHECKED)
    print(f"{'module':<36} {'mutants':>8} " + " ".join(f"{c:>11}" for c in (*columns, "other")) + f" {'score':>7}")
    per_module["all"] = sum(per_module.values(), collections.Counter())
    for module, counts in sorted(per_module.items(), key=lambda item: (item[0] == "all", item[0])):
        # the score is over the mutants checked: killed and timed out over all checked, less equivalents
        checked = sum(counts.values()) - counts["equivalent"] - counts[UNCHECKED]
        score = (counts["killed"] + counts["timeout"]) / checked if checked else float("nan")
        other = sum(counts.values()) - sum(counts[c] for c in columns)  # suspicious, segfault, ...
        print(f"{module:<36} {sum(counts.values()):>8} " + " ".join(f"{counts[c]:>11}" for c in columns)
              + f" {other:>11} {score:>7.1%}")
    drawn = read_sample(stage_dir)
    if drawn:
        estimate(found, listed, *drawn)
    for name in survivors:
        if found[name] == UNCHECKED:
            continue
        print(f"survived: {name} ({found[name]})")
        if show_diffs:
            diff = subprocess.run([mutmut, "show", name], cwd=stage_dir, capture_output=True, text=True).stdout
            print("\n".join("    " + line for line in diff.splitlines()[-12:]))
    return survivors


def estimate(found: dict[str, str], listed: dict[str, str], population: int, sample: set[str]) -> None:
    """The score over all mutants when a random sample stands for the ``population`` that was unchecked when it
    was drawn: every mutant checked outside the sample counts as itself, the sample's kill rate (equivalent
    ones removed in proportion) stands for the rest."""
    def counts(names):
        checked = [n for n in names if found[n] != UNCHECKED]
        equivalent = sum(1 for n in checked if n in listed and found[n] not in KILLED)
        return len(checked), equivalent, sum(1 for n in checked if found[n] in KILLED)
    outside = [n for n in found if n not in sample and found[n] != UNCHECKED]
    (n_out, eq_out, k_out), (n_s, eq_s, k_s) = counts(outside), counts(sample)
    if n_s - eq_s <= 0:
        print(f"sample: none of its {len(sample)} mutants checked yet")
        return
    rest = population * (n_s - eq_s) / n_s  # the population less its equivalent share
    score = (k_out + k_s / (n_s - eq_s) * rest) / (n_out - eq_out + rest)
    print(f"sample: {n_s} of {len(sample)} drawn mutants checked ({k_s} killed, {eq_s} equivalent), standing "
          f"for {population} unchecked; {n_out} checked outside it ({k_out} killed, {eq_out} equivalent)")
    print(f"estimated score over all mutants: {score:.1%}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", help="product files to mutate, relative to the repository")
    parser.add_argument("--tests", nargs="+", default=CORE_TESTS, help="test files to run against each mutant")
    parser.add_argument("--stage", default=os.path.join(ROOT, ".mutation"), help="work folder (replaced)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--diffs", action="store_true", help="show each survivor's diff")
    parser.add_argument("--report-only", action="store_true", help="report the last run in --stage")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --stage with the current tests: unchecked mutants and survivors")
    parser.add_argument("--sample", type=int,
                        help="check only this many of the unchecked mutants, drawn at random (seeded)")
    parser.add_argument("--seed", type=int, default=0, help="the seed of --sample's draw")
    parser.add_argument("--recheck", action="store_true",
                        help="with --resume: run survivors against the new tests only (those that cover them)")
    parser.add_argument("--restat", nargs="+", default=[], metavar="TEST_FILE",
                        help="with --resume: collect mutmut's stats of these test files again (changed tests, or tests "
                             "that now reach code they did not; mutmut otherwise collects stats for new tests only)")
    parser.add_argument("--recheck-with", nargs="+", default=[], metavar="TEST_FILE",
                        help="with --recheck: also run every survivor against these test files (outside the "
                             "stage's test selection, e.g. a test file written after the stage was made)")
    parser.add_argument("--rehash", nargs="+", default=[], metavar="MUTANT",
                        help="write the current hash of these entries' functions into tests/mutation_equivalent.txt "
                             "(after checking that each name still means the mutation its reason describes), then stop")
    args = parser.parse_args()
    if args.rehash:
        rehash(args.rehash)
        return 0
    if not args.paths:
        parser.error("name the product files to mutate (e.g. motion_modules/*.py)")
    mutmut = shutil.which("mutmut") or os.path.join(os.path.dirname(sys.executable), "mutmut")
    if not os.path.exists(mutmut):
        print("mutmut is not installed: pip install mutmut", file=sys.stderr)
        return 2
    started = time.monotonic()
    if any(path.replace(os.sep, "/").startswith("nodes/") for path in args.paths):
        os.environ["ADS_IMPORT_NODES_FIRST"] = "1"  # tests/conftest.py: the ADE importer under its own name
    before_file = os.path.join(args.stage, "tests_before_recheck.txt")
    if args.resume:
        refresh(args.stage)
        # first, so that a recheck counts the re-traced tests as new ones (a changed test may kill survivors)
        forgotten = forget_stats(args.stage, args.restat) if args.restat else set()
        if args.restat:
            print(f"--restat: stats of {len(forgotten)} tests forgotten, collected again")
        # the tests of the run a recheck continues (kept until a recheck completes, so a stopped one resumes)
        if os.path.exists(before_file):
            with open(before_file, encoding="utf-8") as handle:
                before = set(handle.read().split("\n")) - {""} - forgotten
        else:
            before = recorded_tests(args.stage)
            if args.recheck:
                with open(before_file, "w", encoding="utf-8") as handle:
                    handle.write("\n".join(sorted(before)) + "\n")
        drawn = read_sample(args.stage)
        # generate the mutants of changed functions and collect new tests; a run without a sample checks
        # every unchecked mutant on the way
        run_mutmut(args.stage, mutmut, args.jobs, [NO_SUCH_MUTANT] if drawn or args.sample else [])
    elif not args.report_only:
        stage(args.stage, args.paths, args.tests, args.jobs)
        if args.sample:
            run_mutmut(args.stage, mutmut, args.jobs, [NO_SUCH_MUTANT])  # generates them and collects the tests
        else:
            run_mutmut(args.stage, mutmut, args.jobs, [])
    if args.resume or (args.sample and not args.report_only):
        found = results(args.stage, mutmut)
        listed = equivalents()
        if args.sample and not read_sample(args.stage):
            draw_sample(args.stage, found, args.sample, args.seed)
        drawn = read_sample(args.stage)
        if args.resume and args.recheck:
            recheck(args.stage, found, listed, before, args.jobs, args.recheck_with)
            os.remove(before_file)
            found = results(args.stage, mutmut)
        # the sample's mutants not checked yet, those no test covered (new tests may), and every survivor (not
        # listed as equivalent) again, unless --recheck has run them against the new tests
        again = sorted(name for name, status in found.items() if status not in KILLED and name not in listed
                       and (not drawn or name in drawn[1] or status != UNCHECKED)
                       and (status in (UNCHECKED, "no tests") or not (args.resume and args.recheck)))
        if drawn is None and any(found[name] == UNCHECKED for name in again):
            print("--resume: mutants are still unchecked after the run (stopped?)", file=sys.stderr)
        if again:
            run_mutmut(args.stage, mutmut, args.jobs, again)
    found = results(args.stage, mutmut)
    if not found:
        print(f"no mutants found in {args.stage}: did mutmut run?", file=sys.stderr)
        return 2
    report(found, args.stage, mutmut, args.diffs)
    print(f"run time {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
