"""Resource-scoped objects kept in memory: files, batches, fine-tuning jobs, and the model and deployment lists.

Long-running jobs move one step each time they are read (validating → in_progress → completed), so a client's
create → poll → result loop plays out in a few requests, and a cancel lands while the job is still running.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Final

from aiohttp import web

from . import answers
from .calls import Answer, AzureError, Call, Endpoint, bad_request, headers, json_answer
from .deployments import Catalog, Deployment
from .objects import Obj, deleted, find, new_id, now, page

FILE_PURPOSES: Final = frozenset({"fine-tune", "batch", "assistants", "user_data", "vision", "evals"})
_BATCH_STEPS: Final = {"validating": "in_progress", "in_progress": "completed", "cancelling": "cancelled"}
_JOB_STEPS: Final = {"pending": "running", "running": "succeeded"}
_MODEL_CREATED: Final = 1_700_000_000


class Resources:
    """Files, batches and fine-tuning jobs by id; `files` also backs the vector stores."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.files: dict[str, Obj] = {}
        self.contents: dict[str, bytes] = {}
        self.batches: dict[str, Obj] = {}
        self.jobs: dict[str, Obj] = {}
        self.job_events: dict[str, list[Obj]] = {}
        self.checkpoints: dict[str, list[Obj]] = {}

    def endpoints(self) -> list[Endpoint]:
        return [
            Endpoint("POST", "files", "files", self.create_file),
            Endpoint("GET", "files", "files", self.list_files),
            Endpoint("GET", "files/{file_id}", "files", lambda call: json_answer(self._file(call))),
            Endpoint("GET", "files/{file_id}/content", "files", self.file_content),
            Endpoint("DELETE", "files/{file_id}", "files", self.delete_file),
            Endpoint("POST", "batches", "batches", self.create_batch),
            Endpoint("GET", "batches", "batches", self.list_batches),
            Endpoint("GET", "batches/{batch_id}", "batches", self.get_batch),
            Endpoint("POST", "batches/{batch_id}/cancel", "batches", self.cancel_batch),
            Endpoint("POST", "fine_tuning/jobs", "fine_tuning", self.create_job),
            Endpoint("GET", "fine_tuning/jobs", "fine_tuning", self.list_jobs),
            Endpoint("GET", "fine_tuning/jobs/{job_id}", "fine_tuning", self.get_job),
            Endpoint("GET", "fine_tuning/jobs/{job_id}/events", "fine_tuning", self.job_events_page),
            Endpoint(
                "GET",
                "fine_tuning/jobs/{job_id}/checkpoints",
                "fine_tuning/checkpoints",
                self.checkpoints_page,
            ),
            Endpoint("POST", "fine_tuning/jobs/{job_id}/cancel", "fine_tuning", self.cancel_job),
            Endpoint("GET", "models", "models", self.list_models),
            Endpoint("GET", "models/{model_id}", "models", self.get_model),
            Endpoint("GET", "deployments", "deployments", self.list_deployments, v1=False),
        ]

    # files

    def create_file(self, call: Call) -> Answer:
        form = call.multipart()
        purpose, upload = form.fields.get("purpose"), form.files.get("file")
        if purpose not in FILE_PURPOSES:
            raise bad_request(f"purpose must be one of {', '.join(sorted(FILE_PURPOSES))}.", "purpose")
        if upload is None:
            raise bad_request("The file part is required.", "file")
        file = self.store_file(upload.filename, purpose, upload.content)
        return json_answer(file, status=201)

    def store_file(self, filename: str, purpose: str, content: bytes) -> Obj:
        file_id = new_id("file-")
        file: Obj = {
            "id": file_id,
            "object": "file",
            "bytes": len(content),
            "created_at": now(),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "status_details": None,
        }
        self.files[file_id] = file
        self.contents[file_id] = content
        return file

    def list_files(self, call: Call) -> Answer:
        purpose = call.query.get("purpose")
        files = [f for f in self.files.values() if purpose is None or f["purpose"] == purpose]
        return json_answer(page(files, call.query))

    def _file(self, call: Call) -> Obj:
        return find(self.files, "File", call.arg("file_id"))

    def file_content(self, call: Call) -> Answer:
        file = self._file(call)
        return web.Response(
            body=self.contents[file["id"]], content_type="application/octet-stream", headers=headers()
        )

    def delete_file(self, call: Call) -> Answer:
        file = self._file(call)
        del self.files[file["id"]], self.contents[file["id"]]
        return json_answer(deleted(file["id"], "file"))

    # batches

    def create_batch(self, call: Call) -> Answer:
        body = call.json()
        input_file = find(self.files, "File", str(body.get("input_file_id")))
        if not isinstance(body.get("endpoint"), str):
            raise bad_request("endpoint is required.", "endpoint")
        if body.get("completion_window") != "24h":
            raise bad_request("completion_window must be 24h.", "completion_window")
        created = now()
        total = len(self.contents[input_file["id"]].splitlines())
        batch: Obj = {
            "id": f"batch_{uuid.uuid4()}",
            "object": "batch",
            "endpoint": body["endpoint"],
            "errors": None,
        }
        batch |= {"input_file_id": input_file["id"], "completion_window": "24h", "status": "validating"}
        batch |= {
            "output_file_id": None,
            "error_file_id": None,
            "created_at": created,
            "expires_at": created + 86400,
        }
        for moment in (
            "in_progress",
            "finalizing",
            "completed",
            "failed",
            "expired",
            "cancelling",
            "cancelled",
        ):
            batch[f"{moment}_at"] = None
        batch |= {
            "request_counts": {"total": total, "completed": 0, "failed": 0},
            "metadata": body.get("metadata"),
        }
        self.batches[batch["id"]] = batch
        return json_answer(batch)

    def list_batches(self, call: Call) -> Answer:
        return json_answer(page(list(self.batches.values()), call.query))

    def get_batch(self, call: Call) -> Answer:
        batch = find(self.batches, "Batch", call.arg("batch_id"))
        step = _BATCH_STEPS.get(batch["status"])
        if step is not None:
            batch["status"], batch[f"{step}_at"] = step, now()
            if step == "completed":
                self._run_batch(batch)
        return json_answer(batch)

    def cancel_batch(self, call: Call) -> Answer:
        batch = find(self.batches, "Batch", call.arg("batch_id"))
        if batch["status"] not in ("validating", "in_progress"):
            raise bad_request(f"Cannot cancel a batch with status {batch['status']}.")
        batch["status"], batch["cancelling_at"] = "cancelling", now()
        return json_answer(batch)

    def _run_batch(self, batch: Obj) -> None:
        """Answer each JSONL request of the input file; answers go to an output file, failures to an error file."""
        results: dict[bool, list[str]] = {True: [], False: []}
        for line in self.contents[batch["input_file_id"]].splitlines():
            ok, result = self._batch_line(line)
            results[ok].append(json.dumps(result))
        for ok, name in ((True, "output"), (False, "error")):
            if results[ok]:
                content = "\n".join(results[ok]).encode() + b"\n"
                batch[f"{name}_file_id"] = self.store_file(
                    f"{batch['id']}_{name}.jsonl", "batch_output", content
                )["id"]
        batch["request_counts"] |= {"completed": len(results[True]), "failed": len(results[False])}

    def _batch_line(self, line: bytes) -> tuple[bool, Obj]:
        try:
            request = json.loads(line)
            custom_id, url, body = request["custom_id"], str(request["url"]), request["body"]
        except (ValueError, KeyError, TypeError):
            return False, {
                "custom_id": None,
                "error": {"code": "invalid_json_line", "message": "Invalid line."},
            }
        operation = "embeddings" if url.endswith("embeddings") else "chat/completions"
        try:
            deployment = self.catalog.resolve(body.get("model"), operation)
        except AzureError as error:
            return False, {
                "custom_id": custom_id,
                "response": None,
                "error": {"code": error.code, "message": error.message},
            }
        answer = (
            answers.embeddings(body, deployment.model)
            if operation == "embeddings"
            else answers.chat_completion(body, deployment.model, answers.answer_pieces(body, None))
        )
        response = {"status_code": 200, "request_id": str(uuid.uuid4()), "body": answer}
        return True, {"id": new_id("batch_req_"), "custom_id": custom_id, "response": response, "error": None}

    # fine-tuning: `model` is a base model, not a deployment, so any name is taken

    def create_job(self, call: Call) -> Answer:
        body = call.json()
        if not isinstance(body.get("model"), str):
            raise bad_request("model is required.", "model")
        training = find(self.files, "File", str(body.get("training_file")))
        job_id = new_id("ftjob-")
        job: Obj = {"id": job_id, "object": "fine_tuning.job", "model": body["model"], "created_at": now()}
        job |= {
            "finished_at": None,
            "fine_tuned_model": None,
            "organization_id": "org-emulator",
            "result_files": [],
        }
        job |= {
            "status": "pending",
            "training_file": training["id"],
            "validation_file": body.get("validation_file"),
        }
        job |= {"hyperparameters": body.get("hyperparameters") or {"n_epochs": -1}, "trained_tokens": None}
        job |= {"error": None, "seed": body.get("seed", 0), "suffix": body.get("suffix")}
        self.jobs[job_id] = job
        self.job_events[job_id] = []
        self.checkpoints[job_id] = []
        self._event(job, "Job enqueued. Waiting for jobs ahead to complete.")
        return json_answer(job, status=201)

    def list_jobs(self, call: Call) -> Answer:
        return json_answer(page(list(self.jobs.values()), call.query))

    def get_job(self, call: Call) -> Answer:
        job = self._job(call)
        step = _JOB_STEPS.get(job["status"])
        if step == "running":
            job["status"] = step
            self._event(job, "Job started.")
        elif step == "succeeded":
            self._finish_job(job)
        return json_answer(job)

    def _finish_job(self, job: Obj) -> None:
        model = f"{job['model']}.ft-{job['id'].removeprefix('ftjob-')}"
        job |= {
            "status": "succeeded",
            "finished_at": now(),
            "fine_tuned_model": model,
            "trained_tokens": 1000,
        }
        checkpoint: Obj = {
            "id": new_id("ftckpt_"),
            "object": "fine_tuning.job.checkpoint",
            "created_at": now(),
        }
        checkpoint |= {"fine_tuned_model_checkpoint": f"{model}:ckpt-step-10", "step_number": 10}
        checkpoint |= {"metrics": {"step": 10, "train_loss": 0.5}, "fine_tuning_job_id": job["id"]}
        self.checkpoints[job["id"]].append(checkpoint)
        self._event(job, "Job succeeded.")

    def cancel_job(self, call: Call) -> Answer:
        job = self._job(call)
        if job["status"] not in _JOB_STEPS:
            raise bad_request(f"Cannot cancel a job with status {job['status']}.")
        job["status"] = "cancelled"
        self._event(job, "Job cancelled.")
        return json_answer(job)

    def job_events_page(self, call: Call) -> Answer:
        return json_answer(page(self.job_events[self._job(call)["id"]], call.query))

    def checkpoints_page(self, call: Call) -> Answer:
        return json_answer(page(self.checkpoints[self._job(call)["id"]], call.query))

    def _job(self, call: Call) -> Obj:
        return find(self.jobs, "Fine-tuning job", call.arg("job_id"))

    def _event(self, job: Obj, message: str) -> None:
        event: Obj = {"id": new_id("ftevent-"), "object": "fine_tuning.job.event", "created_at": now()}
        event |= {"level": "info", "message": message, "type": "message"}
        self.job_events[job["id"]].append(event)

    # models and deployments

    def _models(self) -> list[Obj]:
        """The base models behind the deployments (Azure lists models the resource can use, not deployments)."""
        models: dict[str, Obj] = {}
        for deployment in self.catalog.by_name.values():
            models.setdefault(deployment.model, _model(deployment))
        return list(models.values())

    def list_models(self, call: Call) -> Answer:
        return json_answer({"object": "list", "data": self._models()})

    def get_model(self, call: Call) -> Answer:
        model_id = call.arg("model_id")
        for model in self._models():
            if model["id"] == model_id:
                return json_answer(model)
        raise AzureError(404, "ModelNotFound", f"The model '{model_id}' does not exist.")

    def list_deployments(self, call: Call) -> Answer:
        """The 2022-12-01 data-plane listing; newer versions dropped it (deployments moved to the management plane)."""
        data = [
            {
                "id": d.name,
                "model": d.model,
                "owner": "organization-owner",
                "object": "deployment",
                "status": "succeeded",
                "scale_settings": {"scale_type": "standard"},
                "created_at": _MODEL_CREATED,
                "updated_at": _MODEL_CREATED,
            }
            for d in self.catalog.by_name.values()
        ]
        return json_answer({"object": "list", "data": data})


def _model(deployment: Deployment) -> dict[str, Any]:
    kind = deployment.kind
    capabilities = {
        "fine_tune": False,
        "inference": True,
        "completion": kind == "completion",
        "chat_completion": kind == "chat",
        "embeddings": kind == "embedding",
    }
    return {
        "id": deployment.model,
        "object": "model",
        "created_at": _MODEL_CREATED,
        "status": "succeeded",
        "lifecycle_status": "generally-available",
        "capabilities": capabilities,
        "deprecation": {"inference": _MODEL_CREATED + 3 * 365 * 86400},
    }
