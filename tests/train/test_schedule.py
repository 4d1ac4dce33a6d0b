import math

import pytest

from peftcli.recipe import TrainSection
from peftcli.train import schedule
from peftcli.train.schedule import global_batch_indices, learning_rate


def test_each_epoch_sees_every_example_once_and_the_last_batch_wraps():
    n, batch = 10, 4  # 3 steps per epoch: 4 + 4 + (2 + 2 wrapped)
    epoch0 = [global_batch_indices(n, batch, step, seed=7) for step in range(3)]
    seen = [i for indices in epoch0 for i in indices]
    assert sorted(set(seen)) == list(range(n)) and all(len(b) == batch for b in epoch0)
    assert epoch0[2][2:] == epoch0[0][:2]  # the wrap repeats the start of the same permutation
    epoch1 = global_batch_indices(n, batch, 3, seed=7)
    assert epoch1 != epoch0[0]  # a new permutation per epoch
    step4 = global_batch_indices(n, batch, 4, seed=7)
    schedule._epoch_order.cache_clear()  # a resumed process computes the order afresh
    assert global_batch_indices(n, batch, 4, seed=7) == step4


@pytest.mark.parametrize("scheduler", ["constant", "linear", "cosine"])
def test_learning_rate_warms_up_then_decays(scheduler):
    train = TrainSection(learning_rate=1.0, warmup_steps=4, scheduler=scheduler)
    warm = [learning_rate(train, step, total_steps=20) for step in range(4)]
    assert warm == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert learning_rate(train, 4, 20) == pytest.approx(1.0)
    middle = learning_rate(train, 12, 20)  # halfway through the decay
    expected = {"constant": 1.0, "linear": 0.5, "cosine": 0.5 * (1 + math.cos(math.pi / 2))}[scheduler]
    assert middle == pytest.approx(expected)
    if scheduler != "constant":
        assert learning_rate(train, 20, 20) == pytest.approx(0.0, abs=1e-12)
