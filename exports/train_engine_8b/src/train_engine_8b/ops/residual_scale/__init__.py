"""Where MiniCPM's residual scale r (scale_depth / sqrt(L)) multiplies each sublayer's output."""
