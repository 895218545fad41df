"""nginx configurations of the bench: the non-streamed mock upstream, and nginx as the proxy to beat."""

from __future__ import annotations

import json
from pathlib import Path

from upstream import CHAT

API_VERSION = "2024-10-21"
DEPLOYMENT = "gpt-35-turbo"

COMMON = """
pid {dir}/{name}.pid;
error_log {dir}/{name}-error.log warn;
worker_rlimit_nofile 200000;
events {{ worker_connections 65536; multi_accept on; }}
http {{
  access_log off;
  client_body_temp_path {dir}/{name}-body;
  proxy_temp_path {dir}/{name}-proxy;
  fastcgi_temp_path {dir}/{name}-fastcgi;
  uwsgi_temp_path {dir}/{name}-uwsgi;
  scgi_temp_path {dir}/{name}-scgi;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
{http}
}}
"""

MOCK = """
  default_type application/json;
  map $http_api_key $no_key {{ "" 1; default 0; }}
  server {{
    listen 127.0.0.1:{port} reuseport backlog=8192;
    location ~ ^/openai/deployments/[^/]+/chat/completions$ {{
      if ($no_key) {{ return 401 '{{"error":{{"code":"401","message":"Access denied: missing api-key"}}}}'; }}
      add_header apim-request-id 6f1c0f5e-0000-4000-8000-000000000000;
      add_header x-ms-region "East US";
      return 200 '{chat}';
    }}
    location / {{ return 404 '{{"error":{{"code":"404","message":"Resource not found"}}}}'; }}
  }}
"""

# The ceiling: what a proxy that never reads the body costs. One fixed rewrite to one deployment, the
# client's Bearer key into api-key by a map, upstream keep-alive, no buffering (streams pass as they come).
PROXY = """
  upstream azure {{ server {upstream}; keepalive 1024; keepalive_requests 10000000; }}
  map $http_authorization $azure_key {{ "~^Bearer\\s+(?<k>.+)$" $k; default ""; }}
  server {{
    listen 127.0.0.1:{port} reuseport backlog=8192;
    location = /v1/chat/completions {{
      proxy_pass http://azure/openai/deployments/{deployment}/chat/completions?api-version={api};
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "";
      proxy_set_header api-key $azure_key;
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_read_timeout 300s;
    }}
  }}
"""


def write_conf(workdir: Path, name: str, workers: int | str, http: str) -> Path:
    conf = f"worker_processes {workers};\n" + COMMON.format(dir=workdir, name=name, http=http)
    path = workdir / f"{name}.conf"
    path.write_text(conf)
    return path


def mock_conf(workdir: Path, port: int, workers: int | str = 2) -> Path:
    # nginx takes the body between single quotes; the JSON has none, and `json.loads` proves it is whole.
    json.loads(CHAT)
    assert "'" not in CHAT
    return write_conf(workdir, "nginx-mock", workers, MOCK.format(port=port, chat=CHAT))


def proxy_conf(workdir: Path, port: int, upstream: str, workers: int | str = "auto") -> Path:
    http = PROXY.format(port=port, upstream=upstream, deployment=DEPLOYMENT, api=API_VERSION)
    return write_conf(workdir, "nginx-proxy", workers, http)


def argv(conf: Path) -> list[str]:
    return ["nginx", "-c", str(conf), "-g", "daemon off;"]
