"""Launching dualcomm's NVRTC-compiled kernels on the current torch CUDA stream, through the
CUDA driver API (ctypes): for the GPU tests and the GPU check, and until the Rust core drives
the kernels itself. Needs a GPU; importing it does not."""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path
from typing import Any

import torch

from dualcomm.nvrtc import Nvrtc, kernel_sources


class _RecordLayout(ctypes.Structure):
    """`dualcomm::RecordLayout` in cuda/common.cuh."""

    _fields_ = [("x_bytes", ctypes.c_int), ("scale_bytes", ctypes.c_int), ("num_topk", ctypes.c_int)]


def record_layout(x_bytes: int, scale_bytes: int, num_topk: int) -> _RecordLayout:
    return _RecordLayout(x_bytes, scale_bytes, num_topk)


@cache
def _driver() -> ctypes.CDLL:
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    return lib


def _check(code: int, what: str) -> None:
    if code != 0:
        msg = ctypes.c_char_p()
        _driver().cuGetErrorString(code, ctypes.byref(msg))
        raise RuntimeError(f"{what}: CUDA error {code} ({(msg.value or b'?').decode()})")


class Kernels:
    """Every kernel of `cuda_dir`, compiled for this GPU's architecture and loaded."""

    def __init__(self, cuda_dir: Path) -> None:
        torch.cuda.init()
        torch.empty(1, device="cuda")  # makes torch's primary context current
        major, minor = torch.cuda.get_device_capability()
        nvrtc = Nvrtc()
        self._functions: dict[str, ctypes.c_void_p] = {}
        self._modules = []
        for name, src in kernel_sources(cuda_dir).items():
            compiled = nvrtc.compile(name, src, arch=f"sm_{major}{minor}")
            module = ctypes.c_void_p()
            _check(_driver().cuModuleLoadData(ctypes.byref(module), compiled.cubin), f"loading {name}")
            self._modules.append(module)
            for line in compiled.ptx.decode(errors="replace").splitlines():
                if ".entry" in line:
                    entry = line.split(".entry")[1].strip().split("(")[0].strip()
                    fn = ctypes.c_void_p()
                    _check(_driver().cuModuleGetFunction(ctypes.byref(fn), module, entry.encode()), entry)
                    self._functions[entry] = fn

    def launch(self, name: str, grid: int, block: int, *args: Any) -> None:
        """Runs kernel `name` with `args` (tensors by device pointer, ints as int32 unless
        given as ctypes values, ctypes structs as they are) on the current stream."""
        holders: list[Any] = []
        for a in args:
            if isinstance(a, torch.Tensor):
                holders.append(ctypes.c_void_p(a.data_ptr()))
            elif a is None:
                holders.append(ctypes.c_void_p(0))
            elif isinstance(a, bool):
                holders.append(ctypes.c_int(int(a)))
            elif isinstance(a, int):
                holders.append(ctypes.c_int(a))
            else:
                holders.append(a)
        params = (ctypes.c_void_p * len(holders))(*[ctypes.cast(ctypes.pointer(h), ctypes.c_void_p) for h in holders])
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        _check(
            _driver().cuLaunchKernel(self._functions[name], grid, 1, 1, block, 1, 1, 0, stream, params, None),
            f"launching {name}",
        )

    @property
    def names(self) -> list[str]:
        return sorted(self._functions)
