"""Markdown pieces the bench reports share (report.md of `terrafm bench`, gpu_check's report): no torch import."""


def table(header: list[str], rows: list[list]) -> list[str]:
    """A pipe table's lines, then an empty line."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows] + [""]


def mib(nbytes, digits: int = 1) -> str:
    """Bytes as MiB with `digits` decimals; '-' for None (not measured)."""
    return "-" if nbytes is None else f"{nbytes / 2**20:.{digits}f} MiB"
