"""The zoo (testkit/zoo.py): each tiny family loads like a real checkpoint and has the real family's traits.

These tests pin the traits LexAlign has to cope with (doubled BOS, no BOS, no pad, pad == eos, byte fallback,
a template that raises on or drops a system turn, several end-of-generation ids, ...), so a change to the zoo
that loses one fails here rather than silently weakening the tests that use the zoo.
"""

from __future__ import annotations

import json

import pytest

from testkit import zoo
from testkit.zoo import FAMILIES, TRAITS

TEMPLATED = [f for f in FAMILIES if TRAITS[f]["has_template"]]
SENTENCEPIECE = [f for f in FAMILIES if TRAITS[f]["kind"] == "sentencepiece"]
BYTE_LEVEL = [f for f in FAMILIES if TRAITS[f]["kind"] == "byte_level"]
USER = [{"role": "user", "content": "Say hello to Alice."}]
CHAT = USER + [{"role": "assistant", "content": "Hello Alice!"}]
SAMPLES = ["Hello world", " leading space", "café naïve 東京 🎉\n\nnew  paragraph", "It's 3.14, isn't it? 123456",
           "<|user|>\nHi<|end|>\n", "<s> [INST] Hi [/INST]", "\tTabs and trailing spaces  "]


def tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def input_ids(encoded) -> list[int]:
    """apply_chat_template(tokenize=True) returns a BatchEncoding in transformers 5 and a list before."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def leading(ids: list[int], token_id: int) -> int:
    count = 0
    while count < len(ids) and ids[count] == token_id:
        count += 1
    return count


def test_families_and_traits_agree():
    assert FAMILIES == ("llama3", "qwen2", "mistral", "gemma", "phi3", "gpt2", "gpt_neox")
    assert set(TRAITS) == set(FAMILIES)
    with pytest.raises(ValueError, match="unknown family"):
        zoo.build("llama4", "unused")


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_offline_and_generates(zoo_models, family):
    import torch
    from transformers import AutoModelForCausalLM

    path = zoo_models(family)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= {p.name for p in path.iterdir()}
    assert not (path / "chat_template.jinja").exists()  # the template is inside tokenizer_config.json
    tok = tokenizer(path)
    assert tok.is_fast
    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == TRAITS[family]["architecture"]
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert model.config.vocab_size >= len(tok)
    assert (model.config.vocab_size > len(tok)) == TRAITS[family]["padded_vocab"]

    enc = tok(["Say hello to Alice."], return_tensors="pt")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=pad)
    assert enc["input_ids"].shape[1] < out.shape[1] <= enc["input_ids"].shape[1] + 4
    assert int(out.max()) < model.config.vocab_size


@pytest.mark.parametrize("family", FAMILIES)
def test_special_tokens(zoo_models, family):
    traits = TRAITS[family]
    tok = tokenizer(zoo_models(family))
    assert tok.bos_token == traits["bos"]
    assert tok.eos_token == traits["eos"]
    assert tok.unk_token == traits["unk"]
    if traits["pad"] is None:
        assert tok.pad_token is None and tok.pad_token_id is None
    elif traits["pad"] == "eos":
        assert tok.pad_token == tok.eos_token and tok.pad_token_id == tok.eos_token_id
    else:
        assert tok.pad_token == traits["pad"] and tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == traits["padding_side"]
    for token in (traits["bos"], traits["eos"], traits["unk"]):
        if token is not None:  # a single id, and one the model can embed
            assert tok.convert_tokens_to_ids(token) < len(tok)
            assert tok.convert_tokens_to_ids(token) == tok.convert_tokens_to_ids([token])[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_adds_bos_or_not(zoo_models, family):
    tok = tokenizer(zoo_models(family))
    ids = tok("Hello world").input_ids
    plain = tok("Hello world", add_special_tokens=False).input_ids
    if TRAITS[family]["tokenizer_adds_bos"]:
        assert ids == [tok.bos_token_id] + plain
    else:
        assert ids == plain
        if tok.bos_token_id is not None:
            assert tok.bos_token_id not in ids


@pytest.mark.parametrize("family", TEMPLATED)
def test_bos_from_template_and_from_tokenizer(zoo_models, family):
    """apply_chat_template(tokenize=True) does not add special tokens, so a template that writes bos gives ONE;
    tokenizing the rendered text again with the default add_special_tokens=True gives TWO where the tokenizer
    also adds it: the doubled-BOS trap (llama3, mistral, gemma, phi3). Qwen2 has no bos at all."""
    traits = TRAITS[family]
    tok = tokenizer(zoo_models(family))
    ids = input_ids(tok.apply_chat_template(USER, tokenize=True, add_generation_prompt=True))
    text = tok.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    retokenized = tok(text).input_ids
    if traits["bos"] is None:
        assert tok.bos_token is None
        assert ids == retokenized == tok(text, add_special_tokens=False).input_ids
        return
    bos = tok.bos_token_id
    assert text.startswith(traits["bos"]) == traits["template_writes_bos"]
    assert leading(ids, bos) == int(traits["template_writes_bos"])
    assert leading(retokenized, bos) == int(traits["template_writes_bos"]) + int(traits["tokenizer_adds_bos"])
    assert tok(text, add_special_tokens=False).input_ids == ids


def test_llama3_doubled_bos_trap(zoo_models):
    """The case LexAlign must avoid, spelt out on Llama-3: render with the template, then tokenize the text."""
    tok = tokenizer(zoo_models("llama3"))
    bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
    ids = input_ids(tok.apply_chat_template(USER, tokenize=True, add_generation_prompt=True))
    assert ids[0] == bos and ids[1] != bos
    text = tok.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    assert tok(text).input_ids[:2] == [bos, bos]
    assert tok(text, add_special_tokens=False).input_ids == ids


@pytest.mark.parametrize("family", SENTENCEPIECE)
def test_sentencepiece_byte_fallback(zoo_models, family):
    tok = tokenizer(zoo_models(family))
    vocab = tok.get_vocab()
    assert all(f"<0x{b:02X}>" in vocab for b in range(256))
    assert any(piece.startswith("▁") and len(piece) > 1 for piece in vocab)
    assert not any(piece.startswith("Ġ") for piece in vocab)
    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    assert model["type"] == "BPE" and model["byte_fallback"] is True and model["unk_token"] == "<unk>"
    # 東 and 京 were never learnt (the SentencePiece-style alphabet stops at U+00FF), so they MUST fall back to
    # their UTF-8 bytes; without byte fallback they would be <unk>.
    assert "東" not in vocab and "京" not in vocab
    ids = tok("東京", add_special_tokens=False).input_ids
    assert tok.unk_token_id not in ids
    pieces = [p for p in tok.convert_ids_to_tokens(ids) if p != "▁"]
    assert pieces == [f"<0x{b:02X}>" for b in "東京".encode()]
    assert tok.decode(ids) == "東京"
    mixed = "Café naïve 東京 🎉"
    mixed_ids = tok(mixed, add_special_tokens=False).input_ids
    assert tok.unk_token_id not in mixed_ids and tok.decode(mixed_ids) == mixed


@pytest.mark.parametrize("family", BYTE_LEVEL)
def test_byte_level_has_no_unknowns(zoo_models, family):
    from tokenizers.pre_tokenizers import ByteLevel

    tok = tokenizer(zoo_models(family))
    vocab = tok.get_vocab()
    assert set(ByteLevel.alphabet()) <= set(vocab)  # every byte is a token
    assert not any(piece.startswith("<0x") for piece in vocab)
    assert any(piece.startswith("Ġ") for piece in vocab)
    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    assert model["byte_fallback"] is False
    text = "Café naïve 東京 🎉\n\tdone"
    ids = tok(text, add_special_tokens=False).input_ids
    if tok.unk_token_id is not None:
        assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text


@pytest.mark.parametrize("family", FAMILIES)
def test_loaded_tokenizer_matches_tokenizer_json(zoo_models, family):
    """transformers 5 rebuilds some tokenizer classes (Qwen2, Gemma, GPT-2, GPT-NeoX) from the vocabulary and
    merges with its own pre-tokenizer; the zoo's tokenizer.json must say the same, so both readers agree."""
    from tokenizers import Tokenizer

    path = zoo_models(family)
    tok = tokenizer(path)
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    for text in SAMPLES:
        assert tok(text).input_ids == raw.encode(text).ids, text


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_no_chat_template(zoo_models, family):
    path = zoo_models(family)
    tok = tokenizer(path)
    assert tok.chat_template is None
    assert "chat_template" not in json.loads((path / "tokenizer_config.json").read_text())
    with pytest.raises(ValueError):
        tok.apply_chat_template(USER, tokenize=False)


@pytest.mark.parametrize("family", TEMPLATED)
def test_template_is_in_tokenizer_config(zoo_models, family):
    config = json.loads((zoo_models(family) / "tokenizer_config.json").read_text())
    assert config["chat_template"] == {
        "llama3": zoo.LLAMA31_TEMPLATE, "qwen2": zoo.QWEN25_TEMPLATE, "mistral": zoo.MISTRAL_V02_TEMPLATE,
        "gemma": zoo.GEMMA2_TEMPLATE, "phi3": zoo.PHI3_TEMPLATE}[family]


@pytest.mark.parametrize("family", TEMPLATED)
def test_system_turn(zoo_models, family):
    from jinja2.exceptions import TemplateError

    tok = tokenizer(zoo_models(family))
    system = [{"role": "system", "content": "Always be brief."}] + USER
    behaviour = TRAITS[family]["system_turn"]
    if behaviour == "raises":
        with pytest.raises(TemplateError, match="System role not supported"):
            tok.apply_chat_template(system, tokenize=False, add_generation_prompt=True)
        return
    text = tok.apply_chat_template(system, tokenize=False, add_generation_prompt=True)
    if behaviour == "dropped":
        assert "Always be brief." not in text
        assert text == tok.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    elif behaviour == "merged":  # Mistral: inside the first [INST] block, before the user message
        assert "[INST] Always be brief.\n\nSay hello to Alice. [/INST]" in text
    else:
        assert behaviour == "supported"
        assert text.index("Always be brief.") < text.index("Say hello to Alice.")


@pytest.mark.parametrize("family", TEMPLATED)
def test_default_system_block(zoo_models, family):
    text = tokenizer(zoo_models(family)).apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    default = {"llama3": "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n",
               "qwen2": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."}
    if TRAITS[family]["default_system"]:
        assert default[family] in text
    else:
        assert "system" not in text


@pytest.mark.parametrize("family", TEMPLATED)
def test_generation_prompt_and_turn_end(zoo_models, family):
    tok = tokenizer(zoo_models(family))
    prompt = tok.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    expected_end = {"llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n", "qwen2": "<|im_start|>assistant\n",
                    "mistral": "Say hello to Alice. [/INST]", "gemma": "<start_of_turn>model\n",
                    "phi3": "<|end|>\n<|assistant|>\n"}[family]
    assert prompt.endswith(expected_end)
    full = tok.apply_chat_template(CHAT, tokenize=False)
    turn_end = TRAITS[family]["turn_end"]
    assert "Hello Alice!" + turn_end in full
    # ... and generation stops there: the turn end is one of generation_config's end ids.
    from transformers import GenerationConfig

    end_ids = GenerationConfig.from_pretrained(zoo_models(family)).eos_token_id
    assert tok.convert_tokens_to_ids(turn_end) in (end_ids if isinstance(end_ids, list) else [end_ids])


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_config_end_ids(zoo_models, family):
    from transformers import GenerationConfig

    path = zoo_models(family)
    tok = tokenizer(path)
    generation = GenerationConfig.from_pretrained(path)
    want = [tok.convert_tokens_to_ids(t) for t in TRAITS[family]["end_ids"]]
    got = generation.eos_token_id
    assert (got if isinstance(got, list) else [got]) == want
    assert tok.eos_token_id in want
    assert bool(generation.do_sample) == TRAITS[family]["samples_by_default"]
    # The real ids, relative to the base vocabulary V (the specials are added after it):
    # Llama-3.1 [128001, 128008, 128009], Qwen2.5 [151645, 151643], Phi-3 [32000, 32001, 32007].
    base = tok.vocab_size
    relative = {"llama3": [1, 8, 9], "qwen2": [2, 0], "phi3": [0, 1, 7]}
    if family in relative:
        assert want == [base + i for i in relative[family]]


def test_phi3_special_tokens_eat_the_following_newline(zoo_models):
    """Phi-3's <|user|>/<|assistant|>/<|end|>/<|system|> are rstrip=True added tokens: the "\\n" the template
    writes after them disappears on tokenization, so decode(encode(rendered)) != rendered."""
    tok = tokenizer(zoo_models("phi3"))
    text = tok.apply_chat_template(CHAT, tokenize=False)
    ids = tok(text, add_special_tokens=False).input_ids
    assert "\n" in text and tok.decode(ids) == text.replace("\n", "")
    def encode(s: str) -> list[int]:
        return tok(s, add_special_tokens=False).input_ids

    assert encode("<|end|>\nHi") == encode("<|end|>Hi")


@pytest.mark.parametrize("family", [f for f in TEMPLATED if f != "phi3"])
def test_rendered_chat_round_trips(zoo_models, family):
    tok = tokenizer(zoo_models(family))
    text = tok.apply_chat_template(CHAT, tokenize=False)
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text


@pytest.mark.parametrize("family", FAMILIES)
def test_build_is_deterministic(tmp_path, family):
    first = zoo.build(family, tmp_path / "a", seed=0)
    second = zoo.build(family, tmp_path / "b", seed=0)
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
