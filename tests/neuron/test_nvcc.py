"""Every generated CUDA source compiles with the real CUDA compiler, without a warning.

One translation unit holds every configuration (each source unchanged); it is
compiled to a cubin for sm_80 and sm_90 with the options the CuPy backend uses
and ``-Werror all-warnings``. ptxas must report every kernel, with no spills.
Skipped only where ``nvcc`` is not installed.
"""
import importlib.util
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from snnkit.neuron._cuda import codegen


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


def _all_kernels():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_emu", "kernels.py")
    spec = importlib.util.spec_from_file_location("snnkit_cuda_emu_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.all_kernels()


def _compile(arch, cu, out):
    cmd = [NVCC, "-cubin", f"-arch={arch}", *codegen.NVCC_OPTIONS, "-Werror", "all-warnings", "-Xptxas", "-v"]
    cmd += [cu, "-o", out]
    return subprocess.run(cmd, capture_output=True, text=True)


def test_every_source_compiles_for_sm80_and_sm90(tmp_path):
    kernels = _all_kernels()
    cu = tmp_path / "all.cu"
    cu.write_text("\n".join(src for _, _, src in kernels))
    archs = ("sm_80", "sm_90")
    with ThreadPoolExecutor(len(archs)) as pool:
        results = list(pool.map(lambda a: _compile(a, str(cu), str(tmp_path / f"{a}.cubin")), archs))
    for arch, res in zip(archs, results):
        log = res.stdout + res.stderr
        assert res.returncode == 0, f"nvcc failed for {arch}:\n{log[-6000:]}"
        assert "warning" not in log.lower(), f"nvcc warned for {arch}:\n{log[-6000:]}"
        compiled = set(re.findall(r"Compiling entry function '(\w+)' for '" + arch, log))
        assert compiled == {name for name, _, _ in kernels}
        spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
        assert spills and all(a == "0" and b == "0" for a, b in spills), f"register spills for {arch}"
