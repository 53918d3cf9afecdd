#!/usr/bin/env bash
# Prints the pip extra naming the DALI wheel for this machine (dali-cu12 | dali-cu13).
# Kept for scripts that call it; the Makefile asks .ci/select_build.py directly, which picks
# torch's build with the same detection (the rules: engine/gpu_probe.py).
exec "${PYTHON:-python3}" "$(dirname "$0")/select_build.py" --get dali_extra --no-probe
