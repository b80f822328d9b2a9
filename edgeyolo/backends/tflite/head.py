"""Give each kind of head value its own int8 scale before full-integer conversion (a float-exact rewrite).

Each detection level ends in one 1x1 Conv whose 255 channels are (anchor, [x, y, w, h, obj, cls...]).
Full-integer TFLite quantises that Conv's output with ONE scale; the class and objectness logits
span about -20..8 while the box logits span about -4..5, so the box logits get a quarter of the
resolution they could have, and boxes drift by pixels after the sigmoid. Here every head Conv becomes,
per anchor, a box Conv and an objectness+class Conv, each followed by its sigmoid, concatenated
back in the original channel order *after* the sigmoids (where every value shares the 0..1 scale),
and the head's old sigmoid is dropped (an element-wise op commutes with the reshapes in between).
"""

from __future__ import annotations

import json

import numpy as np

BOX_CHANNELS = 4
PASS_THROUGH = ("Reshape", "Transpose")


def split_head_scales(model) -> int:
    """Rewrite ``model`` (an ``onnx.ModelProto`` with a ``sigmoid`` head) in place; returns the levels rewritten."""
    meta = {p.key: p.value for p in model.metadata_props}
    if meta.get("head") != "sigmoid":
        return 0
    outputs_per_anchor = int(meta["nc"]) + 5
    anchors_per_level = [len(level) // 2 for level in json.loads(meta["anchors"])]
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    sigmoids = head_sigmoids(graph)
    for sigmoid, anchors in zip(sigmoids, anchors_per_level):
        conv = head_conv(sigmoid, producer)
        nodes, merged = split_conv(graph, conv, anchors, outputs_per_anchor)
        for consumer in graph.node:
            consumer.input[:] = [merged if name == conv.output[0] else name for name in consumer.input]
        sigmoid.op_type = "Identity"  # the parts already went through their sigmoids
        at = list(graph.node).index(conv)
        graph.node.remove(conv)
        for offset, node in enumerate(nodes):
            graph.node.insert(at + offset, node)
    drop_unused_initializers(graph)
    return len(sigmoids)


def split_conv(graph, conv, anchors: int, outputs_per_anchor: int):
    """Per anchor a box Conv and a score Conv, each with its sigmoid, concatenated in the original order.

    Adds the new weights to ``graph``; returns the new nodes and the name of their concatenated output.
    """
    from onnx import helper, numpy_helper

    weights = {init.name: init for init in graph.initializer}
    w = numpy_helper.to_array(weights[conv.input[1]])
    b = numpy_helper.to_array(weights[conv.input[2]])
    if w.shape[0] != anchors * outputs_per_anchor or w.shape[2:] != (1, 1):
        raise ValueError(f"head Conv {conv.name} has weights {w.shape}, not ({anchors * outputs_per_anchor}, C, 1, 1)")
    groups = (("box", 0, BOX_CHANNELS), ("score", BOX_CHANNELS, outputs_per_anchor))
    parts, nodes = [], []
    for a in range(anchors):
        for group, lo, hi in groups:
            rows = slice(a * outputs_per_anchor + lo, a * outputs_per_anchor + hi)
            name = f"{conv.name}/split_a{a}_{group}"
            graph.initializer.extend([numpy_helper.from_array(np.ascontiguousarray(w[rows]), f"{name}.weight"),
                                      numpy_helper.from_array(np.ascontiguousarray(b[rows]), f"{name}.bias")])
            nodes.append(helper.make_node("Conv", [conv.input[0], f"{name}.weight", f"{name}.bias"],
                                          [f"{name}/logits"], name=f"{name}/Conv", kernel_shape=[1, 1]))
            nodes.append(helper.make_node("Sigmoid", [f"{name}/logits"], [f"{name}/prob"], name=f"{name}/Sigmoid"))
            parts.append(f"{name}/prob")
    merged = f"{conv.name}/split_probs"
    nodes.append(helper.make_node("Concat", parts, [merged], name=f"{conv.name}/split_concat", axis=1))
    return nodes, merged


def head_sigmoids(graph) -> list:
    """The Sigmoid nodes whose outputs reach the graph output only through Reshape and Concat, in level order."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}

    def reaches_output(name: str) -> bool:
        if name in outputs:
            return True
        users = consumers.get(name, [])
        return bool(users) and all(u.op_type in ("Reshape", "Concat") and reaches_output(u.output[0]) for u in users)

    return [n for n in graph.node if n.op_type == "Sigmoid" and reaches_output(n.output[0])]


def head_conv(sigmoid, producer):
    """Walk back from a head sigmoid through reshapes/transposes to the Conv that feeds it."""
    node = producer[sigmoid.input[0]]
    while node.op_type in PASS_THROUGH:
        node = producer[node.input[0]]
    if node.op_type != "Conv":
        raise ValueError(f"head sigmoid {sigmoid.name} does not follow a Conv through reshapes")
    return node


def drop_unused_initializers(graph) -> None:
    used = {name for node in graph.node for name in node.input}
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
