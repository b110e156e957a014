"""``logits-last-token``: a decoder computes the lm_head for the last position only.

Generation reads the logits of the last position; a plain export multiplies every prompt position by the
[hidden, vocab] lm_head (49152 columns for SmolLM2), which is most of the prefill's time after attention.
The rewrite slices the hidden state to its last position before the lm_head MatMul, so ``logits`` becomes
[batch, 1, vocab]. The graph records the changed output in ``metadata_props["llmc.last_token_outputs"]``;
golden checks then compare it with the reference's last position, and the Generator reads ``logits[:, -1]``
either way.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from llmc.ir import Graph
from llmc.pass_manager import Pass, PassContext, PassOptions, PassResult, register_pass
from llmc.rewrite import RULE_KEY

METADATA_KEY = "llmc.last_token_outputs"


def last_token_outputs(graph: Graph) -> list[str]:
    text = graph.metadata_props.get(METADATA_KEY, "")
    return [name for name in text.split(",") if name]


@register_pass("logits-last-token")
class LogitsLastToken(Pass):
    """Rewrites lm_head(hidden) into lm_head(hidden[:, -1:]) so prefill computes logits for the last token only."""

    class Options(PassOptions):
        output: str = Field(default="logits", description="the graph output holding the logits")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        name = self.options.output
        if name not in graph.outputs or name in last_token_outputs(graph):
            return PassResult(
                changed=False, stats={"skipped": 1}, details={"reason": f"no output '{name}' to slice"}
            )
        head = graph.producer(name)
        if head is None or head.op_type not in ("MatMul", "Gemm") or head.domain:
            reason = f"'{name}' is not produced by a MatMul (found {head.op_type if head else 'no node'})"
            return PassResult(changed=False, details={"reason": reason})
        hidden = head.inputs[0]
        shape = graph.shape(hidden)
        if shape is None or len(shape) != 3:
            return PassResult(
                changed=False, details={"reason": f"lm_head input '{hidden}' is not [batch, seq, hidden]"}
            )
        starts = graph.add_initializer(f"{name}/last/starts", np.array([-1], np.int64))
        ends = graph.add_initializer(f"{name}/last/ends", np.array([np.iinfo(np.int64).max], np.int64))
        axes = graph.add_initializer(f"{name}/last/axes", np.array([1], np.int64))
        last = graph.add_node(
            "Slice",
            [hidden, starts, ends, axes],
            [graph.unique_name(f"{hidden}/last")],
            name=graph.unique_node_name(f"{name}/last_position"),
            order=head.order - 0.5,
            metadata={RULE_KEY: "logits-last-token"},
        ).outputs[0]
        graph.set_value_info(last, graph.dtype(hidden), (shape[0], 1, shape[2]))
        graph.set_input(head, 0, last)
        info = graph.values.get(name)
        if info is not None and info.shape is not None and len(info.shape) == 3:
            graph.set_value_info(name, info.dtype, (info.shape[0], 1, info.shape[2]))
        graph.metadata_props[METADATA_KEY] = ",".join([*last_token_outputs(graph), name])
        return PassResult(changed=True, stats={"sliced": 1})
