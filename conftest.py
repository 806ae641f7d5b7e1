"""pytest setup for the whole repository: tests/ and the notebooks that nbval executes.

Strict nbval compares each committed notebook output with what the code prints today, training
curves included, so the arithmetic must not depend on which x86-64 CPU runs it. PyTorch's own
kernels and MKL's matrix products pick AVX-512 code on CPUs that have it and AVX2 code
elsewhere, and the two round differently: a thousand warm-up steps later the models differ.
These variables pin PyTorch, MKL and oneDNN to their AVX2 code (any x86-64 CPU of the last
decade has it) before any kernel runs; nbval's kernels and the CLI runs the tests start inherit
them. The committed outputs were produced under the same settings (the README says how to
re-execute a notebook). The pins are not a full guarantee: an AMD EPYC and an Intel Xeon still
ended chapter 7's warm-up with different digits, so the outputs are those of the CPU family CI
runs on.  A variable already set is left alone.
"""

import os
import platform

PINNED_CPU_NUMERICS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2"}

if platform.machine().lower() in {"x86_64", "amd64"}:
    for name, value in PINNED_CPU_NUMERICS.items():
        os.environ.setdefault(name, value)
