"""Settings: defaults, .env, environment, flags, and start-up errors that name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest
from yarl import URL

from azproxy.cli import main
from azproxy.config import ConfigError, Mode, load_settings, read_sources

ENDPOINT = {"AZURE_OPENAI_ENDPOINT": "https://res.openai.azure.com/"}


def test_defaults() -> None:
    settings = load_settings(ENDPOINT)
    assert str(settings.address) == "0.0.0.0:8080"
    assert settings.mode is Mode.AZURE
    assert settings.azure_endpoint == URL("https://res.openai.azure.com")
    assert settings.api_version == "2024-10-21"
    assert settings.model_map["gpt-3.5-turbo"] == "gpt-35-turbo"
    assert settings.model_map["gpt-3.5-turbo-0125"] == "gpt-35-turbo-0125"
    assert settings.azure_token is None
    assert settings.openai_base_url == URL("https://api.openai.com")
    assert settings.limits.max_body == 32 * 1024 * 1024


def test_mapper_adds_to_and_overrides_builtins() -> None:
    settings = load_settings(
        ENDPOINT | {"AZURE_OPENAI_MODEL_MAPPER": " gpt-4o = prod-4o ,gpt-3.5-turbo=my-35,"}
    )
    assert settings.model_map["gpt-4o"] == "prod-4o"
    assert settings.model_map["gpt-3.5-turbo"] == "my-35"
    assert settings.model_map["gpt-3.5-turbo-0301"] == "gpt-35-turbo-0301"


def test_token_never_shows_in_repr() -> None:
    settings = load_settings(
        ENDPOINT | {"AZURE_OPENAI_TOKEN": "very-secret-key", "AZURE_OPENAI_PROXY_ADDRESS": "127.0.0.1:8080"}
    )
    assert settings.azure_token is not None
    assert settings.azure_token.reveal() == "very-secret-key"
    assert "very-secret-key" not in repr(settings)
    assert "very-secret-key" not in str(settings.azure_token)


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        ({"AZURE_OPENAI_MODEL_MAPPER": "gpt-4o"}, "AZURE_OPENAI_MODEL_MAPPER: entry 'gpt-4o'"),
        ({"AZURE_OPENAI_MODEL_MAPPER": "a=b,=c"}, "'=c'"),
        ({"AZURE_OPENAI_PROXY_ADDRESS": "0.0.0.0:70000"}, "AZURE_OPENAI_PROXY_ADDRESS: port '70000'"),
        ({"AZURE_OPENAI_PROXY_ADDRESS": "localhost"}, "AZURE_OPENAI_PROXY_ADDRESS"),
        ({"AZURE_OPENAI_PROXY_MODE": "gcp"}, "AZURE_OPENAI_PROXY_MODE"),
        ({"AZURE_OPENAI_ENDPOINT": "res.openai.azure.com"}, "AZURE_OPENAI_ENDPOINT"),
        ({"AZURE_OPENAI_ENDPOINT": "ftp://res"}, "AZURE_OPENAI_ENDPOINT"),
        ({"AZURE_OPENAI_ENDPOINT": ""}, "AZURE_OPENAI_ENDPOINT is required"),
        ({"AZPROXY_MAX_BODY": "lots"}, "AZPROXY_MAX_BODY"),
        ({"AZPROXY_READ_TIMEOUT": "-1"}, "AZPROXY_READ_TIMEOUT"),
        ({"AZURE_OPENAI_APIVERSION": "2024-10-21&x=1"}, "AZURE_OPENAI_APIVERSION"),
        ({"AZPROXY_APIVERSION_OVERRIDES": "responses"}, "AZPROXY_APIVERSION_OVERRIDES"),
        ({"AZPROXY_APIVERSION_OVERRIDES": "chat=2024-10-21"}, "unknown operation 'chat'"),
        ({"AZPROXY_AZURE_API": "v2"}, "AZPROXY_AZURE_API"),
        ({"AZPROXY_RESPONSE_SHAPE": "gcp"}, "AZPROXY_RESPONSE_SHAPE"),
        ({"AZPROXY_AUTH": "password"}, "AZPROXY_AUTH"),
        ({"AZPROXY_AUTH": "entra", "AZURE_OPENAI_PROXY_MODE": "openai"}, "AZPROXY_AUTH=entra"),
        ({"AZPROXY_TUNNEL_ALLOW": "host:99999"}, "AZPROXY_TUNNEL_ALLOW"),
        ({"AZPROXY_PROXY_AUTH": "nopassword"}, "AZPROXY_PROXY_AUTH"),
        ({"AZPROXY_INTERCEPT_HOSTS": "bad host"}, "AZPROXY_INTERCEPT_HOSTS"),
        ({"AZPROXY_TLS_CERT": "/nonexistent.pem"}, "AZPROXY_TLS_CERT"),
    ],
)
def test_bad_values_name_the_variable(variables: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace("(", r"\(")):
        load_settings(ENDPOINT | variables)


def test_openai_mode_needs_no_endpoint() -> None:
    assert load_settings({"AZURE_OPENAI_PROXY_MODE": "openai"}).mode is Mode.OPENAI


def test_address_forms() -> None:
    assert str(load_settings(ENDPOINT | {"AZURE_OPENAI_PROXY_ADDRESS": ":9000"}).address) == "0.0.0.0:9000"
    assert str(load_settings(ENDPOINT | {"AZURE_OPENAI_PROXY_ADDRESS": "[::1]:9000"}).address) == "[::1]:9000"


def test_sources_rise_from_dotenv_to_environment_to_flags(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "AZURE_OPENAI_ENDPOINT=https://from-dotenv.openai.azure.com\n"
        "AZURE_OPENAI_APIVERSION=2024-06-01\nAZURE_OPENAI_MODEL_MAPPER=gpt-4o=dotenv-4o\n"
    )
    environ = {"AZURE_OPENAI_APIVERSION": "2024-02-01", "AZURE_OPENAI_MODEL_MAPPER": "gpt-4o=env-4o"}
    merged = read_sources(environ, {"model_mapper": "gpt-4o=flag-4o", "address": None}, cwd=tmp_path)
    settings = load_settings(merged)
    assert settings.azure_endpoint == URL("https://from-dotenv.openai.azure.com")
    assert settings.api_version == "2024-02-01"
    assert settings.model_map["gpt-4o"] == "flag-4o"


def test_env_file_can_be_named(tmp_path: Path) -> None:
    named = tmp_path / "azproxy.env"
    named.write_text("AZURE_OPENAI_ENDPOINT=https://named.openai.azure.com\n")
    settings = load_settings(read_sources({"AZPROXY_ENV_FILE": str(named)}, cwd=tmp_path))
    assert settings.azure_endpoint == URL("https://named.openai.azure.com")
    with pytest.raises(ConfigError, match="AZPROXY_ENV_FILE"):
        read_sources({"AZPROXY_ENV_FILE": str(tmp_path / "missing.env")}, cwd=tmp_path)


def test_serve_without_endpoint_exits_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AZURE_OPENAI_ENDPOINT", raising=False)
    monkeypatch.delenv("AZURE_OPENAI_PROXY_MODE", raising=False)
    assert main(["serve"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "AZURE_OPENAI_ENDPOINT" in error
