"""`kvmesh route --router ADDR (--text T | --tokens 1,2,3 | --blocks 1,2,3) [--model M]`.

Prints where the router would send the prompt. The request is released right after (it is
a question, not a real request) unless `--keep` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

import grpc

from kvmesh.runtime.channels import open_channel
from kvmesh.tools.cli.credentials import add_credential_arguments, use_credentials
from kvmesh.v1 import router_pb2, router_pb2_grpc

DEFAULT_ROUTER_ADDRESS = "127.0.0.1:7600"  # `kvmesh router`'s default --listen


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--router",
        default=os.environ.get("KVMESH_ROUTER", DEFAULT_ROUTER_ADDRESS),
        help=f"router HOST:PORT [env KVMESH_ROUTER; default {DEFAULT_ROUTER_ADDRESS}]",
    )
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--text", help="prompt text (hashed in blocks of the router's --text-block-bytes)")
    prompt.add_argument("--tokens", type=_ints, help="token ids, comma-separated")
    prompt.add_argument("--blocks", type=_ints, help="precomputed block ids, comma-separated")
    prompt.add_argument("--empty", action="store_true", help="no prompt (routed by load)")
    parser.add_argument("--model", default="", help="model name (routes among pods serving it)")
    parser.add_argument("--request-id", default="", help="request id (default: the router makes one)")
    parser.add_argument("--keep", action="store_true", help="do not release the request afterwards")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the router [default 5]")
    add_credential_arguments(parser)


def build_request(args: argparse.Namespace) -> router_pb2.RouteRequest:
    req = router_pb2.RouteRequest(request_id=args.request_id, model=args.model)
    if args.text is not None:
        req.text = args.text
    elif args.tokens is not None:
        req.tokens.ids.extend(args.tokens)
    elif args.blocks is not None:
        req.blocks.ids.extend(args.blocks)
    return req


async def _route(args: argparse.Namespace) -> int:
    channel = open_channel(args.router)
    try:
        stub = router_pb2_grpc.RouterStub(channel)
        try:
            resp = await stub.Route(build_request(args), timeout=args.timeout)
            if not args.keep:
                await stub.Release(router_pb2.ReleaseRequest(request_id=resp.request_id), timeout=args.timeout)
        except grpc.aio.AioRpcError as exc:
            print(f"kvmesh route: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    finally:
        await channel.close()
    if args.json:
        fields = ("request_id", "member_id", "address", "matched_blocks", "total_blocks", "policy")
        print(json.dumps({f: getattr(resp, f) for f in fields}))
    else:
        print(
            f"member={resp.member_id} address={resp.address} matched={resp.matched_blocks}/{resp.total_blocks} "
            f"policy={resp.policy} request_id={resp.request_id}"
        )
    return 0


def run(args: argparse.Namespace) -> int:
    if not use_credentials(args, "route"):
        return 2
    return asyncio.run(_route(args))
