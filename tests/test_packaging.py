"""The image, checked without a Docker engine: the Dockerfile read statically, and its install step (the files it
copies, a plain `pip install .` into a fresh virtualenv, then the console script) done for real."""

from __future__ import annotations

import configparser
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (DOCKER / "Dockerfile").read_text())
    lines = (line.strip() for line in text.splitlines())
    pairs = (line.split(None, 1) for line in lines if line and not line.startswith("#"))
    return [(pair[0].upper(), pair[1] if len(pair) > 1 else "") for pair in pairs]


def _final_stage() -> list[tuple[str, str]]:
    """What the image is made of: the instructions after the last FROM."""
    instructions = _instructions()
    last_from = max(i for i, (name, _) in enumerate(instructions) if name == "FROM")
    return instructions[last_from:]


def _exec_form(arguments: str) -> list[str]:
    words: list[str] = json.loads(arguments)
    return words


def _env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for name, arguments in stage:
        if name == "ENV":
            for word in shlex.split(arguments):
                key, _, value = word.partition("=")
                env[key] = value
    return env


def _copy_sources() -> list[str]:
    """Files the build context must provide (COPY --from=stage takes from another stage instead)."""
    sources: list[str] = []
    for name, arguments in _instructions():
        words = shlex.split(arguments)
        if name == "COPY" and not any(word.startswith("--from") for word in words):
            sources += [word for word in words[:-1] if not word.startswith("--")]
    return sources


def test_every_copy_source_exists() -> None:
    sources = _copy_sources()
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source


def test_the_image_runs_as_a_user_other_than_root() -> None:
    users = [arguments for name, arguments in _final_stage() if name == "USER"]
    assert users
    user = users[-1].partition(":")[0]
    assert user not in ("root", "0")


def test_the_entrypoint_is_the_console_script() -> None:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    scripts = config["options.entry_points"]["console_scripts"]
    assert re.search(r"^\s*azproxy\s*=\s*azproxy\.cli:main", scripts, re.MULTILINE)
    (entrypoint,) = [_exec_form(arguments) for name, arguments in _final_stage() if name == "ENTRYPOINT"]
    assert entrypoint == ["azproxy"]


def test_the_state_directory_is_a_volume() -> None:
    """The CA must outlive the container, or every client would have to trust a new one after an upgrade."""
    stage = _final_stage()
    volumes = [arguments for name, arguments in stage if name == "VOLUME"]
    assert volumes == [_env(stage)["AZPROXY_STATE_DIR"]]
    compose = (DOCKER / "compose.yaml").read_text()
    assert re.search(rf"^\s*- azproxy-state:{re.escape(volumes[0])}\b", compose, re.MULTILINE)
    assert re.search(r"^volumes:\n  azproxy-state:", compose, re.MULTILINE)


def test_the_health_check_runs_azproxy_health() -> None:
    (check,) = [arguments for name, arguments in _final_stage() if name == "HEALTHCHECK"]
    options, _, command = check.partition("CMD")
    assert "--timeout" in options
    assert _exec_form(command.strip()) == ["azproxy", "health"]


def test_uvloop_is_installed_with_azproxy_on_linux() -> None:
    """No separate install step: setup.cfg brings uvloop everywhere but Windows, and the build imports it."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    requirements = config["options"]["install_requires"]
    assert re.search(r"^\s*uvloop>=[\d.]+; sys_platform != \"win32\"", requirements, re.MULTILINE)
    assert any("import uvloop" in arguments for name, arguments in _instructions() if name == "RUN")


@pytest.mark.timeout(180)
def test_pip_install_into_a_fresh_virtualenv(tmp_path: Path) -> None:
    """What the image's build does, from only what it copies: a plain install, then the console script.
    Slow (it resolves and installs every dependency); the build copy keeps the work tree free of build files."""
    source = tmp_path / "src"
    for copied in _copy_sources():
        origin = ROOT / copied
        if origin.is_dir():
            shutil.copytree(origin, source / copied, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(origin, source / copied)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=60)
    subprocess.run(
        [venv / "bin/python", "-m", "pip", "install", "--quiet", str(source)],
        check=True,
        timeout=150,
        capture_output=True,
    )
    result = subprocess.run(
        [venv / "bin/azproxy", "--help"], check=True, timeout=30, capture_output=True, text=True
    )
    for command in ("serve", "check", "health", "ca"):
        assert command in result.stdout
    subprocess.run([venv / "bin/python", "-c", "import uvloop"], check=True, timeout=30)


def _unit_with_installed_azproxy(tmp_path: Path) -> Path:
    """The unit as `make install-service` leaves it, but starting the azproxy installed here (verify wants a
    real executable)."""
    installed = Path(sys.executable).parent / "azproxy"
    assert installed.is_file()
    unit = tmp_path / "azproxy.service"
    text = (DOCKER / "azproxy.service").read_text()
    unit.write_text(text.replace("ExecStart=/opt/azproxy/bin/azproxy", f"ExecStart={installed}"))
    return unit


def test_the_unit_waits_for_readiness_and_is_sandboxed() -> None:
    lines = set((DOCKER / "azproxy.service").read_text().splitlines())
    for directive in (
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=30",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "UMask=0077",
        "SystemCallFilter=@system-service",
        "SystemCallErrorNumber=EPERM",
        "CapabilityBoundingSet=",
        "StateDirectory=azproxy",
        "Environment=AZPROXY_STATE_DIR=/var/lib/azproxy",
    ):
        assert directive in lines, directive


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = _unit_with_installed_azproxy(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert "azproxy.service" not in result.stderr, result.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_security_rates_the_unit_ok(tmp_path: Path) -> None:
    """Offline (no running systemd needed); what remains exposed is the network, which azproxy exists for."""
    unit = _unit_with_installed_azproxy(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(unit)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if "--offline" in result.stderr:
        pytest.skip("this systemd-analyze cannot rate a unit offline")
    score = re.search(r"Overall exposure level for azproxy\.service: ([\d.]+)", result.stdout)
    assert score, result.stdout + result.stderr
    assert float(score.group(1)) <= 2.0
