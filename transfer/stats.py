"""The statistics of a report: how sure a mean over trials, and a difference of two, can be.

Transfer results vary from trial to trial (COCO's run-to-run spread is about 0.3 AP), so a mean
comes with the 95% confidence interval of the mean (t distribution, n - 1 degrees of freedom), and
a difference against the baseline with its 95% interval and a two-sided p-value:

- paired t-test when both sides ran exactly the same seeds (a seed fixes the heads' initialisation
  and the data order, so trial i of one weights file is matched with trial i of the other);
- Welch's t-test (unequal variances) otherwise.

Fewer than ``MIN_TRIALS`` trials on either side get no test at all: a p-value from two trials
would be noise dressed as evidence. The distributions are scipy's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
from scipy import stats

LEVEL = 0.95
ALPHA = 1 - LEVEL
MIN_TRIALS = 3
NO_TEST = f"n < {MIN_TRIALS}, no test"


def mean_interval(values) -> tuple[float, float]:
    """The 95% confidence interval of the mean of ``values`` (NaN, NaN below two values)."""
    values = pd.Series(values, dtype=float).dropna()
    if len(values) < 2:
        return math.nan, math.nan
    if values.std() == 0:  # identical trials: scipy's interval would divide by a zero scale
        return float(values.mean()), float(values.mean())
    low, high = stats.t.interval(LEVEL, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    return float(low), float(high)


@dataclass(frozen=True)
class Comparison:
    delta: float  # mean of ours minus mean of the baseline
    low: float  # 95% interval of the delta
    high: float
    p_value: float
    test: str  # "paired t-test", "Welch t-test" or NO_TEST

    @property
    def significant(self) -> bool | None:
        """p < 0.05; None when there was no test (or it could not be computed)."""
        return None if math.isnan(self.p_value) else bool(self.p_value < ALPHA)


def compare(ours: pd.Series, baseline: pd.Series) -> Comparison:
    """``ours`` against ``baseline``: values indexed by trial seed."""
    ours, baseline = ours.dropna().astype(float), baseline.dropna().astype(float)
    delta = ours.mean() - baseline.mean() if len(ours) and len(baseline) else math.nan
    if min(len(ours), len(baseline)) < MIN_TRIALS:
        return Comparison(delta, math.nan, math.nan, math.nan, NO_TEST)
    if set(ours.index) == set(baseline.index):
        result = stats.ttest_rel(ours.sort_index(), baseline.sort_index())
        test = "paired t-test"
    else:
        result = stats.ttest_ind(ours, baseline, equal_var=False)
        test = "Welch t-test"
    interval = result.confidence_interval(LEVEL)
    return Comparison(float(delta), float(interval.low), float(interval.high), float(result.pvalue), test)
