"""Baseline ClientApp: train/evaluate handlers on the Message API, nothing else."""

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from plainfl import task

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    net = task.model()
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = task.partition(int(context.node_config["partition-id"]),
                          int(context.node_config["num-partitions"]))
    cfg = context.run_config
    loss = task.train(net, x, y, int(cfg["local-epochs"]), float(cfg["lr"]),
                      int(cfg["batch-size"]))
    return Message(RecordDict({"arrays": ArrayRecord(net.state_dict()),
                               "metrics": MetricRecord({"train_loss": loss,
                                                        "num-examples": len(y)})}),
                   reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    net = task.model()
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = task.partition(int(context.node_config["partition-id"]),
                          int(context.node_config["num-partitions"]))
    loss, acc = task.test(net, x, y)
    return Message(RecordDict({"metrics": MetricRecord({"val_loss": loss, "val_accuracy": acc,
                                                        "num-examples": len(y)})}),
                   reply_to=msg)
