"""`Membership.List` read whole: follows `next_page_token` until the last page."""

from __future__ import annotations

from kvmesh.v1 import common_pb2, metadata_pb2, metadata_pb2_grpc

MAX_PAGES = 100_000  # a server that never ends its listing cannot loop us forever


async def list_members(
    stub: metadata_pb2_grpc.MembershipStub, role: int = common_pb2.ROLE_UNSPECIFIED, timeout: float | None = None
) -> tuple[list[common_pb2.Member], int]:
    """Every member of `role` (all pages) and the revision of the last page read."""
    members: list[common_pb2.Member] = []
    token = ""
    for _ in range(MAX_PAGES):
        reply = await stub.List(metadata_pb2.ListRequest(role=role, page_token=token), timeout=timeout)  # type: ignore[arg-type]
        members.extend(reply.members)
        token = reply.next_page_token
        if not token:
            return members, reply.revision
    raise RuntimeError(f"Membership.List did not end after {MAX_PAGES} pages")
