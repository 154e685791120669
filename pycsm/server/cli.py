"""`pycsm serve`: the OpenAI-compatible speech server on uvicorn.

    pycsm serve -m csm-1b-q8_0.gguf --max-batch 4 --voice-map alloy=0,echo=1
    pycsm serve --quant q4_k --host 0.0.0.0 --port 8000 --api-key "$KEY"

SIGTERM / Ctrl-C: the server stops accepting connections, lets running requests finish for up to
--graceful-timeout seconds, then cuts the rest (their responses end without their final chunk, so
clients see an error rather than a short file).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from ..cli import UsageError, _err, _number, _Parser
from ..errors import CSMError

LOG = logging.getLogger("pycsm.server")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pycsm serve", description="OpenAI-compatible speech server (POST /v1/audio/speech).")
    src = p.add_mutually_exclusive_group()
    src.add_argument("-m", "--model", help="CSM GGUF file (default: csm-1b-q8_0.gguf from the hub)")
    src.add_argument("--quant", choices=("f16", "q8_0", "q4_k"), help="published file to download")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_number(int, 0), default=8000)
    p.add_argument("--max-batch", type=_number(int, 1), default=4, help="streams generated together (default 4)")
    p.add_argument("--max-queue", type=_number(int, 0), default=16,
                   help="requests waiting for a stream slot before 429 (default 16)")
    p.add_argument("--max-audio-length", type=_number(float, 0, strict=True), default=60.0, metavar="S",
                   help="longest audio of one request in seconds (default 60)")
    p.add_argument("--max-input-chars", type=_number(int, 1), default=4096, help="longest input (default 4096)")
    p.add_argument("--api-key", default=os.environ.get("PYCSM_API_KEY"),
                   help="require Authorization: Bearer KEY on /v1 routes (default: $PYCSM_API_KEY, else none)")
    p.add_argument("--threads", type=_number(int, 1), default=None, help="CPU threads (default: all cores)")
    p.add_argument("--voices", default=None, metavar="DIR",
                   help="folder of saved voices (default: $PYCSM_VOICES, else the user's pycsm voices folder)")
    p.add_argument("--voice-map", default=None, metavar="NAME=VOICE,...",
                   help="other names for voices, e.g. alloy=narrator,echo=1 (OpenAI's voice names to saved "
                        "voices or speaker ids)")
    p.add_argument("--prefill-chunk", type=_number(int, 0), default=0,
                   help="prompt rows a joining request prefills per frame step (default 0: about one frame's time)")
    p.add_argument("--no-prompt-reuse", action="store_true",
                   help="prefill every request's whole prompt (by default a request reuses the cached rows "
                        "of a voice an earlier request prefilled)")
    p.add_argument("--graceful-timeout", type=_number(float, 0), default=30.0, metavar="S",
                   help="seconds running requests get to finish on SIGTERM (default 30)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def build(args):
    """The loaded model, engine and app for parsed arguments (the caller closes engine and model)."""
    from ..model import Model
    from .app import ServerConfig, create_app
    from .engine import Engine
    from ..voices import voices_dir
    from .voices import Voices, parse_voice_map

    try:
        voices = Voices(args.voices if args.voices is not None else voices_dir(), parse_voice_map(args.voice_map))
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.prefill_chunk > 256:
        raise UsageError("--prefill-chunk must be at most 256")
    if args.model is not None:
        path = Path(args.model)
    else:
        from .. import hub

        path = hub.download(args.quant or hub.DEFAULT_QUANT)
    model = Model(path)
    try:
        engine = Engine(model, max_batch=args.max_batch, max_queue=args.max_queue, n_threads=args.threads,
                        prefill_chunk=args.prefill_chunk, reuse_prompt=not args.no_prompt_reuse)
    except BaseException:
        model.close()
        raise
    name = path.name[:-5] if path.name.endswith(".gguf") else path.name
    config = ServerConfig(model_name=name, max_input_chars=args.max_input_chars,
                          max_audio_seconds=args.max_audio_length, api_key=args.api_key or None)
    return model, engine, create_app(engine, config, voices)


def serve(argv) -> int:
    try:
        import uvicorn
    except ImportError:
        _err('the server needs its extra: pip install "pycsm-tts[server]"')
        return 1
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(message)s")
    model, engine, app = build(args)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.graceful_timeout or None, access_log=False)
    server = uvicorn.Server(config)
    # uvicorn handles SIGTERM itself, then re-raises it once it has shut down; a no-op handler in
    # place by then lets the process close the engine and exit 0 (SIGINT still ends in 130)
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        # uvicorn has waited for (or cut) the running responses; whatever still runs is cut here
        engine.close(timeout=0)
        model.close()
    return 0 if server.started else 1


def main(argv=None) -> int:
    try:
        return serve(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        _err(str(e))
        return 2
    except KeyboardInterrupt:
        return 130
    except (CSMError, OSError, ValueError) as e:  # the model file: missing, unreadable, not CSM
        _err(str(e))
        return 1
