"""Fusion passes: rewrite subgraphs into standard ONNX ops (opset 23+); targets legalize them."""
