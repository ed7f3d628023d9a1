"""The equivalent-mutant list (tests/mutation_equivalent.txt) still names the mutants that were checked.

mutmut numbers a function's mutants in the order it finds them in that function, so once a function's
code changes, ``...__mutmut_44`` may be another mutation than the one whose reason is written beside it,
and the list would then hide a real survivor from the score (two such entries were found and removed when
this check was written: their reasons described ``strict=`` mutants, their numbers by then meant a dropped
``operations=`` and a dropped ``dtype=``). Every entry carries the hash of its function's code when it was
checked; a changed function fails here until its mutants are checked again and rehashed."""

import os
import re

from ads_package import load_module

mutation = load_module("ads_mutation_tool", "tests/tools/mutation.py")


def test_every_equivalent_entry_names_the_mutant_that_was_checked():
    stale = mutation.stale_equivalents()
    assert stale == [], ("re-check these mutants (mutmut show NAME in a stage), then "
                         "tests/tools/mutation.py --rehash NAME:\n" + "\n".join(stale))


def test_every_entry_says_why():
    names = set()
    for name, digest, reason in mutation._entries():
        assert re.fullmatch(r"animatediff_suite\.(motion_modules|nodes)\.\w+\.x[_ǁ][\wǁ.]+__mutmut_\d+", name), name
        assert reason.strip(), f"{name}: no reason given"
        assert name not in names, f"{name} is listed twice"
        names.add(name)


def test_a_changed_function_makes_its_entries_stale(tmp_path, monkeypatch):
    """The hash follows the function's code: the same code (comments and blank lines aside) keeps it, a
    changed operator does not, and another function's change leaves it alone."""
    source = tmp_path / "m.py"
    source.write_text("def f(a):\n    return a < 1\n\n\nclass C:\n    def g(self):\n        return 2\n")
    before = mutation.function_hashes(str(source))
    assert set(before) == {"x_f", "xǁCǁg"}
    source.write_text("# a comment\ndef f(a):\n\n    return a < 1  # same\n\n\nclass C:\n    def g(self):\n"
                      "        return 3\n")
    after = mutation.function_hashes(str(source))
    assert after["x_f"] == before["x_f"] and after["xǁCǁg"] != before["xǁCǁg"]
    source.write_text("def f(a):\n    return a <= 1\n")
    assert mutation.function_hashes(str(source))["x_f"] != before["x_f"]
    # the check reads the repository's files: an entry for a function whose code differs is reported
    listed = tmp_path / "equivalent.txt"
    monkeypatch.setattr(mutation, "EQUIVALENT", str(listed))
    monkeypatch.setattr(mutation, "ROOT", str(tmp_path))
    os.makedirs(tmp_path / "motion_modules")
    (tmp_path / "motion_modules" / "m.py").write_text("def f(a):\n    return a < 1\n")
    listed.write_text(f"animatediff_suite.motion_modules.m.x_f__mutmut_1  # @{before['x_f']} `<` -> `<=`: whatever\n"
                      "animatediff_suite.motion_modules.m.x_gone__mutmut_1  # @000000000000 a function gone since\n")
    assert mutation.stale_equivalents() == [
        "animatediff_suite.motion_modules.m.x_gone__mutmut_1: motion_modules/m.py has no function x_gone now"]
    (tmp_path / "motion_modules" / "m.py").write_text("def f(a):\n    return a <= 1\n")
    stale = mutation.stale_equivalents()
    assert stale[0].startswith("animatediff_suite.motion_modules.m.x_f__mutmut_1: x_f in motion_modules/m.py changed")
    assert list(mutation.equivalents()) == []  # stale entries count as what mutmut found
    mutation.rehash(["animatediff_suite.motion_modules.m.x_f__mutmut_1"])
    now = mutation.function_hashes(str(tmp_path / "motion_modules" / "m.py"))["x_f"]
    assert now != before["x_f"]
    assert listed.read_text().splitlines()[0] == (
        f"animatediff_suite.motion_modules.m.x_f__mutmut_1  # @{now} `<` -> `<=`: whatever")
    assert mutation.stale_equivalents() == [  # only the removed function's entry is left
        "animatediff_suite.motion_modules.m.x_gone__mutmut_1: motion_modules/m.py has no function x_gone now"]
