"""Open Inference Protocol v2 pieces beyond plain JSON: the binary tensor extension codec, tensor conversion,
the protocol's error bodies, and Triton's model configuration and statistics extensions."""
