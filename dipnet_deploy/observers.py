"""Range observers: one class per calibration method behind one interface, as in onnxruntime's ``calibrate.py``.

An observer sees each tensor's whole-data range first (``update_range``, from calibration pass 1)
and, when ``needs_histograms``, the values themselves in pass 2 (``update_values``), reduced into
fixed-size histograms over that range; ``compute`` returns each tensor's (low, high).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np

HISTOGRAM_BINS = 2048
# the clipping bound of learned ranges (range coverage): a learned or searched range may leave out at most this
# fraction of a tensor's values on any one calibration, coverage or training image (qat.clipped_bounds). 0: none,
# the max ranges are a floor; a looser bound wins on photos and loses on images unlike them (BENCHMARKS.md)
DEFAULT_CLIP = 0.0


class Observer(ABC):
    """Reduces the activations seen over many images to one (min, max) per tensor."""

    method: str = ""
    needs_histograms = False

    def __init__(self) -> None:
        self.minimum: dict[str, float] = {}
        self.maximum: dict[str, float] = {}

    def update_range(self, name: str, low: float, high: float) -> None:
        self.minimum[name] = min(low, self.minimum.get(name, math.inf))
        self.maximum[name] = max(high, self.maximum.get(name, -math.inf))

    def update_values(self, name: str, values: np.ndarray) -> None:  # noqa: B027 - optional hook
        """Histogram observers accumulate values here (pass 2)."""

    def parameters(self) -> dict:
        return {}

    @abstractmethod
    def compute(self) -> dict[str, tuple[float, float]]:
        """Final range per tensor."""


class MaxObserver(Observer):
    """``max``: the observed min/max over all images (the seed's "max" calibration)."""

    method = "max"

    def compute(self) -> dict[str, tuple[float, float]]:
        return {name: (self.minimum[name], self.maximum[name]) for name in self.minimum}


class HistogramObserver(Observer):
    """Base of the histogram methods: a fixed-range, fixed-bin histogram per tensor."""

    needs_histograms = True

    def __init__(self, bins: int = HISTOGRAM_BINS) -> None:
        super().__init__()
        self.bins = bins
        self.histograms: dict[str, np.ndarray] = {}

    def edges(self, name: str) -> np.ndarray:
        low, high = self.minimum[name], self.maximum[name]
        return np.linspace(low, high if high > low else low + 1e-6, self.bins + 1)

    def update_values(self, name: str, values: np.ndarray) -> None:
        edges = self.edges(name)
        # Pass 2 runs another graph than pass 1's range reductions (unfused kernels): a value can land an
        # ulp outside [min, max], and np.histogram would silently drop it. Count it in the end bin.
        counts, _ = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)
        self.histograms[name] = self.histograms.get(name, 0) + counts.astype(np.int64)

    def compute(self) -> dict[str, tuple[float, float]]:
        ranges = {}
        for name in self.minimum:
            histogram = self.histograms.get(name)
            if histogram is None or histogram.sum() == 0 or self.maximum[name] <= self.minimum[name]:
                ranges[name] = (self.minimum[name], self.maximum[name])
            else:
                ranges[name] = self.choose(histogram, self.edges(name))
        return ranges

    @abstractmethod
    def choose(self, histogram: np.ndarray, edges: np.ndarray) -> tuple[float, float]:
        """Range for one tensor from its histogram."""


class PercentileObserver(HistogramObserver):
    """``percentile``: clip each tail at (100 - p)% / p% of the observed values."""

    method = "percentile"

    def __init__(self, percentile: float = 99.999, bins: int = HISTOGRAM_BINS) -> None:
        super().__init__(bins)
        self.percentile = percentile

    def parameters(self) -> dict:
        return {"percentile": self.percentile, "bins": self.bins}

    def choose(self, histogram: np.ndarray, edges: np.ndarray) -> tuple[float, float]:
        cdf = np.cumsum(histogram) / histogram.sum()
        tail = 1.0 - self.percentile / 100.0
        low_index = int(np.searchsorted(cdf, tail, side="left"))
        high_index = int(np.searchsorted(cdf, 1.0 - tail, side="left"))
        return float(edges[low_index]), float(edges[min(high_index + 1, len(edges) - 1)])


class EntropyObserver(HistogramObserver):
    """``entropy``: TensorRT-style KL-divergence threshold on 128 quantization levels per side.

    The positive and the negative side are thresholded separately (the histogram spans
    [min, max]), so asymmetric activations keep an asymmetric range.
    """

    method = "entropy"
    levels = 128

    def parameters(self) -> dict:
        return {"bins": self.bins, "levels": self.levels}

    def choose(self, histogram: np.ndarray, edges: np.ndarray) -> tuple[float, float]:
        zero = int(np.clip(np.searchsorted(edges, 0.0) - 1, 0, len(histogram)))
        high_side = histogram[zero:]
        low_side = histogram[:zero][::-1]
        width = edges[1] - edges[0]
        high = edges[zero] + width * self._kl_threshold_bins(high_side) if high_side.sum() else edges[-1]
        low = edges[zero] - width * self._kl_threshold_bins(low_side) if low_side.sum() else edges[0]
        return float(max(low, edges[0])), float(min(high, edges[-1]))

    def _kl_threshold_bins(self, histogram: np.ndarray) -> int:
        """Number of bins (from zero outwards) whose quantization minimizes KL(P || Q)."""
        histogram = histogram.astype(np.float64)
        size = len(histogram)
        if size <= self.levels:
            return size
        best, best_bins = math.inf, size
        for bins in range(self.levels, size + 1, max(1, (size - self.levels) // 256)):
            reference = histogram[:bins].copy()
            reference[-1] += histogram[bins:].sum()  # outliers clipped into the last bin
            candidate = self._quantize_histogram(histogram[:bins])
            divergence = self._kl(reference, candidate)
            if divergence < best:
                best, best_bins = divergence, bins
        return best_bins

    def _quantize_histogram(self, histogram: np.ndarray) -> np.ndarray:
        chunks = np.array_split(np.arange(len(histogram)), self.levels)
        expanded = np.zeros_like(histogram)
        for chunk in chunks:
            values = histogram[chunk]
            nonzero = values > 0
            if nonzero.any():
                expanded[chunk[nonzero]] = values.sum() / nonzero.sum()
        return expanded

    @staticmethod
    def _kl(p: np.ndarray, q: np.ndarray) -> float:
        p = p / p.sum()
        q_sum = q.sum()
        if q_sum == 0:
            return math.inf
        q = q / q_sum
        mask = p > 0
        if np.any(q[mask] == 0):
            return math.inf
        return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


class MseObserver(HistogramObserver):
    """``mse``: the range minimizing the expected uint8 quantization MSE of the histogram."""

    method = "mse"
    steps = 200

    def parameters(self) -> dict:
        return {"bins": self.bins, "steps": self.steps, "levels": 256}

    def choose(self, histogram: np.ndarray, edges: np.ndarray) -> tuple[float, float]:
        centres = (edges[:-1] + edges[1:]) / 2
        counts = histogram.astype(np.float64)
        low0, high0 = min(edges[0], 0.0), max(edges[-1], 0.0)
        best, best_range = math.inf, (float(edges[0]), float(edges[-1]))
        # Shrink both ends towards zero in the same proportion, as a quantizer keeps 0 exact.
        for fraction in np.linspace(1.0, 0.05, self.steps):
            low, high = low0 * fraction, high0 * fraction
            scale = (high - low) / 255.0
            if scale <= 0:
                continue
            zero_point = np.round(-low / scale)
            quantized = (np.clip(np.round(centres / scale) + zero_point, 0, 255) - zero_point) * scale
            error = float(np.sum(counts * (centres - quantized) ** 2))
            if error < best:
                best, best_range = error, (float(low), float(high))
        return best_range


OBSERVERS: dict[str, type[Observer]] = {
    cls.method: cls for cls in (MaxObserver, PercentileObserver, EntropyObserver, MseObserver)
}


def make_observer(method: str, percentile: float = 99.999) -> Observer:
    if method == "percentile":
        return PercentileObserver(percentile)
    return OBSERVERS[method]()
