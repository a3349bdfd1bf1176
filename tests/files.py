"""File helpers shared by the tests that damage checkpoints and configs on purpose."""

import contextlib
import json


@contextlib.contextmanager
def edited_json(path):
    """The JSON file at `path`, loaded for in-place edits and written back on exit."""
    with open(path) as f:
        data = json.load(f)
    yield data
    with open(path, "w") as f:
        json.dump(data, f)
