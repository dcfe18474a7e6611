"""scikit-learn's StratifiedGroupKFold, the same folds in a fraction of the time.

sklearn assigns groups to folds greedily: for each group (most unevenly labelled first) it tries
every fold, scoring each by the spread of the class shares over the folds, in a Python loop of
small NumPy calls: n_splits evaluations of an n_splits x classes array per group. With one group
per image and the validation cut of `data.split_by_patient` (17 folds), 50,000 manifest rows took
over two minutes. `StratifiedGroupKFold` here replaces only that per-group step
(`_find_best_fold`) with one evaluation of all the candidate folds at once, with the same NumPy
arithmetic in the same order and the same tie-breaking, so it gives sklearn's folds bit for bit
(tests/test_data.py checks this on random data and the fixture split). If a later scikit-learn
renames the hook, this class is sklearn's own: the same folds, only slower (the test says so).
"""
from __future__ import annotations

import math

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold as _SklearnStratifiedGroupKFold

HOOK = "_find_best_fold"  # the sklearn method replaced here


class StratifiedGroupKFold(_SklearnStratifiedGroupKFold):
    def _find_best_fold(self, y_counts_per_fold, y_cnt, group_y_counts):
        n_folds = len(y_counts_per_fold)
        # candidate i: the group added to fold i (sklearn adds it in place, scores, takes it out again)
        trial = np.repeat(y_counts_per_fold[None], n_folds, axis=0)
        trial[np.arange(n_folds), np.arange(n_folds)] += group_y_counts
        scores = np.std(trial / y_cnt.reshape(1, 1, -1), axis=1).mean(axis=1).tolist()
        sizes = y_counts_per_fold.sum(axis=1).tolist()
        best, min_score, min_size = None, math.inf, math.inf
        for fold, (score, size) in enumerate(zip(scores, sizes)):
            # np.isclose(score, min_score) with its defaults (rtol 1e-5, atol 1e-8), in plain floats
            close = score == min_score or abs(score - min_score) <= 1e-8 + 1e-5 * abs(min_score)
            if score < min_score or (close and size < min_size):
                best, min_score, min_size = fold, score, size
        return best
