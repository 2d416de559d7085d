"""Compile generated CUDA sources, unchanged, with g++ and launch them on numpy buffers.

``build(kernels)`` takes ``[(name, params, source), ...]`` (params as returned by
``codegen.*_params``), writes one C++ translation unit (the emulation header, every
source as it is, then one ``extern "C"`` launcher per kernel that runs the whole
grid sequentially), compiles it into a shared library in a cache directory keyed
by the hash of that text, and returns an :class:`Emulator`.
"""
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
CXXFLAGS = ["-std=c++17", "-O1", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math", "-Wall", "-Werror",
            "-Wno-unknown-pragmas"]  # `#pragma unroll` is CUDA's; g++ ignores it

_CTYPES = {"float": ctypes.c_float, "int": ctypes.c_int, "long long": ctypes.c_longlong}


def _ctype(c_type: str):
    if "*" in c_type:
        return ctypes.c_void_p
    return _CTYPES[c_type.replace("const", "").strip()]


def _launcher(name, params):
    decl = ", ".join(f"{t} {n}" for t, n in params)
    args = ", ".join(n for _, n in params)
    return (
        f'extern "C" void launch_{name}(unsigned int grid, unsigned int block, {decl}) {{\n'
        f"    snnkit_emu_launch(grid, block, {name}, {args});\n}}\n"
    )


def translation_unit(kernels) -> str:
    parts = ['#include "cuda_emu.h"\n']
    parts += [src + "\n" for _, _, src in kernels]
    parts += [_launcher(name, params) for name, params, _ in kernels]
    return "\n".join(parts)


def cache_dir() -> str:
    path = os.path.join(tempfile.gettempdir(), f"snnkit_cuda_emu_{os.getuid()}")
    os.makedirs(path, exist_ok=True)
    return path


def _compile(text: str) -> str:
    with open(os.path.join(HERE, "cuda_emu.h")) as f, open(os.path.join(HERE, "cuda_fp16.h")) as g:
        key = hashlib.sha256((text + f.read() + g.read() + " ".join(CXXFLAGS)).encode()).hexdigest()[:24]
    so = os.path.join(cache_dir(), f"emu_{key}.so")
    if os.path.exists(so):
        return so
    work = tempfile.mkdtemp(dir=cache_dir())
    try:
        cpp = os.path.join(work, "kernels.cpp")
        with open(cpp, "w") as f:
            f.write(text)
        out = os.path.join(work, "k.so")
        res = subprocess.run(["g++", *CXXFLAGS, "-I", HERE, cpp, "-o", out], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"g++ failed on the emulated CUDA sources:\n{res.stderr[-6000:]}")
        os.replace(out, so)  # atomic: concurrent builders agree
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return so


class Emulator:
    """Launchers for the kernels of one or more compiled libraries."""

    def __init__(self, libs, kernels):
        self._fns = {}
        self._libs = libs
        by_name = {name: params for name, params, _ in kernels}
        for lib in libs:
            for name, params in by_name.items():
                fn = getattr(lib, f"launch_{name}", None)
                if fn is not None:
                    fn.restype = None
                    fn.argtypes = [ctypes.c_uint, ctypes.c_uint] + [_ctype(t) for t, _ in params]
                    self._fns[name] = fn

    def __contains__(self, name):
        return name in self._fns

    def launch(self, name, n_threads: int, *args, block: int = 64):
        """Run kernel ``name`` over ``ceil(n_threads / block)`` blocks; numpy arrays pass as pointers."""
        grid = max(1, -(-n_threads // block))
        conv = [a.ctypes.data if isinstance(a, np.ndarray) else a for a in args]
        self._fns[name](grid, block, *conv)


def build(kernels, n_units: int = 2) -> Emulator:
    """Compile ``kernels`` (deduplicated by name) in ``n_units`` parallel translation units."""
    unique = list({name: (name, params, src) for name, params, src in kernels}.values())
    chunks = [unique[i::n_units] for i in range(n_units) if unique[i::n_units]]
    with ThreadPoolExecutor(len(chunks)) as pool:
        paths = list(pool.map(lambda c: _compile(translation_unit(c)), chunks))
    return Emulator([ctypes.CDLL(p) for p in paths], unique)
