"""Tiny random-init models of the five architectures, built from configs (no downloads)."""
from __future__ import annotations

import torch
from transformers import (
    BloomConfig,
    BloomForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

ARCHS = ("llama", "gpt_neox", "gpt2", "opt", "bloom")


def tiny_model(arch: str, vocab: int = 97, seed: int = 0, layers: int = 2, dim: int = 32,
               dtype=None, positions: int = 128):
    """A random-init causal LM, float64 so that greedy ties cannot flip between code paths.

    BLOOM stays float32: transformers' eager BLOOM attention turns left-padded rows into NaN in
    float64 (its own ``generate`` fails the same way), not in float32.
    """
    dtype = dtype or (torch.float32 if arch == "bloom" else torch.float64)
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  tie_word_embeddings=False)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=positions, **common)
        model = LlamaForCausalLM(cfg)
    elif arch == "gpt_neox":
        cfg = GPTNeoXConfig(hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=layers,
                            num_attention_heads=4, max_position_embeddings=positions, **common)
        model = GPTNeoXForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=dim, n_layer=layers, n_head=4, n_positions=positions, **common)
        model = GPT2LMHeadModel(cfg)
    elif arch == "opt":
        cfg = OPTConfig(hidden_size=dim, ffn_dim=2 * dim, num_hidden_layers=layers,
                        num_attention_heads=4, max_position_embeddings=positions,
                        word_embed_proj_dim=dim, **common)
        model = OPTForCausalLM(cfg)
    elif arch == "bloom":
        cfg = BloomConfig(hidden_size=dim, n_layer=layers, n_head=4, **common)
        cfg._attn_implementation = "eager"
        model = BloomForCausalLM(cfg)
    else:
        raise ValueError(arch)
    with torch.no_grad():                       # sharper logits than the default init
        model.get_output_embeddings().weight.mul_(4.0)
    return model.to(dtype).eval()


def noisy_copy(model, scale: float, seed: int = 1):
    """A draft that agrees with ``model`` only part of the time: its weights plus noise."""
    draft = type(model)(model.config).to(model.dtype).eval()
    draft.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale * p.std().clamp(min=1e-3))
    return draft


def never_agreeing_pair(model):
    """(target, draft) where the greedy draft always proposes token 0 and the target never picks it."""
    draft = type(model)(model.config).to(model.dtype).eval()
    draft.load_state_dict(model.state_dict())
    with torch.no_grad():
        model.get_output_embeddings().weight[0].zero_()     # target logit of token 0 is 0 ...
        draft.get_output_embeddings().weight.zero_()        # ... draft logits all 0: argmax is 0
    return model, draft


def left_padded_batch(vocab: int, lengths, seed: int = 0, pad: int = 0):
    """input_ids [B, T] and mask [B, T] of random prompts of the given lengths, left-padded."""
    gen = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), pad, dtype=torch.long)
    mask = torch.zeros((len(lengths), T), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, T - n:] = torch.randint(3, vocab, (n,), generator=gen)
        mask[i, T - n:] = 1
    return ids, mask


def greedy_reference(model, ids, mask, max_new_tokens, eos_token_id=None):
    """Plain greedy decoding: the whole sequence re-run every step, no cache, one row at a time."""
    out = []
    for row, m in zip(ids, mask):
        seq = row[m.bool()].unsqueeze(0)
        new = []
        with torch.no_grad():
            for _ in range(max_new_tokens):
                tok = int(model(input_ids=seq).logits[0, -1].argmax())
                new.append(tok)
                if tok == eos_token_id:
                    break
                seq = torch.cat([seq, torch.tensor([[tok]])], dim=1)
        out.append(new)
    return out


def tiny_tokenizer(words: str = "The quick brown fox jumps over the lazy dog.", size: int = 300):
    """A small byte-level BPE tokenizer trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [words, "Speculative decoding drafts tokens.",
            "A small draft model proposes, the large target verifies."] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=size, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", padding_side="left")


def save_tiny_pair(folder, arch: str = "llama", draft_extra_rows: int = 0, positions: int = 64,
                   other_draft_tokenizer: bool = False):
    """A target/draft pair saved as Hugging Face folders, each with its tokenizer.

    ``draft_extra_rows``: the draft's embeddings are padded by that many rows (same tokenizer, as
    real pairs do); ``other_draft_tokenizer``: the draft gets a tokenizer of its own.
    """
    fast = tiny_tokenizer()
    paths = {}
    for role, seed in (("target", 0), ("draft", 1)):
        tok = tiny_tokenizer("Pack my box with five dozen liquor jugs!", 280) \
            if role == "draft" and other_draft_tokenizer else fast
        v = len(tok) + (draft_extra_rows if role == "draft" else 0)
        model = tiny_model(arch, vocab=v, seed=seed, dtype=torch.float32, positions=positions)
        path = str(folder / role)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        paths[role] = path
    return paths
