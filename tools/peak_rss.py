"""Run a command and print its peak resident memory in MiB on the last line of stderr.

A child started by a large process (the bench holds models and task data) reports a peak RSS
floored at its parent's size: Linux carries the high-water mark of the memory it was forked
from across exec. Started from this small launcher instead, the command's peak is its own.
Only the standard library is imported, so the launcher's own size is a few MiB.

    python tools/peak_rss.py COMMAND [ARGS...]
"""

import resource
import subprocess
import sys


def main() -> int:
    if len(sys.argv) < 2:
        print("usage: peak_rss.py COMMAND [ARGS...]", file=sys.stderr)
        return 2
    returncode = subprocess.call(sys.argv[1:])
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(f"peak_rss_mb {peak_kib / 1024:.1f}", file=sys.stderr)
    return 128 - returncode if returncode < 0 else returncode  # killed by a signal: the shell's code


if __name__ == "__main__":
    sys.exit(main())
