"""What both sides know of the built-in data sets without loading them (the server has no torch
and no data): the client's loaders (client/data/datasets.py) give exactly these many examples, a
test keeps them equal for digits (the others need a download)."""

# Examples of each built-in data set, train and test together: the most one client can truthfully
# claim (server/training/update_checks.py).
SIZES = {"digits": 1_797, "mnist": 70_000, "fashion-mnist": 70_000, "cifar10": 60_000}
