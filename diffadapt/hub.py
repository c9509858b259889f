"""Hub ids (``user/repo``, ``user/repo/file.safetensors``, ``user/repo/folder``) → a local path, through
huggingface_hub's cache.

huggingface_hub retries a failed metadata request five times with back-off (about 24 s) when a file is not
cached, and its repo listing has no time limit. A load should not hang on a dead network, so the Hub is asked
once, with huggingface_hub's own time limit (``HF_HUB_ETAG_TIMEOUT``): if it answers, its listing says which
files to fetch (those a local folder would be read from) and the download proceeds as usual; if it does not,
only the cache is used. ``HF_HUB_OFFLINE=1`` skips the network entirely.
"""

from __future__ import annotations

import glob
import importlib
from pathlib import Path

from .errors import SourceError
from .layout import COMPONENT_DIRS, DIFFUSERS_WEIGHTS, PEFT_CONFIG, PEFT_WEIGHTS, PICKLE_SUFFIXES

PICKLE_PATTERNS = ["*.bin", "*.pt", "*.ckpt", "*.pth"]
WEIGHT_PATTERNS = ["*.safetensors", "*.json"]


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Exceptions meaning "no answer": OS/socket errors (requests' are OSErrors) and the HTTP client's own."""
    errors: list[type[BaseException]] = [OSError]
    for name in ("httpx2", "httpx"):  # whichever client this huggingface_hub version uses
        try:
            errors.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def pick(names: list[str], *, source: str, allow_pickle: bool = False) -> list[str]:
    """The files of a repo that ``io.read_dir`` would read, chosen from the repo's listing before anything is
    downloaded: a model repo's gigabytes are never fetched by mistake, and a repo of several adapters is
    refused with their names at once."""
    have = set(names)

    def peft(prefix: str) -> list[str]:
        weights = next((prefix + w for w in PEFT_WEIGHTS if prefix + w in have), None)
        return [prefix + PEFT_CONFIG] + ([weights] if weights else [])

    if PEFT_CONFIG in have:
        return peft("")
    comps = [c for c in COMPONENT_DIRS if f"{c}/{PEFT_CONFIG}" in have]
    if comps:
        return [f for c in comps for f in peft(f"{c}/")]
    diffusers = [n for n in DIFFUSERS_WEIGHTS if n in have]
    if diffusers:
        return diffusers[:1]
    top = sorted(n for n in have if "/" not in n and n.endswith(".safetensors"))
    if not top and allow_pickle:
        top = sorted(n for n in have if "/" not in n and n.lower().endswith(PICKLE_SUFFIXES))
    if len(top) == 1:
        return top
    if not top:
        raise SourceError(f"{source}: the repo holds no adapter (no {PEFT_CONFIG}, no .safetensors file at its top)")
    shown = ", ".join(top[:5]) + (", …" if len(top) > 5 else "")
    raise SourceError(f"{source}: the repo holds {len(top)} adapter files ({shown}); name one, "
                      f"e.g. {source}/{top[0]}")


def download(source: str, *, allow_pickle: bool) -> Path:
    """The cached (or freshly downloaded) file, folder or repo snapshot a hub id names (``user/repo``,
    ``user/repo/file.safetensors``, ``user/repo/folder``); :class:`SourceError` otherwise."""
    from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
    from huggingface_hub.errors import (HfHubHTTPError, HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    parts = source.split("/")
    repo_id, inner = "/".join(parts[:2]), "/".join(parts[2:])  # inner: a file or folder in the repo, or ""
    patterns = WEIGHT_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    cache = constants.HF_HUB_CACHE
    timeout, endpoint = constants.HF_HUB_ETAG_TIMEOUT, constants.ENDPOINT  # the probe and the download alike

    def snapshot(local: bool, files: list[str] | None) -> Path:
        folder = Path(snapshot_download(repo_id, allow_patterns=files, local_files_only=local,
                                        etag_timeout=timeout, endpoint=endpoint))
        return folder / inner if inner else folder

    def file(local: bool) -> Path:
        return Path(hf_hub_download(repo_id, inner, local_files_only=local, etag_timeout=timeout, endpoint=endpoint))

    def wanted(listed: list[str]) -> list[str] | None:
        """From a repo listing: None when ``inner`` is a file, else the snapshot patterns of what to read."""
        if inner and inner in listed:
            return None
        prefix = f"{inner}/" if inner else ""
        below = [n[len(prefix):] for n in listed if n.startswith(prefix)]
        if not below:
            shown = ", ".join(sorted(listed)[:5]) + (", …" if len(listed) > 5 else "")
            raise SourceError(f"{source}: the repo {repo_id} has no file or folder '{inner}' (it holds: {shown})")
        return [glob.escape(prefix + n) for n in pick(below, source=source, allow_pickle=allow_pickle)]

    def from_cache(why: str) -> Path:
        missing = SourceError(f"{source}: not a local path, and not in the Hugging Face cache ({cache}); {why}")
        try:
            listed = _cached_listing(repo_id)
            if listed is not None:  # the listing a download cached: the same choice as online
                files = wanted(listed)
                return file(True) if files is None else snapshot(True, files)
            if not inner:
                return snapshot(True, patterns)
            try:
                return file(True)
            except LocalEntryNotFoundError:  # a folder of the repo, if its snapshot holds it
                path = snapshot(True, [f"{glob.escape(inner)}/*"])
                if not path.is_dir():
                    raise missing from None
                return path
        except HFValidationError as e:
            raise SourceError(f"{source}: not a local path, and not a valid hub id ({e})") from None
        except LocalEntryNotFoundError:
            raise missing from None

    if constants.HF_HUB_OFFLINE:
        return from_cache("HF_HUB_OFFLINE is set, so the Hub is not asked")
    try:
        info = HfApi(endpoint=endpoint).repo_info(repo_id, timeout=timeout)  # one request, no retries
    except HFValidationError as e:
        raise SourceError(f"{source}: not a local path, and not a valid hub id ({e})") from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:  # the Hub answered (gated repos too)
        raise SourceError(f"{source}: not a local path, and no such repository on the Hub "
                          f"({type(e).__name__}; private or gated repos need a token)") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status is not None and status < 500 and status not in (408, 429):
            raise SourceError(f"{source}: the Hub refused the request: HTTP {status}") from None
        return from_cache(f"the Hub ({endpoint}) is not answering (HTTP {status})")
    except _transport_errors() as e:
        return from_cache(f"the Hub ({endpoint}) cannot be reached: {type(e).__name__}: {e}")
    listed = None if info.siblings is None else [f.rfilename for f in info.siblings]
    try:
        if listed is None:  # no listing: ask for the file, or everything that may be an adapter
            return file(False) if inner else snapshot(False, patterns)
        files = wanted(listed)
        return file(False) if files is None else snapshot(False, files)
    except SourceError:
        raise
    except LocalEntryNotFoundError as e:  # the network failed after the Hub had answered
        raise SourceError(f"{source}: the download failed and it is not in the cache ({cache}): {e}") from None
    except HfHubHTTPError as e:
        raise SourceError(f"{source}: cannot fetch from the Hub: {type(e).__name__}: {e}") from None
    except _transport_errors() as e:
        raise SourceError(f"{source}: the download from the Hub failed: {type(e).__name__}: {e}") from None


def _cached_listing(repo_id: str) -> list[str] | None:
    """The repo's file list as the last snapshot download cached it (recent huggingface_hub), else None."""
    try:
        from huggingface_hub import get_cached_repo_tree
        from huggingface_hub.errors import CachedRepoTreeNotFoundError
    except ImportError:
        return None
    try:
        return [f.path for f in get_cached_repo_tree(repo_id)]
    except (CachedRepoTreeNotFoundError, OSError, ValueError, KeyError):  # none cached, or unreadable
        return None
