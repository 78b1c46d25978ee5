"""Hugging Face model ids for our commands: an `org/name` that is not a local folder becomes its HF-cache snapshot."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

# What `vllm serve org/name` accepts as a model id: one namespace, one name (letters, digits, '_', '-', '.').
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
# Weight formats no loader here reads (they would only double a download): skipped when a snapshot is fetched.
# `*.bin` stays: diffusers may ship a VQ model's weights (vqvae/) only in that format.
UNREAD_FORMATS = ["*.gguf", "*.onnx", "*.msgpack", "*.h5", "*.tflite", "*.ot"]


def is_hub_id(model: str) -> bool:
    """True for an `org/name` that names no local path (a local path wins, as in vLLM)."""
    return (HUB_ID.fullmatch(model) is not None and not model.startswith(".") and ".." not in model
            and not Path(model).exists())


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def resolve_model(model: str, *, field: str = "--model", revision: str | None = None,
                  token: bool | str | None = None, cache_dir: str | None = None,
                  local_files_only: bool | None = None) -> str:
    """The local folder to load `model` from: a local path as given, a Hub id as its snapshot folder in the HF cache
    (downloaded if missing; offline, `HF_HUB_OFFLINE=1`, only the cache is used). Any failure ends the command with
    one line naming `field` and the id (SystemExit), never a traceback."""
    if not is_hub_id(model):
        return model
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = constants.HF_HUB_OFFLINE if local_files_only is None else local_files_only
    at = f" at revision {revision}" if revision else ""
    try:
        return snapshot_download(model, revision=revision, token=token, cache_dir=cache_dir,
                                 local_files_only=offline, ignore_patterns=UNREAD_FORMATS)
    except LocalEntryNotFoundError as e:
        if offline:
            if type(e) is not LocalEntryNotFoundError:  # e.g. IncompleteSnapshotError: say what is missing
                raise SystemExit(f"{field}: {model}{at}: {_one_line(e)}") from None
            raise SystemExit(f"{field}: {model} is not a local folder and is not in the Hugging Face cache{at} "
                             "(offline)") from None
        raise SystemExit(f"{field}: {model} is not a local folder, is not in the Hugging Face cache{at} and the Hub "
                         f"could not be reached ({_one_line(e.__cause__ or e)})") from None
    except GatedRepoError:
        raise SystemExit(f"{field}: {model} is a gated model: accept its terms on huggingface.co, then pass "
                         "--hf-token TOKEN (or set HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise SystemExit(f"{field}: {model} is not a local folder and not a model on the Hugging Face Hub (a private "
                         "one needs --hf-token TOKEN or HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise SystemExit(f"--revision: {revision} is not a revision of {model}") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise SystemExit(f"{field}: {model}: {_one_line(e)}") from None


def add_hub_arguments(parser: argparse.ArgumentParser) -> None:
    """vLLM's flags for a model given as a Hugging Face id: --revision, --hf-token, --download-dir."""
    parser.add_argument("--revision", default=None,
                        help="branch, tag or commit of a Hugging Face model id (default: main)")
    parser.add_argument("--hf-token", nargs="?", const=True, default=None,
                        help="Hugging Face token for a private or gated id (bare flag: the token of `hf auth login`)")
    parser.add_argument("--download-dir", default=None,
                        help="Hugging Face cache folder for model ids (default: HF_HUB_CACHE / HF_HOME's hub/)")


def resolve_model_arg(model: str, ns: argparse.Namespace, field: str = "--model") -> str:
    """resolve_model with the flags add_hub_arguments put on `ns`."""
    return resolve_model(model, field=field, revision=ns.revision, token=ns.hf_token, cache_dir=ns.download_dir)


def resolve_serve_argv(args: list[str]) -> list[str]:
    """`vllm serve` arguments whose MODEL (args[0]) is a Hub id: MODEL becomes the local snapshot folder (so every
    reader in the server, ours and vLLM's, sees a folder), --revision is dropped (the snapshot is that revision) and
    the id stays the name clients use (--served-model-name, unless given). Other arguments are returned as given."""
    if not args or not is_hub_id(args[0]):
        return args
    flags = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_hub_arguments(flags)
    flags.add_argument("--served-model-name", nargs="+", default=None)
    known, _ = flags.parse_known_args(args[1:])
    folder = resolve_model(args[0], field="MODEL", revision=known.revision, token=known.hf_token,
                           cache_dir=known.download_dir)
    rest, skip = [], False
    for i, arg in enumerate(args[1:], start=1):
        if skip:
            skip = False
        elif arg == "--revision":
            skip = i + 1 < len(args)
        elif not arg.startswith("--revision="):
            rest.append(arg)
    if known.served_model_name is None:
        rest += ["--served-model-name", args[0]]
    return [folder, *rest]
