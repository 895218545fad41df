"""The built-in Azure OpenAI emulator, used by the tests, `azproxy demo` and the benchmark."""

from .app import API_VERSIONS, DEFAULT_DEPLOYMENTS, Deployment, Emulator, ReceivedRequest

__all__ = ["API_VERSIONS", "DEFAULT_DEPLOYMENTS", "Deployment", "Emulator", "ReceivedRequest"]
