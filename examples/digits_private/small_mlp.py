"""A small network for record-level differential privacy (DP=record) on 8 x 8 digits.

DP-SGD adds Gaussian noise of the same scale to every parameter at every step, so the noise in
an update grows with the square root of the parameter count while the signal does not: with a
few hundred records a site, the built-in CNN (53,002 parameters) drowns in it at epsilon 8, and
this network (2,410) does not (docs/privacy.md, measured by `flowerpot bench --only privacy`).
Tanh rather than ReLU: clipped, noisy gradients keep a bounded activation's scale (Papernot et
al. 2021, "Tempered sigmoid activations for deep learning with differential privacy").

It has no `train`, so Flowerpot's own loop trains it, which is what DP=record requires.

    TASK=small_mlp TASK_DIR=examples/digits_private DP=record flowerpot run-local
"""

from torch import nn

HIDDEN = 32


def build_model(spec):
    c, h, w = spec.shape
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, spec.num_classes))
