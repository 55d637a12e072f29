"""Run every benchmark (`python -m benchmarks`), or each one tiny (`--smoke`, for CI).

In smoke mode each benchmark runs in a process of its own (`python -m benchmarks.bench_x
--smoke`); the run fails, naming them, if any of them does. Stopped (SIGTERM, Ctrl-C), it stops
the running one the same way and waits for it to take down what it started.
"""

import importlib
import pkgutil
import subprocess
import sys
import time

import benchmarks

benchmarks.exit_on_sigterm()

names = sorted(
    m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name.startswith("bench_")
)
if "--smoke" in sys.argv[1:]:
    failed = []
    for name in names:
        started = time.monotonic()
        bench = subprocess.Popen([sys.executable, "-m", f"benchmarks.{name}", "--smoke"])
        try:
            code = bench.wait()
        except BaseException as stop:
            if not isinstance(stop, KeyboardInterrupt):  # Ctrl-C reached it already
                bench.terminate()
            bench.wait(timeout=300)
            raise
        print(
            f"smoke {name}: {'ok' if code == 0 else f'FAILED (exit {code})'} in "
            f"{time.monotonic() - started:.1f} s",
            flush=True,
        )
        if code != 0:
            failed.append(name)
    if failed:
        sys.exit(f"benchmark smoke run failed: {', '.join(failed)}")
else:
    for name in names:
        importlib.import_module(f"benchmarks.{name}").main()
