"""Image and audio answers shaped like Azure's: DALL-E data with filter results, Whisper formats, TTS bytes."""

from __future__ import annotations

import base64
import hashlib
import struct
import time
import uuid
from typing import Any, Final

from .answers import SAFE

#: A 1x1 transparent PNG: what every generated image is.
PIXEL_PNG: Final = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)
#: The content type Azure sends per TTS `response_format`, with the magic bytes the emulator's audio starts with.
SPEECH_FORMATS: Final = {
    "mp3": ("audio/mpeg", b"ID3\x04\x00\x00\x00\x00\x00\x00"),
    "opus": ("audio/ogg", b"OggS\x00\x02"),
    "aac": ("audio/aac", b"\xff\xf1\x50\x80"),
    "flac": ("audio/flac", b"fLaC\x00\x00\x00\x22"),
    "wav": ("audio/wav", b""),  # a real RIFF header, built for the length
    "pcm": ("audio/pcm", b""),
}
_IMAGE_FILTERS: Final = SAFE | {"profanity": {"detected": False, "filtered": False}}


def images(prompt: str, count: int, as_base64: bool) -> dict[str, Any]:
    """`count` images for `prompt`, as URLs (DALL-E's default) or base64 PNGs; each with Azure's filter results."""
    data = []
    for _ in range(count):
        item: dict[str, Any] = (
            {"b64_json": base64.b64encode(PIXEL_PNG).decode()}
            if as_base64
            else {
                "url": f"https://emulator.blob.core.windows.net/private/images/{uuid.uuid4()}/generated_00.png"
            }
        )
        item |= {
            "revised_prompt": f"An emulated image of: {prompt}",
            "prompt_filter_results": _IMAGE_FILTERS,
            "content_filter_results": SAFE,
        }
        data.append(item)
    return {"created": int(time.time()), "data": data}


def image_refusal() -> dict[str, Any]:
    """DALL-E's refusal: `content_policy_violation`, its filter results under `inner_error`."""
    return {
        "error": {
            "code": "content_policy_violation",
            "message": "Your request was rejected as a result of our safety system. Your prompt may contain "
            "text that is not allowed by our safety system.",
            "inner_error": {
                "code": "ResponsibleAIPolicyViolation",
                "content_filter_results": SAFE | {"violence": {"filtered": True, "severity": "high"}},
            },
        }
    }


def transcript(task: str, filename: str, size: int) -> str:
    verb = "translation into English" if task == "translate" else "transcription"
    return f"Emulated {verb} of {filename} ({size} bytes)."


def transcription(task: str, text: str, response_format: str) -> tuple[str, str | dict[str, Any]]:
    """Whisper's answer in `response_format`: (content type, body) — JSON objects, or plain text, SRT or WebVTT."""
    if response_format == "verbose_json":
        segment = {
            "id": 0,
            "seek": 0,
            "start": 0.0,
            "end": 1.0,
            "text": text,
            "tokens": [],
            "temperature": 0.0,
        }
        segment |= {"avg_logprob": -0.1, "compression_ratio": 1.0, "no_speech_prob": 0.0}
        return "application/json", {
            "task": task,
            "language": "english",
            "duration": 1.0,
            "text": text,
            "segments": [segment],
        }
    if response_format == "text":
        return "text/plain", text + "\n"
    if response_format == "srt":
        return "text/plain", f"1\n00:00:00,000 --> 00:00:01,000\n{text}\n\n"
    if response_format == "vtt":
        return "text/vtt", f"WEBVTT\n\n00:00:00.000 --> 00:00:01.000\n{text}\n\n"
    return "application/json", {"text": text}


def speech(text: str, response_format: str) -> bytes:
    """Deterministic audio for `text`: the format's magic bytes, then bytes derived from the text."""
    _, magic = SPEECH_FORMATS[response_format]
    digest = hashlib.sha256(text.encode()).digest()
    samples = (digest * (1 + 4 * len(text) // len(digest)))[: max(256, 4 * len(text))]
    if response_format == "wav":
        rate = 24000
        fmt = struct.pack("<4sIHHIIHH", b"fmt ", 16, 1, 1, rate, rate * 2, 2, 16)
        data = struct.pack("<4sI", b"data", len(samples)) + samples
        return struct.pack("<4sI4s", b"RIFF", 4 + len(fmt) + len(data), b"WAVE") + fmt + data
    return magic + samples
