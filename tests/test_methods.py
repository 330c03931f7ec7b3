"""KTO, ORPO, SimPO and CPO beside DPO and GDPO: each method's keys, each loss at step 0 against a value worked
out by hand from known log-probabilities, KTO's unpaired data and its reference step, resume and interrupt, the
`lexalign align` command, and one sweep through the pipeline mixing every method."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import signal_at, write_jsonl

from lexalign.config.loader import _root_schema, section_defaults, validate_config
from lexalign.config.sections import METHODS, AlignConfig, run_alignment
from lexalign.core.errors import LexAlignError, TrainingInterrupted
from lexalign.demo import task
from lexalign.methods import METHOD_KEYS


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def pairs(n: int = 16) -> pd.DataFrame:
    frame = pd.DataFrame(task.preference_rows(0, n))
    frame["source_row"] = range(1, n + 1)
    return frame


def align_job(tmp_path: Path, model: Path, frame: pd.DataFrame, reference=None, name: str = "run", **params):
    from lexalign.train.align import AlignJob

    params = {"learning_rate": 1e-3, "batch_size": 8, "gradient_accumulation_steps": 1, "max_steps": 2,
              "warmup_steps": 0, "max_length": 64, "save_steps": 1000, "logging_steps": 1, "lora_dropout": 0.0,
              **params}
    return AlignJob(model_path=model, train=frame, eval=frame.iloc[:0], output_dir=tmp_path / name,
                    cfg=AlignConfig.from_dict(section_defaults("alignment", params)),
                    checkpoint_dir=tmp_path / f"{name}-checkpoints", device="cpu", seed=3,
                    reference_path=Path(reference) if reference else None)


def logged(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


# --- each method's keys ------------------------------------------------------------------------------


@pytest.mark.parametrize("method, key, value, owner", [
    ("dpo", "cpo_alpha", 0.5, "cpo"),
    ("orpo", "desirable_weight", 2.0, "kto"),
    ("kto", "gamma", 1.0, "simpo"),
    ("cpo", "orpo_lambda", 0.2, "orpo"),
    ("simpo", "loss_type", "ipo", "dpo"),
    ("gdpo", "undesirable_weight", 0.5, "kto"),
    ("orpo", "group_delay_weight", 0.2, "gdpo"),
    ("dpo", "group_delay_size", 3, "gdpo"),
    ("orpo", "beta", 0.3, None),
])
def test_a_key_the_method_does_not_use_is_named_once_and_set_back(method, key, value, owner, capsys):
    # Built in code, defaults filled in: the last guard sees the value set away from its default.
    cfg = AlignConfig.from_dict(section_defaults("alignment", {"method": method, key: value}))
    default = section_defaults("alignment")[key]
    assert cfg.to_dict()[key] == ([default] if key == "loss_type" else default)
    err = capsys.readouterr().err
    why = f"it is a key of method {owner}" if owner else f"method {method} has no beta"
    assert err.count("Warning: ") == 1
    assert f'Warning: alignment.{key} is ignored: {why}, and alignment.method is "{method}"' in err
    assert (f"Remove {key}, or set method: {owner}" if owner else f"Remove {key}\n") in err


def written(alignment: dict) -> dict:
    return validate_config({"model": {"path": "m"}, "dataset": {"path": "d"}, "alignment": alignment}, "align",
                           source="align.yaml")


@pytest.mark.parametrize("key", sorted(METHOD_KEYS))
def test_a_key_of_another_method_is_named_even_at_its_default(key, capsys):
    """Every method key, written under every method it does not belong to: one warning naming the key, the
    method it belongs to and the method configured, and the key back at its default (no trainer reads it)."""
    owner = METHOD_KEYS[key]
    default = section_defaults("alignment")[key]
    other = 3 if key == "group_delay_size" else default  # a value away from the default is set back too
    for method in METHODS:
        alignment = {"method": method, key: other, **({"batch_size": 2} if method == "kto" else {})}
        cfg = written(alignment)["alignment"]
        err = capsys.readouterr().err
        if method == owner:
            assert cfg[key] == other and "Warning" not in err
            continue
        assert cfg[key] == default
        assert err.count("Warning: ") == 1 and f"alignment.{key} is ignored: it is a key of method {owner}, " \
            f'and alignment.method is "{method}" in align.yaml' in err


def test_a_key_no_method_knows_stays_an_error():
    with pytest.raises(LexAlignError, match='Unknown key "alignment.gamma_ray"'):
        written({"method": "simpo", "gamma_ray": 1.0})


def test_the_registry_and_the_schemas_marks_agree():
    """methods.py says which keys each method owns; the schema's x-method marks say the same, and every method
    of the schema's enum is in the registry."""
    from lexalign import methods
    from lexalign.config.loader import method_keys

    properties = _root_schema()["$defs"]["alignment"]["properties"]
    assert method_keys() == METHOD_KEYS == {k: m.name for m in methods.METHODS.values() for k in m.keys}
    assert properties["method"]["enum"] == list(methods.NAMES) == list(METHODS)
    assert properties["method"]["default"] == methods.DEFAULT
    assert all(m.keys for m in methods.METHODS.values())
    assert {k for k, o in METHOD_KEYS.items() if o == "kto"} == {"desirable_weight", "undesirable_weight"}
    assert not any("x-ignored-by" in p for p in properties.values())


def design_alignment() -> dict:
    """The align config block of the original design, read from the design document (not a copy)."""
    import re

    import yaml

    # The reference folder: shared/ beside the checkout's files, or the project's one shared folder.
    places = [Path(__file__).resolve().parents[1] / "shared", Path(__file__).resolve().parents[2] / "shared",
              Path("/work/shared")]
    text = next((p / "reference" / "original-design.md" for p in places
                 if (p / "reference" / "original-design.md").is_file()), None)
    if text is None:
        pytest.skip("the design document (shared/reference/original-design.md) is not here")
    block = re.search(r"```yaml\n(# config/align.yaml\n.*?)```", text.read_text(), re.S).group(1)
    return yaml.safe_load(block)


@pytest.mark.parametrize("method", ["dpo", "gdpo"])
def test_the_designs_align_config_runs_as_written_with_either_method(method, tmp_path, demo_model_dir, capsys):
    """The design writes loss_type beside GDPO's keys ("only used if method: gdpo"): with method dpo the GDPO keys
    are named once each, with method gdpo loss_type is; both plan an alignment (the command's dry run)."""
    import yaml
    from click.testing import CliRunner

    from lexalign.cli import main

    design = design_alignment()
    assert design["alignment"]["method"] == "dpo" and "loss_type" in design["alignment"]
    data = write_jsonl(tmp_path / "prefs.jsonl", task.preference_rows(0, 8))
    config = {**design, "model": {"path": str(demo_model_dir)}, "dataset": {**design["dataset"], "path": str(data)},
              "alignment": {**design["alignment"], "method": method, "output_dir": str(tmp_path / "out")},
              "device": "cpu"}
    path = tmp_path / "align.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(main, ["align", "--config", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    unused = ["group_delay_size", "group_delay_weight"] if method == "dpo" else ["loss_type"]
    for key in unused:
        assert result.output.count(f"alignment.{key} is ignored") == 1, result.output
    assert result.output.count("Warning: ") == len(unused)
    assert f"{method} (" in result.output
    cfg = AlignConfig.from_dict(written(design["alignment"] | {"method": method})["alignment"])
    assert cfg.method == method and cfg.method_keys["group_delay_size"] == 4
    assert cfg.method_keys["loss_type"] == ["sigmoid"]


def test_a_run_that_changes_the_method_leaves_the_base_methods_keys_behind(capsys):
    base = section_defaults("alignment", {"method": "kto", "desirable_weight": 1.2, "beta": 0.3})
    orpo = run_alignment(base, {"method": "orpo", "orpo_lambda": 0.3})
    assert orpo["desirable_weight"] == 1.0 and orpo["orpo_lambda"] == 0.3 and orpo["beta"] == 0.1  # no beta
    AlignConfig.from_dict(orpo)
    assert run_alignment(base, {"beta": 0.2})["desirable_weight"] == 1.2  # same method: inherited
    assert "Warning" not in capsys.readouterr().err
    # A key the run writes that its method does not use: named by the run, at its default value too, and set back.
    assert run_alignment(base, {"method": "dpo", "gamma": 1.0})["gamma"] == 0.5
    assert 'run.gamma is ignored: it is a key of method simpo, and run.method is "dpo"' in capsys.readouterr().err
    dpo = section_defaults("alignment", {"method": "dpo"})
    assert run_alignment(dpo, {"method": "kto", "desirable_weight": 1.0}, "kto")["method"] == "kto"
    assert "Warning" not in capsys.readouterr().err
    assert run_alignment(dpo, {"desirable_weight": 2.0}, "bad")["desirable_weight"] == 1.0
    assert 'runs.bad.desirable_weight is ignored: it is a key of method kto, and alignment.method is "dpo"' in \
        capsys.readouterr().err
    run_alignment(base, {"method": "dpo", "desirable_weight": 1.0}, "bad")
    assert 'runs.bad.desirable_weight is ignored: it is a key of method kto, and runs.bad.method is "dpo"' in \
        capsys.readouterr().err
    run_alignment(dpo, {"method": "orpo", "beta": 0.2}, "orpo")
    assert 'runs.orpo.beta is ignored: method orpo has no beta, and runs.orpo.method is "orpo"' in \
        capsys.readouterr().err


def test_the_pipeline_names_a_key_of_another_method_when_it_plans_the_dag(tmp_path):
    """Snakemake, at DAG time: under alignment, and in a sweep run, a key the method does not use is named in a
    warning and the plan goes on."""
    import yaml

    from workflow import copy_workflow, snakemake

    workdir = copy_workflow(tmp_path)
    config_file = workdir / "config" / "config.yaml"
    good = yaml.safe_load(config_file.read_text())
    config_file.write_text(yaml.safe_dump({**good, "alignment": {**good["alignment"], "cpo_alpha": 1.0},
                                           "runs": {"kto": {"method": "kto", "desirable_weight": 1.0},
                                                    "bad": {"desirable_weight": 1.0}}}, sort_keys=False))
    result = snakemake(workdir, "-n", "--cores", "1")
    out = result.stdout + result.stderr
    assert result.returncode == 0 and "Traceback" not in out, out[-3000:]
    assert out.count('alignment.cpo_alpha is ignored: it is a key of method cpo, and alignment.method is "dpo"') == 1
    assert out.count('runs.bad.desirable_weight is ignored: it is a key of method kto, and alignment.method is '
                     '"dpo"') == 1
    assert "runs.kto.desirable_weight" not in out


# --- the losses, by hand -----------------------------------------------------------------------------


def test_simpo_orpo_and_cpo_losses_by_hand():
    from lexalign.methods.reference_free import chosen_nll, cpo_loss, orpo_loss, simpo_loss

    # SimPO: -log σ(β·(mean_w - mean_l) - γ) with β = 2, γ = 1: margins 1 and -1 give log(1 + e^-1), log(1 + e^3).
    simpo = simpo_loss(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -2.0]), beta=2.0, gamma=1.0)
    assert simpo.loss.item() == pytest.approx((math.log1p(math.exp(-1)) + math.log1p(math.exp(3))) / 2, abs=1e-6)
    assert simpo.chosen_rewards.tolist() == [-2.0, -6.0] and simpo.nll.item() == 0.0
    # NLL per chosen token: summed log-probs -6 over 3 tokens and -2 over 1 token: 8 / 4.
    nll = chosen_nll(torch.tensor([-6.0, -2.0]), torch.tensor([3, 1]))
    assert nll.item() == pytest.approx(2.0)
    # ORPO: p_w = 0.5 (odds 1), p_l = 0.2 (odds 1/4): the log odds ratio is log 4, -log σ(log 4) = log 1.25.
    orpo = orpo_loss(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.2)]), nll, lam=0.1)
    assert orpo.loss.item() == pytest.approx(2.0 + 0.1 * math.log(1.25), abs=1e-6)
    # CPO: -log σ(β·(-10 - (-20))) at β = 0.1 is log(1 + e^-1), plus α·NLL.
    cpo = cpo_loss(torch.tensor([-10.0]), torch.tensor([-20.0]), nll, beta=0.1, alpha=0.5)
    assert cpo.loss.item() == pytest.approx(math.log1p(math.exp(-1)) + 0.5 * 2.0, abs=1e-6)


@pytest.fixture(scope="module")
def policy_logps(sft_model_dir):
    """Summed log-probs and token counts of the first 8 demo pairs under the SFT model (the policy at step 0),
    computed apart from any trainer (lexalign.evaluation.figures.sequence_logps)."""
    from lexalign.core import tokens
    from lexalign.evaluation.figures import sequence_logps
    from lexalign.models.loading import load_causal_lm, load_tokenizer

    frame = pairs(8)
    model, tokenizer = load_causal_lm(sft_model_dir, "cpu").eval(), load_tokenizer(sft_model_dir)
    prompts = frame["prompt"].tolist()
    responses = [[c, r] for c, r in zip(frame["chosen"], frame["rejected"], strict=True)]
    _, completion_ids = tokens.tokenize_groups(tokenizer, prompts, responses, False)
    out = {side: sequence_logps(model, tokenizer, prompts, frame[side].tolist()) for side in ("chosen", "rejected")}
    return {**out, "chosen_len": [len(c[0]) for c in completion_ids],
            "rejected_len": [len(c[1]) for c in completion_ids]}


def expected_loss(method: str, p: dict, beta: float, gamma: float, lam: float, alpha: float) -> float:
    """Each method's loss over the 8 pairs, from the log-probs alone, in plain Python."""
    rows = list(zip(p["chosen"], p["rejected"], p["chosen_len"], p["rejected_len"], strict=True))
    nll = -sum(c for c, _, _, _ in rows) / sum(lc for _, _, lc, _ in rows)
    if method == "simpo":
        terms = [-log_sigmoid(beta * (c / lc - r / lr) - gamma) for c, r, lc, lr in rows]
        return sum(terms) / len(terms)
    if method == "orpo":
        def log_odds(x):
            return x - math.log1p(-math.exp(x))

        terms = [-lam * log_sigmoid(log_odds(c / lc) - log_odds(r / lr)) for c, r, lc, lr in rows]
        return nll + sum(terms) / len(terms)
    terms = [-log_sigmoid(beta * (c - r)) for c, r, _, _ in rows]
    return sum(terms) / len(terms) + alpha * nll


@pytest.mark.slow
@pytest.mark.parametrize("method, use_lora", [("orpo", True), ("simpo", False), ("cpo", True)])
def test_reference_free_loss_at_step_0_is_the_hand_worked_value(tmp_path, sft_model_dir, policy_logps, method,
                                                                use_lora):
    keys = {"beta": 2.0, "gamma": 0.7} if method == "simpo" else {"orpo_lambda": 0.3} if method == "orpo" \
        else {"beta": 0.05, "cpo_alpha": 0.6}
    job = align_job(tmp_path, sft_model_dir, pairs(8), method=method, use_lora=use_lora, **keys)
    trainer, _, _ = job.setup()
    assert trainer.ref_model is None  # one model: no reference, even for full fine-tuning
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(8)]))
    trainer.model.train()  # dropout is off (disable_dropout); metrics go to "train"
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()
    cfg, own = job.cfg, job.cfg.method_keys
    assert loss == pytest.approx(expected_loss(method, policy_logps, cfg.beta, own["gamma"], own["orpo_lambda"],
                                               own["cpo_alpha"]), abs=1e-4)


# --- KTO: unpaired rows, its reference (KL term included), its loss by hand --------------------------


def test_pairs_are_split_into_a_desirable_and_an_undesirable_row_with_mismatched_kl_completions():
    from lexalign.reference.layout import kl_partners, split_groups, unpaired_rows

    frame = pairs(6)
    rows, prompts, completions, labels = unpaired_rows(frame)
    assert rows == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5] and labels == [True, False] * 6
    assert completions[:2] == [frame["chosen"][0], frame["rejected"][0]]
    partners = kl_partners(prompts)
    assert all(prompts[j] != prompts[i] for i, j in enumerate(partners))  # the KL pairs are mismatched
    groups = split_groups(frame, "unpaired")
    assert groups.responses[3] == [completions[3], completions[partners[3]]] and groups.scores[3] == [0.0, 0.0]


def test_validation_reads_unpaired_rows_with_mapped_fields_and_reports_the_balance(tmp_path, demo_model_dir):
    from lexalign.data.validated import kto_balance, label_balance
    from lexalign.steps import inputs

    rows = [{"question": r["prompt"], "answer": r["chosen"] if i % 3 else r["rejected"], "thumbs_up": i % 3 != 0}
            for i, r in enumerate(task.preference_rows(0, 60))]
    rows += [{"question": "User: Hi\nAssistant:", "answer": " Hello", "thumbs_up": "maybe"},
             {"question": "User: Hi\nAssistant:", "answer": " Hello", "thumbs_up": "TRUE"}]
    write_jsonl(tmp_path / "raw" / "train.jsonl", rows)
    report = inputs.validate(raw=tmp_path / "raw", tokenizer=demo_model_dir, output=tmp_path / "data",
                             dataset={"prompt_field": "question", "completion_field": "answer",
                                      "label_field": "thumbs_up", "max_length": 64, "eval_fraction": 0.2})
    assert report["shape"] == "unpaired" and report["reject_reasons"].get("bad_label") == 1
    train = pd.read_parquet(tmp_path / "data" / "train.parquet")
    assert list(train.columns) == ["prompt", "completion", "label", "source_row"]
    labels = report["labels"]["train"]
    assert labels == {"desirable": int(train["label"].sum()), "undesirable": int((~train["label"]).sum())}
    assert labels["desirable"] > labels["undesirable"]  # two thumbs up for each thumbs down
    # The weighted ratio (w_d·n_d)/(w_u·n_u) should lie in [1, 4/3]: 2:1 at equal weights is too high.
    warning = label_balance(labels["desirable"], labels["undesirable"])["warning"]
    assert "outside the recommended [1, 1.33]" in warning
    assert label_balance(40, 20, 1.0, 1.6)["warning"] is None
    assert label_balance(40, 20, 1.0, 1.2)["weighted_ratio"] == pytest.approx(40 / 24)
    # Under each KTO run's weights (the validate step's report): unpaired rows by label, pairs split 1:1.
    weights = {"even": {"desirable_weight": 1.0, "undesirable_weight": 1.0},
               "fixed": {"desirable_weight": 1.0,
                         "undesirable_weight": labels["desirable"] / (1.2 * labels["undesirable"])}}
    balance = kto_balance(report, weights)
    assert balance["even"]["warning"] == warning and balance["fixed"]["warning"] is None
    assert balance["fixed"]["weighted_ratio"] == pytest.approx(1.2)
    pairs = kto_balance({"train_rows": 10}, {"kto": {"desirable_weight": 2.0, "undesirable_weight": 1.0}})["kto"]
    assert (pairs["desirable"], pairs["undesirable"], pairs["weighted_ratio"]) == (10, 10, 2.0) and pairs["warning"]
    assert kto_balance({"train_rows": 4, "labels": {"train": {"desirable": 4, "undesirable": 0}}},
                       {"kto": {"desirable_weight": 1.0, "undesirable_weight": 1.0}})["kto"]["weighted_ratio"] is None


def test_chat_rows_in_trls_unpaired_format_get_the_templates_own_tokens(tmp_path, zoo_models):
    """Conversational unpaired rows (TRL's format: prompt and completion as messages) are rendered by the model's
    template, and KTO's ids are exactly apply_chat_template's: one BOS, the end-of-turn token, nothing added."""
    from lexalign.core.tokens import CHAT_ATTR
    from lexalign.data.validated import is_chat
    from lexalign.models.loading import load_tokenizer
    from lexalign.steps import inputs
    from lexalign.train.trainer_data import tokenized_dataset

    model = zoo_models("llama3")
    rows = [{"prompt": [{"role": "user", "content": f"Greet {name}."}],
             "completion": [{"role": "assistant", "content": f"Hello {name}!" if good else f"Go away {name}."}],
             "label": good} for name in ("Ann", "Bo", "Cy", "Di", "Ed", "Flo") for good in (True, False)]
    write_jsonl(tmp_path / "raw" / "train.jsonl", rows)
    report = inputs.validate(raw=tmp_path / "raw", tokenizer=model, output=tmp_path / "data",
                             dataset={"max_length": 256, "eval_fraction": 0.0})
    assert report["shape"] == "unpaired" and report["chat_template"] and report["train_rows"] == 12
    train = pd.read_parquet(tmp_path / "data" / "train.parquet")
    train.attrs[CHAT_ATTR] = is_chat(tmp_path / "data")  # as the align step reads it
    tokenizer = load_tokenizer(model)
    dataset = tokenized_dataset(tokenizer, train, "unpaired", "train")
    for row, example in zip(rows, dataset, strict=True):
        want = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True, return_dict=False)
        want = list(want["input_ids"] if isinstance(want, dict) else want)
        assert example["prompt_ids"] + example["completion_ids"] == want
        assert want.count(tokenizer.bos_token_id) == 1 and example["label"] == row["label"]


@pytest.mark.slow
def test_kto_reference_scores_every_row_and_its_kl_completion_as_trl_does(tmp_path, sft_model_dir):
    from lexalign.models.loading import load_causal_lm, load_tokenizer
    from lexalign.reference.scoring import compute_reference, load_reference
    from lexalign.train.kto_trainer import KTOConfig, LexAlignKTOTrainer
    from lexalign.train.trainer_data import tokenized_dataset

    frame = pairs(8)
    out = tmp_path / "unpaired-max64.parquet"
    compute_reference(sft_model_dir, frame, frame.iloc[:0], out, layout="unpaired", max_length=64)
    table = load_reference(out)["train"]
    assert table.num_rows == 16  # every pair, split in two
    tokenizer = load_tokenizer(sft_model_dir)
    dataset = tokenized_dataset(tokenizer, frame, "unpaired", "train")
    trainer = LexAlignKTOTrainer(model=load_causal_lm(sft_model_dir, "cpu"), processing_class=tokenizer,
                                 args=KTOConfig(output_dir=str(tmp_path / "kto"), max_length=64, use_cpu=True,
                                                bf16=False, report_to=[], per_device_train_batch_size=8),
                                 train_dataset=dataset)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(16)])
    ours = torch.tensor(table.column("ref_logps").to_pylist())
    theirs = trainer.compute_ref_log_probs(trainer.ref_model, batch)  # TRL's own reference pass
    assert torch.allclose(ours[:, 0], theirs[0], atol=1e-4) and torch.allclose(ours[:, 1], theirs[1], atol=1e-4)


@pytest.mark.slow
def test_kto_loss_at_step_0_is_the_hand_worked_value(tmp_path, sft_model_dir):
    """Reference log-probs offset from the policy's by known amounts: r = β·δ, z = mean(ε), and the loss of
    the first batch follows by hand."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lexalign.reference.scoring import compute_reference

    frame = pairs(8)
    path = tmp_path / "unpaired-max64.parquet"
    compute_reference(sft_model_dir, frame, frame.iloc[:0], path, layout="unpaired", max_length=64)
    table = pq.read_table(path)
    delta = [0.8, -0.4, 2.0, 1.0, -1.5, -3.0, 0.2, 0.6] * 2  # policy minus reference, per completion
    epsilon = [0.3, 0.1, -0.2, 0.5, 0.4, 0.0, 0.2, 0.1] * 2  # the same for the KL completions
    shifted = [[p - d, k - e] for (p, k), d, e in zip(table.column("ref_logps").to_pylist(), delta, epsilon,
                                                      strict=True)]
    table = table.set_column(table.column_names.index("ref_logps"), "ref_logps",
                             pa.array(shifted, type=pa.list_(pa.float64())))
    pq.write_table(table, path)  # the schema's metadata (the file's key) is kept
    beta, w_d, w_u = 0.5, 1.3, 0.9
    out = align_job(tmp_path, sft_model_dir, frame, path, method="kto", beta=beta, desirable_weight=w_d,
                    undesirable_weight=w_u, max_steps=1).run()
    # Batches are sequential: the first holds rows 0..7, pairs 0..3 each as (desirable, undesirable).
    z = max(0.0, sum(epsilon[:8]) / 8)
    losses = [w_d * (1 - sigmoid(beta * (d - z))) if i % 2 == 0 else w_u * (1 - sigmoid(beta * (z - d)))
              for i, d in enumerate(delta[:8])]
    first = logged(out)[0]
    assert first["loss"] == pytest.approx(sum(losses) / 8, abs=1e-4)
    assert first["kl"] == pytest.approx(z, abs=1e-4)


def test_unpaired_rows_need_kto(tmp_path):
    from lexalign.train.align import check_data

    unpaired = pd.DataFrame({"prompt": ["p"], "completion": ["c"], "label": [True], "source_row": [1]})
    job = align_job(tmp_path, tmp_path, unpaired, method="orpo")
    with pytest.raises(LexAlignError, match="needs pairs"):
        check_data(job)


# --- resume, interrupt and progress ------------------------------------------------------------------




@pytest.mark.slow
def test_simpo_is_interrupted_and_resumed_like_dpo(tmp_path, sft_model_dir, capsys):
    frame = pairs(48)
    straight = logged(align_job(tmp_path, sft_model_dir, frame, name="straight", method="simpo", beta=2.0,
                                max_steps=4).run())
    job = align_job(tmp_path, sft_model_dir, frame, name="stopped", method="simpo", beta=2.0, max_steps=4)
    job.extra_callbacks = [signal_at(2)]
    with pytest.raises(TrainingInterrupted) as stop:
        job.run()
    assert stop.value.checkpoint == job.checkpoint_dir / "checkpoint-2"
    job.extra_callbacks = []
    resumed = logged(job.run())
    captured = capsys.readouterr()
    assert "Resuming from" in captured.out
    assert "Epoch 1/1: [" in captured.err and "| Reward: " in captured.err  # the progress line
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)


# --- lexalign align ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_lexalign_align_runs_kto_on_unpaired_rows(tmp_path, sft_model_dir):
    import yaml
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM

    from lexalign.cli import main

    rows = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
            for r in task.preference_rows(0, 32) for side in ("chosen", "rejected")]
    write_jsonl(tmp_path / "kto.jsonl", rows)
    config = tmp_path / "align.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": str(sft_model_dir)}, "device": "cpu",
        "dataset": {"path": str(tmp_path / "kto.jsonl"), "max_length": 64, "eval_fraction": 0.2},
        "alignment": {"method": "kto", "output_dir": str(tmp_path / "aligned"), "learning_rate": "1e-3",
                      "checkpoint_dir": str(tmp_path / "ckpt"), "batch_size": 8, "gradient_accumulation_steps": 1,
                      "max_steps": 3, "warmup_steps": 0, "max_length": 64, "logging_steps": 1,
                      "desirable_weight": 1.0, "undesirable_weight": 1.0}}))
    dry = CliRunner().invoke(main, ["align", "--config", str(config), "--dry-run"])
    assert dry.exit_code == 0 and "kto (desirable_weight 1.0, undesirable_weight 1.0, beta 0.1" in dry.output
    result = CliRunner().invoke(main, ["align", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "KTO rows: " in result.output and "Epoch 1/1: [" in result.output
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "aligned")
    assert model.config.model_type == "llama"
    lineage = json.loads((tmp_path / "aligned" / "lineage.json").read_text())
    assert lineage["config"]["method"] == "kto" and lineage["reference_model"]["sft"]
    assert [r["step"] for r in logged(tmp_path / "aligned")] == [1, 2, 3]
    # Held-out unpaired rows: each implicit reward against its label.
    scored = CliRunner().invoke(main, ["evaluate", "--config", str(config), "--output", str(tmp_path / "eval.json"),
                                       "--num-prompts", "4"])
    assert scored.exit_code == 0, scored.output
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["held_out"] == "unpaired" and result["rows"] > 0 and 0 <= result["preference_accuracy"] <= 1


def test_lexalign_validate_warns_when_kto_weights_miss_the_balance_and_the_dry_run_names_no_reference(
        tmp_path, demo_model_dir):
    import yaml
    from click.testing import CliRunner

    from lexalign.cli import main

    rows = [{"prompt": r["prompt"], "completion": r["chosen"] if i % 3 else r["rejected"], "label": i % 3 != 0}
            for i, r in enumerate(task.preference_rows(0, 45))]
    write_jsonl(tmp_path / "kto.jsonl", rows)

    def config(**alignment) -> str:
        path = tmp_path / f"{alignment['method']}.yaml"
        path.write_text(yaml.safe_dump({"model": {"path": str(demo_model_dir)}, "device": "cpu",
                                        "dataset": {"path": str(tmp_path / "kto.jsonl"), "max_length": 64},
                                        "alignment": alignment}))
        return str(path)

    result = CliRunner().invoke(main, ["validate", "--config", config(method="kto"), "--output", str(tmp_path / "v")])
    assert result.exit_code == 0, result.output
    assert "labels (train): " in result.output and "Warning: KTO: " in result.output
    assert "set desirable_weight in [" in result.output
    dry = CliRunner().invoke(main, ["align", "--config", config(method="orpo", orpo_lambda=0.2), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "orpo (orpo_lambda 0.2, LoRA)" in dry.output and "no reference model (orpo is reference-free)" in dry.output


# --- the pipeline on unpaired rows (TRL's unpaired format) ------------------------------------------------


def unpaired_rows(n: int = 60) -> list[dict]:
    """TRL's unpaired format: one completion per prompt, labelled; two thumbs up for each thumbs down (KTO's
    weighted ratio 2.0 at equal weights: outside [1, 4/3]), and two rows validation rejects."""
    rows = [{"prompt": r["prompt"], "completion": r["chosen"] if i % 3 else r["rejected"], "label": i % 3 != 0}
            for i, r in enumerate(task.preference_rows(0, n))]
    return rows + [{"prompt": "User: Hi\nAssistant:", "completion": " Hello", "label": "maybe"},
                   {"prompt": "User: Hi\nAssistant:", "completion": "", "label": True}]


def unpaired_config(data: Path, alignment: dict) -> dict:
    """The demo model aligned as it is (finetune.method none: no SFT job), a few steps, no judge or benchmark."""
    return {"seed": 0, "device": "cpu", "model": {"source": "demo"},
            "preference_data": {"path": str(data), "max_length": 64, "eval_fraction": 0.2},
            "finetune": {"method": "none"},
            "alignment": {"max_steps": 2, "batch_size": 8, "gradient_accumulation_steps": 1, "learning_rate": 1e-2,
                          "warmup_steps": 0, "max_length": 64, "logging_steps": 1, "save_steps": 1000,
                          "lora_dropout": 0.0, "target_modules": "all-linear", **alignment},
            "evaluate": {"judge": "none", "num_prompts": 4, "max_new_tokens": 4, "lm_eval": {"tasks": []}}}


@pytest.fixture(scope="module")
def kto_pipeline(tmp_path_factory):
    """One real pipeline run of KTO on unpaired rows: download (the demo model, the local rows), validate,
    reference, align."""
    import yaml

    from workflow import copy_workflow, snakemake

    root = tmp_path_factory.mktemp("kto-pipeline")
    data = write_jsonl(root / "unpaired.jsonl", unpaired_rows())
    workdir = copy_workflow(root / "workflow")
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(unpaired_config(data, {"method": "kto"})))
    dry = snakemake(workdir, "-n", "--cores", "2", "results/aligned")
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
    result = snakemake(workdir, "--cores", "2", "results/aligned")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"workdir": workdir, "data": data, "dry": dry.stdout, "out": result.stdout + result.stderr}


@pytest.mark.slow
def test_the_pipeline_aligns_unpaired_rows_with_kto(kto_pipeline):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from workflow import planned_jobs

    workdir = kto_pipeline["workdir"]
    assert planned_jobs(kto_pipeline["dry"]) == {"download_model": 1, "download_data": 1, "validate_preferences": 1,
                                                 "reference": 1, "align": 1}
    assert "results/reference/preferences/unpaired-max64.parquet" in kto_pipeline["dry"]
    # Validation: every row read is kept (train or eval) or rejected.
    validated = workdir / "results" / "data" / "preferences"
    report = json.loads((validated / "report.json").read_text())
    train, evals = pd.read_parquet(validated / "train.parquet"), pd.read_parquet(validated / "eval.parquet")
    rejects = (validated / "rejects.jsonl").read_text().splitlines()
    assert report["shape"] == "unpaired" and len(rejects) == report["rejected_rows"] == 2
    assert len(train) + len(evals) + len(rejects) == report["input_rows"] == len(unpaired_rows())
    assert list(train.columns) == ["prompt", "completion", "label", "source_row"]
    # The labels in the validate log; the balance under the KTO run's weights in the align log (the weights are
    # the align step's alone: changing one reruns no validation and no reference step), with its warning.
    desirable, undesirable = int(train["label"].sum()), int((~train["label"]).sum())
    assert "balance" not in report
    log = (workdir / "logs" / "validate_preferences.log").read_text()
    assert f"labels (train): {desirable} desirable, {undesirable} undesirable" in log
    align_log = (workdir / "logs" / "align.log").read_text()
    assert f"KTO rows: {desirable} desirable, {undesirable} undesirable (weighted ratio " \
        f"{desirable / undesirable:.2f})" in align_log
    assert "Warning: KTO: " in align_log and "outside the recommended [1, 1.33]" in align_log
    # The aligned model loads, was trained as KTO on the reference step's file, and moved away from the start.
    aligned = workdir / "results" / "aligned"
    model = AutoModelForCausalLM.from_pretrained(aligned)
    start = load_file(workdir / "results" / "models" / "base" / "model.safetensors")
    params = dict(model.named_parameters())
    assert set(start) <= set(model.state_dict())
    changed = [name for name, value in start.items() if name in params and not torch.equal(params[name].data, value)]
    assert changed, "no parameter changed"
    lineage = json.loads((aligned / "lineage.json").read_text())
    assert lineage["config"]["method"] == "kto" and [r["step"] for r in logged(aligned)] == [1, 2]
    assert "Reference log-probs: results/reference/preferences/unpaired-max64.parquet" in \
        (workdir / "logs" / "align.log").read_text()


@pytest.mark.slow
def test_the_pipeline_stops_a_pairs_method_on_unpaired_rows_at_validation(kto_pipeline, tmp_path):
    """DPO on unpaired rows: the validate step stops (a clean error, no traceback, no validated data), before any
    reference step; the command on the validated rows stops at its reference step the same way."""
    import subprocess
    import sys

    import yaml

    from workflow import planned_jobs, snakemake

    # The command first, on the pipeline's validated rows (its reference step, before any model loads).
    config = tmp_path / "dpo.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": str(kto_pipeline["workdir"] / "results" / "models" / "base")}, "device": "cpu",
        "dataset": {"path": str(kto_pipeline["workdir"] / "results" / "data" / "preferences")},
        "alignment": {"method": "dpo", "output_dir": str(tmp_path / "out"), "max_length": 64}}))
    result = subprocess.run([str(Path(sys.executable).parent / "lexalign"), "align", "--config", str(config)],
                            capture_output=True, text=True, timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in out, out[-3000:]
    assert 'Error: The reference step\'s layout "pairs" (alignment.method dpo) needs pairs' in out
    assert "are unpaired rows (prompt, completion, label)" in out and "→ Use method: kto" in out
    # The pipeline, on a copy of the KTO run: new KTO weights rerun align alone (neither validation nor the
    # reference log-probs depend on them; the align step reports the balance under them)...
    workdir = tmp_path / "copy"
    shutil.copytree(kto_pipeline["workdir"], workdir, symlinks=True)
    config_file = workdir / "config" / "config.yaml"
    config_file.write_text(yaml.safe_dump(unpaired_config(kto_pipeline["data"], {"method": "kto",
                                                                                 "undesirable_weight": 2.0})))
    dry = snakemake(workdir, "-n", "--cores", "1", "results/aligned")
    assert planned_jobs(dry.stdout) == {"align": 1}
    # ... and DPO configured: the validate step stops.
    config_file.write_text(yaml.safe_dump(unpaired_config(kto_pipeline["data"], {"method": "dpo"})))
    result = snakemake(workdir, "--cores", "1", "results/aligned")
    out = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in out, out[-3000:]
    assert "Error: A method other than kto (alignment.method, or a sweep run's method) needs pairs" in out
    assert "rule validate_preferences" in out and "rule reference" not in out
    log = (workdir / "logs" / "validate_preferences.log").read_text()
    assert "are unpaired rows (prompt, completion, label)" in log and "Traceback" not in log
    assert not (workdir / "results" / "data" / "preferences").exists()


# --- adding a method: its loss, its registry entry, its keys in the schema, nothing else ---------------------

NEW_PAIR_LOSS = '''

def hinge(pairs: PairLogps, beta: float, *, hinge_margin: float) -> tuple[PairLoss, dict[str, torch.Tensor]]:
    """A reference-free hinge on length-normalised log-probs: mean of max(0, margin - β·(mean_w - mean_l))."""
    chosen, rejected = pairs.means()
    preference = torch.relu(hinge_margin - beta * (chosen - rejected))
    return PairLoss(preference.mean(), preference, preference.new_zeros(()), beta * chosen.detach(),
                    beta * rejected.detach()), {}
'''
NEW_LISTWISE_LOSS = '''"""ListNet's top-one loss over K ranked responses: the cross-entropy between the scores'
and the rewards' softmax over each group."""

import torch
import torch.nn.functional as F


def listnet(rewards: torch.Tensor, scores: torch.Tensor | None = None, *, listnet_temperature: float
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    target = torch.softmax(scores.to(rewards.dtype) / listnet_temperature, dim=1)
    per_group = -(target * F.log_softmax(rewards, dim=1)).sum(dim=1)
    return per_group.mean(), {"loss/listnet": per_group}
'''
NEW_ENTRIES = '''    Method("hinge", Layout.PAIRS, needs_reference=False, uses_beta=True, setup=REFERENCE_FREE_SETUP,
           loss="lexalign.methods.reference_free:hinge", keys=("hinge_margin",)),
    Method("listnet", Layout.RANKED, needs_reference=True, uses_beta=True, setup="lexalign.train.ranked_trainer:setup",
           loss="lexalign.methods.listnet:listnet", keys=("listnet_size", "listnet_temperature"),
           group_key="listnet_size"),
'''
NEW_KEYS = '''      hinge_margin: {x-method: hinge, type: number, minimum: 0, default: 1.0,
                     description: "hinge: the margin."}
      listnet_size: {x-method: listnet, type: integer, minimum: 2, default: 4, description: "listnet: K."}
      listnet_temperature: {x-method: listnet, type: number, exclusiveMinimum: 0, default: 1.0,
                            description: "listnet: the temperature of the scores' softmax."}
'''
TRAIN = '''
import json, sys
from lexalign.steps import inputs, training
method, raw, model, root = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
ranked = method == "listnet"
data = f"{root}/data-{method}"
inputs.validate(raw=raw, tokenizer=model, output=data,
                dataset={"path": raw, "max_length": 64, **({"group_size": 3} if ranked else {})})
alignment = {"method": method, "max_steps": 2, "batch_size": 4, "max_length": 64, "logging_steps": 1,
             "warmup_steps": 0, "gradient_accumulation_steps": 1, "learning_rate": 5e-3,
             **({"listnet_size": 3, "listnet_temperature": 0.5} if ranked else {"hinge_margin": 2.0})}
reference = None
if ranked:
    reference = f"{root}/ref-{method}.parquet"
    training.reference(model=model, data=data, output=reference, device="cpu",
                       setting={"layout": "k3", "max_length": 64})
out = training.align(model=model, data=data, output=f"{root}/aligned-{method}", alignment=alignment,
                     checkpoint_dir=f"{root}/ckpt-{method}", reference=reference, device="cpu")
print(json.dumps(str(out)))
'''


@pytest.mark.slow
def test_a_new_pair_loss_and_a_new_listwise_loss_need_their_loss_the_registry_and_the_schema_alone(
        tmp_path, sft_model_dir):
    """A reference-free pair loss (3 files: its function in methods/reference_free.py, its registry entry, its key
    in the schema) and a listwise loss with its own K key (3 files: a new loss module, the registry, the schema)
    plan and train through the unchanged pipeline: docs/architecture.md's walk-through, done."""
    import subprocess
    import sys

    from conftest import REPO

    from lexalign.pipeline.workflow_files import copy_workflow
    from workflow import snakemake

    copy = copy_workflow(tmp_path / "workflow")
    package = copy / "lexalign"
    with (package / "methods" / "reference_free.py").open("a") as handle:
        handle.write(NEW_PAIR_LOSS)
    (package / "methods" / "listnet.py").write_text(NEW_LISTWISE_LOSS)
    registry = package / "methods" / "__init__.py"
    text = registry.read_text()
    anchor = '           loss="lexalign.methods.reference_free:cpo", keys=("cpo_alpha",)),\n'
    registry.write_text(text.replace(anchor, anchor + NEW_ENTRIES))
    schema = package / "config" / "config.schema.yaml"
    text = schema.read_text()
    text = text.replace("method: {enum: [dpo, gdpo, kto, orpo, simpo, cpo],",
                        "method: {enum: [dpo, gdpo, kto, orpo, simpo, cpo, hinge, listnet],")
    anchor = next(line for line in text.splitlines(keepends=True) if line.startswith("      cpo_alpha:"))
    schema.write_text(text.replace(anchor, anchor + NEW_KEYS))
    changed = subprocess.run(["git", "diff", "--no-index", "--stat", str(REPO / "lexalign"), str(package)],
                             capture_output=True, text=True).stdout
    assert changed.count("|") == 4, changed  # the three files of each method, one of them new

    # Planning: the pipeline's rules read the new methods from the registry (no reference job for hinge; ranked
    # groups of 3 and their reference for listnet).
    config = copy / "config" / "config.yaml"
    original = config.read_text()
    for alignment, expected in (({"method": "hinge", "hinge_margin": 2.0}, {"align"}),
                                ({"method": "listnet", "listnet_size": 3}, {"align", "reference", "validate_groups"})):
        values = yaml.safe_load(original)
        values["alignment"].update(alignment)
        config.write_text(yaml.safe_dump(values))
        done = snakemake(copy, "-n", "results/aligned")
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        planned = {line.split()[1].rstrip(":") for line in done.stdout.splitlines()
                   if line.startswith(("rule ", "localrule "))}
        assert expected <= planned and ("reference" in planned) == (alignment["method"] == "listnet"), planned
    config.write_text(original)

    # Training: each new method trains through the align step, as its registry entry sets it up.
    raw = tmp_path / "raw" / "train.jsonl"
    raw.parent.mkdir()
    pd.DataFrame(task.ranked_rows(0, 16, k=3)).to_json(raw, orient="records", lines=True)
    for method, metric in (("hinge", "loss/preference"), ("listnet", "loss/listnet")):
        done = subprocess.run([sys.executable, "-c", TRAIN, method, str(raw), str(sft_model_dir), str(tmp_path)],
                              capture_output=True, text=True, timeout=600, cwd=tmp_path,
                              env={**__import__("os").environ, "PYTHONPATH": str(copy)})
        assert done.returncode == 0, done.stderr[-3000:]
        out = Path(json.loads(done.stdout.strip().splitlines()[-1]))
        lineage = json.loads((out / "lineage.json").read_text())
        assert lineage["config"]["method"] == method
        logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses = [entry["loss"] for entry in logged if "loss" in entry]
        assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
        assert any(metric in entry for entry in logged), logged[0]
