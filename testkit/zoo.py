"""A zoo of tiny random-weight models of real architectures, with tokenizers that have the real ones' traits.

The tests build the families on demand (`tests/conftest.py`: `zoo_models`; `tests/test_zoo.py` checks the
traits) and so do the benchmarks (`benchmarks/bench_job_vs_trl.py`), which import nothing from tests/. Everything is built offline: each tokenizer is a BPE trained here with the `tokenizers`
library on the demo corpus plus `EXTRA_TEXT`, then laid out (special tokens, byte-fallback pieces, id order,
pre-tokenizer, post-processor, `tokenizer_config.json`) like the real family's, and saved with
`save_pretrained` so that `AutoTokenizer.from_pretrained` takes the same code path as for the real checkpoint.
The models are the real architecture classes with 40-70 thousand random parameters (hidden 32, two layers).

What each family reproduces is summarised in `TRAITS`; the chat templates are the real ones, verbatim
(each constant says where it was copied from).
"""

# The chat templates below are kept verbatim, so some of their lines are longer than 120 characters.
# ruff: noqa: E501

from __future__ import annotations

import json
from pathlib import Path

FAMILIES = ("llama3", "qwen2", "mistral", "gemma", "phi3", "gpt2", "gpt_neox")

# transformers' "no limit set" model_max_length: what checkpoints without one in tokenizer_config load with.
VERY_LARGE_INTEGER = int(1e30)

# ---------------------------------------------------------------------------------------------------------
# Chat templates, verbatim.
# ---------------------------------------------------------------------------------------------------------

# meta-llama/Llama-3.1-8B-Instruct (tokenizer_config.json `chat_template`). Copied from llama.cpp's
# models/templates/meta-llama-Llama-3.3-70B-Instruct.jinja: Llama-3.3 ships Llama-3.1's template unchanged.
# It writes `bos_token` itself (while the tokenizer also adds it) and always writes a system header.
LLAMA31_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\\n\\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Qwen/Qwen2.5-7B-Instruct (tokenizer_config.json `chat_template`): Qwen2.5's ChatML template with tool
# support, whose default system message (written when the conversation has none) is Qwen's own line. The
# text follows the Qwen2.5 template as published in public repositories (e.g. jacksonsc007/frugal-agent
# utils/others/chat_template.py quotes the Instruct system line; the rest is Qwen2.5's, unchanged).
QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# mistralai/Mistral-7B-Instruct-v0.2 (tokenizer_config.json `chat_template`, the revision with the optional
# system message; Mixtral-8x7B-Instruct-v0.1 ships the same text). Quoted verbatim in several public
# repositories (e.g. vLLM's serving_chat log of the loaded template). Writes `bos_token`, puts the system
# message inside the first [INST], ends every answer with `eos_token`, and has no generation prompt: a
# prompt simply ends with " [/INST]".
MISTRAL_V02_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

# google/gemma-2-2b-it (tokenizer_config.json `chat_template`), from llama.cpp's
# models/templates/google-gemma-2-2b-it.jinja. Writes `bos_token`, raises on a system turn, calls the
# assistant "model", and trims every message.
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# microsoft/Phi-3-mini-4k-instruct, the template it was released with (April 2024; a GGUF metadata test in a
# public repository quotes it verbatim). Writes `bos_token`, silently DROPS system messages (no branch for
# them), and writes the generation prompt "<|assistant|>\n" after every user turn whatever
# add_generation_prompt says.
PHI3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') %}"
    "{{'<|user|>' + '\n' + message['content'] + '<|end|>' + '\n' + '<|assistant|>' + '\n'}}"
    "{% elif (message['role'] == 'assistant') %}{{message['content'] + '<|end|>' + '\n'}}{% endif %}{% endfor %}"
)

# ---------------------------------------------------------------------------------------------------------
# Tokenizer training text.
# ---------------------------------------------------------------------------------------------------------

# Varied text on top of the demo corpus: punctuation, digits, code, newlines, and non-ASCII so byte-level
# BPE and byte fallback are exercised. SentencePiece-style families train on the Latin-1 part only (as
# SentencePiece's character_coverage drops rare characters): CJK and emoji reach them through byte fallback.
EXTRA_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Pack my box with five dozen liquor jugs!",
    "How vexingly quick daft zebras jump; isn't it?",
    "She said: \"Meet me at the café at 9:30, not 10:15.\"",
    "A naïve approach costs O(n^2) time, which is too slow for n = 1000000.",
    "We met in 東京 last spring, then flew to 大阪 and Kyoto.",
    "Thanks so much! 🎉 See you soon 👋",
    "Prices rose by 3.5% in 2023, and by 12% in 2024.",
    "Call 555-0123 or write to help@example.org before 5 pm.",
    "def add(a, b):\n    return a + b\n",
    "for (int i = 0; i < 10; i++) { total += i; }",
    "Line one.\nLine two.\n\nA new paragraph, after a blank line.",
    "Résumé, façade, coöperate, jalapeño and crème brûlée are loanwords.",
    "Zürich, Malmö, São Paulo and Kraków are cities.",
    "It's 42 degrees outside; don't forget your hat.",
    "I can't believe they're here, we'll see what's next.",
    "Tabs\tand  double  spaces   are whitespace too.",
    "The answer is (a), not [b] or {c}.",
    "Email: alice@example.com, bob@example.net; phone +1 (555) 010-9999.",
    "Question: what is 7 * 8? Answer: 56.",
    "User: Please summarise this paragraph.\nAssistant: Sure, here it is.",
    "You are a helpful assistant. Answer briefly and politely.",
    "Once upon a time, in a small village, there lived an old baker.",
    "Water boils at 100 °C at sea level.",
    "The meeting moved from Monday to Wednesday, 14:00 UTC.",
    "print('hello, world')  # a comment",
    "<html><body>Hello</body></html>",
    "Yes. No. Maybe? Certainly! Absolutely…",
    "Über alles: Straße, Mädchen, Öl and Ärger.",
    "El niño comió paella en España.",
    "Hello Alice, hello Bob, hello everyone!",
    "Good morning! How can I help you today?",
    "Please be polite when you greet a new colleague.",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 100, 1000, 2048.",
    "The ratio is 3:2 and the score was 21-17.",
    "Rain, snow, sun and wind: the weather changes quickly here.",
    "Summaries should be short, clear and accurate.",
    "The model answered the question, then stopped.",
    "Naïve Bayes and café au lait, side by side.",
    "東京タワー and 富士山 are famous; so is the 🗼 emoji.",
]

SP_ALPHABET_LIMIT = 0xFF  # SentencePiece-style families learn characters up to U+00FF only.


def training_text(seed: int) -> list[str]:
    from lexalign.demo import task

    return list(task.corpus(seed)) + EXTRA_TEXT


# ---------------------------------------------------------------------------------------------------------
# Traits: what each family's tokenizer and template do (tests assert on these).
# ---------------------------------------------------------------------------------------------------------

# architecture: the model class. kind: "byte_level" (GPT-2-style byte-level BPE, every byte a token) or "sentencepiece" (BPE over "▁"-marked
#   words, laid out like a converted SentencePiece model). byte_fallback: unknown characters become <0xXX> pieces.
# bos / eos / unk: the tokenizer's tokens (None: it has none). pad: None, "eos" (pad is the eos token) or a token.
# padding_side: as the loaded tokenizer has it. tokenizer_adds_bos: `tokenizer(text)` prepends bos.
# template_writes_bos: the chat template writes bos_token itself (with tokenizer_adds_bos: the doubled-BOS trap).
# system_turn: "supported" | "merged" (into the first user turn) | "raises" | "dropped" (silently) | None.
# default_system: the template writes a system block when the conversation has none.
# end_ids: generation_config.json eos_token_id, as tokens. turn_end: what the template writes after an answer.
# padded_vocab: the model's vocab_size is larger than len(tokenizer). samples_by_default: generation_config
#   sets do_sample=True (with temperature/top_p), as the real checkpoint does. rstrip_specials (Phi-3 only):
#   added tokens that swallow the whitespace after them.
TRAITS: dict[str, dict] = {
    "llama3": {
        "architecture": "LlamaForCausalLM",
        "kind": "byte_level",
        "byte_fallback": False,
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
        "unk": None,
        "pad": None,
        "padding_side": "right",
        "tokenizer_adds_bos": True,
        "has_template": True,
        "template_writes_bos": True,
        "system_turn": "supported",
        "default_system": True,  # a system header (dates) is written even without a system message
        "end_ids": ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
        "turn_end": "<|eot_id|>",
        "padded_vocab": False,
        "samples_by_default": True,
    },
    "qwen2": {
        "architecture": "Qwen2ForCausalLM",
        "kind": "byte_level",
        "byte_fallback": False,
        "bos": None,
        "eos": "<|im_end|>",
        "unk": None,
        "pad": "<|endoftext|>",
        "padding_side": "right",
        "tokenizer_adds_bos": False,
        "has_template": True,
        "template_writes_bos": False,
        "system_turn": "supported",
        "default_system": True,  # "You are Qwen, created by Alibaba Cloud. ..."
        "end_ids": ["<|im_end|>", "<|endoftext|>"],
        "turn_end": "<|im_end|>",
        "padded_vocab": True,
        "samples_by_default": True,
    },
    "mistral": {
        "architecture": "MistralForCausalLM",
        "kind": "sentencepiece",
        "byte_fallback": True,
        "bos": "<s>",
        "eos": "</s>",
        "unk": "<unk>",
        "pad": None,
        "padding_side": "right",
        "tokenizer_adds_bos": True,
        "has_template": True,
        "template_writes_bos": True,
        "system_turn": "merged",  # prepended to the first [INST] block
        "default_system": False,
        "end_ids": ["</s>"],
        "turn_end": "</s>",
        "padded_vocab": False,
        "samples_by_default": False,
    },
    "gemma": {
        "architecture": "Gemma2ForCausalLM",
        "kind": "sentencepiece",
        "byte_fallback": True,
        "bos": "<bos>",
        "eos": "<eos>",
        "unk": "<unk>",
        "pad": "<pad>",
        "padding_side": "left",
        "tokenizer_adds_bos": True,
        "has_template": True,
        "template_writes_bos": True,
        "system_turn": "raises",
        "default_system": False,
        "end_ids": ["<eos>", "<end_of_turn>"],
        "turn_end": "<end_of_turn>",
        "padded_vocab": False,
        "samples_by_default": False,
    },
    "phi3": {
        "architecture": "Phi3ForCausalLM",
        "kind": "sentencepiece",
        "byte_fallback": True,
        "bos": "<s>",
        "eos": "<|endoftext|>",
        "unk": "<unk>",
        "pad": "eos",  # pad_token == eos_token == <|endoftext|>
        "padding_side": "left",
        "tokenizer_adds_bos": True,
        "has_template": True,
        "template_writes_bos": True,
        "system_turn": "dropped",  # silently left out of the prompt
        "default_system": False,
        "end_ids": ["<|endoftext|>", "<|assistant|>", "<|end|>"],
        "turn_end": "<|end|>",
        "padded_vocab": True,
        "samples_by_default": False,
        "rstrip_specials": ["<|assistant|>", "<|end|>", "<|user|>", "<|system|>"],  # eat the "\n" after them
    },
    "gpt2": {
        "architecture": "GPT2LMHeadModel",
        "kind": "byte_level",
        "byte_fallback": False,
        "bos": "<|endoftext|>",
        "eos": "<|endoftext|>",
        "unk": "<|endoftext|>",
        "pad": None,
        "padding_side": "right",
        "tokenizer_adds_bos": False,
        "has_template": False,
        "template_writes_bos": False,
        "system_turn": None,
        "default_system": False,
        "end_ids": ["<|endoftext|>"],
        "turn_end": None,
        "padded_vocab": False,
        "samples_by_default": False,
    },
    "gpt_neox": {
        "architecture": "GPTNeoXForCausalLM",
        "kind": "byte_level",
        "byte_fallback": False,
        "bos": "<|endoftext|>",
        "eos": "<|endoftext|>",
        "unk": "<|endoftext|>",
        "pad": None,  # <|padding|> is in the vocabulary (id 1) but is not the pad token
        "padding_side": "right",
        "tokenizer_adds_bos": False,
        "has_template": False,
        "template_writes_bos": False,
        "system_turn": None,
        "default_system": False,
        "end_ids": ["<|endoftext|>"],
        "turn_end": None,
        "padded_vocab": True,
        "samples_by_default": False,
    },
}

# Special tokens, each as (content, special, rstrip), in the real family's id order.
LLAMA3_SPECIALS = [
    ("<|begin_of_text|>", True, False),
    ("<|end_of_text|>", True, False),
    ("<|reserved_special_token_0|>", True, False),
    ("<|reserved_special_token_1|>", True, False),
    ("<|finetune_right_pad_id|>", True, False),
    ("<|reserved_special_token_2|>", True, False),
    ("<|start_header_id|>", True, False),
    ("<|end_header_id|>", True, False),
    ("<|eom_id|>", True, False),
    ("<|eot_id|>", True, False),
    ("<|python_tag|>", True, False),
]
QWEN2_SPECIALS = [(t, True, False) for t in (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>")] + [(t, False, False) for t in (
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>")]
PHI3_ADDED = [
    ("<|endoftext|>", True, False),
    ("<|assistant|>", True, True),
    ("<|placeholder1|>", True, True),
    ("<|placeholder2|>", True, True),
    ("<|placeholder3|>", True, True),
    ("<|placeholder4|>", True, True),
    ("<|system|>", True, True),
    ("<|end|>", True, True),
    ("<|placeholder5|>", True, True),
    ("<|placeholder6|>", True, True),
    ("<|user|>", True, True),
]
LLAMA2_BASE = ["<unk>", "<s>", "</s>"]
GEMMA_BASE = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
BYTE_PIECES = [f"<0x{b:02X}>" for b in range(256)]

# Llama-3's pre-tokenizer split (tokenizer.json `pre_tokenizer`): digits in groups of up to three.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2's: single digits.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

BYTE_LEVEL_VOCAB = 640  # trained pieces (256 bytes + merges)
SP_VOCAB = 420  # trained pieces (characters + merges), on top of the specials and the 256 byte pieces


# ---------------------------------------------------------------------------------------------------------
# Tokenizers.
# ---------------------------------------------------------------------------------------------------------

def _train(texts, pre_tokenizer, normalizer, vocab_size: int, initial_alphabet) -> tuple[dict, list]:
    """Train a BPE; return its (vocab, merges), vocab as token -> rank from 0."""
    from tokenizers import Tokenizer, models, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=initial_alphabet, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def _layout(prefix: list[str], trained: dict, suffix: tuple[str, ...] | list[str] = ()) -> dict:
    """Vocabulary ids: `prefix` first, then the trained pieces in rank order, then `suffix`."""
    vocab = {token: i for i, token in enumerate(prefix)}
    for token, _ in sorted(trained.items(), key=lambda kv: kv[1]):
        if token not in vocab:
            vocab[token] = len(vocab)
    for token in suffix:
        vocab[token] = len(vocab)
    return vocab


def _added(tokens) -> list:
    from tokenizers import AddedToken

    return [AddedToken(t, special=special, rstrip=rstrip, lstrip=False, normalized=False, single_word=False)
            for t, special, rstrip in tokens]


def _byte_level_tokenizer(family: str, seed: int):
    """Byte-level BPE laid out like the family's tokenizer.json; returns the `tokenizers.Tokenizer`."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    byte_level = pre_tokenizers.ByteLevel
    if family == "llama3":
        normalizer = None
        pre = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            byte_level(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    elif family == "qwen2":
        normalizer = normalizers.NFC()
        pre = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            byte_level(add_prefix_space=False, use_regex=False)])
    elif family == "gpt2":
        normalizer = None
        pre = byte_level(add_prefix_space=False)
    else:  # gpt_neox
        normalizer = normalizers.NFC()
        pre = byte_level(add_prefix_space=False, trim_offsets=True)
    trained, merges = _train(training_text(seed), pre, normalizer, BYTE_LEVEL_VOCAB, byte_level.alphabet())

    if family == "gpt_neox":  # Pythia: <|endoftext|> = 0, <|padding|> = 1, then the BPE
        vocab = _layout(["<|endoftext|>", "<|padding|>"], trained)
        added = [("<|endoftext|>", True, False), ("<|padding|>", True, False)]
    elif family == "gpt2":  # GPT-2: <|endoftext|> is the last id (50256)
        vocab = _layout([], trained, ["<|endoftext|>"])
        added = [("<|endoftext|>", True, False)]
    else:  # Llama-3 / Qwen2: the special tokens come after the BPE vocabulary, as added tokens
        vocab = _layout([], trained)
        added = LLAMA3_SPECIALS if family == "llama3" else QWEN2_SPECIALS
    bpe_kwargs = {"continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": False}
    if family in ("llama3", "qwen2"):
        bpe_kwargs["ignore_merges"] = family == "llama3"  # Llama-3's tokenizer.json sets ignore_merges
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, **bpe_kwargs))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([a for a in _added(added) if a.special])
    tok.add_tokens([a for a in _added(added) if not a.special])
    if family == "llama3":  # Llama-3 ADDS <|begin_of_text|> itself (TemplateProcessing)
        bos_id = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A:0",
                pair="<|begin_of_text|> $A:0 <|begin_of_text|>:1 $B:1",
                special_tokens=[("<|begin_of_text|>", bos_id)])])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=family != "qwen2")
    return tok


def _sentencepiece_tokenizer(family: str, seed: int):
    """SentencePiece-style BPE with byte fallback (<0x00>..<0xFF>), laid out like the family's tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    texts = ["".join(c for c in t if ord(c) <= SP_ALPHABET_LIMIT) for t in training_text(seed)]
    # Train on words that start with "▁", as SentencePiece does (pieces never span a word start).
    # Gemma adds no dummy prefix, so its first words are learnt without "▁".
    prepend = "never" if family == "gemma" else "first"
    train_pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend, split=True)
    trained, merges = _train(texts, train_pre, None, SP_VOCAB, [])
    base = GEMMA_BASE if family == "gemma" else LLAMA2_BASE
    vocab = _layout(base + BYTE_PIECES, trained)
    unk = "<unk>"
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=unk, fuse_unk=True,
                               byte_fallback=True))
    if family == "gemma":  # Gemma: spaces -> "▁", no dummy prefix
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    else:  # Llama-2 / Mistral / Phi-3: Metaspace with a dummy prefix on the first word
        tok.normalizer = None
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1, right=0)])
    tok.add_special_tokens(_added([(t, True, False) for t in base]))
    if family == "phi3":
        tok.add_special_tokens(_added(PHI3_ADDED))
    return tok


def _hf_tokenizer(family: str, seed: int):
    """The transformers tokenizer, of the class the real checkpoint declares, configured like its files."""
    from transformers import (
        GemmaTokenizer,
        GPT2Tokenizer,
        GPTNeoXTokenizer,
        LlamaTokenizer,
        PreTrainedTokenizerFast,
        Qwen2Tokenizer,
    )

    if family in ("llama3", "qwen2", "gpt2", "gpt_neox"):
        raw = _byte_level_tokenizer(family, seed)
    else:
        raw = _sentencepiece_tokenizer(family, seed)
    common = {"tokenizer_object": raw, "clean_up_tokenization_spaces": False}
    if family == "llama3":
        # (Llama-3 declares clean_up_tokenization_spaces=True, which transformers 5 ignores for BPE with a warning.)
        tok = PreTrainedTokenizerFast(
            **common, bos_token="<|begin_of_text|>",
            eos_token="<|eot_id|>", add_bos_token=True, model_max_length=131072,
            model_input_names=["input_ids", "attention_mask"])
        tok.chat_template = LLAMA31_TEMPLATE
    elif family == "qwen2":
        specials = [t for t, special, _ in QWEN2_SPECIALS if special and t != "<|endoftext|>"]
        tok = Qwen2Tokenizer(**common, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                             unk_token=None, add_bos_token=False, errors="replace", model_max_length=131072,
                             split_special_tokens=False, additional_special_tokens=specials)
        tok.chat_template = QWEN25_TEMPLATE
    elif family == "mistral":
        tok = LlamaTokenizer(**common, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token=None,
                             add_bos_token=True, add_eos_token=False, legacy=False, use_default_system_prompt=False,
                             model_max_length=VERY_LARGE_INTEGER, spaces_between_special_tokens=False)
        tok.chat_template = MISTRAL_V02_TEMPLATE
    elif family == "gemma":
        tok = GemmaTokenizer(**common, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>",
                             mask_token="<mask>", add_bos_token=True, add_eos_token=False,
                             additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
                             spaces_between_special_tokens=False, model_max_length=VERY_LARGE_INTEGER)
        tok.chat_template = GEMMA2_TEMPLATE
    elif family == "phi3":
        tok = LlamaTokenizer(**common, bos_token="<s>", eos_token="<|endoftext|>", unk_token="<unk>",
                             pad_token="<|endoftext|>", add_bos_token=True, add_eos_token=False, legacy=False,
                             use_default_system_prompt=False, model_max_length=4096, padding_side="left")
        tok.chat_template = PHI3_TEMPLATE
    elif family == "gpt2":
        tok = GPT2Tokenizer(**common, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            unk_token="<|endoftext|>", pad_token=None, add_prefix_space=False, model_max_length=1024)
    elif family == "gpt_neox":
        tok = GPTNeoXTokenizer(**common, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                               unk_token="<|endoftext|>", pad_token=None, add_prefix_space=False,
                               add_bos_token=False, add_eos_token=False, model_max_length=VERY_LARGE_INTEGER)
    else:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    return tok


# ---------------------------------------------------------------------------------------------------------
# Models.
# ---------------------------------------------------------------------------------------------------------

HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE = 32, 2, 4, 2, 64


def _padded(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _model_and_generation(family: str, tok):
    """The random-weight model and the generation_config of the family (ids resolved from `tok`)."""
    import transformers
    from transformers import GenerationConfig

    ids = tok.convert_tokens_to_ids
    n = len(tok)
    common = {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
              "intermediate_size": INTERMEDIATE}
    if family == "llama3":
        end = [ids("<|end_of_text|>"), ids("<|eom_id|>"), ids("<|eot_id|>")]
        config = transformers.LlamaConfig(
            vocab_size=n, num_key_value_heads=KV_HEADS, max_position_embeddings=131072, rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
            tie_word_embeddings=False, bos_token_id=ids("<|begin_of_text|>"), eos_token_id=end, **common)
        gen = {"bos_token_id": ids("<|begin_of_text|>"), "eos_token_id": end, "do_sample": True,
               "temperature": 0.6, "top_p": 0.9}
    elif family == "qwen2":
        config = transformers.Qwen2Config(
            vocab_size=_padded(n, 64), num_key_value_heads=KV_HEADS, max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, rms_norm_eps=1e-6,
            tie_word_embeddings=True, use_sliding_window=False, sliding_window=None,
            bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), **common)
        gen = {"bos_token_id": ids("<|endoftext|>"), "pad_token_id": ids("<|endoftext|>"),
               "eos_token_id": [ids("<|im_end|>"), ids("<|endoftext|>")], "do_sample": True,
               "repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8, "top_k": 20}
    elif family == "mistral":
        config = transformers.MistralConfig(
            vocab_size=n, num_key_value_heads=KV_HEADS, max_position_embeddings=32768, sliding_window=None,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, rms_norm_eps=1e-5,
            tie_word_embeddings=False, bos_token_id=ids("<s>"), eos_token_id=ids("</s>"), **common)
        gen = {"bos_token_id": ids("<s>"), "eos_token_id": ids("</s>")}
    elif family == "gemma":
        end = [ids("<eos>"), ids("<end_of_turn>")]
        config = transformers.Gemma2Config(
            vocab_size=n, num_key_value_heads=KV_HEADS, head_dim=HIDDEN // HEADS, query_pre_attn_scalar=HIDDEN // HEADS,
            hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192, sliding_window=4096,
            final_logit_softcapping=30.0, attn_logit_softcapping=50.0, tie_word_embeddings=True,
            bos_token_id=ids("<bos>"), eos_token_id=end, pad_token_id=ids("<pad>"), **common)
        gen = {"bos_token_id": ids("<bos>"), "eos_token_id": end, "pad_token_id": ids("<pad>")}
    elif family == "phi3":
        end = [ids("<|endoftext|>"), ids("<|assistant|>"), ids("<|end|>")]
        config = transformers.Phi3Config(
            vocab_size=_padded(n, 64), num_key_value_heads=HEADS, max_position_embeddings=4096,
            original_max_position_embeddings=4096, sliding_window=2047, rms_norm_eps=1e-5,
            tie_word_embeddings=False, bos_token_id=ids("<s>"), eos_token_id=ids("<|endoftext|>"),
            pad_token_id=ids("<|endoftext|>"), **common)
        gen = {"bos_token_id": ids("<s>"), "eos_token_id": end, "pad_token_id": ids("<|endoftext|>")}
    elif family == "gpt2":
        eot = ids("<|endoftext|>")
        config = transformers.GPT2Config(
            vocab_size=n, n_positions=1024, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=INTERMEDIATE,
            bos_token_id=eot, eos_token_id=eot, tie_word_embeddings=True)
        gen = {"bos_token_id": eot, "eos_token_id": eot}
    elif family == "gpt_neox":
        eot = ids("<|endoftext|>")
        config = transformers.GPTNeoXConfig(
            vocab_size=_padded(n, 128), max_position_embeddings=2048, rotary_pct=0.25, use_parallel_residual=True,
            tie_word_embeddings=False, bos_token_id=eot, eos_token_id=eot, **common)
        gen = {"bos_token_id": eot, "eos_token_id": eot}
    else:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    model = getattr(transformers, TRAITS[family]["architecture"])(config)
    return model, GenerationConfig(**gen)


def build(family: str, out_dir: Path, seed: int = 0) -> Path:
    """Write the family's tiny model folder to `out_dir` (config, safetensors weights, tokenizer files,
    generation_config) and return `out_dir`. Deterministic for a given `seed`."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = _hf_tokenizer(family, seed)
    torch.manual_seed(seed)
    model, generation = _model_and_generation(family, tok)
    model.generation_config = generation
    model.save_pretrained(out_dir, safe_serialization=True)
    # The template goes inside tokenizer_config.json, as the real checkpoints ship it.
    tok.save_pretrained(out_dir, save_jinja_files=False)
    return out_dir
