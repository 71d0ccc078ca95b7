"""A mergeable quantile sketch with a relative-error guarantee (the DDSketch construction).

Exact quantiles cannot be merged from per-site summaries smaller than the
data, so quantiles are approximate and every result says so. The sketch
keeps, for each value ``x``, a count in the bucket
``i = ceil(log_gamma(|x|))`` with ``gamma = (1 + a) / (1 - a)`` (``a`` is the
relative accuracy, 0.01 by default): bucket ``i`` holds the values in
``(gamma**(i-1), gamma**i]``, and its representative ``2 * gamma**i / (gamma + 1)``
is within ``a * |x|`` of every value in it. Negative values have a bucket set
of their own, zeros (and magnitudes under :data:`MIN_MAGNITUDE`) a counter,
infinities two more.

Merging adds bucket counts, so a sketch merged from any split of the data is
*identical* to the sketch of all of it: the merge is exact, only the sketch
is approximate.

**Error bound.** For quantile ``q`` over ``n`` values, with ``h = q * (n - 1)``
and ``x_lo``, ``x_hi`` the order statistics at ranks ``floor(h)`` and
``ceil(h)``, the estimate is the same linear interpolation pandas uses
(``interpolation="linear"``) between the bucket representatives of those
ranks, so it is within ``a * max(|x_lo|, |x_hi|)`` of the exact quantile
(plus :data:`MIN_MAGNITUDE` for values next to zero). Its size is the number
of distinct buckets: at most about ``ln(max/min) / (2a)`` per sign, about
690 buckets for values spanning six orders of magnitude at ``a = 0.01``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

# Magnitudes below this are counted as zero (keeps the bucket index in range).
MIN_MAGNITUDE = 1e-300


def gamma_of(accuracy: float) -> float:
    if not 0.0 < accuracy < 1.0:
        raise ValueError(f"relative accuracy must be between 0 and 1, not {accuracy}")
    return (1.0 + accuracy) / (1.0 - accuracy)


@dataclass
class QuantileSketch:
    accuracy: float
    positive: dict[int, int] = field(default_factory=dict)
    negative: dict[int, int] = field(default_factory=dict)
    zero: int = 0
    pos_inf: int = 0
    neg_inf: int = 0

    @property
    def count(self) -> int:
        return sum(self.positive.values()) + sum(self.negative.values()) + self.zero + self.pos_inf + self.neg_inf

    @classmethod
    def of(cls, values: Iterable[float] | npt.NDArray[np.float64], accuracy: float = 0.01) -> QuantileSketch:
        """The sketch of ``values`` (NaN skipped, as pandas skips it)."""
        array = np.asarray(values, dtype=np.float64)
        groups = np.zeros(len(array), dtype=np.int64)
        return sketch_groups(array, groups, 1, accuracy)[0]

    def merge(self, other: QuantileSketch) -> QuantileSketch:
        """Add ``other`` into this sketch (in place) and return it."""
        if other.accuracy != self.accuracy:
            raise ValueError(f"cannot merge sketches of accuracy {self.accuracy} and {other.accuracy}")
        for mine, theirs in ((self.positive, other.positive), (self.negative, other.negative)):
            for index, count in theirs.items():
                mine[index] = mine.get(index, 0) + count
        self.zero += other.zero
        self.pos_inf += other.pos_inf
        self.neg_inf += other.neg_inf
        return self

    def quantile(self, q: float) -> float | None:
        """The estimate of quantile ``q`` (None for an empty sketch)."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q must be between 0 and 1, not {q}")
        n = self.count
        if n == 0:
            return None
        h = q * (n - 1)
        lo, hi = math.floor(h), math.ceil(h)
        v_lo = self._value_at(lo)
        if hi == lo:
            return v_lo
        v_hi = self._value_at(hi)
        if math.isinf(v_lo) or math.isinf(v_hi):
            return v_lo if v_lo == v_hi else (v_lo if h - lo < 0.5 else v_hi)
        return v_lo + (h - lo) * (v_hi - v_lo)

    def _value_at(self, rank: int) -> float:
        """The representative of the value with 0-based ``rank`` in ascending order."""
        gamma = gamma_of(self.accuracy)
        seen = self.neg_inf
        if rank < seen:
            return -math.inf
        for index in sorted(self.negative, reverse=True):
            seen += self.negative[index]
            if rank < seen:
                return -_representative(index, gamma)
        seen += self.zero
        if rank < seen:
            return 0.0
        for index in sorted(self.positive):
            seen += self.positive[index]
            if rank < seen:
                return _representative(index, gamma)
        return math.inf

    def to_state(self) -> dict[str, object]:
        """The wire form: bucket lists sorted by index."""
        return {
            "positive": sorted(self.positive.items()),
            "negative": sorted(self.negative.items()),
            "zero": self.zero,
            "pos_inf": self.pos_inf,
            "neg_inf": self.neg_inf,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, object], accuracy: float) -> QuantileSketch:
        def buckets(key: str) -> dict[int, int]:
            raw = state.get(key, [])
            if not isinstance(raw, list):
                raise ValueError(f"sketch {key} must be a list of [index, count]")
            out: dict[int, int] = {}
            for pair in raw:
                index, count = pair
                if not isinstance(index, int) or not isinstance(count, int) or count < 0:
                    raise ValueError(f"sketch {key} holds a bad bucket {pair!r}")
                out[index] = out.get(index, 0) + count
            return out

        def counter(key: str) -> int:
            value = state.get(key, 0)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"sketch {key} must be a count")
            return value

        return cls(accuracy=accuracy, positive=buckets("positive"), negative=buckets("negative"),
                   zero=counter("zero"), pos_inf=counter("pos_inf"), neg_inf=counter("neg_inf"))


def _representative(index: int, gamma: float) -> float:
    return 2.0 * gamma ** index / (gamma + 1.0)


def sketch_groups(values: npt.NDArray[np.float64], groups: npt.NDArray[np.int64], n_groups: int,
                  accuracy: float) -> list[QuantileSketch]:
    """One sketch per group id in ``range(n_groups)``, built vectorised (one pass, one sort)."""
    gamma = gamma_of(accuracy)
    sketches = [QuantileSketch(accuracy=accuracy) for _ in range(n_groups)]
    keep = ~np.isnan(values)
    values, groups = values[keep], groups[keep]
    magnitude = np.abs(values)
    finite = np.isfinite(values)
    tiny = finite & (magnitude < MIN_MAGNITUDE)
    for sketch, count in zip(sketches, np.bincount(groups[tiny], minlength=n_groups), strict=True):
        sketch.zero = int(count)
    for attr, mask in (("pos_inf", ~finite & (values > 0)), ("neg_inf", ~finite & (values < 0))):
        for sketch, count in zip(sketches, np.bincount(groups[mask], minlength=n_groups), strict=True):
            setattr(sketch, attr, int(count))
    bucketed = finite & ~tiny
    indices = np.ceil(np.log(magnitude[bucketed]) / math.log(gamma)).astype(np.int64)
    negative = values[bucketed] < 0
    bucket_groups = groups[bucketed]
    # One combined key per (group, sign, bucket): counting unique keys is one sort.
    offset = int(np.abs(indices).max(initial=0)) + 1
    keys = (bucket_groups * 2 + negative) * (2 * offset + 1) + (indices + offset)
    unique, counts = np.unique(keys, return_counts=True)
    bucket = unique % (2 * offset + 1) - offset
    rest = unique // (2 * offset + 1)
    for g, is_negative, index, count in zip((rest // 2).tolist(), (rest % 2).tolist(), bucket.tolist(),
                                            counts.tolist(), strict=True):
        target = sketches[g].negative if is_negative else sketches[g].positive
        target[index] = count
    return sketches
