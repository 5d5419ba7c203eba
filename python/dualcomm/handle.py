"""The handle a dispatch returns, shaped where DeepEP's callers look into it.

DeepEP's handle is a tuple of layout tensors, and its callers read two entries of it: on one
node `handle[0]`, the rank prefix matrix (`[i][j]`: tokens ranks `0..=i` send to rank `j`),
and on several nodes `handle[-4]`, the global rank prefix sum (`[i]`: tokens this rank
receives from ranks `0..=i`). dualcomm's handle is a tuple of DeepEP's length with those
entries filled (and `is_token_in_rank` where DeepEP keeps it); the other entries are None:
the layout they describe lives in the Rust core, which the handle carries as `native`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from dualcomm._arrays import tensor_of
from dualcomm._native import Handle

#: DeepEP's handle lengths: intranode and internode.
_ONE_NODE_LEN = 6
_MULTI_NODE_LEN = 10


class OpaqueTuple(tuple):  # type: ignore[type-arg]
    """A tuple for callers that index into a handle, compared as the one operation it
    stands for (by identity), not by its items."""

    def __eq__(self, other: object) -> bool:
        return self is other

    def __ne__(self, other: object) -> bool:
        return self is not other

    def __hash__(self) -> int:
        return id(self)

    def with_items(self, items: Iterable[Any]) -> Any:
        """This handle with other entries (a GPU caller's copies of its tensors). The two are
        one handle, sharing one state: the layout in the core, and what is filled in once the
        operation's data is in (a low-latency dispatch's slots) is seen through either."""
        twin = tuple.__new__(type(self), items)
        twin.__dict__ = self.__dict__
        return twin


class DispatchHandle(OpaqueTuple):
    """A dispatch's layout: pass it to `combine` and to a cached `dispatch`."""

    native: Handle
    #: The rows of the dispatch's receive tensors when it was padded (`num_worst_tokens`), else 0.
    padded_rows: int = 0

    def __new__(
        cls,
        native: Handle,
        num_nodes: int,
        ranks_per_node: int,
        rank: int,
        is_token_in_rank: torch.Tensor | None,
    ) -> DispatchHandle:
        per_src = tensor_of(native.recv_per_src()).to(torch.int32)
        items: list[Any]
        if num_nodes == 1:
            matrix = tensor_of(native.node_matrix()).reshape(ranks_per_node, ranks_per_node)
            rank_prefix_matrix = matrix.cumsum(0).to(torch.int32)
            items = [rank_prefix_matrix, None, None, None, is_token_in_rank, None]
            assert len(items) == _ONE_NODE_LEN
        else:
            recv_gbl_rank_prefix_sum = per_src.cumsum(0).to(torch.int32)
            items = [is_token_in_rank, None, None, None, None, None]
            items += [recv_gbl_rank_prefix_sum, None, None, None]
            assert len(items) == _MULTI_NODE_LEN
        self = super().__new__(cls, items)
        self.native = native
        return self

    @property
    def num_recv_tokens(self) -> int:
        return int(self.native.num_recv_tokens)

    @property
    def num_tokens(self) -> int:
        return int(self.native.num_tokens)

    def recv_src_rank(self) -> Any:
        return self.native.recv_src_rank()

    def recv_src_idx(self) -> Any:
        return self.native.recv_src_idx()

    def __repr__(self) -> str:
        return f"DispatchHandle({self.native!r})"


def native_of(handle: object) -> Handle | None:
    """The native handle inside a dispatch handle (or the native handle itself)."""
    if isinstance(handle, DispatchHandle):
        return handle.native
    if isinstance(handle, Handle):
        return handle
    return None
