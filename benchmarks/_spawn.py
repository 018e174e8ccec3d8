"""Run one command and report its pid, exit status, peak RSS and CPU time on a file descriptor.

Used by ``merge_memory.run_measured``. On Linux a child's ``ru_maxrss`` starts at the
high-water mark of the process it was forked from (the kernel carries the old address
space's peak across ``exec``), so a command forked straight from a benchmark driver that has
read large tensors reports at least the driver's own peak. This launcher imports nothing
heavy and is started with a fresh address space, so the command it forks starts from a few
MiB. Usage: ``python -I -S _spawn.py FD CMD...``; FD gets one line with the child's pid, then
one JSON line when it has finished. The command inherits stdin/stdout/stderr, cwd and env.
"""

import json
import os
import subprocess
import sys


def main() -> int:
    fd, cmd = int(sys.argv[1]), sys.argv[2:]
    with os.fdopen(fd, "w") as report:
        proc = subprocess.Popen(cmd)
        report.write(f"{proc.pid}\n")
        report.flush()
        _, status, usage = os.wait4(proc.pid, 0)
        report.write(json.dumps({"exit": os.waitstatus_to_exitcode(status), "maxrss_kib": usage.ru_maxrss,
                                 "cpu_s": usage.ru_utime + usage.ru_stime}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
