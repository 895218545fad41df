"""azproxy's local certificate authority, and the per-host TLS contexts it signs for intercepted tunnels.

The CA is made once (EC P-256, ten years, key file 0600) and limited by NameConstraints to the intercepted hosts,
so a stolen CA key cannot vouch for any other site.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT_FILE: Final = "ca.pem"
CA_KEY_FILE: Final = "ca-key.pem"
_CA_LIFETIME: Final = datetime.timedelta(days=3650)
#: Browsers and Apple's TLS stack refuse leaves valid longer than 398 days.
_LEAF_LIFETIME: Final = datetime.timedelta(days=397)


class CertificateError(RuntimeError):
    """The CA on disk cannot serve the configured hosts, or cannot be read."""


class CertificateAuthority:
    """Loads or creates the CA in `state_dir`; hands out one cached server-side SSLContext per host."""

    def __init__(self, state_dir: Path, hosts: Sequence[str]) -> None:
        self.state_dir = state_dir
        self.hosts = tuple(hosts)
        self.cert_path = state_dir / CA_CERT_FILE
        self._key_path = state_dir / CA_KEY_FILE
        self._cert, self._key = self._load_or_create()
        self._contexts: dict[str, ssl.SSLContext] = {}

    def pem(self) -> bytes:
        return self._cert.public_bytes(serialization.Encoding.PEM)

    def context_for(self, host: str) -> ssl.SSLContext:
        """A server context presenting a leaf for `host`; made on first use, then cached for the process."""
        context = self._contexts.get(host)
        if context is None:
            if host not in self.hosts:
                raise CertificateError(f"{host} is not an intercepted host; the CA signs only {self.hosts}")
            context = self._contexts[host] = self._server_context(host)
        return context

    def _load_or_create(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        if self.cert_path.is_file() and self._key_path.is_file():
            cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
            key = serialization.load_pem_private_key(self._key_path.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise CertificateError(f"{self._key_path} is not an EC private key")
            self._check_constraints(cert)
            return cert, key
        return self._create()

    def _check_constraints(self, cert: x509.Certificate) -> None:
        constraints = cert.extensions.get_extension_for_class(x509.NameConstraints).value
        permitted = {name.value for name in constraints.permitted_subtrees or ()}
        missing = [host for host in self.hosts if host not in permitted]
        if missing:
            raise CertificateError(
                f"The CA in {self.cert_path} may only sign {sorted(permitted)}, but AZPROXY_INTERCEPT_HOSTS "
                f"also names {missing}. Remove {self.cert_path} and {self._key_path} to make a new CA (clients "
                "must then trust the new one)."
            )

    def _create(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, "azproxy local CA"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "azproxy"),
            ]
        )
        now = datetime.datetime.now(datetime.UTC)
        public = key.public_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + _CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(signs_certificates=True), critical=True)
            .add_extension(
                x509.NameConstraints(
                    permitted_subtrees=[x509.DNSName(h) for h in self.hosts], excluded_subtrees=None
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, hashes.SHA256())
        )
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_private(
            self._key_path,
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert, key

    def issue(self, host: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """A leaf for `host` signed by this CA (the CA's own NameConstraints still decide where it is valid)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + _LEAF_LIFETIME)
            .add_extension(x509.SubjectAlternativeName([_san(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(signs_certificates=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._cert.public_key()),  # type: ignore[arg-type]
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        return cert, key

    def _server_context(self, host: str) -> ssl.SSLContext:
        cert, key = self.issue(host)
        leaf_dir = self.state_dir / "leaves"
        leaf_dir.mkdir(exist_ok=True, mode=0o700)
        leaf_path = leaf_dir / f"{host}.pem"
        # load_cert_chain reads only files; the key never sits in a world-readable one.
        _write_private(
            leaf_path,
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            + cert.public_bytes(serialization.Encoding.PEM),
        )
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(leaf_path)
        context.set_alpn_protocols(["http/1.1"])  # aiohttp's server speaks no HTTP/2
        return context


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    """Signatures only (EC keys do no key encipherment); a CA also signs certificates and revocation lists."""
    return x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write_private(path: Path, data: bytes) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)
    path.chmod(0o600)
