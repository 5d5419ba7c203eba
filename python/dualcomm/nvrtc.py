"""Compiling dualcomm's CUDA kernels with NVRTC, on machines with or without a GPU.

NVRTC comes with the torch wheel (`nvidia-cuda-nvrtc`, with the CUDA headers beside it), so
sm_90 code compiles anywhere torch installs: CI checks every kernel this way, and the GPU
path compiles them at first use. Loaded through ctypes: nothing here needs a GPU or a CUDA
toolkit.
"""

from __future__ import annotations

import ctypes
import glob
import os
from dataclasses import dataclass
from pathlib import Path

from dualcomm._native import TransportUnavailableError


class CompileError(RuntimeError):
    """NVRTC rejected a kernel source; the message holds its log."""


def _nvidia_roots() -> list[Path]:
    try:
        import nvidia
    except ImportError:
        return []
    return [Path(p) for p in getattr(nvidia, "__path__", [])]


def _find_library() -> str:
    explicit = os.environ.get("DUALCOMM_NVRTC")
    if explicit:
        return explicit
    for root in _nvidia_roots():
        for pattern in ("cu*/lib/libnvrtc.so*", "cuda_nvrtc/lib/libnvrtc.so*"):
            hits = sorted(p for p in glob.glob(str(root / pattern)) if "builtins" not in p)
            if hits:
                return hits[-1]
    return "libnvrtc.so"


def include_dirs() -> list[str]:
    """Where the CUDA headers the kernels include (cuda_bf16.h, cuda_fp8.h) are."""
    dirs = []
    for root in _nvidia_roots():
        dirs += [d for d in glob.glob(str(root / "cu*/include")) + glob.glob(str(root / "cuda_runtime/include"))]
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        dirs.append(str(Path(home) / "include"))
    return [d for d in dirs if (Path(d) / "cuda_bf16.h").exists()]


@dataclass
class Compiled:
    name: str
    ptx: bytes
    cubin: bytes
    log: str


class Nvrtc:
    def __init__(self) -> None:
        path = _find_library()
        try:
            self.lib = ctypes.CDLL(path)
        except OSError as e:
            raise TransportUnavailableError(f"NVRTC could not be loaded from {path!r}: {e}") from e
        for name in (
            "nvrtcCreateProgram",
            "nvrtcCompileProgram",
            "nvrtcGetProgramLogSize",
            "nvrtcGetProgramLog",
            "nvrtcGetPTXSize",
            "nvrtcGetPTX",
            "nvrtcGetCUBINSize",
            "nvrtcGetCUBIN",
            "nvrtcDestroyProgram",
        ):
            getattr(self.lib, name).restype = ctypes.c_int
        self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p

    def version(self) -> tuple[int, int]:
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        return major.value, minor.value

    def _check(self, code: int, what: str) -> None:
        if code != 0:
            raise CompileError(f"{what}: {self.lib.nvrtcGetErrorString(code).decode()}")

    def compile(self, name: str, source: str, arch: str = "sm_90", extra: tuple[str, ...] = ()) -> Compiled:
        """Compiles `source` for `arch` (PTX and a cubin); raises `CompileError` with the log."""
        prog = ctypes.c_void_p()
        self._check(
            self.lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None),
            f"{name}: nvrtcCreateProgram",
        )
        try:
            opts = [f"--gpu-architecture={arch}", "--std=c++17", "-default-device", *extra]
            opts += [f"--include-path={d}" for d in include_dirs()]
            argv = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
            code = self.lib.nvrtcCompileProgram(prog, len(opts), argv)
            size = ctypes.c_size_t()
            self._check(self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "nvrtcGetProgramLogSize")
            buf = ctypes.create_string_buffer(size.value)
            self._check(self.lib.nvrtcGetProgramLog(prog, buf), "nvrtcGetProgramLog")
            log = buf.value.decode(errors="replace")
            if code != 0:
                raise CompileError(f"{name} for {arch}: {self.lib.nvrtcGetErrorString(code).decode()}\n{log}")
            self._check(self.lib.nvrtcGetPTXSize(prog, ctypes.byref(size)), "nvrtcGetPTXSize")
            ptx = ctypes.create_string_buffer(size.value)
            self._check(self.lib.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
            self._check(self.lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
            cubin = ctypes.create_string_buffer(size.value)
            self._check(self.lib.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
            return Compiled(name, ptx.raw, cubin.raw, log)
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))


def kernel_sources(cuda_dir: Path) -> dict[str, str]:
    """Each `.cu` file of `cuda_dir` with our own headers (`#include "x.cuh"`) inlined, each
    once: NVRTC compiles from strings, so the headers travel with the source."""

    def expand(text: str, seen: set[str]) -> str:
        out = []
        for line in text.splitlines():
            stripped = line.strip()
            if stripped.startswith('#include "') and stripped.endswith('"'):
                name = stripped[len('#include "') : -1]
                if name not in seen:
                    seen.add(name)
                    out.append(expand((cuda_dir / name).read_text(), seen))
                continue
            if stripped == "#pragma once":
                continue
            out.append(line)
        return "\n".join(out)

    return {path.name: expand(path.read_text(), set()) for path in sorted(cuda_dir.glob("*.cu"))}
