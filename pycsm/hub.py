"""Finding the published GGUF files on the Hugging Face hub.

`download(quant, repo_id)` fetches ``csm-1b-{quant}.gguf`` with `huggingface_hub.hf_hub_download`, so
it lands in (and is reused from) the normal Hugging Face cache and honours the usual environment:
``HF_HOME`` / ``HF_HUB_CACHE`` (where), ``HF_HUB_OFFLINE=1`` (cache only), ``HF_TOKEN`` or a saved
login (private or gated repositories), ``HF_ENDPOINT`` (mirrors).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import CSMError

DEFAULT_REPO = "cstr/csm-1b-GGUF"
DEFAULT_QUANT = "q8_0"
QUANTS = ("f16", "q8_0", "q4_k")


def check_quant(quant: str) -> str:
    """The canonical quant name (lower case); ValueError naming the known ones otherwise."""
    q = quant.lower() if isinstance(quant, str) else quant
    if q not in QUANTS:
        raise ValueError(f"unknown quant {quant!r}: choose one of {', '.join(QUANTS)}")
    return q


def model_filename(quant: str) -> str:
    """File name of a published quant: ``csm-1b-{quant}.gguf``."""
    return f"csm-1b-{check_quant(quant)}.gguf"


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def download(quant: str = DEFAULT_QUANT, repo_id: str = DEFAULT_REPO, *, revision: str | None = None,
             token: str | bool | None = None, cache_dir: str | os.PathLike | None = None,
             local_files_only: bool = False) -> Path:
    """Path of ``csm-1b-{quant}.gguf`` from `repo_id`, downloaded into the Hugging Face cache if needed.

    ValueError for an unknown quant. CSMError, naming the ways out (``--model PATH`` / a local file),
    when the file is neither cached nor downloadable (offline, no network, no such repository/file,
    access refused).
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
    )

    local = "pass a local GGUF file instead: `pycsm --model PATH` or `pycsm.CSM(PATH)`"
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
    return Path(path)
