"""``kvgate receipts``: check a billing receipt offline, or fetch one.

``verify FILE|-`` reads a receipt as ``GET /v1/receipts/{id}`` answers it and checks its
signature against ``--key`` (a PEM public key, or the JSON the key endpoint answers) or the
key published at ``--url``: exit 0 and ``valid`` when it holds, 1 and one line saying why
not. ``get ID --url`` prints the tenant's receipt (the key from ``--key-env``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .receipts import load_public_key, parse, verify

_KEY_PATH = "/.well-known/kvgate-receipt-key"
_TIMEOUT_S = 30.0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("receipts", help="verify or fetch billing receipts",
                              description="Verify a signed billing receipt offline, or "
                              "fetch one of your tenant's receipts.")
    sub = p.add_subparsers(dest="receipts_command", metavar="COMMAND")
    sub.required = True
    v = sub.add_parser("verify", help="check a receipt's signature (exit 0 valid, 1 not)")
    v.add_argument("file", metavar="FILE", help="the receipt's JSON, or - for stdin")
    source = v.add_mutually_exclusive_group(required=True)
    source.add_argument("--key", metavar="PEM_FILE",
                        help="the gateway's public key (PEM, or the key endpoint's JSON)")
    source.add_argument("--url", help="the gateway; its key is read from " + _KEY_PATH)
    v.set_defaults(func=_verify)
    g = sub.add_parser("get", help="print one of your tenant's receipts")
    g.add_argument("id", metavar="ID")
    g.add_argument("--url", required=True, help="the gateway, e.g. http://127.0.0.1:8000")
    g.add_argument("--key-env", default="KVGATE_API_KEY", metavar="NAME",
                   help="the environment variable holding your API key (KVGATE_API_KEY)")
    g.set_defaults(func=_get)


def _fetch(url: str, api_key: str | None = None) -> bytes:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                timeout=_TIMEOUT_S) as resp:
        data: bytes = resp.read()
        return data


def _verify(args: argparse.Namespace) -> int:
    try:
        text = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
        receipt = parse(text)
    except (OSError, ValueError) as exc:
        print(f"invalid: cannot read the receipt: {exc}", file=sys.stderr)
        return 1
    try:
        key_text = (Path(args.key).read_bytes() if args.key
                    else _fetch(args.url.rstrip("/") + _KEY_PATH))
        public = load_public_key(key_text)
    except (OSError, ValueError, urllib.error.URLError) as exc:
        print(f"kvgate receipts verify: cannot read the public key: {exc}", file=sys.stderr)
        return 2
    reason = verify(receipt, public)
    if reason is not None:
        print(f"invalid: {reason}", file=sys.stderr)
        return 1
    print(f"valid: receipt {receipt.get('id')} of request {receipt.get('request_id')}, "
          f"{receipt.get('cost_micros')} micro-{receipt.get('currency')}")
    return 0


def _get(args: argparse.Namespace) -> int:
    key = os.environ.get(args.key_env)
    if not key:
        print(f"kvgate receipts get: set {args.key_env} to your API key", file=sys.stderr)
        return 2
    try:
        data = _fetch(f"{args.url.rstrip('/')}/v1/receipts/{args.id}", key)
    except urllib.error.HTTPError as exc:
        print(f"kvgate receipts get: HTTP {exc.code}: {exc.read().decode(errors='replace')}",
              file=sys.stderr)
        return 1
    except (OSError, urllib.error.URLError) as exc:
        print(f"kvgate receipts get: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(json.loads(data), indent=2, sort_keys=True))
    return 0
