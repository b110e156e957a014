"""Pattern rewrites: *pattern* (a small tree of ops written in Python), *check* (returns the reason a match is
rejected), *rewrite* (builds the replacement), collected in named rule sets that count hits and keep the
reasons of near misses, so that "why was this not fused?" has an answer.

Patterns are trees rooted at the op to replace (onnxscript-style, tinygrad-short)::

    x, w, b = Var("x"), Var("w", constant=True), Var("b", constant=True)
    pattern = Op("Add", Op("MatMul", x, w, name="mm"), b)       # Add is commutative: both orders tried

Variables bind value names (the same variable twice must be the same value); ``Op(..., name=...)`` binds the
matched node. Intermediate nodes must have no uses outside the match (else the rewrite would duplicate
work); the root's outputs are replaced by what ``rewrite`` returns, and matched nodes left dead are removed.
Nodes a rule creates carry its name in ``metadata["llmc.rule"]``.

Hand-written rather than onnxscript's rewriter because it works on llmc's networkx IR directly and reports
the reason of the deepest failed step, which the explain report needs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from llmc.ir import Graph, Node
from llmc.pass_manager.base import Pass, PassContext, PassOptions, PassResult

COMMUTATIVE = {"Add", "Mul", "Max", "Min", "Sum", "And", "Or", "Equal"}
RULE_KEY = "llmc.rule"


@dataclass(frozen=True)
class Var:
    """Matches any value (``constant=True``: only initializers/Constant outputs; ``predicate`` filters)."""

    name: str
    constant: bool = False
    predicate: Callable[[Graph, str], bool] | None = None


class Op:
    """Matches a node of ``op_type`` (one of several when a tuple) whose inputs match ``inputs``.

    ``attrs`` maps attribute names to required values or to predicates ``f(value) -> bool``; ``name`` binds
    the node; ``output`` is which output of the node the parent consumes; ``commutative`` overrides the
    default for the op (binary ops in ``COMMUTATIVE`` are tried in both orders); ``shared`` allows the
    node's outputs to be used outside the match (the rewrite then replaces them, e.g. a residual sum).
    """

    def __init__(
        self,
        op_type: str | tuple[str, ...],
        *inputs: Op | Var | None,
        name: str | None = None,
        domain: str = "",
        attrs: dict[str, Any] | None = None,
        output: int = 0,
        commutative: bool | None = None,
        allow_extra_inputs: bool = False,
        shared: bool = False,
    ) -> None:
        self.op_types = (op_type,) if isinstance(op_type, str) else tuple(op_type)
        self.inputs = inputs
        self.name = name
        self.domain = domain
        self.attrs = attrs or {}
        self.output = output
        self.commutative = commutative
        self.allow_extra_inputs = allow_extra_inputs
        self.shared = shared  # its outputs may have uses outside the match (the rewrite must replace them)

    def __repr__(self) -> str:
        return "|".join(self.op_types)


@dataclass
class Match:
    """What a successful match bound: nodes by label, values by variable name, the root and every node."""

    root: Node
    nodes: dict[str, Node] = field(default_factory=dict)
    values: dict[str, str] = field(default_factory=dict)
    matched: list[Node] = field(default_factory=list)
    shared: frozenset[int] = frozenset()  # ids of matched nodes whose outputs may be used elsewhere
    data: dict[str, Any] = field(default_factory=dict)  # what a check found, for the rewrite (eps, axis...)

    def __getitem__(self, key: str) -> str:
        return self.values[key]

    def node(self, key: str) -> Node:
        return self.nodes[key]


class NotASite(str):
    """A check's answer for a node that is no candidate at all (not reported as a near miss)."""


@dataclass
class _Failure:
    depth: int
    reason: str


class _Matcher:
    """Backtracking matcher: every way a pattern can bind (commutative orders, repeated variables) is tried."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.best = _Failure(-1, "")

    def fail(self, depth: int, reason: str) -> None:
        if depth > self.best.depth:
            self.best = _Failure(depth, reason)

    def match_value(self, pattern: Op | Var | None, value: str, m: Match, depth: int) -> Iterator[Match]:
        if pattern is None:
            yield m
            return
        if isinstance(pattern, Var):
            if pattern.constant and self.graph.constant(value) is None:
                return self.fail(depth, f"'{value}' is not a constant (for {pattern.name})")
            if pattern.predicate is not None and not pattern.predicate(self.graph, value):
                return self.fail(depth, f"'{value}' does not satisfy the condition on {pattern.name}")
            bound = m.values.get(pattern.name)
            if bound is not None and bound != value:
                return self.fail(
                    depth, f"{pattern.name} must be the same value in both places ('{bound}' vs '{value}')"
                )
            yield Match(m.root, m.nodes, {**m.values, pattern.name: value}, m.matched, m.shared)
            return
        entry = self.graph.producer_slot(value) if value else None
        if entry is None:
            return self.fail(
                depth, f"expected {pattern} to produce '{value}', but it is a graph input or constant"
            )
        node, slot = entry
        if slot != pattern.output:
            return self.fail(
                depth, f"'{value}' is output {slot} of {node.label}, expected output {pattern.output}"
            )
        yield from self.match_node(pattern, node, m, depth)

    def match_node(self, pattern: Op, node: Node, m: Match, depth: int) -> Iterator[Match]:
        if node.op_type not in pattern.op_types or node.domain != pattern.domain:
            return self.fail(depth, f"expected {pattern} but found {node.op_type} at {node.label}")
        if any(n is node for n in m.matched):
            return self.fail(depth, f"{node.label} would be matched twice")
        for key, want in pattern.attrs.items():
            have = node.attr(key)
            ok = want(have) if callable(want) else _attr_equal(have, want)
            if not ok:
                return self.fail(depth, f"attribute {key}={have!r} of {node.label} does not fit")
        n_in = len(pattern.inputs)
        if len(node.inputs) < n_in or (
            len([i for i in node.inputs if i]) > n_in and not pattern.allow_extra_inputs
        ):
            return self.fail(depth, f"{node.label} has {len(node.inputs)} inputs, the pattern {n_in}")
        orders = [list(range(n_in))]
        commutative = pattern.commutative if pattern.commutative is not None else node.op_type in COMMUTATIVE
        if commutative and n_in == 2:
            orders.append([1, 0])
        nodes = {**m.nodes, pattern.name: node} if pattern.name else m.nodes
        shared = m.shared | {node.id} if pattern.shared else m.shared
        start = Match(m.root, nodes, m.values, [*m.matched, node], shared)
        for order in orders:
            yield from self._inputs(pattern, node, order, 0, start, depth + 1)

    def _inputs(
        self, pattern: Op, node: Node, order: list[int], k: int, m: Match, depth: int
    ) -> Iterator[Match]:
        if k == len(order):
            yield m
            return
        for bound in self.match_value(pattern.inputs[k], node.inputs[order[k]], m, depth):
            yield from self._inputs(pattern, node, order, k + 1, bound, depth)


def _attr_equal(have: Any, want: Any) -> bool:
    if isinstance(want, float) and isinstance(have, float):
        return abs(have - want) <= 1e-6 * max(1.0, abs(want))
    if isinstance(want, np.ndarray) or isinstance(have, np.ndarray):
        return np.array_equal(np.asarray(have), np.asarray(want))
    return have == want


@dataclass
class RewriteRule:
    """pattern -> check -> rewrite.

    ``rewrite(builder, match)`` returns the values replacing the root's outputs, or a dict ``{old: new}`` when
    it replaces other values too (attention also replaces the KV-cache concatenations). ``check`` may store
    what it found in ``match.values``/``match.nodes`` for ``rewrite`` to use.
    """

    name: str
    pattern: Op
    rewrite: Callable[[Builder, Match], Sequence[str] | str]
    check: Callable[[Graph, Match], str | None] | None = None

    def try_match(self, graph: Graph, node: Node) -> tuple[Match | None, _Failure]:
        """The first binding that passes the use and ``check`` tests, else the most telling failure."""
        matcher = _Matcher(graph)
        failure = None
        for m in matcher.match_node(self.pattern, node, Match(node), 0):
            outside = _outside_uses(graph, m)
            if outside:
                failure = failure or _Failure(99, outside)
                continue
            if self.check is not None:
                m = Match(m.root, dict(m.nodes), dict(m.values), list(m.matched), m.shared)
                reason = self.check(graph, m)
                if reason:
                    depth = -1 if isinstance(reason, NotASite) else 100
                    failure = _Failure(depth, reason) if failure is None or failure.depth < depth else failure
                    continue
            return m, _Failure(-1, "")
        return None, failure or matcher.best


def _outside_uses(graph: Graph, m: Match) -> str | None:
    inside = {id(n) for n in m.matched}
    for node in m.matched:
        if node is m.root or node.id in m.shared:
            continue
        for out in node.outputs:
            if not out:
                continue
            if out in graph.outputs:
                return f"'{out}' of {node.label} is a graph output"
            for user in graph.consumers(out):
                if id(user) not in inside:
                    return f"'{out}' of {node.label} is also used by {user.label}"
    return None


class Builder:
    """Creates nodes for a rewrite: placed where the root was, stamped with the rule's name."""

    def __init__(self, graph: Graph, rule: str, root: Node) -> None:
        self.graph = graph
        self.rule = rule
        self.order = root.order
        self.stem = root.name or root.op_type.lower()
        self.created: list[Node] = []

    def op(
        self,
        op_type: str,
        inputs: Sequence[str],
        *,
        outputs: int = 1,
        domain: str = "",
        name: str = "",
        **attrs: Any,
    ) -> list[str]:
        node = self.graph.add_node(
            op_type,
            inputs,
            [self.graph.unique_name(f"{name or self.stem}/{op_type}_out{i}") for i in range(outputs)],
            domain=domain,
            name=self.graph.unique_node_name(name or f"{self.stem}/{op_type}"),
            attributes={k: v for k, v in attrs.items() if v is not None},
            order=self.order,
            metadata={RULE_KEY: self.rule},
        )
        self.created.append(node)
        return list(node.outputs)

    def op1(self, op_type: str, inputs: Sequence[str], **kwargs: Any) -> str:
        return self.op(op_type, inputs, **kwargs)[0]

    def constant(self, name: str, array: np.ndarray) -> str:
        return self.graph.add_initializer(name, array)


@dataclass
class Miss:
    rule: str
    site: str
    reason: str


@dataclass
class RewriteReport:
    hits: Counter = field(default_factory=Counter)
    misses: list[Miss] = field(default_factory=list)

    def details(self) -> dict[str, Any]:
        return {
            "fused": dict(sorted(self.hits.items())),
            "rejected": [m.__dict__ for m in self.misses],
        }


@dataclass
class RuleSet:
    """A named list of rules applied together until none fires (bounded by ``max_rounds``)."""

    name: str
    rules: list[RewriteRule]
    max_rounds: int = 4
    min_miss_depth: int = 2  # a miss is worth reporting once the pattern matched two levels deep

    def apply(self, graph: Graph) -> RewriteReport:
        report = RewriteReport()
        misses: dict[tuple[str, int], tuple[int, Miss]] = {}  # (rule, node id) -> (depth, miss)
        for _ in range(self.max_rounds):
            fired = False
            for node in graph.nodes():
                if node not in graph:
                    continue  # removed by an earlier rewrite in this round
                for rule in self.rules:
                    if node.op_type not in rule.pattern.op_types:
                        continue
                    m, failure = rule.try_match(graph, node)
                    if m is None:
                        key = (rule.name, node.id)
                        deeper = key not in misses or failure.depth > misses[key][0]
                        # rules sharing a name (several spellings): keep the deepest failure
                        if failure.depth >= self.min_miss_depth and deeper:
                            misses[key] = (failure.depth, Miss(rule.name, node.label, failure.reason))
                        continue
                    misses.pop((rule.name, node.id), None)
                    _apply(graph, rule, m)
                    report.hits[rule.name] += 1
                    fired = True
                    break
            if not fired:
                break
        for sub_graph in [s for n in graph.nodes() for s in n.all_subgraphs()]:
            sub = self.apply(sub_graph)
            report.hits.update(sub.hits)
            report.misses.extend(sub.misses)
        ids = {n.id for n in graph.nodes()}  # sites that a later rewrite removed are no sites any more
        live = [miss for (_rule, nid), (_depth, miss) in misses.items() if nid in ids]
        report.misses[:0] = sorted(live, key=lambda m: (m.rule, m.site))
        return report


def _apply(graph: Graph, rule: RewriteRule, m: Match) -> None:
    builder = Builder(graph, rule.name, m.root)
    new = rule.rewrite(builder, m)
    if isinstance(new, dict):  # {old value: new value}: a rule that also replaces values besides the root's
        replacements = dict(new)
    else:
        new = [new] if isinstance(new, str) else list(new)
        replacements = {old: value for old, value in zip(m.root.outputs, new, strict=False) if old}
    for old, value in replacements.items():
        if value == old:
            continue
        info = graph.values.get(old)
        if info is not None and value not in graph.values:  # the replacement has the type of what it replaces
            graph.set_value_info(value, info.dtype, info.shape)
        graph.replace_all_uses(old, value)
    for node in sorted(m.matched, key=lambda n: -n.order):
        if node in graph and not any(graph.is_used(o) for o in node.outputs if o):
            graph.remove_node(node)


class RewritePass(Pass):
    """Base of passes made of one rule set: stats are hits per rule, details keep the rejected sites."""

    rules: ClassVar[RuleSet]

    class Options(PassOptions):
        pass

    def rule_set(self) -> RuleSet:
        return self.rules

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        report = self.rule_set().apply(graph)
        total = sum(report.hits.values())
        stats: dict[str, int | float] = {
            "fused": total,
            **{f"rule:{k}": v for k, v in sorted(report.hits.items())},
        }
        if report.misses:
            stats["rejected"] = len(report.misses)
        return PassResult(changed=total > 0, stats=stats, details=report.details())


def pass_from_rules(obj: RuleSet | RewriteRule, name: str) -> type[Pass]:
    """Wrap a user's rule set (named in a spec as ``module:RULES``) into a pass."""
    rules = obj if isinstance(obj, RuleSet) else RuleSet(obj.name, [obj])
    cls = type(
        f"RulesPass_{name}",
        (RewritePass,),
        {"rules": rules, "__doc__": f"Applies the rule set '{rules.name}'."},
    )
    cls.name = name
    return cls
