"""Vector stores kept in memory (Assistants v2 file search): stores, their files, and file batches.

Files come from the uploaded-files store. A file batch starts `in_progress` and completes when first read, so
it can still be cancelled right after it is created.
"""

from __future__ import annotations

from .calls import Answer, Call, Endpoint, bad_request, json_answer, not_found
from .objects import Obj, deleted, find, new_id, now, page


class VectorStores:
    """Vector stores by id, their files by store, file batches by id."""

    def __init__(self, files: dict[str, Obj]) -> None:
        self.files = files
        self.vector_stores: dict[str, Obj] = {}
        self.store_files: dict[str, dict[str, Obj]] = {}
        self.file_batches: dict[str, Obj] = {}

    def endpoints(self) -> list[Endpoint]:
        store = "vector_stores/{store_id}"
        batch = f"{store}/file_batches/{{batch_id}}"
        return [
            Endpoint("POST", "vector_stores", "vector_stores", self.create_store),
            Endpoint("GET", "vector_stores", "vector_stores", self.list_stores),
            Endpoint("GET", store, "vector_stores", lambda call: json_answer(self._store(call))),
            Endpoint("POST", store, "vector_stores", self.modify_store),
            Endpoint("DELETE", store, "vector_stores", self.delete_store),
            Endpoint("POST", f"{store}/files", "vector_stores", self.add_store_file),
            Endpoint("GET", f"{store}/files", "vector_stores", self.list_store_files),
            Endpoint("GET", f"{store}/files/{{file_id}}", "vector_stores", self.get_store_file),
            Endpoint("DELETE", f"{store}/files/{{file_id}}", "vector_stores", self.delete_store_file),
            Endpoint("POST", f"{store}/file_batches", "vector_stores", self.create_file_batch),
            Endpoint("GET", batch, "vector_stores", self.get_file_batch),
            Endpoint("POST", f"{batch}/cancel", "vector_stores", self.cancel_file_batch),
            Endpoint("GET", f"{batch}/files", "vector_stores", self.list_file_batch_files),
        ]

    def create_store(self, call: Call) -> Answer:
        body = call.json()
        store: Obj = {
            "id": new_id("vs_"),
            "object": "vector_store",
            "created_at": now(),
            "name": body.get("name"),
        }
        store |= {"usage_bytes": 0, "status": "completed", "expires_after": body.get("expires_after")}
        store |= {"expires_at": None, "last_active_at": now(), "metadata": body.get("metadata") or {}}
        self.vector_stores[store["id"]] = store
        self.store_files[store["id"]] = {}
        for file_id in body.get("file_ids") or []:
            self._add_store_file(store, file_id)
        return json_answer(self._counted(store))

    def list_stores(self, call: Call) -> Answer:
        stores = [self._counted(store) for store in self.vector_stores.values()]
        return json_answer(page(stores, call.query))

    def modify_store(self, call: Call) -> Answer:
        store, body = self._store(call), call.json()
        store |= {key: body[key] for key in ("name", "metadata", "expires_after") if key in body}
        return json_answer(store)

    def delete_store(self, call: Call) -> Answer:
        store = self._store(call)
        del self.vector_stores[store["id"]], self.store_files[store["id"]]
        return json_answer(deleted(store["id"], "vector_store.deleted"))

    def _store(self, call: Call) -> Obj:
        return self._counted(find(self.vector_stores, "Vector store", call.arg("store_id")))

    def _counted(self, store: Obj) -> Obj:
        files = self.store_files[store["id"]].values()
        store["file_counts"] = {"in_progress": 0, "completed": len(files), "failed": 0, "cancelled": 0}
        store["file_counts"]["total"] = len(files)
        store["usage_bytes"] = sum(f["usage_bytes"] for f in files)
        return store

    def add_store_file(self, call: Call) -> Answer:
        return json_answer(self._add_store_file(self._store(call), call.json().get("file_id")))

    def _add_store_file(self, store: Obj, file_id: object) -> Obj:
        file = find(self.files, "File", str(file_id))
        entry: Obj = {
            "id": file["id"],
            "object": "vector_store.file",
            "created_at": now(),
            "vector_store_id": store["id"],
        }
        entry |= {"status": "completed", "usage_bytes": file["bytes"], "last_error": None, "attributes": {}}
        entry["chunking_strategy"] = {
            "type": "static",
            "static": {"max_chunk_size_tokens": 800, "chunk_overlap_tokens": 400},
        }
        self.store_files[store["id"]][file["id"]] = entry
        return entry

    def list_store_files(self, call: Call) -> Answer:
        return json_answer(page(list(self.store_files[self._store(call)["id"]].values()), call.query))

    def get_store_file(self, call: Call) -> Answer:
        return json_answer(find(self.store_files[self._store(call)["id"]], "File", call.arg("file_id")))

    def delete_store_file(self, call: Call) -> Answer:
        files = self.store_files[self._store(call)["id"]]
        entry = find(files, "File", call.arg("file_id"))
        del files[entry["id"]]
        return json_answer(deleted(entry["id"], "vector_store.file.deleted"))

    def create_file_batch(self, call: Call) -> Answer:
        store, file_ids = self._store(call), call.json().get("file_ids") or []
        entries = [self._add_store_file(store, file_id) for file_id in file_ids]
        batch: Obj = {"id": new_id("vsfb_"), "object": "vector_store.files_batch", "created_at": now()}
        batch |= {
            "vector_store_id": store["id"],
            "status": "in_progress",
            "file_ids": [e["id"] for e in entries],
        }
        batch["file_counts"] = {"in_progress": len(entries), "completed": 0, "failed": 0, "cancelled": 0}
        batch["file_counts"]["total"] = len(entries)
        self.file_batches[batch["id"]] = batch
        return json_answer(_public(batch))

    def get_file_batch(self, call: Call) -> Answer:
        batch = self._file_batch(call)
        if batch["status"] == "in_progress":
            counts = batch["file_counts"]
            counts |= {"completed": counts["in_progress"], "in_progress": 0}
            batch["status"] = "completed"
        return json_answer(_public(batch))

    def cancel_file_batch(self, call: Call) -> Answer:
        batch = self._file_batch(call)
        if batch["status"] != "in_progress":
            raise bad_request(f"Cannot cancel a batch with status {batch['status']}.")
        counts = batch["file_counts"]
        counts |= {"cancelled": counts["in_progress"], "in_progress": 0}
        batch["status"] = "cancelled"
        return json_answer(_public(batch))

    def list_file_batch_files(self, call: Call) -> Answer:
        batch = self._file_batch(call)
        files = self.store_files[batch["vector_store_id"]]
        return json_answer(page([files[i] for i in batch["file_ids"] if i in files], call.query))

    def _file_batch(self, call: Call) -> Obj:
        batch = find(self.file_batches, "File batch", call.arg("batch_id"))
        if batch["vector_store_id"] != self._store(call)["id"]:
            raise not_found("File batch", batch["id"])
        return batch


def _public(batch: Obj) -> Obj:
    """A file batch as answered; its file ids are kept for listing its files only."""
    return {key: value for key, value in batch.items() if key != "file_ids"}
