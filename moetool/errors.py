"""Every error moetool raises on purpose. Each knows its exit code (docs/contract.md §3); the CLI funnel prints
``str(err)`` as one line and exits with ``err.exit_code``."""

from __future__ import annotations


class MoetoolError(Exception):
    """Base class. ``exit_code`` 2: usage error, bad input, or an environment that cannot do the job."""

    exit_code = 2

    def __init__(
        self, message: str, *, file: str | None = None, tensor: str | None = None, fix: str | None = None
    ) -> None:
        self.message = message
        self.file = file
        self.tensor = tensor
        self.fix = fix
        super().__init__(self.line())

    def line(self) -> str:
        parts = []
        if self.file:
            parts.append(str(self.file))
        if self.tensor:
            parts.append(f"tensor {self.tensor}")
        where = ": ".join(parts)
        text = f"{where}: {self.message}" if where else self.message
        if self.fix:
            text = f"{text} ({self.fix})"
        # one line whatever a hostile file put into a name
        return text.replace("\r", "\\r").replace("\n", "\\n")


class InputError(MoetoolError):
    """The checkpoint or file given is malformed, unsupported or inconsistent."""


class UsageError(MoetoolError):
    """Options that contradict each other or the input (OUT exists, OUT inside MODEL, ...)."""


class PlanError(MoetoolError):
    """The requested conversion cannot be done for this checkpoint (e.g. I % 128 != 0 for deepgemm)."""


class EnvironmentError_(MoetoolError):
    """The machine cannot do what was asked (no CUDA, Hub offline and nothing cached, ...)."""


class InternalError(MoetoolError):
    """A bug in moetool, not a problem with the input or the machine: exit 3, and the line asks for a
    report."""

    exit_code = 3
    REPORT = "a bug in moetool: please report it with the traceback MOETOOL_DEBUG=1 prints"

    def __init__(self, message: str, *, file: str | None = None, tensor: str | None = None) -> None:
        super().__init__(f"internal: {message}", file=file, tensor=tensor, fix=self.REPORT)
