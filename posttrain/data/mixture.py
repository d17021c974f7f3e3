"""Data mixtures: a data setting (``data.train``, ``data.val``, RL's ``data.eval``) as a list of
sources, drawn once, by seed, before training (docs/DATA.md).

A data setting is one source (a string: read exactly as a single file always was) or a list of
sources, each a string or ``{path, weight, limit, split, name}``:

- **No weights**: the sources are concatenated in list order. ``data.limit`` keeps the first N
  rows of the concatenation (a source after the N-th row is not read).
- **Weights** (every source has one, or none does): source ``i`` gets the share
  ``w_i / sum(w)`` of ``T`` rows, ``T`` = the rows read from all sources (each cut to its own
  ``limit``), or ``data.limit`` when that is smaller. Shares are rounded by largest remainder
  (ties to the earlier source), so the counts sum to ``T`` exactly. A source asked for
  ``c <= n`` of its ``n`` rows gives ``c`` distinct rows drawn without replacement; asked for
  more, it gives every row ``c // n`` times and ``c % n`` distinct rows drawn: a small source
  is upsampled by repetition, a large one subsampled, and the audit shows both. A source whose
  share rounds to no row is refused: it would be read and never trained on.
- **Order**: sources in list order, each source's rows in file order (repetitions as whole
  passes, then the drawn rest in file order), so ``train.shuffle: false`` trains in file order;
  otherwise the trainers shuffle by ``train.seed`` as for one file.
- **Determinism**: the draw is a pure function of (rows read, weights, ``T``, seed); each source
  draws with its own generator seeded by ``"<seed>/<index>"``, so a resumed run draws the same
  rows, and one source's draw does not depend on the other sources' sizes beyond its count.

Mixing by share is what Megatron-LM's blended datasets and Hugging Face datasets'
``interleave_datasets(probabilities=...)`` do; here the mixture is drawn once (no stream), so its
rows can be audited, counted per source and replayed exactly.

Rows keep their source: the audit reports each source's rows, kept samples and dropped rows
(``data.audit``), and the trainers log ``data/source/<name>/samples`` once (docs/METRICS.md).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from posttrain.data.formats import DATA_SUFFIXES, parse_dataset_spec, read_rows_or_errors
from posttrain.errors import ConfigError, DataError

SOURCE_FIELDS = ("path", "weight", "limit", "split", "name")


@dataclass(frozen=True)
class Source:
    """One source of a data setting: ``spec`` is what ``formats.read_rows_or_errors`` reads
    (``path``, with ``:split`` appended when a split is given), ``key`` the config key errors
    name (``data.train[1]``), ``name`` its name in the audit and the metrics."""

    path: str
    weight: float | None = None
    limit: int | None = None
    split: str | None = None
    name: str = ""
    key: str = ""

    @property
    def spec(self) -> str:
        return f"{self.path}:{self.split}" if self.split else self.path


def is_mixture(setting: Any) -> bool:
    """True for a list of sources; a single path (the form every config had before) is not one."""
    return isinstance(setting, (list, tuple))


def setting_text(setting: Any) -> str:
    """A data setting as errors name it: the path, or the sources' paths joined by `` + ``.

    >>> setting_text("a.jsonl"), setting_text(["a.jsonl", {"path": "org/ds", "split": "test"}])
    ('a.jsonl', 'a.jsonl + org/ds:test')
    """
    if not is_mixture(setting):
        return str(setting)
    return " + ".join(source.spec for source in data_sources(setting, "data"))


def default_source_name(path: str, split: str | None = None) -> str:
    """The name a source gets when it gives none: the file, folder or dataset name without its
    folders and data suffixes, then ``_<split>`` when a split is named; characters outside
    ``[A-Za-z0-9_.-]`` become ``_`` (the name is part of a metric key).

    >>> default_source_name("data/chat.jsonl"), default_source_name("openai/gsm8k:test"), default_source_name("a b.json.gz")
    ('chat', 'gsm8k_test', 'a_b')
    """
    name, _, spec_split = parse_dataset_spec(path)
    if ":" not in path:
        spec_split = None
    stem = Path(name).name or name
    while True:
        suffix = next((s for s in DATA_SUFFIXES if stem.lower().endswith(s) and len(stem) > len(s)), None)
        if suffix is None:
            break
        stem = stem[: -len(suffix)]
    chosen = split or spec_split
    text = stem + (f"_{chosen}" if chosen else "")
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text) or "source"


def source_problem(items: Sequence[Any]) -> str | None:
    """What makes a list of sources (strings, mappings or objects with the ``SOURCE_FIELDS``
    attributes) unusable as a whole, as ``[i].field: problem`` (the key of the setting goes in
    front), or None: weights on some sources but not all, the same source twice, two sources
    with one name, a split given twice.

    >>> source_problem(["a.jsonl", {"path": "b.jsonl", "weight": 2.0}])
    '[0].weight: every source needs a weight, or none does (concatenation); source [1] has one'
    >>> source_problem(["a.jsonl", "x/a.jsonl"])
    "[1].name: 'a' also names source [0]; give one of them a name"
    """
    try:
        sources = [_fields(item, f"[{index}]") for index, item in enumerate(items)]
    except ValueError as exc:
        return str(exc)
    weighted = [index for index, source in enumerate(sources) if source["weight"] is not None]
    if weighted and len(weighted) != len(sources):
        missing = next(index for index, source in enumerate(sources) if source["weight"] is None)
        return f"[{missing}].weight: every source needs a weight, or none does (concatenation); source [{weighted[0]}] has one"
    seen_spec: dict[tuple[str, str | None], int] = {}
    seen_name: dict[str, int] = {}
    for index, source in enumerate(sources):
        if source["split"] is not None and ":" in source["path"] and not Path(source["path"]).expanduser().exists():
            return f"[{index}].split: the path already names a split ({source['path']}); give it once"
        identity = (source["path"], source["split"])
        if identity in seen_spec:
            return (f"[{index}]: the same source as [{seen_spec[identity]}]; give it once (a weight draws a source "
                    f"more often)")
        seen_spec[identity] = index
        name = source["name"] or default_source_name(source["path"], source["split"])
        if name in seen_name:
            return f"[{index}].name: '{name}' also names source [{seen_name[name]}]; give one of them a name"
        seen_name[name] = index
    return None


def _fields(item: Any, where: str) -> dict[str, Any]:
    """A source's fields from a path, a mapping or an object with the ``SOURCE_FIELDS``
    attributes; ValueError ``<where>...: problem`` for an unknown key or a missing path."""
    if isinstance(item, (str, Path)):
        return {"path": str(item), "weight": None, "limit": None, "split": None, "name": None}
    if isinstance(item, Mapping):
        unknown = sorted(set(item) - set(SOURCE_FIELDS))
        if unknown:
            raise ValueError(f"{where}.{unknown[0]}: unknown key; known keys: {', '.join(SOURCE_FIELDS)}")
        fields = {field: item.get(field) for field in SOURCE_FIELDS}
    else:
        fields = {field: getattr(item, field, None) for field in SOURCE_FIELDS}
    if not isinstance(fields["path"], str) or not fields["path"]:
        raise ValueError(f"{where}.path: required (a file, folder, datasets directory or hub dataset)")
    return fields


def data_sources(setting: Any, key: str) -> list[Source]:
    """The sources of one data setting (a path, or a list of paths, mappings or config
    ``DataSource`` objects), named and checked; ``key`` (``data.train``) names them in errors.
    ConfigError (one line naming ``key[i].field``) for a list ``source_problem`` refuses, a
    split on a single file, a non-positive weight or limit."""
    if not is_mixture(setting):
        path = str(setting)
        return [Source(path=path, name=default_source_name(path), key=key)]
    if not setting:
        raise ConfigError(f"{key}: an empty list of sources; give at least one")
    problem = source_problem(setting)
    if problem is not None:
        raise ConfigError(f"{key}{problem}")
    sources = []
    for index, item in enumerate(setting):
        here = f"{key}[{index}]"
        fields = _fields(item, here)
        weight, limit = fields["weight"], fields["limit"]
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))
                                   or not 0 < weight < float("inf")):
            raise ConfigError(f"{here}.weight: must be a positive number, got {weight!r}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
            raise ConfigError(f"{here}.limit: must be a positive whole number, got {limit!r}")
        if fields["split"] is not None and Path(fields["path"]).expanduser().is_file():
            raise ConfigError(f"{here}.split: {fields['path']} is one file; a split selects from a datasets "
                              f"directory, a folder of data files or a hub dataset")
        name = fields["name"] or default_source_name(fields["path"], fields["split"])
        sources.append(Source(fields["path"], None if weight is None else float(weight), limit, fields["split"],
                              name, here))
    return sources


# ----------------------------------------------------------------------------- the draw (pure)
def mixture_counts(sizes: Sequence[int], weights: Sequence[float], total: int | None = None) -> list[int]:
    """Rows each source gives a weighted mixture: the share ``w_i / sum(w)`` of
    ``T = min(total, sum(sizes))`` (``T = sum(sizes)`` without ``total``), rounded by largest
    remainder, ties to the earlier source; the counts sum to ``T``. Exact (fractions).

    >>> mixture_counts([4, 6], [1.0, 3.0])   # T = 10: shares 2.5 and 7.5, the tie goes to source 0
    [3, 7]
    >>> mixture_counts([2, 10], [1.0, 1.0], total=5)
    [3, 2]
    """
    if len(sizes) != len(weights) or not sizes:
        raise ValueError("one weight per source, at least one source")
    rows = sum(sizes) if total is None else min(total, sum(sizes))
    weight_sum = sum(Fraction(w) for w in weights)
    shares = [Fraction(w) / weight_sum * rows for w in weights]
    counts = [int(share) for share in shares]
    by_remainder = sorted(range(len(shares)), key=lambda index: (-(shares[index] - counts[index]), index))
    for index in by_remainder[: rows - sum(counts)]:
        counts[index] += 1
    return counts


def mix_sources(sizes: Sequence[int], weights: Sequence[float] | None, total: int | None,
                seed: int) -> list[tuple[int, int]]:
    """The rows of a mixture, in order, as ``(source_index, row_index)`` pairs (the semantics
    are the module's: concatenation without ``weights``, else ``mixture_counts`` rows per source,
    drawn without replacement, repeated in whole passes when a source has fewer rows).

    sizes: ``[S]`` rows read from each source. weights: ``[S]`` positive, or None. total: the
    mixture's rows at most (``data.limit``), or None. seed: the draw's seed (``train.seed``).
    Raises ValueError when a weighted source with no rows is asked for some.

    >>> mix_sources([2, 3], None, 4, seed=0)
    [(0, 0), (0, 1), (1, 0), (1, 1)]
    >>> draws = mix_sources([2, 4], [1.0, 1.0], None, seed=0)  # 3 rows each: source 0 repeats one row
    >>> draws[:2], len(draws), sorted({row for source, row in draws if source == 1}) == [row for source, row in draws[3:]]
    ([(0, 0), (0, 1)], 6, True)
    """
    if weights is None:
        order = [(index, row) for index, size in enumerate(sizes) for row in range(size)]
        return order if total is None else order[:total]
    draws: list[tuple[int, int]] = []
    for index, (size, count) in enumerate(zip(sizes, mixture_counts(sizes, weights, total))):
        if count and not size:
            raise ValueError(f"source {index} has no rows but is asked for {count}")
        if not count:
            continue
        passes, rest = divmod(count, size)
        drawn = sorted(random.Random(f"{seed}/{index}").sample(range(size), rest))
        draws += [(index, row) for _ in range(passes) for row in range(size)] + [(index, row) for row in drawn]
    return draws


# ----------------------------------------------------------------------------- reading a mixture
@dataclass
class Mixture:
    """A data setting's sources, the rows read from each and the draw over them."""

    sources: list[Source]
    rows: list[list[tuple[int, Any]]]  # per source: (line, row or DataError), as read
    draws: list[tuple[int, int]]  # (source index, index into rows[source]) in mixture order
    weighted: bool

    def drawn_rows(self, index: int) -> Iterator[tuple[int, Any]]:
        """Each row of source ``index`` the mixture holds, once, in file order."""
        for position in sorted({row for source, row in self.draws if source == index}):
            yield self.rows[index][position]

    def drawn_counts(self) -> list[int]:
        """Rows of the mixture from each source, repetitions counted."""
        counts = Counter(source for source, _ in self.draws)
        return [counts[index] for index in range(len(self.sources))]


def read_mixture(sources: Sequence[Source], *, limit: int | None, seed: int,
                 columns: Mapping[str, str] | None = None) -> Mixture:
    """Read every source (each cut to its own ``limit``; without weights, reading stops once
    ``limit`` rows are read in all) and draw the mixture (``mix_sources``). DataError, one line
    naming the source's key, for a weighted source with no rows or whose share rounds to none."""
    weighted = sources[0].weight is not None
    rows: list[list[tuple[int, Any]]] = []
    left = None if weighted else limit
    for source in sources:
        cap = source.limit if left is None else left if source.limit is None else min(source.limit, left)
        read = [] if cap == 0 else list(read_rows_or_errors(source.spec, limit=cap, columns=columns))
        rows.append(read)
        if left is not None:
            left -= len(read)
    sizes = [len(read) for read in rows]
    weights = [source.weight for source in sources] if weighted else None
    if weighted:
        for source, size, count in zip(sources, sizes, mixture_counts(sizes, weights, limit)):
            if not size:
                raise DataError(f"{source.key} ({source.spec}): no rows to draw from")
            if not count:
                raise DataError(f"{source.key} ({source.name}): weight {source.weight:g} gives it none of the "
                                f"mixture's {min(limit or sum(sizes), sum(sizes))} rows; raise its weight or drop it")
    return Mixture(list(sources), rows, mix_sources(sizes, weights, limit if weighted else None, seed), weighted)


def draw_items(mixture: Mixture, items: Sequence[Sequence[Any]], line_of) -> tuple[list[Any], list[int], list[int]]:
    """The mixture's items in mixture order, from ``items[i]`` (what source ``i``'s drawn rows
    gave: samples, pairs or prompts, several per row or none); ``line_of(item)`` is the row's
    line. Returns ``(items, kept, dropped)``: ``kept[i]`` items and ``dropped[i]`` rows that gave
    none (bad, too long, empty) from source ``i``, repetitions counted."""
    by_line: list[dict[int, list[Any]]] = []
    for found in items:
        lines: dict[int, list[Any]] = {}
        for item in found:
            lines.setdefault(line_of(item), []).append(item)
        by_line.append(lines)
    out: list[Any] = []
    kept = [0] * len(mixture.sources)
    dropped = [0] * len(mixture.sources)
    for source, position in mixture.draws:
        line = mixture.rows[source][position][0]
        got = by_line[source].get(line, [])
        out += got
        kept[source] += len(got)
        dropped[source] += not got
    return out, kept, dropped


@dataclass
class SourceCount:
    """One source's line in a mixture's audit: rows read, rows drawn into the mixture
    (repetitions counted), distinct rows drawn, items kept and drawn rows that gave none."""

    name: str
    spec: str
    weight: float | None
    read: int
    drawn: int
    distinct: int
    kept: int
    dropped: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def source_counts(mixture: Mixture, kept: Sequence[int], dropped: Sequence[int]) -> list[SourceCount]:
    drawn = mixture.drawn_counts()
    return [SourceCount(source.name, source.spec, source.weight, len(mixture.rows[index]), drawn[index],
                        len({row for s, row in mixture.draws if s == index}), kept[index], dropped[index])
            for index, source in enumerate(mixture.sources)]


def mixture_lines(counts: Sequence[SourceCount], *, weighted: bool, seed: int, what: str = "samples") -> list[str]:
    """The audit's mixture table: one line per source (``what``: samples, pairs or prompts).

    >>> print("\\n".join(mixture_lines([SourceCount("a", "a.jsonl", 3.0, 8, 6, 6, 6, 0),
    ...                                 SourceCount("b", "b.jsonl", 1.0, 1, 2, 1, 2, 0)], weighted=True, seed=0)))
    data mixture: 2 sources, 8 rows drawn by weight (seed 0)
      a (a.jsonl): weight 3 (75.0% of rows): read 8, drew 6, kept 6 samples, dropped 0 rows
      b (b.jsonl): weight 1 (25.0% of rows): read 1, drew 2 (each row 2.0x), kept 2 samples, dropped 0 rows
    """
    rows = sum(count.drawn for count in counts)
    how = f"drawn by weight (seed {seed})" if weighted else "concatenated"
    lines = [f"data mixture: {len(counts)} source{'s' if len(counts) != 1 else ''}, {rows} rows {how}"]
    for count in counts:
        share = f"{count.drawn / rows:.1%} of rows" if rows else "no rows"
        head = f"weight {count.weight:g} ({share})" if weighted else share
        repeat = f" (each row {count.drawn / count.distinct:.1f}x)" if count.drawn > count.distinct else ""
        lines.append(f"  {count.name} ({count.spec}): {head}: read {count.read}, drew {count.drawn}{repeat}, "
                     f"kept {count.kept} {what}, dropped {count.dropped} rows")
    return lines


def source_metrics(setting: Any, items: Sequence[Any], source_of: Callable[[Any], str] = lambda item: item.source
                   ) -> dict[str, int]:
    """``data/source/<name>/samples``: how many of the training ``items`` (samples, pairs or
    prompts, repetitions counted) came from each source of a mixture, ``source_of(item)`` being
    an item's source spec; ``{}`` for a single source (the metric lines it always had).

    >>> source_metrics([{"path": "a.jsonl"}, "b.jsonl"], ["a.jsonl", "b.jsonl", "a.jsonl"], str)
    {'data/source/a/samples': 2, 'data/source/b/samples': 1}
    """
    if not is_mixture(setting):
        return {}
    counts = Counter(source_of(item) for item in items)
    return {f"data/source/{source.name}/samples": counts[source.spec] for source in data_sources(setting, "data")}
