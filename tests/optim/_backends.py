"""The backends a CPU-tensor optimizer test runs on: eager always, ext where it is built (``-m ext``), Triton
through the interpreter (``TRITON_INTERPRET=1``, ``-m interpret``). (test_torch_parity.py has its own list, whose
Triton variant also runs on a GPU with CUDA tensors.)"""

import os

import pytest

from rotkern._backend import ext_available, triton_available

CPU_BACKENDS = [
    pytest.param("eager", id="eager"),
    pytest.param(
        "ext", marks=[pytest.mark.ext, pytest.mark.skipif(not ext_available(), reason="needs make ext")], id="ext"
    ),
    pytest.param(
        "triton",
        marks=[
            pytest.mark.interpret,
            pytest.mark.skipif(
                not (triton_available() and os.environ.get("TRITON_INTERPRET") == "1"), reason="TRITON_INTERPRET=1"
            ),
        ],
        id="triton",
    ),
]
