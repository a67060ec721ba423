"""What the command-line entry points share: paths taken as written, one clear sentence instead of a traceback wall."""

import functools
import logging
import os
import pickle
import re
import sys

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

from ich.data.dicom import DicomReadError

log = logging.getLogger("ich")

# Mistakes a user can fix from the command line; everything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, DicomReadError)


def friendly_errors(main):
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except pickle.UnpicklingError as err:
            # torch.load(weights_only=True) met pickled Python objects: loading them could run any code
            raise SystemExit(
                "Error: refused to load a checkpoint or weights file that holds pickled Python objects, which "
                "could run code; only files of plain tensors and values load (as ich writes them)."
            ) from err
        except USER_ERRORS as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            log.error("%s", err)
            print(f"Error: {err}\n(set HYDRA_FULL_ERROR=1 for the traceback)", file=sys.stderr)
            sys.exit(1)

    return wrapper


# Keys whose values are paths, besides every `*_path`, `*_dir` and `*_file`: taken as written, whatever they hold.
PATH_KEYS = frozenset({"input", "out", "study_images", "study_labels", "data.root", "data.labels", "model.weights",
                       "model.init_from", "hydra.run.dir", "hydra.sweep.dir"})
# Hydra's options that take a value: the word after them is no override.
VALUED_OPTIONS = frozenset({"-c", "--cfg", "-p", "--package", "-cp", "--config-path", "-cn", "--config-name",
                            "-cd", "--config-dir", "--experimental-rerun", "-i", "--info"})


def is_path_key(key: str) -> bool:
    return key in PATH_KEYS or key.rsplit(".", 1)[-1].endswith(("_path", "_dir", "_file"))


def hydra_quoted(text: str) -> str:
    """`text` as a quoted value of Hydra's override grammar, read back exactly: backslashes before a quote and at
    the end doubled, quotes escaped (an interpolation `${...}` inside still resolves, as in any quoted value)."""
    escaped = re.sub(r"(\\*)'", lambda found: found.group(1) * 2 + "\\'", text)
    return "'" + re.sub(r"(\\+)$", lambda found: found.group(1) * 2, escaped) + "'"


def as_written(override: str, parser: OverridesParser) -> str:
    """The override itself, or with its path value quoted so that Hydra reads the path as written.

    Folder names exported from a PACS hold Hydra's grammar characters (`DOE^JANE`, `Doe, Jane (2023)`, `O'Brien`,
    `ct_[1]`): a path key's value is quoted unless Hydra already reads it as that text (or null); a value the user
    quoted is left alone. Any other key that Hydra cannot read stops with the sentence that says how to quote it.
    """
    key, _, value = override.partition("=")
    name = key.lstrip("+")
    try:
        parsed = parser.parse_override(override)
    except HydraException:
        parsed = None
    if is_path_key(name) and not key.startswith("~"):
        user_quoted = parsed is not None and value[:1] in ("'", '"') and isinstance(parsed.value(), str)
        plain = parsed is not None and not parsed.is_sweep_override() and parsed.value() in (None, value)
        return override if user_quoted or plain else f"{key}={hydra_quoted(value)}"
    if parsed is None:
        raise SystemExit(f"Error: Hydra cannot read {override}: quote its value, "
                         f"as {key}=\"{hydra_quoted(value)}\" in a shell, to take it as written.")
    return override


def paths_as_written(main):
    """Around hydra.main: rewrites the command line's overrides by `as_written` before Hydra parses them."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        parser = OverridesParser.create()
        arguments, after_option = [], False
        for argument in sys.argv[1:]:
            is_override = not after_option and not argument.startswith("-") and "=" in argument
            arguments.append(as_written(argument, parser) if is_override else argument)
            after_option = argument in VALUED_OPTIONS
        sys.argv[1:] = arguments
        return main(*args, **kwargs)

    return wrapper
