"""
``twistd`` under cProfile, every thread included, in CPU time:

    python benchmarks/profiled_twistd.py OUT.prof -n --pidfile= pop3d ...

``python -m cProfile`` (and ``twistd --profile``) see only the main thread,
but pop3d opens maildrops in the reactor's thread pool, so the Maildir scans
would be missing.  Here each thread gets its own profiler and all of them
are merged into OUT.prof when twistd exits (SIGTERM or SIGINT stop it
cleanly).  The clock is each thread's CPU time (``time.thread_time``), so
waiting (epoll, idle pool threads) costs nothing and the profile shows where
the CPU goes; set PROFILE_CLOCK=wall for wall-clock time instead.
benchmarks/run.py --profile uses this; read OUT.prof with
``python -m pstats OUT.prof``.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import sys
import threading
import time
from typing import Any


def main() -> None:
    output, arguments = sys.argv[1], sys.argv[2:]
    clock = time.perf_counter if os.environ.get("PROFILE_CLOCK") == "wall" else time.thread_time
    finished: list[cProfile.Profile] = []
    lock = threading.Lock()
    original_run = threading.Thread.run

    def profiled_run(self: threading.Thread, *args: Any, **kwargs: Any) -> None:
        profile = cProfile.Profile(clock)
        profile.enable()
        try:
            original_run(self, *args, **kwargs)
        finally:
            profile.disable()
            with lock:
                finished.append(profile)

    threading.Thread.run = profiled_run  # type: ignore[method-assign]

    from twisted.application import app
    from twisted.scripts.twistd import run

    # twistd stopped by a signal kills itself with it again once the reactor
    # has stopped, which would lose the profile: exit normally instead.
    app._exitWithSignal = lambda signal_number: None

    sys.argv = ["twistd", *arguments]
    main_profile = cProfile.Profile(clock)
    main_profile.enable()
    try:
        run()
    finally:
        main_profile.disable()
        stats = pstats.Stats(main_profile)
        with lock:
            for profile in finished:
                stats.add(profile)
        stats.dump_stats(output)
        print(f"profile of {1 + len(finished)} threads written to {output}", flush=True)


if __name__ == "__main__":
    main()
