"""A small PromQL reader for the dashboard tests: which metric series and label names a query uses.

Not a full parser: it tokenises, knows PromQL's functions, aggregations and keywords, and treats every other
bare identifier as a metric name. That is enough to catch a typo'd metric or label in a dashboard query.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

FUNCTIONS = frozenset({
    "abs", "absent", "absent_over_time", "acos", "acosh", "asin", "asinh", "atan", "atanh", "avg_over_time", "ceil",
    "changes", "clamp", "clamp_max", "clamp_min", "cos", "cosh", "count_over_time", "day_of_month", "day_of_week",
    "day_of_year", "days_in_month", "deg", "delta", "deriv", "exp", "floor", "histogram_avg", "histogram_count",
    "histogram_fraction", "histogram_quantile", "histogram_stddev", "histogram_stdvar", "histogram_sum",
    "holt_winters", "hour", "idelta", "increase", "irate", "label_join", "label_replace", "last_over_time", "ln",
    "log10", "log2", "mad_over_time", "max_over_time", "min_over_time", "minute", "month", "predict_linear",
    "present_over_time", "quantile_over_time", "rad", "rate", "resets", "round", "scalar", "sgn", "sin", "sinh",
    "sort", "sort_desc", "sqrt", "stddev_over_time", "stdvar_over_time", "sum_over_time", "tan", "tanh", "time",
    "timestamp", "vector", "year"
})
AGGREGATIONS = frozenset({
    "avg", "bottomk", "count", "count_values", "group", "max", "min", "quantile", "stddev", "stdvar", "sum", "topk"
})
GROUPING = frozenset(["by", "without", "on", "ignoring", "group_left", "group_right"])
KEYWORDS = frozenset(["bool", "offset", "and", "or", "unless", "inf", "nan"])

GRAFANA_VARS = re.compile(r"\$(__rate_interval|__interval|__range|\{__rate_interval\}|\{__interval\}|\{__range\})")
TOKEN = re.compile(r"""
    (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<range>\[[^\]]*\])
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=(){},@])
  | (?P<space>\s+)
  | (?P<var>\$[A-Za-z_][A-Za-z0-9_]*)
""", re.VERBOSE)


@dataclass
class Usage:
    metrics: dict[str, set[str]] = field(default_factory=dict)  # series name -> label names in its matchers
    grouping: set[str] = field(default_factory=set)               # labels named in by/without/on/... lists
    unknown_functions: set[str] = field(default_factory=set)


def tokens(expr: str) -> list[tuple[str, str]]:
    expr = GRAFANA_VARS.sub("5m", expr)
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        if m is None:
            raise ValueError(f"cannot read PromQL at {expr[pos:pos + 20]!r} in {expr!r}")
        kind = m.lastgroup or ""
        if kind != "space":
            out.append((kind, m.group()))
        pos = m.end()
    return out


def _label_list(toks: list[tuple[str, str]], i: int) -> tuple[list[str], int]:
    """``( a, b )`` starting at ``toks[i]``; returns the names and the index after ``)``."""
    if i >= len(toks) or toks[i][1] != "(":
        return [], i
    names: list[str] = []
    i += 1
    while i < len(toks) and toks[i][1] != ")":
        if toks[i][0] == "ident":
            names.append(toks[i][1])
        i += 1
    return names, i + 1


def _matchers(toks: list[tuple[str, str]], i: int) -> tuple[set[str], int]:
    """``{ label op "value", ... }`` starting at ``toks[i]``; returns the label names and the index after."""
    labels: set[str] = set()
    i += 1
    while i < len(toks) and toks[i][1] != "}":
        if toks[i][0] == "ident" and i + 1 < len(toks) and toks[i + 1][1] in ("=", "!=", "=~", "!~"):
            labels.add(toks[i][1])
        i += 1
    return labels, i + 1


def usage(expr: str) -> Usage:
    toks = tokens(expr)
    use = Usage()
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        nxt = toks[i + 1][1] if i + 1 < len(toks) else ""
        if kind == "ident" and text in GROUPING:
            names, i = _label_list(toks, i + 1)
            use.grouping.update(names)
            continue
        if kind == "ident" and (nxt == "(" or (text in AGGREGATIONS and nxt in GROUPING)):
            if text not in FUNCTIONS and text not in AGGREGATIONS:
                use.unknown_functions.add(text)
            i += 1
            continue
        if kind == "ident" and text not in KEYWORDS:
            labels: set[str] = set()
            i += 1
            if i < len(toks) and toks[i][1] == "{":
                labels, i = _matchers(toks, i)
            use.metrics.setdefault(text, set()).update(labels)
            continue
        if text == "{":  # a selector without a metric name: {__name__=~"..."}
            labels, i = _matchers(toks, i)
            use.metrics.setdefault("", set()).update(labels)
            continue
        i += 1
    return use


LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?P<selector>.+?)\s*,\s*(?P<label>[A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$")
LEGEND_LABEL = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def template_query(query: str) -> tuple[str, str] | None:
    """``label_values(selector, label)`` -> (selector, label); None for other variable queries."""
    m = LABEL_VALUES.match(query)
    return (m.group("selector"), m.group("label")) if m else None
