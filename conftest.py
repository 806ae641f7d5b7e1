"""pytest setup for the whole repository: tests/ and the notebooks that nbval executes.

Strict nbval compares each committed notebook output with what the code prints today, training
curves included, so the arithmetic must not depend on which x86-64 CPU runs it. Three libraries
pick their code by CPU, and each rounds differently on each path:

- PyTorch's own kernels pick AVX-512 or AVX2 code: ``ATEN_CPU_CAPABILITY=avx2`` pins AVX2,
  which every x86-64 CPU of the last decade has;
- MKL (matrix products, vector maths such as exp) picks its code by CPU model and vendor.
  ``MKL_CBWR=AVX2`` is honoured on Intel CPUs only (on AMD's, MKL falls back to its automatic
  choice and the two disagree in the last bits), so the pin is ``COMPATIBLE``: MKL's SSE2 path,
  without the approximate reciprocal instructions, the one branch MKL runs alike on Intel and
  AMD processors;
- oneDNN: ``ONEDNN_MAX_CPU_ISA=AVX2``.

The fourth source was AdamW's square root (MKL's vector maths even under ``COMPATIBLE``); the
package uses the fused AdamW, whose square root is the processor's correctly rounded one.
Checked by hashing the parameters after a warm-up and GRPO steps on an AMD EPYC and on the same
binaries under an emulated Intel CPU (``qemu-x86_64 -cpu Haswell``): identical with these pins,
different without them. The pins cost speed (MKL's SSE2 matrix products are slower), so they
are set for tests and for the headline runs only. A variable already set is left alone.
"""

import os
import platform

PINNED_CPU_NUMERICS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "AVX2"}

if platform.machine().lower() in {"x86_64", "amd64"}:
    for name, value in PINNED_CPU_NUMERICS.items():
        os.environ.setdefault(name, value)
