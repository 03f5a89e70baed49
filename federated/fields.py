"""How federated mode treats every spec field that local mode trains with.

A field that local mode reads is either honoured by the clients or the server, replaced
by a federated field (named here), or refused at validation (core/spec.py,
`ExperimentSpec._check_federated`). Nothing is silently ignored;
tests/unit/test_fl_client.py walks the spec and fails on a field missing from this table.
"""

from __future__ import annotations

HONOURED = "honoured"
REFUSED = "refused"

FIELDS: dict[str, str] = {
    # data: every client and the server load the same dataset and normalisation
    "data.name": HONOURED, "data.data_dir": HONOURED, "data.cache_dir": HONOURED,
    "data.download": HONOURED, "data.mirror": HONOURED, "data.test_fraction": HONOURED,
    "data.normalize": HONOURED, "data.limit": HONOURED, "data.eval_batch_size": HONOURED,
    "data.augment.shift": HONOURED, "data.augment.noise_std": HONOURED,
    "data.synthetic.": HONOURED, "data.format": HONOURED, "data.path": HONOURED,
    "data.label": HONOURED, "data.features": HONOURED, "data.categorical": HONOURED,
    "data.categorical_encoding": HONOURED, "data.embedding_dim": HONOURED,
    "data.image_size": HONOURED, "data.channels": HONOURED, "data.target": HONOURED,
    "data.kwargs.": HONOURED,
    "data.streaming": "auto and false: clients read their partition whole; true is refused",
    "data.workers": "unused: clients read their partition whole",
    "data.val_fraction": "replaced by federated.partition.val_fraction (client-side "
                         "validation; the server evaluates on the test split)",
    "data.batch_size": "the client batch unless federated.batch_size is set",
    "model.": HONOURED, "project_dir": HONOURED,
    "optim.name": HONOURED, "optim.lr": "the client lr of round 1 (× federated.lr_decay "
                                       "per round)",
    "optim.weight_decay": HONOURED, "optim.momentum": HONOURED, "optim.nesterov": HONOURED,
    "optim.betas": HONOURED, "optim.grad_clip": HONOURED,
    "optim.scheduler.name": REFUSED,  # anything but none
    "optim.scheduler.": "unused while optim.scheduler.name is none (the only allowed value)",
    "train.epochs": "replaced by federated.local_epochs × federated.rounds",
    "train.device": HONOURED, "train.precision": HONOURED, "train.grad_accum_steps": HONOURED,
    "train.loss.": HONOURED,  # class_weights: balanced from the global training histogram
    "train.early_stopping.patience": REFUSED,  # anything but 0
    "train.early_stopping.": "unused while patience is 0 (the only allowed value)",
    "train.log_every_n_steps": "clients log no steps; the server logs every round",
    "train.checkpoint_dir": HONOURED, "train.keep_checkpoints": HONOURED,
    "train.checkpoint_every": "replaced by federated.checkpoint_every (rounds)",
    "train.resume": HONOURED, "train.progress": HONOURED,
    "train.compile": REFUSED,  # anything but false
    "train.threads": "server threads; clients use federated.client_cpus",
}


def treatment(key: str) -> str | None:
    """How `key` (a dotted spec field) is treated; the most specific entry wins."""
    if key in FIELDS:
        return FIELDS[key]
    prefixes = [k for k in FIELDS if k.endswith(".") and key.startswith(k)]
    return FIELDS[max(prefixes, key=len)] if prefixes else None
