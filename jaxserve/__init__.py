"""jaxserve: LLM inference on JAX/XLA. Public facade: `LLM`, `SamplingParams`, `EngineConfig`.

Attributes resolve lazily, so importing a jax-free submodule (the block manager, the
scheduler) does not pull in jax through this package's __init__."""

__all__ = ["LLM", "SamplingParams", "EngineConfig", "ModelConfig"]


def __getattr__(name: str):
    if name == "LLM":
        from jaxserve.llm import LLM

        return LLM
    if name == "SamplingParams":
        from jaxserve.engine.sampling import SamplingParams

        return SamplingParams
    if name in ("EngineConfig", "ModelConfig"):
        from jaxserve import config

        return getattr(config, name)
    raise AttributeError(f"module 'jaxserve' has no attribute {name!r}")
