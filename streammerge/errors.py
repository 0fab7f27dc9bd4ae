"""Every error streammerge raises on purpose.

Each class also inherits the built-in a caller would expect (as huggingface_hub does), and carries the exit
code the CLI returns for it. Messages name the tensor or file and say what to do; the CLI prints them on one
line without a traceback.
"""

from __future__ import annotations


class StreamMergeError(Exception):
    """Base class: an expected failure with a message meant for the user."""

    exit_code = 1


class InputError(StreamMergeError, ValueError):
    """A base or adapter file is missing, unreadable, corrupt or inconsistent."""

    exit_code = 3


class MissingFileError(InputError, FileNotFoundError):
    """A file the merge needs does not exist."""

    exit_code = 3


class CheckpointError(InputError):
    """A safetensors file or index is corrupt, truncated or points outside the model folder."""

    exit_code = 3


class AdapterError(InputError):
    """adapter_config.json or the adapter weights are malformed."""

    exit_code = 3


class PlanError(StreamMergeError, ValueError):
    """The adapter does not fit the base (unmatched module, ambiguous match, wrong shape)."""

    exit_code = 4


class UnsupportedError(StreamMergeError, NotImplementedError):
    """The adapter uses a PEFT feature that cannot be merged (correctly) into a checkpoint."""

    exit_code = 5


class OutputError(StreamMergeError, OSError):
    """The output cannot be written: exists, not a directory, unwritable, disk full, locked."""

    exit_code = 6


class NumericError(StreamMergeError, ArithmeticError):
    """NaN/Inf in the inputs, or merged values that overflow the output dtype."""

    exit_code = 7


class HubError(StreamMergeError, FileNotFoundError):
    """A Hugging Face repo id could not be resolved (missing, gated, offline and not cached)."""

    exit_code = 8


class VerifyError(StreamMergeError, AssertionError):
    """`streammerge verify` found a merged output that does not match base + adapter."""

    exit_code = 9


class ClusterError(StreamMergeError, RuntimeError):
    """The distributed engine cannot run: Ray is not installed, the cluster cannot be reached, or a job's task
    was lost (a worker or node died) again after its retry."""

    exit_code = 10


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, with what the interrupt left at --output (the CLI prints it and exits 130).

    A KeyboardInterrupt, not a StreamMergeError: `except Exception` must never swallow an interrupt.
    """

    exit_code = 130


def one_line(message: str) -> str:
    """Fold a message to one line for stderr (multi-problem messages join with '; ')."""
    parts = [p.strip() for p in str(message).splitlines() if p.strip()]
    return "; ".join(parts)
