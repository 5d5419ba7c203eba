"""`deep_ep`-compatible names over dualcomm, for callers that import DeepEP by name.

Code that does `from deep_ep import Buffer` (Megatron-Core's flex dispatcher, DeepEP's own
tests) runs on dualcomm, CPU tensors included, once `import deep_ep` resolves here. The one
line that opts in, before the caller imports `deep_ep`:

    import dualcomm.deep_ep; dualcomm.deep_ep.install()

or launch the unmodified program through `python -m dualcomm.deep_ep script.py args...`
(`-m module` works too, and so does `torchrun ... -m dualcomm.deep_ep script.py`).

`install()` never shadows a real DeepEP: the alias is consulted only after every other
importer has failed to find `deep_ep`, so where DeepEP is installed, it is what loads.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
from types import ModuleType

import torch

from dualcomm.buffer import Buffer
from dualcomm.config import Config
from dualcomm.deep_ep.utils.envs import get_logical_domain_size, get_physical_domain_size
from dualcomm.elastic import ElasticBuffer, EPHandle
from dualcomm.event import EventHandle, EventOverlap

#: DeepEP's dtype for `topk_idx`.
topk_idx_t = torch.int64

__version__ = "2.1.0+dualcomm"

__all__ = [
    "Buffer",
    "Config",
    "EPHandle",
    "ElasticBuffer",
    "EventHandle",
    "EventOverlap",
    "get_logical_domain_size",
    "get_physical_domain_size",
    "install",
    "topk_idx_t",
]

_log = logging.getLogger("dualcomm")
_ALIAS = "deep_ep"
_TARGET = "dualcomm.deep_ep"


class _AliasLoader(importlib.abc.Loader):
    """Hands out the dualcomm module itself under the `deep_ep` name (one module object,
    so `deep_ep.Buffer is dualcomm.deep_ep.Buffer`)."""

    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(self.target)

    def exec_module(self, module: ModuleType) -> None:
        return None  # already executed under its own name


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _ALIAS and not fullname.startswith(_ALIAS + "."):
            return None
        real = _TARGET + fullname[len(_ALIAS) :]
        if importlib.util.find_spec(real) is None:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(real))


def install() -> bool:
    """Makes `import deep_ep` (and `deep_ep.utils`) resolve to dualcomm where no DeepEP is
    installed. Returns True if the alias is what `deep_ep` now means, False if a real DeepEP
    takes precedence (then nothing changes, and that is logged once)."""
    loaded = sys.modules.get(_ALIAS)
    if loaded is not None:
        return getattr(loaded, "__name__", "") == _TARGET
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        real = importlib.util.find_spec(_ALIAS)
        if real is not None:
            _log.warning(
                "dualcomm.deep_ep.install(): a real DeepEP is installed at %s; it is left in place", real.origin
            )
            return False
        # Last, so that any importer that finds a real deep_ep wins.
        sys.meta_path.append(_AliasFinder())
    return True
