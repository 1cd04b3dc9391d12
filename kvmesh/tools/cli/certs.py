"""`kvmesh certs`: a development CA and member certificates (compose, `kvmesh up --secure`, trials).

    kvmesh certs init --dir certs                 # certs/ca.pem, certs/ca-key.pem
    kvmesh certs issue --dir certs cachenode-0 --host cachenode-0 --host 127.0.0.1
    kvmesh certs token                            # a bearer token and the digest for the policy

Not a production PKI: use cert-manager (Kubernetes) or your own CA there.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="certs_command", metavar="ACTION", required=True)
    init = sub.add_parser("init", help="make a CA (ca.pem, ca-key.pem) in --dir")
    init.add_argument("--dir", type=Path, required=True, help="where the CA's files go")
    init.add_argument("--name", default="kvmesh development CA", help="the CA's common name")
    init.add_argument("--days", type=int, default=365, help="validity in days")
    init.add_argument("--force", action="store_true", help="replace a CA already in --dir")
    issue = sub.add_parser("issue", help="issue a certificate for NAME (its identity) from the CA in --dir")
    issue.add_argument("name", help="identity: the certificate's common name (e.g. cachenode-0)")
    issue.add_argument("--dir", type=Path, required=True, help="where the CA is")
    issue.add_argument("--out", type=Path, default=None, help="where NAME.pem and NAME-key.pem go (default --dir)")
    issue.add_argument("--host", action="append", default=[],
                       help="DNS name or IP the member is reached at (repeatable; default 127.0.0.1 and localhost)")
    issue.add_argument("--days", type=float, default=30, help="validity in days")
    issue.add_argument("--no-common-name", action="store_true",
                       help="leave the subject CN out (a client certificate for etcd's gateway with auth on)")
    sub.add_parser("token", help="print a new bearer token and its sha256 digest (for tokens_sha256)")


def run(args: argparse.Namespace) -> int:
    from kvmesh.tools.certs import CA, CA_CERT, DEFAULT_HOSTS, issue, make_ca, new_token

    if args.certs_command == "init":
        if (args.dir / CA_CERT).exists() and not args.force:
            print(f"kvmesh certs: a CA exists in {args.dir} (--force replaces it)")
            return 0
        ca = make_ca(args.dir, args.name, args.days)
        print(f"CA written: {ca.cert_path}")
        return 0
    if args.certs_command == "issue":
        ca = CA.load(args.dir)
        issued = issue(ca, args.name, args.out or args.dir, hosts=args.host or DEFAULT_HOSTS, days=args.days,
                       common_name=not args.no_common_name)
        print(f"certificate written: {issued.cert} (key {issued.key}, serial {issued.serial:x})")
        return 0
    token, digest = new_token()
    print(f"token:  {token}\nsha256: {digest}")
    return 0
