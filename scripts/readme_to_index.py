"""Write the documentation site's home page (docs/index.md) from README.md, so the README stays
the one source: links into ``docs/`` become links between pages, links to other files of the
repository become their plain text (the site holds only ``docs/``), web links and anchors stay.
Run: ``python scripts/readme_to_index.py README.md docs/index.md`` (``make docs`` does)."""
import re
import sys
from pathlib import Path

LINK = re.compile(r"(?<!!)\[([^\]]*)\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"(`+).*?\1")
FENCE = re.compile(r"^\s*(```|~~~)")


def readme_to_index(text: str) -> str:
    """README text -> home page text: ``[t](docs/X.md#a)`` -> ``[t](X.md#a)``; ``[t](other/path)``
    -> ``t``; ``[t](https://...)``, ``[t](#anchor)``, images and code (fenced or inline) unchanged."""

    def sub(m: re.Match) -> str:
        label, target = m.group(1), m.group(2)
        if target.startswith("#") or re.match(r"^[a-z][a-z0-9+.-]*:", target):
            return m.group(0)
        if target.startswith("docs/"):
            return f"[{label}]({target[len('docs/'):]})"
        return label

    out = []
    fenced = False
    for line in text.splitlines(keepends=True):
        if FENCE.match(line):
            fenced = not fenced
        if fenced or FENCE.match(line):
            out.append(line)
            continue
        pieces, last = [], 0
        for code in CODE_SPAN.finditer(line):
            pieces += [LINK.sub(sub, line[last:code.start()]), code.group(0)]
            last = code.end()
        out.append("".join(pieces) + LINK.sub(sub, line[last:]))
    return "".join(out)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python scripts/readme_to_index.py README.md docs/index.md", file=sys.stderr)
        return 2
    src, dst = Path(argv[0]), Path(argv[1])
    dst.write_text(readme_to_index(src.read_text(encoding="utf-8")), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
