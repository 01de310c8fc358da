"""Masked normalised cross-correlation of multi-channel feature maps over many shifts at once (FFT).

Padfield (IEEE TIP 2012) summed over channels: features are zero-mean inside their masks and zero outside, so a
masked pixel never correlates; shifts whose overlap is below a share of the smaller valid area are refused. Used by
the global area-based search (:mod:`promptmid.search`).
"""

from __future__ import annotations

import sys
from typing import Protocol, Sequence

import numpy as np


class MaskedFeatures(Protocol):
    """Feature channels ``[C, H, W]`` (zero-mean inside ``mask``, zero outside) and their mask ``[H, W]`` (e.g.
    :class:`promptmid.search.Level`)."""

    features: np.ndarray
    mask: np.ndarray


class Correlator:
    """Masked normalised cross-correlation of one fixed (optical) level against many moving canvases.

    ``ncc(canvas)[dy + origin_y, dx + origin_x]`` is the correlation of optical pixel ``x`` with canvas pixel
    ``x + d`` summed over the valid overlap; shifts whose overlap is below ``min_overlap`` of the smaller valid area
    are ``-1``. Every shift with any overlap (``origin = (h0 - 1, w0 - 1)``), or with ``local`` only the shifts
    that keep the optical level inside the canvas (``0 <= d <= canvas - optical``, ``origin = (0, 0)``: a smaller
    FFT, for polishing around a known position).
    """

    def __init__(self, fixed: MaskedFeatures, canvas_shape: tuple[int, int], min_overlap: float, local: bool = False,
                 groups: Sequence[slice] | None = None) -> None:
        """``groups``: channel groups (slices of ``features``) that :meth:`ncc_sets` can correlate in any
        combination; ``None``: all channels as one group."""
        fft = _fft()
        h0, w0 = fixed.mask.shape
        self.h0, self.w0 = h0, w0
        self.local = local
        if local:  # only shifts 0 <= d <= canvas - fixed: a circular correlation of the canvas size never wraps
            self.shape = (fft.next_fast_len(canvas_shape[0], True), fft.next_fast_len(canvas_shape[1], True))
        else:
            self.shape = (fft.next_fast_len(h0 + canvas_shape[0], True), fft.next_fast_len(w0 + canvas_shape[1], True))
        self.origin = (0, 0) if local else (h0 - 1, w0 - 1)  # map index of shift d = d + origin (y, x)
        self.groups = list(groups) if groups is not None else [slice(None)]
        m0 = fixed.mask.astype(np.float32)
        self.a = np.conj(fft.rfft2(fixed.features, self.shape))
        self.a2 = np.conj(fft.rfft2(_group_squares(fixed.features, self.groups), self.shape))
        self.m0 = np.conj(fft.rfft2(m0, self.shape))
        self.area0 = float(m0.sum())
        self.min_overlap = min_overlap

    def ncc(self, canvas: MaskedFeatures, workers: int | None = None) -> np.ndarray:
        """Correlation map of every channel group together: entry ``(dy + origin_y, dx + origin_x)`` is shift ``d``
        (see the class docstring)."""
        return self.ncc_sets(canvas, [range(len(self.groups))], workers)[0]

    def ncc_sets(self, canvas: MaskedFeatures, sets: Sequence[Sequence[int]], workers: int | None = None
                 ) -> list[np.ndarray]:
        """One correlation map (as :meth:`ncc`) per entry of ``sets``, each over the channel groups it lists
        (indices into ``groups``): the canvas is transformed once, the sums over channels are split by group."""
        hc, wc = canvas.mask.shape
        mb = canvas.mask.astype(np.float32)
        stack = np.concatenate([canvas.features, mb[None], _group_squares(canvas.features, self.groups)])
        workers = workers or fft_workers()
        spec = _fft().rfft2(stack, self.shape, workers=workers)
        n = len(canvas.features)
        fb, fm, fb2 = spec[:n], spec[n], spec[n + 1:]
        prods = ([(self.a[g] * fb[g]).sum(0) for g in self.groups] + [a2 * fm for a2 in self.a2]
                 + [self.m0 * b2 for b2 in fb2] + [self.m0 * fm])
        maps = self._inverse(np.stack(prods), hc, wc, workers)
        k = len(self.groups)
        num, ea, eb, overlap = maps[:k], maps[k:2 * k], maps[2 * k:3 * k], maps[3 * k]
        enough = overlap >= self.min_overlap * min(self.area0, float(mb.sum()))
        out = []
        for chosen in sets:
            idx = list(chosen)
            a, b = ea[idx].sum(0), eb[idx].sum(0)
            ncc = num[idx].sum(0) / np.sqrt(np.maximum(a * b, 1e-12))
            out.append(np.where(enough & (a > 1e-6) & (b > 1e-6), ncc, -1.0).astype(np.float32))
        return out

    def _inverse(self, spectra: np.ndarray, hc: int, wc: int, workers: int) -> np.ndarray:
        """Linear cross-correlations ``[n, ...]`` from their spectra, rearranged so index ``(dy + h0 - 1, dx + w0 - 1)``
        holds shift ``(dx, dy)`` for ``dx in (-w0, wc)``, ``dy in (-h0, hc)``."""
        full = _fft().irfft2(spectra, self.shape, workers=workers)
        if self.local:
            return full[:, : hc - self.h0 + 1, : wc - self.w0 + 1]
        rows = np.r_[self.shape[0] - self.h0 + 1: self.shape[0], 0:hc]
        cols = np.r_[self.shape[1] - self.w0 + 1: self.shape[1], 0:wc]
        return full[:, rows][:, :, cols]


def _group_squares(features: np.ndarray, groups: Sequence[slice]) -> np.ndarray:
    """``[len(groups), H, W]``: per pixel, the sum of squares of each group's channels."""
    return np.stack([(features[g] ** 2).sum(0) for g in groups])


def _fft():  # noqa: ANN202 - the scipy.fft module
    """``scipy.fft``, imported on first use (about 0.2 s): a pair the keypoints settle never searches."""
    from scipy import fft

    return fft


def fft_workers() -> int:
    """Threads for the FFTs: torch's thread setting when torch is loaded (``--threads``), else 1."""
    torch = sys.modules.get("torch")
    return max(1, int(torch.get_num_threads())) if torch is not None else 1
