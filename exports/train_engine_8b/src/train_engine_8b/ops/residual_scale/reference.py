"""residual_scale, reference: no op of its own. add_rms_norm multiplies the attention / MLP output by r
(h = x + y * r); the model calls no residual_scale (ops.residual_scale is None).

Its cost: backward needs dy = dh * r before the out-projection's two GEMMs, an elementwise pass over a
(tokens, hidden) tensor per sublayer that no GEMM absorbs ("weight" moves r onto the weights instead).
"""

residual_scale = None
