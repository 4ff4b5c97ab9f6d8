"""int8 storage of a model folder (per-row scales, dequantized at load): what the embedded target
uses so that the repository fits a lent GPU machine."""
import os

import pytest
import torch
from safetensors.torch import load_file
from tiny import greedy_reference, left_padded_batch, tiny_model
from transformers import LlamaConfig, LlamaForCausalLM

from sampling import generate
from sampling.app.models import INT8_WEIGHTS, is_int8_folder, load_model, save_int8
from sampling.storage import dequantize_int8, quantize_int8


def tied_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def test_quantize_round_trip_within_half_a_step_and_the_scale_rounding():
    gen = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(7, 33, generator=gen), "b": torch.randn(7, generator=gen)}
    stored = quantize_int8(state)
    assert stored["w"].dtype == torch.int8 and stored["b"].dtype == torch.float16
    back = dequantize_int8(stored)
    step = state["w"].abs().amax(1, keepdim=True) / 127
    # half a step, plus the float16 scale's rounding (2^-11 relative) times up to 127 steps
    assert ((back["w"] - state["w"]).abs() <= step * (0.5 + 127 * 2 ** -11)).all()
    assert set(back) == {"w", "b"}


@pytest.mark.parametrize("model", [tied_llama, lambda: tiny_model("gpt2", dtype=torch.float32)],
                         ids=["llama-tied", "gpt2"])
def test_int8_folder_loads_as_the_dequantized_model(model, tmp_path):
    m = model()
    m.save_pretrained(str(tmp_path))                     # float weights, replaced by the int8 file
    save_int8(m, str(tmp_path))
    assert is_int8_folder(tmp_path) and sorted(p for p in os.listdir(tmp_path) if "safetensors" in p) == [INT8_WEIGHTS]
    stored = load_file(str(tmp_path / INT8_WEIGHTS))
    assert sum(v.dtype == torch.int8 for v in stored.values()) >= 4
    if m.config.tie_word_embeddings:                     # tied weights stored once
        assert not any(k.startswith("lm_head") for k in stored)
    loaded = load_model(str(tmp_path), device="cpu", dtype="float32")
    want = dequantize_int8(quantize_int8(m.state_dict()))
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, want[k])
    ids, mask = left_padded_batch(m.config.vocab_size, (5, 3), seed=1)
    ref = greedy_reference(loaded, ids, mask, 6)
    assert generate(loaded, ids, mask, draft_model=loaded, mode="google", max_new_tokens=6, temperature=0).tokens == ref


def test_int8_folder_of_another_architecture_is_a_one_line_error(tmp_path):
    save_int8(tied_llama(), str(tmp_path))
    cfg = LlamaConfig.from_pretrained(str(tmp_path))
    cfg.num_hidden_layers = 3                            # the weights hold 2 layers
    cfg.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="int8 weights do not fit its config"):
        load_model(str(tmp_path), device="cpu")
