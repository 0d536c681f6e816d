"""The likelihood of a label string ``a`` given a response: ``log P(a|x,y)`` for SteerLM 2.0's weights.

The reward model predicts each attribute as a real number; a label is a set of whole values 0..4. The
model of ``P(a|x,y)`` used by ``steerlm2-data`` (issue 16):

- attribute ``k``'s true value is Gaussian around the reward model's prediction ``mu_k`` with a standard
  deviation ``sigma_k`` fitted on the reward model's validation residuals (:func:`fit_residual_sigma`);
- discretised over the integers 0..4: ``P(v) = Phi((v + 0.5 - mu) / sigma) - Phi((v - 0.5 - mu) / sigma)``,
  with the end bins open (``v = 0`` takes everything below 0.5, ``v = 4`` everything above 3.5), so the
  five probabilities sum to exactly 1 whatever ``mu`` is, including predictions outside 0..4;
- attributes independent given the response: ``log P(a|x,y) = sum over the label's attributes of
  log P(v_k)``.

Everything is computed in log space in float64 (:func:`log_ndtr`, tail-safe differences), so a prediction
far from the asked value gives a large negative number, never ``-inf``. Pure Python and numpy.
The parameters travel as JSON (:func:`likelihood_params`) into the stage's manifest.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from steerray.attributes import ATTRIBUTES, IGNORE_VALUE, MAX_VALUE, MIN_VALUE, check_attribute, parse_label
from steerray.errors import SteerrayError

LIKELIHOOD_KIND = "discretised_gaussian"
VALUES: tuple[int, ...] = tuple(range(MIN_VALUE, MAX_VALUE + 1))
MIN_SIGMA = 0.05  # floor: a perfect fit on few cells would make every other value impossible
MIN_CELLS = 2  # labelled validation cells an attribute needs before its sigma means anything
_ASYMPTOTIC_BELOW = -20.0  # erfc is exact enough above; the tail series is (error < 3e-12) below
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


class LikelihoodError(SteerrayError, ValueError):
    """Bad input to the label likelihood: an attribute without sigma, a value outside 0..4, a NaN."""


# --------------------------------------------------------------------------------------------------
# The standard normal CDF in log space
# --------------------------------------------------------------------------------------------------

def log_ndtr(x: float) -> float:
    """``log Phi(x)`` for the standard normal CDF, accurate in both tails (float64)."""
    if math.isnan(x):
        raise LikelihoodError("log_ndtr of NaN")
    if x == math.inf:
        return 0.0
    if x == -math.inf:
        return -math.inf
    if x > 0:  # Phi(x) = 1 - Phi(-x): log1p keeps the digits of the small upper tail
        return math.log1p(-0.5 * math.erfc(x / math.sqrt(2.0)))
    if x >= _ASYMPTOTIC_BELOW:
        return math.log(0.5 * math.erfc(-x / math.sqrt(2.0)))
    # Phi(x) = phi(x)/|x| * (1 - 1/x^2 + 3/x^4 - 15/x^6 + ...): erfc underflows past x ~ -38.
    inv2 = 1.0 / (x * x)
    series = 1.0 - inv2 * (1.0 - 3.0 * inv2 * (1.0 - 5.0 * inv2 * (1.0 - 7.0 * inv2 * (1.0 - 9.0 * inv2))))
    return -0.5 * x * x - math.log(-x) - _LOG_SQRT_2PI + math.log(series)


def _log_sub(big: float, small: float) -> float:
    """``log(exp(big) - exp(small))`` for ``big >= small``."""
    if small == -math.inf:
        return big
    if small >= big:
        return -math.inf
    return big + math.log1p(-math.exp(small - big))


def log_bin_probability(low: float, high: float) -> float:
    """``log(Phi(high) - Phi(low))`` for standardised edges ``low < high`` (either may be infinite).

    Differences are taken in the tail where both CDF values are small, so no digits cancel.
    """
    if high == math.inf:
        return log_ndtr(-low)
    if low == -math.inf:
        return log_ndtr(high)
    if low >= 0:  # upper tail: Phi(-low) - Phi(-high)
        return _log_sub(log_ndtr(-low), log_ndtr(-high))
    if high <= 0:
        return _log_sub(log_ndtr(high), log_ndtr(low))
    # low < 0 < high: both excluded tails are at most 1/2, their sum has no cancellation
    return math.log1p(-(math.exp(log_ndtr(low)) + math.exp(log_ndtr(-high))))


# --------------------------------------------------------------------------------------------------
# One attribute, one label
# --------------------------------------------------------------------------------------------------

def _check_sigma(sigma: float, name: str = "") -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
        raise LikelihoodError(f"sigma{f' of {name!r}' if name else ''} must be a positive finite number, "
                              f"got {sigma!r}")
    return float(sigma)


def log_value_probability(value: int, pred: float, sigma: float) -> float:
    """``log P(v | mu = pred, sigma)`` of one attribute value ``v`` in 0..4 (the module's discretisation)."""
    if value not in VALUES:
        raise LikelihoodError(f"attribute value {value!r} is not a whole number in {MIN_VALUE}..{MAX_VALUE}")
    if not math.isfinite(pred):
        raise LikelihoodError(f"prediction {pred!r} is not finite")
    sigma = _check_sigma(sigma)
    low = -math.inf if value == MIN_VALUE else (value - 0.5 - pred) / sigma
    high = math.inf if value == MAX_VALUE else (value + 0.5 - pred) / sigma
    return log_bin_probability(low, high)


def log_value_probabilities(pred: float, sigma: float) -> list[float]:
    """The five log-probabilities of 0..4; their exponentials sum to 1."""
    return [log_value_probability(value, pred, sigma) for value in VALUES]


def _label_values(label: str | Mapping[str, float]) -> dict[str, int]:
    values = parse_label(label, integers=True) if isinstance(label, str) else dict(label)
    if not values:
        raise LikelihoodError(f"label {label!r} names no attribute: its likelihood is undefined")
    checked = {}
    for name, value in values.items():
        check_attribute(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer() \
                or not MIN_VALUE <= value <= MAX_VALUE:
            raise LikelihoodError(f"label {label!r}: {name} = {value!r} is not a whole number in "
                                  f"{MIN_VALUE}..{MAX_VALUE}")
        checked[name] = int(value)
    return checked


def log_label_likelihood(preds: Mapping[str, float], label_values: str | Mapping[str, float],
                         sigmas: Mapping[str, float]) -> float:
    """``log P(a|x,y)``: the sum over the label's attributes of :func:`log_value_probability`.

    ``preds`` maps attribute names to the reward model's raw (unclipped) predictions for the response;
    ``label_values`` is the label string ``a`` or its parsed ``{name: value}``; ``sigmas`` comes from
    :func:`fit_residual_sigma`. Attributes the reward model does not predict, or that have no sigma, are
    errors (a silent zero would weigh every response alike on that attribute).
    """
    total = 0.0
    for name, value in _label_values(label_values).items():
        if name not in preds:
            raise LikelihoodError(f"label asks for {name!r}, which the reward model does not predict "
                                  f"(it predicts {', '.join(preds)})")
        if name not in sigmas:
            raise LikelihoodError(f"no fitted sigma for {name!r}: the reward model's validation data has no "
                                  f"labels for it (sigmas exist for {', '.join(sigmas) or 'nothing'})")
        total += log_value_probability(value, float(preds[name]), _check_sigma(sigmas[name], name))
    return total


def label_log_likelihoods(preds: Any, attributes: Sequence[str], labels: Sequence[str | Mapping[str, float]],
                          sigmas: Mapping[str, float]) -> np.ndarray:
    """Batch form for the data generator: ``preds [N, A]`` in ``attributes`` order, one label per row."""
    preds = np.asarray(preds, dtype=np.float64)
    if preds.ndim != 2 or preds.shape[1] != len(attributes) or preds.shape[0] != len(labels):
        raise LikelihoodError(f"preds of shape {preds.shape} do not match {len(labels)} labels x "
                              f"{len(attributes)} attributes")
    return np.asarray([log_label_likelihood(dict(zip(attributes, row.tolist(), strict=True)), label, sigmas)
                       for row, label in zip(preds, labels, strict=True)], dtype=np.float64)


# --------------------------------------------------------------------------------------------------
# Fitting sigma and carrying it as JSON
# --------------------------------------------------------------------------------------------------

def fit_residual_sigma(preds: Any, labels: Any, attributes: Sequence[str] = ATTRIBUTES, *,
                       min_sigma: float = MIN_SIGMA, ignore_value: float = IGNORE_VALUE) -> dict[str, float]:
    """Per attribute, the maximum-likelihood sigma of a Gaussian centred at the prediction:
    ``sqrt(mean((pred - label)^2))`` over the labelled cells (``ignore_value`` cells skipped), floored at
    ``min_sigma``. Attributes with fewer than :data:`MIN_CELLS` labelled cells are left out, so asking
    for them later fails loudly. ``preds`` and ``labels`` are ``[N, A]`` in ``attributes`` order.
    """
    preds = np.asarray(preds, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    if preds.shape != labels.shape or preds.ndim != 2 or preds.shape[1] != len(attributes):
        raise LikelihoodError(f"fit_residual_sigma: preds {preds.shape} and labels {labels.shape} must both be "
                              f"[N, {len(attributes)}]")
    if not np.isfinite(preds).all():
        raise LikelihoodError("fit_residual_sigma: the predictions hold NaN or inf")
    sigmas: dict[str, float] = {}
    for j, name in enumerate(attributes):
        check_attribute(name)
        valid = labels[:, j] != ignore_value
        if int(valid.sum()) < MIN_CELLS:
            continue
        residual = preds[valid, j] - labels[valid, j]
        sigmas[name] = max(float(np.sqrt(np.mean(residual * residual))), float(min_sigma))
    return sigmas


def likelihood_params(sigmas: Mapping[str, float], cells: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The likelihood's parameters as JSON, for the manifest of the records it scored."""
    params: dict[str, Any] = {
        "kind": LIKELIHOOD_KIND,
        "values": list(VALUES),
        "bins": "[v-0.5, v+0.5], end bins open to -inf / +inf",
        "combine": "sum of log-probabilities over the label's attributes",
        "sigmas": {name: _check_sigma(float(sigmas[name]), name) for name in ATTRIBUTES if name in sigmas},
    }
    if cells is not None:
        params["validation_cells"] = {name: int(count) for name, count in cells.items()}
    return params


def sigmas_from_params(params: Mapping[str, Any]) -> dict[str, float]:
    """Read :func:`likelihood_params` back; errors name the bad key."""
    if params.get("kind") != LIKELIHOOD_KIND:
        raise LikelihoodError(f"likelihood params: 'kind' must be {LIKELIHOOD_KIND!r}, got {params.get('kind')!r}")
    sigmas = params.get("sigmas")
    if not isinstance(sigmas, Mapping) or not sigmas:
        raise LikelihoodError("likelihood params: 'sigmas' must be a non-empty object {attribute: sigma}")
    return {check_attribute(name): _check_sigma(value, name) for name, value in sigmas.items()}
