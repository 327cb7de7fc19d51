"""Run the numerically sensitive tests (pytest marker ``numerics``) under other CPU math paths.

A float32 result depends on the kernels that computed it, and those are chosen by the CPU (AVX2,
AVX-512, AMX), by the math libraries (MKL, oneDNN) and by the thread count. A test that passes on one
machine can fail on another when it compares floats that came along different paths bit for bit, or
within a tolerance that was measured rather than derived. This runner makes this machine take other
paths, so such a test fails here too (docs/reproducibility.md lists the settings, what each changes
and the tests that are marked).

    python tests/mathpaths.py                 # every setting (what `make test-mathpaths` runs)
    python tests/mathpaths.py scalar-kernels  # one setting (what .ci/run adds after `make test`)
    python tests/mathpaths.py --list          # the settings and the torch CPU capability under each

Extra arguments after ``--`` go to pytest. Exits non-zero when a setting fails.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (environment, what it changes). MKL_ENABLE_INSTRUCTIONS selects MKL's instruction set on Intel
# CPUs only (MKL ignores it on AMD); MKL_CBWR=COMPATIBLE takes MKL's conditional-numerical-reproducibility
# code path on every CPU, hence other GEMM blockings.
SETTINGS = {
    "scalar-kernels": (
        {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
         "DNNL_MAX_CPU_ISA": "SSE41"},
        "ATen's non-vectorised kernels (softmax, layer norm, attention, torch.randn's Box-Muller), MKL's "
        "compatible GEMMs, oneDNN's SSE4.1 convolutions",
    ),
    "avx2-kernels": (
        {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2"},
        "the AVX2 kernels of ATen, MKL and oneDNN: on an AVX-512 / AMX CPU another path than its default; "
        "skipped where AVX2 is already the default",
    ),
    "threads-2": (
        {"FVG_TEST_THREADS": "2"},
        "2 intra-op threads instead of 1 in the test session and the processes it starts: reductions "
        "split across threads",
    ),
}


def capability(env: dict) -> str:
    """torch's CPU capability in a fresh process with ``env``."""
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    return out.stdout.strip() or f"unknown ({out.stderr.strip()[-200:]})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("settings", nargs="*", help=f"names among {list(SETTINGS)} (default: all)")
    ap.add_argument("--list", action="store_true", help="print the settings and exit")
    args, pytest_args = ap.parse_known_args(argv)
    if pytest_args[:1] == ["--"]:
        pytest_args = pytest_args[1:]
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown:
        ap.error(f"unknown setting(s) {unknown}; choose among {list(SETTINGS)}")
    native = capability(dict(os.environ))
    if args.list:
        print(f"default: torch CPU capability {native}")
        for name, (env, what) in SETTINGS.items():
            print(f"{name}: {' '.join(f'{k}={v}' for k, v in env.items())} -> capability "
                  f"{capability({**os.environ, **env})}; {what}")
        return 0
    failed = []
    for name in args.settings or list(SETTINGS):
        env_add, _ = SETTINGS[name]
        env = {**os.environ, **env_add}
        if name == "avx2-kernels" and native == "AVX2":
            print(f"== {name}: skipped, AVX2 is this CPU's default path (the plain test run covers it)", flush=True)
            continue
        cap = capability(env)
        print(f"== {name}: {' '.join(f'{k}={v}' for k, v in env_add.items())} (torch CPU capability {cap})",
              flush=True)
        t0 = time.monotonic()
        rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "numerics", "-p", "no:cacheprovider",
                             "tests", *pytest_args], cwd=ROOT, env=env).returncode
        print(f"== {name}: {'passed' if rc == 0 else f'FAILED (exit {rc})'} in {time.monotonic() - t0:.0f} s",
              flush=True)
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"failed under: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
