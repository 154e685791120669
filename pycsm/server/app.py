"""The HTTP face of the server: OpenAI's /v1/audio/speech and friends on FastAPI.

Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for a bad value or
an unparsable body, 422 for a field of the wrong type or an unknown field, 401 without the bearer
key, 404 for an unknown model, 413 for input past --max-input-chars, 429 (with Retry-After) when
the wait queue is full, 503 while shutting down.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import math
import time
from dataclasses import dataclass
from typing import Literal, Union

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, StrictFloat, StrictInt, StrictStr, ValidationError

from ..errors import CSMError
from ..options import GenerationOptions
from ..prompt import build_prompt
from .encoding import FORMATS, MEDIA_TYPES, Encoder
from .engine import End, Engine, QueueFull, Request, ShuttingDown
from .metrics import Metrics
from .voices import Voices, VoiceError

OPENAI_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts", "gpt-4o-mini-tts-2025-03-20", "gpt-4o-mini-tts-2025-12-15")
DISCONNECT_POLL_S = 0.25  # how often a request still waiting for audio checks its client


class VoiceObject(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: StrictStr


class SpeechBody(BaseModel):
    """OpenAI's fields plus pycsm's extensions (seed, temperature, top_k)."""

    model_config = ConfigDict(extra="forbid")
    model: StrictStr
    input: StrictStr
    voice: Union[StrictStr, VoiceObject]
    response_format: StrictStr = "mp3"
    speed: Union[StrictInt, StrictFloat] = 1.0
    stream_format: Literal["audio", "sse"] | None = None
    instructions: StrictStr | None = None  # accepted for OpenAI's clients; CSM takes no instructions
    seed: StrictInt | None = None
    temperature: Union[StrictInt, StrictFloat] = 0.9
    top_k: StrictInt = 50


@dataclass
class ServerConfig:
    model_name: str                  # the loaded file's name (without .gguf)
    max_input_chars: int = 4096
    max_audio_seconds: float = 60.0
    api_key: str | None = None


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error",
                503: "server_error", 500: "server_error"}


def error_response(e: APIError) -> JSONResponse:
    body = {"error": {"message": e.message, "type": _ERROR_TYPES.get(e.status, "invalid_request_error"),
                      "param": e.param, "code": e.code}}
    return JSONResponse(body, status_code=e.status, headers=e.headers)


def _validation_message(err: ValidationError) -> tuple[str, str | None]:
    first = err.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    if first.get("type") == "extra_forbidden":
        return f"unknown field {param!r}", param
    if first.get("type") == "missing":
        return f"missing required field {param!r}", param
    return f"{param}: {first.get('msg')}", param


ROUTES = ("/v1/audio/speech", "/v1/models", "/v1/audio/voices", "/health", "/metrics")


class _StatusCounter:
    """Counts responses by route and status (an ASGI middleware: it leaves streaming alone)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.count(route, message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)


def create_app(engine: Engine, config: ServerConfig, voices: Voices, metrics: Metrics | None = None) -> FastAPI:
    metrics = metrics or Metrics()
    app = FastAPI(title="pycsm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics = engine, metrics
    models = (config.model_name, "csm-1b") + OPENAI_MODELS
    sample_rate = int(engine.model.hparams.sample_rate)
    frame_rate = float(engine.model.hparams.frame_rate)
    context_size = int(engine.model.hparams.bb_max_pos)
    max_frames = GenerationOptions(max_audio_length_ms=config.max_audio_seconds * 1000).max_frames(
        1000.0 / frame_rate, context_size)
    vocab_size = int(engine.model.hparams.audio_vocab_size)

    @app.exception_handler(APIError)
    async def _api_error(_request, e: APIError):
        return error_response(e)

    app.add_middleware(_StatusCounter, metrics=metrics)

    def check_key(request: HTTPRequest) -> None:
        if not config.api_key:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": config.model_name, "active_streams": engine.active_streams,
                "queue_depth": engine.queue_depth}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(engine), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models(request: HTTPRequest):
        check_key(request)
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "pycsm"}
                                           for m in models]}

    @app.get("/v1/audio/voices")
    async def list_voices(request: HTTPRequest):
        check_key(request)
        return {"voices": voices.names()}

    def parse(raw: bytes) -> SpeechBody:
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object")
        try:
            return SpeechBody.model_validate(data)
        except ValidationError as e:
            message, param = _validation_message(e)
            raise APIError(422, message, param=param) from None

    def check(body: SpeechBody) -> tuple[GenerationOptions, int, list]:
        if body.model not in models:
            raise APIError(404, f"unknown model {body.model!r}; this server serves: {', '.join(models)}",
                           param="model", code="model_not_found")
        if len(body.input) > config.max_input_chars:
            raise APIError(413, f"input has {len(body.input)} characters; this server takes at most "
                                f"{config.max_input_chars}", param="input")
        if not body.input.strip():
            raise APIError(400, "input is empty", param="input")
        if body.response_format not in FORMATS:
            raise APIError(400, f"response_format {body.response_format!r} is not supported; use one of "
                                f"{', '.join(FORMATS)}", param="response_format")
        if not math.isfinite(body.speed) or body.speed != 1.0:
            raise APIError(400, f"speed {body.speed} is not supported: CSM speaks at its own pace (use 1.0)",
                           param="speed")
        try:
            # special-token text in the input stays text: a user cannot start a segment of their own
            options = GenerationOptions(temperature=body.temperature, top_k=body.top_k, seed=body.seed,
                                        parse_special=False).with_seed()
        except ValueError as e:
            raise APIError(400, str(e), param=str(e).split()[0]) from None
        try:
            speaker, context = voices.resolve(body.voice.id if isinstance(body.voice, VoiceObject) else body.voice)
        except VoiceError as e:
            raise APIError(400, str(e), param="voice") from None
        return options, speaker, context

    async def next_item(req: Request, http: HTTPRequest):
        """The request's next audio chunk / End / exception, cancelling it if the client goes away."""
        while True:
            try:
                return await asyncio.wait_for(req.queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    engine.cancel(req)
                    raise asyncio.CancelledError("client disconnected") from None

    @app.post("/v1/audio/speech")
    async def speech(http: HTTPRequest):
        t0 = time.monotonic()
        check_key(http)
        body = parse(await http.body())
        options, speaker, context = check(body)
        prompt = build_prompt(engine.model.tokenizer, body.input.strip(), speaker, context,
                              parse_special=options.parse_special)
        if prompt.shape[0] >= context_size:
            raise APIError(413, f"the input and the voice's context take {prompt.shape[0]} positions; the model's "
                                f"context holds {context_size}", param="input")
        sampling = options.sampling(vocab_size)
        seed = options.seed
        req = Request(prompt, sampling["temperature"], sampling["top_k"], seed, max_frames,
                      asyncio.get_running_loop())
        try:
            engine.submit(req)
        except QueueFull as e:
            raise APIError(429, str(e), code="queue_full", headers={"Retry-After": str(e.retry_after)}) from None
        except ShuttingDown as e:
            raise APIError(503, str(e)) from None
        fmt = body.response_format
        sse = body.stream_format == "sse"
        # a FLAC sent as it is made cannot carry its length: sent whole unless a stream is asked for
        streaming = sse or fmt != "flac" or body.stream_format == "audio"
        try:
            first = await next_item(req, http)
        except BaseException:
            engine.cancel(req)
            raise
        if isinstance(first, Exception):
            if isinstance(first, ShuttingDown):
                raise APIError(503, "the server is shutting down")
            raise APIError(400 if isinstance(first, CSMError) else 500, f"generation failed: {first}")
        headers = {"X-Seed": str(seed)}
        encoder = Encoder(fmt, sample_rate, streaming)

        usage = {"output_tokens": 0}

        async def chunks():
            """Encoded audio as it comes; an engine failure cuts the response (no clean end)."""
            item, sent_first, n_samples = first, False, 0
            try:
                while True:
                    if isinstance(item, BaseException):
                        raise item
                    if isinstance(item, End):
                        tail = encoder.close()
                        if tail:
                            yield tail
                        metrics.audio(n_samples / sample_rate)
                        usage["output_tokens"] = item.n_frames
                        return
                    n_samples += item.size
                    data = encoder.write(item)
                    if data:
                        if not sent_first:
                            metrics.first_byte(time.monotonic() - t0)
                            sent_first = True
                        yield data
                    item = await next_item(req, http)
            finally:
                engine.cancel(req)  # a no-op once the stream ended; else it leaves the batch now

        if not streaming:
            data = b"".join([c async for c in chunks()])
            metrics.first_byte(time.monotonic() - t0)
            return Response(data, media_type=MEDIA_TYPES[fmt], headers=headers)
        if not sse:
            return StreamingResponse(chunks(), media_type=MEDIA_TYPES[fmt], headers=headers)

        async def events():
            async for data in chunks():
                delta = {"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()}
                yield f"data: {json.dumps(delta)}\n\n"
            n_in, n_out = int(prompt.shape[0]), usage["output_tokens"]  # prompt rows, frames
            done = {"type": "speech.audio.done",
                    "usage": {"input_tokens": n_in, "output_tokens": n_out, "total_tokens": n_in + n_out}}
            yield f"data: {json.dumps(done)}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    return app
