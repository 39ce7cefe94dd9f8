"""User-facing errors: each carries one line that names the problem and the numbers.

The CLI prints ``error: <message>`` and exits with code 2 for any ``EdgeError``; anything else is
a bug and keeps its traceback.
"""


class EdgeError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class ModelFormatError(EdgeError):
    """A model file is missing, truncated, corrupted or not what its name says."""


class UnsupportedModelError(EdgeError):
    """A well-formed model that edge does not run (dense model, unknown architecture)."""


class BundleError(EdgeError):
    """An edge bundle is missing, incomplete or fails verification."""


def read_json_object(path, error: type[EdgeError]) -> dict:
    """A JSON file that must hold an object; anything else is ``error`` with a one-line message."""
    import json

    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{path} is not a JSON object")
    return data


def field_error(where: str, exc) -> str:
    """One line for the first problem in a pydantic ValidationError: "<where>: field 'a.b': <msg>"."""
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    return f"{where}: field '{loc}': {first['msg']}"
