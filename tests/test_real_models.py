"""Real model families, token for token: validate → reference → align (DPO, GDPO) → evaluate on each.

The oracle is the model's own `apply_chat_template(messages, tokenize=True)`:
every step must train on, score and generate from exactly those ids (BOS once,
the template's own end-of-turn token, nothing appended). Plain-text families
(GPT-2, GPT-NeoX) get BOS once where the tokenizer adds one and EOS once.
The models are testkit/zoo.py's tiny random-weight ones; one pipeline run per
family is shared by the tests below.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from lexalign.core import tokens
from lexalign.data.validated import read_validated
from lexalign.steps import inputs, results, training
from testkit import zoo

pytestmark = pytest.mark.slow

CHAT_FAMILIES = [f for f in zoo.FAMILIES if zoo.TRAITS[f]["has_template"]]
PLAIN_FAMILIES = [f for f in zoo.FAMILIES if not zoo.TRAITS[f]["has_template"]]
NAMES = ["Amir", "Paula", "Uma", "Ivan", "George", "Mallory", "Walter", "Zoë", "Chloé", "Søren", "Ana", "Bo"]
ASKS = ["Say hello to {}.", "{} just arrived. Greet them.", "Welcome {} to the team."]
RANKED = ["Hello {}, lovely to meet you! 😊", "Hi {}.", "Oh, it's {}.", "Go away {}, nobody asked you."]


def _system(family: str) -> list[dict]:
    return [] if zoo.TRAITS[family]["system_turn"] == "raises" else [
        {"role": "system", "content": "You are a polite assistant."}]


def conversation_rows(family: str, n: int = 36) -> list[dict]:
    """Ranked answers to greetings as chat messages (a system turn where the template has one): the shape of
    UltraFeedback's prompt + completions, with a list prompt so every row is a conversation."""
    rows = []
    for i in range(n):
        name = NAMES[i % len(NAMES)] + ("" if i < len(NAMES) else f" {i}")
        prompt = _system(family) + [{"role": "user", "content": ASKS[i % len(ASKS)].format(name)}]
        rows.append({"prompt": prompt, "responses": [r.format(name) for r in RANKED], "scores": [9.0, 6.0, 3.0, 1.0]})
    return rows


def plain_rows(n: int = 36) -> list[dict]:
    rows = []
    for i in range(n):
        name = NAMES[i % len(NAMES)] + ("" if i < len(NAMES) else f" {i}")
        rows.append({"prompt": f"Human: {ASKS[i % len(ASKS)].format(name)}\nAssistant:",
                     "responses": [" " + r.format(name) for r in RANKED], "scores": [9.0, 6.0, 3.0, 1.0]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


ALIGN = {"learning_rate": 5e-3, "batch_size": 4, "num_epochs": 1, "max_steps": 2, "max_length": 256,
         "use_lora": True, "lora_r": 4, "lora_alpha": 8, "target_modules": "all-linear", "save_steps": 50,
         "logging_steps": 1}


def run_family(family: str, model: Path, root: Path) -> dict:
    """The pipeline's steps on one family (the functions the Snakemake rules call), DPO and GDPO K=4."""
    from lexalign.config.loader import section_defaults

    rows = conversation_rows(family) if family in CHAT_FAMILIES else plain_rows()
    raw = write_jsonl(root / "raw" / "train.jsonl", rows)
    data = {}
    for name, group in (("pairs", None), ("k4", 4)):
        dataset = section_defaults("dataset", {"path": str(raw), "max_length": 256, "eval_fraction": 0.25,
                                               "group_size": group})
        data[name] = root / "data" / name
        inputs.validate(raw=raw, tokenizer=model, output=data[name], dataset=dataset)
    out = {"rows": rows, "model": model, "data": data}
    for method, layout, k in (("dpo", "pairs", 2), ("gdpo", "k4", 4)):
        ref = root / "reference" / f"{layout}.parquet"
        training.reference(model=model, data=data[layout], output=ref, setting={"layout": layout, "max_length": 256})
        params = section_defaults("alignment", {**ALIGN, "method": method, "group_delay_size": k})
        aligned = training.align(model=model, data=data[layout], output=root / method, alignment=params,
                               checkpoint_dir=root / "checkpoints" / method, reference=ref, device="cpu")
        result = results.evaluate(aligned=aligned, reference=model, data=data["pairs"], output=root / f"{method}.json",
                                 evaluate={"judge": "none", "num_prompts": 4, "max_new_tokens": 6}, beta=0.1)
        out[method] = {"reference": ref, "aligned": aligned, "eval": result}
    return out


@pytest.fixture(scope="module")
def family_runs(zoo_models, tmp_path_factory):
    runs: dict[str, dict] = {}

    def get(family: str) -> dict:
        if family not in runs:
            runs[family] = run_family(family, zoo_models(family), tmp_path_factory.mktemp(f"run-{family}"))
        return runs[family]

    return get


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _ids(tokenizer, messages: list[dict], generation: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation, return_dict=False)
    return list(out["input_ids"] if isinstance(out, dict) else out)


def _expected_chat(family: str, tokenizer, run: dict) -> dict[str, tuple[list[int], list[list[int]]]]:
    """The oracle: for every prompt rendered as validation renders it, the template's own ids of the prompt
    (with the generation prompt) and of each finished conversation, best response first."""
    out = {}
    for row in run["rows"]:
        rendered = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        fulls = [_ids(tokenizer, row["prompt"] + [{"role": "assistant", "content": r}], False)
                 for r in row["responses"]]
        out[rendered] = (_ids(tokenizer, row["prompt"], True), fulls)
    return out


def _plain_expected(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Plain text, as TRL's DPO makes it on a base model: the tokenizer's defaults (BOS where it adds one) and
    EOS once after the response."""
    full = tokenizer(prompt + response)["input_ids"] + [tokenizer.eos_token_id]
    return tokenizer(prompt)["input_ids"], full


def _reference_rows(run: dict, layout: str) -> pd.DataFrame:
    import pyarrow.parquet as pq

    return pq.read_table(run["dpo" if layout == "pairs" else "gdpo"]["reference"]).to_pandas()


def _validated(run: dict, layout: str) -> pd.DataFrame:
    train, evals = read_validated(run["data"][layout])
    return pd.concat([train.assign(split="train", row=range(len(train))),
                      evals.assign(split="eval", row=range(len(evals)))])


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_every_step_uses_the_templates_own_tokens(family, family_runs):
    run = family_runs(family)
    tokenizer = _tokenizer(run["model"])
    traits = zoo.TRAITS[family]
    expected = _expected_chat(family, tokenizer, run)
    report = json.loads((run["data"]["pairs"] / "report.json").read_text())
    assert report["chat_template"] is True and report["rejected_rows"] == 0
    assert report["kept_rows"] == len(run["rows"])

    for layout, k in (("pairs", 2), ("k4", 4)):
        validated = _validated(run, layout)
        ref = _reference_rows(run, layout)
        assert len(ref) == len(validated)
        prompts = {(s, r): p for s, r, p in zip(validated["split"], validated["row"], validated["prompt"],
                                                 strict=True)}
        for _, row in ref.iterrows():
            prompt_ids, fulls = expected[prompts[row["split"], row["row"]]]
            best_worst = [fulls[0], fulls[-1]] if k == 2 else fulls
            found_prompt = list(row["prompt_ids"])
            # Token for token: the prompt, and prompt + each response, are apply_chat_template's ids.
            assert found_prompt == prompt_ids
            for completion, full in zip(row["completion_ids"], best_worst, strict=True):
                sequence = found_prompt + list(completion)
                assert sequence == full
                if traits["bos"]:
                    assert sequence.count(tokenizer.bos_token_id) == 1, "BOS must appear exactly once"
                # The answer ends with the template's end-of-turn token (the model must learn to stop on it).
                turn_end = tokenizer.convert_tokens_to_ids(traits["turn_end"])
                assert turn_end in list(completion)
                if tokenizer.eos_token_id != turn_end:  # nothing appended that the template does not write
                    assert tokenizer.eos_token_id not in list(completion)

    # Validation counted the same sequences: its longest row (best and worst answer) is the template's longest.
    longest = max(max(len(fulls[0]), len(fulls[-1])) for _, fulls in expected.values())
    assert report["lengths"]["tokens"]["max"] == longest


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_evaluation_and_generation_use_the_template(family, family_runs):
    from transformers import AutoModelForCausalLM

    run = family_runs(family)
    tokenizer = _tokenizer(run["model"])
    expected = _expected_chat(family, tokenizer, run)
    prompts = list(expected)[:3]
    assert tokens.prompt_ids(tokenizer, prompts, chat=True) == [expected[p][0] for p in prompts]
    for method in ("dpo", "gdpo"):
        aligned = run[method]["aligned"]
        model = AutoModelForCausalLM.from_pretrained(aligned)
        wanted = [tokenizer.convert_tokens_to_ids(t) for t in zoo.TRAITS[family]["end_ids"]]
        assert set(wanted) <= set(tokens.end_ids(model, tokenizer))
        generated = model.generate(**tokenizer.apply_chat_template(run["rows"][0]["prompt"], tokenize=True,
                                                                   add_generation_prompt=True, return_tensors="pt",
                                                                   return_dict=True),
                                   max_new_tokens=4, do_sample=False)
        assert generated.shape[1] >= 1
        result = run[method]["eval"]
        assert result["pairs"] > 0 and 0.0 <= result["preference_accuracy"] <= 1.0


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_scoring_in_evaluate_matches_the_reference_step(family, family_runs):
    """evaluate's log-probs of the SFT model are the reference step's, on the same template tokens."""
    from transformers import AutoModelForCausalLM

    from lexalign.evaluation.figures import sequence_logps

    run = family_runs(family)
    tokenizer = _tokenizer(run["model"])
    model = AutoModelForCausalLM.from_pretrained(run["model"]).eval()
    validated = _validated(run, "pairs")
    ref = _reference_rows(run, "pairs").head(4)
    lookup = {(s, r): (p, c, j) for s, r, p, c, j in zip(validated["split"], validated["row"], validated["prompt"],
                                                          validated["chosen"], validated["rejected"], strict=True)}
    rows = [lookup[s, r] for s, r in zip(ref["split"], ref["row"], strict=True)]
    found = sequence_logps(model, tokenizer, [p for p, _, _ in rows], [c for _, c, _ in rows], chat=True)
    assert found == pytest.approx([v[0] for v in ref["ref_logps"]], abs=1e-4)


@pytest.mark.parametrize("family", PLAIN_FAMILIES)
def test_plain_text_gets_bos_once_and_eos_once(family, family_runs):
    from transformers import AutoModelForCausalLM

    run = family_runs(family)
    tokenizer = _tokenizer(run["model"])
    report = json.loads((run["data"]["pairs"] / "report.json").read_text())
    assert report["chat_template"] is False
    validated = _validated(run, "pairs")
    ref = _reference_rows(run, "pairs")
    lookup = {(s, r): (p, c, j) for s, r, p, c, j in zip(validated["split"], validated["row"], validated["prompt"],
                                                          validated["chosen"], validated["rejected"], strict=True)}
    for _, row in ref.iterrows():
        prompt, chosen, rejected = lookup[row["split"], row["row"]]
        for completion, response in zip(row["completion_ids"], (chosen, rejected), strict=True):
            _, want_full = _plain_expected(tokenizer, prompt, response)
            assert list(row["prompt_ids"]) + list(completion) == want_full
            assert list(completion)[-1] == tokenizer.eos_token_id
            assert list(completion).count(tokenizer.eos_token_id) == 1
    model = AutoModelForCausalLM.from_pretrained(run["dpo"]["aligned"])
    assert model.generate(**tokenizer("Human: hi", return_tensors="pt"), max_new_tokens=3,
                          pad_token_id=tokenizer.eos_token_id).shape[1] >= 1


@pytest.mark.parametrize("family", ["llama3", "mistral", "qwen2"])
def test_plain_text_on_chat_tokenizers(family, zoo_models):
    """Raw text (a base model's data) on tokenizers that add BOS: BOS exactly once, EOS once at the end."""
    tokenizer = _tokenizer(zoo_models(family))
    prompt, response = "Question: what is 2 + 2?\nAnswer:", " 4"
    (prompt_ids,), ((completion,),) = tokens.tokenize_groups(tokenizer, [prompt], [[response]], chat=False)
    want_prompt, want_full = _plain_expected(tokenizer, prompt, response)
    assert prompt_ids == want_prompt and prompt_ids + completion == want_full
    if zoo.TRAITS[family]["tokenizer_adds_bos"]:
        assert (prompt_ids + completion).count(tokenizer.bos_token_id) == 1
    assert completion[-1] == tokenizer.eos_token_id and completion.count(tokenizer.eos_token_id) == 1


def test_a_doubled_bos_is_what_default_encoding_of_rendered_text_gives(zoo_models):
    """The trap this guards against: the tokenizer's defaults on template-rendered text add BOS again."""
    tokenizer = _tokenizer(zoo_models("llama3"))
    messages = [{"role": "user", "content": "hi"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer(rendered)["input_ids"][:2] == [tokenizer.bos_token_id] * 2
    assert tokens.prompt_ids(tokenizer, [rendered], chat=True)[0] == _ids(tokenizer, messages, True)


SFT_ROWS = {
    "text": [{"text": "Human: Say hello to Amir.\nAssistant: Hello Amir!"},
             {"text": "Human: Greet Bo, who just arrived from Tokyo.\nAssistant: Hello Bo, welcome!"}],
    "prompt_completion": [{"prompt": "Human: Say hello to Amir.\nAssistant:", "completion": " Hello Amir!"},
                          {"prompt": "Human: Greet Bo, from Tokyo.\nAssistant:", "completion": " Hello Bo, welcome!"}],
    "messages": [{"messages": [{"role": "user", "content": "Say hello to Amir."},
                               {"role": "assistant", "content": "Hello Amir!"}]},
                 {"messages": [{"role": "user", "content": "Greet Bo, who just arrived from Tokyo."},
                               {"role": "assistant", "content": "Hello Bo, welcome to the team!"}]}],
}


@pytest.mark.parametrize("family,shape", [("phi3", "text"), ("phi3", "prompt_completion"), ("phi3", "messages"),
                                          ("qwen2", "messages"), ("gpt2", "text")])
def test_sft_labels_keep_the_end_token_when_pad_is_eos(family, shape, zoo_models, tmp_path):
    """Phi-3's pad token is its EOS (and GPT-2 has none, so EOS pads): padding must not mask the real end
    token out of SFT's labels, or the model never learns to stop."""
    from lexalign.config.loader import section_defaults
    from lexalign.config.sections import FinetuneConfig
    from lexalign.train.finetune import FinetuneJob

    model = zoo_models(family)
    params = section_defaults("finetune", {"max_steps": 1, "batch_size": 2, "max_length": 128, "save_steps": 50})
    job = FinetuneJob(model_path=model, train=pd.DataFrame(SFT_ROWS[shape]), eval=pd.DataFrame(),
                      cfg=FinetuneConfig.from_dict(params), output_dir=tmp_path / "out",
                      checkpoint_dir=tmp_path / "ckpt", device="cpu")
    trainer, tokenizer, _ = job.setup()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    ends = ({tokenizer.convert_tokens_to_ids(zoo.TRAITS[family]["turn_end"])} if shape == "messages"
            else {tokenizer.eos_token_id})
    for ids, labels, mask in zip(batch["input_ids"].tolist(), batch["labels"].tolist(),
                                 batch["attention_mask"].tolist(), strict=True):
        real = sum(mask)
        ended = [i for i in range(real) if ids[i] in ends]
        assert ended, f"no end token in {ids[:real]}"
        assert all(labels[i] == ids[i] for i in ended), "the end token is masked out of the labels"
        assert all(label == -100 for label in labels[real:]), "padding is trained on"
