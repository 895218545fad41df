"""azproxy's local certificate authority, and the per-host TLS contexts it signs for intercepted tunnels.

The CA is made once (EC P-256, ten years, key file 0600) and limited by NameConstraints to the intercepted hosts,
so a stolen CA key cannot vouch for any other site. Several processes may share one state directory: the CA is
loaded or created under a file lock, and every file is written whole to a temporary name and renamed into place.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import ipaddress
import logging
import os
import ssl
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from azproxy.state_dir import StateDirError, check_state_dir

CA_CERT_FILE: Final = "ca.pem"
CA_KEY_FILE: Final = "ca-key.pem"
_LOCK_FILE: Final = "ca.lock"
_CA_LIFETIME: Final = datetime.timedelta(days=3650)
#: Browsers and Apple's TLS stack refuse leaves valid longer than 398 days.
_LEAF_LIFETIME: Final = datetime.timedelta(days=397)


log = logging.getLogger(__name__)


class CertificateError(RuntimeError):
    """The CA on disk cannot serve the configured hosts, or cannot be read."""


class CertificateAuthority:
    """Loads or creates the CA in `state_dir`; hands out one cached server-side SSLContext per host.

    `created` is true when this instance had to make a new CA (clients must then be told to trust it)."""

    def __init__(self, state_dir: Path, hosts: Sequence[str]) -> None:
        self.state_dir = state_dir
        self.hosts = tuple(hosts)
        self.cert_path = state_dir / CA_CERT_FILE
        self._key_path = state_dir / CA_KEY_FILE
        try:
            check_state_dir(state_dir)
        except StateDirError as error:
            raise CertificateError(str(error)) from error
        with _locked(state_dir / _LOCK_FILE):
            # Decided only under the lock: a process that waited here loads the CA the first one made.
            self.created = not (self.cert_path.is_file() and self._key_path.is_file())
            self._cert, self._key = self._create() if self.created else self._load()
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

    def _load(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        key = serialization.load_pem_private_key(self._key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CertificateError(f"{self._key_path} is not an EC private key")
        if cert.public_key() != key.public_key():
            # Left by a racing write from an older azproxy: every leaf signed with this key would be rejected.
            raise CertificateError(
                f"{self.cert_path} does not belong to the key in {self._key_path}. Remove both to make a new CA "
                "(clients must then trust the new one)."
            )
        self._check_constraints(cert)
        return cert, key

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
        # The key first: clients read ca.pem without the lock, and a certificate must never outlive a lost key.
        _write_atomic(self._key_path, _private_pem(key), 0o600)
        _write_atomic(self.cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
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
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        # load_cert_chain reads only files, and opens this one twice (certificate, then key): it reads this
        # process's own temporary copy, which no other process writing a leaf for `host` can replace in between.
        pair = _private_pem(key) + cert.public_bytes(serialization.Encoding.PEM)
        with _replacing(leaf_path, pair, 0o600) as own_copy:
            context.load_cert_chain(own_copy)
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


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (made if missing); the kernel drops it if the process dies."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # closing releases the lock


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write `data` whole to a temporary file beside `path` and rename it there: readers see the old file or the
    new one, never a part."""
    with _replacing(path, data, mode):
        pass


@contextlib.contextmanager
def _replacing(path: Path, data: bytes, mode: int) -> Iterator[Path]:
    """Yield a complete, synced temporary file holding `data`, then rename it to `path`.

    The temporary file is private from its creation, so a key is never readable by others, not even briefly."""
    descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    temporary = Path(name)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fchmod(file.fileno(), mode)
            os.fsync(file.fileno())  # the data is on disk before the name points at it
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(path: Path) -> None:
    """Make the rename itself survive a crash, so the key is not lost while its certificate survives."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
