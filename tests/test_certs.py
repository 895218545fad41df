"""The local CA shared by several processes: one CA however many start at once, files never seen half-written,
and a state directory that is private or refused with a clear reason."""

from __future__ import annotations

import logging
import multiprocessing
import ssl
import stat
from collections.abc import Callable
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from azproxy.edge.certs import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    CertificateAuthority,
    CertificateError,
)
from azproxy.state_dir import StateDirError, check_state_dir

HOST = "api.openai.com"
PROCESSES = 8
RUNS = 10
#: Fork starts a racer in milliseconds; the barrier then releases them all at once.
CONTEXT = multiprocessing.get_context("fork")

#: What a racer sends back: the CA fingerprint it holds (or its error), a leaf it signed, whether it made the CA.
Report = tuple[str, bytes, bool]
Racer = Callable[[Path, Barrier, "Queue[Report]"], None]


def _open_ca(state_dir: Path, barrier: Barrier, results: Queue[Report]) -> None:
    """Open the CA and send back what this process holds: the CA's fingerprint and a leaf signed with its key."""
    barrier.wait(timeout=10)
    try:
        authority = CertificateAuthority(state_dir, [HOST])
        leaf, _ = authority.issue(HOST)
        fingerprint = x509.load_pem_x509_certificate(authority.pem()).fingerprint(hashes.SHA256()).hex()
        results.put((fingerprint, leaf.public_bytes(serialization.Encoding.DER), authority.created))
    except Exception as error:  # reported to the parent, which names it in the failure
        results.put((f"error: {error!r}", b"", False))


def _make_leaves(state_dir: Path, barrier: Barrier, results: Queue[Report]) -> None:
    """Write and load the same leaf over and over, each time through a fresh CA object (contexts are cached)."""
    barrier.wait(timeout=10)
    try:
        for _ in range(40):
            CertificateAuthority(state_dir, [HOST]).context_for(HOST)
        results.put(("ok", b"", False))
    except Exception as error:
        results.put((f"error: {error!r}", b"", False))


def _race(racer: Racer, state_dir: Path, count: int) -> list[Report]:
    barrier, results = CONTEXT.Barrier(count), CONTEXT.Queue()
    processes = [CONTEXT.Process(target=racer, args=(state_dir, barrier, results)) for _ in range(count)]
    for process in processes:
        process.start()
    reports = [results.get(timeout=20) for _ in processes]
    for process in processes:
        process.join(timeout=10)
        assert process.exitcode == 0
    assert [r[0] for r in reports if r[0].startswith("error")] == []
    return reports


def _disk_ca(state_dir: Path) -> x509.Certificate:
    """The CA on disk, after checking that its certificate belongs to its key."""
    cert = x509.load_pem_x509_certificate((state_dir / CA_CERT_FILE).read_bytes())
    key = serialization.load_pem_private_key((state_dir / CA_KEY_FILE).read_bytes(), password=None)
    assert cert.public_key() == key.public_key()
    return cert


def test_processes_starting_at_once_share_one_ca(tmp_path: Path) -> None:
    for run in range(RUNS):
        state_dir = tmp_path / f"run-{run}" / "state"  # not there yet: making the directory races too
        reports = _race(_open_ca, state_dir, PROCESSES)
        ca = _disk_ca(state_dir)
        assert {fingerprint for fingerprint, _, _ in reports} == {ca.fingerprint(hashes.SHA256()).hex()}
        assert sum(created for _, _, created in reports) == 1
        for _, leaf, _ in reports:  # each process signs with the key that belongs to the CA on disk
            x509.load_der_x509_certificate(leaf).verify_directly_issued_by(ca)
        assert sorted(p.name for p in state_dir.iterdir()) == ["ca-key.pem", "ca.lock", "ca.pem"]


def test_same_leaf_written_by_two_processes_is_never_torn(tmp_path: Path) -> None:
    CertificateAuthority(tmp_path, [HOST])
    _race(_make_leaves, tmp_path, 2)  # each load_cert_chain above read a whole key and certificate pair
    leaf_path = tmp_path / "leaves" / f"{HOST}.pem"
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(leaf_path)
    x509.load_pem_x509_certificate(leaf_path.read_bytes()).verify_directly_issued_by(_disk_ca(tmp_path))
    assert stat.S_IMODE(leaf_path.stat().st_mode) == 0o600
    assert [p.name for p in leaf_path.parent.iterdir()] == [leaf_path.name]  # no temporary files left


def test_new_ca_is_private_and_reported_as_created(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    first = CertificateAuthority(state_dir, [HOST])
    second = CertificateAuthority(state_dir, [HOST])
    assert (first.created, second.created) == (True, False)
    assert first.pem() == second.pem()
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((state_dir / CA_KEY_FILE).stat().st_mode) == 0o600


def test_certificate_that_does_not_match_the_key_is_refused(tmp_path: Path) -> None:
    CertificateAuthority(tmp_path / "a", [HOST])
    CertificateAuthority(tmp_path / "b", [HOST])
    (tmp_path / "b" / CA_CERT_FILE).write_bytes((tmp_path / "a" / CA_CERT_FILE).read_bytes())
    with pytest.raises(CertificateError, match="does not belong to the key"):
        CertificateAuthority(tmp_path / "b", [HOST])


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777], ids=oct)
def test_state_dir_writable_by_others_is_tightened_with_a_warning(
    tmp_path: Path, mode: int, caplog: pytest.LogCaptureFixture
) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    state_dir.chmod(mode)
    with caplog.at_level(logging.WARNING, logger="azproxy.state_dir"):
        CertificateAuthority(state_dir, [HOST])
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert str(state_dir) in caplog.text


def test_shared_sticky_directory_is_refused_not_changed(tmp_path: Path) -> None:
    tmp_path.chmod(0o1777)
    with pytest.raises(StateDirError, match="AZPROXY_STATE_DIR"):
        check_state_dir(tmp_path)
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o1777


@pytest.mark.parametrize("where", ["state", "state/inner"])
def test_state_dir_blocked_by_a_file_names_the_setting(tmp_path: Path, where: str) -> None:
    (tmp_path / "state").write_text("not a directory")
    state_dir = tmp_path / where
    with pytest.raises(CertificateError, match="AZPROXY_STATE_DIR") as caught:
        CertificateAuthority(state_dir, [HOST])
    assert str(state_dir) in str(caught.value)
