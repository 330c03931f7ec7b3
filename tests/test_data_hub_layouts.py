"""Datasets laid out as the Hugging Face Hub ships them: compressed files, named and sharded splits, sub-folders.

The fixtures reproduce real repos: Anthropic/hh-rlhf (`helpful-base/train.jsonl.gz`
with "\\n\\nHuman: …\\n\\nAssistant: …" transcripts, beside `harmless-base/`) and
HuggingFaceH4/ultrafeedback_binarized (`data/train_prefs-00000-of-00001.parquet`
and its siblings, chosen and rejected as chat messages). Each is read from disk
and, through the real huggingface_hub client, from the loopback hub of
tests/hub_server.py.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fixtures.data.helpers import pairs, run
from hub_server import HubServer

from lexalign.config.loader import download_source, section_defaults
from lexalign.config.sections import DatasetConfig, SftDatasetConfig
from lexalign.core.errors import LexAlignError
from lexalign.data.jsonl import read_jsonl
from lexalign.data.load import data_files, detect_format
from lexalign.data.sft import prepare_sft

REPO = Path(__file__).resolve().parent.parent
EXPECTED = {(r["prompt"], r["chosen"], r["rejected"]) for r in pairs(20)}


def texts(result) -> set[tuple[str, str, str]]:
    frames = [result["train"], result["eval"]]
    return {t for f in frames for t in zip(f["prompt"], f["chosen"], f["rejected"], strict=False)}


def compress(data: bytes, suffix: str) -> bytes:
    if suffix == ".gz":
        return gzip.compress(data)
    if suffix == ".bz2":
        return bz2.compress(data)
    if suffix == ".xz":
        return lzma.compress(data)
    sink = pa.BufferOutputStream()  # .zst, as pyarrow (and the zstd tool) write it
    with pa.CompressedOutputStream(sink, "zstd") as stream:
        stream.write(data)
    return sink.getvalue().to_pybytes()


def write_compressed(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(compress(text.encode("utf-8"), path.suffix))
    return path


def jsonl_text(rows: list) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


# --- Anthropic/hh-rlhf -----------------------------------------------------------------------------------


def hh(i: int, subset: str) -> dict:
    human = f"\n\nHuman: {subset} question {i}: how do I do thing {i}?"
    return {"chosen": f"{human}\n\nAssistant: Here is a careful answer about thing {i}.",
            "rejected": f"{human}\n\nAssistant: No idea about {i}."}


def hh_lines(subset: str, split: str, n: int) -> list:
    """n transcript pairs; the train file of helpful-base has a broken line 3 and a tie on line 5."""
    start = 0 if split == "train" else 1000
    lines: list = [hh(i, subset) for i in range(start, start + n)]
    if subset == "helpful" and split == "train":
        lines[2] = '{"chosen": "\\n\\nHuman: cut off'
        lines[4] = {"chosen": lines[4]["chosen"], "rejected": lines[4]["chosen"]}
    return lines


HH_SIZES = {"train": 16, "test": 5}


def hh_rlhf_files() -> dict[str, bytes]:
    files: dict[str, bytes] = {"README.md": b"---\nlicense: mit\n---\n# HH-RLHF\n"}
    for subset in ("helpful", "harmless"):
        for split, n in HH_SIZES.items():
            files[f"{subset}-base/{split}.jsonl.gz"] = gzip.compress(jsonl_text(hh_lines(subset, split, n)).encode())
    return files


def write_files(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def check_helpful_base(result) -> None:
    """helpful-base read alone: train from train.jsonl.gz (two rejects, by line), eval from test.jsonl.gz."""
    report = result["report"]
    assert report["shape"] == "implicit_prompt"
    assert report["input_rows"] == HH_SIZES["train"] + HH_SIZES["test"]
    assert report["kept_rows"] + report["rejected_rows"] == report["input_rows"]
    assert sorted((r["file"], r["row"], r["reason"]) for r in result["rejects"]) == [
        ("train.jsonl.gz", 3, "unparseable_json"), ("train.jsonl.gz", 5, "chosen_equals_rejected")]
    assert report["train_rows"] == HH_SIZES["train"] - 2 and report["eval_rows"] == HH_SIZES["test"]
    prompts = list(result["train"]["prompt"]) + list(result["eval"]["prompt"])
    assert all("helpful question" in p and "harmless" not in p for p in prompts)
    assert all("question 10" in p for p in result["eval"]["prompt"])  # 1000…1004: the test split
    assert {Path(f["file"]).parent.name for f in report["files"]} == {"helpful-base"}
    assert {(Path(f["file"]).name, f["split"]) for f in report["files"]} == {("train.jsonl.gz", "train"),
                                                                           ("test.jsonl.gz", "eval")}


def test_hh_rlhf_subfolder_of_compressed_json_lines(tmp_path):
    root = write_files(tmp_path / "hh-rlhf", hh_rlhf_files())
    check_helpful_base(run(root, data_dir="helpful-base", eval_split="test"))
    harmless = run(root, data_dir="harmless-base/", eval_split="test")
    assert harmless["report"]["rejected_rows"] == 0 and harmless["report"]["eval_rows"] == HH_SIZES["test"]
    # without data_dir, the train split is every subset's train file; rejects name it by its folder
    everything = run(root)
    assert everything["report"]["input_rows"] == 2 * HH_SIZES["train"]
    assert sorted((r["file"], r["row"]) for r in everything["rejects"]) == [("helpful-base/train.jsonl.gz", 3),
                                                                           ("helpful-base/train.jsonl.gz", 5)]


@pytest.mark.parametrize("data_dir", ["helpful-online", "helpful", "README.md"])
def test_missing_data_dir_names_the_key_and_lists_the_subfolders(tmp_path, data_dir):
    root = write_files(tmp_path / "hh-rlhf", hh_rlhf_files())
    with pytest.raises(LexAlignError) as err:
        run(root, data_dir=data_dir)
    text = err.value.render()
    assert text.startswith(f'Error: data_dir "{data_dir}" is not a folder of "{root}"')
    assert "Sub-folders: harmless-base, helpful-base" in text and "remove data_dir" in text


@pytest.mark.parametrize("data_dir", ["../elsewhere", "/etc", "."])
def test_data_dir_cannot_leave_the_dataset(tmp_path, data_dir):
    root = write_files(tmp_path / "hh-rlhf", hh_rlhf_files())
    with pytest.raises(LexAlignError, match=f'data_dir "{data_dir}" is not a sub-folder name'):
        run(root, data_dir=data_dir)


def test_data_dir_of_a_single_file_is_an_error(tmp_path):
    root = write_files(tmp_path / "hh-rlhf", hh_rlhf_files())
    with pytest.raises(LexAlignError, match='data_dir "helpful-base" needs a folder'):
        run(root / "helpful-base" / "train.jsonl.gz", data_dir="helpful-base")


# --- HuggingFaceH4/ultrafeedback_binarized ------------------------------------------------------------------

UF_SPLITS = {"train_prefs": 12, "test_prefs": 4, "train_sft": 6, "test_sft": 3, "train_gen": 5, "test_gen": 2}


def uf_table(split: str, n: int) -> pa.Table:
    rows = []
    for i in range(n):
        prompt = f"[{split}] Write a haiku about the number {i}."
        good, bad = f"Number {i} / quiet in the morning / counted once again", f"I won't ({i})."
        if split == "train_prefs" and i == 4:
            bad = good  # row 5: chosen equals rejected
        rows.append({
            "prompt": prompt,
            "prompt_id": f"{split}-{i:04d}",
            "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": good}],
            "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": bad}],
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": good}],
            "score_chosen": 8.5,
            "score_rejected": 3.0,
        })
    return pa.Table.from_pylist(rows)


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def ultrafeedback_files() -> dict[str, bytes]:
    files = {f"data/{split}-00000-of-00001.parquet": parquet_bytes(uf_table(split, n))
             for split, n in UF_SPLITS.items()}
    files["README.md"] = b"---\nconfigs:\n- config_name: default\n---\n# UltraFeedback binarized\n"
    return files


def check_ultrafeedback(result) -> None:
    report = result["report"]
    assert report["shape"] == "conversational"
    assert report["input_rows"] == UF_SPLITS["train_prefs"] + UF_SPLITS["test_prefs"]
    assert report["kept_rows"] + report["rejected_rows"] == report["input_rows"]
    assert [(r["file"], r["row"], r["reason"]) for r in result["rejects"]] == [
        ("train_prefs-00000-of-00001.parquet", 5, "chosen_equals_rejected")]
    assert all("[train_prefs]" in p for p in result["train"]["prompt"])  # rendered with the chat template
    assert len(result["eval"]) == UF_SPLITS["test_prefs"]
    assert all("[test_prefs]" in p for p in result["eval"]["prompt"])
    assert report["split"]["eval_split"] == "test_prefs" and report["split"]["eval_fraction"] is None


def test_ultrafeedback_named_splits(tmp_path, demo_tokenizer):
    root = write_files(tmp_path / "uf", ultrafeedback_files())
    check_ultrafeedback(run(root, demo_tokenizer, train_split="train_prefs", eval_split="test_prefs"))
    # the train split alone: eval_fraction of its prompts are held out instead
    alone = run(root, demo_tokenizer, train_split="train_prefs", eval_fraction=0.5)
    assert alone["report"]["input_rows"] == UF_SPLITS["train_prefs"]
    assert all("[train_prefs]" in p for p in alone["eval"]["prompt"]) and len(alone["eval"]) > 0


def test_split_that_matches_nothing_lists_the_splits(tmp_path):
    root = write_files(tmp_path / "uf", ultrafeedback_files())
    with pytest.raises(LexAlignError) as err:
        run(root)  # train_split defaults to "train": UltraFeedback has none
    lines = err.value.render().splitlines()
    assert lines[0] == f'Error: No files for split "train" in "{root}"'
    assert lines[1] == "Splits found: test_gen, test_prefs, test_sft, train_gen, train_prefs, train_sft"
    assert "data/train_prefs-00000-of-00001.parquet" in lines[2]
    with pytest.raises(LexAlignError, match='No files for split "validation"'):
        run(root, train_split="train_prefs", eval_split="validation")


def test_ultrafeedback_sft_splits(tmp_path):
    root = write_files(tmp_path / "uf", ultrafeedback_files())
    result = prepare_sft(SftDatasetConfig(path=str(root), train_split="train_sft", eval_split="test_sft"))
    report = result["report"]
    assert (report["shape"], report["train_rows"], report["eval_rows"]) == ("messages", 6, 3)
    assert report["input_rows"] == report["train_rows"] + report["eval_rows"] + report["rejected_rows"]
    assert all(m[0]["content"].startswith("[test_sft]") for m in result["eval"]["messages"])
    with pytest.raises(LexAlignError, match='eval_split "train_sft" is the train split'):
        SftDatasetConfig(path=str(root), train_split="train_sft", eval_split="train_sft")


# --- shards --------------------------------------------------------------------------------------------------


def sharded(root: Path, shards: int = 3, per_shard: int = 7) -> Path:
    (root / "data").mkdir(parents=True)
    rows = pairs(shards * per_shard)
    for k in range(shards):
        part = [{k2: v for k2, v in r.items() if k2 != "meta"} for r in rows[k * per_shard:(k + 1) * per_shard]]
        if k == 1:
            part[2]["rejected"] = None  # row 3 of shard 1
        pq.write_table(pa.Table.from_pylist(part), root / "data" / f"train-{k:05d}-of-{shards:05d}.parquet")
    pq.write_table(pa.Table.from_pylist([{"prompt": f"held out {i}", "chosen": "yes", "rejected": "no"}
                                         for i in range(3)]), root / "data" / "test-00000-of-00001.parquet")
    return root


def test_sharded_split_reads_every_shard_in_order(tmp_path):
    root = sharded(tmp_path / "shards")
    assert [p.name for p in data_files(root, "train")] == [f"train-{k:05d}-of-00003.parquet" for k in range(3)]
    result = run(root, eval_split="test")
    report = result["report"]
    assert report["input_rows"] == 21 + 3 and report["kept_rows"] + report["rejected_rows"] == 24
    assert [(r["file"], r["row"], r["reason"]) for r in result["rejects"]] == [
        ("train-00001-of-00003.parquet", 3, "null_field")]
    assert [Path(f["file"]).name for f in report["files"] if f["split"] == "train"] == [
        "train-00000-of-00003.parquet", "train-00001-of-00003.parquet", "train-00002-of-00003.parquet"]
    assert report["train_rows"] == 20 and report["eval_rows"] == 3


def test_a_missing_shard_is_an_error_not_fewer_rows(tmp_path):
    root = sharded(tmp_path / "shards", shards=4)
    (root / "data" / "train-00002-of-00004.parquet").unlink()
    with pytest.raises(LexAlignError) as err:
        run(root)
    text = err.value.render()
    assert 'Split "train"' in text and "missing 1 of its 4 shards" in text
    assert "data/train-*-of-00004: no shard 00002" in text and "run the download again" in text


def test_shards_sort_by_number(tmp_path):
    for k in (10, 2, 1, 0):  # unpadded numbers: part 10 after part 2
        (tmp_path / "d").mkdir(exist_ok=True)
        (tmp_path / "d" / f"train-{k}-of-11.jsonl").write_text("")
    with pytest.raises(LexAlignError, match="missing 7 of its 11 shards"):
        data_files(tmp_path / "d", "train")
    for k in range(3, 10):
        (tmp_path / "d" / f"train-{k}-of-11.jsonl").write_text("")
    assert [p.name for p in data_files(tmp_path / "d", "train")] == [f"train-{k}-of-11.jsonl" for k in range(11)]


# --- compressed files ----------------------------------------------------------------------------------------

BROKEN = 4  # the row every compressed fixture breaks


def pair_rows() -> list[dict]:
    return [{k: v for k, v in r.items() if k != "meta"} for r in pairs(20)]


def as_jsonl(rows: list[dict]) -> str:
    lines: list = list(rows)
    lines.insert(BROKEN - 1, '{"prompt": "broken')
    return jsonl_text(lines)


def as_json(rows: list[dict]) -> str:
    items: list = list(rows)
    items.insert(BROKEN - 1, ["not", "an", "object"])
    return json.dumps(items, indent=2)


def as_csv(rows: list[dict], delimiter: str = ",") -> str:
    out = io.StringIO()
    writer = csv.writer(out, delimiter=delimiter, lineterminator="\n")
    writer.writerow(["prompt", "chosen", "rejected"])
    records = [[r["prompt"], r["chosen"], r["rejected"]] for r in rows]
    records.insert(BROKEN - 1, ["only", "two"])
    writer.writerows(records)
    return out.getvalue()


CASES = {
    "train.jsonl.gz": ("jsonl", as_jsonl, "unparseable_json"),
    "train.json.gz": ("json", as_json, "not_an_object"),
    "train.csv.gz": ("csv", as_csv, "malformed_row"),
    "train.tsv.gz": ("tsv", lambda rows: as_csv(rows, "\t"), "malformed_row"),
    "train.jsonl.zst": ("jsonl", as_jsonl, "unparseable_json"),
    "train.csv.zst": ("csv", as_csv, "malformed_row"),
    "train.jsonl.bz2": ("jsonl", as_jsonl, "unparseable_json"),
    "train.jsonl.xz": ("jsonl", as_jsonl, "unparseable_json"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_compressed_files_are_read_with_format_auto(tmp_path, name):
    kind, render, reason = CASES[name]
    path = write_compressed(tmp_path / "d" / name, render(pair_rows()))
    assert detect_format(path) == kind
    result = run(tmp_path / "d")
    assert texts(result) == EXPECTED
    report = result["report"]
    assert report["input_rows"] == 21 and report["kept_rows"] + report["rejected_rows"] == 21
    assert [(r["file"], r["row"], r["reason"]) for r in result["rejects"]] == [(name, BROKEN, reason)]


def test_json_and_json_lines_are_told_apart_after_decompression(tmp_path):
    lines = write_compressed(tmp_path / "a" / "prefs.json.gz", jsonl_text(pair_rows()))
    array = write_compressed(tmp_path / "b" / "prefs.jsonl.gz", json.dumps(pair_rows()))
    pretty = write_compressed(tmp_path / "c" / "prefs.json.zst", json.dumps({"train": pair_rows()}, indent=2))
    assert (detect_format(lines), detect_format(array), detect_format(pretty)) == ("jsonl", "json", "json")
    for path in (lines, array, pretty):
        assert texts(run(path)) == EXPECTED


def test_compressed_json_lines_stream_in_chunks_with_line_numbers(tmp_path):
    """Small chunks of the decompressed stream: lines cut at chunk ends, one line longer than a chunk."""
    lines: list = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(600)]
    lines[100] = {"prompt": "long " * 3000, "chosen": "c", "rejected": "r"}
    lines[250] = "{broken"
    lines[251] = ""
    text = "\ufeff" + jsonl_text(lines).rstrip("\n")  # a BOM, and no newline at the end
    plain = tmp_path / "plain.jsonl"
    plain.write_text(text, encoding="utf-8")
    for suffix in (".gz", ".zst"):
        packed = write_compressed(tmp_path / f"packed.jsonl{suffix}", text)
        for fields in (["prompt", "chosen", "rejected"], None):
            pieces = list(read_jsonl(packed, fields, chunk_bytes=4096, workers=2))
            expected = list(read_jsonl(plain, fields, chunk_bytes=4096, workers=2))
            assert len(pieces) > 10  # streamed, not read whole

            def rows(found):
                return sorted(n for p in found for n in p.rows.tolist())

            assert rows(pieces) == rows(expected) == [n for n in range(1, 601) if n not in (251, 252)]
            assert [(r["row"], r["reason"]) for p in pieces for r in p.rejects] == [(251, "unparseable_json")]


@pytest.mark.parametrize(("suffix", "damage"), [(s, d) for s in (".gz", ".zst", ".bz2", ".xz")
                                                for d in ("truncated", "garbage")] + [(".gz", "bad_crc")])
def test_a_damaged_compressed_file_is_a_clear_error(tmp_path, suffix, damage):
    data = compress(jsonl_text(pair_rows() * 50).encode(), suffix)
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = b"this is not compressed data at all\n" * 20
    else:
        data = data[:-8] + bytes(8)  # gzip's CRC and size trailer
    path = tmp_path / "d" / f"train.jsonl{suffix}"
    path.parent.mkdir()
    path.write_bytes(data)
    with pytest.raises(LexAlignError) as err:
        run(tmp_path / "d")
    text = err.value.render()
    assert text.startswith(f'Error: Could not decompress "{path}"'), text
    assert "damaged or incomplete" in text and "Download it again" in text


def test_zstd_without_the_codec_says_what_to_do(tmp_path, monkeypatch):
    path = write_compressed(tmp_path / "train.jsonl.zst", jsonl_text(pair_rows()))
    monkeypatch.setattr("lexalign.data.compressed.zstd_available", lambda: False)
    with pytest.raises(LexAlignError, match="built without the zstd codec") as err:
        run(path)
    assert "zstd -d train.jsonl.zst" in err.value.render()


def test_compressed_csv_damaged_midway(tmp_path):
    data = gzip.compress(as_csv(pair_rows() * 200).encode())
    path = tmp_path / "train.csv.gz"
    path.write_bytes(data[: len(data) - 40])
    with pytest.raises(LexAlignError, match='Could not decompress ".*train.csv.gz"'):
        run(path)


def test_what_a_compressed_name_does_not_say(tmp_path):
    blob = write_compressed(tmp_path / "a" / "train.gz", jsonl_text(pair_rows()))
    with pytest.raises(LexAlignError) as err:
        run(blob)
    assert err.value.render().splitlines()[0] == f'Error: Cannot tell the format of the data inside "{blob}"'
    assert "format: jsonl" in err.value.render()
    assert texts(run(blob, format="jsonl")) == EXPECTED  # the format given, the compression from the name

    packed = tmp_path / "b" / "train.parquet.gz"
    packed.parent.mkdir()
    packed.write_bytes(gzip.compress(parquet_bytes(pa.Table.from_pylist(pair_rows()))))
    with pytest.raises(LexAlignError, match="parquet inside gzip compression"):
        run(packed)
    archive = tmp_path / "c" / "train.zip"
    archive.parent.mkdir()
    archive.write_bytes(b"PK\x03\x04")
    with pytest.raises(LexAlignError) as err:
        run(archive)
    assert 'Unsupported dataset format "zip"' in err.value.render() and "Unpack" in err.value.render()


# --- the schema ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("section", "cls"), [("dataset", DatasetConfig), ("sft_dataset", SftDatasetConfig)])
def test_new_keys_have_schema_defaults_matching_the_dataclasses(section, cls):
    from lexalign.config.loader import _root_schema

    properties = _root_schema()["$defs"][section]["properties"]
    defaults = section_defaults(section, {})
    for key in ("data_dir", "train_split", "eval_split"):
        assert properties[key].get("description"), key
        assert defaults[key] == cls.__dataclass_fields__[key].default, key


# --- the download step: local and Hub --------------------------------------------------------------------------


def test_local_download_copies_only_the_data_dir(tmp_path):
    from lexalign.steps import inputs

    root = write_files(tmp_path / "hh-rlhf", hh_rlhf_files())
    section = section_defaults("dataset", {"source": "local", "path": str(root), "data_dir": "helpful-base",
                                           "eval_split": "test"})
    out = tmp_path / "raw"
    inputs.download(output=out, source=download_source(section), kind="preference_data")
    landed = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert landed == {"helpful-base/train.jsonl.gz", "helpful-base/test.jsonl.gz", "lineage.json",
                      ".lexalign-download.json"}
    assert json.loads((out / "lineage.json").read_text())["config"]["data_dir"] == "helpful-base"
    check_helpful_base(run(out, **{k: section[k] for k in ("data_dir", "eval_split")}))
    with pytest.raises(LexAlignError, match='data_dir "red-team" is not a folder of'):
        inputs.download(output=tmp_path / "raw2", source=download_source({**section, "data_dir": "red-team"}),
                        kind="preference_data")
    assert not (tmp_path / "raw2").exists()


def hub_download(tmp_path: Path, hub: HubServer, section: dict, out: Path) -> subprocess.CompletedProcess:
    """The pipeline's download step (`lexalign.steps.inputs.download`, the dataset section), in a process of its own:
    huggingface_hub reads HF_ENDPOINT when it is imported."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update({"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1",
                "PYTHONPATH": str(REPO)})
    code = ("import json, sys\n"
            "from lexalign.core.errors import LexAlignError\n"
            "from lexalign.steps.inputs import download\n"
            "try:\n"
            "    download(source=json.loads(sys.argv[1]), output=sys.argv[2], kind='preference_data')\n"
            "except LexAlignError as err:\n"
            "    sys.exit(err.render())\n")
    return subprocess.run([sys.executable, "-c", code, json.dumps(download_source(section)), str(out)], cwd=tmp_path,
                          env=env,
                          capture_output=True, text=True, timeout=120)


def test_hub_data_dir_fetches_only_that_folder(tmp_path, hub):
    sha = hub.add_repo("Anthropic/hh-rlhf", hh_rlhf_files(), repo_type="dataset")
    section = section_defaults("dataset", {"source": "hub", "repo_id": "Anthropic/hh-rlhf",
                                           "data_dir": "helpful-base", "eval_split": "test"})
    out = tmp_path / "results" / "data" / "raw" / "preference_data"
    done = hub_download(tmp_path, hub, section, out)
    assert done.returncode == 0, done.stderr
    landed = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert landed == {"helpful-base/train.jsonl.gz", "helpful-base/test.jsonl.gz", "lineage.json",
                      ".lexalign-download.json"}
    requested = " ".join(r.path for r in hub.file_requests())
    assert "helpful-base/train.jsonl.gz" in requested
    assert "harmless-base" not in requested and "README.md" not in requested
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["resolved_revision"] == sha and lineage["config"]["data_dir"] == "helpful-base"
    assert lineage["config"]["allow_patterns"] is None  # the config as given; the pattern is derived
    manifest = json.loads((out / ".lexalign-download.json").read_text())
    assert manifest["request"]["allow_patterns"] == ["helpful-base/*"]
    # the validate step reads the landed folder with the same section
    check_helpful_base(run(out, **{k: section[k] for k in ("data_dir", "eval_split")}))


def test_hub_data_dir_that_the_repo_lacks(tmp_path, hub):
    hub.add_repo("Anthropic/hh-rlhf", hh_rlhf_files(), repo_type="dataset")
    section = {"source": "hub", "repo_id": "Anthropic/hh-rlhf", "data_dir": "red-team-attempts"}
    done = hub_download(tmp_path, hub, section, tmp_path / "raw")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert 'Error: data_dir "red-team-attempts" is not a folder of Anthropic/hh-rlhf (revision main)' in done.stderr
    assert "Sub-folders: harmless-base, helpful-base" in done.stderr
    assert not hub.file_requests() and not (tmp_path / "raw").exists()


def test_hub_ultrafeedback_splits(tmp_path, hub, demo_tokenizer):
    hub.add_repo("HuggingFaceH4/ultrafeedback_binarized", ultrafeedback_files(), repo_type="dataset")
    section = section_defaults("dataset", {"source": "hub", "repo_id": "HuggingFaceH4/ultrafeedback_binarized",
                                           "train_split": "train_prefs", "eval_split": "test_prefs"})
    out = tmp_path / "raw"
    done = hub_download(tmp_path, hub, section, out)
    assert done.returncode == 0, done.stderr
    assert hub.seen("GET", server="cdn")  # parquet files are LFS: served by the "CDN"
    check_ultrafeedback(run(out, demo_tokenizer, train_split="train_prefs", eval_split="test_prefs"))
