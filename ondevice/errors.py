"""Exceptions with messages that say what to do. Every error the SDK raises on bad input is one of these."""


class OndeviceError(Exception):
    """Base class of every error the SDK raises on purpose."""


class ModelNotFoundError(OndeviceError):
    """A model alias or path that does not resolve to a file."""


class SourceFormatError(OndeviceError):
    """A checkpoint that cannot be read: wrong magic, truncated, corrupt."""


class UnsupportedArchitectureError(OndeviceError):
    """A checkpoint whose architecture has no converter file."""


class BundleError(OndeviceError):
    """A bundle that is missing files, fails its checksums or names paths outside itself."""


class BundleExistsError(OndeviceError):
    """The conversion target exists and --force was not given."""


class ContextOverflowError(OndeviceError):
    """A prompt (plus requested tokens) that does not fit in the model's context."""


class ChatTemplateError(OndeviceError):
    """A chat template that fails to render in the sandbox."""


class DraftMismatchError(OndeviceError):
    """A draft bundle that cannot draft for its target: it would propose token ids the target does not have."""


class TokenizerMismatchError(DraftMismatchError):
    """A draft whose tokenizer differs from its target's: their token ids would not mean the same."""


class ProfileError(OndeviceError):
    """A device profile that is missing, malformed, or has a figure out of range or without a source."""


class FlashStoreError(OndeviceError):
    """A flash store (ffn_flash.bin) that does not match its manifest entry: truncated, wrong size, short read."""


class BudgetTooSmallError(OndeviceError):
    """A DRAM budget below what must stay resident, or too small for the neurons a token needs."""


class InvalidArgumentError(OndeviceError, ValueError):
    """An argument of the wrong kind or out of its range (max_tokens=-1, top_p=2, backend="x", threads=0).
    Also a ValueError, so code that catches either keeps working."""


class ProviderError(OndeviceError):
    """An execution provider asked for by name that ONNX Runtime does not know, that this onnxruntime
    build lacks, or that failed to start; the message lists the providers this build has."""


class ModelBusyError(OndeviceError):
    """A call on a model that an unfinished stream of the same thread still holds: waiting for it would
    never end. Read the stream to its end or close() it first."""
