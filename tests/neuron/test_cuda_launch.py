"""The CuPy launch path (``snnkit._cupy``, ``ops.multistep``, ``_bitpack_cuda.pack``) on CPU, with CuPy faked.

A GPU runs this path in ``tests/gpu``; here a stand-in ``cupy`` module records what
the launch layer hands to CuPy (source, options, device, grid, block, typed
arguments, stream) and runs the recorded kernel call under the CPU emulation of
``test_cuda_emulation``, so a wrong argument order, type, grid or device switch
fails on any machine. Tensors are CPU tensors of a subclass that reports a CUDA
device (the launch layer reads only ``device``, ``is_cuda`` and ``data_ptr``).
"""
import shutil
import sys
import types

import numpy as np
import pytest
import torch

from snnkit import _cupy, surrogate
from snnkit.memopt import _bitpack_cuda as bitpack
from snnkit.neuron import _reference
from snnkit.neuron._cuda import codegen, ops


class _OnCuda1(torch.Tensor):
    """A CPU tensor that says it lives on ``cuda:1`` (results of torch ops on it say so too)."""

    @property
    def device(self):
        return torch.device("cuda", 1)

    @property
    def is_cuda(self):
        return True


class _OnCuda0(_OnCuda1):
    @property
    def device(self):
        return torch.device("cuda", 0)


class _FakeCupy:
    """The parts of CuPy the launch layer uses; records compilations, streams and launches."""

    def __init__(self, run=None):
        self.current = None  # device of the innermost ``cupy.cuda.Device`` block
        self.compiled, self.launches, self.streams = [], [], []
        self.run = run  # called as run(name, grid, block, args) for every launch
        fake = self

        class Device:
            def __init__(self, index):
                self.index = index

            def __enter__(self):
                self.outer, fake.current = fake.current, self.index

            def __exit__(self, *exc):
                fake.current = self.outer

        class ExternalStream:
            def __init__(self, pointer, device):
                self.pointer, self.device = pointer, device
                fake.streams.append(self)

        class RawModule:
            def __init__(self, code, options):
                self.code, self.options = code, options

            def get_function(self, name):
                fake.compiled.append((name, self.code, self.options, fake.current))

                def kernel(grid, block, args, stream):
                    fake.launches.append(dict(name=name, grid=grid, block=block, args=args, stream=stream,
                                              device=fake.current))  # fmt: skip
                    if fake.run is not None:
                        fake.run(name, grid, block, args)

                return kernel

        self.module = types.ModuleType("cupy")
        self.module.RawModule = RawModule
        self.module.cuda = types.SimpleNamespace(Device=Device, ExternalStream=ExternalStream)


@pytest.fixture
def fake_cupy(monkeypatch):
    """Install a fake ``cupy`` and torch's CUDA stream queries; the current torch device is 0."""
    fake = _FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", fake.module)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: types.SimpleNamespace(
        cuda_stream=0x5000 + device.index))  # fmt: skip
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for cache in (_cupy.function, _cupy._stream):  # never keep (or reuse) fake kernels and streams
        cache.cache_clear()
    yield fake
    for cache in (_cupy.function, _cupy._stream):
        cache.cache_clear()


def _emulate(name, grid, block, args):
    """Run a recorded launch on CPU: the typed CuPy arguments go to the emulated kernel as they are."""
    from .test_cuda_emulation import _emulator

    emu, _ = _emulator()
    assert all(isinstance(a, (np.uint64, np.float32, np.int32, np.int64)) for a in args)
    emu._fns[name](grid[0], block[0], *[a.item() for a in args])


needs_gpp = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (CPU emulation of the kernels)")


def _params():
    return _reference.NeuronParams("lif", 0.6, -0.2, False, surrogate.Sigmoid(), 3.0, True)


@needs_gpp
@pytest.mark.parametrize("current_device", [0, 1])
@pytest.mark.parametrize("n,store", [(600, False), (37, True)])  # vectorised over 3 blocks; scalar, 1 block
def test_multistep_launches_on_the_tensors_device_and_stream(fake_cupy, monkeypatch, current_device, n, store):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current_device)
    fake_cupy.run = _emulate
    p = _params()
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(4, n, generator=g) * 0.8 + 0.35).as_subclass(_OnCuda1)
    v = (torch.rand(n, generator=g) * 0.5).as_subclass(_OnCuda1)
    spike, v_out = ops.multistep(x, v, p, store)  # no grad needed: h_seq is not written
    spec = ops.launch_spec(ops.spec_for(p, torch.float32), n, [x])
    name = codegen.forward_name(spec)
    assert (spec.vec > 1) == (n % 4 == 0)
    assert fake_cupy.compiled == [(name, codegen.forward_source(spec), codegen.NVCC_OPTIONS, 1)]
    (launch,) = fake_cupy.launches
    threads = n // spec.vec
    assert launch["name"] == name and launch["block"] == (_cupy.BLOCK,)
    assert launch["grid"] == ((threads + _cupy.BLOCK - 1) // _cupy.BLOCK,)
    assert launch["device"] == (None if current_device == 1 else 1)  # switched only when not current
    (stream,) = fake_cupy.streams
    assert launch["stream"] is stream and (stream.pointer, stream.device) == (0x5001, 1)
    pointers = [int(a) for a in launch["args"][:5]]
    assert pointers == [x.data_ptr(), v.data_ptr(), spike.data_ptr(), 0, v_out.data_ptr()]
    assert [type(a) for a in launch["args"][5:]] == [np.float32] * 3 + [np.int32] * 2 + [np.int64]
    assert [a.item() for a in launch["args"][5:]] == [np.float32(0.6), np.float32(-0.2), 3.0, int(store), 4, n]
    ref_spike, ref_v = _reference.multistep(x.as_subclass(torch.Tensor), v.as_subclass(torch.Tensor), p, store)
    assert torch.equal(spike.as_subclass(torch.Tensor), ref_spike)  # the emulated launch ran every neuron
    assert torch.equal(v_out.as_subclass(torch.Tensor), ref_v)
    ops.multistep(x, v, p, store)  # a second call: compiled function and stream come from the caches
    assert len(fake_cupy.compiled) == 1 and len(fake_cupy.streams) == 1 and len(fake_cupy.launches) == 2


def test_backward_kernel_goes_through_the_same_launcher(fake_cupy):
    spec = ops._vectorised(ops.spec_for(_params(), torch.float16))
    t = torch.zeros(2, 16, dtype=torch.float16).as_subclass(_OnCuda0)
    args = (t, t, t, t, t[0], 1.0, 0.0, 2.0, 0.5, 1, 2, 16)
    ops._cupy_launcher(*ops._backward_kernel(spec), 2, args)
    assert fake_cupy.compiled == [(codegen.backward_name(spec), codegen.backward_source(spec), codegen.NVCC_OPTIONS, 0)]
    (launch,) = fake_cupy.launches
    assert launch["grid"] == (1,) and launch["device"] is None  # cuda:0 is current: no switch
    assert [type(a) for a in launch["args"]] == [np.uint64] * 5 + [np.float32] * 4 + [np.int32] * 2 + [np.int64]
    assert int(launch["args"][4]) == t[0].data_ptr() and (launch["stream"].pointer, launch["stream"].device) == (
        0x5000, 0)  # fmt: skip


def test_multistep_input_checks():
    p = _params()
    x, v = torch.zeros(3, 2, 4).as_subclass(_OnCuda1), torch.zeros(2, 4).as_subclass(_OnCuda1)
    cases = [
        ((x, v.as_subclass(_OnCuda0)), "x_seq is on cuda:1 but the state v is on cuda:0"),
        ((x, v.half()), "x_seq is torch.float32 but the state v is torch.float16"),
        ((x, v[:, :3]), r"v of shape \(2, 3\) does not match x_seq\[0\] of shape \(2, 4\)"),
        ((x[0, 0, 0], v[0, 0]), r"v of shape \(\) does not match x_seq\[0\] of shape \(\)"),
        ((x.transpose(1, 2).contiguous().transpose(1, 2), v), r"non-contiguous x_seq with strides \(8, 1, 2\)"),
        ((x, v.t().contiguous().t()), r"non-contiguous v with strides \(1, 2\)"),
        ((x, torch.zeros(2, 4)), "needs CUDA tensors, got x_seq on cuda:1 and v on cpu"),
    ]
    for (xi, vi), message in cases:
        with pytest.raises(ValueError, match=message):
            ops.multistep(xi, vi, p)


def test_bitpack_public_functions_launch_with_cupy(monkeypatch):
    seen = []
    monkeypatch.setattr(bitpack, "_pack", lambda s, launcher: seen.append(("pack", s, launcher)) or "packed")
    monkeypatch.setattr(bitpack, "_unpack", lambda *a: seen.append(("unpack", *a)) or "out")
    s = torch.zeros(9).as_subclass(_OnCuda1)
    assert bitpack.pack(s) == "packed" and bitpack.unpack(s, 9, torch.float16) == "out"
    assert seen == [("pack", s, _cupy.launch_kernel), ("unpack", s, 9, torch.float16, _cupy.launch_kernel)]
    with pytest.raises(ValueError, match="CUDA bit packing needs a CUDA tensor, got packed on cpu"):
        bitpack.unpack(torch.zeros(2, dtype=torch.uint8), 9, torch.float32)


def test_launch_kernel_converts_the_bitpack_arguments(fake_cupy):
    s, packed = torch.zeros(20).as_subclass(_OnCuda1), torch.zeros(3, dtype=torch.uint8).as_subclass(_OnCuda1)
    flag = torch.zeros((), dtype=torch.bool).as_subclass(_OnCuda1)
    params = bitpack.pack_params("float32")
    _cupy.launch_kernel(bitpack.pack_name("float32"), bitpack.pack_source("float32"), params, 3,
                        (s, packed, flag, 20))  # fmt: skip
    (launch,) = fake_cupy.launches
    assert [int(a) for a in launch["args"]] == [s.data_ptr(), packed.data_ptr(), flag.data_ptr(), 20]
    assert launch["grid"] == (1,) and launch["device"] == 1 and fake_cupy.compiled[0][2] == ()
