"""``deepmetric serve``: the gallery over HTTP, an API and a web page
(:func:`deepmetric.service.server.serve`)."""

from __future__ import annotations

import argparse
from typing import Any

from deepmetric.cli.common import DEVICE_HELP, GALLERY_HELP, MODEL_HELP, import_option

#: what a missing module of the serve extra is called
SERVE_EXTRA = ("fastapi", "uvicorn", "starlette", "multipart", "python_multipart")


def add_parser(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="the gallery over HTTP: an API and a web page",
        description="Serve GALLERY (created for RUN_DIR when it does not exist) with one model "
        "in the process: the page at /, the API (JSON, as the CLI's --json) and its docs at "
        "/docs. Binds to loopback unless --host says otherwise. Writes (enroll, remove) need "
        "the X-API-Key header when --api-key-env names a variable holding the key; reads too "
        "with --protect-reads. Ctrl-C stops it (the gallery is closed and its index saved).",
    )
    serve.add_argument("run_dir", metavar="RUN_DIR", help=MODEL_HELP)
    serve.add_argument("--gallery", required=True, metavar="GALLERY", help=GALLERY_HELP)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    serve.add_argument(
        "--busy-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long a write waits for another process's write lock before answering 503 "
        "(default 10)",
    )
    serve.add_argument(
        "--api-key-env",
        metavar="NAME",
        help="the environment variable holding the API key (the key itself never goes on "
        "the command line)",
    )
    serve.add_argument("--protect-reads", action="store_true", help="reads need the API key too")
    serve.add_argument(
        "--index",
        metavar="SPEC",
        help="where a gallery created here keeps its vectors, as `deepmetric gallery create "
        "--index`: local (default), milvus-lite:PATH.db or milvus://HOST:PORT/COLLECTION "
        "(token from DEEPMETRIC_MILVUS_TOKEN); an existing gallery keeps its own",
    )
    _add_limits(serve)
    serve.add_argument("--device", default="auto", help=DEVICE_HELP)
    import_option(serve)
    serve.set_defaults(handler=run)


def _add_limits(serve: argparse.ArgumentParser) -> None:
    """The options that bound slow and large requests and open connections."""
    serve.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="a request's headers must arrive within this, else 408 and the connection is "
        "closed (default 10)",
    )
    serve.add_argument(
        "--body-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="a request's whole body must arrive within this after its headers, else 408 and "
        "the connection is closed (default 60)",
    )
    serve.add_argument(
        "--max-connections",
        type=int,
        metavar="N",
        help="open connections at most; more are closed at once (default 1000, fewer when the "
        "process may open fewer files)",
    )
    serve.add_argument(
        "--max-upload-mb",
        type=float,
        default=10.0,
        metavar="MB",
        help="the largest request body, in MiB (default 10); larger uploads get 413",
    )


def run(args: argparse.Namespace) -> int:
    from deepmetric.service.server import serve

    try:
        serve(
            args.run_dir,
            args.gallery,
            host=args.host,
            port=args.port,
            api_key_env=args.api_key_env,
            protect_reads=args.protect_reads,
            max_upload_mb=args.max_upload_mb,
            busy_timeout=args.busy_timeout,
            device=args.device,
            header_timeout=args.header_timeout,
            body_timeout=args.body_timeout,
            max_connections=args.max_connections,
            index=args.index,
        )
    except ModuleNotFoundError as error:
        if error.name not in SERVE_EXTRA:
            raise
        raise ValueError(
            f"serve needs the serve extra ({error}): pip install 'deepmetric[serve]'"
        ) from None
    return 0
