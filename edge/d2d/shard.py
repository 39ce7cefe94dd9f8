"""Grouping peers by measured distance, as the seed paper ("Device to Device Pairs Sharding based
on Distance") does: peers are embedded from their distance matrix (classical MDS), then grouped
by K-means (scikit-learn) with the centroids seeded at the anchor devices, every group holding
its anchor. Pure: numbers in, groups out.

The distance between two peers is the time one decode step's traffic between them costs
(:func:`link_seconds`): a round trip plus the activation bytes at the link's bandwidth. Seconds
make RTT and bandwidth one unit, so a near slow link and a far fast one compare as decoding sees
them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge.errors import EdgeError


@dataclass(frozen=True)
class Link:
    """One measured link: median round-trip time and bulk throughput, one direction's bytes/s."""

    rtt_s: float
    bytes_per_s: float


def link_seconds(link: Link, payload_bytes: int) -> float:
    """What moving ``payload_bytes`` across the link and hearing back costs: RTT + bytes / bandwidth."""
    return link.rtt_s + payload_bytes / link.bytes_per_s


def distance_matrix(names: list[str], links: dict[tuple[str, str], Link], payload_bytes: int) -> np.ndarray:
    """Symmetric matrix of :func:`link_seconds` between every pair of ``names`` (zero diagonal). A
    pair measured both ways takes the slower direction; a pair not measured is an error naming it."""
    n = len(names)
    d = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            got = [links[k] for k in ((names[i], names[j]), (names[j], names[i])) if k in links]
            if not got:
                raise EdgeError(f"no measured link between {names[i]} and {names[j]}")
            d[i, j] = d[j, i] = max(link_seconds(x, payload_bytes) for x in got)
    return d


def embed(distance: np.ndarray, dims: int = 2) -> np.ndarray:
    """Classical (Torgerson) MDS: points whose Euclidean distances best match ``distance`` in
    ``dims`` dimensions (the top eigenvectors of the double-centred squared distances; negative
    eigenvalues, from distances no Euclidean layout has, are dropped)."""
    d = np.asarray(distance, dtype=np.float64)
    n = d.shape[0]
    if d.shape != (n, n) or not np.allclose(d, d.T) or (d < 0).any():
        raise EdgeError(f"a distance matrix must be square, symmetric and non-negative; got shape {d.shape}")
    j = np.eye(n) - 1.0 / n
    b = -0.5 * j @ (d ** 2) @ j
    vals, vecs = np.linalg.eigh(b)
    order = np.argsort(vals)[::-1][:dims]
    vals, vecs = np.clip(vals[order], 0.0, None), vecs[:, order]
    out = vecs * np.sqrt(vals)
    if out.shape[1] < dims:
        out = np.pad(out, ((0, 0), (0, dims - out.shape[1])))
    return out


def group(distance: np.ndarray, anchors: list[int], dims: int = 2) -> list[list[int]]:
    """Peers grouped around the anchors: K-means (k = number of anchors) over the MDS embedding,
    centroids seeded at the anchors' points, one pass of Lloyd's iterations as scikit-learn runs
    them; each anchor stays in its own group (a group whose centroid drifted away from its anchor
    gets it back), so every group holds exactly one anchor. Returns the groups as index lists,
    anchors first, in the order of ``anchors``."""
    from sklearn.cluster import KMeans

    n = distance.shape[0]
    if not anchors or len(set(anchors)) != len(anchors) or not all(0 <= a < n for a in anchors):
        raise EdgeError(f"anchors must be distinct peers among {n}; got {anchors}")
    pts = embed(distance, dims)
    if len(anchors) == 1:
        labels = np.zeros(n, dtype=int)
    else:
        km = KMeans(n_clusters=len(anchors), init=pts[anchors], n_init=1, random_state=0).fit(pts)
        labels = km.labels_.copy()
    labels[anchors] = np.arange(len(anchors))
    return [[a] + [i for i in range(n) if labels[i] == g and i != a] for g, a in enumerate(anchors)]
