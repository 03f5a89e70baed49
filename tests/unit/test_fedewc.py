"""FedEWC's server-side means, wire format and client adoption (federated/fedewc.py)."""

from __future__ import annotations

import torch

from atoll.continual.ewc import EWC
from atoll.core.spec import EwcSpec
from atoll.federated.fedewc import FederatedFisher, adopt, decode, ewc_of


def _p(v: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2, 2), v), "b": torch.full((2,), v)}


def test_server_mean_is_sample_weighted_and_anchored_at_the_task_end():
    f = FederatedFisher(online=False)
    f.add(0, _p(9.0), 10)  # before the server closed task 0: ignored
    f.close_task(0, {**_p(0.5), "bn.running_mean": torch.zeros(2)})
    f.add(0, _p(1.0), 30)
    f.add(0, _p(5.0), 10)
    (t, anchor, fisher), = f.pairs()
    assert t == 0
    torch.testing.assert_close(fisher["w"], torch.full((2, 2), 2.0))  # (30·1 + 10·5) / 40
    torch.testing.assert_close(anchor["b"], torch.full((2,), 0.5))
    f.close_task(1, _p(0.7))
    assert len(f.pairs()) == 1  # task 1 has no Fisher yet
    f.add(1, _p(3.0), 1)
    assert [t for t, _, _ in f.pairs()] == [0, 1]
    online = FederatedFisher(online=True)
    online.load_state_dict(f.state_dict())
    assert [t for t, _, _ in online.pairs()] == [1]  # the decayed running pair only


def test_wire_format_round_trips_and_carries_only_penalised_parameters():
    f = FederatedFisher(online=False)
    for t in (0, 1):
        f.close_task(t, {**_p(t + 0.5), "bn.running_mean": torch.zeros(2)})
        f.add(t, _p(t + 1.0), 1)
    back = decode(f.encode())
    assert [t for t, _, _ in back] == [0, 1]
    for (t, a, fi), (t2, a2, f2) in zip(f.pairs(), back, strict=True):
        assert t == t2 and set(a2) == set(fi) == {"w", "b"}  # no buffers travel
        for k in fi:
            torch.testing.assert_close(a2[k], a[k])
            torch.testing.assert_close(f2[k], fi[k])


def test_client_adopts_the_federation_and_keeps_its_own_until_averaged():
    ewc = EWC(EwcSpec(lam=1.0))
    ewc.anchors, ewc.fishers = [_p(0.0), _p(1.0)], [_p(0.0), _p(7.0)]  # own, task 1 new
    server = [(0, _p(0.5), _p(2.0))]
    adopt(ewc, server, closed=1)
    assert len(ewc.fishers) == 2
    torch.testing.assert_close(ewc.fishers[0]["w"], torch.full((2, 2), 2.0))  # federation
    torch.testing.assert_close(ewc.fishers[1]["w"], torch.full((2, 2), 7.0))  # own, for now
    adopt(ewc, [*server, (1, _p(1.5), _p(4.0))], closed=None)
    assert [f["w"][0, 0].item() for f in ewc.fishers] == [2.0, 4.0]
    online = EWC(EwcSpec(lam=1.0, mode="online"))
    online.anchors, online.fishers = [_p(1.0)], [_p(7.0)]
    adopt(online, server, closed=1)  # the server has no pair for task 1: keep the own one
    assert len(online.fishers) == 1 and online.fishers[0]["w"][0, 0].item() == 7.0
    assert ewc_of(ewc) is ewc
