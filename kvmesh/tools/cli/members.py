"""`kvmesh members`: the members of a mesh, as a table, or live with `--watch`.

On a terminal `--watch` redraws the table as members join, leave and report load; when
the output is a pipe it prints one line per change instead, so scripts can follow it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Iterable

import grpc
from rich.console import Console
from rich.live import Live
from rich.table import Table

from kvmesh.membership import MembershipChange, MembershipWatcher
from kvmesh.membership.listing import list_members
from kvmesh.runtime.channels import open_channel
from kvmesh.settings import DEFAULT_METADATA_ADDRESS, split_addresses
from kvmesh.tools.cli.credentials import add_credential_arguments, use_credentials
from kvmesh.units import format_size
from kvmesh.v1 import common_pb2, metadata_pb2, metadata_pb2_grpc

ROLES = {
    "all": common_pb2.ROLE_UNSPECIFIED,
    "engine": common_pb2.ROLE_ENGINE,
    "cachenode": common_pb2.ROLE_CACHENODE,
    "router": common_pb2.ROLE_ROUTER,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metadata",
        default=DEFAULT_METADATA_ADDRESS,
        help=f"metadata service HOST:PORT, comma-separated replicas [default {DEFAULT_METADATA_ADDRESS}]",
    )
    parser.add_argument("--role", choices=sorted(ROLES), default="all", help="only members of this role")
    parser.add_argument("--watch", action="store_true", help="keep following changes (Ctrl-C stops)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the metadata service")
    add_credential_arguments(parser)


def role_name(role: int) -> str:
    return next((name for name, value in ROLES.items() if value == role and name != "all"), str(role))


def describe_load(m: common_pb2.Member) -> str:
    load = m.load
    parts = [f"run {load.running_requests}", f"wait {load.waiting_requests}"]
    if load.kv_usage:
        parts.append(f"kv {load.kv_usage:.0%}")
    if load.capacity_bytes or load.used_bytes:
        parts.append(f"{format_size(load.used_bytes)}/{format_size(load.capacity_bytes)}")
    return " ".join(parts)


def members_table(members: Iterable[common_pb2.Member], title: str = "") -> Table:
    table = Table(title=title or None, title_justify="left")
    for column in ("ID", "ROLE", "ADDRESS", "MODEL", "ZONE", "CAPACITY", "LOAD"):
        table.add_column(column, no_wrap=True)
    table.add_column("LABELS", overflow="fold")
    for m in sorted(members, key=lambda m: (m.role, m.id)):
        table.add_row(
            m.id, role_name(m.role), m.address, m.model or "-", m.zone or "-",
            format_size(m.capacity_bytes) if m.capacity_bytes else "-", describe_load(m),
            ",".join(f"{k}={v}" for k, v in sorted(m.labels.items())) or "-",
        )
    return table


def change_lines(change: MembershipChange) -> list[str]:
    lines = [f"JOIN {role_name(m.role)} {m.id} {m.address}" for m in change.joined]
    lines += [f"LEAVE {role_name(m.role)} {m.id} {m.address}" for m in change.left]
    lines += [f"UPDATE {role_name(m.role)} {m.id} {m.address} {describe_load(m)}" for m in change.updated]
    return lines


async def list_once(addresses: list[str], role: int, timeout: float) -> metadata_pb2.ListResponse:
    last: grpc.aio.AioRpcError | None = None
    for address in addresses:
        async with open_channel(address) as channel:
            try:
                members, revision = await list_members(metadata_pb2_grpc.MembershipStub(channel), role, timeout)
                return metadata_pb2.ListResponse(members=members, revision=revision)
            except grpc.aio.AioRpcError as exc:
                last = exc
    assert last is not None
    raise last


async def watch(addresses: list[str], role: int, console: Console, listed: metadata_pb2.ListResponse) -> None:
    """Follows the membership from the listed revision (no gap, no repeat) until cancelled."""
    live: Live | None = None

    def on_change(change: MembershipChange) -> None:
        if live is not None:
            live.update(members_table(watcher.members.values(), f"revision {watcher.revision}"), refresh=True)
        else:
            for line in change_lines(change):
                print(line, flush=True)

    watcher = MembershipWatcher(addresses, role, on_change=on_change)
    watcher.members = {m.id: m for m in listed.members}
    watcher.revision = listed.revision
    with contextlib.ExitStack() as stack:
        if console.is_terminal:
            table = members_table(listed.members, f"revision {listed.revision}")
            live = stack.enter_context(Live(table, console=console, auto_refresh=False))
        await watcher.start()
        try:
            await asyncio.Event().wait()
        finally:
            await watcher.close()


def run(args: argparse.Namespace) -> int:
    try:
        addresses = split_addresses(args.metadata)
    except ValueError as exc:
        print(f"kvmesh members: invalid --metadata: {exc}", file=sys.stderr)
        return 2
    if not use_credentials(args, "members"):
        return 2
    role = ROLES[args.role]
    console = Console()
    try:
        listed = asyncio.run(list_once(addresses, role, args.timeout))
    except grpc.aio.AioRpcError as exc:
        print(f"kvmesh members: metadata service at {args.metadata} answered {exc.code().name}: {exc.details()}",
              file=sys.stderr)
        return 1
    if not (args.watch and console.is_terminal):  # the live view draws its own table
        console.print(members_table(listed.members, f"{len(listed.members)} members at revision {listed.revision}"))
    if not args.watch:
        return 0
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(watch(addresses, role, console, listed))
    return 0
