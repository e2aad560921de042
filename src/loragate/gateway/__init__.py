"""The aiohttp gateway: OpenAI front door, proxy, auth, telemetry and background loops.

Start one in-process::

    from loragate.gateway import load_config, running_gateway

    async with running_gateway(load_config("examples/gateway.yaml"), port=0) as gw:
        client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="sk-...")
"""

from loragate.gateway.app import GATEWAY, Gateway, create_app
from loragate.gateway.config_file import load_config, parse_config_text
from loragate.gateway.inflight import InFlightTracker, LocalInFlight
from loragate.gateway.runner import RunningGateway, running_gateway, serve_until_signalled

__all__ = [
    "GATEWAY",
    "Gateway",
    "InFlightTracker",
    "LocalInFlight",
    "RunningGateway",
    "create_app",
    "load_config",
    "parse_config_text",
    "running_gateway",
    "serve_until_signalled",
]
