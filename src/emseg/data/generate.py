"""A deterministic generator of EM-like slices with labelled mitochondria.

The default dataset: it lets the whole pipeline run on a fresh clone with no download. Each slice
has a textured cytoplasm cut by dark cell membranes (a Voronoi tessellation), small dark vesicles
that are *not* labelled (distractors), and mitochondria drawn as ellipses with a dark double
membrane and striped cristae, some of them touching in pairs (the case watershed must split).
Blur and noise imitate the microscope. Slice ``z`` of seed ``s`` is always the same image.

The generator knows its objects: with ``instances=True`` it also returns their labels (each
mitochondrion its own id, the two of a touching pair separate), the true objects of instance scores.
Slices are drawn independently, so objects are 2D: an id means one object in one slice.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return field / (field.std() + 1e-6)


def _membranes(rng: np.random.Generator, h: int, w: int, cell_px: float) -> np.ndarray:
    """Boolean map of cell boundaries of a jittered Voronoi tessellation."""
    n = max(4, int(h * w / cell_px**2))
    seeds = rng.uniform((0, 0), (h, w), size=(n, 2))
    yy, xx = np.mgrid[0:h, 0:w]
    _, owner = cKDTree(seeds).query(np.column_stack([yy.ravel(), xx.ravel()]))
    owner = owner.reshape(h, w)
    edge = np.zeros((h, w), bool)
    edge[:-1] |= owner[:-1] != owner[1:]
    edge[:, :-1] |= owner[:, :-1] != owner[:, 1:]
    return ndimage.binary_dilation(edge, iterations=1)


def _ellipse_fields(h, w, cy, cx, a, b, theta):
    """Local bbox and, inside it, normalised radius and the coordinate along the long axis."""
    r = int(np.ceil(max(a, b))) + 3
    y0, y1 = max(0, int(cy) - r), min(h, int(cy) + r + 1)
    x0, x1 = max(0, int(cx) - r), min(w, int(cx) + r + 1)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(theta) + dy * np.sin(theta)  # along the long axis
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    return (slice(y0, y1), slice(x0, x1)), rho, u


def generate_slice(seed: int, z: int, height: int = 768, width: int = 1024, instances: bool = False):
    """One EM-like slice (uint8) and its mitochondria mask (uint8, 0/255); with ``instances``, also the
    mitochondria as objects (uint16, 0 background, 1..n; where a touching pair overlaps by a pixel the
    later one drawn owns it)."""
    rng = np.random.default_rng([seed, z])
    h, w = height, width
    scale = np.sqrt(h * w / (768 * 1024))  # keep object counts per area constant

    img = 150 + 10 * _smooth_noise(rng, (h, w), 6) + 6 * _smooth_noise(rng, (h, w), 1.5)
    img[_membranes(rng, h, w, cell_px=150)] -= 70

    # Vesicles: small dark rings, deliberately unlabelled.
    for _ in range(int(60 * scale**2)):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        rad = rng.uniform(3, 7)
        sl, rho, _ = _ellipse_fields(h, w, cy, cx, rad, rad, 0.0)
        img[sl][(rho > 0.6) & (rho <= 1.0)] -= 55

    mask = np.zeros((h, w), bool)
    objects = np.zeros((h, w), np.uint16)
    placed = 0
    tries = 0
    target = int(rng.integers(24, 34) * scale**2)
    while placed < target and tries < target * 20:
        tries += 1
        a, b = rng.uniform(18, 48), rng.uniform(10, 20)
        theta = rng.uniform(0, np.pi)
        cy, cx = rng.uniform(a, h - a), rng.uniform(a, w - a)
        shapes = [(cy, cx, a, b, theta)]
        if rng.random() < 0.35:  # a touching partner beside the long side
            b2 = rng.uniform(10, 20)
            off = b + b2 - 1.0
            shapes.append((cy + off * np.cos(theta), cx - off * np.sin(theta), rng.uniform(18, 48), b2,
                           theta + rng.uniform(-0.3, 0.3)))
        fields = [_ellipse_fields(h, w, *s) for s in shapes]
        if any(mask[sl][rho <= 1.4].any() for sl, rho, _ in fields):
            continue  # keep objects apart, except the deliberate touching pairs
        for (sl, rho, u), (_, _, _, bb, _) in zip(fields, shapes):
            inside = rho <= 1.0
            ring = inside & (rho > 1.0 - 2.5 / bb)
            cristae = inside & ~ring & (np.sin(u * (2 * np.pi / rng.uniform(6, 9))) > 0.55)
            region = img[sl]
            region[inside] -= 35
            region[cristae] -= 30
            region[ring] -= 45
            mask[sl] |= inside
            placed += 1
            objects[sl][inside] = placed

    img = ndimage.gaussian_filter(img, 1.0)
    img += rng.normal(0, 9, size=(h, w))
    img = np.clip(img, 0, 255).astype(np.uint8)
    if instances:
        return img, mask.astype(np.uint8) * 255, objects
    return img, (mask.astype(np.uint8) * 255)


def generate_stack(seed: int, n: int, height: int, width: int, z0: int = 0) -> tuple[np.ndarray, np.ndarray]:
    images = np.empty((n, height, width), np.uint8)
    labels = np.empty((n, height, width), np.uint8)
    for i in range(n):
        images[i], labels[i] = generate_slice(seed, z0 + i, height, width)
    return images, labels
