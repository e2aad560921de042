"""A small scripted vLLM 0.32 stand-in on a real loopback socket, with the recorded status
codes and bodies of the admin API (shared/design/vllm-0.32/transcript_basic.md)."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from loragate.twin.vllm_errors import sanitize_message

IDLE_METRICS = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny-llama"} 1.0
vllm:num_requests_waiting{engine="0",model_name="tiny-llama"} 3.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="tiny-llama",reason="deferred"} 2.0
vllm:kv_cache_usage_perc{engine="0",model_name="tiny-llama"} 0.5
vllm:lora_requests_info{max_lora="3",running_lora_adapters="a",waiting_lora_adapters="a"} 2.0
vllm:lora_requests_info{max_lora="3",running_lora_adapters="b",waiting_lora_adapters="b"} 1.0
"""


def vllm_error(status: int, message: str, err_type: str, param: str | None = None) -> web.Response:
    """An error in vLLM's JSON shape."""
    body = {"error": {"message": message, "type": err_type, "param": param, "code": status}}
    return web.Response(status=status, text=json.dumps(body), content_type="application/json")


class StubVllm:
    def __init__(self, base_model: str = "tiny-llama") -> None:
        self.base_model = base_model
        self.adapters: dict[str, str] = {}
        self.health_status = 200
        self.metrics_text = IDLE_METRICS
        self.load_calls = 0
        self.load_delay_s = 0.0
        self.readable_paths: tuple[str, ...] = ("/loras/",)  # adapter folders it can "read"
        self.max_model_len = 512  # the recorded replica's
        self.url = ""
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/load_lora_adapter", self._load)
        app.router.add_post("/v1/unload_lora_adapter", self._unload)
        self.app = app

    async def _health(self, _: web.Request) -> web.Response:
        return web.Response(status=self.health_status)

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(text=self.metrics_text, content_type="text/plain")

    async def _models(self, _: web.Request) -> web.Response:
        base = self.base_model
        data = [{"id": base, "object": "model", "root": "/m", "parent": None,
                 "max_model_len": self.max_model_len}]  # fmt: skip
        for n, p in self.adapters.items():
            data.append({"id": n, "object": "model", "root": p, "parent": base,
                         "max_model_len": None})  # fmt: skip
        return web.json_response({"object": "list", "data": data})

    async def _load(self, request: web.Request) -> web.Response:
        self.load_calls += 1
        body = await request.json()
        if "lora_path" not in body:
            return vllm_error(400, "1 validation error: lora_path", "Bad Request", "body.lora_path")
        name, path = body.get("lora_name", ""), body["lora_path"]
        if not name or not path:
            return vllm_error(
                400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput"
            )
        if name == self.base_model:
            return vllm_error(
                400,
                f"The lora adapter '{name}' conflicts with a served base model.",
                "InvalidUserInput",
            )
        if name in self.adapters and not body.get("load_inplace"):
            return vllm_error(
                400,
                f"The lora adapter '{name}' has already been loaded. If you want to load the "
                "adapter in place, set 'load_inplace' to True.",
                "InvalidUserInput",
            )
        if not path.startswith(self.readable_paths):
            # vLLM sanitises the message: a system or file path reads <path>, another stays.
            message = sanitize_message(f"Loading lora {name} failed: No adapter found for {path}")
            return vllm_error(404, message, "NotFoundError")
        if self.load_delay_s:
            await asyncio.sleep(self.load_delay_s)
        self.adapters[name] = path
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def _unload(self, request: web.Request) -> web.Response:
        name = (await request.json()).get("lora_name")
        if name not in self.adapters:
            return vllm_error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        del self.adapters[name]
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")


async def serve_app(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"
