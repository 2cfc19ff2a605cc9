"""Which CUDA device each backfill worker gets (no GPU needed: the count is given)."""
import pytest

from embeddings.devices import assign_devices, cuda_device_count, parse_devices


def test_workers_go_round_robin_over_every_visible_device():
    assert assign_devices(4, 2) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert assign_devices(3, 8) == ["cuda:0", "cuda:1", "cuda:2"]


def test_chosen_devices_are_used_in_their_order():
    assert assign_devices(3, 4, chosen=(3, 1)) == ["cuda:3", "cuda:1", "cuda:3"]


def test_without_cuda_each_worker_keeps_the_configured_device():
    assert assign_devices(2, 0) == [None, None]


def test_a_chosen_device_that_is_not_visible_is_named():
    with pytest.raises(ValueError, match=r"CUDA device\(s\) 2 not visible \(visible: 0 to 1\)"):
        assign_devices(2, 2, chosen=(0, 2))


def test_devices_are_distinct_non_negative_indices():
    assert parse_devices("0, 2") == (0, 2)
    for raw in ("", "-1", "0,0", "a"):
        with pytest.raises(ValueError):
            parse_devices(raw)


def test_a_cpu_setting_counts_no_cuda_device():
    assert cuda_device_count("cpu") == 0
