"""Rows grouped by their keys into dense integer group ids, nulls forming a group of their own.

Each key becomes integer codes (a dictionary-read categorical's own codes;
for a time bucket, the number of minutes, hours, days, weeks or months since
the earliest one; otherwise ``pandas.factorize``), the codes are combined
mixed-radix, and the observed combinations are numbered: no sort, no
per-group Python. Time buckets are in UTC; weeks start on Monday.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

Array = npt.NDArray[Any]

# Above this many possible key combinations, group ids are numbered by hashing instead of a lookup table.
DENSE_KEY_SPACE = 1 << 24
_US = {"minute": 60_000_000, "hour": 3_600_000_000, "day": 86_400_000_000}
_DAY_US = 86_400_000_000


# -- time buckets ------------------------------------------------------------------------------------------------


def bucket_numbers(ticks: npt.NDArray[np.int64], interval: str) -> npt.NDArray[np.int64]:
    """Microsecond UTC ticks to bucket numbers: minutes, hours or days since the epoch, Monday-starting
    weeks since the one holding the epoch, or months since January 1970 (NaT ticks give garbage: mask them)."""
    if interval in _US:
        return ticks // _US[interval]
    days = ticks // _DAY_US
    if interval == "week":
        # Day 0 (1970-01-01) was a Thursday: (day + 3) // 7 counts Mondays.
        return (days + 3) // 7
    return ticks.view("datetime64[us]").astype("datetime64[M]").view(np.int64)


def bucket_starts(numbers: npt.NDArray[np.int64], interval: str) -> npt.NDArray[np.datetime64]:
    """The first instant of each bucket number, as ``datetime64[us]``."""
    if interval in _US:
        return (numbers * _US[interval]).view("datetime64[us]")
    if interval == "week":
        return ((numbers * 7 - 3) * _DAY_US).view("datetime64[us]")
    return numbers.view("datetime64[M]").astype("datetime64[us]")


def bucket_times(values: npt.NDArray[np.datetime64], interval: str) -> npt.NDArray[np.datetime64]:
    """Floor UTC times to their minute, hour, day, Monday-starting week or month (NaT stays NaT)."""
    ticks = values.astype("datetime64[us]").view(np.int64)
    missing = np.isnat(values)
    starts = bucket_starts(bucket_numbers(ticks, interval), interval).copy()
    starts[missing] = np.datetime64("NaT")
    return starts


# -- grouping ----------------------------------------------------------------------------------------------------


@dataclass
class KeyCodes:
    codes: npt.NDArray[np.int64]
    # The key value of each code, as a pandas Series (its dtype is the key's: nulls are its missing value).
    values: pd.Series


@dataclass
class Groups:
    ids: npt.NDArray[np.int64]
    count: int
    # One Series per key: the key value of each group.
    keys: list[pd.Series]
    rows: npt.NDArray[np.int64]


def key_codes(column: pd.Series | Array) -> KeyCodes:
    """Integer codes for one key column, nulls included as a code of their own."""
    if isinstance(column, pd.Series) and isinstance(column.dtype, pd.CategoricalDtype):
        codes = column.cat.codes.to_numpy(dtype=np.int64)
        categories = pd.Series(column.cat.categories)
        if (codes < 0).any():
            codes = np.where(codes < 0, len(categories), codes)
            categories = pd.concat([categories, pd.Series([None], dtype=categories.dtype)], ignore_index=True)
        return KeyCodes(codes=codes, values=categories)
    raw, uniques = pd.factorize(column, use_na_sentinel=False)
    return KeyCodes(codes=np.asarray(raw, dtype=np.int64), values=pd.Series(uniques))


def bucket_codes(times: npt.NDArray[np.datetime64], interval: str) -> KeyCodes:
    """Codes for a time bucket by arithmetic (bucket number minus the first one), no hashing."""
    ticks = times.astype("datetime64[us]").view(np.int64)
    missing = np.isnat(times)
    numbers = bucket_numbers(ticks, interval)
    present = numbers[~missing] if missing.any() else numbers
    if len(present) == 0:
        return KeyCodes(codes=np.zeros(len(times), dtype=np.int64),
                        values=pd.Series(np.array(["NaT"], dtype="datetime64[us]")))
    first, last = int(present.min()), int(present.max())
    span = last - first + 1
    if span > max(DENSE_KEY_SPACE, 4 * len(times)):
        return key_codes(bucket_times(times, interval))
    codes = numbers
    codes -= first
    starts = bucket_starts(np.arange(first, last + 1, dtype=np.int64), interval)
    if missing.any():
        codes[missing] = span
        starts = np.concatenate([starts, np.array(["NaT"], dtype="datetime64[us]")])
    return KeyCodes(codes=codes, values=pd.Series(starts))


def group_rows(keys: Sequence[KeyCodes | pd.Series | Array], n_rows: int) -> Groups:
    """Dense group ids for the rows (nulls form a group), and each group's key values and size."""
    if not keys:
        ids = np.zeros(n_rows, dtype=np.int64)
        count = 1 if n_rows else 0
        return Groups(ids=ids, count=count, keys=[], rows=np.bincount(ids, minlength=count).astype(np.int64))
    coded = [k if isinstance(k, KeyCodes) else key_codes(k) for k in keys]
    sizes = [max(len(k.values), 1) for k in coded]
    combined, space, radix_ok = _combine(coded, sizes)
    if space <= max(DENSE_KEY_SPACE, 4 * n_rows):
        per_code = np.bincount(combined, minlength=space)
        present = np.flatnonzero(per_code)
        lookup = np.full(space, -1, dtype=np.int64)
        lookup[present] = np.arange(len(present), dtype=np.int64)
        ids = lookup[combined]
        rows = per_code[present].astype(np.int64)
        group_codes = present.astype(np.int64)
    else:
        dense, seen = pd.factorize(combined)
        ids = np.asarray(dense, dtype=np.int64)
        rows = np.bincount(ids, minlength=len(seen)).astype(np.int64)
        group_codes = np.asarray(seen, dtype=np.int64)
    if radix_ok:
        per_key = []
        rest = group_codes
        for size in reversed(sizes):
            per_key.append(rest % size)
            rest = rest // size
        per_key.reverse()
    else:
        # Any row of a group carries its key: take one per group.
        one_row = np.zeros(len(rows), dtype=np.int64)
        one_row[ids] = np.arange(n_rows, dtype=np.int64)
        per_key = [k.codes[one_row] for k in coded]
    values = [k.values.take(codes).reset_index(drop=True) for k, codes in zip(coded, per_key, strict=True)]
    return Groups(ids=ids, count=len(rows), keys=values, rows=rows)


def _combine(coded: list[KeyCodes], sizes: list[int]) -> tuple[npt.NDArray[np.int64], int, bool]:
    """The per-key codes combined mixed-radix: one integer per distinct key tuple, the size of that space,
    and whether the combination can be taken apart again by division (not once it had to be renumbered)."""
    combined = coded[0].codes
    space = sizes[0]
    radix_ok = True
    # Whether ``combined`` is a new array, free to update in place: each new
    # array of one value per row costs its allocation and page faults again.
    owned = False
    for key, size in zip(coded[1:], sizes[1:], strict=True):
        if space * size >= 1 << 62:
            # Renumber what is combined so far, so the next step cannot overflow.
            dense, seen = pd.factorize(combined)
            combined, space = np.asarray(dense, dtype=np.int64), max(len(seen), 1)
            radix_ok, owned = False, True
        if owned:
            combined *= size
        else:
            combined, owned = combined * size, True
        combined += key.codes
        space *= size
    return combined, space, radix_ok
