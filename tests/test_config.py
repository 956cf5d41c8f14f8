"""configs/ files load into frozen, hashable dataclasses; anything malformed is a ConfigError
naming the field or file."""

import dataclasses
import json

import pytest

from jaxserve import config
from jaxserve.config import EngineConfig, ModelConfig, RopeScaling
from jaxserve.errors import ConfigError


def test_every_shipped_config_loads():
    for path in sorted((config.CONFIGS_DIR / "models").glob("*.json")):
        src = config.load_model_source(path.stem)
        assert src.name == path.stem and isinstance(src.engine_config(), EngineConfig)
    presets = [EngineConfig(**config.load_serve_preset(p.stem))
               for p in sorted((config.CONFIGS_DIR / "serve").glob("*.json"))]
    assert presets and all(hash(p) == hash(dataclasses.replace(p)) for p in presets)


def test_shipped_presets_set_engine_config_fields():
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    for path in sorted((config.CONFIGS_DIR / "serve").glob("*.json")):
        data = json.loads(path.read_text())
        assert data and set(data) <= fields, path
        assert config.load_serve_preset(path.stem) == data, path  # exactly what the file sets
    assert config.load_serve_preset("cpu-small")["unroll_layers"] is True


def test_preset_gives_only_its_fields_normalised_and_checked(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "CONFIGS_DIR", tmp_path)
    (tmp_path / "serve").mkdir()
    (tmp_path / "serve" / "small.json").write_text(
        json.dumps({"max_num_seqs": 4, "prefill_buckets": [16, 32]}))
    assert config.load_serve_preset("small") == {"max_num_seqs": 4, "prefill_buckets": (16, 32)}
    (tmp_path / "serve" / "odd.json").write_text(json.dumps({"page_size": 12}))
    with pytest.raises(ConfigError, match="page_size must be a power of two"):
        config.load_serve_preset("odd")
    (tmp_path / "serve" / "list.json").write_text("[]")
    with pytest.raises(ConfigError, match="list.json: expected a JSON object"):
        config.load_serve_preset("list")


def test_unknown_name_unknown_field_and_bad_json(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "CONFIGS_DIR", tmp_path)
    (tmp_path / "serve").mkdir()
    (tmp_path / "serve" / "typo.json").write_text(json.dumps({"page_sise": 16}))
    (tmp_path / "serve" / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match="page_sise"):
        config.load_serve_preset("typo")
    with pytest.raises(ConfigError, match="invalid JSON"):
        config.load_serve_preset("broken")
    with pytest.raises(ConfigError, match=r"known: \['broken', 'typo'\]"):
        config.load_serve_preset("missing")


@pytest.mark.parametrize("field,value", [("dtype", "float8"), ("page_size", 12),
                                         ("num_pages", 1), ("kernels", "fast"),
                                         ("prefill_buckets", (64, 32)),
                                         ("quantization", "int3"), ("quant_group_size", 48),
                                         ("quant_method", "gptq"), ("kv_cache_dtype", "fp8"),
                                         ("max_num_batched_tokens", 0)])
def test_invalid_engine_values(field, value):
    with pytest.raises(ConfigError, match=field):
        EngineConfig(**{field: value})


def test_quant_group_size_defaults_and_w8a8():
    """No group size: the mode's default (int4 128, int8 per channel), left to the loader;
    int8 takes 32/64/128 as int4 does; w8a8 (per-channel weights) takes none."""
    assert EngineConfig().quant_group_size is None
    assert EngineConfig(quantization="int8", quant_group_size=32).quant_group_size == 32
    assert EngineConfig(quantization="int4").quant_group_size is None
    with pytest.raises(ConfigError, match="quant_group_size .*w8a8"):
        EngineConfig(quantization="w8a8", quant_group_size=64)


def test_awq_needs_a_rounding_mode():
    with pytest.raises(ConfigError, match="awq needs quantization"):
        EngineConfig(quant_method="awq")
    with pytest.raises(ConfigError, match="awq needs quantization"):
        EngineConfig(quant_method="awq", quantization="gguf")
    assert EngineConfig(quant_method="awq", quantization="int4").quant_method == "awq"


def test_engine_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        EngineConfig().page_size = 32


HF_LLAMA3 = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
             "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "rope_theta": 500000.0, "eos_token_id": [128001, 128009],
             "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
             "max_position_embeddings": 131072}


def test_from_hf_config_variants():
    cfg = ModelConfig.from_hf_config(HF_LLAMA3)
    assert (cfg.head_dim, cfg.q_per_kv, cfg.eos_token_ids) == (128, 4, (128001, 128009))
    assert cfg.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    qwen = ModelConfig.from_hf_config({**HF_LLAMA3, "model_type": "qwen2", "rope_scaling": None,
                                       "sliding_window": 4096, "use_sliding_window": False})
    assert qwen.attention_bias and qwen.sliding_window is None and qwen.rope_scaling is None
    mistral = ModelConfig.from_hf_config({**HF_LLAMA3, "model_type": "mistral",
                                          "rope_scaling": None, "sliding_window": 4096})
    assert mistral.sliding_window == 4096 and not mistral.attention_bias


def test_from_hf_config_errors():
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        ModelConfig.from_hf_config({k: v for k, v in HF_LLAMA3.items()
                                    if k != "num_hidden_layers"})
    with pytest.raises(ConfigError, match="gpt_neox"):
        ModelConfig.from_hf_config({**HF_LLAMA3, "model_type": "gpt_neox"})
    with pytest.raises(ConfigError, match="num_kv_heads"):
        ModelConfig.from_hf_config({**HF_LLAMA3, "num_key_value_heads": 5})


@pytest.mark.parametrize("kw,match", [
    ({"speculative_method": "no such"}, "proposer name"),
    ({"speculative_method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"speculative_method": "ngram", "num_speculative_tokens": 17}, "num_speculative_tokens"),
    ({"speculative_method": "ngram", "prompt_lookup_min": 3, "prompt_lookup_max": 2},
     "prompt_lookup"),
    ({"speculative_method": "ngram", "speculative_quantization": "int8"}, "draft_model"),
    ({"speculative_method": "draft_model", "speculative_quantization": "int3"},
     "speculative_quantization"),
    ({"speculative_method": "draft_model", "speculative_num_layers": 0}, "num_layers"),
    ({"speculative_cost_tokens": -1.0}, "cost_tokens"),
])
def test_invalid_speculative_settings(kw, match):
    with pytest.raises(ConfigError, match=match):
        EngineConfig(**kw)


def test_num_speculative_tokens_per_request_is_validated():
    from jaxserve.engine.sampling_params import SamplingParams
    from jaxserve.errors import InvalidRequestError

    assert SamplingParams(num_speculative_tokens=0).num_speculative_tokens == 0
    for bad in (-1, 17, 2.5, True):
        with pytest.raises(InvalidRequestError, match="num_speculative_tokens"):
            SamplingParams(num_speculative_tokens=bad)
