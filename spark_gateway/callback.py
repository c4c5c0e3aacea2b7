"""Gateway side of the callback protocol v1 (docs/design.md): RSA key pair, response server, payload checks."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import errno
import hmac
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from Crypto.Cipher import AES, PKCS1_OAEP
from Crypto.Hash import SHA256
from Crypto.PublicKey import RSA

from . import protocol

log = logging.getLogger(__name__)
REFUSED = {"ok": False, "error": "refused"}  # all a client learns of a refusal; the gateway log says why


class PayloadError(ValueError):
    """A callback payload was rejected; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def generate_key_pair() -> RSA.RsaKey:
    """A fresh RSA 2048 private key (one per gateway process)."""
    return RSA.generate(2048)


def public_key_b64(key: RSA.RsaKey) -> str:
    """base64 (standard, no newlines) of the DER SubjectPublicKeyInfo of ``key``."""
    return base64.b64encode(key.publickey().export_key(format="DER")).decode()


def _b64field(envelope: dict[str, Any], name: str, size: int | None = None) -> bytes:
    value = envelope.get(name)
    if not isinstance(value, str):
        raise PayloadError(f"envelope field {name!r} missing or not a string")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise PayloadError(f"envelope field {name!r} is not valid base64") from None
    if size is not None and len(raw) != size:
        raise PayloadError(f"envelope field {name!r} must be {size} bytes, got {len(raw)}")
    return raw


def _check_fields(obj: dict[str, Any], fields: dict[str, Any], where: str) -> None:
    for name, kind in fields.items():
        value = obj.get(name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise PayloadError(f"{where} field {name!r} missing or of the wrong type")


def envelope_kernel_id(raw: bytes) -> tuple[str, dict[str, Any]]:
    """The kernel id an envelope claims, and the envelope (cheap: no cryptography). Raise PayloadError."""
    try:
        envelope = json.loads(raw)
    except ValueError:
        raise PayloadError("envelope is not JSON") from None
    if not isinstance(envelope, dict):
        raise PayloadError("envelope is not a JSON object")
    if envelope.get("v") != protocol.VERSION:
        raise PayloadError(f"unsupported protocol version {envelope.get('v')!r}")
    kernel_id = envelope.get("kernel_id")
    if not isinstance(kernel_id, str) or not kernel_id:
        raise PayloadError("envelope field 'kernel_id' missing or not a string")
    return kernel_id, envelope


def decrypt_payload(private_key: RSA.RsaKey, raw: bytes) -> tuple[str, dict[str, Any]]:
    """Open a v1 envelope; return (kernel_id, plaintext dict). Raise PayloadError with the reason."""
    kernel_id, envelope = envelope_kernel_id(raw)
    wrapped = _b64field(envelope, "key")
    nonce = _b64field(envelope, "nonce", protocol.NONCE_BYTES)
    data = _b64field(envelope, "data")
    tag = _b64field(envelope, "tag", protocol.TAG_BYTES)
    try:
        aes_key = PKCS1_OAEP.new(private_key, hashAlgo=SHA256).decrypt(wrapped)
    except (ValueError, TypeError):
        raise PayloadError("cannot unwrap the AES key (wrong gateway key or tampered)") from None
    if len(aes_key) != protocol.AES_KEY_BYTES:
        raise PayloadError("wrapped key is not an AES-256 key")
    cipher = AES.new(aes_key, AES.MODE_GCM, nonce=nonce)
    cipher.update(protocol.aad(kernel_id))
    try:
        plaintext = cipher.decrypt_and_verify(data, tag)
    except ValueError:
        raise PayloadError("authentication failed (tampered ciphertext, tag or kernel id)") from None
    try:
        payload = json.loads(plaintext)
    except ValueError:
        raise PayloadError("plaintext is not JSON") from None
    if not isinstance(payload, dict):
        raise PayloadError("plaintext is not a JSON object")
    _check_fields(payload, protocol.PLAINTEXT_FIELDS, "plaintext")
    _check_fields(payload["connection_info"], protocol.CONNECTION_FIELDS, "connection_info")
    if payload["kernel_id"] != kernel_id:
        raise PayloadError("plaintext kernel_id differs from the envelope's")
    return kernel_id, payload


@dataclass
class _Connection:
    peer: str  # the peer's address
    writer: asyncio.StreamWriter
    talking: bool = False  # it has sent bytes: never evicted for a newcomer


class ResponseServer:
    """Receives connection-info callbacks and resolves the future registered for each kernel.

    Anyone on the network can reach it, so it holds under abuse: a connection must send its first bytes within
    `first_bytes_timeout` and all of them within `read_timeout`; at most `max_connections` (and `max_per_peer` per
    address) are served at once, a newcomer evicting the oldest silent one when full (so silent connections can
    never keep a kernel's callback out); an envelope for a kernel id that is not pending is refused before any RSA
    work, which runs off the event loop on a small pool of its own; a client is only ever told "refused".
    """

    def __init__(
        self,
        private_key: RSA.RsaKey | None = None,
        read_timeout: float = 10.0,
        max_payload: int = protocol.MAX_MESSAGE,
        first_bytes_timeout: float = 5.0,
        max_connections: int = 256,
        max_per_peer: int = 32,
    ) -> None:
        self.private_key = private_key or generate_key_pair()
        self.public_key_b64 = public_key_b64(self.private_key)
        self.read_timeout = read_timeout
        self.max_payload = max_payload
        self.first_bytes_timeout = min(first_bytes_timeout, read_timeout)
        self.max_connections, self.max_per_peer = max_connections, max_per_peer
        self._pending: dict[str, tuple[str, asyncio.Future[dict[str, Any]]]] = {}
        self._accepted: set[str] = set()
        self._servers: list[asyncio.Server] = []
        self._connections: list[_Connection] = []  # in arrival order
        self._rsa = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sg-callback-rsa")

    async def listen(self, host: str, port: int, port_retries: int = 10) -> int:
        """Bind ``host:port``, trying the next ports on EADDRINUSE; return the bound port."""
        candidate, last = port, (port + port_retries if port else 0)
        while True:
            try:
                server = await asyncio.start_server(self._handle, host, candidate, limit=self.max_payload)
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or candidate >= last:
                    raise
                candidate += 1
        self._servers.append(server)
        bound: int = server.sockets[0].getsockname()[1]
        log.info("response server listening on %s:%d", host, bound)
        return bound

    def register(self, kernel_id: str, launch_token: str) -> asyncio.Future[dict[str, Any]]:
        """Expect one callback for ``kernel_id`` carrying ``launch_token``; the future gets its plaintext."""
        if kernel_id in self._pending:
            raise ValueError(f"kernel {kernel_id} is already registered")
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._accepted.discard(kernel_id)
        self._pending[kernel_id] = (launch_token, future)
        return future

    def unregister(self, kernel_id: str) -> None:
        """Forget ``kernel_id``; a still-pending future is cancelled."""
        self._accepted.discard(kernel_id)
        entry = self._pending.pop(kernel_id, None)
        if entry:
            entry[1].cancel()

    async def close(self) -> None:
        """Stop listening and cancel every pending future."""
        for server in self._servers:
            server.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        for kernel_id in list(self._pending):
            self.unregister(kernel_id)
        self._rsa.shutdown(wait=False)

    async def _read_all(self, reader: asyncio.StreamReader, first: bytes) -> bytes:
        chunks, size = [first], len(first)
        while size <= self.max_payload and (chunk := await reader.read(65536)):
            chunks.append(chunk)
            size += len(chunk)
        if size > self.max_payload:
            raise PayloadError(f"payload larger than {self.max_payload} bytes")
        return b"".join(chunks)

    async def _accept(self, raw: bytes) -> str:
        """Verify ``raw`` and resolve its kernel's future; return the kernel id."""
        kernel_id, _ = envelope_kernel_id(raw)
        if kernel_id in self._accepted:
            raise PayloadError(f"replay: kernel {kernel_id!r} already called back")
        if kernel_id not in self._pending:  # before any RSA work: garbage costs a JSON parse, no more
            raise PayloadError(f"kernel {kernel_id!r} is not registered")
        loop = asyncio.get_running_loop()
        _, payload = await loop.run_in_executor(self._rsa, decrypt_payload, self.private_key, raw)
        if kernel_id in self._accepted:
            raise PayloadError(f"replay: kernel {kernel_id!r} already called back")
        entry = self._pending.get(kernel_id)
        if entry is None:
            raise PayloadError(f"kernel {kernel_id!r} is not registered")
        token, future = entry
        if not hmac.compare_digest(payload["launch_token"].encode(), token.encode()):
            raise PayloadError(f"wrong launch token for kernel {kernel_id!r}")
        del self._pending[kernel_id]
        self._accepted.add(kernel_id)
        if future.done():
            raise PayloadError(f"nobody is waiting for kernel {kernel_id!r} any more")
        future.set_result(payload)
        return kernel_id

    def _admit(self, new: _Connection) -> bool:
        """Make room for `new` within the caps by evicting the oldest silent connection; False if none is silent."""
        for cap, same in ((self.max_per_peer, lambda c: c.peer == new.peer), (self.max_connections, lambda c: True)):
            group = [c for c in self._connections if same(c)]
            if len(group) >= cap:
                silent = next((c for c in group if not c.talking), None)
                if silent is None:
                    return False
                self._connections.remove(silent)
                silent.writer.transport.abort()
        self._connections.append(new)
        return True

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        conn = _Connection(str(peer[0]) if peer else "?", writer)
        if not self._admit(conn):
            log.warning("refused callback connection from %s: %d connections busy", peer, len(self._connections))
            writer.transport.abort()
            return
        started, reply = time.monotonic(), {"ok": True}
        try:
            try:
                first = await asyncio.wait_for(reader.read(65536), self.first_bytes_timeout)
                conn.talking = True
                left = self.read_timeout - (time.monotonic() - started)
                raw = await asyncio.wait_for(self._read_all(reader, first), max(left, 0.0))
                kernel_id = await self._accept(raw)
                log.info("connection info for kernel %r received from %s", kernel_id, peer)
            except PayloadError as exc:
                reply, reason = REFUSED, exc.reason
            except asyncio.TimeoutError:
                reply = REFUSED
                reason = (
                    f"no complete payload within {self.read_timeout:g} s"
                    if conn.talking
                    else f"sent nothing within {self.first_bytes_timeout:g} s"
                )
            except (ConnectionError, OSError):
                return  # evicted, or the peer went away
            except Exception as exc:  # a payload must never take the server down
                reply, reason = REFUSED, f"internal error: {exc!r}"
            if not reply["ok"]:
                log.warning("rejected callback from %s: %s", peer, reason)
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                writer.write(json.dumps(reply).encode() + b"\n")
                await asyncio.wait_for(writer.drain(), self.read_timeout)
                writer.close()
                await asyncio.wait_for(writer.wait_closed(), self.read_timeout)
        finally:
            if conn in self._connections:
                self._connections.remove(conn)
