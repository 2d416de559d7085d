"""Every generated CUDA source compiles with the real CUDA compiler, without a warning.

One translation unit holds every configuration (each source unchanged); it is
compiled to a cubin for sm_80 and sm_90 with the options the CuPy backend uses
and ``-Werror all-warnings``. ptxas must report every kernel, with no spills.
Skipped only where ``nvcc`` is not installed. Like the CPU emulation's builds, a
compilation's outcome (exit code and log) is kept in a cache keyed by the exact
source, options and compiler version, so an unchanged kernel set is checked
against its stored log instead of being compiled again (about 25 s on 2 cores).
"""
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest

from snnkit.memopt import _bitpack_cuda as bitpack
from snnkit.neuron._cuda import codegen

from .cuda_emu import kernels as cuda_kernels


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    for root in sorted(os.listdir("/usr/local"), reverse=True) if os.path.isdir("/usr/local") else []:
        path = os.path.join("/usr/local", root, "bin", "nvcc")
        if root.startswith("cuda") and os.path.exists(path):
            return path
    return None


NVCC = _nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc (CUDA toolkit) is not installed")


def _compile(arch, cu, out):
    """``(exit code, log)`` of compiling ``cu`` for ``arch``, from the cache when this exact input was seen."""
    cmd = [NVCC, "-cubin", f"-arch={arch}", *codegen.NVCC_OPTIONS, "-Werror", "all-warnings", "-Xptxas", "-v"]
    version = subprocess.run([NVCC, "--version"], capture_output=True, text=True).stdout
    with open(cu) as f:
        key = hashlib.sha256("\0".join([f.read(), " ".join(cmd[1:]), version]).encode()).hexdigest()[:24]
    cached = os.path.join(tempfile.gettempdir(), f"snnkit_nvcc_{os.getuid()}", f"{key}.json")
    if os.path.exists(cached):
        with open(cached) as f:
            return tuple(json.load(f))
    res = subprocess.run([*cmd, cu, "-o", out], capture_output=True, text=True)
    outcome = (res.returncode, res.stdout + res.stderr)
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    with open(cached + ".tmp", "w") as f:
        json.dump(outcome, f)
    os.replace(cached + ".tmp", cached)  # atomic: concurrent runs agree
    return outcome


def _every_kernel():
    """Every configuration of :func:`cuda_kernels.all_kernels`, and the bit packing of every dtype."""
    kernels = {name: (name, params, src) for name, params, src in cuda_kernels.all_kernels()}
    for dt in bitpack._BIT_DTYPES:
        kernels[bitpack.pack_name(dt)] = (bitpack.pack_name(dt), bitpack.pack_params(dt), bitpack.pack_source(dt))
        kernels[bitpack.unpack_name(dt)] = (bitpack.unpack_name(dt), bitpack.unpack_params(dt),
                                            bitpack.unpack_source(dt))  # fmt: skip
    return list(kernels.values())


@pytest.mark.slow  # about 30 s when its cache (keyed by the sources) is cold
def test_every_source_compiles_for_sm80_and_sm90(tmp_path):
    kernels = _every_kernel()
    cu = tmp_path / "all.cu"
    cu.write_text("\n".join(src for _, _, src in kernels))
    archs = ("sm_80", "sm_90")
    with ThreadPoolExecutor(len(archs)) as pool:
        results = list(pool.map(lambda a: _compile(a, str(cu), str(tmp_path / f"{a}.cubin")), archs))
    for arch, (returncode, log) in zip(archs, results):
        assert returncode == 0, f"nvcc failed for {arch}:\n{log[-6000:]}"
        assert "warning" not in log.lower(), f"nvcc warned for {arch}:\n{log[-6000:]}"
        compiled = set(re.findall(r"Compiling entry function '(\w+)' for '" + arch, log))
        assert compiled == {name for name, _, _ in kernels}
        spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
        assert spills and all(a == "0" and b == "0" for a, b in spills), f"register spills for {arch}"
