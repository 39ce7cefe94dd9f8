"""Pairing: how a device joins a coordinator's cluster.

The unpaired device shows a pairing code (100 random bits, as 5 groups of 4 base32 letters) and
answers a TLS connection with a short-lived self-signed certificate. The coordinator's user types
the code; each side then proves it knows the code with an HMAC-SHA256 (stdlib hmac) over the
transcript, which binds the fingerprint of the certificate the coordinator actually saw (a
machine in the middle presents another one, and its proofs fail) and fresh nonces from both
sides. Only then does the coordinator sign the device's own key (edge.d2d.identity) and hand over
the cluster CA. The code is good for one pairing; wrong codes are logged and refused.

    coordinator -> device  {"op": "pair", "ca": CA_PEM, "nonce": Nc, "mac": H(code, "coord", fp, fp_ca, Nc)}
    device -> coordinator  {"csr": CSR_PEM, "nonce": Nd, "mac": H(code, "device", fp, fp_ca, Nc, Nd, csr)}
    coordinator -> device  {"cert": CERT_PEM}
    device -> coordinator  {"ok": true, "name": NAME}
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import socket
import ssl

from edge.d2d.identity import Identity, fingerprint
from edge.d2d.wire import WireError, encode, read_msg_sync
from edge.errors import EdgeError


def new_code() -> str:
    raw = base64.b32encode(secrets.token_bytes(13)).decode()[:20]
    return "-".join(raw[i : i + 4] for i in range(0, 20, 4))


def _key(code: str) -> bytes:
    return code.replace("-", "").replace(" ", "").upper().encode()


def proof(code: str, *parts: str | bytes) -> str:
    h = hmac.new(_key(code), digestmod=hashlib.sha256)
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(4, "big") + b)
    return h.hexdigest()


def _ca_fp(ca_pem: bytes) -> str:
    return fingerprint(ssl.PEM_cert_to_DER_cert(ca_pem.decode()))


class PairingError(EdgeError):
    """Pairing refused: wrong code, or a peer that does not speak it."""


class WrongCodeError(PairingError):
    """The other side's proof does not match this code."""


def device_answer(identity: Identity, code: str, own_cert_der: bytes, request: dict, name: str) -> tuple[dict, str]:
    """The device's reply to a coordinator's ``pair`` request: (reply, the coordinator's nonce).
    A proof that does not match the code raises PairingError."""
    try:
        ca_pem, nonce_c, mac = request["ca"].encode(), str(request["nonce"]), str(request["mac"])
    except (KeyError, AttributeError):
        raise PairingError("a pairing request without ca, nonce and mac") from None
    fp = fingerprint(own_cert_der)
    if not hmac.compare_digest(mac, proof(code, "coord", fp, _ca_fp(ca_pem), nonce_c)):
        raise WrongCodeError("wrong pairing code")
    csr = identity.csr_pem(name)
    nonce_d = secrets.token_hex(16)
    return {"csr": csr.decode(), "nonce": nonce_d,
            "mac": proof(code, "device", fp, _ca_fp(ca_pem), nonce_c, nonce_d, csr)}, nonce_c


def pair_with(identity: Identity, host: str, port: int, code: str, timeout: float = 10.0) -> str:
    """Coordinator side: pair the device at host:port showing ``code``; returns its name."""
    identity.ensure_ca()
    ca_pem = identity.ca_path.read_bytes()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the device's certificate is self-signed; the proofs bind it
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise EdgeError(f"cannot reach {host}:{port} to pair ({e.strerror or e})") from None
    with ctx.wrap_socket(raw) as s:
        fp = fingerprint(s.getpeercert(binary_form=True))
        f = s.makefile("rb")
        nonce_c = secrets.token_hex(16)
        s.sendall(encode({"op": "pair", "ca": ca_pem.decode(), "nonce": nonce_c,
                          "mac": proof(code, "coord", fp, _ca_fp(ca_pem), nonce_c)}))
        try:
            reply = read_msg_sync(f)
        except WireError as e:
            raise PairingError(f"{host}:{port} refused pairing ({e}): is the code right?") from None
        if "error" in reply:
            raise PairingError(f"{host}:{port} refused pairing: {reply['error']}")
        csr = str(reply.get("csr", "")).encode()
        if not hmac.compare_digest(str(reply.get("mac", "")), proof(code, "device", fp, _ca_fp(ca_pem), nonce_c,
                                                                     str(reply.get("nonce", "")), csr)):
            raise PairingError(f"{host}:{port} did not prove it knows the code: not paired")
        cert = identity.sign_csr(csr)
        s.sendall(encode({"cert": cert.decode()}))
        done = read_msg_sync(f)
        if not done.get("ok"):
            raise PairingError(f"{host}:{port} did not take its certificate: {done.get('error', done)}")
        return str(done.get("name"))
