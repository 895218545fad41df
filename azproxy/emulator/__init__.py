"""The built-in Azure OpenAI emulator, used by the tests, `azproxy demo` and the benchmark."""

from .app import Emulator, ReceivedRequest
from .deployments import DEFAULT_DEPLOYMENTS, Deployment
from .multipart import Form, UploadedFile
from .versions import API_VERSIONS

__all__ = [
    "API_VERSIONS",
    "DEFAULT_DEPLOYMENTS",
    "Deployment",
    "Emulator",
    "Form",
    "ReceivedRequest",
    "UploadedFile",
]
