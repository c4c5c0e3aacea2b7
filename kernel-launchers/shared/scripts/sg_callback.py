"""The callback (protocol v1, docs/design.md): the launch token (read from stdin), and the connection info sealed
for the gateway."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import secrets
import socket
import sys
import time
from typing import TYPE_CHECKING, Any

import sg_protocol as protocol

if TYPE_CHECKING:
    from sg_control import ControlListener

log = logging.getLogger("server_listener")


class CallbackError(RuntimeError):
    """The connection info could not be delivered to the gateway."""


def payload_fields(
    kernel_id: str,
    connection_info: dict[str, Any],
    pid: int,
    pgid: int,
    listener: ControlListener,
    connection_file: str,
) -> dict[str, Any]:
    """The callback plaintext fields other than ``kernel_id`` and ``launch_token``."""
    log_dir = os.environ.get("GP_KERNEL_LOG_DIR")
    return {
        "connection_info": connection_info,
        "pid": pid,
        "pgid": pgid,
        "hostname": socket.gethostname(),
        "listener_port": listener.port,
        "listener_secret": listener.secret_hex,
        "connection_file": os.path.abspath(connection_file),
        "log_file": os.path.join(log_dir, f"kernel-{kernel_id}.log") if log_dir else None,
    }


def encrypt_payload(public_key_b64: str, kernel_id: str, plaintext: dict[str, Any]) -> bytes:
    """Seal ``plaintext`` into a v1 envelope: AES-256-GCM, key wrapped with RSA-OAEP-SHA256."""
    # Imported here: pycryptodome's AES costs ~30 ms to import; CallbackSender pays it in a helper process.
    from Crypto.Cipher import AES

    aes_key = secrets.token_bytes(32)
    wrapped = oaep_encrypt(base64.b64decode(public_key_b64), aes_key)
    nonce = secrets.token_bytes(12)
    cipher = AES.new(aes_key, AES.MODE_GCM, nonce=nonce)
    cipher.update(protocol.aad(kernel_id))
    data, tag = cipher.encrypt_and_digest(json.dumps(plaintext).encode())

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    envelope = {
        "v": protocol.VERSION,
        "kernel_id": kernel_id,
        "key": b64(wrapped),
        "nonce": b64(nonce),
        "data": b64(data),
        "tag": b64(tag),
    }
    return json.dumps(envelope).encode()


RSA_ENCRYPTION = bytes.fromhex("06092a864886f70d010101")  # DER of the OID 1.2.840.113549.1.1.1 (rsaEncryption)


def _der(data: bytes, pos: int, tag: int) -> tuple[bytes, int]:
    """The value of the DER element of type `tag` at `pos`, and the position after it. ValueError if malformed."""
    if data[pos : pos + 1] != bytes([tag]) or pos + 2 > len(data):
        raise ValueError(f"DER: expected tag {tag:#x} at offset {pos}")
    length, pos = data[pos + 1], pos + 2
    if length & 0x80:
        size = length & 0x7F
        length, pos = int.from_bytes(data[pos : pos + size], "big"), pos + size
    if pos + length > len(data):
        raise ValueError("DER: element runs past the end")
    return data[pos : pos + length], pos + length


def rsa_public_numbers(spki: bytes) -> tuple[int, int]:
    """(modulus, public exponent) of a DER SubjectPublicKeyInfo holding an RSA key. ValueError otherwise."""
    body, _ = _der(spki, 0, 0x30)
    algorithm, pos = _der(body, 0, 0x30)
    if not algorithm.startswith(RSA_ENCRYPTION):
        raise ValueError("the gateway's public key is not an RSA key")
    bits, _ = _der(body, pos, 0x03)
    key, _ = _der(bits, 1, 0x30)  # after the BIT STRING's unused-bits byte
    modulus, pos = _der(key, 0, 0x02)
    exponent, _ = _der(key, pos, 0x02)
    return int.from_bytes(modulus, "big"), int.from_bytes(exponent, "big")


def _mgf1(seed: bytes, length: int) -> bytes:
    blocks = (hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(-(-length // 32)))
    return b"".join(blocks)[:length]


def oaep_encrypt(spki: bytes, message: bytes) -> bytes:
    """RSAES-OAEP-ENCRYPT (RFC 8017 7.1.1) with SHA-256, MGF1-SHA-256 and an empty label: what pycryptodome's
    `PKCS1_OAEP.new(key, hashAlgo=SHA256)` decrypts. Written here because importing pycryptodome's RSA costs the
    callback helper ~25 ms of CPU per kernel, and the public operation is one `pow` (nothing secret is computed:
    the private key never leaves the gateway)."""
    modulus, exponent = rsa_public_numbers(spki)
    size = (modulus.bit_length() + 7) // 8
    if len(message) > size - 2 * 32 - 2:
        raise ValueError(f"message too long for RSA-OAEP with a {size * 8}-bit key")
    block = hashlib.sha256(b"").digest() + bytes(size - len(message) - 2 * 32 - 2) + b"\x01" + message
    seed = secrets.token_bytes(32)
    masked_block = bytes(a ^ b for a, b in zip(block, _mgf1(seed, len(block)), strict=True))
    masked_seed = bytes(a ^ b for a, b in zip(seed, _mgf1(masked_block, 32), strict=True))
    encoded = int.from_bytes(b"\x00" + masked_seed + masked_block, "big")
    return pow(encoded, exponent, modulus).to_bytes(size, "big")


def send_connection_info(
    response_address: str,
    public_key_b64: str,
    kernel_id: str,
    launch_token: str,
    payload_fields: dict[str, Any],
    timeout: float = 10.0,
    attempts: int = 5,
) -> None:
    """Encrypt and deliver the connection info; raise CallbackError unless the gateway answers ok."""
    plaintext = {"kernel_id": kernel_id, "launch_token": launch_token, **payload_fields}
    envelope = encrypt_payload(public_key_b64, kernel_id, plaintext)
    reply = _deliver(protocol.parse_address(response_address), envelope, timeout, attempts)
    try:
        answer = json.loads(reply)
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or answer.get("ok") is not True:
        error = answer.get("error") if isinstance(answer, dict) else reply[:200]
        raise CallbackError(f"gateway at {response_address} rejected the connection info: {error}")


class CallbackSender:
    """Sends the callback from a process forked at launch, which imports pycryptodome on another core while the
    launcher imports its kernel; it sends only when `send` hands it the payload fields.

    The helper alone keeps the launch token (the launcher's copy is wiped at the fork) and is not dumpable; it
    exits once the gateway answered. Fork it before any thread exists. If the launcher dies first, the helper
    reads EOF and exits silently.
    """

    def __init__(self, response_address: str, public_key_b64: str, kernel_id: str, launch_token: bytearray) -> None:
        self.args = (response_address, public_key_b64, kernel_id)
        to_child, self._request = os.pipe()
        self._reply, from_child = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the helper: the only process that keeps the token, and nobody can read its memory
            make_undumpable()
            os.close(self._request)
            os.close(self._reply)
            os._exit(self._serve(to_child, from_child, launch_token.decode()))
        wipe(launch_token)  # the launcher (where user code will run) no longer holds it
        os.close(to_child)
        os.close(from_child)

    def _serve(self, requests: int, replies: int, token: str) -> int:
        try:
            # pycryptodome picks cffi when importable, which costs several times the CPU of its ctypes backend to load;
            # this short-lived process only encrypts one payload, so it takes the cheaper one
            sys.modules.setdefault("cffi", None)  # type: ignore[arg-type]
            encrypt_payload(self.args[1], self.args[2], {})  # warm imports and native libraries meanwhile
            with os.fdopen(requests, "rb") as pipe:
                data = pipe.read()
            if not data:
                return 0
            send_connection_info(*self.args, token, json.loads(data))
            os.write(replies, b"ok")
        except BaseException as exc:  # the parent reports it
            os.write(replies, f"{exc}".encode()[:4000] or b"callback failed")
        return 0

    def send(self, payload_fields: dict[str, Any]) -> None:
        """Hand over the payload and wait for the gateway's answer; raise CallbackError on failure."""
        os.write(self._request, json.dumps(payload_fields).encode())
        os.close(self._request)
        with os.fdopen(self._reply, "rb") as pipe:
            answer = pipe.read().decode(errors="replace")
        os.waitpid(self.pid, 0)
        if answer != "ok":
            raise CallbackError(answer or "the callback helper process died")


def _deliver(address: tuple[str, int], envelope: bytes, timeout: float, attempts: int) -> bytes:
    """Send ``envelope`` and return the reply line, retrying while the connection is refused."""
    where = f"{address[0]}:{address[1]}"
    for attempt in range(1, attempts + 1):
        try:
            with socket.create_connection(address, timeout=timeout) as sock:
                sock.sendall(envelope)
                sock.shutdown(socket.SHUT_WR)
                return protocol.recv_line(sock, time.monotonic() + timeout, protocol.MAX_MESSAGE)
        except ConnectionRefusedError as exc:
            if attempt == attempts:
                raise CallbackError(f"gateway at {where} refused {attempts} connections: {exc}") from exc
            time.sleep(0.2 * attempt)
        except (OSError, ValueError) as exc:
            raise CallbackError(f"cannot deliver connection info to {where}: {exc!r}") from exc
    raise CallbackError(f"cannot deliver connection info to {where}: no attempts")


TOKEN_LENGTH = 64  # hex digits; the gateway writes them and a newline on the launcher's stdin


def take_launch_token(fd: int = 0) -> bytearray:
    """Read the launch token from stdin (the gateway writes it there), then point stdin at /dev/null.

    The token is never in any environment or argv; once read, the pipe is empty and gone, so nothing started
    later (user code included) can read it. It is returned as a bytearray so that the holder can wipe it
    (`wipe`); exits 2, saying why, when no token came.
    """
    buf = bytearray(TOKEN_LENGTH + 1)
    view = memoryview(buf)
    got = 0
    try:
        if not os.isatty(fd):
            while got < len(buf):
                count = os.readv(fd, [view[got:]])
                if count == 0:
                    break
                got += count
    except OSError:
        got = 0
    null = os.open(os.devnull, os.O_RDONLY)
    if null != fd:
        os.dup2(null, fd)
        os.close(null)
    valid = got >= TOKEN_LENGTH and all(c in b"0123456789abcdef" for c in view[:TOKEN_LENGTH])
    view.release()
    buf[TOKEN_LENGTH] = 0
    del buf[TOKEN_LENGTH:]
    if not valid:
        wipe(buf)
        print(
            "error: no launch token on stdin; the gateway writes one there for each launch (a launcher started by"
            " hand must get 64 hex digits on stdin)",
            file=sys.stderr,
        )
        sys.exit(2)
    return buf


def wipe(token: bytearray) -> None:
    """Overwrite the token in place (a bytearray is never copied by this)."""
    token[:] = bytes(len(token))


def make_undumpable() -> None:
    """prctl(PR_SET_DUMPABLE, 0): other processes of our user can no longer read our memory, environment or fds
    (/proc/PID/mem, ptrace); a no-op where prctl is missing."""
    import contextlib
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 4
