"""The ``peftkit`` command (also ``python -m peftkit``).

``peftkit serve`` loads a causal LM and its tokenizer, puts the given LoRA adapters into an
:class:`~peftkit.serving.AdapterPool` and serves them over an OpenAI-compatible HTTP API::

    peftkit serve --base-model HuggingFaceTB/SmolLM2-135M-Instruct \\
        --adapter pirate=./pirate-lora --adapter terse=./terse-lora --port 8000

The server's dependencies are the optional extra ``peftkit[serve]``, imported only by this subcommand.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence

__all__ = ["main"]

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _adapter_arg(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR_OR_HUB_ID, got {value!r}")
    return name, path


_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}
_SIZE = re.compile(r"(\d+)\s*(|[kmg]i?)b?", re.IGNORECASE)


def _size_arg(value: str) -> int:
    match = _SIZE.fullmatch(value.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"expected a byte count such as 500000000, 500MB or 2GiB, got {value!r}")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftkit", description="peftkit command-line tools.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve", help="serve LoRA adapters of one base model over an OpenAI-compatible HTTP API",
        description="Serve LoRA adapters of one base model over an OpenAI-compatible HTTP API "
                    "(/v1/completions, /v1/chat/completions, /v1/models, /v1/load_lora_adapter, /metrics). "
                    "Requests name an adapter (or the base model) in `model`; concurrent requests are batched "
                    "together whatever their adapter.")
    serve.add_argument("--base-model", required=True, metavar="DIR_OR_HUB_ID",
                       help="the base causal LM (a directory or a Hub id) and its tokenizer")
    serve.add_argument("--adapter", action="append", default=[], type=_adapter_arg, metavar="NAME=DIR_OR_HUB_ID",
                       help="a LoRA adapter to serve as NAME (repeat for more); more can be loaded at runtime")
    serve.add_argument("--served-model-name", metavar="NAME",
                       help="the base model's name in /v1/models and requests (default: --base-model)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    serve.add_argument("--max-loras", type=int, default=8,
                       help="adapters on the device at once, i.e. distinct adapters in one batch (default: "
                            "%(default)s)")
    serve.add_argument("--max-lora-rank", type=int, default=16,
                       help="largest servable LoRA rank; smaller ranks are zero-padded (default: %(default)s)")
    serve.add_argument("--max-cpu-loras", type=int, default=64,
                       help="loaded adapter files cached in host memory (default: %(default)s)")
    serve.add_argument("--max-cpu-bytes", type=_size_arg, metavar="SIZE",
                       help="byte budget of that cache, e.g. 2GiB or 500MB (default: no limit)")
    serve.add_argument("--max-batch-size", type=int, default=16,
                       help="requests decoded together at most (default: %(default)s)")
    serve.add_argument("--max-model-len", type=int, metavar="TOKENS",
                       help="prompt plus completion tokens at most (default: the model config's maximum)")
    serve.add_argument("--dtype", choices=_DTYPES, default="auto",
                       help="weights' dtype; auto keeps the checkpoint's (default: %(default)s)")
    serve.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    serve.add_argument("--target-modules", nargs="+", metavar="NAME",
                       help="modules the pool prepares slots for (default: the pool's choice)")
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                       help="log level (default: %(default)s)")
    serve.set_defaults(func=_serve)
    return parser


def _serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import sse_starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        print(f"peftkit serve needs the `serve` extra ({exc.name} is missing): pip install 'peftkit[serve]'",
              file=sys.stderr)
        return 2
    for flag, low in (("max_loras", 1), ("max_lora_rank", 1), ("max_cpu_loras", 0), ("max_batch_size", 1),
                      ("port", 0)):
        if getattr(args, flag) < low:
            print(f"peftkit serve: --{flag.replace('_', '-')} must be >= {low}, got {getattr(args, flag)}",
                  file=sys.stderr)
            return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    from peftkit.serving.server import run_server

    try:
        app = _build_app(args)
    except (OSError, ValueError) as exc:  # a missing model, an adapter that does not fit: say why and exit
        print(f"peftkit serve: {exc}", file=sys.stderr)
        return 1
    run_server(lambda: app, args.host, args.port, args.log_level)
    return 0


def _build_app(args: argparse.Namespace) -> object:
    """Model, tokenizer, pool (with the startup adapters), engine and app; raises on anything that does not fit."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.serving import AdapterPool
    from peftkit.serving.engine import BatchEngine
    from peftkit.serving.server import create_app

    names = [name for name, _ in args.adapter]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"--adapter names must be unique; repeated: {duplicates}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.base_model)
    model = AutoModelForCausalLM.from_pretrained(args.base_model, dtype=dtype).to(device).eval()
    if model.config.is_encoder_decoder:
        raise ValueError(f"{args.base_model} is an encoder-decoder model; peftkit serve serves decoder-only LMs.")
    pool = AdapterPool(model, max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                       max_cpu_loras=args.max_cpu_loras, max_cpu_bytes=args.max_cpu_bytes,
                       target_modules=args.target_modules)
    for name, path in args.adapter:
        try:
            pool.load_adapter(name, path)
        except (OSError, ValueError) as exc:
            raise ValueError(f"adapter {name!r} ({path}): {exc}") from exc
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None:
        eos.append(tokenizer.eos_token_id)
    engine = BatchEngine(model, pool, adapters=dict(args.adapter), max_batch_size=args.max_batch_size,
                         max_loras=args.max_loras, eos_token_ids=tuple(eos))
    config = model.config.get_text_config()
    limit = args.max_model_len or next((getattr(config, key) for key in ("max_position_embeddings", "n_positions")
                                        if isinstance(getattr(config, key, None), int)), None)
    base_name = args.served_model_name or args.base_model
    logging.getLogger("peftkit.serving").info("Serving %s with adapters %s on %s (%s)", base_name, names or "none",
                                              device, model.dtype)
    return create_app(engine, tokenizer, base_name=base_name, max_model_len=limit,
                      vocab_size=config.vocab_size)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``peftkit`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
