"""`lexalign push` and the publish rule: a model folder to the Hugging Face Hub, as one commit.

What goes up: the safetensors weights (with their index when sharded), config.json, generation_config.json,
the tokenizer's files, lineage.json, and a model card written for the Hub (`lexalign.core.lineage.model_card`:
YAML metadata, the eval table, the training configuration, the lineage). A folder holding a PEFT adapter
alone goes up as an adapter: adapter_config.json (pointing at the base model's Hub repo when the lineage
knows it) and adapter_model.safetensors. Nothing else: no pickles, no metrics, no tracking.json.

Everything is one `HfApi.create_commit`: the large files are uploaded first, then one commit request adds
every file at once. The Hub applies a commit whole or not at all, so a failed upload leaves the repo as it
was. The token is read by `huggingface_hub` (HF_TOKEN, or the Hub CLI's stored login) and sent only in
request headers; no message here carries it (`lexalign.hub.failures.redact`).
"""

from __future__ import annotations

import fnmatch
import json
import re
import sys
from pathlib import Path

from lexalign.core.errors import LexAlignError, warn
from lexalign.core.paths import lone_adapter
from lexalign.hub.failures import current_token, endpoint, is_network_error, redact, repo_url

WEIGHTS = ("*.safetensors", "*.safetensors.index.json")
CONFIGS = ("config.json", "generation_config.json", "adapter_config.json")
TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
             "chat_template.jinja", "chat_template.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model",
             "spiece.model", "sentencepiece.bpe.model", "*.tiktoken")
KEPT = ("lineage.json",)
PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
CARD = "README.md"
_LOGIN = "log in with `hf auth login` (a token with write access) or set HF_TOKEN"


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)


def files_to_publish(folder: Path) -> list[Path]:
    """The files of a model folder that go to the Hub (the card is written anew), or a clear error."""
    if not folder.is_dir():
        raise LexAlignError(f'No model folder at "{folder}"', hint="Give --model the folder a step wrote, "
                                                                   "e.g. results/aligned")
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    if not any(_matches(n, ("*.safetensors",)) for n in names):
        pickles = [n for n in names if _matches(n, PICKLES)]
        raise LexAlignError(f'No safetensors weights in "{folder}"',
                            f"Found pickle weights only: {', '.join(pickles)}" if pickles else
                            f"Files: {', '.join(names) or '(none)'}",
                            hint="LexAlign publishes safetensors only; save the model with "
                                 "save_pretrained(..., safe_serialization=True)")
    if not lone_adapter(folder) and not (folder / "config.json").is_file():
        raise LexAlignError(f'No config.json in "{folder}": not a model folder transformers can load')
    return [folder / n for n in names if _matches(n, WEIGHTS + CONFIGS + TOKENIZER + KEPT)]


def evaluation_for(model_dir: Path) -> Path | None:
    """The evaluation of a model folder where the pipeline writes it: results/eval/aligned.json for
    results/aligned, results/runs/<run>/eval.json for results/runs/<run>/model."""
    for candidate in (model_dir.parent / "eval" / f"{model_dir.name}.json", model_dir.parent / "eval.json"):
        if candidate.is_file():
            return candidate
    return None


def _adapter_config(folder: Path, base_repo: str | None) -> bytes:
    """adapter_config.json as the Hub should see it: the base model named by its Hub repo, not a local folder."""
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    if base_repo:
        config["base_model_name_or_path"] = base_repo
    elif Path(str(config.get("base_model_name_or_path", ""))).exists():
        warn(f"The adapter's base model is a local folder ({config['base_model_name_or_path']})",
             "Others cannot load this adapter from the Hub until its base model is named by a Hub repo "
             "(download the base model from the Hub with model.repo_id).")
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


def _plain(text: str) -> str:
    """The first line of a client message, without a token and without URL queries (signed upload URLs)."""
    text = text.strip().splitlines()[0] if text.strip() else ""
    return redact(re.sub(r"(https?://[^\s?'\"]+)\?[^\s'\"]*", r"\1?…", text))


def _failed_phase(err: BaseException, phase: str) -> str:
    """Where a create_commit failed: `upload` (the large files, before any commit), `commit` (the commit request
    itself) or `phase` when the error does not say."""
    for e in (err, err.__cause__, err.__context__):
        if e is None:
            continue
        if isinstance(e, RuntimeError) and str(e).startswith("Error while uploading"):
            return "upload"
        try:
            url = str((getattr(e, "response", None) or e).request.url)
        except (AttributeError, RuntimeError):
            continue
        if "/preupload/" in url or "/info/lfs/" in url or "/validate-yaml" in url:
            return "upload"
        if "/commit/" in url:
            return "commit"
    return phase


def push_error(err: BaseException, repo_id: str, revision: str, phase: str) -> LexAlignError:
    """A failed publish, said plainly: what failed, whether anything was committed, what to do."""
    from huggingface_hub import errors as hf

    phase = _failed_phase(err, phase)
    status = getattr(getattr(err, "response", None), "status_code", None)
    url = repo_url(repo_id, "model")
    untouched = (f"Nothing was committed: {repo_id} is as it was." if phase != "commit" or status
                 else f"Check {url}/commits/{revision} for the commit.")
    cause = next((e for e in (err.__cause__, err) if e is not None and str(e).strip()), err)
    first = _plain(str(cause)) or type(cause).__name__
    if isinstance(err, hf.OfflineModeIsEnabled):
        return LexAlignError("HF_HUB_OFFLINE is set: publishing needs the Hub", hint="Unset HF_HUB_OFFLINE")
    if isinstance(err, hf.HFValidationError):
        return LexAlignError(f'invalid Hub repo id "{repo_id}"', first, hint="A repo id looks like owner/name")
    if isinstance(err, hf.RevisionNotFoundError):
        return LexAlignError(f"branch {revision} of {repo_id} not found", untouched,
                             hint=f"Check the branch name, or publish to main: {url}")
    if isinstance(err, hf.RepositoryNotFoundError) or status == 404:
        return LexAlignError(f"repository {repo_id} not found, or this token cannot write to it", untouched,
                             hint=f"Check the owner in the repo id; {_LOGIN}")
    if status == 401:
        return LexAlignError(f"the Hub rejected the access token (401) while publishing to {repo_id}", untouched,
                             hint=f"The token is invalid or expired: {_LOGIN}")
    if status == 403:
        return LexAlignError(f"this token may not write to {repo_id} (403)", untouched,
                             hint=f"Use a token with write access to {repo_id.split('/')[0]}: {_LOGIN}")
    if isinstance(err, ValueError) and "README.md" in str(err):
        return LexAlignError("the Hub refused the model card's metadata", first, untouched)
    if phase == "upload":
        file = str(err).split("'")[1] if str(err).count("'") >= 2 else "a file"
        return LexAlignError(f"the upload of {file} to {repo_id} failed", first, untouched,
                             hint="Run the same command again: uploaded files are not sent twice")
    if isinstance(err, hf.HfHubHTTPError) and status is not None and (status >= 500 or status == 429):
        return LexAlignError(f"the Hub answered {status} while publishing to {repo_id}", untouched,
                             hint="Try again later")
    if is_network_error(err):
        return LexAlignError(f"the Hugging Face Hub at {endpoint()} could not be reached while publishing to "
                             f"{repo_id}", untouched, hint="Check the network connection, a proxy, or HF_ENDPOINT")
    return LexAlignError(f"publishing to {repo_id} failed: {type(err).__name__}", first, untouched)


def push(model_dir: Path, repo_id: str, *, private: bool = False, revision: str = "main",
         evaluation: Path | None = None, commit_message: str | None = None) -> dict:
    """Upload `model_dir` to the Hub repo `repo_id` (created when missing; `private` for a new repo) on branch
    `revision` (created from main when missing), as one commit; return what was committed."""
    from huggingface_hub import CommitOperationAdd, HfApi, constants

    from lexalign.core.io import read_json
    from lexalign.core.lineage import card_metadata, model_card, read_lineage

    model_dir = Path(model_dir)
    files = files_to_publish(model_dir)
    if constants.HF_HUB_OFFLINE:
        raise LexAlignError("HF_HUB_OFFLINE is set: publishing needs the Hub", hint="Unset HF_HUB_OFFLINE")
    if current_token() is None:
        raise LexAlignError(f"publishing to {repo_id} needs a Hub login", hint=_LOGIN)
    lineage = read_lineage(model_dir)
    record = lineage or {"stage": "model", "config": {}, "versions": {}}
    adapter = lone_adapter(model_dir)
    result = read_json(evaluation) if evaluation else None
    card = model_card(record, title=None if lineage else model_dir.name, evaluation=result, adapter=adapter)
    base_repo = card_metadata(record, adapter).get("base_model")
    operations = [CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=str(path)) for path in files
                  if path.name != "adapter_config.json"]
    if adapter:
        operations.append(CommitOperationAdd("adapter_config.json", _adapter_config(model_dir, base_repo)))
    operations.append(CommitOperationAdd(CARD, card.encode("utf-8")))
    title = card.split("\n# ", 1)[1].split("\n", 1)[0] if "\n# " in card else model_dir.name
    message = commit_message or f"Upload {title} with LexAlign"
    if not sys.stderr.isatty():  # progress bars in a log file are noise
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    api = HfApi()
    phase = "repo"
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if private and not api.repo_info(repo_id, repo_type="model").private:
            raise LexAlignError(f"{repo_id} exists and is public, but the publish asks for a private repo",
                                "Nothing was uploaded.",
                                hint=f"Make it private in its settings ({repo_url(repo_id, 'model')}/settings), "
                                     "or publish without private")
        if revision != constants.DEFAULT_REVISION:
            api.create_branch(repo_id, repo_type="model", branch=revision, exist_ok=True)
        phase = "commit"
        info = api.create_commit(repo_id, operations, commit_message=message, repo_type="model", revision=revision,
                                 commit_description="Published by LexAlign: weights, tokenizer, generation config "
                                                    "and the model card, in one commit.")
    except LexAlignError:
        raise
    except Exception as err:  # the client's errors become a message; the token never appears in it
        raise push_error(err, repo_id, revision, phase) from None
    return {"repo_id": repo_id, "revision": revision, "commit": info.oid, "commit_url": info.commit_url,
            "url": repo_url(repo_id, "model"), "private": private, "adapter": adapter,
            "files": sorted(op.path_in_repo for op in operations),
            "evaluation": str(evaluation) if evaluation else None}
