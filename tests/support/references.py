"""Independent NumPy float64 references of every loss term, written from the papers' formulas
(never from ucmkd's helpers), and the rounding bounds the tests compare with.

Tolerances: a float64 computation of a few hundred operations differs from another float64 computation of the same
quantity by at most ~n * eps64 * (sum of |terms|), i.e. < 1e-12 relative here, so float64
comparisons use REL64. A float32 result is compared with a float64 reference only through
:func:`f32_bound`, the standard forward error bound n * eps32 * sum|terms|, which holds for any
summation order (Intel or AMD kernels alike).
"""
import numpy as np
import torch

EPS32 = float(torch.finfo(torch.float32).eps)    # 1.19e-07
EPS64 = float(torch.finfo(torch.float64).eps)    # 2.22e-16
REL64 = 1e-10      # >> n * eps64 for the n < 10^4 operations of any term below


def f32_bound(n_ops: int, abs_sum: float) -> float:
    """Absolute bound on the rounding error of a float32 value computed in ``n_ops`` dependent
    operations from terms whose absolute values sum to ``abs_sum``."""
    return n_ops * EPS32 * abs_sum


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def softmax(z: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(z))


def ce(logits, y, label_smoothing: float = 0.0) -> float:
    """Mean cross-entropy; with smoothing eps the target is (1 - eps) one-hot + eps / K."""
    lp = log_softmax(logits)
    nll = -lp[np.arange(len(y)), np.asarray(y)]
    return float(np.mean((1 - label_smoothing) * nll - label_smoothing * lp.mean(1)))


def ce_rows(logits, y) -> np.ndarray:
    return -log_softmax(logits)[np.arange(len(y)), np.asarray(y)]


def kl_rows(s, t, T: float) -> np.ndarray:
    """Per row T^2 * KL(softmax(t / T) || softmax(s / T))."""
    lt, ls = log_softmax(np.asarray(t) / T), log_softmax(np.asarray(s) / T)
    return T * T * (np.exp(lt) * (lt - ls)).sum(1)


def kd(s, t, T: float) -> float:
    """Hinton et al. 2015: T^2 KL(p_t^T || p_s^T), batch mean."""
    return float(kl_rows(s, t, T).mean())


def dkd_terms(s, t, y, T: float) -> tuple[float, float]:
    """Zhao et al. 2022, Eq. 7: (TCKD, NCKD), each T^2-scaled, batch means."""
    tck, nck = [], []
    for si, ti, yi in zip(np.asarray(s, np.float64), np.asarray(t, np.float64), np.asarray(y)):
        ps, pt = softmax(si / T), softmax(ti / T)
        bs, bt = np.array([ps[yi], 1 - ps[yi]]), np.array([pt[yi], 1 - pt[yi]])
        tck.append(float(np.sum(bt * (np.log(bt) - np.log(bs)))))
        qs, qt = softmax(np.delete(si, yi) / T), softmax(np.delete(ti, yi) / T)
        nck.append(float(np.sum(qt * (np.log(qt) - np.log(qs)))))
    return T * T * float(np.mean(tck)), T * T * float(np.mean(nck))


def label_alignment(s, th, y) -> float:
    """The paper's joint LA as its authors coded it: mean_i -log p_S(y_i) + p_T(y_i) log p_T(y_i)."""
    y = np.asarray(y)
    ls, lt = log_softmax(s)[np.arange(len(y)), y], log_softmax(th)[np.arange(len(y)), y]
    return float(np.mean(-ls + np.exp(lt) * lt))


def mmd2(x, y, factors) -> float:
    """Biased MMD^2 with a mixture of Gaussian kernels, sigma^2 = factor * median pairwise
    squared distance of the pooled sample (off-diagonal pairs)."""
    z = np.concatenate([np.asarray(x, np.float64), np.asarray(y, np.float64)])
    d2 = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)
    med = np.median(d2[np.triu_indices(len(z), k=1)])
    k = np.mean([np.exp(-d2 / (2 * f * med)) for f in factors], axis=0)
    n = len(x)
    return float(k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean())


def mse(a, b) -> float:
    return float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))


def linear(module, z) -> np.ndarray:
    """An nn.Linear's map, from its weights: z W^T + b."""
    w = module.weight.detach().double().numpy()
    b = module.bias.detach().double().numpy()
    return np.asarray(z, np.float64) @ w.T + b
