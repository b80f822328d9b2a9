"""The Pareto front of (latency, accuracy): the rows no other row beats on both at once."""

from __future__ import annotations


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, value) not dominated by another (cost <=, value >=, one strictly),
    sorted by cost. Equal points are all kept."""
    front = []
    for i, (cost, value) in enumerate(points):
        dominated = any(c <= cost and v >= value and (c < cost or v > value) for c, v in points)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))
