"""`azproxy demo`: the proxy in front of the built-in emulator, with real requests through it."""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web

from .config import Address, Limits, Settings, load_settings
from .emulator import Emulator
from .listener import start_server
from .server import build_app

DEMO_KEY = "demo-azure-key"


async def run_demo(address: Address, *, once: bool) -> int:
    try:
        import openai
        from openai.types.chat import ChatCompletionMessageParam
    except ImportError:
        print("azproxy demo needs the openai SDK: pip install 'azproxy[demo]'")
        return 1
    emulator = Emulator(api_keys={DEMO_KEY}, chunk_delay=0.05)
    runners: list[web.AppRunner] = []
    try:
        emulator_runner, emulator_port = await start_server(emulator.app(), "127.0.0.1", 0, Limits())
        runners.append(emulator_runner)
        endpoint = f"http://127.0.0.1:{emulator_port}"
        settings = load_settings(
            {"AZURE_OPENAI_ENDPOINT": endpoint, "AZURE_OPENAI_PROXY_ADDRESS": str(address)}
        )
        proxy_runner, port = await _start_proxy(settings, address)
        runners.append(proxy_runner)
        base_url = f"http://{address.host}:{port}/v1"
        print(f"Azure OpenAI emulator on {endpoint}; azproxy on http://{address.host}:{port}\n")

        client = openai.AsyncOpenAI(base_url=base_url, api_key=DEMO_KEY, max_retries=0)
        question: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What does azproxy do?"}]
        chat = await client.chat.completions.create(model="gpt-3.5-turbo", messages=question)
        print(f"chat answer:     {chat.choices[0].message.content}")
        print(f"Azure was called: POST {emulator.last.url}\n")

        print("streamed answer: ", end="", flush=True)
        stream = await client.chat.completions.create(model="gpt-4o", messages=question, stream=True)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
        print(f"\nAzure was called: POST {emulator.last.url}\n")
        await client.close()
        if once:
            return 0
        print("Try it yourself (Ctrl-C to stop):")
        print(
            f"  curl {base_url}/chat/completions -H 'Authorization: Bearer {DEMO_KEY}' \\\n"
            "    -H 'Content-Type: application/json' \\\n"
            '    -d \'{"model": "gpt-4o", "stream": true, "messages": [{"role": "user", "content": "hi"}]}\''
        )
        await asyncio.Event().wait()
        return 0
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


async def _start_proxy(settings: Settings, address: Address) -> tuple[web.AppRunner, int]:
    """On the asked-for port, or on any free one when it is taken (a demo should not fail on that)."""
    with contextlib.suppress(OSError):
        return await start_server(build_app(settings), address.host, address.port, settings.limits)
    return await start_server(build_app(settings), address.host, 0, settings.limits)
