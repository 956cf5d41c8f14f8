"""gRPC serving: the `jaxserve.v1.Inference` service over any `EngineClient`.

Files:
  inference.proto         the API (package jaxserve.v1); field names are a contract
  inference_pb2*.py/.pyi  generated stubs, committed; regenerate after editing the proto with
                              python -m jaxserve.server.gen_protos
                          (grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=.
                          jaxserve/server/inference.proto, from the repository root)
  server.py               servicer, health, reflection, lifecycle (`serve`, `start_server`)
  metrics.py              Prometheus metrics, one registry per server
  commands.py             what `jaxserve serve`, `jaxserve chat` and `jaxserve client` run

The client lives in `jaxserve.client`. Nothing here imports model code; the servicer talks to
the engine only through `jaxserve.engine.protocol.EngineClient`.

Attributes resolve lazily so that importing the stubs (as the client does) stays light.
"""

__all__ = ["serve", "start_server", "Server", "ServerHandle"]


def __getattr__(name: str):
    if name in __all__:
        from jaxserve.server import server

        return getattr(server, name)
    raise AttributeError(f"module 'jaxserve.server' has no attribute {name!r}")
