"""azproxy: OpenAI-compatible reverse and forward proxy in front of Azure OpenAI."""

__version__ = "0.1.0"
