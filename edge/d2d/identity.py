"""Who belongs to a cluster: its certificate authority, each device's key and certificate, and the
TLS contexts that admit members only.

A cluster is one coordinator's CA (EC P-256, made on first use). A device becomes a member by
pairing (edge.d2d.pairing): the coordinator signs the device's own key. Every connection between
members is mutual TLS 1.3 with the cluster CA as the only trust anchor, so a device without a
certificate from this CA gets nothing past the handshake. Keys never leave the device that made
them; the private key files are mode 0600. Crypto is the ``cryptography`` package and the ssl
module; edge writes none of its own.

Layout of the identity folder ($EDGE_CACHE_DIR/d2d unless given):
    node.key   this device's private key        ca.pem    the cluster CA's certificate
    node.pem   this device's certificate        ca.key    the CA's private key (coordinator only)
"""

from __future__ import annotations

import datetime
import hashlib
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from edge.errors import EdgeError

YEARS = 10


def _crypto():
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError as e:
        raise EdgeError(f"device-to-device needs the cryptography package: pip install 'edge[d2d]' ({e})") from None
    return x509, hashes, serialization, ec, NameOID


def fingerprint(cert_der: bytes) -> str:
    """SHA-256 of a certificate's DER bytes, hex: how a certificate is named in logs and pairing."""
    return hashlib.sha256(cert_der).hexdigest()


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass(frozen=True)
class Identity:
    """One device's identity folder."""

    folder: Path

    @property
    def key_path(self) -> Path:
        return self.folder / "node.key"

    @property
    def cert_path(self) -> Path:
        return self.folder / "node.pem"

    @property
    def ca_path(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def ca_key_path(self) -> Path:
        return self.folder / "ca.key"

    @property
    def paired(self) -> bool:
        return self.cert_path.is_file() and self.ca_path.is_file() and self.key_path.is_file()

    @property
    def name(self) -> str:
        """The name in this device's certificate (its common name), or the host name before pairing."""
        if not self.cert_path.is_file():
            return socket.gethostname()
        x509, _, _, _, NameOID = _crypto()
        cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value

    def cluster_id(self) -> str:
        """The first 16 hex digits of the cluster CA's fingerprint: which cluster a member is in."""
        if not self.ca_path.is_file():
            return ""
        return fingerprint(ssl.PEM_cert_to_DER_cert(self.ca_path.read_text()))[:16]

    def private_key(self):
        """This device's key, made on first use."""
        x509, hashes, serialization, ec, _ = _crypto()
        self.folder.mkdir(parents=True, exist_ok=True)
        if not self.key_path.is_file():
            key = ec.generate_private_key(ec.SECP256R1())
            _write_private(self.key_path, key.private_bytes(serialization.Encoding.PEM,
                                                            serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()))
        try:
            return serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        except ValueError as e:
            raise EdgeError(f"{self.key_path} is not a PEM private key ({e})") from None

    def csr_pem(self, name: str) -> bytes:
        """A certificate request for this device's key under ``name``."""
        x509, hashes, serialization, _, NameOID = _crypto()
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .sign(self.private_key(), hashes.SHA256()))
        return csr.public_bytes(serialization.Encoding.PEM)

    def self_signed_pem(self) -> bytes:
        """A short-lived self-signed certificate for this device's key: what an unpaired device
        shows during pairing (its fingerprint is bound into the pairing proof)."""
        return _sign(self.private_key(), self.private_key(), socket.gethostname(), socket.gethostname(),
                     days=1, ca=False)

    # -- the coordinator's side ------------------------------------------------------------
    def ensure_ca(self, name: str | None = None) -> None:
        """Make this device a cluster's coordinator: a CA and this device's own member certificate,
        both made once."""
        x509, hashes, serialization, ec, _ = _crypto()
        self.folder.mkdir(parents=True, exist_ok=True)
        if not self.ca_key_path.is_file():
            if self.cert_path.is_file():
                raise EdgeError(f"{self.folder} already belongs to another cluster (paired as "
                                f"{self.name}); use another --identity folder to coordinate one")
            ca_key = ec.generate_private_key(ec.SECP256R1())
            _write_private(self.ca_key_path, ca_key.private_bytes(serialization.Encoding.PEM,
                                                                  serialization.PrivateFormat.PKCS8,
                                                                  serialization.NoEncryption()))
            cluster = f"edge cluster {fingerprint(os.urandom(32))[:12]}"
            _write_public(self.ca_path, _sign(ca_key, ca_key, cluster, cluster, days=365 * YEARS, ca=True))
        if not self.cert_path.is_file():
            _write_public(self.cert_path, self.sign_csr(self.csr_pem(name or socket.gethostname())))

    def sign_csr(self, csr_pem: bytes) -> bytes:
        """A member certificate for a pairing device's request (coordinator only)."""
        x509, _, serialization, _, NameOID = _crypto()
        if not self.ca_key_path.is_file():
            raise EdgeError(f"{self.folder} holds no cluster CA: only the coordinator signs members")
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as e:
            raise EdgeError(f"a pairing device sent a malformed certificate request ({e})") from None
        if not csr.is_signature_valid:
            raise EdgeError("a pairing device's certificate request is not signed by its own key")
        ca_key = serialization.load_pem_private_key(self.ca_key_path.read_bytes(), password=None)
        ca = x509.load_pem_x509_certificate(self.ca_path.read_bytes())
        name = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        return _sign(ca_key, csr.public_key(), name, ca.subject, days=365 * YEARS, ca=False)

    def store_membership(self, cert_pem: bytes, ca_pem: bytes) -> None:
        """Keep what pairing gave: the certificate (checked to be for this device's key and signed by
        ``ca_pem``) and the CA."""
        x509, _, serialization, _, _ = _crypto()
        cert, ca = x509.load_pem_x509_certificate(cert_pem), x509.load_pem_x509_certificate(ca_pem)
        mine = self.private_key().public_key().public_bytes(serialization.Encoding.DER,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo)
        if cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo) != mine:
            raise EdgeError("the certificate pairing returned is not for this device's key")
        from cryptography.exceptions import InvalidSignature

        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature) as e:
            raise EdgeError(f"the certificate pairing returned is not signed by the cluster CA ({e})") from None
        _write_public(self.ca_path, ca_pem)
        _write_public(self.cert_path, cert_pem)

    # -- TLS -----------------------------------------------------------------------------------
    def _context(self, purpose) -> ssl.SSLContext:
        if not self.paired:
            raise EdgeError(f"this device is not in a cluster yet ({self.folder} has no certificate): pair it first")
        ctx = ssl.create_default_context(purpose, cafile=str(self.ca_path))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(str(self.cert_path), str(self.key_path))
        ctx.check_hostname = False  # members are named by their certificates, reached by address
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def server_context(self) -> ssl.SSLContext:
        """Mutual TLS, server side: only clients holding a certificate of this cluster's CA."""
        return self._context(ssl.Purpose.CLIENT_AUTH)

    def client_context(self) -> ssl.SSLContext:
        """Mutual TLS, client side: only servers holding a certificate of this cluster's CA."""
        return self._context(ssl.Purpose.SERVER_AUTH)


def peer_name(sock: ssl.SSLSocket | ssl.SSLObject) -> str:
    """The common name of the member at the other end of a verified TLS connection."""
    cert = sock.getpeercert()
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return "?"


def _sign(issuer_key, subject_key_or_private, subject: str, issuer, *, days: int, ca: bool) -> bytes:
    x509, hashes, serialization, ec, NameOID = _crypto()
    public = (subject_key_or_private.public_key() if hasattr(subject_key_or_private, "private_bytes")
              else subject_key_or_private)
    issuer_name = issuer if isinstance(issuer, x509.Name) else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)])
    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .issuer_name(issuer_name)
         .public_key(public)
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False, data_encipherment=False,
                                          key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
    else:
        b = b.add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
                                                   x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return b.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
