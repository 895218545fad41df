"""Which api-version each operation answers to, as on Azure: a version below an operation's minimum is 404."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

#: The data-plane versions the emulator accepts, as Azure does today; retired previews get 404 like Azure's.
API_VERSIONS: Final = frozenset(
    {
        "2023-05-15",
        "2024-02-01",
        "2024-06-01",
        "2024-10-21",
        "2024-08-01-preview",
        "2024-09-01-preview",
        "2024-10-01-preview",
        "2024-12-01-preview",
        "2025-01-01-preview",
        "2025-02-01-preview",
        "2025-03-01-preview",
        "2025-04-01-preview",
    }
)

#: The only version that still lists deployments on the data plane (`GET /openai/deployments`).
DEPLOYMENTS_LISTING_VERSION: Final = "2022-12-01"

#: What the v1 surface (`/openai/v1/...`) takes instead of a dated version: nothing, `v1` or `preview`.
V1_VERSIONS: Final = frozenset({"v1", "preview"})


@dataclass(frozen=True, slots=True)
class Minimum:
    """The first date an operation appeared, and whether only previews have it (assistants never went GA)."""

    since: str
    preview_only: bool = False

    def allows(self, version: str) -> bool:
        return version[:10] >= self.since and (not self.preview_only or version.endswith("-preview"))


#: Per operation (the deployment operation, or the first path segment of a resource operation). The dates are
#: the first GA or preview spec that carries the operation in Azure/azure-rest-api-specs (inference and
#: authoring); "batches" from 2024-07-01-preview therefore also takes the 2024-10-21 GA, not 2024-06-01.
MINIMUMS: Final = {
    "chat/completions": Minimum("2023-05-15"),
    "completions": Minimum("2023-05-15"),
    "embeddings": Minimum("2023-05-15"),
    "files": Minimum("2023-05-15"),
    "models": Minimum("2023-05-15"),
    "audio/transcriptions": Minimum("2024-02-01"),
    "audio/translations": Minimum("2024-02-01"),
    "images/generations": Minimum("2024-02-01"),
    "fine_tuning": Minimum("2024-02-01"),
    "fine_tuning/checkpoints": Minimum("2024-06-01"),
    "audio/speech": Minimum("2024-06-01"),
    "batches": Minimum("2024-07-01"),
    "assistants": Minimum("2024-05-01", preview_only=True),
    "threads": Minimum("2024-05-01", preview_only=True),
    "vector_stores": Minimum("2024-05-01", preview_only=True),
    "realtime": Minimum("2024-10-01", preview_only=True),
    "responses": Minimum("2025-03-01", preview_only=True),
    "images/edits": Minimum("2025-04-01"),
    "images/variations": Minimum("2025-04-01"),
}
_ANY: Final = Minimum("0000-00-00")


def classic_allows(operation: str, versions: list[str]) -> bool:
    """Whether `/openai/...?api-version=V` reaches `operation`: exactly one known version, at or above its minimum."""
    if len(versions) != 1:
        return False
    (version,) = versions
    if operation == "deployments":
        return version == DEPLOYMENTS_LISTING_VERSION
    return version in API_VERSIONS and MINIMUMS.get(operation, _ANY).allows(version)


def v1_allows(versions: list[str]) -> bool:
    return not versions or (len(versions) == 1 and versions[0] in V1_VERSIONS)
