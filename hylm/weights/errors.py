class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the model its config describes; the message says why."""


MAX_LISTED = 12


def format_names(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f" ... and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")


def tensor_problems(missing: list[str], unexpected: list[str], wrong_shape: list[str]) -> list[str]:
    """The lines of a CheckpointError about tensors: each kind of problem with every name involved."""
    out = []
    if missing:
        out.append(f"missing tensors ({len(missing)}): {format_names(missing)}")
    if unexpected:
        out.append(f"unexpected tensors ({len(unexpected)}): {format_names(sorted(unexpected))}")
    if wrong_shape:
        out.append(f"tensors with the wrong shape ({len(wrong_shape)}): {format_names(wrong_shape)}")
    return out
