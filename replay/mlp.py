"""The `policy` router's small networks in float64 arithmetic that gives the same bits on every x86 CPU, at any
thread count and with any BLAS.

A threshold on a float decides each escalation (escalate iff pi(escalate | o) >= kappa), and training feeds
those decisions back into the weights for a thousand steps, so a last-bit difference in one matrix product grows
into another policy. Where the bits of the usual kernels depend on the machine:

- matrix products: the BLAS kernel (OpenBLAS picks one per CPU, ``OPENBLAS_CORETYPE``; MKL one per instruction
  set, ``MKL_CBWR``) and the thread count decide the order of the sums and whether they fuse multiply-adds;
- exp, log, tanh: numpy and torch switch to SIMD implementations by CPU (``NPY_DISABLE_CPU_FEATURES``,
  ``ATEN_CPU_CAPABILITY``), and glibc's libm picks FMA variants at load time;
- a dot product of two vectors (BLAS ``ddot``) and torch's reductions sum in an order set by the vector width.

So here every result is either exact or one correctly rounded IEEE operation (+, -, *, /, sqrt) in an order
fixed by this code:

- ``matmul`` splits each row of the left operand and each column of the right one into slices of a few
  significant bits on a common grid (error-free splitting, as in the Ozaki scheme), so that every product of
  two slices and every partial sum of a slice product is exactly representable: BLAS then computes each slice
  product exactly, whatever its order, kernel or threads, and the slice products are added in a fixed order.
  The result is the product of the operands rounded to about 40 significant bits relative to their row and
  column maxima, the same bits everywhere; exact as long as no value is below about 1e-140 in magnitude (the
  slice products would leave the normal range);
- ``exp``, ``expm1``, ``log`` are range reduction and polynomials in basic operations, ``tanh`` comes from
  ``expm1``: a few units in the last place from the correctly rounded value, the same everywhere;
- sums over an axis are numpy's (a fixed pairwise order for contiguous data, sequential otherwise, whatever
  SIMD the CPU has); ``dot`` is such a sum of products, never BLAS.

The networks (``MLP``): Linear-Tanh-Linear-Tanh-Linear, the shape of the policy and of its critics, with the
gradients the trainer needs written out (reverse mode for gradients, forward mode for Fisher-vector products).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

LN2_HI = 6.93147180369123816490e-01  # ln 2 with its low 32 bits zero: k * LN2_HI is exact for |k| < 2^20
LN2_LO = 1.90821492927058770002e-10  # ln 2 - LN2_HI
INV_LN2 = 1.44269504088896338700e00
SQRT_HALF = 0.70710678118654757
EXP_COEFFICIENTS = tuple(1.0 / math.factorial(n) for n in range(1, 15))  # expm1(r) / r = sum r^(n-1) / n!: for
# |r| <= ln 2 / 2 the first term left out is below 2^-56 of the sum
LOG_TERMS = 11  # odd terms of atanh(s), |s| <= 0.1716: the first left out is below 2^-58 relative


def _exp_parts(x) -> tuple[np.ndarray, np.ndarray]:
    """(k, expm1(r)) with exp(x) = 2^k (1 + expm1(r)), |r| <= ln 2 / 2; x clipped to [-750, 710] (beyond, exp
    is 0 or inf anyway)."""
    x = np.clip(np.asarray(x, dtype=np.float64), -750.0, 710.0)
    k = np.rint(x * INV_LN2)
    r = (x - k * LN2_HI) - k * LN2_LO
    q = np.full(r.shape, EXP_COEFFICIENTS[-1])
    for coefficient in EXP_COEFFICIENTS[-2::-1]:  # Horner: q = 1/1! + r/2! + r^2/3! + ...
        np.multiply(q, r, out=q)
        np.add(q, coefficient, out=q)
    return k.astype(np.int32), np.multiply(q, r, out=q)


def exp(x) -> np.ndarray:
    k, small = _exp_parts(x)
    return np.ldexp(1.0 + small, k)


def expm1(x) -> np.ndarray:
    """exp(x) - 1, accurate also near 0."""
    k, small = _exp_parts(x)
    return np.where(k == 0, small, np.ldexp(1.0 + small, k) - 1.0)


def log(x) -> np.ndarray:
    """Natural logarithm of positive x (0 gives -inf)."""
    x = np.asarray(x, dtype=np.float64)
    m, e = np.frexp(x)  # x = m 2^e, m in [1/2, 1)
    low = m < SQRT_HALF
    m = np.where(low, 2.0 * m, m)  # now in [sqrt(1/2), sqrt(2)): log m = 2 atanh((m - 1) / (m + 1))
    e = np.where(low, e - 1, e).astype(np.float64)
    f = m - 1.0
    s = f / (2.0 + f)
    s2 = s * s
    series = np.full(s.shape, 1.0 / (2 * LOG_TERMS - 1))
    for n in range(LOG_TERMS - 2, -1, -1):
        np.multiply(series, s2, out=series)
        np.add(series, 1.0 / (2 * n + 1), out=series)
    value = e * LN2_HI + (e * LN2_LO + 2.0 * s * series)
    return np.where(x > 0, value, np.where(x == 0, -np.inf, np.nan))


def tanh(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    minus = expm1(-2.0 * np.abs(x))  # in (-1, 0]
    return np.copysign(-minus / (2.0 + minus), x)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Over the last axis; a logit of ``MASKED`` gives probability 0 and a finite log."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - log(exp(shifted).sum(axis=-1, keepdims=True))


def dot(a: np.ndarray, b: np.ndarray) -> float:
    """Sum of a * b over flat vectors, in numpy's fixed order (never BLAS ddot)."""
    return float(np.sum(a * b))


def _slices(a: np.ndarray, axis: int, bits: int, count: int) -> list[np.ndarray]:
    """``count`` slices summing to ``a`` rounded to ``count * bits`` bits below the largest magnitude along
    ``axis``: slice j (from 1) is an integer multiple of 2^(E - j * bits) with at most ``bits`` bits, where 2^E
    bounds the magnitudes along ``axis``. Each is cut off exactly by adding and subtracting 1.5 * 2^(E - j bits
    + 52), which rounds to that grid (Rump, Ogita, Oishi's ExtractScalar)."""
    _, top = np.frexp(np.abs(a).max(axis=axis, keepdims=True, initial=0.0))
    rest, slices = a, []
    for j in range(1, count + 1):
        if slices:
            rest = rest - slices[-1]
        sigma = np.ldexp(1.5, top + 52 - bits * j)
        slices.append((rest + sigma) - sigma)
    return slices


class Split:
    """A matrix cut into the slices ``matmul`` multiplies: per row as a left operand, per column as a right one.
    Splitting once serves every product with the same operand (a network's weights, a batch's activations)."""

    def __init__(self, a: np.ndarray, left: bool):
        self.shape = a.shape
        self.bits, count = _cut(a.shape[1] if left else a.shape[0])
        self.slices = _slices(a, 1 if left else 0, self.bits, count)


def _cut(inner: int) -> tuple[int, int]:
    """(bits per slice, slices) for products summing ``inner`` terms: two ``bits``-bit slices multiply and add
    up ``inner`` times without rounding; two slices of 20 or more bits (some 40 significant bits), else three."""
    bits = (53 - max(int(inner - 1).bit_length(), 1)) // 2
    return bits, 2 if bits >= 20 else 3


def matmul(a: np.ndarray | Split, b: np.ndarray | Split) -> np.ndarray:
    """a @ b for 2-d float64 arrays (or their ``Split``), the same bits on every machine (module doc)."""
    left = a if isinstance(a, Split) else Split(a, left=True)
    right = b if isinstance(b, Split) else Split(b, left=False)
    count = len(left.slices)
    out = left.slices[0] @ right.slices[0]
    for order in range(1, count):  # slice products by size, largest first; the smallest left out
        for i in range(order + 1):
            out += left.slices[i] @ right.slices[order - i]
    return out


class Activations:
    """What a forward pass keeps for the backward and forward-mode passes: each layer's augmented input, and
    its splits as a left operand, by rows (forward mode) and by columns (the weight gradients)."""

    def __init__(self):
        self.inputs, self.rows, self._columns = [], [], {}

    def columns(self, layer: int) -> Split:
        if layer not in self._columns:
            self._columns[layer] = Split(self.inputs[layer].T, left=True)
        return self._columns[layer]


def _augment(x: np.ndarray) -> np.ndarray:
    """Inputs with a column of ones: the bias is the last row of each weight matrix, so that the bias and its
    gradient (a sum over the batch) go through ``matmul`` too."""
    return np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)


@dataclass
class MLP:
    """Linear-Tanh-Linear-Tanh-Linear. ``layers[i]`` is (inputs + 1, outputs): the weights, then the bias row.
    Change them through ``set_vector`` (the splits of the weights are kept until then)."""

    layers: list[np.ndarray]
    _splits: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def init(cls, n_inputs: int, hidden: int, n_outputs: int, rng: np.random.Generator) -> MLP:
        """Weights and biases uniform in +-1/sqrt(fan in), as torch.nn.Linear initialises them."""
        sizes = [(n_inputs, hidden), (hidden, hidden), (hidden, n_outputs)]
        return cls([rng.uniform(-1.0, 1.0, (n + 1, m)) / np.sqrt(n) for n, m in sizes])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)[0]

    def _weights(self, layer: int, kind: str) -> Split:
        """The layer's matrix split as a right operand: with its bias row (``forward``), without it
        (``through``: from the layer's input onwards) or transposed without it (``back``)."""
        key = (layer, kind)
        if key not in self._splits:
            matrix = {"forward": self.layers[layer], "through": self.layers[layer][:-1]}.get(kind)
            self._splits[key] = Split(self.layers[layer][:-1].T if matrix is None else matrix, left=False)
        return self._splits[key]

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, Activations]:
        """(outputs, activations) for rows ``x``; row i of the outputs depends on row i of ``x`` only."""
        kept = Activations()
        out = np.asarray(x, dtype=np.float64)
        for layer in range(3):
            if layer:
                out = tanh(out)
            kept.inputs.append(_augment(out))
            kept.rows.append(Split(kept.inputs[layer], left=True))
            out = matmul(kept.rows[layer], self._weights(layer, "forward"))
        return out, kept

    def backward(self, kept: Activations, grad_out: np.ndarray) -> np.ndarray:
        """Gradient of sum(grad_out * outputs) over the parameters, flat (``vector``'s order)."""
        grads = [None] * 3
        delta = grad_out
        for layer in (2, 1, 0):
            grads[layer] = matmul(kept.columns(layer), delta)
            if layer:
                hidden = kept.inputs[layer][:, :-1]
                delta = matmul(delta, self._weights(layer, "back")) * (1.0 - hidden * hidden)
        return np.concatenate([g.ravel() for g in grads])

    def jvp(self, kept: Activations, tangent: np.ndarray) -> np.ndarray:
        """Directional derivative of the outputs along the flat parameter direction ``tangent``."""
        directions = self._unflatten(tangent)
        d_out = matmul(kept.rows[0], directions[0])
        for layer in (1, 2):
            hidden = kept.inputs[layer][:, :-1]
            d_hidden = d_out * (1.0 - hidden * hidden)
            d_out = matmul(d_hidden, self._weights(layer, "through")) + matmul(kept.rows[layer], directions[layer])
        return d_out

    def vector(self) -> np.ndarray:
        return np.concatenate([layer.ravel() for layer in self.layers])

    def set_vector(self, vector: np.ndarray) -> None:
        self.layers = self._unflatten(vector)
        self._splits = {}

    def _unflatten(self, vector: np.ndarray) -> list[np.ndarray]:
        sizes = np.cumsum([layer.size for layer in self.layers])[:-1]
        return [part.reshape(layer.shape) for part, layer in zip(np.split(vector, sizes), self.layers)]

    def state_dict(self) -> dict:
        """torch.nn.Sequential's names and (out, in) layout, float64 tensors."""
        import torch

        state = {}
        for i, layer in enumerate(self.layers):
            state[f"{2 * i}.weight"] = torch.from_numpy(np.ascontiguousarray(layer[:-1].T))
            state[f"{2 * i}.bias"] = torch.from_numpy(layer[-1].copy())
        return state

    @classmethod
    def from_state_dict(cls, state: dict) -> MLP:
        return cls(
            [
                np.vstack([state[f"{2 * i}.weight"].double().numpy().T, state[f"{2 * i}.bias"].double().numpy()])
                for i in range(3)
            ]
        )


class Adam:
    """torch.optim.Adam's update (bias-corrected moments, eps outside the square root) on a flat parameter
    vector, in basic operations; the powers of beta by repeated multiplication (no libm pow)."""

    def __init__(self, size: int, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.lr, self.betas, self.eps = lr, betas, eps
        self.first, self.second = np.zeros(size), np.zeros(size)
        self.powers = (1.0, 1.0)

    def step(self, params: np.ndarray, grad: np.ndarray) -> np.ndarray:
        (b1, b2), (p1, p2) = self.betas, self.powers
        self.powers = p1, p2 = p1 * b1, p2 * b2
        self.first = b1 * self.first + (1.0 - b1) * grad
        self.second = b2 * self.second + (1.0 - b2) * (grad * grad)
        denom = np.sqrt(self.second) / np.sqrt(1.0 - p2) + self.eps
        return params - (self.lr / (1.0 - p1)) * (self.first / denom)
