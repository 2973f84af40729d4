"""Peak RSS of the input walk alone (issue 24, item 4): the file list (``discover``) or the stream.

    PYTHONPATH=/work/main python benchmarks/bench_walk_memory.py list DIR        # main: discover()
    PYTHONPATH=. python benchmarks/bench_walk_memory.py stream DIR               # iter_inputs()

``DIR``: e.g. 100 folders of 1,000 empty ``.png`` files. Prints the peak RSS after the walk.
"""

from __future__ import annotations

import resource
import sys

from cxr_batch.io.inputs import InputSpec, discover, iter_inputs


def main() -> None:
    mode, folder = sys.argv[1], sys.argv[2]
    spec = InputSpec(paths=(folder,))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n = len(discover(spec).files) if mode == "list" else sum(1 for _ in iter_inputs(spec))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{mode} {n} files: peak RSS {after:.1f} MB (before the walk {before:.1f} MB)")


if __name__ == "__main__":
    main()
