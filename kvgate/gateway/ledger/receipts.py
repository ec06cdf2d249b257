"""Billing receipts: what one request was billed and why, signed (Ed25519) so a tenant can
check it offline.

The committer builds a receipt from the event and the plan it bills the usage row with, in
the same transaction. The signature covers every other field, serialised by ``canonical``
(keys sorted, no spaces, UTF-8, integers and strings only); ``kvgate receipts verify``
checks it against the key at ``/.well-known/kvgate-receipt-key``. The key:
``--receipt-key-file``, else one generated into the data directory on the first start
(mode 0600), else, where that directory cannot be written, one that lives as long as the
process. Each receipt names its ``key_id``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from .billing import Billed, PlanPrices, UsageEvent

RECEIPT_VERSION = 1
ALGORITHM = "Ed25519"
KEY_FILE_NAME = "receipt-key.pem"
_ID_PREFIX = "rcpt_"


class ReceiptKeyError(Exception):
    """The receipt signing key cannot be read or made (one line, for the operator)."""


class ReceiptKeyUnwritable(ReceiptKeyError):
    """No key file exists and none can be made where it should be."""


def new_receipt_id() -> str:
    """128 random bits: a receipt id says nothing about the request or its tenant."""
    return _ID_PREFIX + secrets.token_hex(16)


def canonical(payload: dict[str, Any]) -> bytes:
    """The bytes a signature covers: sorted keys, no whitespace, UTF-8."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def key_id_of(public: Ed25519PublicKey) -> str:
    """First 16 hex digits of the SHA-256 of the raw public key."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    """Strict: only the one encoding ``_b64url`` writes of these bytes is accepted (no
    standard-alphabet characters, padding, whitespace or non-zero spare bits), so a
    signature has exactly one spelling."""
    if not isinstance(text, str) or not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not unpadded base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64url(data) != text:
        raise ValueError("not the canonical base64url of its bytes")
    return data


class ReceiptKey:
    """The private key receipts are signed with, and what is published of it."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self.private = private
        self.public = private.public_key()
        self.key_id = key_id_of(self.public)

    @classmethod
    def generate(cls) -> ReceiptKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | Path) -> ReceiptKey:
        """From a PEM file (PKCS#8, unencrypted); ``ReceiptKeyError`` saying why not."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ReceiptKeyError(f"cannot read the receipt key file {path}: "
                                  f"{exc.strerror or exc}") from None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise ReceiptKeyError(f"the receipt key file {path} is not a PEM private key "
                                  f"without a passphrase: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ReceiptKeyError(f"the receipt key file {path} holds a "
                                  f"{type(key).__name__.removeprefix('_')}, not an Ed25519 "
                                  "private key")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: str | Path) -> ReceiptKey:
        """The key at ``path``, made there (mode 0600) when the file does not exist."""
        path = Path(path)
        if path.exists():
            return cls.load(path)
        key = cls.generate()
        pem = key.private.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, pem)
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)  # never replaces a key another process made meanwhile
            finally:
                tmp.unlink()
        except FileExistsError:
            return cls.load(path)
        except OSError as exc:
            raise ReceiptKeyUnwritable(f"cannot create the receipt key file {path}: "
                                  f"{exc.strerror or exc}") from None
        return key

    def public_pem(self) -> str:
        return self.public.public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo
                                        ).decode("ascii")

    def jwk(self) -> dict[str, str]:
        raw = self.public.public_bytes(serialization.Encoding.Raw,
                                       serialization.PublicFormat.Raw)
        return {"kty": "OKP", "crv": "Ed25519", "x": _b64url(raw), "kid": self.key_id,
                "alg": "EdDSA", "use": "sig"}

    def published(self) -> dict[str, Any]:
        """What ``/.well-known/kvgate-receipt-key`` answers."""
        return {"key_id": self.key_id, "algorithm": ALGORITHM,
                "public_key_pem": self.public_pem(), "jwk": self.jwk()}

    def sign(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The receipt: ``payload`` with this key's id, and the signature over both."""
        body = {**payload, "key_id": self.key_id, "signature_alg": ALGORITHM}
        return {**body, "signature": _b64url(self.private.sign(canonical(body)))}


def payload(event: UsageEvent, billed: Billed, plan: PlanPrices) -> dict[str, Any]:
    """What a receipt states, from the event and the plan the usage row is billed with."""
    u = event.usage
    assert event.receipt_id is not None
    return {
        "object": "receipt", "version": RECEIPT_VERSION, "id": event.receipt_id,
        "request_id": event.request_id, "tenant_id": event.tenant_id, "model": event.model,
        "endpoint": event.endpoint, "status": event.status,
        "started_at": _time(event.started_at), "finished_at": _time(event.finished_at),
        "tokens": {"prompt": u.prompt_tokens, "cached": u.cached_tokens,
                   "cache_write_5m": u.cache_write_5m_tokens,
                   "cache_write_1h": u.cache_write_1h_tokens,
                   "cache_write_24h": u.cache_write_24h_tokens,
                   "uncached": u.uncached_tokens, "completion": u.completion_tokens},
        "prompt_cache_key": event.cache_key,
        "plan": {"id": plan.plan_id, "name": plan.name, "prices": asdict(plan.prices)},
        "currency": billed.currency, "cost_micros": billed.cost_micros,
        "blocks": event.cache.to_json(),
    }


def _time(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="microseconds")


# -- checking a receipt (no database, no server) ----------------------------------------------


def load_public_key(text: str | bytes) -> Ed25519PublicKey:
    """A public key as PEM, or as the JSON that ``/.well-known/kvgate-receipt-key`` answers
    (its PEM or its JWK). ``ValueError`` saying why not."""
    data = text.encode() if isinstance(text, str) else text
    if data.lstrip().startswith(b"{"):
        doc = json.loads(data)
        if "public_key_pem" in doc:
            data = doc["public_key_pem"].encode()
        else:
            jwk = doc.get("jwk", doc)
            if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519" or "x" not in jwk:
                raise ValueError("the JWK is not an Ed25519 public key")
            return Ed25519PublicKey.from_public_bytes(_unb64url(jwk["x"]))
    key = serialization.load_pem_public_key(data)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("the public key is not an Ed25519 key")
    return key


def parse(text: str | bytes) -> dict[str, Any]:
    """A receipt's JSON; ``ValueError`` for anything but one object without repeated keys
    (a repeated key would let a reader see another value than the one signed)."""
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in items]
        if len(set(keys)) != len(keys):
            raise ValueError("the receipt repeats a key")
        return dict(items)
    doc = json.loads(text, object_pairs_hook=pairs)
    if not isinstance(doc, dict):
        raise ValueError("a receipt is a JSON object")
    return doc


def verify(receipt: dict[str, Any], public: Ed25519PublicKey) -> str | None:
    """None when ``receipt`` is signed by ``public``, else why not (one line)."""
    signature = receipt.get("signature")
    if not isinstance(signature, str):
        return "the receipt has no signature"
    if receipt.get("signature_alg") != ALGORITHM:
        return f"unknown signature algorithm {receipt.get('signature_alg')!r}"
    expected = key_id_of(public)
    if receipt.get("key_id") != expected:
        return f"signed with key {receipt.get('key_id')!r}, not with key {expected!r}"
    body = {k: v for k, v in receipt.items() if k != "signature"}
    try:
        public.verify(_unb64url(signature), canonical(body))
    except (InvalidSignature, ValueError):
        return "the signature does not match the receipt's contents"
    return None
