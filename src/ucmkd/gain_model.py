"""The gain model of ``ucmkd diagnose``: predicts ``ucmkd``'s gain over ``ce`` (pp) from a
setting's probe features (:func:`features_of`), a ridge regression fitted on measured runs
(``benchmarks/diagnose_validation.py``) and shipped as ``diagnose_model.json``."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .config import from_dict
from .errors import ConfigError, DataError

COEFFICIENTS_FILE = Path(__file__).with_name("diagnose_model.json")


def _pp(v) -> float:
    return 100.0 * float(v)


def features_of(d: dict) -> dict:
    """The gain model's inputs from a diagnosis dict, one per term of the bound plus the student's
    own unlabelled data:

    - ``headroom``: teacher accuracy minus the CE probe's, at least 0 (pp): what a teacher can add;
    - ``fa_classwise``: the class-wise OT cost of the aligned probe features (feature alignment);
    - ``la_tv``: TV between the teacher head's and the probe head's predictions (label alignment);
    - ``unlabelled_potential``: ``ce (100 - ce) / 100 * u * more / 100`` (pp), with ``ce`` the CE
      probe's accuracy, ``more`` the learning curve's accuracy with more labels and
      ``u = min(1, log(1 + unlabelled / labelled))``: pseudo-labels help most where the student is
      neither hopeless nor done, an unlabelled pool exists, and more labels would make it better.
    NaN alignment terms (no teacher head on the features) count as the worst value, 1."""
    ce = _pp(d["ce_val_acc"])
    u = min(1.0, math.log1p(d["n_unlabelled"] / max(1, d["n_labelled"])))
    nan1 = lambda v: 1.0 if v is None or math.isnan(v) else float(v)  # noqa: E731
    return {"headroom": max(0.0, _pp(d["teacher_val_acc"]) - ce), "fa_classwise": nan1(d["fa_classwise"]),
            "la_tv": nan1(d["la_tv"]),
            "unlabelled_potential": ce * (100.0 - ce) / 100.0 * u * _pp(d["more_labels_val_acc"]) / 100.0}


@dataclass
class GainModel:
    """Predicted gain (pp) = max(0, intercept + sum_f coef_f (x_f - mean_f) / scale_f), with the
    interval prediction -/+ ``half_width`` (the ``coverage`` quantile of the leave-one-setting-out
    absolute errors on the runs it was fitted on). Saved as JSON (:data:`COEFFICIENTS_FILE`)."""

    features: list
    mean: list
    scale: list
    coef: list
    intercept: float
    alpha: float
    half_width: float
    coverage: float = 0.8
    info: dict = field(default_factory=dict)

    def predict(self, x: dict) -> tuple[float, float, float]:
        """(gain, low, high) in pp for features ``x`` (:func:`features_of`)."""
        missing = [f for f in self.features if f not in x]
        if missing:
            raise ConfigError(f"gain model: features {missing} missing (the model file names {self.features})")
        v = self.intercept + sum(c * (x[f] - m) / s for f, c, m, s in zip(self.features, self.coef, self.mean, self.scale))
        g = max(0.0, float(v))
        return g, g - self.half_width, g + self.half_width

    @classmethod
    def fit(cls, rows: list[dict], gains: list[float], features: Optional[list] = None,
            alphas=(0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0), coverage: float = 0.8, info: Optional[dict] = None):
        """Ridge regression of ``gains`` (pp) on the features of diagnosis dicts ``rows``; the
        ridge strength by leave-one-out error; the interval from the leave-one-out errors."""
        names = features or list(features_of(rows[0]))
        X = np.array([[features_of(r)[f] for f in names] for r in rows], dtype=np.float64)
        y = np.asarray(gains, dtype=np.float64)
        if len(y) < 3:
            raise DataError(f"gain model: {len(y)} fitting settings are too few")
        mean, scale = X.mean(0), X.std(0)
        scale[scale == 0] = 1.0
        Z = (X - mean) / scale

        def solve(Z, y, alpha):
            zm, ym = Z.mean(0), y.mean()
            w = np.linalg.solve((Z - zm).T @ (Z - zm) + alpha * np.eye(Z.shape[1]), (Z - zm).T @ (y - ym))
            return w, ym - zm @ w

        def loo(alpha):
            errs = []
            for i in range(len(y)):
                keep = np.arange(len(y)) != i
                w, b = solve(Z[keep], y[keep], alpha)
                errs.append(max(0.0, b + Z[i] @ w) - y[i])
            return np.array(errs)

        scores = {a: float(np.abs(loo(a)).mean()) for a in alphas}
        alpha = min(scores, key=scores.get)
        w, b = solve(Z, y, alpha)
        errs = loo(alpha)
        half = float(np.quantile(np.abs(errs), coverage))
        return cls(features=names, mean=mean.tolist(), scale=scale.tolist(), coef=w.tolist(), intercept=float(b),
                   alpha=alpha, half_width=half, coverage=coverage,
                   info={**(info or {}), "loo_mae": float(np.abs(errs).mean()), "n": int(len(y))})

    def describe(self) -> str:
        terms = ", ".join(f"{f} {c:+.2f}" for f, c in zip(self.features, self.coef))
        return (f"ridge alpha {self.alpha}, intercept {self.intercept:+.2f} pp, standardised coefficients: {terms}; "
                f"interval +-{self.half_width:.1f} pp ({100 * self.coverage:.0f} % of leave-one-out errors), "
                f"leave-one-out MAE {self.info.get('loo_mae', math.nan):.2f} pp on {self.info.get('n')} settings")

    def save(self, path: str | Path = COEFFICIENTS_FILE) -> None:
        from .cache import write_json

        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path = COEFFICIENTS_FILE) -> "GainModel":
        from .cache import read_json

        path = Path(path)
        d = read_json(path, "gain model")         # a DataError naming the file if unreadable
        if d is None:
            raise DataError(f"{path}: the gain model's coefficients are missing (fit them with "
                            f"python benchmarks/diagnose_validation.py)")
        try:
            return from_dict(cls, d, str(path))
        except (ValueError, ConfigError) as e:
            raise DataError(f"{path}: unreadable gain model ({e})") from None
