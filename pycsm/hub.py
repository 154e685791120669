"""Finding the published GGUF files on the Hugging Face hub.

`download(quant, repo_id)` fetches ``csm-1b-{quant}.gguf`` with `huggingface_hub.hf_hub_download`, so
it lands in (and is reused from) the normal Hugging Face cache and honours the usual environment:
``HF_HOME`` / ``HF_HUB_CACHE`` (where), ``HF_HUB_OFFLINE=1`` (cache only), ``HF_TOKEN`` or a saved
login (private or gated repositories), ``HF_ENDPOINT`` (mirrors).

`parse_model_name` reads crispasr's model names (``csm``, ``csm-1b``, ``sesame``, ``sesame-csm``,
``csm-tts``, ``csm_tts``, optionally ``:QUANT``), which the command line's ``-m`` accepts besides
paths.

Before going to the network for a file that is not cached, the endpoint is probed with one TCP
connection (`PROBE_TIMEOUT` seconds): without network the error comes at once, not after the hub
client's retries (about 24 s).
"""

from __future__ import annotations

import os
import socket
import urllib.parse
import urllib.request
from pathlib import Path

from .errors import CSMError

DEFAULT_REPO = "cstr/csm-1b-GGUF"
DEFAULT_QUANT = "q8_0"
QUANTS = ("f16", "q8_0", "q4_k")
# crispasr's names of this model (its backend aliases and its registry names)
MODEL_NAMES = ("csm", "csm-1b", "csm-tts", "csm_tts", "sesame", "sesame-csm")
PROBE_TIMEOUT = 3.0


def check_quant(quant: str) -> str:
    """The canonical quant name (lower case); ValueError naming the known ones otherwise."""
    q = quant.lower() if isinstance(quant, str) else quant
    if q not in QUANTS:
        raise ValueError(f"unknown quant {quant!r}: choose one of {', '.join(QUANTS)}")
    return q


def model_filename(quant: str) -> str:
    """File name of a published quant: ``csm-1b-{quant}.gguf``."""
    return f"csm-1b-{check_quant(quant)}.gguf"


def parse_model_name(spec: str) -> tuple[bool, str | None]:
    """(is a model name, its quant or None) for a `-m` value: ``csm``, ``sesame-csm:q4_k``...
    ValueError for a known name with an unknown quant."""
    name, _, quant = spec.partition(":")
    if name.lower() not in MODEL_NAMES:
        return False, None
    return True, (check_quant(quant) if quant else None)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def cached_path(quant: str = DEFAULT_QUANT, repo_id: str = DEFAULT_REPO, *, revision: str | None = None,
                cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The cached copy of ``csm-1b-{quant}.gguf`` from `repo_id`, or None; never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, model_filename(quant), cache_dir=cache_dir, revision=revision)
    return Path(found) if isinstance(found, str) and os.path.isfile(found) else None


def probe_endpoint(timeout: float = PROBE_TIMEOUT) -> None:
    """CSMError at once when the hub endpoint (HF_ENDPOINT, or the proxy that serves it) cannot be
    reached with one TCP connection within `timeout` seconds."""
    from huggingface_hub import constants

    endpoint = constants.ENDPOINT
    url = urllib.parse.urlsplit(endpoint)
    target = url
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        target = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((target.hostname, port), timeout=timeout).close()
    except OSError as e:
        via = f" through the proxy {target.hostname}:{port}" if target is not url else ""
        raise CSMError(f"cannot reach the Hugging Face hub at {endpoint}{via} "
                       f"({getattr(e, 'strerror', None) or e or 'timed out'})") from None


def download(quant: str = DEFAULT_QUANT, repo_id: str = DEFAULT_REPO, *, revision: str | None = None,
             token: str | bool | None = None, cache_dir: str | os.PathLike | None = None,
             local_files_only: bool = False, progress: bool = True) -> Path:
    """Path of ``csm-1b-{quant}.gguf`` from `repo_id`, downloaded into the Hugging Face cache if needed.

    ValueError for an unknown quant. CSMError, naming the ways out (``--model PATH`` / a local file),
    when the file is neither cached nor downloadable (offline, no network, no such repository/file,
    access refused). progress=False: no download bar.
    """
    filename = model_filename(quant)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
        disable_progress_bars,
        enable_progress_bars,
    )

    local = "pass a local GGUF file instead: `pycsm --model PATH` or `pycsm.CSM(PATH)`"
    if not (local_files_only or _offline()) and cached_path(quant, repo_id, revision=revision,
                                                          cache_dir=cache_dir) is None:
        try:
            probe_endpoint()
        except CSMError as e:
            raise CSMError(f"{filename} from {repo_id} is not in the Hugging Face cache and cannot be downloaded: "
                           f"{e}; {local}") from None
    if not progress:
        disable_progress_bars()
    try:
        path = hf_hub_download(repo_id, filename, revision=revision, token=token, cache_dir=cache_dir,
                               local_files_only=local_files_only)
    except LocalEntryNotFoundError:
        why = ("HF_HUB_OFFLINE is set" if _offline() else
               "local_files_only was requested" if local_files_only else "the hub could not be reached")
        raise CSMError(f"{filename} from {repo_id} is not in the Hugging Face cache and cannot be downloaded "
                       f"({why}); download it once with network access, or {local}") from None
    except GatedRepoError:
        raise CSMError(f"{repo_id} is gated: accept its terms on huggingface.co and log in "
                       f"(`hf auth login` or HF_TOKEN), or {local}") from None
    except RepositoryNotFoundError:
        raise CSMError(f"repository {repo_id} not found on the Hugging Face hub (or it is private and no "
                       f"token was given); {local}") from None
    except RevisionNotFoundError:
        raise CSMError(f"revision {revision!r} not found in {repo_id}; {local}") from None
    except EntryNotFoundError:
        raise CSMError(f"{filename} not found in {repo_id}; {local}") from None
    except (HfHubHTTPError, OSError) as e:  # network and HTTP failures
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CSMError(f"cannot download {filename} from {repo_id}: {first}; {local}") from None
    finally:
        if not progress:
            enable_progress_bars()
    return Path(path)
