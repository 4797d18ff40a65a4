"""Logistic regression, full-batch gradient descent, softmax cross-entropy, float32.

The same math as fedbus's numpy trainer with batch_size >= the number of
samples (and as the C client's fb_train): per step, with z = x @ w + b,
delta = (softmax(z) - onehot(y)) / n, grad_w = x^T @ delta,
grad_b = sum(delta), FedProx's g += mu * (p - p_global), then p -= lr * g.
Weights, gradients and data live in ``array('f')``; ``w`` is row-major
[features, classes] like the wire's ``dense0.w``.
"""

import math
from array import array


def _row_logits(w, b, x, off, nin, nout, z):
    for k in range(nout):
        z[k] = b[k]
    for j in range(nin):
        xj = x[off + j]
        if xj != 0.0:
            base = j * nout
            for k in range(nout):
                z[k] += xj * w[base + k]


def fit(w, b, x, y, nin, nout, epochs, lr, mu=0.0, anchor_w=None, anchor_b=None):
    """Train ``w`` and ``b`` in place; returns the mean loss before the last step."""
    n = len(y)
    if n == 0:
        raise ValueError("no training data")
    for label in y:
        if label >= nout:
            raise ValueError("label out of range")
    gw = array("f", bytes(4 * nin * nout))
    gb = array("f", bytes(4 * nout))
    z = array("f", bytes(4 * nout))
    inv_n = 1.0 / n
    loss = 0.0
    for _ in range(epochs):
        for i in range(nin * nout):
            gw[i] = 0.0
        for k in range(nout):
            gb[k] = 0.0
        loss_sum = 0.0
        for i in range(n):
            off = i * nin
            _row_logits(w, b, x, off, nin, nout, z)
            mx = max(z)
            yi = y[i]
            zy = z[yi] - mx
            total = 0.0
            for k in range(nout):
                z[k] = math.exp(z[k] - mx)
                total += z[k]
            loss_sum += math.log(total) - zy
            for k in range(nout):
                d = (z[k] / total - (1.0 if k == yi else 0.0)) * inv_n
                z[k] = d
                gb[k] += d
            for j in range(nin):
                xj = x[off + j]
                if xj != 0.0:
                    base = j * nout
                    for k in range(nout):
                        gw[base + k] += xj * z[k]
        loss = loss_sum / n
        for i in range(nin * nout):
            g = gw[i]
            if mu > 0.0 and anchor_w is not None:
                g += mu * (w[i] - anchor_w[i])
            w[i] -= lr * g
        for k in range(nout):
            g = gb[k]
            if mu > 0.0 and anchor_b is not None:
                g += mu * (b[k] - anchor_b[k])
            b[k] -= lr * g
    return loss


def evaluate(w, b, x, y, nin, nout):
    """Mean cross-entropy and accuracy on (x, y)."""
    n = len(y)
    if n == 0:
        return 0.0, 0.0
    z = array("f", bytes(4 * nout))
    loss_sum = 0.0
    correct = 0
    for i in range(n):
        _row_logits(w, b, x, i * nin, nin, nout, z)
        mx = max(z)
        total = 0.0
        best = 0
        for k in range(nout):
            total += math.exp(z[k] - mx)
            if z[k] > z[best]:
                best = k
        loss_sum += math.log(total) - (z[y[i]] - mx)
        if best == y[i]:
            correct += 1
    return loss_sum / n, correct / n
