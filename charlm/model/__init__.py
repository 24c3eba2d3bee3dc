"""The language model: the RNN LM and its cells, number formats, the checkpoint format, ONNX export."""
