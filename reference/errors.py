"""fastvision's errors: each subclasses the builtin a caller would catch, and names the argument,
the value given and the values accepted."""

from __future__ import annotations

from typing import Any


class FastVisionError(Exception):
    """Base class of every error fastvision raises on purpose."""


def _describe(argument: str, value: Any, accepted: str, detail: str = "") -> str:
    message = f"{argument}={value!r} is not accepted; accepted: {accepted}."
    return f"{message} {detail}".rstrip()


class ArgumentValueError(FastVisionError, ValueError):
    """An argument has the right type but a value outside what the contract accepts."""

    def __init__(self, argument: str, value: Any, accepted: str, detail: str = ""):
        self.argument, self.value, self.accepted = argument, value, accepted
        super().__init__(_describe(argument, value, accepted, detail))


class ArgumentTypeError(FastVisionError, TypeError):
    """An argument has a type the contract does not accept."""

    def __init__(self, argument: str, value: Any, accepted: str, detail: str = ""):
        self.argument, self.value, self.accepted = argument, value, accepted
        super().__init__(_describe(argument, value, accepted, detail))


class ConflictingArgumentsError(FastVisionError, ValueError):
    """Two or more arguments that exclude each other were set together."""

    def __init__(self, arguments: tuple[str, ...], message: str):
        self.arguments = arguments
        super().__init__(message)


class MissingDependencyError(FastVisionError, ImportError):
    """An argument asks for a package that is not installed."""

    def __init__(self, argument: str, package: str, detail: str = ""):
        self.argument, self.package = argument, package
        super().__init__(f"{argument} needs the package {package!r}, which is not installed. {detail}".rstrip())


class UnsupportedCombinationError(FastVisionError, NotImplementedError):
    """A combination the contract names as not implemented."""


class OfflineError(FastVisionError, OSError):
    """A hub id that is neither a local directory nor in the local cache, while the hub is out of reach."""

    def __init__(self, model_name: str, reason: str, argument: str = "model_name"):
        self.model_name, self.argument = model_name, argument
        super().__init__(
            f"{argument}={model_name!r} is not a local directory and is not in the local Hugging Face cache, "
            f"and the hub cannot be reached ({reason}). Pass a local directory, or download it once while online "
            f"(`hf download {model_name}`), or set HF_HOME to a cache that holds it."
        )


class RemoteCodeError(FastVisionError, ValueError):
    """The checkpoint needs code from its repository and trust_remote_code is False."""

    def __init__(self, model_name: str, auto_map: Any):
        super().__init__(
            f"model_name={model_name!r} needs code from its repository (auto_map={auto_map!r}), and "
            "trust_remote_code=False. Pass trust_remote_code=True if you trust that code."
        )


class UnknownFamilyError(FastVisionError, ValueError):
    """The checkpoint's model_type is none of the families fastvision supports."""


class CheckpointError(FastVisionError, ValueError):
    """A checkpoint that is damaged, incomplete or disagrees with its own config: names the file, what is
    wrong with it and what to do. Raised before any weight is read wherever the fault can be seen early."""

    def __init__(self, path: Any, problem: str, remedy: str):
        self.path, self.problem, self.remedy = path, problem, remedy
        super().__init__(f"{path}: {problem}. {remedy}")
