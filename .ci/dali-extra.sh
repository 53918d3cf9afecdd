#!/usr/bin/env bash
# Prints the pip extra naming the DALI wheel for this machine:
#   dali-cu12  Pascal/Volta GPUs (sm < 7.5, e.g. the Kaggle P100) or a CUDA 12 driver
#   dali-cu13  Turing and newer with a CUDA 13 driver, and machines without a GPU
#              (DALI's CPU-only mode works with either wheel)
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi >/dev/null 2>&1; then
  echo dali-cu13; exit 0
fi
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
drv=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\)\..*/\1/p' | head -1)
major=${cap%%.*}; minor=${cap#*.}
if [ -n "$major" ] && { [ "$major" -lt 7 ] || { [ "$major" -eq 7 ] && [ "${minor:-0}" -lt 5 ]; }; }; then
  echo dali-cu12
elif [ -n "$drv" ] && [ "$drv" -lt 13 ]; then
  echo dali-cu12
else
  echo dali-cu13
fi
