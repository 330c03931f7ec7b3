"""Hub failures as LexAlignErrors: what happened, and what to do about it.

The access token (HF_TOKEN or the Hub CLI's stored login) is read by
`huggingface_hub` itself and sent only in request headers; nothing here prints
it, and `redact` strips it from any client message we pass on.
"""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit, urlunsplit

from lexalign.core.errors import LexAlignError

# What Hub access tokens look like (user and org tokens, OAuth tokens).
_TOKEN_SHAPE = re.compile(r"\b(hf_|hf_oauth_|api_org_)[A-Za-z0-9_]{8,}")
_LOGIN = "log in with `hf auth login` (the token is stored by the Hub CLI) or set HF_TOKEN"


def current_token() -> str | None:
    """The token the client will send, or None; never to be printed."""
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # a broken token store must not hide the real error
        return os.environ.get("HF_TOKEN") or None


def redact(text: str) -> str:
    """`text` without the current token or anything shaped like a Hub token."""
    token = current_token()
    if token:
        text = text.replace(token, "<token>")
    return _TOKEN_SHAPE.sub("<token>", text)


def endpoint() -> str:
    """The Hub endpoint the client talks to (HF_ENDPOINT), without any user:password part."""
    from huggingface_hub import constants

    parts = urlsplit(constants.ENDPOINT)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", "")).rstrip("/")


def repo_url(repo_id: str, repo_type: str) -> str:
    prefix = "datasets/" if repo_type == "dataset" else ""
    return f"{endpoint()}/{prefix}{repo_id}"


def is_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set: the client makes no request at all."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def is_network_error(err: BaseException) -> bool:
    """A connection that could not be made or broke off (httpx transport errors, timeouts, OS socket errors)."""
    for e in _chain(err):
        names = {c.__name__ for c in type(e).__mro__}
        if names & {"TransportError", "TimeoutException", "ConnectionError", "TimeoutError"}:
            return True
    return False


def offline_error(repo_id: str, revision: str) -> LexAlignError:
    return LexAlignError(
        f"HF_HUB_OFFLINE is set, so {repo_id} (revision {revision}) cannot be downloaded",
        hint="Unset HF_HUB_OFFLINE to download it, or point `source: local` with `path:` at files you already have",
    )


def unreachable_error(repo_id: str, revision: str) -> LexAlignError:
    return LexAlignError(
        f"the Hugging Face Hub at {endpoint()} could not be reached while fetching {repo_id} (revision {revision})",
        "Check the network connection, a proxy, or HF_ENDPOINT.",
        hint="To work offline, download the files on a connected machine and use `source: local` with `path:`",
    )


def hub_error(err: BaseException, repo_id: str, revision: str, repo_type: str = "model") -> LexAlignError:
    """Translate any `huggingface_hub` / network failure into a LexAlignError."""
    from huggingface_hub import errors as hf

    status = getattr(getattr(err, "response", None), "status_code", None)
    url = repo_url(repo_id, repo_type)
    logged_in = current_token() is not None
    if isinstance(err, hf.OfflineModeIsEnabled) or (is_offline() and isinstance(err, hf.LocalEntryNotFoundError)):
        return offline_error(repo_id, revision)
    if isinstance(err, hf.HFValidationError):
        return LexAlignError(f'invalid Hub repo id "{repo_id}"', redact(str(err).splitlines()[0]),
                             hint="A repo id looks like `owner/name`, e.g. `openai-community/gpt2`")
    if isinstance(err, hf.GatedRepoError):
        return LexAlignError(
            f"access to {repo_id} is gated (revision {revision}): the Hub answered {status}",
            "You are logged in, but this account has not been granted access yet." if logged_in
            else "You are not logged in.",
            hint=f"Accept the terms at {url} with your account, then {_LOGIN}",
        )
    if isinstance(err, hf.RevisionNotFoundError):
        return LexAlignError(f"revision not found: {repo_id} (revision {revision})",
                             hint=f"Check the branch, tag or commit: {url}/tree/main")
    if isinstance(err, hf.RepositoryNotFoundError):
        details = []
        if status == 401:
            details.append("The Hub answered 401: a private or gated repo needs a login"
                           + (", and this token has no access to it." if logged_in else ", and you are not logged in."))
        return LexAlignError(
            f"repository not found: {repo_id} (revision {revision})", *details,
            hint=f"Check the repo id and repo_type ({repo_type}); for a private or gated repo, {_LOGIN}, "
                 f"and accept its terms at {url}",
        )
    if isinstance(err, hf.DisabledRepoError):
        return LexAlignError(f"repository {repo_id} has been disabled on the Hub")
    if isinstance(err, hf.HfHubHTTPError) and status == 401:
        return LexAlignError(f"the Hub rejected the access token (401) while fetching {repo_id}",
                             hint=f"The token is invalid or expired: {_LOGIN} with a valid token")
    if isinstance(err, hf.HfHubHTTPError) and status == 403:
        return LexAlignError(f"access to {repo_id} (revision {revision}) was refused (403)",
                             hint=f"Accept the repo's terms at {url}, or use a token with read access: {_LOGIN}")
    if isinstance(err, hf.HfHubHTTPError) and status is not None and (status >= 500 or status == 429):
        return LexAlignError(f"the Hub answered {status} while fetching {repo_id} (revision {revision})",
                             hint="Try again later; files already downloaded are kept")
    if is_network_error(err):
        return unreachable_error(repo_id, revision)
    first = redact(str(err).strip().splitlines()[0]) if str(err).strip() else ""
    return LexAlignError(
        f"download of {repo_id} (revision {revision}) failed: {type(err).__name__}",
        first,
        hint="Run the same command again: complete files are kept and the rest is fetched anew",
    )
