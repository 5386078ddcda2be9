"""distributed.py in one process (several processes: end_to_end/test_several_processes.py):
shards, the torchrun environment, and the helpers that are pass-throughs without a group."""

import pytest
import torch

from convnext_cifar import distributed
from convnext_cifar.distributed import Dist
from convnext_cifar.errors import UserError


def test_shards_cover_every_item_once_and_differ_by_at_most_one():
    for world in (1, 2, 3, 7):
        shards = [Dist(rank, world).shard(10) for rank in range(world)]
        assert shards[0][0] == 0 and shards[-1][1] == 10
        assert all(a[1] == b[0] for a, b in zip(shards, shards[1:]))
        sizes = [hi - lo for lo, hi in shards]
        assert max(sizes) - min(sizes) <= 1


def test_the_torchrun_environment_names_the_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    alone = distributed.from_env()
    assert alone == Dist() and not alone.enabled and alone.is_main
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    d = distributed.from_env()
    assert (d.rank, d.world, d.local_rank, d.enabled, d.is_main) == (3, 4, 1, True, False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")  # one process under torchrun: a group too
    assert distributed.from_env().enabled


def test_one_process_runs_the_work_itself_and_raises_its_error():
    d = Dist()
    assert distributed.from_main(d, lambda: 5) == 5 and distributed.together(d, lambda: 6) == 6
    seen = []
    distributed.main_first(d, lambda: seen.append(1))
    assert seen == []  # nothing to order without other processes: the caller runs it

    def fails():
        raise UserError("no data")

    with pytest.raises(UserError, match="no data"):
        distributed.from_main(d, fails)
    t = torch.tensor([1.0, 2.0])
    assert d.all_reduce_sum(t) is t and d.any(True, torch.device("cpu"))
    assert d.all_reduce_max(t) is t and t.tolist() == [1.0, 2.0]
