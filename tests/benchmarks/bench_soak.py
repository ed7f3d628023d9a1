"""The soak test's day of use, longer, with the server's RSS curve (tests/soak.py).

Queues PROMPTS prompts through one real server (the good ones in turn, a failing, refused or
interrupted one after every third) and prints the server's RSS every --every prompts, relative to
its RSS after the first ten. Needs COMFYUI_PATH.

    COMFYUI_PATH=/path/to/ComfyUI python tests/benchmarks/bench_soak.py [--prompts 200] [--every 10]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ads_package  # noqa: E402
import comfy_env  # noqa: E402

ads_package.register()
comfy_env.import_comfyui(os.environ["COMFYUI_PATH"])  # the tiny model files are built with the pack's demo

from server_helpers import start_server  # noqa: E402
from soak import soak  # noqa: E402

MIB = 2 ** 20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--every", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ads_soak_") as workdir:
        server = start_server(os.environ["COMFYUI_PATH"], pathlib.Path(workdir) / "soak")
        try:
            result = soak(server, args.prompts)
        finally:
            server.stop()
    base = result.rss[min(9, len(result.rss) - 1)][1]
    print(f"{args.prompts} prompts in {result.seconds:.0f} s ({result.seconds / args.prompts:.2f} s/prompt)")
    print("| prompt | RSS MiB | vs after 10 |\n|---:|---:|---:|")
    for number, rss in result.rss:
        if number % args.every == 0 or number == len(result.rss):
            print(f"| {number} | {rss / MIB:.0f} | {(rss - base) / MIB:+.0f} MiB ({(rss - base) / base:+.1%}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
