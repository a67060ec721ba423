"""What the command-line entry points share: one clear sentence instead of a traceback wall."""

import functools
import logging
import os
import pickle
import sys

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
