"""`lexalign download` from a Hub: the real huggingface_hub client against tests/hub_server.py.

Each download runs `python -m lexalign.cli download` in a subprocess with
HF_ENDPOINT pointing at the loopback server (the client reads the endpoint at
import time), exactly as a user would run it.
"""

from __future__ import annotations

import hashlib
import json
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hub_server import MODEL_V1, assert_clean_error, blob, files_under, model_entry  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
MANIFEST = ".lexalign-download.json"


# --- what lands, and from which commit ----------------------------------------------------------------


def test_model_at_a_tag_lands_with_lineage_manifest_and_no_duplicate_weights(tmp_path, hub, cli):
    v1 = hub.add_repo("acme/tiny", MODEL_V1, tags=("v1",))
    hub.add_repo("acme/tiny", {**MODEL_V1, "config.json": '{"version": 2}'})  # main moves on

    rc, out, err = cli(model_entry(revision="v1"))
    assert rc == 0, err
    dest = tmp_path / "out/tiny"
    assert files_under(dest) == {"config.json", "tokenizer.json", "README.md", "model.safetensors",
                                 "sub/extra.txt", "lineage.json", MANIFEST}
    assert (dest / "config.json").read_text() == MODEL_V1["config.json"]
    assert (dest / "model.safetensors").read_bytes() == MODEL_V1["model.safetensors"]

    lineage = json.loads((dest / "lineage.json").read_text())
    assert lineage["stage"] == "download"
    assert lineage["resolved_revision"] == v1
    assert lineage["config"]["revision"] == "v1" and lineage["config"]["repo_id"] == "acme/tiny"
    assert sorted(lineage["skipped_duplicate_weights"]) == ["flax_model.msgpack", "pytorch_model.bin", "tf_model.h5"]

    manifest = json.loads((dest / MANIFEST).read_text())
    assert manifest["commit"] == v1
    assert set(manifest["files"]) == {"config.json", "tokenizer.json", "README.md", "model.safetensors",
                                      "sub/extra.txt"}
    for rel, meta in manifest["files"].items():
        data = (dest / rel).read_bytes()
        assert meta == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    # Only the selected files were requested; LFS files came from the "CDN" without credentials.
    requested = " ".join(r.path for r in hub.file_requests())
    for skipped in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack", "lineage.json"):
        assert skipped not in requested
    assert hub.seen("GET", server="cdn") and not [r for r in hub.file_requests() if r.authorization]
    assert not list(tmp_path.glob("out/.tiny.*")), "no staging folder is left behind"
    assert "commit " + v1 in out


def test_branch_and_full_commit_resolve_to_their_commits(tmp_path, hub, cli):
    v1 = hub.add_repo("acme/tiny", MODEL_V1)
    v2 = hub.add_repo("acme/tiny", {**MODEL_V1, "config.json": '{"version": 2}'})

    rc, _, err = cli(model_entry(revision="main"))
    assert rc == 0, err
    assert json.loads((tmp_path / "out/tiny/lineage.json").read_text())["resolved_revision"] == v2
    assert (tmp_path / "out/tiny/config.json").read_text() == '{"version": 2}'

    rc, _, err = cli(model_entry(revision=v1))
    assert rc == 0, err
    assert json.loads((tmp_path / "out/tiny/lineage.json").read_text())["resolved_revision"] == v1
    assert (tmp_path / "out/tiny/config.json").read_text() == MODEL_V1["config.json"]


def test_allow_and_ignore_patterns_and_opting_out_of_the_duplicate_rule(tmp_path, hub, cli):
    hub.add_repo("acme/tiny", MODEL_V1)
    rc, _, err = cli(model_entry(allow_patterns=["*.json", "*.bin", "*.safetensors"], ignore_patterns="tokenizer*",
                                 skip_duplicate_weights=False))
    assert rc == 0, err
    assert files_under(tmp_path / "out/tiny") == {"config.json", "model.safetensors", "pytorch_model.bin",
                                                  "lineage.json", MANIFEST}

    rc, _, err = cli(model_entry(allow_patterns=["*.gguf"]))
    assert_clean_error(rc, err)
    assert "no file of acme/tiny (revision main) matches the config" in err


def test_dataset_repo_uses_the_dataset_endpoints(tmp_path, hub, cli):
    sha = hub.add_repo("acme/prefs", {"data/train.jsonl": '{"prompt": "a", "chosen": "b", "rejected": "c"}\n',
                                      "data/train.parquet": blob("pq", 5000), "README.md": "# prefs\n"},
                       repo_type="dataset")
    rc, _, err = cli({"datasets": [{"source": "hub", "repo_id": "acme/prefs", "allow_patterns": "data/*"}]})
    assert rc == 0, err
    dest = tmp_path / "results/downloads/datasets/prefs"
    assert files_under(dest) == {"data/train.jsonl", "data/train.parquet", "lineage.json", MANIFEST}
    assert json.loads((dest / "lineage.json").read_text())["repo_type"] == "dataset"
    assert json.loads((dest / MANIFEST).read_text())["commit"] == sha
    assert hub.seen("GET", "/api/datasets/acme/prefs/revision/main")
    assert hub.seen("GET", "/api/datasets/acme/prefs/tree/")
    assert hub.seen("HEAD", "/datasets/acme/prefs/resolve/")
    assert not hub.seen(contains="/api/models/")


def test_dry_run_lists_files_and_total_size_without_downloading(tmp_path, hub, cli):
    v1 = hub.add_repo("acme/tiny", MODEL_V1)
    rc, out, err = cli(model_entry(), "--dry-run")
    assert rc == 0, err
    for name in ("config.json", "model.safetensors", "sub/extra.txt", v1):
        assert name in out
    assert "pytorch_model.bin" in out and "skipped, duplicate weights" in out
    selected = sum(len(v if isinstance(v, bytes) else v.encode()) for k, v in MODEL_V1.items()
                   if k in ("config.json", "tokenizer.json", "README.md", "model.safetensors", "sub/extra.txt"))
    assert f"5 files, {selected / 1000:.1f} KB" in out
    assert "Total: 5 files" in out and "nothing was downloaded" in out
    assert not (tmp_path / "out").exists()
    assert not hub.file_requests()


# --- complete downloads are kept; interrupted ones resume --------------------------------------------


def test_complete_download_is_checked_not_fetched_again(tmp_path, hub, cli):
    v1 = hub.add_repo("acme/tiny", MODEL_V1)
    assert cli(model_entry())[0] == 0
    first = len(hub.requests)

    rc, out, err = cli(model_entry())
    assert rc == 0, err
    assert "up to date" in out
    assert not [r for r in hub.requests[first:] if "/resolve/" in r.path or r.server == "cdn"]

    # The same commit asked for by its hash: no request at all.
    second = len(hub.requests)
    rc, out, _ = cli(model_entry(revision=v1))
    assert rc == 0 and "up to date" in out
    assert not [r for r in hub.requests[second:] if r.path.startswith("/api/models") or "/resolve/" in r.path]

    # A damaged file (same size) fails the manifest check and is fetched again.
    target = tmp_path / "out/tiny/model.safetensors"
    target.write_bytes(b"\0" * target.stat().st_size)
    third = len(hub.requests)
    rc, out, err = cli(model_entry(revision=v1))
    assert rc == 0, err
    assert target.read_bytes() == MODEL_V1["model.safetensors"]
    assert [r for r in hub.requests[third:] if r.server == "cdn"]


def test_dropped_connection_resumes_with_a_range_request(tmp_path, hub, cli):
    big = blob("big", 21 * 1024 * 1024)  # > the client's 10 MiB chunk, so part of it is on disk when the link drops
    hub.add_repo("acme/big", {"config.json": "{}", "model.safetensors": big})
    hub.drop_once.add("model.safetensors")
    rc, _, err = cli({"models": [{"name": "big", "source": "hub", "repo_id": "acme/big"}]})
    assert rc == 0, err
    ranges = [r.range for r in hub.seen("GET", "/blobs/", server="cdn") if r.range]
    assert ranges and ranges[0].startswith("bytes=") and int(ranges[0][6:].rstrip("-")) > 0
    data = (tmp_path / "results/downloads/models/big/model.safetensors").read_bytes()
    assert hashlib.sha256(data).digest() == hashlib.sha256(big).digest()


def test_failed_run_keeps_completed_files_and_the_next_run_fetches_the_rest(tmp_path, hub, cli):
    hub.add_repo("acme/tiny", MODEL_V1)
    hub.fail_file["model.safetensors"] = 100
    rc, _, err = cli(model_entry())
    assert_clean_error(rc, err)
    assert "the Hub answered 500" in err
    assert not (tmp_path / "out/tiny").exists()
    staged = tmp_path / "out/.tiny.partial"
    assert (staged / "config.json").is_file() and not (staged / "model.safetensors").exists()

    hub.fail_file.clear()
    before = len(hub.requests)
    rc, _, err = cli(model_entry())
    assert rc == 0, err
    refetched = [r.path for r in hub.requests[before:]
                 if r.method == "GET" and ("/resolve/" in r.path or r.server == "cdn")]
    assert refetched and all("model.safetensors" in p for p in refetched)
    assert not staged.exists()


# --- authentication and errors --------------------------------------------------------------------


TOKEN = "hf_PlantedTestToken0123456789abcdefXYZ"


def test_hf_token_is_sent_to_the_hub_but_not_to_the_cdn(tmp_path, hub, cli):
    hub.tokens.add(TOKEN)
    hub.add_repo("acme/private", MODEL_V1, private=True)
    rc, _, err = cli({"models": [{"source": "hub", "repo_id": "acme/private"}]}, env={"HF_TOKEN": TOKEN})
    assert rc == 0, err
    assert f"Bearer {TOKEN}" in hub.authorizations
    assert hub.seen(server="cdn") and not [r for r in hub.seen(server="cdn") if r.authorization]


def test_stored_login_of_the_hub_cli_is_used(tmp_path, hub, cli):
    hub.tokens.add(TOKEN)
    hub.add_repo("acme/private", MODEL_V1, private=True)
    cli.home.mkdir(parents=True)
    (cli.home / "token").write_text(TOKEN)  # where `hf auth login` stores it
    rc, _, err = cli({"models": [{"source": "hub", "repo_id": "acme/private"}]})
    assert rc == 0, err
    assert f"Bearer {TOKEN}" in hub.authorizations


def test_private_repo_without_login_says_how_to_log_in(hub, cli):
    hub.add_repo("acme/private", MODEL_V1, private=True)
    rc, _, err = cli({"models": [{"source": "hub", "repo_id": "acme/private"}]})
    assert_clean_error(rc, err)
    assert "repository not found: acme/private (revision main)" in err
    assert "401" in err and "hf auth login" in err and "HF_TOKEN" in err


def test_gated_repo_says_how_to_accept_the_terms(hub, cli):
    hub.tokens.add(TOKEN)
    hub.add_repo("acme/gated", MODEL_V1, gated=True)
    rc, _, err = cli({"models": [{"source": "hub", "repo_id": "acme/gated"}]}, env={"HF_TOKEN": TOKEN})
    assert_clean_error(rc, err)
    assert "gated" in err and "403" in err
    assert f"Accept the terms at {hub.url}/acme/gated" in err and "hf auth login" in err


def test_rejected_token_says_to_log_in_again(hub, cli):
    hub.add_repo("acme/tiny", MODEL_V1)
    rc, _, err = cli(model_entry(), env={"HF_TOKEN": "hf_NotAValidTokenAtAll000000"})
    assert_clean_error(rc, err)
    assert "rejected the access token (401)" in err and "hf auth login" in err


def test_missing_repo_and_revision(hub, cli):
    hub.add_repo("acme/tiny", MODEL_V1)
    hub.tokens.add(TOKEN)
    cases = [  # (entry, env, expected message)
        ({"repo_id": "acme/nope", "revision": "v9"}, None, "repository not found: acme/nope (revision v9)"),
        ({"repo_id": "acme/nope"}, {"HF_TOKEN": TOKEN}, "repository not found: acme/nope (revision main)"),
        ({"repo_id": "acme/tiny", "revision": "no-such-branch"}, None,
         "revision not found: acme/tiny (revision no-such-branch)"),
        ({"repo_id": "not/a/valid/id"}, None, 'invalid Hub repo id "not/a/valid/id"'),
    ]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda c: cli({"models": [{"source": "hub", **c[0]}]}, env=c[1]), cases))
    for (_, _, message), (rc, _, err) in zip(cases, results, strict=True):
        assert_clean_error(rc, err)
        assert message in err


def test_unreachable_hub_points_to_offline_use(tmp_path, hub, cli):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dead = f"http://127.0.0.1:{port}"
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda args: cli(model_entry(), *args, endpoint=dead), [(), ("--dry-run",)]))
    for rc, _, err in results:
        assert_clean_error(rc, err)
        assert "could not be reached" in err and dead in err
        assert "source: local" in err


def test_offline_mode_keeps_a_complete_download_and_refuses_a_new_one(tmp_path, hub, cli):
    hub.add_repo("acme/tiny", MODEL_V1)
    rc, _, err = cli(model_entry(), env={"HF_HUB_OFFLINE": "1"})
    assert_clean_error(rc, err)
    assert "HF_HUB_OFFLINE is set" in err and "source: local" in err

    assert cli(model_entry())[0] == 0
    before = len(hub.requests)
    rc, out, err = cli(model_entry(), env={"HF_HUB_OFFLINE": "1"})
    assert rc == 0, err
    assert "keeping the complete download" in out
    assert len(hub.requests) == before


def test_config_cannot_hold_a_token(tmp_path, cli):
    rc, _, err = cli(model_entry(token=TOKEN))
    assert_clean_error(rc, err)
    assert 'Unknown key "models.0.token"' in err
    assert TOKEN not in err


def test_the_token_never_reaches_outputs_or_logs(tmp_path, hub, cli):
    hub.tokens.add(TOKEN)
    hub.add_repo("acme/private", MODEL_V1, private=True, tags=("v1",))
    hub.add_repo("acme/gated", MODEL_V1, gated=True)
    env = {"HF_TOKEN": TOKEN}
    (tmp_path / "notes.jsonl").write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n')
    private = {"name": "private", "source": "hub", "repo_id": "acme/private", "revision": "v1", "output": "out/p"}
    ok = {"models": [private], "datasets": [{"name": "notes", "source": "local", "path": "notes.jsonl"}]}

    debug = {**env, "HF_DEBUG": "1"}  # the client logs every request as a curl command
    rc, _, err = cli(ok, "--verbose", env=debug)
    assert rc == 0 and "curl" in err and "Authorization: Bearer" not in err.replace("<TOKEN>", "")
    assert cli(ok, "--dry-run", env=debug)[0] == 0
    hub.fail_with["acme/private"] = 500  # the Hub is down: the complete copy is kept, with the client's debug log on
    rc, _, err = cli(ok, "--verbose", "--only", "private", env=debug)
    assert rc == 0 and "Keeping the complete download" in err
    del hub.fail_with["acme/private"]

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    hub.fail_file["model.safetensors"] = 10**6
    failing = [
        ({"models": [{"source": "hub", "repo_id": "acme/gated"}]}, None),
        ({"models": [{"source": "hub", "repo_id": "acme/none"}]}, None),
        ({"models": [{**private, "revision": "nope"}]}, None),
        ({"models": [{**private, "revision": "main", "output": "out/q"}]}, None),  # fails mid-download
        ({"models": [{**private, "output": "out/r"}]}, dead),
    ]
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda case: cli(case[0], env=env, endpoint=case[1]), failing))
    for rc, _, err in results:
        assert_clean_error(rc, err)

    assert f"Bearer {TOKEN}" in hub.authorizations  # it was used...
    for log in cli.logs:  # ...but never printed
        assert TOKEN not in log
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert not leaked


def test_repo_id_without_source_means_the_hub_never_the_demo(tmp_path, hub, cli):
    """What TRL's and the Hub's docs show (a repo_id, no `source:`) fetches that repo; a repo that does not
    exist is an error, not a silent demo model."""
    hub.add_repo("acme/tiny", MODEL_V1)
    entry = {"models": [{"name": "tiny", "repo_id": "acme/tiny", "output": "out/tiny"}]}
    rc, out, err = cli(entry)
    assert rc == 0, err
    assert "demo" not in out + err
    assert (tmp_path / "out/tiny/config.json").read_text() == MODEL_V1["config.json"]
    lineage = json.loads((tmp_path / "out/tiny/lineage.json").read_text())
    assert lineage["config"]["source"] == "hub"
    missing = {"models": [{"name": "nope", "repo_id": "acme/does-not-exist", "output": "out/nope"}]}
    rc, out, err = cli(missing)
    assert_clean_error(rc, err)
    assert "acme/does-not-exist" in err and not (tmp_path / "out/nope").exists()
    contradiction = {"models": [{"name": "x", "source": "demo", "repo_id": "acme/tiny", "output": "out/x"}]}
    rc, out, err = cli(contradiction)
    assert_clean_error(rc, err)
    assert 'models[0].source is "demo" but models[0].repo_id is set' in err
