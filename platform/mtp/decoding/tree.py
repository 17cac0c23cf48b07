"""Candidate trees for greedy self-speculation (Medusa-style, Cai et al. 2024).

A tree's node 0 is the pending token (head 0's last choice); a node at depth
``d >= 1`` is one of the ``top-k`` tokens of head ``d`` at the last accepted
position. All nodes are verified in one forward: node ``i`` attends to the
committed cache and to its ancestors only (the tree attention mask), at rotary
position ``length + depth(i)``. The plain blockwise chain is the tree with one
child per level, so greedy decoding has a single verification path.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DraftTree:
    """Nodes as rank paths: ``(r1, ..., rd)`` is head 1's ``r1``-th token, then head 2's ``r2``-th, ...

    ``widths[d]`` is how many of head ``d + 1``'s top tokens are tried under each
    depth-``d`` node, e.g. ``(3, 2, 1)`` gives 1 + 3 + 6 + 6 = 16 nodes.
    """

    widths: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.widths or any(w < 1 for w in self.widths):
            raise ValueError(f"tree widths {self.widths} must be a non-empty tuple of positive ints")

    @classmethod
    def chain(cls, drafts: int) -> "DraftTree":
        return cls((1,) * drafts)

    @property
    def paths(self) -> list[tuple[int, ...]]:
        """Every node's rank path, root first, parents before children."""
        nodes: list[tuple[int, ...]] = [()]
        for depth in range(1, len(self.widths) + 1):
            nodes += sorted(itertools.product(*(range(w) for w in self.widths[:depth])))
        return nodes

    @property
    def size(self) -> int:
        return len(self.paths)

    @property
    def is_chain(self) -> bool:
        return all(w == 1 for w in self.widths)


class TreeTensors:
    """The tensors a verification step needs for one ``DraftTree``, on one device."""

    def __init__(self, tree: DraftTree, device: torch.device):
        paths = tree.paths
        index = {p: i for i, p in enumerate(paths)}
        W, D = len(paths), len(tree.widths)
        self.tree = tree
        self.size = W
        self.depth = torch.tensor([len(p) for p in paths], device=device)  # [W]
        self.parent = torch.tensor([index[p[:-1]] if p else 0 for p in paths], device=device)  # [W]
        # ancestors[i, j]: node j is node i or one of its ancestors (the attention pattern)
        ancestors = torch.zeros(W, W, dtype=torch.bool)
        # path[i, d]: the depth-d node on node i's path from the root (padded with 0)
        path = torch.zeros(W, D + 1, dtype=torch.long)
        for i, p in enumerate(paths):
            for d in range(len(p) + 1):
                ancestors[i, index[p[:d]]] = True
                path[i, d] = index[p[:d]]
        self.ancestors = ancestors.to(device)
        self.path = path.to(device)
        # node i >= 1 takes head depth(i)'s rank-p[-1] candidate: flat index into [B, D, k]
        self.max_width = max(tree.widths)
        self.candidate = torch.tensor([(len(p) - 1) * self.max_width + p[-1] for p in paths[1:]], device=device)

    def tokens(self, pending: torch.Tensor, head_logits: torch.Tensor) -> torch.Tensor:
        """The next step's fed tokens ``[B, W]`` from the pending token ``[B]`` and heads 1.. logits ``[B, D, V]``."""
        if self.tree.is_chain:
            return torch.cat([pending[:, None], head_logits.argmax(-1)], dim=1)
        top = head_logits.topk(self.max_width, dim=-1).indices.flatten(1)  # [B, D * k]
        return torch.cat([pending[:, None], top[:, self.candidate]], dim=1)
