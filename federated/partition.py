"""Split the training set among clients with flwr-datasets partitioners, in memory.

The partitioners work on a `datasets.Dataset` holding only the sample index and label, so
no tensor is copied and no hub download happens; every process that computes the
partition (server for the heatmap, each client for its share) gets the same answer
because it depends only on the labels, the spec and the seed.
"""

from __future__ import annotations

import numpy as np

from atoll.core.data import DataBundle, Split
from atoll.core.spec import PartitionSpec


def quantity_sizes(n: int, spec: PartitionSpec, num_clients: int, seed: int) -> list[int]:
    """Dirichlet(alpha) shares of `n` samples, every client at least min_partition_size."""
    floor = min(spec.min_partition_size, n // num_clients)
    shares = np.random.default_rng([seed, 11]).dirichlet([spec.alpha] * num_clients)
    sizes = floor + np.floor(shares * (n - floor * num_clients)).astype(np.int64)
    sizes[np.argmax(shares)] += n - int(sizes.sum())  # the rounding remainder
    return [int(v) for v in sizes]


def partitioner(spec: PartitionSpec, num_clients: int, seed: int, n: int = 0):
    from atoll.federated.partitioners import partitioner_module

    fp = partitioner_module()
    if spec.method == "iid":
        return fp.IidPartitioner(num_partitions=num_clients)
    if spec.method == "quantity":  # label-free: regression targets as well as classes
        return fp.SizePartitioner(quantity_sizes(n, spec, num_clients, seed))
    if spec.method == "dirichlet":
        return fp.DirichletPartitioner(num_partitions=num_clients, partition_by="label",
                                       alpha=spec.alpha,
                                       min_partition_size=spec.min_partition_size,
                                       self_balancing=False, seed=seed)
    if spec.method == "shard":
        return fp.ShardPartitioner(num_partitions=num_clients, partition_by="label",
                                   num_shards_per_partition=spec.shards_per_client, seed=seed)
    return fp.PathologicalPartitioner(num_partitions=num_clients, partition_by="label",
                                      num_classes_per_partition=spec.classes_per_client,
                                      class_assignment_mode="first-deterministic", seed=seed)


def partition_indices(labels: np.ndarray, spec: PartitionSpec, num_clients: int,
                      seed: int) -> list[np.ndarray]:
    """Indices into `labels` for every client (sorted; disjoint)."""
    import datasets

    datasets.disable_progress_bars()
    # IidPartitioner takes contiguous chunks (FederatedDataset shuffles first); shuffle
    # here too, so a dataset stored sorted by class still splits IID.
    order = np.random.default_rng([seed, 7]).permutation(len(labels))
    labels = np.asarray(labels)
    if labels.dtype.kind == "f":  # regression: only label-free methods (spec-checked)
        labels = np.zeros(len(labels), dtype=np.int64)
    labels = labels.astype(np.int64)
    ds = datasets.Dataset.from_dict({"idx": order, "label": labels[order]})
    p = partitioner(spec, num_clients, seed, len(labels))
    p.dataset = ds
    try:
        parts = [np.sort(np.asarray(p.load_partition(i)["idx"], dtype=np.int64))
                 for i in range(num_clients)]
    except ValueError as e:  # e.g. Dirichlet cannot meet min_partition_size
        raise ValueError(f"federated.partition: {spec.method} cannot split "
                         f"{len(labels)} samples among {num_clients} clients ({e}); allowed: "
                         "fewer clients, a larger alpha or a smaller min_partition_size") from e
    return parts


def client_split(data: DataBundle, idx: np.ndarray, val_fraction: float, seed: int,
                 client: int) -> tuple[Split, Split]:
    """One client's (train, validation) from its partition, seeded per client."""
    rng = np.random.default_rng([seed, client])
    perm = rng.permutation(idx)
    n_val = int(round(val_fraction * len(perm))) if len(perm) > 1 else 0
    val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    t = data.train
    return Split(t.x[train_idx], t.y[train_idx]), Split(t.x[val_idx], t.y[val_idx])


def label_histogram(labels: np.ndarray, parts: list[np.ndarray], num_classes: int
                    ) -> np.ndarray:
    """clients × classes counts, for the partition heatmap."""
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])
