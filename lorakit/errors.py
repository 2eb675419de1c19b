"""Typed exceptions. Each message says what was expected, what was found, and where."""


class LorakitError(Exception):
    """Base class of every lorakit error."""


class ConfigError(LorakitError, ValueError):
    """An adapter config is malformed: unknown key, bad value, conflicting options."""


class UnknownVariantError(ConfigError):
    """A variant name or `peft_type` that no registered variant answers to."""


class UnsupportedFeatureError(ConfigError):
    """A PEFT feature lorakit does not implement (refused by name, never silently ignored)."""


class VllmIncompatibleError(ConfigError):
    """An adapter or folder breaks a rule of vLLM's LoRA loader; the message names the rule and its source."""


class TargetError(LorakitError, ValueError):
    """Targets match nothing, or match a module that cannot be adapted."""


class AdapterNameError(LorakitError, ValueError):
    """An adapter name is invalid, unknown, or already taken."""


class AdapterFileError(LorakitError):
    """An adapter folder or file cannot be used. Subclasses say why."""


class CorruptFileError(AdapterFileError):
    """A file is missing, truncated, or not valid JSON / safetensors."""


class PickleRefusedError(AdapterFileError):
    """Only a pickle (`adapter_model.bin`) is present; lorakit never unpickles."""


class StateDictError(AdapterFileError):
    """Tensors in a file do not fit the model: missing or extra keys, wrong shapes, non-finite values."""


class MergeError(LorakitError):
    """A merge was refused (non-finite result in safe mode, unmergeable variant, bad state)."""


class QuantizeError(LorakitError, ValueError):
    """A base cannot be quantized: unknown method, already quantized, merged adapters, bitsandbytes missing."""


class RoutingError(LorakitError, ValueError):
    """A routing request cannot be served (unknown adapter, batch size mismatch, merged layers)."""


class DataError(LorakitError, ValueError):
    """A dataset cannot be read or used: missing file or column, empty, non-numeric label, unreachable download."""


class MissingDependencyError(LorakitError, ImportError):
    """An optional package a feature needs is not installed; the message names the extra that brings it."""


class ModelError(LorakitError, ValueError):
    """A model spec cannot be loaded: unknown name, missing directory, missing optional package."""


class TrainingError(LorakitError):
    """A training run cannot continue: non-finite loss, unusable checkpoint, bad resume."""


class ServeError(LorakitError):
    """The serving engine cannot take or finish a request."""


class RequestError(ServeError, ValueError):
    """A request is malformed: a field is missing, of the wrong type, out of range or too long (HTTP 400)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class UnknownAdapterError(ServeError, KeyError):
    """A request or command names an adapter the engine does not know (HTTP 404)."""

    def __str__(self):  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class QueueFullError(ServeError):
    """The engine's waiting queue is full; retry later (HTTP 429 with Retry-After)."""


class CapacityError(ServeError):
    """A request can never fit: its prompt plus max_tokens exceed the context or the KV memory (HTTP 400)."""


class EngineStoppedError(ServeError):
    """The engine is shutting down or has stopped (HTTP 503)."""


class StatisticsError(LorakitError, ValueError):
    """A statistical rule cannot be applied: too few replicates, unpaired or empty data, a non-finite value."""


class NotMeasuredError(LorakitError):
    """A claim's experiment has not produced its numbers yet; the message says what to run."""
