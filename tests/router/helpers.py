"""Builders shared by the router tests."""

from __future__ import annotations

from kvmesh.membership import MembershipChange
from kvmesh.services.router.core import RouterCore
from kvmesh.services.router.settings import RouterSettings
from kvmesh.v1 import common_pb2


def member(member_id: str, model: str = "", running: int = 0, waiting: int = 0, port: int = 9000) -> common_pb2.Member:
    return common_pb2.Member(
        id=member_id,
        role=common_pb2.ROLE_ENGINE,
        address=f"127.0.0.1:{port}",
        model=model,
        load=common_pb2.Load(running_requests=running, waiting_requests=waiting),
    )


def joined(*members: common_pb2.Member, revision: int = 1) -> MembershipChange:
    return MembershipChange(revision=revision, joined=list(members))


def left(*members: common_pb2.Member, revision: int = 1) -> MembershipChange:
    return MembershipChange(revision=revision, left=list(members))


def settings(**kw: object) -> RouterSettings:
    kw.setdefault("random_seed", 7)
    return RouterSettings(**kw)  # type: ignore[arg-type]


class FakeClock:
    """A clock the test moves by hand (monotonic seconds)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def core(policy: str = "prefix", clock: FakeClock | None = None, **kw: object) -> RouterCore:
    return RouterCore(policy, settings(policy=policy, **kw), clock=clock or FakeClock())
