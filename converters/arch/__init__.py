"""One module per architecture: config from each source, name mapping, graph definition."""

from types import ModuleType

from ondevice.errors import UnsupportedArchitectureError


def get_architecture(name: str) -> ModuleType:
    from ondevice.converters.arch import gemma3, llama

    known = {"llama": llama, "gemma3": gemma3}
    if name not in known:
        raise UnsupportedArchitectureError(
            f"architecture {name!r} is not supported (supported: {', '.join(sorted(known))})")
    return known[name]
