"""Path-finding on star graphs (Bachmann & Nagarajan 2024, "The pitfalls of next-token prediction").

A star graph has a centre (the start) and ``degree`` arms of ``arm_length`` nodes
each; the goal is the last node of one arm. Nodes are distinct letters, the edges
(``uv``: u -> v, directed away from the start) are listed in random order, and the
model must emit the path from start to goal::

    prompt  "kq,bz,qa,zc,ar,cm|kr="   (edges | start goal =)
    answer  "kqar"                    (start, the arm's nodes, ending at the goal)

Teacher forcing makes every step after the first trivial (follow the one edge out
of the previous node), so a next-token model is known to learn that shortcut and
pick the first step at chance, 1/degree; predicting several tokens ahead forces
the model to find the arm that ends at the goal.
"""

from __future__ import annotations

import random
import string

from mtp.tasks.problem import Problem

NODES = string.ascii_lowercase + string.ascii_uppercase


def star_graph(rng: random.Random, degree: int, arm_length: int) -> tuple[list[str], str, list[list[str]]]:
    """(shuffled edges, start, arms), node labels drawn without replacement."""
    labels = rng.sample(NODES, 1 + degree * arm_length)
    start = labels[0]
    arms = [labels[1 + a * arm_length : 1 + (a + 1) * arm_length] for a in range(degree)]
    edges = [u + v for arm in arms for u, v in zip([start, *arm], arm)]
    rng.shuffle(edges)
    return edges, start, arms


def problem(edges: list[str], start: str, goal: str, path: list[str]) -> Problem:
    return Problem(f"{','.join(edges)}|{start}{goal}=", "".join(path))


def sampler(degree: int, arm_length: int):
    if 1 + degree * arm_length > len(NODES):
        raise ValueError(f"degree={degree} x arm_length={arm_length} needs more than {len(NODES)} node labels")

    def sample(rng: random.Random) -> Problem:
        edges, start, arms = star_graph(rng, degree, arm_length)
        arm = rng.choice(arms)
        return problem(edges, start, arm[-1], [start, *arm])

    return sample


def solve(prompt: str) -> str:
    """The path, found by walking back from the goal (an independent check of ``sampler``)."""
    edges, query = prompt.rstrip("=").split("|")
    start, goal = query
    parent = {e[1]: e[0] for e in edges.split(",")}
    path = [goal]
    while path[-1] != start:
        path.append(parent[path[-1]])
    return "".join(reversed(path))
