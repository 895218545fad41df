"""The emulator's deployments and what each kind of model can do, the way Azure refuses the rest."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from .calls import AzureError

#: The operations a deployment answers, by the kind of model behind it. Body-named uses (Responses, assistants,
#: runs) count as operations of the model too, so an embedding deployment named in a Responses body is refused.
OPERATIONS_BY_KIND: Final = {
    "chat": frozenset({"chat/completions", "responses", "assistants"}),
    "completion": frozenset({"completions"}),
    "embedding": frozenset({"embeddings"}),
    "image": frozenset({"images/generations", "images/edits", "images/variations"}),
    "transcription": frozenset({"audio/transcriptions", "audio/translations"}),
    "speech": frozenset({"audio/speech"}),
    "realtime": frozenset({"realtime"}),
}


@dataclass(frozen=True, slots=True)
class Deployment:
    """A deployment: its name, the Azure model name answers report, and which operations it can do."""

    name: str
    model: str
    kind: str = "chat"

    @property
    def reasoning(self) -> bool:
        """o-series and gpt-5 models refuse `max_tokens` and sampling parameters (Azure's reasoning-models guide)."""
        return _REASONING.match(self.model) is not None

    @property
    def router(self) -> bool:
        """model-router picks a model per request and names it in the answer (Azure's model-router concept page)."""
        return self.model.startswith("model-router")


#: Model names of the reasoning families: o1, o3, o3-mini, o4-mini..., gpt-5, gpt-5-mini, gpt-5.1...
_REASONING: Final = re.compile(r"(o\d+|gpt-5)([-.]|$)")
#: The models the emulated model-router hands requests to, in turn, so answers name varying models.
ROUTED_MODELS: Final = ("gpt-4.1-mini-2025-04-14", "gpt-5-nano-2025-08-07", "o4-mini-2025-04-16")


DEFAULT_DEPLOYMENTS: Final = (
    Deployment("gpt-35-turbo", "gpt-35-turbo"),
    Deployment("gpt-35-turbo-instruct", "gpt-35-turbo-instruct", "completion"),
    Deployment("gpt-4o", "gpt-4o-2024-08-06"),
    Deployment("gpt-4o-mini", "gpt-4o-mini-2024-07-18"),
    Deployment("gpt-4.1-mini", "gpt-4.1-mini-2025-04-14"),
    Deployment("text-embedding-3-small", "text-embedding-3-small", "embedding"),
    Deployment("text-embedding-ada-002", "text-embedding-ada-002", "embedding"),
    Deployment("dall-e-3", "dall-e-3", "image"),
    Deployment("whisper", "whisper", "transcription"),
    Deployment("tts", "tts", "speech"),
    Deployment("gpt-4o-realtime-preview", "gpt-4o-realtime-preview-2024-12-17", "realtime"),
    Deployment("o3-mini", "o3-mini-2025-01-31"),
    Deployment("o4-mini", "o4-mini-2025-04-16"),
    Deployment("gpt-5", "gpt-5-2025-08-07"),
    Deployment("model-router", "model-router-2025-11-18"),
)


class Catalog:
    """Deployments by name, looked up as Azure looks them up.

    Unknown → 404 DeploymentNotFound; a model that cannot do the operation → 400 OperationNotSupported.
    """

    def __init__(self, deployments: Iterable[Deployment]) -> None:
        self.by_name = {d.name: d for d in deployments}
        self._routed = itertools.cycle(ROUTED_MODELS)

    def serving_model(self, deployment: Deployment) -> str:
        """The model an answer names: the deployment's, or for model-router the one it routed this request to."""
        return next(self._routed) if deployment.router else deployment.model

    def resolve(self, name: object, operation: str) -> Deployment:
        deployment = self.by_name.get(name) if isinstance(name, str) else None
        if deployment is None:
            raise AzureError(
                404,
                "DeploymentNotFound",
                "The API deployment for this resource does not exist. "
                "If you created the deployment within the last 5 minutes, please wait a moment "
                "and try again.",
            )
        if operation not in OPERATIONS_BY_KIND.get(deployment.kind, ()):
            raise AzureError(
                400,
                "OperationNotSupported",
                f"The {operation} operation does not work with the "
                f"specified model, {deployment.model}. Please choose different model and try again.",
            )
        return deployment
