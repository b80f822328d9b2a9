"""Quantisation-aware training (``edgeyolo qat``): fine-tune the very Q/DQ graph a build deploys.

The placement is not re-implemented in torch: the post-training Q/DQ ONNX that ``quantize.py``
writes for the target (``write_qdq``) is interpreted by torch (``graph.QdqGraph``), every
QuantizeLinear→DequantizeLinear pair becoming a fake quantiser with a learnable scale and every
quantised Conv weight a per-channel fake quantiser over a trainable float weight. What is trained
is therefore exactly what ONNX Runtime and TensorRT run, BatchNorm already folded. The learned
scales are stored in the checkpoint (``checkpoint.py``) and a build writes the Q/DQ ONNX from
them instead of calibrating (``learned.LearnedRanges``).

Importing this package does not import torch (the build side needs only ``learned``).
"""
