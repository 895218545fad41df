"""Settings: defaults, the config file, .env, environment, flags, start-up errors that name the setting, and
the README's tables checked against the settings table."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from pathlib import Path
from typing import Any

import pytest
from yarl import URL

from azproxy.cli import main
from azproxy.clients import short_hash
from azproxy.config import (
    ConfigError,
    Limits,
    Mode,
    Secret,
    Settings,
    load_settings,
    read_sources,
    unknown_variables,
)
from azproxy.settings_table import BY_ENV, BY_KEY, SETTINGS

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


README = Path(__file__).parents[1] / "README.md"
EXAMPLE_TOML = Path(__file__).parents[1] / "docker" / "azproxy.example.toml"


def _readme_configuration_rows() -> dict[str, tuple[str, str, str, str]]:
    """The README's Configuration tables, by variable: (variable cell, file key, default, meaning)."""
    section = README.read_text().split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| `"):
            cells = tuple(cell.strip() for cell in line.strip().strip("|").split(" | "))
            assert len(cells) == 4, line
            variable = cells[0].split("`")[1]
            assert variable not in rows, f"{variable} is listed twice"
            rows[variable] = (cells[0], cells[1], cells[2], cells[3])
    return rows


def test_readme_configuration_tables_match_the_settings_table() -> None:
    documented = _readme_configuration_rows()
    assert set(documented) == set(BY_ENV), "variables only in the README, or only in the table"
    for row in SETTINGS:
        variable = f"`{row.env}`" + (f", `{row.flag}`" if row.flag else "")
        key = f"`{row.key}`" if row.key else "(environment only)"
        assert documented[row.env] == (variable, key, row.documented_default, row.meaning)


def test_every_row_lands_in_a_settings_field() -> None:
    assert len(BY_ENV) == len(SETTINGS)
    assert len(BY_KEY) == len([row for row in SETTINGS if row.key])
    for row in SETTINGS:
        if row.field is None:
            continue
        holder: Any = Settings()
        *sections, name = row.field.split(".")
        for section in sections:
            holder = getattr(holder, section)
        assert name in {f.name for f in dataclasses.fields(holder)}, row.env
        if row.default is not None:
            assert getattr(holder, name) == row.parser.read(row.default), row.env


def test_new_settings_defaults() -> None:
    settings = load_settings(ENDPOINT)
    assert settings.stream_usage is True
    assert settings.limits.body_timeout == 30.0
    assert settings.limits.body_min_rate == 16384
    assert settings.limits.max_buffered == 256 * 1024 * 1024
    assert settings.limits.max_connections_per_ip == 1000
    assert settings.access.trusted_proxies == ()
    assert settings.access.auth_failure_limit == 5
    assert settings.access.cors_origins is None
    assert settings.access.allowed_hosts == ()


@pytest.mark.parametrize(
    ("max_connections", "per_ip"), [("50", 5), ("5", 1), ("10000", 1000), ("12345", 1234)]
)
def test_connections_per_ip_default_to_a_tenth(max_connections: str, per_ip: int) -> None:
    settings = load_settings(ENDPOINT | {"AZPROXY_MAX_CONNECTIONS": max_connections})
    assert settings.limits.max_connections_per_ip == per_ip
    assert Limits(max_connections=int(max_connections)).max_connections_per_ip == per_ip


def test_new_settings_parse() -> None:
    settings = load_settings(
        ENDPOINT
        | {
            "AZPROXY_STREAM_USAGE": "false",
            "AZPROXY_BODY_TIMEOUT": "2.5",
            "AZPROXY_BODY_MIN_RATE": "1K",
            "AZPROXY_MAX_CONNECTIONS_PER_IP": "7",
            "AZPROXY_MAX_BUFFERED": "1G",
            "AZPROXY_TRUSTED_PROXIES": "10.0.0.0/8, 192.168.1.7,::1",
            "AZPROXY_AUTH_FAILURE_LIMIT": "0",
            "AZPROXY_CORS_ORIGINS": "https://Chat.example.com/, http://localhost:3000,*",
            "AZPROXY_ALLOWED_HOSTS": "Azproxy.Example.com.,[::1],10.0.0.5",
        }
    )
    assert settings.stream_usage is False
    assert settings.limits.body_timeout == 2.5
    assert settings.limits.body_min_rate == 1024
    assert settings.limits.max_connections_per_ip == 7
    assert settings.limits.max_buffered == 1024**3
    assert settings.access.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.168.1.7/32"),
        ipaddress.ip_network("::1/128"),
    )
    assert settings.access.auth_failure_limit == 0
    assert settings.access.cors_origins == ("https://chat.example.com", "http://localhost:3000", "*")
    assert settings.access.allowed_hosts == ("azproxy.example.com", "::1", "10.0.0.5")


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        ({"AZPROXY_STREAM_USAGE": "maybe"}, "AZPROXY_STREAM_USAGE: 'maybe' is not true or false"),
        ({"AZPROXY_BODY_TIMEOUT": "0"}, "AZPROXY_BODY_TIMEOUT"),
        ({"AZPROXY_BODY_MIN_RATE": "fast"}, "AZPROXY_BODY_MIN_RATE"),
        ({"AZPROXY_MAX_CONNECTIONS_PER_IP": "0"}, "AZPROXY_MAX_CONNECTIONS_PER_IP"),
        ({"AZPROXY_MAX_BUFFERED": "-1"}, "AZPROXY_MAX_BUFFERED"),
        ({"AZPROXY_TRUSTED_PROXIES": "10.0.0.1/8"}, "AZPROXY_TRUSTED_PROXIES: 10.0.0.1/8 has host bits set"),
        ({"AZPROXY_TRUSTED_PROXIES": "proxy.local"}, "AZPROXY_TRUSTED_PROXIES"),
        ({"AZPROXY_AUTH_FAILURE_LIMIT": "-1"}, "AZPROXY_AUTH_FAILURE_LIMIT"),
        ({"AZPROXY_CORS_ORIGINS": "chat.example.com"}, "AZPROXY_CORS_ORIGINS: 'chat.example.com'"),
        ({"AZPROXY_CORS_ORIGINS": "https://chat.example.com/app"}, "AZPROXY_CORS_ORIGINS"),
        ({"AZPROXY_ALLOWED_HOSTS": "azproxy.example.com:8080"}, "AZPROXY_ALLOWED_HOSTS"),
    ],
)
def test_bad_new_values_name_the_variable(variables: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_settings(ENDPOINT | variables)


def test_unknown_variables_are_the_typos() -> None:
    source = {
        "AZPROXY_MAX_BDY": "1",
        "AZPROXY_MAX_BODY": "1",
        "AZPROXY_CONFIG": "x",
        "AZURE_OPENAI_KEY": "used by other tools",
        "PATH": "/bin",
        "AZPROXY_LOGLEVEL": "DEBUG",
    }
    assert unknown_variables(source) == ["AZPROXY_LOGLEVEL", "AZPROXY_MAX_BDY"]


def test_serve_warns_once_about_unknown_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", "https://res.openai.azure.com")
    monkeypatch.setenv("AZPROXY_MAX_BDY", "1M")
    served: list[Settings] = []
    monkeypatch.setattr("azproxy.cli.run", lambda settings, _notifier: served.append(settings))
    assert main(["serve", "--address", "127.0.0.1:9999"]) == 0
    assert str(served[0].address) == "127.0.0.1:9999"
    warnings = [r.getMessage() for r in caplog.records if "AZPROXY_MAX_BDY" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith("ignoring variables no setting reads (typos?): ")


def _config(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "azproxy.toml"
    path.write_text(text)
    return {"AZPROXY_CONFIG": str(path)}


CONFIG = """\
[server]
address = "127.0.0.1:9000"
access_log = true

[azure]
endpoint = "https://from-file.openai.azure.com"
model_mapper = { "gpt-4o" = "file-4o" }

[limits]
max_body = "1M"
max_connections = 40
header_timeout = 2.5

[forward]
intercept_hosts = ["api.openai.com", "api.example.com"]
"""


def test_config_file_values(tmp_path: Path) -> None:
    settings = load_settings(_config(tmp_path, CONFIG))
    assert str(settings.address) == "127.0.0.1:9000"
    assert settings.access_log is True
    assert settings.azure_endpoint == URL("https://from-file.openai.azure.com")
    assert settings.model_map["gpt-4o"] == "file-4o"
    assert settings.model_map["gpt-3.5-turbo"] == "gpt-35-turbo"
    assert settings.limits.max_body == 1024 * 1024
    assert settings.limits.header_timeout == 2.5
    assert settings.limits.max_connections_per_ip == 4
    assert settings.forward.intercept_hosts == ("api.openai.com", "api.example.com")


def test_environment_and_dotenv_override_the_file(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "AZPROXY_MAX_BODY=2K\n" + "".join(f"{k}={v}\n" for k, v in _config(tmp_path, CONFIG).items())
    )
    environ = {"AZURE_OPENAI_PROXY_ADDRESS": "127.0.0.1:9100", "AZPROXY_ACCESS_LOG": ""}
    settings = load_settings(read_sources(environ, cwd=tmp_path))
    assert str(settings.address) == "127.0.0.1:9100"
    assert settings.limits.max_body == 2048
    assert settings.access_log is True, "an empty variable is unset, so the file's value stands"
    assert settings.azure_endpoint == URL("https://from-file.openai.azure.com")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[limits]\nmax_body = 1\nmax_bdy = 2\n",
            "azproxy.toml:3: [limits] max_bdy: unknown key (known in [limits]: max_body, ",
        ),
        ("limits.max_bdy = 2\n", "azproxy.toml:1: [limits] max_bdy: unknown key"),
        (
            "[limits]\nmax_body = true\n",
            "azproxy.toml:2: [limits] max_body: expected an integer or a string, not a boolean",
        ),
        (
            '[server]\n\naccess_log = "yes"\n',
            "azproxy.toml:3: [server] access_log: expected a boolean, not a string",
        ),
        (
            '[forward]\nintercept_hosts = ["a.com", 1]\n',
            "azproxy.toml:2: [forward] intercept_hosts: every entry must be a string",
        ),
        (
            '[limits]\nmax_body = "lots"\n',
            "azproxy.toml:2: [limits] max_body: 'lots' is not a positive size",
        ),
        (
            "[timeouts]\nread = -1\n",
            "azproxy.toml:2: [timeouts] read: '-1' is not a positive number of seconds",
        ),
        ('[backend]\nname = "east"\n', "azproxy.toml: 'backend': must be an array of tables: [[backend]]"),
        (
            '[[backends]]\nname = "east"\n',
            "azproxy.toml:1: 'backends': not a settings table (known: [server], ",
        ),
        ("max_body = 1\n", "azproxy.toml:1: 'max_body': settings go in their table: [limits] max_body"),
        ("[limits\n", "azproxy.toml: not valid TOML: "),
        (
            '[azure]\ntoken = "0123456789abcdef"\n',
            "azproxy.toml:2: [azure] token: give env:NAME or file:/path here",
        ),
        ('[[client]]\nname = "a"\nkey = "env:NOT_SET_ANYWHERE"\n', "azproxy.toml: [[client]]: client 'a': "),
    ],
)
def test_config_file_errors_name_file_line_table_and_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(_config(tmp_path, text))
    error = str(caught.value)
    assert "\n" not in error
    assert error.startswith(str(tmp_path / "azproxy.toml")[: -len("azproxy.toml")])
    assert message in error
    assert "0123456789abcdef" not in error


def test_missing_config_file_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="AZPROXY_CONFIG: cannot read"):
        load_settings({"AZPROXY_CONFIG": str(tmp_path / "missing.toml")})


def test_config_file_secrets_by_reference_and_clients_merged(tmp_path: Path) -> None:
    (tmp_path / "azure-key").write_text("key-from-a-file\n")
    source = _config(
        tmp_path,
        '[azure]\nendpoint = "https://res.openai.azure.com"\ntoken = "file:azure-key"\n'
        '[forward]\nproxy_auth = "env:PROXY_CREDENTIALS"\n'
        '[[client]]\nname = "web-ui"\nkey = "env:WEBUI_KEY"\n',
    ) | {
        "PROXY_CREDENTIALS": "user:pass",
        "WEBUI_KEY": "webui-secret-0123",
        "AZPROXY_API_KEYS": "k1-long-enough-01",
    }
    settings = load_settings(source)
    assert settings.azure_token == Secret("key-from-a-file")
    assert settings.forward.proxy_auth == Secret("user:pass")
    assert [client.name for client in settings.access.clients] == [
        f"key-{short_hash('k1-long-enough-01')}",
        "web-ui",
    ]


def test_client_names_are_unique_across_sources(tmp_path: Path) -> None:
    clients_file = tmp_path / "clients.toml"
    clients_file.write_text('[[client]]\nname = "web-ui"\nkey = "env:KEY_A"\n')
    source = _config(tmp_path, '[[client]]\nname = "web-ui"\nkey = "env:KEY_B"\n') | {
        "AZURE_OPENAI_ENDPOINT": "https://res.openai.azure.com",
        "AZURE_OPENAI_TOKEN": "t",
        "AZPROXY_CLIENTS_FILE": str(clients_file),
        "KEY_A": "a-long-enough-key-01",
        "KEY_B": "b-long-enough-key-02",
    }
    with pytest.raises(ConfigError, match="repeated: \\['web-ui'\\]"):
        load_settings(source)


def test_example_config_file_loads_and_names_only_known_keys() -> None:
    settings = load_settings({"AZPROXY_CONFIG": str(EXAMPLE_TOML)})
    assert settings.azure_endpoint == URL("https://YOUR-RESOURCE.openai.azure.com")
    table, shown = "", []
    for line in EXAMPLE_TOML.read_text().splitlines():
        header = re.fullmatch(r"#? ?\[\[?(\w+)\]\]?", line)
        setting = re.match(r"#? ?(\w+) = ", line)
        if header:
            table = header[1]
        elif setting and table not in ("client", "backend", "model"):
            shown.append(f"{table}.{setting[1]}")
    assert sorted(shown) == sorted(BY_KEY), "the example shows every key of the settings table, once"


def test_ca_command_reads_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AZPROXY_STATE_DIR", raising=False)
    monkeypatch.setenv(
        "AZPROXY_CONFIG",
        _config(tmp_path, f'[server]\nstate_dir = "{tmp_path / "state"}"\n')["AZPROXY_CONFIG"],
    )
    assert main(["ca"]) == 0
    assert str(tmp_path / "state") in capsys.readouterr().out
