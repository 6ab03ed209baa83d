"""The SwiGLU MLP as one op (fc1 -> SwiGLU -> fc2), for implementations that fuse across those three."""
