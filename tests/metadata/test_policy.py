"""Heartbeat intervals and load-update throttling adapt to how many members a replica serves."""

from __future__ import annotations

import time

from kvmesh.services.metadata.policy import HeartbeatPolicy, LoadThrottle, LoadUpdatePolicy
from kvmesh.v1 import common_pb2


def test_heartbeat_interval_is_a_third_of_the_ttl_then_stretches_up_to_half() -> None:
    policy = HeartbeatPolicy(max_per_second=1000)
    assert policy.interval_ms(9, members=1) == 3000
    assert policy.interval_ms(9, members=1000) == 3000  # 1,000 members at 3 s = 333/s: under budget
    assert policy.interval_ms(3, members=1000) == 1000  # exactly the budget
    assert policy.interval_ms(3, members=1400) == 1400  # stretched to stay at 1,000/s
    assert policy.interval_ms(3, members=100_000) == 1500  # never beyond ttl/2
    assert policy.interval_ms(1, members=1) >= 100


def test_load_updates_only_when_changed_and_at_most_once_per_interval() -> None:
    throttle = LoadThrottle(LoadUpdatePolicy(min_interval_s=0.2, max_per_second=1000),
                            written=common_pb2.Load(running_requests=1))
    same, other = common_pb2.Load(running_requests=1), common_pb2.Load(running_requests=2)
    assert not throttle.due(other, members=1)  # too soon after registration
    time.sleep(0.25)  # not a wait for a condition: the throttle's interval must really pass
    assert not throttle.due(same, members=1)  # unchanged: never written
    assert throttle.due(other, members=1)
    throttle.wrote(other)
    assert not throttle.due(common_pb2.Load(running_requests=3), members=1)  # coalesced until the interval
    time.sleep(0.25)  # the interval passes for real, as above
    assert throttle.due(common_pb2.Load(running_requests=3), members=1)


def test_load_update_interval_stretches_with_members() -> None:
    policy = LoadUpdatePolicy(min_interval_s=1.0, max_per_second=200)
    assert policy.interval_s(10) == 1.0
    assert policy.interval_s(1000) == 5.0  # 1,000 members → at most 200 UPDATE events/s in total
