"""Tiny GGUF files written here, offline, for the tests of GGUF as a model source (lexalign/hub/gguf.py).

A real GGUF is tens of megabytes at the least; these are a few hundred kilobytes, written with the `gguf`
package's own writer as llama.cpp's converter writes a real one: llama.cpp's tensor names, llama's q/k rows
permuted the way its converter permutes them, the weights quantized with `gguf.quants` (F32, F16, BF16, Q8_0,
Q4_0, Q4_1, Q5_0, Q5_1), and a real byte-level BPE tokenizer (the GPT-2 scheme SmolLM2, Qwen2 and Llama 3 use)
with ChatML's special tokens and chat template in the metadata. So transformers reads them through the same code
as a downloaded file: its metadata mapping, its dequantization, its tokenizer builder.

`write_tiny_gguf` returns the state dict transformers is expected to load (quantized, then dequantized, the
permutation undone), so a test can check a conversion tensor by tensor.
"""

from __future__ import annotations

import os
from pathlib import Path

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
          " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")
"""ChatML, as SmolLM2's and Qwen2's GGUF files carry it in `tokenizer.chat_template`."""
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
"""Ids 0, 1, 2: unknown, beginning of a turn (bos), end of a turn (eos and padding), as in SmolLM2."""
WORDS = ("the", "capital", "of", "France", "is", "Paris", "Hello", "world", "user", "assistant", "system",
         "What", "you", "are", "a", "helpful", "answer", "in", "one", "sentence", "Hi", "and", "to")
"""The words the tokenizer's merges spell whole (with and without a leading space); anything else is bytes."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte as a printable character (what a byte-level BPE vocabulary holds)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def tiny_bpe_vocab() -> tuple[list[str], list[str], list[int]]:
    """(tokens, merges, token types) of a small byte-level BPE: the 3 specials, the 256 bytes, then one token per
    prefix of each word of WORDS (merged left to right), with and without GPT-2's leading-space mark `Ġ`."""
    byte_chars = _bytes_to_unicode()
    tokens = [*SPECIALS, *(byte_chars[b] for b in range(256))]
    seen = set(tokens)
    merges: list[str] = []
    for word in [*WORDS, *(" " + w for w in WORDS)]:
        spelled = "".join(byte_chars[b] for b in word.encode())
        current = spelled[0]
        for char in spelled[1:]:
            if current + char not in seen:
                merges.append(f"{current} {char}")
                tokens.append(current + char)
                seen.add(current + char)
            current += char
    control, normal = 3, 1  # gguf.TokenType.CONTROL, NORMAL
    return tokens, merges, [control] * len(SPECIALS) + [normal] * (len(tokens) - len(SPECIALS))


def _permute_for_gguf(weights, n_head: int, n_head_kv: int | None = None):
    """llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute`: Hugging Face's rotate-half q/k rows to GGUF's
    interleaved ones (transformers' GGUF loader undoes it for llama)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _unpermute(weights, n_head: int):
    """transformers' `LlamaTensorProcessor._reverse_permute_weights`: the inverse of `_permute_for_gguf`."""
    shape = weights.shape
    return weights.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(2, 1).reshape(shape)


def write_tiny_gguf(path: str | os.PathLike, *, quantize: str | None = None, with_tokenizer: bool = True,
                    architecture: str = "llama", n_layers: int = 2, hidden: int = 64, n_heads: int = 4,
                    n_kv_heads: int = 2, intermediate: int = 128, context: int = 256, tie_embeddings: bool = False,
                    seed: int = 0, std: float = 0.05) -> dict:
    """Write a tiny random-weight GGUF at `path`; return the state dict (Hugging Face names, float32 numpy
    arrays) transformers should load from it.

    quantize: None (F32), F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0 or Q5_1, for the 2-D weights (norms and biases stay
    F32, as llama.cpp leaves them); `hidden` and `intermediate` must be multiples of the type's block (32).
    architecture: llama (q/k permuted), qwen2 (q/k/v biases, nothing permuted), or any other name, written with
    llama's tensors (a file transformers cannot read: an unknown architecture). with_tokenizer: False writes no
    tokenizer metadata at all (the model alone). Each value of the returned dict is what that tensor holds after
    quantizing and dequantizing, the permutation undone.
    """
    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType as QuantType
    from gguf import LlamaFileType

    rng = np.random.default_rng(seed)
    tokens, merges, types = tiny_bpe_vocab()
    vocab = len(tokens)
    head_dim = hidden // n_heads
    qtype = QuantType[quantize.upper()] if quantize else QuantType.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if any(dim % block for dim in (hidden, intermediate, n_heads * head_dim)):
        raise ValueError(f"{qtype.name} quantizes rows in blocks of {block}: hidden and intermediate must be "
                         f"multiples of it (got {hidden}, {intermediate})")

    writer = gguf.GGUFWriter(os.fspath(path), architecture)
    writer.add_name(f"tiny-{architecture}-test")
    writer.add_context_length(context)
    writer.add_embedding_length(hidden)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_file_type(LlamaFileType.ALL_F32 if qtype == QuantType.F32 else LlamaFileType[f"MOSTLY_{qtype.name}"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if with_tokenizer:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)
        writer.add_pad_token_id(2)
        writer.add_add_bos_token(False)
        writer.add_chat_template(CHATML)

    expected: dict = {}

    def weights(*shape):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def put(gguf_name: str, hf_name: str, value, heads: int | None = None):
        """`value` in Hugging Face's (out, in) orientation; `heads`: llama's q/k, permuted over that many heads."""
        stored = _permute_for_gguf(value, heads) if heads else value
        if value.ndim == 1 or qtype == QuantType.F32:
            writer.add_tensor(gguf_name, np.ascontiguousarray(stored, dtype=np.float32))
            loaded = stored.astype(np.float32)
        elif qtype == QuantType.F16:
            writer.add_tensor(gguf_name, stored.astype(np.float16))
            loaded = stored.astype(np.float16).astype(np.float32)
        else:
            packed = gguf.quants.quantize(np.ascontiguousarray(stored), qtype)
            writer.add_tensor(gguf_name, packed, raw_shape=packed.shape, raw_dtype=qtype)
            loaded = gguf.quants.dequantize(packed, qtype).reshape(stored.shape).astype(np.float32)
        # Permuting rows commutes with quantizing row by row: the permutation undone gives the loaded tensor.
        expected[hf_name] = _unpermute(loaded, heads) if heads else loaded

    permuted = architecture == "llama"
    put("token_embd.weight", "model.embed_tokens.weight", weights(vocab, hidden))
    for i in range(n_layers):
        gguf_layer, hf_layer = f"blk.{i}.", f"model.layers.{i}."
        put(gguf_layer + "attn_norm.weight", hf_layer + "input_layernorm.weight", 1 + weights(hidden))
        put(gguf_layer + "attn_q.weight", hf_layer + "self_attn.q_proj.weight", weights(n_heads * head_dim, hidden),
            heads=n_heads if permuted else None)
        put(gguf_layer + "attn_k.weight", hf_layer + "self_attn.k_proj.weight", weights(n_kv_heads * head_dim, hidden),
            heads=n_kv_heads if permuted else None)
        put(gguf_layer + "attn_v.weight", hf_layer + "self_attn.v_proj.weight", weights(n_kv_heads * head_dim, hidden))
        if architecture == "qwen2":
            put(gguf_layer + "attn_q.bias", hf_layer + "self_attn.q_proj.bias", weights(n_heads * head_dim))
            put(gguf_layer + "attn_k.bias", hf_layer + "self_attn.k_proj.bias", weights(n_kv_heads * head_dim))
            put(gguf_layer + "attn_v.bias", hf_layer + "self_attn.v_proj.bias", weights(n_kv_heads * head_dim))
        put(gguf_layer + "attn_output.weight", hf_layer + "self_attn.o_proj.weight",
            weights(hidden, n_heads * head_dim))
        put(gguf_layer + "ffn_norm.weight", hf_layer + "post_attention_layernorm.weight", 1 + weights(hidden))
        put(gguf_layer + "ffn_gate.weight", hf_layer + "mlp.gate_proj.weight", weights(intermediate, hidden))
        put(gguf_layer + "ffn_up.weight", hf_layer + "mlp.up_proj.weight", weights(intermediate, hidden))
        put(gguf_layer + "ffn_down.weight", hf_layer + "mlp.down_proj.weight", weights(hidden, intermediate))
    put("output_norm.weight", "model.norm.weight", 1 + weights(hidden))
    if tie_embeddings:  # no output.weight: transformers ties the head to the embeddings
        expected["lm_head.weight"] = expected["model.embed_tokens.weight"]
    else:
        put("output.weight", "lm_head.weight", weights(vocab, hidden))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def cut(path: str | os.PathLike, size: int, out: str | os.PathLike) -> Path:
    """A copy of the first `size` bytes of `path` at `out`: a download interrupted there."""
    out = Path(out)
    with open(path, "rb") as source:
        out.write_bytes(source.read(size))
    return out
