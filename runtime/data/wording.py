"""Counts in messages for people: `counted(1, "document")` is '1 document', never '1 documents'."""


def counted(n: int, noun: str) -> str:
    """`n` with thousands separators and the noun, in the plural unless n is 1."""
    return f"{n:,} {noun if n == 1 else noun + 's'}"
