"""The QKV projection and RoPE as one op (x -> rotated q, rotated k, v), for fusions across the two."""
