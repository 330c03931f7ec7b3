"""Build the demo model: a tiny Llama with a byte-level BPE tokenizer, offline.

The tokenizer is trained on the demo corpus with the `tokenizers` library and
the model is randomly initialised, so nothing is fetched from the Hub.
"""

from __future__ import annotations

from pathlib import Path

from lexalign.demo import task

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
# A deliberately small vocabulary: the corpus has ~50 names and a handful of
# templates, so 384 merges cover every word and keep the embedding table tiny.
VOCAB_SIZE = 384

# A minimal chat template so conversational datasets work with the demo model
# (role-tagged lines, generation prompt "Assistant:").
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}{% if message['role'] == 'assistant' %}"
    "{{ eos_token }}{% endif %}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def build_tokenizer(seed: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(task.corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tokenizer, seed: int, hidden_size: int = 64, layers: int = 2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        # LoRA trains neither the (tied) embedding nor the final norm, so the
        # logit scale is fixed at init: with the usual 0.02, |logit| < 0.2 and
        # every next-token distribution stays near uniform. 0.1 lets a LoRA-only
        # SFT reach a confident model.
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def write_demo_model(out_dir: Path, seed: int) -> dict:
    """Save tokenizer and randomly initialised model to `out_dir`; return a summary."""
    tokenizer = build_tokenizer(seed)
    model = build_model(tokenizer, seed)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {"parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer)}
