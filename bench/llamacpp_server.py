"""llama-cpp-python's OpenAI server (`python -m llama_cpp.server ARGS`) with llama.cpp's weight
repacking ("extra buffer types") off. bench/peers.py runs this file with the python of
.peers/llama-cpp; it imports nothing from kiln.

Why: in llama-cpp-python 0.3.36 on this project's CPU (AVX-512 with AMX), the repacked weights
crash llama_decode with a segfault on the first real prompt. llama.cpp's own `--no-repack` turns
them off; the Python server has no such setting, so the default model parameters are patched
here (use_extra_bufts = False) and llama.cpp runs its AVX-512 kernels.
"""

from __future__ import annotations

import runpy
import sys

import llama_cpp.llama_cpp as lc

_default_params = lc.llama_model_default_params


def _no_repack_params():
    params = _default_params()
    params.use_extra_bufts = False
    return params


lc.llama_model_default_params = _no_repack_params

if __name__ == "__main__":
    sys.argv[0] = "llama_cpp.server"
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
