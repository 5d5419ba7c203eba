"""Argument checks shared by the Python API. Every message names the argument, what was
expected and what was given, and every check runs before anything is sent."""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from dualcomm._native import InvalidArgumentError


def fail(argument: str, expected: str, got: object) -> InvalidArgumentError:
    return InvalidArgumentError(f"{argument}: expected {expected}, got {got}")


@contextlib.contextmanager
def rejecting(ep: Any, op: str) -> Iterator[None]:
    """Runs this rank's own checks of a collective call. If they fail, this rank will not
    run the operation, so its peers are told (naming this rank and the reason) instead of
    waiting for it until the timeout; every rank abandons the operation together."""
    try:
        yield
    except Exception as e:
        if not ep.destroyed:
            ep.abort(op, str(e))
        raise


def describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"a {t.dtype} tensor of shape {list(t.shape)} on {t.device}"
    return f"{type(t).__name__} {t!r}"[:200]


def tensor(
    name: str,
    t: object,
    dtypes: Sequence[torch.dtype],
    ndim: int,
) -> torch.Tensor:
    """A CPU tensor of one of `dtypes` with `ndim` dimensions, made contiguous."""
    want = " or ".join(str(d) for d in dtypes)
    if not isinstance(t, torch.Tensor):
        raise fail(name, f"a {ndim}-D {want} tensor", describe(t))
    if t.dtype not in dtypes:
        raise fail(name, f"dtype {want}", t.dtype)
    if t.dim() != ndim:
        raise fail(name, f"a {ndim}-D tensor", f"{t.dim()}-D shape {list(t.shape)}")
    if t.device.type != "cpu":
        raise fail(name, "a CPU tensor (this build moves CPU tensors)", f"a tensor on {t.device}")
    if t.requires_grad:
        t = t.detach()
    return t.contiguous()


def rows(name: str, t: torch.Tensor, n: int, what: str) -> None:
    if t.shape[0] != n:
        raise fail(name, f"{n} rows ({what})", f"{t.shape[0]} rows")


def shape(name: str, t: torch.Tensor, want: Sequence[int]) -> None:
    if list(t.shape) != list(want):
        raise fail(name, f"shape {list(want)}", f"shape {list(t.shape)}")


def integer(name: str, v: object, least: int, want: str | None = None) -> int:
    """`v` as an int of at least `least`: any integer type (`numpy.int64` too, as DeepEP's
    pybind arguments take), not a bool or a float."""
    want = want or f"an int >= {least}"
    if isinstance(v, bool) or not hasattr(type(v), "__index__"):
        raise fail(name, want, describe(v))
    n = operator.index(v)  # type: ignore[arg-type]
    if n < least:
        raise fail(name, want, n)
    return n
