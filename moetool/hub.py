"""MODEL argument → local directory: a folder as it is, or a Hub repo id through the Hub cache."""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from moetool.env import ENV
from moetool.errors import EnvironmentError_, InputError
from moetool.io.fs import kind_of

# Weights, JSON and tokenizer files only: never pickles, never code.
ALLOW_PATTERNS = ("*.safetensors", "*.json", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja", "LICENSE*")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


@dataclass(frozen=True)
class Source:
    """Where a checkpoint came from: ``path`` always; ``repo``/``revision`` for a Hub model."""

    path: Path
    repo: str | None = None
    revision: str | None = None

    def describe(self) -> dict[str, str]:
        d = {"path": str(self.path)}
        if self.repo:
            d["repo"] = self.repo
            d["revision"] = self.revision or "main"
        return d


def resolve(model: str) -> Source:
    """A local directory, or ``org/name[@revision]`` downloaded (or found in the cache) via huggingface_hub."""
    p = Path(model).expanduser()
    try:
        st = os.stat(p)
    except FileNotFoundError:
        st = None
    except OSError as e:  # a loop of links, a name too long: a local path that cannot be opened
        raise InputError(f"cannot open MODEL: {e.strerror}", file=model) from None
    if st is None and os.path.lexists(p):
        raise InputError("MODEL is a link to nothing", file=model, fix="point it at a checkpoint directory")
    if st is not None:
        if not stat.S_ISDIR(st.st_mode):
            what = "a file" if stat.S_ISREG(st.st_mode) else kind_of(st.st_mode)
            raise InputError(f"MODEL is {what}, not a checkpoint directory", file=model)
        return Source(p.absolute())
    if not REPO_ID.match(model) or model.startswith((".", "/", "~")):
        raise InputError("no such directory, and not a Hub repo id (org/name[@revision])", file=model)
    repo, _, revision = model.partition("@")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError as e:  # pragma: no cover - a hard dependency
        raise EnvironmentError_(f"huggingface_hub is not importable ({e})") from None
    try:
        path = snapshot_download(
            repo, revision=revision or None, allow_patterns=[*ALLOW_PATTERNS, *ENV.hub_allow]
        )
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        raise EnvironmentError_(
            "not in the Hub cache and the Hub cannot be reached"
            + (" (HF_HUB_OFFLINE is set)" if offline else ""),
            file=model,
            fix="download it once with network access, or pass a local directory",
        ) from None
    except RepositoryNotFoundError:
        raise InputError(
            "no such repository on the Hub (or it is private)",
            file=model,
            fix="check the repo id, or log in with `hf auth login`",
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise EnvironmentError_(f"download failed: {e}".splitlines()[0], file=model) from None
    return Source(Path(path), repo=repo, revision=revision or None)
