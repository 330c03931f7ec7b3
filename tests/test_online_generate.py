"""Online rounds' sampling (lexalign/generation/sampling.py), token for token on the zoo's real chat families: the
prompt ids are the chat template's, left padding changes nothing, completions keep their sampled ids and end
with the end id the model stopped on, truncation is flagged, the trainer's rows are those ids, and a killed job
resumes where it stopped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import selected_token_table

from lexalign.core import tokens
from lexalign.core.errors import LexAlignError
from lexalign.generation import selection
from lexalign.generation.sampling import Sampling, cut_at_end, generate, render_prompts
from lexalign.train.trainer_data import trainer_dataset
from testkit.zoo import FAMILIES, TRAITS

TEMPLATED = [f for f in FAMILIES if TRAITS[f]["has_template"]]
# Different lengths, so batches are left padded; the second is the longest and goes first.
PROMPTS = ["Say hello to Alice.", "Please write a long and very polite greeting to Bob, Carol and Dave today.", "Hi"]
GREEDY = 1e-9
"""top_p this small keeps only the most likely token: sampling becomes argmax, comparable with greedy decoding."""


def tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def template_ids(tok, messages, generation: bool) -> list[int]:
    encoded = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def rows(out_dir) -> list[dict]:
    return pq.read_table(out_dir / "generations.parquet").to_pylist()


@pytest.mark.parametrize("family", TEMPLATED)
def test_prompt_ids_are_the_chat_templates(zoo_models, family):
    tok = tokenizer(zoo_models(family))
    texts, chat = render_prompts(tok, PROMPTS)
    assert chat
    got = tokens.prompt_ids(tok, texts, chat)
    assert got == [template_ids(tok, [{"role": "user", "content": p}], True) for p in PROMPTS]
    # Messages and already rendered texts give the same ids.
    messages = [[{"role": "user", "content": p}] for p in PROMPTS]
    assert tokens.prompt_ids(tok, render_prompts(tok, messages)[0], True) == got
    assert tokens.prompt_ids(tok, render_prompts(tok, texts, rendered=True)[0], True) == got


def test_judges_read_the_question_as_given():
    from lexalign.generation.sampling import question

    assert question("Hi there") == "Hi there"
    assert question([{"role": "user", "content": "Hi"}]) == "Hi"
    assert question([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]) == \
        "system: Be brief.\n\nuser: Hi"


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_left_padded_sampling_is_token_for_token_unpadded_greedy(zoo_models, tmp_path, family):
    """With top_p ~ 0 sampling is argmax: every prompt's completions, generated in a left-padded batch with
    prompts of other lengths, equal greedy decoding of that prompt alone. The end ids' output rows are zeroed
    so that greedy decoding runs the full 6 tokens (the random Llama-3 would otherwise end at once); stopping
    is tested below."""
    import torch

    from lexalign.models.loading import load_causal_lm

    path = tmp_path / "model"
    ends = tokens.end_ids(_generation(zoo_models(family)), tokenizer(zoo_models(family)))
    edit_head(zoo_models(family), path, lambda head, tok, model: [head.weight[i].zero_() for i in ends])
    tok = tokenizer(path)
    report = generate(path, PROMPTS, tmp_path / "gen", Sampling(samples_per_prompt=2, top_p=GREEDY, max_new_tokens=6),
                      batch_size=3)
    assert (report["prompts"], report["kept"], report["completions"]) == (3, 3, 6)
    model = load_causal_lm(path, "cpu").eval()
    stops = tokens.end_ids(model, tok)
    assert stops == [tok.convert_tokens_to_ids(t) for t in TRAITS[family]["end_ids"]]
    got = rows(tmp_path / "gen")
    assert [r["row"] for r in got] == [0, 1, 2]  # input order, whatever order they were generated in
    for r in got:
        if TRAITS[family]["has_template"]:
            assert r["prompt_ids"] == template_ids(tok, [{"role": "user", "content": PROMPTS[r["row"]]}], True)
        else:
            assert r["prompt_ids"] == tokens.special_prefix(tok) + tok(PROMPTS[r["row"]], add_special_tokens=False
                                                                      ).input_ids
        with torch.no_grad():
            alone = model.generate(torch.tensor([r["prompt_ids"]]), attention_mask=torch.ones(1, len(r["prompt_ids"]),
                                   dtype=torch.long), do_sample=False, max_new_tokens=6, eos_token_id=stops,
                                   pad_token_id=stops[0])[0, len(r["prompt_ids"]):].tolist()
        want, truncated = cut_at_end(alone, stops)
        assert r["completion_ids"] == [want, want]
        assert r["truncated"] == [truncated, truncated]
        assert r["completions"][0] == tok.decode(want if truncated else want[:-1], skip_special_tokens=True)
        assert (r["samples_per_prompt"], r["top_p"], r["max_new_tokens"], r["policy"]) == (2, GREEDY, 6, str(path))
        assert r["question"] == PROMPTS[r["row"]]
    assert all(len(c) == 6 for r in got for c in r["completion_ids"])  # never a trivial comparison


def _generation(path):
    """An object with the checkpoint's generation_config, for tokens.end_ids."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    return SimpleNamespace(generation_config=GenerationConfig.from_pretrained(path))


def edit_head(src, dst, edit) -> None:
    """A copy of a zoo model with its output head untied from the embeddings and changed by `edit(head, tok)`
    (weights edited in place, under no_grad), and its input embeddings by the same call if it wants."""
    import torch
    from transformers import AutoModelForCausalLM

    shutil.copytree(src, dst)
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        head = model.get_output_embeddings()
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
        edit(head, tokenizer(src), model)
    model.save_pretrained(dst)


def force_turn_end(src, dst, family) -> int:
    """A copy of a zoo model that always answers with its turn-end token at once: every embedding gets a large
    constant in dimension 0, so after the final norm that dimension is large and positive whatever the input,
    and the turn end's output row is large there (the head untied first, so the other tokens' logits stay
    small: under Gemma-2's soft cap they would all saturate with the turn end's). Returns the turn end's id."""
    tok = tokenizer(src)
    turn_end = tok.convert_tokens_to_ids(TRAITS[family]["turn_end"] or tok.eos_token)

    def edit(head, _, model):
        model.get_input_embeddings().weight[:, 0] += 50.0
        head.weight[turn_end, 0] = 500.0

    edit_head(src, dst, edit)
    return turn_end


@pytest.mark.parametrize("family", FAMILIES)
def test_an_answer_ends_with_the_turn_end_and_trains_on_exactly_the_sampled_ids(zoo_models, tmp_path, family):
    path = tmp_path / "model"
    turn_end = force_turn_end(zoo_models(family), path, family)
    tok = tokenizer(path)
    generate(path, PROMPTS[:2], tmp_path / "gen", Sampling(samples_per_prompt=3, max_new_tokens=5, seed=3))
    got = rows(tmp_path / "gen")
    for r in got:
        assert r["completion_ids"] == [[turn_end]] * 3 and r["truncated"] == [False] * 3
        assert r["completions"] == [""] * 3
        if TRAITS[family]["has_template"]:
            # The template's finished conversation with that (empty) answer starts with prompt + completion:
            # the turn end the model sampled is the one the template writes (Qwen's and Gemma's "\n" after it
            # is never sampled, so never trained).
            answered = [{"role": "user", "content": PROMPTS[r["row"]]}, {"role": "assistant", "content": ""}]
            full = template_ids(tok, answered, False)
            end = full.index(turn_end, len(r["prompt_ids"]))
            assert full[:len(r["prompt_ids"])] == r["prompt_ids"]
            # Mistral's template writes " " + answer + eos: an empty answer leaves a lone "▁" before it.
            assert tok.decode(full[len(r["prompt_ids"]):end]).strip() == ""
            assert end == len(r["prompt_ids"]) + (family == "mistral")
    # The trainer's rows are the sampled ids: prompt + chosen is exactly what was generated.
    judged = [{**r, "scores": [2.0, 1.0, 0.0], "truncated": [False] * 3} for r in got]
    judged[0]["completion_ids"] = [[turn_end], [5, turn_end], [6, 7, turn_end]]  # distinct answers to rank
    judged[1]["completion_ids"] = [[turn_end], [8, turn_end], [9, turn_end]]
    pairs, _ = selection.best_worst(judged)
    dataset = trainer_dataset(selected_token_table(pairs), "pairs")
    for example, r in zip(dataset, judged, strict=True):
        assert example["prompt_ids"] + example["chosen_ids"] == r["prompt_ids"] + r["completion_ids"][0]
        assert example["prompt_ids"] + example["rejected_ids"] == r["prompt_ids"] + r["completion_ids"][2]
    groups, _ = selection.ranked(judged, 3)
    dataset = trainer_dataset(selected_token_table(groups), "k3")
    assert [e["completion_ids"] for e in dataset] == [r["completion_ids"] for r in judged]
    # ... and the text path (lexalign.core.tokens) tokenizes the same row the same way where the text round-trips.
    text = [tok.decode(c, skip_special_tokens=False) for c in judged[0]["completion_ids"]]
    if TRAITS[family]["has_template"]:
        prompt_ids, completion_ids = tokens.tokenize_groups(tok, [got[0]["prompt"]], [text[:1]], chat=True)
        assert prompt_ids[0] + completion_ids[0][0] == got[0]["prompt_ids"] + [turn_end]


def test_stops_at_every_end_id_and_flags_truncation(zoo_models, tmp_path):
    """Llama-3 ends on any of three ids: a completion stops at the first of generation_config's end ids it
    samples, keeps it, and one that max_new_tokens cut is flagged truncated and holds no end id. A seeded run
    samples the same tokens up to where it stops, so adding one of its tokens to the end ids shows where."""
    path = tmp_path / "model"
    shutil.copytree(zoo_models("llama3"), path)
    for seed in range(10):  # the first seed whose sample runs the full 6 tokens without an end id
        probe = Sampling(samples_per_prompt=1, max_new_tokens=6, seed=seed)
        if generate(path, PROMPTS[:1], tmp_path / f"probe{seed}", probe)["truncated"] == 1:
            break
    sampled = rows(tmp_path / f"probe{seed}")[0]["completion_ids"][0]
    assert len(sampled) == 6
    stop = sampled[3]  # a fourth end id for the checkpoint: the 4th sampled token
    config = json.loads((path / "generation_config.json").read_text())
    config["eos_token_id"] = config["eos_token_id"] + [stop]
    (path / "generation_config.json").write_text(json.dumps(config))
    report = generate(path, PROMPTS[:1], tmp_path / "stop", probe)
    row = rows(tmp_path / "stop")[0]
    assert row["completion_ids"] == [sampled[:sampled.index(stop) + 1]] and row["truncated"] == [False]
    assert (report["finished"], report["truncated"]) == (1, 0)
    cut = Sampling(samples_per_prompt=1, max_new_tokens=sampled.index(stop), seed=seed)
    generate(path, PROMPTS[:1], tmp_path / "cut", cut)
    row = rows(tmp_path / "cut")[0]
    assert row["completion_ids"] == [sampled[:sampled.index(stop)]] and row["truncated"] == [True]


def test_a_killed_job_resumes_where_it_stopped_with_the_same_output(zoo_models, tmp_path, monkeypatch):
    path = zoo_models("qwen2")
    prompts = [f"Say hello to person number {i}." + " Please." * (i % 4) for i in range(7)]
    sampling = Sampling(samples_per_prompt=3, temperature=1.3, max_new_tokens=5, seed=11)
    whole = generate(path, prompts, tmp_path / "whole", sampling, batch_size=2, shard_prompts=2)
    assert (whole["shards"], whole["shards_generated"]) == (4, 4)

    class Killed(Exception):
        pass

    def kill_after_first(number):
        if number == 0:
            raise Killed

    with pytest.raises(Killed):
        generate(path, prompts, tmp_path / "resumed", sampling, batch_size=2, shard_prompts=2,
                 on_shard=kill_after_first)
    shard = tmp_path / "resumed" / "shards" / "shard-00000.parquet"
    assert shard.exists() and not (tmp_path / "resumed" / "generations.parquet").exists()
    written = shard.stat().st_mtime_ns
    seen = []
    resumed = generate(path, prompts, tmp_path / "resumed", sampling, batch_size=2, shard_prompts=2,
                       on_shard=lambda n: seen.append((n, shard.stat().st_mtime_ns)))
    assert seen[0][0] == 1 and [n for n, _ in seen] == [1, 2, 3]  # shard 0 was not regenerated
    assert seen[0][1] == written
    assert resumed["shards_generated"] == 3
    assert rows(tmp_path / "resumed") == rows(tmp_path / "whole")
    # A finished run is not generated again (the model is not even loaded); another seed is another sample.
    with monkeypatch.context() as patch:
        patch.setattr("lexalign.models.loading.load_causal_lm", lambda *a, **k: pytest.fail("loaded the model"))
        again = generate(path, prompts, tmp_path / "whole", sampling, batch_size=2, shard_prompts=2)
    assert again["shards_generated"] == 0 and again["key"] == whole["key"]
    generate(path, prompts, tmp_path / "other", Sampling(samples_per_prompt=3, temperature=1.3, max_new_tokens=5,
                                                         seed=12), batch_size=2, shard_prompts=2)
    assert [r["completion_ids"] for r in rows(tmp_path / "other")] != [r["completion_ids"] for r in rows(
        tmp_path / "whole")]


def test_several_processes_share_the_shards_and_one_joins_them(zoo_models, tmp_path, monkeypatch):
    path = zoo_models("phi3")
    prompts = [f"Greet guest {i}." + " Kindly." * (i % 3) for i in range(5)]
    sampling = Sampling(samples_per_prompt=2, temperature=1.2, max_new_tokens=4, seed=5)
    alone = generate(path, prompts, tmp_path / "alone", sampling, batch_size=1, shard_prompts=1)
    written = {}
    for index in (1, 0):
        part = generate(path, prompts, tmp_path / "shared", sampling, batch_size=1, shard_prompts=1,
                        process=(index, 2), on_shard=lambda n, i=index: written.setdefault(i, []).append(n))
        assert part["joined"] is False and not (tmp_path / "shared" / "generations.parquet").exists()
    assert written == {0: [0, 2, 4], 1: [1, 3]}
    with monkeypatch.context() as patch:
        patch.setattr("lexalign.models.loading.load_causal_lm",
                      lambda *a, **k: pytest.fail("the join loaded the model"))
        joined = generate(path, prompts, tmp_path / "shared", sampling, batch_size=1, shard_prompts=1)
    assert joined["shards_generated"] == 0 and joined["tokens_per_second"] > 0
    assert rows(tmp_path / "shared") == rows(tmp_path / "alone")
    assert (joined["completions"], joined["truncated"]) == (alone["completions"], alone["truncated"])
    # One process having died, a single-process run makes just its shards.
    generate(path, prompts, tmp_path / "half", sampling, batch_size=1, shard_prompts=1, process=(0, 2))
    made = []
    generate(path, prompts, tmp_path / "half", sampling, batch_size=1, shard_prompts=1, on_shard=made.append)
    assert made == [1, 3] and rows(tmp_path / "half") == rows(tmp_path / "alone")


def test_prompts_over_the_budget_are_counted_and_skipped(zoo_models, tmp_path):
    path = zoo_models("gemma")
    tok = tokenizer(path)
    lengths = [len(template_ids(tok, [{"role": "user", "content": p}], True)) for p in PROMPTS]
    budget = sorted(lengths)[1]  # the longest prompt is over it
    report = generate(path, PROMPTS, tmp_path / "gen", Sampling(samples_per_prompt=2, max_new_tokens=3),
                      max_prompt_tokens=budget)
    assert (report["kept"], report["skipped_too_long"], report["skipped_rows"]) == (2, 1, [1])
    assert [r["row"] for r in rows(tmp_path / "gen")] == [0, 2]
    assert all(len(r["prompt_ids"]) <= budget for r in rows(tmp_path / "gen"))
    with pytest.raises(LexAlignError, match="3 of 3 are longer than the budget"):
        generate(path, PROMPTS, tmp_path / "none", Sampling(samples_per_prompt=2, max_new_tokens=3),
                 max_prompt_tokens=1)
    with pytest.raises(LexAlignError, match="Invalid sampling settings"):
        generate(path, PROMPTS, tmp_path / "bad", Sampling(temperature=0))


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_re_encoding_the_sampled_text_drifts_the_ids_do_not(zoo_models, tmp_path, family):
    """Why the trainer gets ids: decoding sampled tokens and encoding the text again (what a text-only data path
    does) gives other tokens for some completions (byte pieces of a split character, merges across pieces);
    the token table built from the ids gives back exactly what was sampled."""
    path = zoo_models(family)
    tok = tokenizer(path)
    generate(path, PROMPTS, tmp_path / "gen", Sampling(samples_per_prompt=4, temperature=1.5, max_new_tokens=12,
                                                       seed=0))
    got = rows(tmp_path / "gen")
    drifted = 0
    for r in got:
        text = [tok.decode(c, skip_special_tokens=False) for c in r["completion_ids"]]
        _, completion_ids = tokens.tokenize_groups(tok, [r["prompt"]] * 4, [[t] for t in text], chat=True)
        drifted += sum(again[0] != sampled for again, sampled in zip(completion_ids, r["completion_ids"], strict=True))
    assert drifted > 0
    judged = [{**r, "scores": [3.0, 2.0, 1.0, 0.0], "truncated": [False] * 4} for r in got]
    groups, counts = selection.ranked(judged, 4)
    assert counts["selected"] == 3
    dataset = trainer_dataset(selected_token_table(groups), "k4")
    assert [e["completion_ids"] for e in dataset] == [r["completion_ids"] for r in got]
    assert [e["prompt_ids"] for e in dataset] == [r["prompt_ids"] for r in got]


# --- LexAlign's sampler (lexalign/generation/fast_sampling.py) ---------------------------------------------------


def _load(path):
    from lexalign.models.loading import load_causal_lm

    return load_causal_lm(path, "cpu").eval()


def _prompt_ids(tok, prompts=PROMPTS) -> list[list[int]]:
    texts, chat = render_prompts(tok, prompts)
    return sorted(tokens.prompt_ids(tok, texts, chat), key=len, reverse=True)  # as generate() orders a batch


def _stop_token(answers: list[list[int]], n: int) -> int:
    """The token that, as one more end id, ends these answers at the most different lengths, one running out."""
    def lengths(c):
        return {a.index(c) + 1 if c in a else n for a in answers}

    return max(sorted({c for a in answers for c in a}), key=lambda c: (n in lengths(c), len(lengths(c))))


@pytest.mark.parametrize("family", ["demo", "gemma", "gpt2", "phi3"])
def test_greedy_answers_are_generates_token_for_token_as_rows_end_and_leave(zoo_models, demo_model_dir, family):
    """top_p ~ 0 is argmax: LexAlign's sampler and transformers' generate decode the same ids from a left-padded
    batch, on Llama (the demo), Gemma-2 (a sliding window longer than the batch: plain attention), GPT-2 (learned
    positions) and Phi-3. One more end id, a token of the greedy answers, ends them at different steps: finished
    rows leave the batch while the others go on."""
    from lexalign.generation import fast_sampling
    from lexalign.generation.sampling import sample

    path = demo_model_dir if family == "demo" else zoo_models(family)
    model, tok = _load(path), tokenizer(path)
    batch, n = _prompt_ids(tok), 16
    assert fast_sampling.preallocated_cache(model, 6, 64) is not None  # the fast path, not generate() again
    greedy = Sampling(samples_per_prompt=2, top_p=GREEDY, max_new_tokens=n)
    answers = [group[0][0] for group in sample(model, tok, batch, greedy, seed=0, fast=False)]
    stop = _stop_token(answers, n)
    model.generation_config.eos_token_id = tokens.end_ids(model, tok) + [stop]
    want = sample(model, tok, batch, greedy, seed=0, fast=False)
    got = sample(model, tok, batch, greedy, seed=1)
    assert got == want
    lengths = {len(ids) for group in got for ids, _ in group}
    assert n in lengths and len(lengths) >= 2
    assert all(cut == (ids[-1] != stop) for group in got for ids, cut in group)


def test_every_token_is_the_models_draw_replayed_alone(zoo_models):
    """Each answer, replayed token by token on its prompt alone (no padding, no cache, no other rows): every token is
    the one the model's distribution gives at that answer's uniform, an answer ends at its first end id (one of
    many: about one token in nine ends here, so rows leave at every step) and is flagged truncated exactly when
    max_new_tokens cut it. Two batches share 6 rows (fewer than a batch's 12 answers: prompts join as rows free up,
    a row of another prompt moved into each hole) and the cache runs out of columns every step (slack 1: every
    row's tokens move left). The cache, positions, masks, row moves and reframes are all checked."""
    import torch

    from lexalign.generation import fast_sampling

    path = zoo_models("llama3")
    model, tok = _load(path), tokenizer(path)
    prompts, k, n, temperature, top_p = _prompt_ids(tok, PROMPTS + ["Bye", "Good morning to you all"]), 4, 12, 1.3, 0.95
    batches, seeds, stops = [prompts[:3], prompts[3:]], [7, 8], list(range(100, 170))
    got = fast_sampling.sample(model, batches, seeds, stops, k, temperature, top_p, n, rows=6, slack=1)
    lengths = []
    for batch, seed, groups in zip(batches, seeds, got, strict=True):
        u = fast_sampling.draws(seed, len(batch), k, n)
        for i, prompt in enumerate(batch):
            for j, (ids, truncated) in enumerate(groups[i]):
                with torch.no_grad():
                    logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:]
                for t, token in enumerate(ids):
                    assert token == fast_sampling.next_tokens(logits[t:t + 1], u[i, j, t:t + 1], temperature, top_p)
                assert not set(ids[:-1]) & set(stops)
                assert truncated == (ids[-1] not in stops) and (not truncated or len(ids) == n)
                lengths.append(len(ids))
    assert len(set(lengths)) >= 5 and n in lengths  # rows ended all along, some ran out


def test_samples_are_seeded_distinct_and_do_not_depend_on_the_rest_of_the_batch(zoo_models):
    from lexalign.generation.sampling import sample, sample_batches

    path = zoo_models("qwen2")
    model, tok = _load(path), tokenizer(path)
    batch, sampling = _prompt_ids(tok), Sampling(samples_per_prompt=4, max_new_tokens=8)
    first = sample(model, tok, batch, sampling, seed=3)
    assert sample(model, tok, batch, sampling, seed=3) == first
    assert sample(model, tok, batch, sampling, seed=4) != first
    assert all(len({tuple(ids) for ids, _ in group}) == 4 for group in first)  # K draws, not one copied
    # The longest prompt alone draws what it drew beside the others (the others padded, ending at other times),
    # and fewer samples or tokens are the first of them, cut.
    assert sample(model, tok, batch[:1], sampling, seed=3) == first[:1]
    fewer = sample(model, tok, batch, Sampling(samples_per_prompt=2, max_new_tokens=4), seed=3)
    assert [[ids for ids, _ in group] for group in fewer] == [[ids[:4] for ids, _ in group[:2]] for group in first]
    # Batches sampled as one queue (a round's shard: prompts join as answers end) draw what each batch draws alone.
    more = _prompt_ids(tok, ["Bye", "Good morning to you all"])
    assert sample_batches(model, tok, [batch, more], sampling, [3, 5]) == [first, sample(model, tok, more, sampling,
                                                                                         seed=5)]


def _chi_square_bound(df: int, z: float = 4.75) -> float:
    """The chi-square quantile at the normal's z (4.75: p ~ 1e-6), by Wilson and Hilferty's approximation."""
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


def _chi_square(counts, probs, draws: int) -> tuple[float, int]:
    """Pearson's statistic over the tokens expected at least 5 times, the rest pooled; (statistic, df)."""
    expected = probs * draws
    big = expected >= 5
    observed = list(counts[big]) + [counts[~big].sum()]
    wanted = list(expected[big]) + [expected[~big].sum()]
    pairs = [(o, e) for o, e in zip(observed, wanted, strict=True) if e > 0]
    return float(sum((o - e) ** 2 / e for o, e in pairs)), len(pairs) - 1


@pytest.mark.parametrize("temperature,top_p", [(0.7, 1.0), (1.2, 0.8)])
def test_the_first_token_is_drawn_from_softmax_of_the_logits_over_t(demo_model_dir, temperature, top_p):
    """6000 first tokens of one prompt (K = 6000, one token each) against softmax(logits / T) of a plain forward,
    cut to the nucleus by transformers' own TopPLogitsWarper: Pearson's chi-square stays under its 1e-6 quantile,
    and the total variation is small. The demo's head is scaled so that the distribution is far from uniform,
    and the same counts against T = 1 (a sampler ignoring the temperature) are rejected: the test has power."""
    import torch
    from transformers.generation.logits_process import TopPLogitsWarper

    from lexalign.generation.sampling import sample

    model, tok = _load(demo_model_dir), tokenizer(demo_model_dir)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(3.0)
        prompt = _prompt_ids(tok, PROMPTS[:1])[0]
        logits = model(torch.tensor([prompt])).logits[0, -1].float()
    draws = 6000
    got = sample(model, tok, [prompt], Sampling(samples_per_prompt=draws, temperature=temperature, top_p=top_p,
                                                max_new_tokens=1), seed=11)[0]
    counts = torch.bincount(torch.tensor([ids[0] for ids, _ in got]), minlength=len(logits)).double()

    def target(t):
        scores = logits / t
        if top_p < 1:
            scores = TopPLogitsWarper(top_p)(None, scores[None])[0]
        return scores.softmax(-1).double()

    probs = target(temperature)
    assert probs.max() > 0.05 and (probs > 1e-3).sum() > 30  # neither uniform nor one token
    statistic, df = _chi_square(counts, probs, draws)
    assert statistic < _chi_square_bound(df), (statistic, df)
    assert 0.5 * (counts / draws - probs).abs().sum() < 0.08
    assert counts[probs == 0].sum() == 0  # nothing outside the nucleus
    wrong = target(1.0 if temperature != 1.0 else 2.0)
    assert _chi_square(counts, wrong, draws)[0] > _chi_square_bound(_chi_square(counts, wrong, draws)[1])


def test_a_cache_the_sampler_does_not_handle_samples_with_generate(zoo_models):
    """A sliding window shorter than prompt + answer is not plain attention: the sampler declines it, and sample()
    gives generate()'s draws (the same seed, the same ids)."""
    from lexalign.generation import fast_sampling
    from lexalign.generation.sampling import sample

    path = zoo_models("mistral")
    model, tok = _load(path), tokenizer(path)
    model.config.sliding_window = 8
    batch, sampling = _prompt_ids(tok), Sampling(samples_per_prompt=2, max_new_tokens=5)
    assert fast_sampling.preallocated_cache(model, 6, len(batch[0]) + 5) is None
    assert sample(model, tok, batch, sampling, seed=2) == sample(model, tok, batch, sampling, seed=2, fast=False)


def test_sampling_dtype_auto_is_bfloat16_where_the_device_multiplies_it_and_the_key_says_what_it_became(
        zoo_models, tmp_path, monkeypatch):
    """`dtype: auto` samples a bfloat16 copy where the CPU has avx512_bf16 or AMX tiles, the model as loaded
    elsewhere; the samples' key holds what it resolved to, so auto on a CPU without them is the default's key (its
    samples are reused, not drawn again) and auto where it is bf16 is `bfloat16`'s key."""
    import torch

    from lexalign.generation import sampling as sampling_module
    from lexalign.generation.sampling import native_bf16

    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    if flags:  # what this machine says of itself, not a mock: the check reads the same flags torch reads
        assert native_bf16("cpu") == ("avx512_bf16" in flags or "amx_tile" in flags)
    assert not native_bf16("mps")
    seen = []
    original = sampling_module.sample_batches

    def recording(model, *args, **kwargs):
        seen.append(next(model.parameters()).dtype)
        return original(model, *args, **kwargs)

    monkeypatch.setattr(sampling_module, "sample_batches", recording)
    path, knobs = zoo_models("qwen2"), {"samples_per_prompt": 2, "max_new_tokens": 4, "seed": 3}

    def run(name, dtype, native):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        seen.clear()
        report = generate(path, PROMPTS, tmp_path / name, Sampling(dtype=dtype, **knobs))
        return report, seen[:]

    loaded, dtypes = run("as-loaded", None, native=True)
    assert dtypes == [torch.float32]
    auto_without, dtypes = run("as-loaded", "auto", native=False)  # the same folder: finished, reused as it is
    assert dtypes == [] and auto_without["resumed"] == "complete" and auto_without["key"] == loaded["key"]
    auto_with, dtypes = run("auto", "auto", native=True)
    assert dtypes == [torch.bfloat16] and auto_with["key"] != loaded["key"]
    stored = json.loads(pq.read_schema(tmp_path / "auto" / "generations.parquet").metadata[b"lexalign.generations"])
    assert stored["sampling"]["dtype"] == "bfloat16"
    explicit, dtypes = run("auto", "bfloat16", native=False)  # auto's samples are bfloat16's
    assert dtypes == [] and explicit["resumed"] == "complete" and explicit["key"] == auto_with["key"]
    with pytest.raises(LexAlignError, match="Invalid sampling settings") as err:
        Sampling(dtype="bf16").check()
    assert "dtype is bf16 (null, or one of auto, bfloat16, float16, float32)" in err.value.render()


# --- the vllm engine ---------------------------------------------------------------------------------------------


def _has_vllm() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


@pytest.mark.skipif(_has_vllm(), reason="vLLM is installed here: the GPU test below runs it")
def test_the_vllm_engine_without_vllm_is_a_clear_error_before_any_shard(zoo_models, tmp_path):
    out = tmp_path / "gen"
    with pytest.raises(LexAlignError, match="online.sampling.engine is vllm, but vLLM is not installed") as err:
        generate(zoo_models("llama3"), PROMPTS[:2], out, Sampling(samples_per_prompt=2, max_new_tokens=4),
                 engine="vllm")
    assert "lexalign[vllm]" in err.value.render() and "engine: hf" in err.value.render()
    assert not out.exists()  # checked before any work
    with pytest.raises(LexAlignError, match='Unknown generation engine "vlm"'):
        generate(zoo_models("llama3"), PROMPTS[:2], out, Sampling(), engine="vlm")


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not _has_vllm(), reason="needs vLLM and a CUDA GPU: pip install lexalign[vllm], pytest -m gpu")
@pytest.mark.parametrize("family", TEMPLATED)
def test_vllm_samples_keep_their_ids_and_end_with_the_turn_end(zoo_models, tmp_path, family):
    """What the hf engine's tests check, on vLLM's samples: the prompt ids are the template's, a finished answer
    ends with the end id it stopped on (and holds no other), a cut one has max_new_tokens ids and is flagged, the
    text is the ids decoded, the same seed draws the same ids, and the table is the hf engine's layout."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    path, tok = zoo_models(family), tokenizer(zoo_models(family))
    sampling = Sampling(samples_per_prompt=3, temperature=1.0, max_new_tokens=6, seed=5)
    generate(path, PROMPTS, tmp_path / "vllm", sampling, batch_size=2, device="cuda", engine="vllm")
    generate(path, PROMPTS, tmp_path / "again", sampling, batch_size=2, device="cuda", engine="vllm")
    generate(path, PROMPTS, tmp_path / "hf", sampling, batch_size=2, device="cuda")
    got = rows(tmp_path / "vllm")
    from transformers import AutoModelForCausalLM

    stops = tokens.end_ids(AutoModelForCausalLM.from_pretrained(path), tok)  # what the hf engine stops on
    for r in got:
        messages = [{"role": "user", "content": PROMPTS[r["row"]]}]
        assert r["prompt_ids"] == template_ids(tok, messages, True)
        for ids, cut, text in zip(r["completion_ids"], r["truncated"], r["completions"], strict=True):
            if cut:
                assert len(ids) == sampling.max_new_tokens
            else:
                assert ids[-1] in stops, (family, ids)
            assert not set(ids[:-1]) & set(stops)
            assert text == tok.decode(ids if cut else ids[:-1], skip_special_tokens=True)
    assert [r["completion_ids"] for r in rows(tmp_path / "again")] == [r["completion_ids"] for r in got]
    hf = pq.read_table(tmp_path / "hf" / "generations.parquet")
    assert pq.read_table(tmp_path / "vllm" / "generations.parquet").schema.names == hf.schema.names
