"""What the fuzz harnesses share: their seed corpus, written from code.

A harness run with no corpus directory on its command line gets ``fuzz/corpus-NAME/``,
filled with its seeds (the directory is not committed: the seeds are code).
"""

from __future__ import annotations

import os


def corpus_args(argv: list[str], name: str, seeds: list[bytes]) -> list[str]:
    """argv with the seed corpus directory added when no corpus directory was given."""
    if any(not arg.startswith("-") for arg in argv[1:]):
        return argv
    directory = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"corpus-{name}")
    os.makedirs(directory, exist_ok=True)
    for n, seed in enumerate(seeds):
        with open(os.path.join(directory, f"seed-{n}"), "wb") as f:
            f.write(seed)
    return [*argv, directory]
