"""An example task for the digits data set (TASK=wide_cnn, TASK_DIR=examples/digits_adam).

Another network than the built-in one: a single wide convolution with dropout and a three-layer
head, trained with torch.optim.Adam, and a macro-F1 score that reaches the server's history, live
metrics and per-site view because it is declared in METRICS. Set LEARNING_RATE=0.005 or so for
Adam (the built-in task's 0.05 is for SGD with momentum).
"""

import torch
from torch import nn

METRICS = {"f1": "ratio"}  # macro-F1 over the classes, reported by evaluate


def build_model(spec):
    channels, height, width = spec.shape
    return nn.Sequential(
        nn.Conv2d(channels, 48, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Flatten(),
        nn.Linear(48 * height * width, 96),
        nn.ReLU(),
        nn.Linear(96, 48),
        nn.ReLU(),
        nn.Linear(48, spec.num_classes),
    )


def train(model, data, config):
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    generator = torch.Generator().manual_seed(config.seed)
    total, seen = 0.0, 0
    for _ in range(config.epochs):
        for idx in torch.randperm(len(data.y), generator=generator).split(config.batch_size):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(data.x[idx]), data.y[idx])
            loss = loss + config.proximal_term(model)  # FedProx's term; zero unless STRATEGY=fedprox
            loss.backward()
            optimizer.step()
            total, seen = total + float(loss) * len(idx), seen + len(idx)
    return {"loss": total / seen}


def evaluate(model, data, config):
    with torch.no_grad():
        logits = model(data.x)
    predicted = logits.argmax(1)
    return {
        "loss": float(nn.functional.cross_entropy(logits, data.y)),
        "accuracy": float((predicted == data.y).float().mean()),
        "f1": macro_f1(predicted, data.y, logits.shape[1]),
    }


def macro_f1(predicted, truth, classes):
    scores = []
    for c in range(classes):
        tp = int(((predicted == c) & (truth == c)).sum())
        fp = int(((predicted == c) & (truth != c)).sum())
        fn = int(((predicted != c) & (truth == c)).sum())
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0
