"""Clients of the metadata service's Membership API: staying registered, and following a role."""

from kvmesh.membership.session import MemberSession
from kvmesh.membership.watcher import MembershipChange, MembershipWatcher

__all__ = ["MemberSession", "MembershipChange", "MembershipWatcher"]
