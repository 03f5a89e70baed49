"""Baseline ServerApp: FedAvg.start with centralized evaluation; writes round times."""

import json
import resource
import time

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from plainfl import task

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    net = task.model()
    _, _, x_test, y_test = task.digits()
    stamps: list[float] = []
    accuracy: list[float] = []

    def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        net.load_state_dict(arrays.to_torch_state_dict())
        loss, acc = task.test(net, x_test, y_test)
        stamps.append(time.perf_counter())
        accuracy.append(acc)
        return MetricRecord({"loss": loss, "accuracy": acc})

    n = len(list(grid.get_node_ids()))
    FedAvg(min_train_nodes=n, min_evaluate_nodes=n, min_available_nodes=n).start(
        grid=grid, initial_arrays=ArrayRecord(net.state_dict()),
        num_rounds=int(cfg["num-server-rounds"]), train_config=ConfigRecord(),
        evaluate_fn=central)
    if cfg["result-file"]:
        with open(str(cfg["result-file"]), "w") as f:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            json.dump({"round_seconds": [b - a for a, b in zip(stamps, stamps[1:], strict=False)],
                       "accuracy": accuracy[-1], "peak_rss_mb": rss}, f)
