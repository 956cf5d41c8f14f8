"""What `jaxserve serve`, `jaxserve chat` and `jaxserve client` do, as functions of plain
arguments: the absl CLI only parses flags and calls these. Each returns a process exit code."""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from jaxserve.errors import AddressInUseError, JaxserveError


def build_engine(model: str | None, *, dtype: str | None = None, max_waiting: int | None = None,
                 scheduler: str = "continuous", preset: str | None = None,
                 **engine_overrides: Any) -> Any:
    """Load `model` with `jaxserve.LLM` (serving preset `preset`, then the overrides) and wrap
    it in the asynchronous engine."""
    from jaxserve import LLM
    from jaxserve.engine.async_engine import AsyncEngine

    llm = LLM(model, dtype=dtype, preset=preset, **engine_overrides)
    kwargs: dict[str, Any] = {"scheduler": scheduler}
    if max_waiting is not None:
        kwargs["max_waiting"] = max_waiting
    return AsyncEngine.from_llm(llm, **kwargs)


def check_port_free(host: str, port: int | None, what: str) -> None:
    """AddressInUseError unless host:port can be bound now (None / 0: nothing to check). The
    servers bind for real later; this only makes a taken port fail before the model loads."""
    if not port:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR: a port left in TIME_WAIT by a server just stopped is free (Linux still
        # refuses a port someone listens on).
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise AddressInUseError(f"cannot listen on {host}:{port} ({what}): "
                                    f"{e.strerror or e}") from None


def run_serve(model: str | None = None, *, dtype: str | None = None, host: str = "127.0.0.1",
              port: int = 50051, metrics_port: int | None = None, grace_s: float = 30.0,
              max_waiting: int | None = None, scheduler: str = "continuous", engine: Any = None,
              engine_overrides: Mapping[str, Any] | None = None, sample_prompt: str | None = None,
              preset: str | None = None, err: TextIO = sys.stderr) -> int:
    """Serve until SIGTERM/SIGINT (graceful drain; a second signal stops at once). `engine`:
    an EngineClient to serve instead of loading `model` (then left running: the caller owns
    it). `preset`, `engine_overrides`: see `build_engine`. `sample_prompt`: once SERVING, send
    it as a chat request through a real gRPC client and print the streamed answer (a smoke test
    a new user can watch). Main thread only (signal handlers)."""
    owned = engine is None
    for what, p in (("gRPC", port), ("metrics", metrics_port)):
        check_port_free(host, p, what)  # before the model loads, not after
    if owned:
        print(f"loading {model or 'the default model'} ...", file=err, flush=True)
        engine = build_engine(model, dtype=dtype, max_waiting=max_waiting, scheduler=scheduler,
                              preset=preset, **dict(engine_overrides or {}))
    try:
        return _serve_until_stopped(engine, host, port, metrics_port, grace_s, sample_prompt,
                                    err)
    finally:
        shutdown = getattr(engine, "shutdown", None)  # the engine's stepping thread
        if owned and shutdown is not None:
            shutdown()


def _serve_until_stopped(engine: Any, host: str, port: int, metrics_port: int | None,
                         grace_s: float, sample_prompt: str | None, err: TextIO) -> int:
    from jaxserve.server.server import serve

    handle = serve(engine, host, port, metrics_port=metrics_port, grace_s=grace_s)
    previous = handle.install_signal_handlers()
    try:
        where = f"{host}:{handle.port}"
        metrics = f", metrics on http://{host}:{handle.metrics_port}/metrics" \
            if handle.metrics_port is not None else ""
        print(f"jaxserve gRPC on {where}{metrics}; warming up ...", file=err, flush=True)
        try:
            handle.wait_ready()
        except RuntimeError as e:
            if handle.state.value == "stopped":  # a signal arrived during warmup
                return 0
            print(f"error: {e}: {e.__cause__!r}", file=err)
            handle.stop()
            return 1
        print(f"jaxserve serving on {where} (health SERVING)", file=err, flush=True)
        if sample_prompt:
            print(f"sample request over gRPC: {sample_prompt!r}", file=err, flush=True)
            try:
                run_client(f"{host}:{handle.port}", prompt=sample_prompt, chat=True,
                           sampling={"max_tokens": 64, "temperature": 0.0}, out=sys.stdout,
                           err=err)
            except JaxserveError as e:  # the server stays up; say what went wrong
                print(f"sample request failed: {e}", file=err, flush=True)
            print("serving until SIGTERM / Ctrl-C", file=err, flush=True)
        handle.wait()
        print("jaxserve stopped", file=err, flush=True)
        return 0
    finally:
        handle.restore_signal_handlers(previous)


def _summary(usage: Any, timings: Any, finish_reason: str | None) -> str:
    parts = [f"finish_reason={finish_reason}"]
    if usage is not None:
        parts.append(f"{usage.prompt_tokens} prompt + {usage.completion_tokens} tokens "
                     f"({usage.cached_prompt_tokens} cached)")
    if timings is not None:
        parts.append(f"ttft {timings.time_to_first_token_s * 1000:.0f} ms, total "
                     f"{timings.total_time_s:.2f} s")
    return "[" + ", ".join(parts) + "]"


def run_client(target: str, *, prompt: str, chat: bool = False, system: str | None = None,
               sampling: Mapping[str, Any] | None = None, json_output: bool = False,
               timeout: float | None = None, out: TextIO = sys.stdout,
               err: TextIO = sys.stderr) -> int:
    """Send one request and print the reply: streamed text (a summary on `err`), or with
    json_output one JSON object. A failed call raises ClientError (a JaxserveError)."""
    from jaxserve.client import Client

    if not prompt:
        raise JaxserveError("client needs a non-empty prompt")
    kwargs: dict[str, Any] = dict(sampling or {})
    if chat:
        messages = ([{"role": "system", "content": system}] if system else [])
        kwargs["messages"] = messages + [{"role": "user", "content": prompt}]
    else:
        kwargs["prompt"] = prompt
    with Client(target, timeout=timeout) as client:
        if json_output:
            r = client.complete(**kwargs)
            print(json.dumps({
                "request_id": r.request_id, "text": r.text, "token_ids": r.token_ids,
                "finish_reason": r.finish_reason,
                "usage": {"prompt_tokens": r.usage.prompt_tokens,
                          "completion_tokens": r.usage.completion_tokens,
                          "cached_prompt_tokens": r.usage.cached_prompt_tokens},
                "timings": {"queue_time_s": r.timings.queue_time_s,
                            "time_to_first_token_s": r.timings.time_to_first_token_s,
                            "total_time_s": r.timings.total_time_s},
                "logprobs": None if r.logprobs is None else
                [[lp, {str(k): v for k, v in top.items()}] for lp, top in r.logprobs],
            }), file=out)
            return 0
        last = None
        for chunk in client.generate(**kwargs):
            out.write(chunk.text)
            out.flush()
            last = chunk
        out.write("\n")
        if last is not None:
            print(_summary(last.usage, last.timings, last.finish_reason), file=err)
    return 0


def run_chat(target: str, *, system: str | None = None,
             sampling: Mapping[str, Any] | None = None, timeout: float | None = None,
             input_fn: Callable[[str], str] = input, out: TextIO = sys.stdout) -> int:
    """Interactive chat over the client, streaming each reply. The conversation is kept and
    re-sent each turn. /reset forgets it, /exit (or end of input) quits; Ctrl-C during a reply
    cancels that reply."""
    from jaxserve.client import Client, ClientError

    base = [{"role": "system", "content": system}] if system else []
    history = list(base)
    with Client(target, timeout=timeout) as client:
        print(f"connected to {target} ({client.model_info().name}); /reset, /exit", file=out)
        while True:
            try:
                line = input_fn("you> ").strip()
            except (EOFError, KeyboardInterrupt):
                print(file=out)
                return 0
            if not line:
                continue
            if line in ("/exit", "/quit"):
                return 0
            if line == "/reset":
                history = list(base)
                print("[conversation reset]", file=out)
                continue
            history.append({"role": "user", "content": line})
            out.write("assistant> ")
            reply = []
            stream = client.generate(messages=history, **dict(sampling or {}))
            try:
                for chunk in stream:
                    out.write(chunk.text)
                    out.flush()
                    reply.append(chunk.text)
            except ClientError as e:
                print(f"\n[error: {e}]", file=out)
                history.pop()
                continue
            except KeyboardInterrupt:
                stream.close()
                print("\n[interrupted]", file=out)
                history.pop()
                continue
            out.write("\n")
            history.append({"role": "assistant", "content": "".join(reply)})
